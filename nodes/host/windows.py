"""Percent windows: a node's start/end percent kept as percent until a run starts, then turned into a σ window
with the model sampling that run uses.

Converting at the node (as ComfyUI's own SkipLayerGuidanceDiT does) would take the σ of the model sampling the
node saw: a ModelSamplingSD3/Flux/Discrete node applied after ours changes the schedule, and the window would
silently cover other steps than the percents say.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import comfy.model_sampling

from ...guidance_core.branch_rules import GuidanceInterval
from ...guidance_core.schedules import SigmaWindow, step_of_sigma
from .marks import GuidanceError


@dataclass(frozen=True)
class PercentWindow:
    """Active for ``percent_to_sigma(end_percent) ≤ σ ≤ percent_to_sigma(start_percent)``, both ends included
    as in SkipLayerGuidanceDiT, with the run's model sampling."""

    start_percent: float
    end_percent: float

    def sigma_window(self, model_sampling) -> SigmaWindow:
        return SigmaWindow(float(model_sampling.percent_to_sigma(self.start_percent)),
                           float(model_sampling.percent_to_sigma(self.end_percent)))

    def contains(self, sigma: float) -> bool:
        raise RuntimeError("PercentWindow.contains: the window must first be resolved with the run's model "
                           "sampling (step.py resolves every window when a run starts)")


def percent_window(start_percent: float, end_percent: float, input_prefix: str = "") -> PercentWindow | None:
    """A node's window, checked; None when it covers the whole run."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise GuidanceError(f"{input_prefix}start_percent ({start_percent}) and end_percent ({end_percent}) must "
                            "satisfy 0 ≤ start_percent ≤ end_percent ≤ 1.")
    if start_percent <= 0.0 and end_percent >= 1.0:
        return None
    return PercentWindow(start_percent, end_percent)


def resolve_windows(stack, model_sampling):
    """``stack`` with its percent windows as σ windows of ``model_sampling`` (σ windows stay as they are)."""
    # Any window that needs the run's model sampling has a ``sigma_window`` (PercentWindow, NoiseRatioInterval).
    return stack.with_windows(lambda w: w.sigma_window(model_sampling) if hasattr(w, "sigma_window") else w)


@dataclass(frozen=True)
class NoiseRatioInterval:
    """A guidance interval ``(sigma_low, sigma_high]`` given in the σ of Karras et al.'s EDM, the noise-to-signal
    ratio √((1 − ᾱ)/ᾱ), as Kynkäänniemi et al. 2024 give theirs (SDXL: (0.28, 5.42]). ComfyUI's EPS, v and EDM
    model samplings use that σ; a flow model's (``comfy.model_sampling.CONST``: x = (1 − t)·x0 + t·ε) is t, whose
    noise-to-signal ratio is t / (1 − t), so the interval becomes (lo/(1 + lo), hi/(1 + hi)] in t: the same
    noise levels, whatever the family or shift."""

    sigma_high: float
    sigma_low: float

    def sigma_window(self, model_sampling) -> GuidanceInterval:
        if isinstance(model_sampling, comfy.model_sampling.CONST):
            return GuidanceInterval(_flow_time(self.sigma_high), _flow_time(self.sigma_low))
        return GuidanceInterval(self.sigma_high, self.sigma_low)

    def contains(self, sigma: float) -> bool:
        raise RuntimeError("NoiseRatioInterval.contains: the interval must first be resolved with the run's model "
                           "sampling (step.py resolves every window when a run starts)")


def _flow_time(noise_ratio: float) -> float:
    """The flow time t whose noise-to-signal ratio t / (1 − t) is ``noise_ratio`` (an infinite ratio is t = 1)."""
    return 1.0 if math.isinf(noise_ratio) else noise_ratio / (1.0 + noise_ratio)


def scale_at_sigma(scale: float, schedule, sigma: float, sample_sigmas) -> float:
    """The scale of a node that acts inside the forward (NAG, PLADIS) at ``sigma``: ``schedule(step, steps)``
    at the step of the run's ``sample_sigmas`` that ``sigma`` belongs to, or ``scale`` without a schedule."""
    if schedule is None:
        return scale
    if sample_sigmas is None or len(sample_sigmas) < 2:
        return float(schedule(0, 1))
    sigmas = sample_sigmas.tolist()
    return float(schedule(step_of_sigma(sigma, sigmas), len(sigmas) - 1))
