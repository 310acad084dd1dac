"""Sliding Window Guidance (Kaiser, Adaloglou & Kollmann 2024, arXiv:2411.10257; masked SWG, Adaloglou et al.,
BMVC 2025): the negative is the model itself evaluated on overlapping crops of the latent, each crop with the same
condition at the same σ, the crops' predictions put back in place and averaged where they overlap. Masked SWG
guides only the pixels two or more crops cover:

    D = D_pos + g·M·(D_pos − D_crops),   M = (coverage > 1)                       (denoiser, x0 space)

Crops follow the authors' code (edm2/sample_edm2.py ``swg_guidance``): square crops of side k on an n × n grid,
stride (side − k)//(n − 1) (one crop at 0 when n = 1); defaults n = 2, k = 40 on a 64 latent (5/8 of the side).
"""

from __future__ import annotations

import torch


def crop_origins(side: int, crop: int, n: int) -> list[int]:
    """Where the n crops of size ``crop`` start along a side of ``side``: stride (side − crop)//(n − 1)."""
    stride = (side - crop) // (n - 1) if n > 1 else 0
    return [stride * i for i in range(n)]


def crop_windows(height: int, width: int, crop: int, n: int) -> list[tuple[int, int]]:
    """The (top, left) of each of the n × n crops, row-major (the paper's grid, on each side)."""
    return [(top, left) for top in crop_origins(height, crop, n) for left in crop_origins(width, crop, n)]


def crops_of(x: torch.Tensor, windows: list[tuple[int, int]], crop: int) -> torch.Tensor:
    """The crops of x (B, C, H, W) stacked crop-major: rows [crop 0 of every sample, crop 1 of every sample, ...]."""
    return torch.cat([x[..., top:top + crop, left:left + crop] for top, left in windows])


def stitch_crops(crop_preds: torch.Tensor, windows: list[tuple[int, int]], crop: int,
                 shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """The crops' predictions (crop-major, as ``crops_of``) summed into place and divided by the coverage count;
    returns (the averaged prediction, the coverage count per pixel, shape (1, 1, H, W))."""
    total = crop_preds.new_zeros(shape)
    coverage = crop_preds.new_zeros((1, 1, *shape[-2:]))
    for piece, (top, left) in zip(crop_preds.chunk(len(windows)), windows, strict=True):
        total[..., top:top + crop, left:left + crop] += piece
        coverage[..., top:top + crop, left:left + crop] += 1
    return total / coverage.clamp_min(1), coverage


def masked_crops_prediction(cond: torch.Tensor, stitched: torch.Tensor, coverage: torch.Tensor,
                            masked: bool = True) -> torch.Tensor:
    """The SWG negative as one prediction: the stitched crops where M = (coverage > 1), the cond elsewhere, so
    that the term g·(D_pos − negative) is the paper's g·M·(D_pos − D_crops). Unmasked SWG: M = (coverage > 0)."""
    guided = coverage > (1 if masked else 0)
    return torch.where(guided, stitched, cond)
