"""Corrections of the guided prediction (post transforms): norm caps and renorms (ComfyUI's CFGNorm in
its two modes, Lumina 2's RenormCFG) and dynamic thresholding (Imagen's, and the mimic-scale variant of
sd-dynamic-thresholding).

Each takes the guided prediction (and the branch predictions it reads), returns the same shape and dtype,
and computes in the accumulation dtype; ``strength`` blends (or, where its reference does, scales) the result.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .numerics import accumulation_dtype
from .rules import _broadcast_per_sample, _per_sample_flat

__all__ = ["channel_norm_cap", "channel_renorm", "dynamic_threshold", "mimic_threshold", "norm_cap"]


def _channel_norm(x: Tensor) -> Tensor:
    """The L2 norm across channels (dim 1) at each pixel (and frame), shaped ``(B, 1, ...)``."""
    return torch.linalg.vector_norm(x, dim=1, keepdim=True)


def channel_norm_cap(guided: Tensor, cond: Tensor, strength: float = 1.0) -> Tensor:
    """ComfyUI core CFGNorm (comfy_extras/nodes_cfg.py, the post-CFG mode), on x0: at each pixel the guided
    prediction's channel vector is shortened to at most the cond's length, ``g·min(1, ‖c‖/(‖g‖ + 1e-8))``,
    and the whole result is multiplied by ``strength`` (as the reference; 1 = the cap alone)."""
    wide = accumulation_dtype(guided)
    guided_wide = guided.to(wide)
    ratio = (_channel_norm(cond.to(wide)) / (_channel_norm(guided_wide) + 1e-8)).clamp(0.0, 1.0)
    return (guided_wide * ratio * strength).to(guided.dtype)


def channel_renorm(guided: Tensor, cond: Tensor, strength: float = 1.0) -> Tensor:
    """ComfyUI core CFGNorm's ``pre_cfg`` mode (added after ComfyUI 0.8.0), on noise predictions: at each
    pixel the guided channel vector gets the cond's length, ``g·‖c‖/‖g‖`` (up or down; unchanged where g is
    0), blended ``strength·renormed + (1 − strength)·g``."""
    wide = accumulation_dtype(guided)
    guided_wide = guided.to(wide)
    guided_norm = _channel_norm(guided_wide)
    positive = guided_norm > 0
    ratio = torch.where(positive, _channel_norm(cond.to(wide)) / guided_norm.clamp_min(1e-12),
                        torch.ones_like(guided_norm))
    return (strength * guided_wide * ratio + (1.0 - strength) * guided_wide).to(guided.dtype)


def norm_cap(guided: Tensor, cond: Tensor, max_ratio: float = 1.0) -> Tensor:
    """Lumina 2's RenormCFG (ComfyUI comfy_extras/nodes_lumina2.py; Lumina-Image 2.0's renorm_cfg), on x0:
    per sample, the guided prediction is shortened to ``max_ratio·‖c‖`` where it is longer; 0 = off."""
    if max_ratio <= 0:
        return guided
    wide = accumulation_dtype(guided)
    guided_wide = guided.to(wide)
    flat = _per_sample_flat(guided_wide)
    guided_norm = _broadcast_per_sample(torch.linalg.vector_norm(flat, dim=1, keepdim=True), guided)
    cap = max_ratio * _broadcast_per_sample(
        torch.linalg.vector_norm(_per_sample_flat(cond.to(wide)), dim=1, keepdim=True), guided)
    too_long = (guided_norm >= cap) & (guided_norm > 0)
    shortened = guided_wide * (cap / guided_norm.clamp_min(torch.finfo(wide).tiny))
    return torch.where(too_long, shortened, guided_wide).to(guided.dtype)


def _quantile(flat: Tensor, q: float) -> Tensor:
    """``torch.quantile(flat, q, dim=1, keepdim=True)`` (linear interpolation), through a sort: quantile
    refuses rows of more than 2^24 elements, which a video latent can have."""
    ordered, _ = torch.sort(flat, dim=1)
    position = q * (flat.shape[1] - 1)
    below = math.floor(position)
    above = min(below + 1, flat.shape[1] - 1)
    fraction = position - below
    return ordered[:, below:below + 1] * (1 - fraction) + ordered[:, above:above + 1] * fraction


def dynamic_threshold(guided: Tensor, percentile: float = 0.995, max_value: float = 1.0,
                      strength: float = 1.0) -> Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, arXiv:2205.11487, §2.3; diffusers'
    ``_threshold_sample``), on x0: per sample s = the ``percentile`` of |x0|, clamped to [1, max_value];
    x0 is clipped to [−s, s] and divided by s. Blended ``strength·thresholded + (1 − strength)·x0``."""
    wide = accumulation_dtype(guided)
    guided_wide = guided.to(wide)
    s = _quantile(_per_sample_flat(guided_wide).abs(), percentile).clamp(1.0, max_value)
    s = _broadcast_per_sample(s, guided)
    thresholded = torch.maximum(torch.minimum(guided_wide, s), -s) / s
    return (strength * thresholded + (1.0 - strength) * guided_wide).to(guided.dtype)


def mimic_threshold(guided: Tensor, cond: Tensor, uncond: Tensor, mimic_scale: float = 7.0,
                    percentile: float = 1.0, strength: float = 1.0) -> Tensor:
    """sd-dynamic-thresholding's mimic-scale thresholding (mcmonkey4eva; its defaults: separate feature
    channels, MEAN start point, AD variability), on x0: per sample and channel, the guided prediction is
    centred on its mean, clipped to ±max(m, q) and rescaled by m/max(m, q), m being the largest |value| of
    the centred "mimic" CFG ``u + mimic_scale·(c − u)`` and q the ``percentile`` of the centred guided |value|;
    then the mean is put back. Blended by ``strength`` (its interpolate_phi)."""
    wide = accumulation_dtype(guided)
    guided_wide = guided.to(wide)
    cond_wide, uncond_wide = cond.to(wide), uncond.to(wide)
    mimic = (uncond_wide + mimic_scale * (cond_wide - uncond_wide)).flatten(2)
    target = guided_wide.flatten(2)  # (B, C, pixels)
    mimic_centred = mimic - mimic.mean(dim=2, keepdim=True)
    target_mean = target.mean(dim=2, keepdim=True)
    target_centred = target - target_mean
    mimic_reach = mimic_centred.abs().amax(dim=2, keepdim=True)
    channels = target_centred.shape[0] * target_centred.shape[1]
    target_reach = _quantile(target_centred.abs().reshape(channels, -1), percentile).reshape(mimic_reach.shape)
    reach = torch.maximum(mimic_reach, target_reach)
    safe_reach = torch.where(reach > 0, reach, torch.ones_like(reach))
    clipped = torch.maximum(torch.minimum(target_centred, reach), -reach)
    rescaled = torch.where(reach > 0, clipped / safe_reach * mimic_reach, target_centred) + target_mean
    result = rescaled.reshape(guided.shape)
    return (strength * result + (1.0 - strength) * guided_wide).to(guided.dtype)
