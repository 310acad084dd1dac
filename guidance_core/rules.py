"""Guidance rules: one pure tensor function per formula.

Every function takes predictions shaped ``(B, ...)`` (image latents ``(B, C, H, W)``, video latents
``(B, C, T, H, W)``) and returns a tensor of the same shape and dtype. Reductions (norms, dot products,
standard deviations) run per sample over every non-batch dim, unless a function says otherwise, so the
samples of a batch never influence each other.

Notation follows the diffusers/Imagen convention: ``cond`` = c, ``uncond`` = u, ``scale`` = w, and
w = 1 means "no guidance". Methods that are not affine in the predictions (rescale, CFG-Zero*, APG, the
norms) give different results in different prediction spaces; each docstring names the space its
paper uses, and the caller decides which space it passes.

Numerics: reductions and the rescaled results run in the accumulation dtype of
``numerics.accumulation_dtype`` (float64, or float32 on a device without float64 such as MPS), divisions are
guarded so that finite inputs, all-zero tensors and ``cond == uncond`` never produce NaN or inf, and results
are cast back to the input dtype. Every norm and std ratio is taken between inputs divided by their largest
magnitude (``numerics.unit_and_peak``) and the magnitudes are multiplied in last: a norm of tiny (subnormal)
values would otherwise overflow the ratio to inf even though the rescaled result itself is small (in float32
always, in float64 near its own subnormals). CFG-Zero*'s scale runs in float32 (as diffusers; its eps bounds
it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .numerics import accumulation_dtype, unit_and_peak

__all__ = [
    "MomentumBuffer",
    "apg",
    "base_norm",
    "cfg",
    "cfg_zero_star",
    "cfg_zero_star_alpha",
    "full_norm",
    "rescale",
    "t_norm",
    "whole_tensor_rescale",
]

CFG_ZERO_STAR_OPTIMIZE_CHOICES = ("uncond", "cond")

# F.normalize's default eps: the smallest norm APG divides by.
_NORMALIZE_EPS = 1e-12


# --- per-sample reductions ----------------------------------------------------------------------------

def _per_sample_flat(x: Tensor) -> Tensor:
    """View ``x`` as ``(B, N)``: one row per sample, every non-batch element in the row."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def _broadcast_per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Shape a ``(B, 1)`` column of per-sample values as ``(B, 1, 1, ...)`` to broadcast against ``like``."""
    return values.reshape(like.shape[0], *([1] * (like.ndim - 1)))


def _unit_norm(unit: Tensor, per_sample: bool = True) -> Tensor:
    """L2 norm of a peak-1 tensor from ``unit_and_peak``: per sample as ``(B, 1, ...)``, or of the whole tensor
    (batch included). It lies in [1, √N] (0 for a zero tensor), so ratios of such norms stay finite."""
    if not per_sample:
        return torch.linalg.vector_norm(unit)
    return _broadcast_per_sample(torch.linalg.vector_norm(_per_sample_flat(unit), dim=1, keepdim=True), unit)


def _safe_ratio(numerator: Tensor, denominator: Tensor, when_zero: float) -> Tensor:
    """``numerator / denominator``, and ``when_zero`` where the denominator is 0 (or not a number)."""
    is_positive = denominator > 0
    safe_denominator = torch.where(is_positive, denominator, torch.ones_like(denominator))
    return torch.where(is_positive, numerator / safe_denominator, torch.full_like(numerator, when_zero))


# --- CFG and rescale ----------------------------------------------------------------------------------

def cfg(cond: Tensor, uncond: Tensor, scale: float, original_formulation: bool = False) -> Tensor:
    """Classifier-free guidance, in any prediction space (it is affine in the predictions).

    Default: the Imagen form ``u + w(c - u)`` (Saharia et al. 2022, arXiv:2205.11487), where w = 1 gives c.
    ``original_formulation``: Ho & Salimans' ``c + w(c - u)`` (arXiv:2207.12598), where w = 0
    gives c; it equals the Imagen form at w + 1.
    """
    guidance_direction = cond - uncond
    base = cond if original_formulation else uncond
    return base + scale * guidance_direction


def rescale(guided: Tensor, cond: Tensor, multiplier: float) -> Tensor:
    """Rescaled CFG: pull the guided prediction's spread back to the conditional one's.

    Lin et al., *Common Diffusion Noise Schedules and Sample Steps are Flawed*, arXiv:2305.08891, §3.4,
    Alg. 2: ``phi * guided * (std_c / std_g) + (1 - phi) * guided`` with ``phi = multiplier``. The paper
    works on v-predictions; diffusers applies it to whatever the model outputs (ε for SD1.5/SDXL).

    Standard deviations are per sample, in the accumulation dtype. Where ``std_g`` is 0 the ratio is taken as
    1, so a constant ``guided`` comes back unchanged instead of as NaN.
    """
    return _std_rescale(guided, cond, multiplier, per_sample=True)


