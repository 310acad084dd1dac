"""Guidance that remembers the run's trajectory: momentum guidance (an extrapolation away from the running
average of past velocities) and SMC-CFG (a sliding-mode correction of the guidance error). Both are defined by
their papers on flow velocities, the plan's "velocity" space ((x − x0)/σ: ε on EPS models); their state is per
run (make a fresh one for each run). Accumulation in ``numerics.accumulation_dtype``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .numerics import accumulation_dtype, unit_and_peak

__all__ = ["MomentumGuidanceState", "SlidingModeState", "momentum_guidance", "smc_cfg"]


class MomentumGuidanceState:
    """Momentum guidance's exponential moving average of the run's past (guided) velocities."""

    def __init__(self):
        self.average: Tensor | None = None


def momentum_guidance(velocity: Tensor, state: MomentumGuidanceState, momentum: float = 0.5,
                      ema: float = 0.6) -> Tensor:
    """Momentum guidance (Liao et al. 2026, arXiv:2602.20360, Alg. 1), on velocities:

        v̂_i = v_i + α·(v_i − m_i),     m_{i+1} = β·m_i + (1 − β)·v_i,     m_0 = v_0,

    α = ``momentum``, β = ``ema``: the step's velocity is pushed away from the average of the previous ones (the
    first step is unchanged). ``velocity`` is the step's (guided) velocity; ``state`` is updated in place.
    """
    wide = accumulation_dtype(velocity)
    current = velocity.to(wide)
    average = current if state.average is None else state.average.to(device=velocity.device, dtype=wide)
    if average.shape != current.shape:
        raise ValueError(f"MomentumGuidanceState holds shape {tuple(average.shape)} but got "
                         f"{tuple(current.shape)}; use a fresh state for each run")
    extrapolated = current + momentum * (current - average)
    state.average = ema * average + (1.0 - ema) * current
    return extrapolated.to(velocity.dtype)


class SlidingModeState:
    """SMC-CFG's previous (corrected) guidance error e_{t−1}."""

    def __init__(self):
        self.previous_error: Tensor | None = None


def smc_cfg(cond: Tensor, uncond: Tensor, scale: float, state: SlidingModeState, sliding_lambda: float = 6.0,
            k: float = 0.1) -> Tensor:
    """Sliding Mode Control CFG (Wang et al., CVPR 2026, arXiv:2603.03281, §3.4), on velocities:

        e_t = c − u,   s_t = (e_t − e_{t−1}) + λ·e_{t−1},   ê_t = e_t − k·sign(s_t),   result u + w·ê_t,

    with e_{t−1} the previous step's corrected error ê (e_t itself on the first step), λ = ``sliding_lambda``
    the sliding surface's shape and k the switching gain. sign(s) is taken as s / ||s||₂ per sample, the form the
    paper's Table 4 reports as equal and the maintained ComfyUI reference (pamparamm/sd-perturbed-attention)
    uses; a zero s gives no correction. With k = 0 this is CFG.
    """
    wide = accumulation_dtype(cond)
    uncond_wide = uncond.to(wide)
    error = cond.to(wide) - uncond_wide
    previous = error if state.previous_error is None else state.previous_error.to(device=cond.device, dtype=wide)
    if previous.shape != error.shape:
        raise ValueError(f"SlidingModeState holds shape {tuple(previous.shape)} but got {tuple(error.shape)}; "
                         "use a fresh state for each run")
    surface = (error - previous) + sliding_lambda * previous
    surface_unit, _ = unit_and_peak(surface)  # s / ||s|| = unit / ||unit||, with no overflow for tiny s
    unit_norm = surface_unit.reshape(surface.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (surface.ndim - 1)))
    direction = surface_unit / torch.where(unit_norm > 0, unit_norm, torch.ones_like(unit_norm))
    corrected = error - k * direction
    state.previous_error = corrected
    return (uncond_wide + scale * corrected).to(cond.dtype)
