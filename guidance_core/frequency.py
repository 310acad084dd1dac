"""Guidance split by spatial frequency: FreSca (a Fourier gain on the guidance term) and Frequency-Decoupled
Guidance (CFG per level of a Laplacian pyramid).

The Laplacian pyramid here is built with explicit sizes: each level is half its parent rounded up, and the
expansion of a level is resized to exactly its parent's size, so it reconstructs the input's shape for any H
and W (kornia's ``build_laplacian_pyramid``, which diffusers' FDG uses, pads to a power of two instead and
returns a larger latent). On sizes divisible by 2^(levels − 1) the two are the same pyramid.
Spatial dims are the last two; a video latent ``(B, C, T, H, W)`` is filtered frame by frame.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .cfg_rules import _per_sample_dot
from .numerics import accumulation_dtype
from .rules import _normalized

__all__ = ["frequency_decoupled_cfg", "frequency_scaled", "laplacian_pyramid", "pyramid_sizes",
           "reconstruct_from_pyramid", "fresca"]

# The 5-tap binomial filter (Burt & Adelson 1983) of the classic pyramid, applied along H and W.
_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)


def pyramid_sizes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """(H, W) of each level, finest first: every level half its parent, rounded up (never below 1)."""
    sizes = [(height, width)]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def _blur(x: Tensor) -> Tensor:
    """The 5×5 binomial blur of every channel of ``(N, C, H, W)``, reflect-padded (replicate where a side is
    too short to reflect), as kornia's pyramid filter."""
    channels = x.shape[1]
    taps = torch.tensor(_BINOMIAL, dtype=x.dtype, device=x.device) / 16.0
    kernel = (taps[:, None] * taps[None, :]).expand(channels, 1, 5, 5)
    mode = "reflect" if min(x.shape[-2:]) > 2 else "replicate"
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode=mode), kernel, groups=channels)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _expand(x: Tensor, size: tuple[int, int]) -> Tensor:
    """A coarser level brought to ``size``: bilinear upsampling, then the blur (kornia's ``pyrup``)."""
    return _blur(_resize(x, size))


def laplacian_pyramid(x: Tensor, levels: int) -> list[Tensor]:
    """The Laplacian pyramid of ``(N, C, H, W)``: ``levels − 1`` band-pass levels ``G_i − expand(G_{i+1})``
    (finest first) and the coarsest Gaussian level last; ``G_{i+1}`` = the blurred ``G_i`` resized to the
    next size of ``pyramid_sizes``."""
    sizes = pyramid_sizes(x.shape[-2], x.shape[-1], levels)
    gaussian = [x]
    for size in sizes[1:]:
        gaussian.append(_resize(_blur(gaussian[-1]), size))
    bands = [gaussian[i] - _expand(gaussian[i + 1], sizes[i]) for i in range(levels - 1)]
    return bands + [gaussian[-1]]


def reconstruct_from_pyramid(pyramid: list[Tensor]) -> Tensor:
    """The inverse of ``laplacian_pyramid``: from the coarsest level, expand and add each finer band."""
    image = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        image = _expand(image, tuple(band.shape[-2:])) + band
    return image


def _as_images(x: Tensor) -> Tensor:
    """``(B, C, ..., H, W)`` as ``(B, C·..., H, W)``: the filters act on each channel (and frame) alone."""
    return x.reshape(x.shape[0], -1, *x.shape[-2:])


def frequency_decoupled_cfg(cond: Tensor, uncond: Tensor, scales: tuple[float, ...],
                            parallel_weights: tuple[float, ...] | None = None) -> Tensor:
    """Frequency-Decoupled Guidance (Sadat et al. 2025, arXiv:2506.19713; its Algorithm 2, as diffusers cites
    it): c and u are split into ``len(scales)`` Laplacian levels (highest frequency first); level k gets CFG
    ``u_k + w_k·Δ_k`` with its own scale, where Δ_k = c_k − u_k has its component parallel to c_k weighted by
    ``parallel_weights[k]`` (1 = plain CFG shift); the levels are recombined. The sampler's single cfg is
    replaced by the w_k.

    Linear in (c, u) when every parallel weight is 1, so then any prediction space gives the same result; the
    projection is not, and diffusers applies it to the model output. The pyramid runs in float32 at least,
    the projection (per sample and level, over all its elements) in the accumulation dtype, as diffusers'
    ``upcast_to_double``.
    """
    weights = parallel_weights if parallel_weights is not None else (1.0,) * len(scales)
    work = torch.promote_types(cond.dtype, torch.float32)
    cond_levels = laplacian_pyramid(_as_images(cond.to(work)), len(scales))
    uncond_levels = laplacian_pyramid(_as_images(uncond.to(work)), len(scales))
    guided_levels = []
    for cond_k, uncond_k, scale, weight in zip(cond_levels, uncond_levels, scales, weights, strict=True):
        shift = cond_k - uncond_k
        if weight != 1.0:
            wide = accumulation_dtype(shift)
            direction = _normalized(cond_k.to(wide))
            parallel = _per_sample_dot(shift.to(wide), direction) * direction
            shift = (shift.to(wide) + (weight - 1.0) * parallel).to(work)
        guided_levels.append(uncond_k + scale * shift)
    return reconstruct_from_pyramid(guided_levels).reshape(cond.shape).to(cond.dtype)


def _low_band(length: int, cutoff: int, device) -> Tensor:
    """The ``2·min(cutoff, length // 2)`` centred indices of a centred (fftshift-ed) spectrum axis."""
    centre = length // 2
    half = min(cutoff, centre)
    index = torch.arange(length, device=device)
    return (index >= centre - half) & (index < centre + half)


def frequency_scaled(x: Tensor, scale_low: float, scale_high: float, cutoff: int) -> Tensor:
    """``x`` with its 2-D spectrum (last two dims) multiplied by ``scale_low`` inside the centred box of
    half-width ``cutoff`` frequency indices and by ``scale_high`` outside it (FreSca, Huang et al. 2025,
    arXiv:2504.02154; ComfyUI core ``Fourier_filter``, comfy_extras/nodes_fresca.py). In float32."""
    work = torch.promote_types(x.dtype, torch.float32)
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.to(work), dim=(-2, -1)), dim=(-2, -1))
    low = _low_band(x.shape[-2], cutoff, x.device)[:, None] & _low_band(x.shape[-1], cutoff, x.device)[None, :]
    gain = torch.where(low, torch.tensor(scale_low, dtype=work, device=x.device),
                       torch.tensor(scale_high, dtype=work, device=x.device))
    filtered = torch.fft.ifftn(torch.fft.ifftshift(spectrum * gain, dim=(-2, -1)), dim=(-2, -1)).real
    return filtered.to(x.dtype)


def fresca(cond: Tensor, uncond: Tensor, scale: float, scale_low: float = 1.0, scale_high: float = 1.25,
           cutoff: int = 20) -> Tensor:
    """FreSca's CFG: ``u + w·F(c − u)``, F the frequency gain of ``frequency_scaled``. As ComfyUI's node
    (which hands CFG the cond ``u + F(c − u)``). Linear, so the same in every prediction space."""
    direction = frequency_scaled(cond - uncond, scale_low, scale_high, cutoff)
    return uncond + scale * direction
