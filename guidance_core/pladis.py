"""PLADIS (Kim & Sim, ICCV 2025, arXiv:2503.07677): in the text cross-attention, the softmax attention map is
extrapolated toward a sparse one, ``A = A_softmax + λ(A_sparse − A_softmax)``, with ``A_sparse = α-entmax(QKᵀ/√d)``
(α = 1.5: entmax1.5, α = 2: sparsemax). It acts inside every forward of the chosen layers: no extra branch.

The sparse maps follow their papers: sparsemax (Martins & Astudillo 2016, arXiv:1602.02068, Algorithm 1),
entmax1.5 by sorting (Peters, Niculae & Martins 2019, arXiv:1905.05702, Algorithm 2), any other α by bisection
on the threshold τ of ``p_i = [(α − 1)z_i − τ]_+^{1/(α−1)}`` (Blondel et al. 2020, arXiv:1905.02437 §4).
"""

from __future__ import annotations

import torch


def sparsemax(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparsemax: the Euclidean projection of ``scores`` onto the simplex along ``dim``, ``[z − τ]_+`` with τ from
    the sorted scores' support (Martins & Astudillo 2016, Eq. 2 and Algorithm 1)."""
    z = scores.transpose(dim, -1)
    z = z - z.amax(dim=-1, keepdim=True)
    ordered = z.sort(dim=-1, descending=True).values
    ranks = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    cumulative = ordered.cumsum(-1)
    in_support = 1 + ranks * ordered > cumulative
    support = in_support.sum(dim=-1, keepdim=True)
    tau = (cumulative.gather(-1, support - 1) - 1) / support.to(z.dtype)
    return (z - tau).clamp_min(0).transpose(dim, -1)


def entmax15(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1.5-entmax, exactly by sorting: ``[z/2 − τ]_+²`` (Peters et al. 2019, Eq. 10 and Algorithm 2: for each
    support size k the threshold solving Σ(z/2 − τ)² = 1 over the k largest, the largest k whose τ is below
    its k-th score)."""
    z = scores.transpose(dim, -1) / 2
    z = z - z.amax(dim=-1, keepdim=True)
    ordered = z.sort(dim=-1, descending=True).values
    ranks = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    mean = ordered.cumsum(-1) / ranks
    mean_of_squares = (ordered ** 2).cumsum(-1) / ranks
    spread = ranks * (mean_of_squares - mean ** 2)
    tau = mean - ((1 - spread) / ranks).clamp_min(0).sqrt()
    support = (tau <= ordered).sum(dim=-1, keepdim=True)
    threshold = tau.gather(-1, support - 1)
    return ((z - threshold).clamp_min(0) ** 2).transpose(dim, -1)


def entmax_bisect(scores: torch.Tensor, alpha: float, dim: int = -1, iterations: int = 50) -> torch.Tensor:
    """α-entmax for any α > 1 by bisection on τ (Blondel et al. 2020 §4; Peters et al. 2019 Eq. 9):
    ``p = [(α − 1)z − τ]_+^{1/(α−1)}``, τ in [max − 1, max − n^{1−α}] where Σp is 1, then renormalised."""
    z = scores.transpose(dim, -1) * (alpha - 1)
    top = z.amax(dim=-1, keepdim=True)
    low, high = top - 1, top - z.shape[-1] ** (1 - alpha)
    exponent = 1 / (alpha - 1)
    for _ in range(iterations):
        tau = (low + high) / 2
        total = (z - tau).clamp_min(0).pow(exponent).sum(-1, keepdim=True)
        too_low = total >= 1  # τ too small: the mass is at least 1, raise it
        low, high = torch.where(too_low, tau, low), torch.where(too_low, high, tau)
    p = (z - low).clamp_min(0).pow(exponent)
    return (p / p.sum(-1, keepdim=True)).transpose(dim, -1)


def entmax(scores: torch.Tensor, alpha: float, dim: int = -1) -> torch.Tensor:
    """α-entmax along ``dim``: softmax at α = 1, entmax1.5 and sparsemax exactly at 1.5 and 2, else bisection."""
    if alpha == 1.0:
        return scores.softmax(dim)
    if alpha == 1.5:
        return entmax15(scores, dim)
    if alpha == 2.0:
        return sparsemax(scores, dim)
    return entmax_bisect(scores, alpha, dim)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: float,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``α-entmax(QKᵀ/√d + bias)·V`` for q, k, v as (B, heads, L, D), computed in float32 (PLADIS Eq. 6); ``bias``
    is the attention's additive mask (−inf or a large negative on padding), broadcast over the scores."""
    scores = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias.float()
    return (entmax(scores, alpha) @ v.float()).to(v.dtype)


def pladis_combine(dense: torch.Tensor, sparse: torch.Tensor, scale: float) -> torch.Tensor:
    """PLADIS Eq. 7 on attention outputs: ``(A_dense + λ(A_sparse − A_dense))·V = Z_dense + λ(Z_sparse − Z_dense)``,
    linear in the map, so the host's own dense attention output stands for ``A_softmax·V``. λ = 0: the model."""
    return dense + scale * (sparse - dense)
