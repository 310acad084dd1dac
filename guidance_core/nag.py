"""Normalized Attention Guidance (NAG): the extrapolation of one attention layer's output away from the output
it has for a negative context, with its norm capped and blended back.

Chen, Bandyopadhyay, Zou, Song, *Normalized Attention Guidance: Universal Negative Guidance for Diffusion
Models*, arXiv:2505.21179 (2025), §3 and Algorithm 1. In an attention layer where the text enters, with the same
image queries Q, ``Z⁺ = Attn(Q, K⁺, V⁺)`` for the positive context and ``Z⁻ = Attn(Q, K⁻, V⁻)`` for the negative:

    Z̃ = Z⁺ + φ·(Z⁺ − Z⁻)                       (extrapolation)
    r = ‖Z̃‖₁ / ‖Z⁺‖₁                            (per token, over the feature dimension)
    Ẑ = Z̃ · min(r, τ) / r                       (normalization: the ratio capped at τ)
    Z = α·Ẑ + (1 − α)·Z⁺                        (refinement: blend back)

What was checked, in the authors' code (read, not copied):
- ChenDarYen/ComfyUI-NAG @ef8a641 ``utils.py:nag``: the same four lines with ``nag_scale = φ + 1``
  (``z_guidance = s·Z⁺ − (s − 1)·Z⁻``; the maintainer, ComfyUI-NAG#10: "scale 2 in the paper is equal to
  nag_scale 3"); ``torch.norm(p=1, dim=-1)``, so the L1 norm per sample and token over the last dimension of
  the ``(B, tokens, heads·head_dim)`` attention output, all heads together, before the output projection
  (``sd/attention.py``: before ``to_out``; ``wan/model.py``: before ``self.o``); both norms clamped at 1e-6.
- The first upload ``src/attention_flux_nag.py`` of ChenDarYen/Normalized-Attention-Guidance used the L2 norm;
  the paper and the later code use L1 (the maintainer, Normalized-Attention-Guidance#5: L2 is "visually similar
  ... slightly worse metrics"). Here: L1.

The norms are taken in float32 (or wider) whatever the attention dtype (the authors' code stays in the model
dtype; an L1 sum over thousands of bf16 features loses digits); the result has the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NORM_EPS", "nag_combine"]

NORM_EPS = 1e-6  # both L1 norms are clamped here, as ComfyUI-NAG utils.py:nag does (an all-zero token stays finite)


def nag_combine(z_pos: Tensor, z_neg: Tensor, scale: float, tau: float, alpha: float) -> Tensor:
    """NAG's guided attention output (arXiv:2505.21179, §3): ``α·Ẑ + (1 − α)·Z⁺`` with
    ``Ẑ = Z̃·min(r, τ)/r``, ``Z̃ = Z⁺ + φ(Z⁺ − Z⁻)``, ``r = ‖Z̃‖₁/‖Z⁺‖₁`` per token.

    ``z_pos``, ``z_neg``: attention outputs ``(..., tokens, features)`` with all heads in the last dimension
    (the norm is over it). ``scale`` is the paper's φ (ComfyUI-NAG's ``nag_scale`` is φ + 1); ``tau`` ≥ 1 caps
    the norm ratio; ``alpha`` in [0, 1]. φ = 0 or α = 0 return ``z_pos`` exactly.
    """
    if scale == 0 or alpha == 0:
        return z_pos
    wide = torch.promote_types(z_pos.dtype, torch.float32)
    pos, neg = z_pos.to(wide), z_neg.to(wide)
    extrapolated = pos + scale * (pos - neg)
    ratio = (extrapolated.abs().sum(dim=-1, keepdim=True).clamp_min(NORM_EPS)
             / pos.abs().sum(dim=-1, keepdim=True).clamp_min(NORM_EPS))
    capped = extrapolated * (ratio.clamp(max=tau) / ratio)
    return (alpha * capped + (1 - alpha) * pos).to(z_pos.dtype)
