"""CFG rules that change which branches a step evaluates: guidance in a limited interval (no uncond outside
it), adaptive guidance (no uncond once cond and uncond agree), and Perp-Neg (a third branch, the empty prompt).

Each is a pure function of the step's predictions; what makes a branch unnecessary (the interval, the cut-off
state) is a small value the plan consults in ``needed_branches``, so a skipped branch is never evaluated.
Reductions run in ``numerics.accumulation_dtype`` on peak-1 inputs (as in ``rules``), so half-precision and
tiny inputs stay finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .numerics import accumulation_dtype, unit_and_peak
from .rules import cfg

__all__ = [
    "AdaptiveCutoffState",
    "GuidanceInterval",
    "adaptive_cutoff_cfg",
    "guidance_interval_cfg",
    "per_sample_cosine_similarity",
    "perp_neg",
]


# --- guidance in a limited interval -------------------------------------------------------------------

@dataclass(frozen=True)
class GuidanceInterval:
    """The σ interval ``(sigma_low, sigma_high]`` of Kynkäänniemi et al. 2024 (arXiv:2404.07724): the
    guidance weight is w inside it and 1 (the cond alone) outside. Used as the CFG term's window: outside it the
    CFG term is inactive, so the uncond is not evaluated. Open at ``sigma_low``, closed at ``sigma_high``, as
    the paper writes it."""

    sigma_high: float
    sigma_low: float

    def __post_init__(self):
        if not self.sigma_low < self.sigma_high:
            raise ValueError(f"the guidance interval needs sigma_low < sigma_high, got ({self.sigma_low}, "
                             f"{self.sigma_high}]")

    def contains(self, sigma: float) -> bool:
        return self.sigma_low < sigma <= self.sigma_high


def guidance_interval_cfg(cond: Tensor, uncond: Tensor, scale: float, sigma: float, sigma_high: float,
                          sigma_low: float) -> Tensor:
    """Kynkäänniemi et al. 2024 (arXiv:2404.07724), the guided prediction: ``u + w(σ)(c − u)`` with ``w(σ) = w`` for
    ``σ ∈ (σ_lo, σ_hi]`` and 1 elsewhere, so ``c`` outside the interval. Affine, so any prediction space.
    The plan does not call this: it makes the CFG term's window a ``GuidanceInterval`` (no uncond outside);
    this is the definition the tests compare the plan with."""
    if GuidanceInterval(sigma_high, sigma_low).contains(sigma):
        return cfg(cond, uncond, scale)
    return cond


# --- adaptive guidance (truncated CFG) ----------------------------------------------------------------

def per_sample_cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b> / (||a|| ||b||)`` per sample, shape ``(B,)``, in the accumulation dtype; 1 where both are
    zero (identical), 0 where only one is (no direction to agree with)."""
    wide = accumulation_dtype(a)
    a_unit, _ = unit_and_peak(a.to(wide))  # cosine similarity does not change with each side's scale
    b_unit, _ = unit_and_peak(b.to(wide))
    a_flat, b_flat = a_unit.reshape(a.shape[0], -1), b_unit.reshape(b.shape[0], -1)
    a_norm, b_norm = a_flat.norm(dim=1), b_flat.norm(dim=1)
    both_nonzero = (a_norm > 0) & (b_norm > 0)
    cosine = (a_flat * b_flat).sum(dim=1) / torch.where(both_nonzero, a_norm * b_norm, torch.ones_like(a_norm))
    both_zero = (a_norm == 0) & (b_norm == 0)
    return torch.where(both_zero, torch.ones_like(cosine), cosine)


class AdaptiveCutoffState:
    """Per-run state of adaptive guidance: which samples of the batch have stopped CFG. Make a fresh one for
    every sampling run (the plan's ``new_run_state``); ``finished`` (every sample stopped) is what the plan
    reads to stop evaluating the uncond."""

    def __init__(self):
        self.stopped: Tensor | None = None  # (B,) bool

    @property
    def finished(self) -> bool:
        return self.stopped is not None and bool(self.stopped.all())


