"""CFG rules of 2023-2025 that redefine how cond and uncond combine: TCFG's tangential damping of the
uncond, MAMBO-G's magnitude-aware scale, Mahiro's positive-biased leap, and APG-Mix (CFG, then APG).

Same conventions as ``rules``: predictions ``(B, ...)``, c = cond, u = uncond, w = scale (w = 1: no
guidance), reductions per sample over every non-batch dim in the accumulation dtype, results in the input
dtype, finite for zero and for identical inputs. Each docstring names the prediction space its reference
uses; the caller passes that space.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .numerics import accumulation_dtype, unit_and_peak
from .rules import MomentumBuffer, _broadcast_per_sample, _normalized, _per_sample_flat, _safe_ratio, _unit_norm

__all__ = ["apg_mix", "mahiro", "magnitude_aware_cfg", "tangential_damping"]


def _per_sample_dot(a: Tensor, b: Tensor) -> Tensor:
    """<a, b> per sample, shaped ``(B, 1, ...)``."""
    return _broadcast_per_sample((_per_sample_flat(a) * _per_sample_flat(b)).sum(dim=1, keepdim=True), a)


# --- TCFG ---------------------------------------------------------------------------------------------

def tangential_damping(cond: Tensor, uncond: Tensor) -> Tensor:
    """TCFG's damped uncond (Kwon et al., CVPR 2025, arXiv:2503.18137): the uncond projected on
    v₁, the top right singular vector of the 2×N score matrix [u; c], per sample: ``(u·v₁) v₁``.

    The paper works on scores (noise predictions); ComfyUI's TCFG node passes ``x − x0``. The projection
    commutes with a per-sample scale of both inputs, so σ·ε gives the same v₁ as ε.

    Instead of an SVD of the 2×N matrix (the references' float32 ``torch.linalg.svd``), the 2×2 Gram matrix
    G = [[u·u, u·c], [c·u, c·c]] gives it exactly: v₁ = (e₀u + e₁c) / ‖·‖ for G's top unit eigenvector e,
    and since G e = λ₁ e, ``(u·v₁) v₁ = e₀ (e₀ u + e₁ c)``. Only three dot products, in the accumulation
    dtype, on any backend. Where v₁ is not unique (u ⟂ c with equal norms, or both zero) u is returned.
    """
    wide = accumulation_dtype(uncond)
    uncond_wide, cond_wide = uncond.to(wide), cond.to(wide)
    # One peak for both, so their relative sizes (which decide v₁) are kept while nothing overflows.
    _, peak = unit_and_peak(torch.cat([uncond_wide, cond_wide], dim=1))
    u_unit, c_unit = uncond_wide / peak, cond_wide / peak
    uu, uc, cc = _per_sample_dot(u_unit, u_unit), _per_sample_dot(u_unit, c_unit), _per_sample_dot(c_unit, c_unit)
    half_gap = (uu - cc) / 2
    root = torch.sqrt(half_gap * half_gap + uc * uc)
    # The top eigenvector of G, in the one of its two equivalent forms whose large entry has no cancellation.
    e_u = torch.where(half_gap >= 0, half_gap + root, uc)
    e_c = torch.where(half_gap >= 0, uc, root - half_gap)
    length = torch.sqrt(e_u * e_u + e_c * e_c)
    unique = length > 0
    safe_length = torch.where(unique, length, torch.ones_like(length))
    e_u = torch.where(unique, e_u / safe_length, torch.ones_like(e_u))
    e_c = torch.where(unique, e_c / safe_length, torch.zeros_like(e_c))
    return (e_u * (e_u * uncond_wide + e_c * cond_wide)).to(uncond.dtype)


# --- MAMBO-G ------------------------------------------------------------------------------------------

def magnitude_aware_cfg(cond: Tensor, uncond: Tensor, scale: float, alpha: float = 8.0) -> Tensor:
    """MAMBO-G (arXiv:2508.03442): CFG at a per-sample scale damped by the update's relative size,
    ``w' = 1 + (w − 1)·exp(−α·‖c − u‖/‖u‖)``, then ``u + w'(c − u)`` (diffusers' MagnitudeAwareGuidance).

    The ratio is scale-free, so ε, σ·ε and v (ComfyUI's ``x − x0`` on EPS and flow models) agree; the paper
    and diffusers use the model output. A zero uncond (ratio ∞) gives w' = 1, the cond; c = u gives u.
    """
    wide = accumulation_dtype(cond)
    cond_wide, uncond_wide = cond.to(wide), uncond.to(wide)
    direction = cond_wide - uncond_wide
    direction_unit, direction_peak = unit_and_peak(direction)
    uncond_unit, uncond_peak = unit_and_peak(uncond_wide)
    # ‖c − u‖/‖u‖ = (‖d_unit‖/‖u_unit‖)·(peak_d/peak_u): each factor finite; a zero uncond gives ∞ (w' = 1).
    direction_norm = _unit_norm(direction_unit) * direction_peak
    uncond_norm = _unit_norm(uncond_unit) * uncond_peak
    ratio = _safe_ratio(direction_norm, uncond_norm, when_zero=float("inf"))
    ratio = torch.where(direction_norm > 0, ratio, torch.zeros_like(ratio))
    damped_scale = 1.0 + (scale - 1.0) * torch.exp(-alpha * ratio)
    return (uncond_wide + damped_scale * direction).to(cond.dtype)


# --- Mahiro -------------------------------------------------------------------------------------------

def _signed_sqrt(x: Tensor) -> Tensor:
    return torch.sqrt(x.abs()) * x.sign()


def mahiro(cond: Tensor, uncond: Tensor, scale: float, eps: float = 1e-8) -> Tensor:
    """Mahiro / positive-biased guidance (ComfyUI core ``Mahiro``, comfy_extras/nodes_mahiro.py), on x0.

    With g = u + w(c − u) (CFG) and the "leap" w·c: m = (w·c + g)/2; s = the mean over pixels of the cosine
    similarity, across channels, of the signed square roots of w·u and m; k = 2(s + 1) ∈ [0, 4]; the result is
    ``(k·g + (4 − k)·w·c) / 4``: plain CFG where the uncond's leap agrees with the merge, the cond's leap where
    it opposes it. At w = 1 it is c.

    The mean is per sample here; ComfyUI's node averages over the whole batch (so a batch of 1 matches it).
    """
    wide = accumulation_dtype(cond)
    cond_wide, uncond_wide = cond.to(wide), uncond.to(wide)
    guided = uncond_wide + scale * (cond_wide - uncond_wide)
    leap = scale * cond_wide
    merged = _signed_sqrt((leap + guided) / 2)
    uncond_leap = _signed_sqrt(scale * uncond_wide)
    # cosine similarity over the channel dim (dim 1) at each pixel, as torch's F.cosine_similarity (eps 1e-8)
    dot = (uncond_leap * merged).sum(dim=1, keepdim=True)
    norms = torch.linalg.vector_norm(uncond_leap, dim=1, keepdim=True) * torch.linalg.vector_norm(
        merged, dim=1, keepdim=True)
    similarity = dot / norms.clamp_min(eps)
    mean_similarity = _broadcast_per_sample(_per_sample_flat(similarity).mean(dim=1, keepdim=True), cond)
    weight = 2 * (mean_similarity + 1)
    return ((weight * guided + (4 - weight) * leap) / 4).to(cond.dtype)


# --- APG-Mix ------------------------------------------------------------------------------------------

def apg_mix(
    cond: Tensor,
    uncond: Tensor,
    scale: float,
    use_apg: bool,
    apg_scale: float = 10.0,
    eta: float = 0.0,
    norm_threshold: float = 10.0,
    momentum_buffer: MomentumBuffer | None = None,
) -> Tensor:
    """APG-Mix (diffusers' AdaptiveProjectedMixGuidance, made for HunyuanImage 2.1): plain CFG
    ``u + w(c − u)`` on the early steps, then Adaptive Projected Guidance (Sadat et al., arXiv:2410.02416) in
    the Imagen form at its own scale s: ``u + s·(Δ⊥ + η·Δ∥)``, with Δ the momentum average of c − u, shortened
    to ``norm_threshold`` (r > 0) and split along ĉ.

    The momentum average runs over every step, the CFG ones included (``use_apg`` False), as in diffusers.
    Not scale-free (r, and the average over steps of different σ): diffusers applies it to the model output
    (ε, or the velocity of a flow model); the caller passes that.
    """
    wide = accumulation_dtype(cond)
    cond_wide, uncond_wide = cond.to(wide), uncond.to(wide)
    delta = cond_wide - uncond_wide
    if momentum_buffer is not None:
        delta = momentum_buffer.update(delta).to(wide)
    if not use_apg:
        return (uncond_wide + scale * (cond_wide - uncond_wide)).to(cond.dtype)
    if norm_threshold > 0:
        delta_unit, delta_peak = unit_and_peak(delta)
        unit_norm = _unit_norm(delta_unit)
        too_long = unit_norm > norm_threshold / delta_peak
        shortened = delta_unit * _safe_ratio(torch.full_like(unit_norm, norm_threshold), unit_norm, when_zero=0.0)
        delta = torch.where(too_long, shortened, delta)
    cond_direction = _normalized(cond_wide)
    delta_parallel = _per_sample_dot(delta, cond_direction) * cond_direction
    update = (delta - delta_parallel) + eta * delta_parallel
    return (uncond_wide + apg_scale * update).to(cond.dtype)
