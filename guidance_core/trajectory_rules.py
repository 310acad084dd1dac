"""Guidance that remembers the run's trajectory: momentum guidance (an extrapolation away from the running
average of past velocities) and SMC-CFG (a sliding-mode correction of the guidance error). Both are defined by
their papers on flow velocities, the plan's "velocity" space ((x − x0)/σ: ε on EPS models); their state is per
run (make a fresh one for each run). Accumulation in ``numerics.accumulation_dtype``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .numerics import accumulation_dtype, unit_and_peak

__all__ = ["SWITCHING_FORMS", "MomentumGuidanceState", "SlidingModeState", "momentum_guidance", "smc_cfg"]


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

    What was checked against the paper's full text (arXiv HTML v1, the only part of it the tools here could
    read): Algorithm 1's inputs, a flow model v_θ(·, t), a time grid {t_i}, EMA β ∈ [0, 1) and weight α ≥ 0,
    sampling from Z_{t_0} ~ N(0, I); and the abstract's "extrapolates the current velocity using an exponential
    moving average of past velocities", one evaluation per step, combinable with CFG. The body of Algorithm 1
    (the order of the extrapolation and the average's update, m_0, and whether v is the guided or the cond
    velocity when combined with CFG) could NOT be read; the order and m_0 = v_0 here are those of the maintained
    ComfyUI reference (pamparamm/sd-perturbed-attention ``mg_nodes.py``, on the CFG result) and of an independent
    one (Duanyll/flow-control ``samplers/momentum.py``, on the guided velocity), which agree with each other.
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


SWITCHING_FORMS = ("sign", "unit")


def smc_cfg(cond: Tensor, uncond: Tensor, scale: float, state: SlidingModeState, sliding_lambda: float = 5.0,
            k: float = 0.2, switching: str = "sign") -> Tensor:
    """Sliding Mode Control CFG (Wang et al., CVPR 2026, arXiv:2603.03281, §3.4), on velocities:

        e_t = c − u,   s_t = (e_t − e_{t−1}) + λ·e_{t−1},   ê_t = e_t − k·sign(s_t),   result u + w·ê_t,

    with e_{t−1} the previous step's corrected error ê (e_t itself on the first step, so s_0 = λ·e_0),
    λ = ``sliding_lambda`` the sliding surface's shape and k the switching gain. With k = 0 this is CFG.

    What this follows: the paper's full text could not be read here (the stored arXiv HTML pages reach only the
    abstract and the first figure). The authors' own code (github.com/hanyang-21/CFG-Ctrl,
    ``pipeline/common_cfg_ctrl.py`` ``CFGCtrlMixin._cfg_ctrl_apply``, on the flow velocity) confirms the surface,
    e_{t−1} = the corrected error, e_{−1} = e_0, and takes sign(s) ELEMENTWISE (``torch.sign``: ±1 per element,
    0 where s is 0); its README recommends λ = 5, k = 0.2 for Flux, Qwen-Image, SD3/3.5 and Wan (the dataclass
    defaults 0.05 / 0.3 are not what it recommends). ``switching``:

    - ``"sign"`` (default): the elementwise sign, as the authors' code.
    - ``"unit"``: s / ||s||₂ per sample, the form of the maintained ComfyUI reference
      (pamparamm/sd-perturbed-attention ``smc_nodes.py``, which says the paper's Table 4 reports it as equal to
      sign(s); that table could not be read here). The correction then has norm k per sample, so useful k are
      far smaller in effect than with the sign; a zero s gives no correction.
    """
    if switching not in SWITCHING_FORMS:
        raise ValueError(f"smc_cfg: switching must be one of {SWITCHING_FORMS}, got {switching!r}")
    wide = accumulation_dtype(cond)
    uncond_wide = uncond.to(wide)
    error = cond.to(wide) - uncond_wide
    previous = error if state.previous_error is None else state.previous_error.to(device=cond.device, dtype=wide)
    if previous.shape != error.shape:
        raise ValueError(f"SlidingModeState holds shape {tuple(previous.shape)} but got {tuple(error.shape)}; "
                         "use a fresh state for each run")
    surface = (error - previous) + sliding_lambda * previous
    if switching == "sign":
        direction = torch.sign(surface)
    else:
        surface_unit, _ = unit_and_peak(surface)  # s / ||s|| = unit / ||unit||, with no overflow for tiny s
        unit_norm = surface_unit.reshape(surface.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (surface.ndim - 1)))
        direction = surface_unit / torch.where(unit_norm > 0, unit_norm, torch.ones_like(unit_norm))
    corrected = error - k * direction
    state.previous_error = corrected
    return (uncond_wide + scale * corrected).to(cond.dtype)