def whole_tensor_rescale(guided: Tensor, cond: Tensor, multiplier: float) -> Tensor:
    """STG's rescale (Hyung et al., arXiv:2411.18664; as ComfyUI's SkipLayerGuidanceDiT applies it):
    ``guided * (phi * std(c) / std(g) + 1 - phi)`` with one std over the whole tensor, batch included.

    Unlike :func:`rescale` this mixes the samples of a batch, as the reference does. Unbiased std, as
    ``torch.std``; a zero ``std(g)`` leaves ``guided`` unchanged.
    """
    return _std_rescale(guided, cond, multiplier, per_sample=False)


def _std_rescale(guided: Tensor, cond: Tensor, multiplier: float, per_sample: bool) -> Tensor:
    """``phi * g * std(c) / std(g) + (1 - phi) * g``, with ``g * std(c) / std(g)`` computed as
    ``g_unit * (std(c_unit) / std(g_unit)) * peak_c`` (``numerics.unit_and_peak``): the same value, with a ratio
    that stays finite for subnormal g."""
    wide = accumulation_dtype(guided)
    guided_wide = guided.to(wide)
    guided_unit, _ = unit_and_peak(guided_wide, per_sample)
    cond_unit, cond_peak = unit_and_peak(cond.to(wide), per_sample)
    if per_sample:
        cond_std, guided_std = _per_sample_std(cond_unit), _per_sample_std(guided_unit)
    else:
        cond_std, guided_std = cond_unit.std(), guided_unit.std()
    std_ratio = _safe_ratio(cond_std, guided_std, when_zero=0.0)
    std_matched = torch.where(guided_std > 0, guided_unit * std_ratio * cond_peak, guided_wide)
    return (multiplier * std_matched + (1.0 - multiplier) * guided_wide).to(guided.dtype)


def _per_sample_std(x: Tensor) -> Tensor:
    """Per-sample standard deviation, shaped ``(B, 1, ...)``, in ``x``'s dtype.

    diffusers uses torch's unbiased std; rescale only ever uses the ratio of two stds of equally sized
    tensors, where the Bessel correction cancels. The population std (correction=0) gives that same
    ratio and stays defined for one-element samples.
    """
    flat = _per_sample_flat(x)
    return _broadcast_per_sample(flat.std(dim=1, correction=0, keepdim=True), x)


# --- CFG-Zero* ----------------------------------------------------------------------------------------

def cfg_zero_star_alpha(cond: Tensor, uncond: Tensor, eps: float = 1e-8) -> Tensor:
    """CFG-Zero*'s optimised scale ``s* = <c, u> / (||u||^2 + eps)``, per sample.

    Fan et al., arXiv:2503.18886: the s that minimises ``||c - s*u||``, i.e. the projection coefficient of
    c onto u. Computed in float32 (as diffusers 0.42.1 ``cfg_zero_star_scale``) and returned in the input
    dtype, shaped ``(B, 1, 1, ...)`` to broadcast against the predictions.
    """
    return _cfg_zero_star_alpha_f32(cond, uncond, eps).to(cond.dtype)


def _cfg_zero_star_alpha_f32(cond: Tensor, uncond: Tensor, eps: float = 1e-8) -> Tensor:
    """``cfg_zero_star_alpha`` before the cast back to the input dtype."""
    cond_flat = _per_sample_flat(cond.float())
    uncond_flat = _per_sample_flat(uncond.float())
    dot_product = (cond_flat * uncond_flat).sum(dim=1, keepdim=True)
    uncond_squared_norm = (uncond_flat * uncond_flat).sum(dim=1, keepdim=True)
    return _broadcast_per_sample(dot_product / (uncond_squared_norm + eps), cond)