def adaptive_cutoff_cfg(cond: Tensor, uncond: Tensor, scale: float, state: AdaptiveCutoffState,
                        threshold: float = 0.99) -> Tensor:
    """Adaptive guidance (Castillo et al. 2023, arXiv:2312.12487, the AG policy), on noise predictions
    (ε; in ComfyUI's noise space σ·ε or σ·v, which has the same cosine similarity per sample).

    While a sample's ``γ = cos(ε_c, ε_u)`` has not exceeded ``threshold`` it gets CFG, ``u + w(c − u)``;
    at the step where γ first exceeds it, the step is still CFG, and every later step of the run is the cond
    alone (the paper's policy: guidance is truncated for the rest of sampling once the two agree). The test is
    per sample, so a batch gives each image what it would get alone; the uncond stops being evaluated once
    every sample has stopped. ``state`` holds the per-sample stop and is updated in place.

    What was checked against the paper: only its abstract (arXiv:2312.12487 abstract page; AAAI 2025 record):
    AG "adaptively omits network evaluations when the denoising process displays convergence", the CFG steps
    "become increasingly aligned with simple conditional steps", 25% less computation. The full text (the AG
    policy's equation, γ̄ and its value, the prediction space of the cosine similarity, per image or per batch,
    and whether the detecting step is still guided) could not be read here: no stored page reaches past the
    abstract and the authors published no code. Threshold 0.99, ε space, per image and a guided detecting step
    are this implementation's choices, not confirmed.
    """
    stopped_before = state.stopped
    if stopped_before is not None and stopped_before.shape[0] != cond.shape[0]:
        raise ValueError(f"AdaptiveCutoffState holds {stopped_before.shape[0]} samples but got a batch of "
                         f"{cond.shape[0]}; use a fresh state for each run")
    guided = cfg(cond, uncond, scale)
    agreed = per_sample_cosine_similarity(cond, uncond) > threshold
    if stopped_before is not None:
        stopped_before = stopped_before.to(cond.device)
        guided = torch.where(stopped_before.reshape(-1, *([1] * (cond.ndim - 1))), cond, guided)
        agreed = agreed | stopped_before
    state.stopped = agreed
    return guided


# --- Perp-Neg -----------------------------------------------------------------------------------------

def perp_neg(cond: Tensor, uncond: Tensor, empty: Tensor, scale: float, neg_scale: float = 1.0,
             per_sample: bool = True) -> Tensor:
    """Perp-Neg (Armandpour et al. 2023, arXiv:2304.04968, with one negative prompt, its weight written
    ``w·s`` as ComfyUI's PerpNeg does):

        ε = ε_∅ + w·(ε_+ − ε_∅ − s·(ε_− − ε_∅)^⊥),
        (ε_− − ε_∅)^⊥ = (ε_− − ε_∅) − <ε_− − ε_∅, ε_+ − ε_∅> / ||ε_+ − ε_∅||² · (ε_+ − ε_∅),

    with ``cond`` = ε_+, ``uncond`` = the negative prompt's ε_−, ``empty`` = the empty prompt's ε_∅, w the
    guidance scale and s ``neg_scale``: the negative prompt only pushes away along what it does not share
    with the positive. The result is the same in x0 and noise space (every branch shares x and σ, and the
    projection is invariant to the common factor −σ), so ComfyUI's x0 form equals the paper's ε form.

    ``per_sample``: the projection per image (the paper, one image at a time). False: one dot product and
    norm over the whole batch, as ComfyUI's ``perp_neg`` (comfy_extras/nodes_perpneg.py), which mixes the
    images of a batch. Where ``ε_+ = ε_∅`` the projection on the zero vector is zero, so the whole negative
    is perpendicular (ComfyUI divides by zero there).
    """
    wide = accumulation_dtype(cond)
    empty_wide = empty.to(wide)
    positive = cond.to(wide) - empty_wide
    negative = uncond.to(wide) - empty_wide
    positive_unit, _ = unit_and_peak(positive, per_sample)
    negative_unit, negative_peak = unit_and_peak(negative, per_sample)
    if per_sample:
        dims = tuple(range(1, cond.ndim))
        dot = (negative_unit * positive_unit).sum(dim=dims, keepdim=True)
        positive_norm_squared = (positive_unit * positive_unit).sum(dim=dims, keepdim=True)
    else:
        dot, positive_norm_squared = (negative_unit * positive_unit).sum(), (positive_unit * positive_unit).sum()
    # <n, p> / ||p||² · p = <n_unit, p_unit> / ||p_unit||² · p_unit · peak_n: the positive's scale cancels.
    has_direction = positive_norm_squared > 0
    coefficient = torch.where(has_direction, dot / torch.where(has_direction, positive_norm_squared, 1.0), 0.0)
    perpendicular = negative - coefficient * positive_unit * negative_peak
    return (empty_wide + scale * (positive - neg_scale * perpendicular)).to(cond.dtype)
