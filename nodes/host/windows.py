"""Percent windows: a node's start/end percent kept as percent until a run starts, then turned into a σ window
with the model sampling that run uses.

Converting at the node (as ComfyUI's own SkipLayerGuidanceDiT does) would take the σ of the model sampling the
node saw: a ModelSamplingSD3/Flux/Discrete node applied after ours changes the schedule, and the window would
silently cover other steps than the percents say.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...guidance_core.schedules import SigmaWindow
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
    return stack.with_windows(lambda w: w.sigma_window(model_sampling) if isinstance(w, PercentWindow) else w)