def cfg_zero_star(
    cond: Tensor,
    uncond: Tensor,
    scale: float,
    optimize: str = "uncond",
    original_formulation: bool = False,
) -> Tensor:
    """CFG-Zero*'s optimised-scale guidance (Fan et al., arXiv:2503.18886), on noise-space predictions.

    The paper works on flow-matching velocities. α does not change when both branches are scaled by the
    same per-sample factor (so ComfyUI's ``x - x0 = σ·v`` gives the velocity's α), but it does change
    under the affine maps between ε, v and x0: the caller chooses the space.

    ``optimize="uncond"`` (the paper): ``u' = α·u`` with ``α = <c, u> / ||u||^2``, then CFG with u' in
    place of u: ``u' + w(c - u')``, or ``c + w(c - u')`` under ``original_formulation``. α scales u
    *before* the guidance direction is formed, as in the official code and diffusers (PR #11205).

    ``optimize="cond"`` is this pack's variant, with the roles swapped: ``c' = α_c·c`` with
    ``α_c = <u, c> / ||c||^2``, then ``u + w(c' - u)``, or ``c' + w(c' - u)`` under
    ``original_formulation``: the optimised branch replaces its raw counterpart everywhere.

    The zero-init of the first steps is a property of the step, not of the formula; the plan applies it.
    """
    # α can exceed float16's range when the optimised branch is tiny, while α times that branch (a
    # projection, no longer than the other branch) cannot: scale in float32, then cast.
    if optimize == "uncond":
        uncond = (_cfg_zero_star_alpha_f32(cond, uncond) * uncond.float()).to(uncond.dtype)
    elif optimize == "cond":
        cond = (_cfg_zero_star_alpha_f32(uncond, cond) * cond.float()).to(cond.dtype)
    else:
        raise ValueError(f"optimize must be one of {CFG_ZERO_STAR_OPTIMIZE_CHOICES}, got {optimize!r}")
    return cfg(cond, uncond, scale, original_formulation)


# --- APG ----------------------------------------------------------------------------------------------

class MomentumBuffer:
    """APG's running average of the guidance direction: ``running = delta + momentum * running``.

    Sadat, Hilliges, Weber, arXiv:2410.02416 (a negative, "reverse" momentum pushes against the previous
    steps' direction). The average starts at 0, so the first update returns ``delta``.
    It is per-run state: use a fresh buffer (or ``reset()``) for every sampling run.
    """

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.running_average: Tensor | None = None

    def update(self, delta: Tensor) -> Tensor:
        """Fold this step's ``delta`` into the average and return the new average, in ``delta``'s dtype."""
        # Accumulate in at least float32 so half-precision steps do not compound their rounding.
        accumulation_dtype = torch.promote_types(delta.dtype, torch.float32)
        delta_wide = delta.to(accumulation_dtype)
        if self.running_average is None:
            self.running_average = delta_wide
        elif self.running_average.shape != delta.shape:
            raise ValueError(
                f"MomentumBuffer holds an average of shape {tuple(self.running_average.shape)} but got "
                f"delta of shape {tuple(delta.shape)}; use a fresh buffer (or reset()) for each run"
            )
        else:
            previous = self.running_average.to(device=delta.device, dtype=accumulation_dtype)
            self.running_average = delta_wide + self.momentum * previous
        return self.running_average.to(delta.dtype)

    def reset(self) -> None:
        """Forget the average, as at the start of a new run."""
        self.running_average = None


def apg(
    cond: Tensor,
    uncond: Tensor,
    scale: float,
    eta: float = 1.0,
    norm_threshold: float = 0.0,
    momentum_buffer: MomentumBuffer | None = None,
) -> Tensor:
    """Adaptive Projected Guidance (Sadat, Hilliges, Weber, ICLR 2025, arXiv:2410.02416), paper semantics.

    With ``delta = c - u``:
      1. momentum: ``delta`` is replaced by the buffer's running average (if a buffer is given);
      2. rescaling: if ``norm_threshold = r > 0``, ``delta *= min(1, r / ||delta||)``;
      3. projection onto c: ``delta_par = <delta, ĉ> ĉ`` with ``ĉ = c / ||c||``,
         ``delta_orth = delta - delta_par``;
      4. ``c + (w - 1) * (delta_orth + eta * delta_par)``.
    With eta = 1, r = 0 and no momentum this is exactly ``cfg(c, u, w)``.

    Not affine, so the prediction space matters: ComfyUI's node applies it to denoised (x0)
    predictions, diffusers to the raw model output. Norms and the projection run in the accumulation dtype over
    all non-batch dims (the authors' snippet reduces the last three dims, which differs on 5-D video), each on
    its input divided by its peak magnitude so that no norm ratio overflows.
    """
    wide = accumulation_dtype(cond)
    cond_wide = cond.to(wide)
    delta = cond_wide - uncond.to(wide)
    if momentum_buffer is not None:
        delta = momentum_buffer.update(delta)

    if norm_threshold > 0:
        # delta * min(1, r / ||delta||): above the threshold delta becomes r * delta / ||delta||, written with
        # the peak-1 delta (delta / ||delta|| = unit / ||unit||). ||delta|| > r is tested as ||unit|| > r / peak:
        # the one side that can overflow (to inf, for a tiny peak) then still compares correctly.
        delta_unit, delta_peak = unit_and_peak(delta)
        unit_norm = _unit_norm(delta_unit)
        too_long = unit_norm > norm_threshold / delta_peak
        shortened = delta_unit * _safe_ratio(torch.full_like(unit_norm, norm_threshold), unit_norm, when_zero=0.0)
        delta = torch.where(too_long, shortened, delta)

    cond_direction = _normalized(cond_wide)
    # <delta, ĉ> ĉ with delta's peak multiplied in last, so tiny deltas keep their digits in float32.
    delta_unit, delta_peak = unit_and_peak(delta)
    parallel_coefficient = _broadcast_per_sample(
        (_per_sample_flat(delta_unit) * _per_sample_flat(cond_direction)).sum(dim=1, keepdim=True), delta
    )
    delta_parallel = parallel_coefficient * cond_direction * delta_peak
    delta_orthogonal = delta - delta_parallel

    update = delta_orthogonal + eta * delta_parallel
    return (cond_wide + (scale - 1.0) * update).to(cond.dtype)


def _normalized(x: Tensor) -> Tensor:
    """``F.normalize`` per sample: ``x / max(||x||, eps)`` with eps = 1e-12 (diffusers' APG). With
    ``x = unit * peak`` that is ``unit / ||unit||`` where ||x|| >= eps and ``unit * (peak / eps)`` below it,
    neither of which overflows."""
    unit, peak = unit_and_peak(x)
    unit_norm = _unit_norm(unit)
    # ||unit|| >= 1 for a nonzero x (its peak element is exactly ±1); the clamp only keeps the branch
    # torch.where does not select for a zero x free of 0/0.
    return torch.where(peak * unit_norm >= _NORMALIZE_EPS, unit / unit_norm.clamp_min(1.0),
                       unit * (peak / _NORMALIZE_EPS))


# --- cf_guidance norms --------------------------------------------------------------------------------

def base_norm(guided: Tensor, uncond: Tensor, per_sample: bool = True) -> Tensor:
    """BaseNorm: give the guided prediction the unconditional one's norm, ``guided * ||u|| / ||guided||``.

    From enzokro's cf_guidance (``BaseNormGuidance.post_proc``;
    https://enzokro.dev/blog/posts/2022-11-15-guidance-expts-1), on ε-predictions.
    ``per_sample=True`` takes norms per sample; ``per_sample=False`` takes one norm of the whole
    tensor, batch included, exactly as cf_guidance does. A zero ``guided`` stays zero.
    """
    wide = accumulation_dtype(guided)
    guided_wide = guided.to(wide)
    guided_unit, _ = unit_and_peak(guided_wide, per_sample)
    uncond_unit, uncond_peak = unit_and_peak(uncond.to(wide), per_sample)
    guided_norm = _unit_norm(guided_unit, per_sample)
    # g * ||u|| / ||g|| = g_unit * (||u_unit|| / ||g_unit||) * peak_u: a ratio that cannot overflow.
    norm_ratio = _safe_ratio(_unit_norm(uncond_unit, per_sample), guided_norm, when_zero=0.0)
    normed = torch.where(guided_norm > 0, guided_unit * norm_ratio * uncond_peak, guided_wide)
    return normed.to(guided.dtype)


def t_norm(cond: Tensor, uncond: Tensor, scale: float, per_sample: bool = True) -> Tensor:
    """T-Norm: a guidance direction rescaled to the unconditional norm, ``u + g (c - u) ||u|| / ||c - u||``.

    From enzokro's cf_guidance (``TNormGuidance.guide``), on ε-predictions. Because ``(c - u)`` is
    normalised, g is much smaller than a CFG scale (the cf_guidance README uses 0.25 -> 0.05).
    ``per_sample`` as in ``base_norm``. Where ``c == u`` there is no direction and the result is u.
    """
    wide = accumulation_dtype(uncond)
    uncond_wide = uncond.to(wide)
    direction_unit, _ = unit_and_peak(cond.to(wide) - uncond_wide, per_sample)
    uncond_unit, uncond_peak = unit_and_peak(uncond_wide, per_sample)
    # (c - u) * ||u|| / ||c - u|| = d_unit * (||u_unit|| / ||d_unit||) * peak_u
    norm_ratio = _safe_ratio(_unit_norm(uncond_unit, per_sample), _unit_norm(direction_unit, per_sample),
                             when_zero=0.0)
    return (uncond_wide + scale * (direction_unit * norm_ratio * uncond_peak)).to(uncond.dtype)


def full_norm(cond: Tensor, uncond: Tensor, scale: float, per_sample: bool = True) -> Tensor:
    """FullNorm: T-Norm, then BaseNorm (cf_guidance ``FullNormGuidance``), on ε-predictions."""
    return base_norm(t_norm(cond, uncond, scale, per_sample), uncond, per_sample)
