"""CADS, the condition-annealed diffusion sampler (Sadat et al., ICLR 2024, arXiv:2310.17347, §3): Gaussian
noise on the conditioning embedding, strong early in sampling and annealed away, for more diverse samples.
A transform of the model's input conditioning, not of its predictions; the host applies it before the forward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .numerics import accumulation_dtype

__all__ = ["ConditionNoiseState", "cads_condition", "cads_gamma"]


def cads_gamma(t: float, tau1: float = 0.6, tau2: float = 0.9) -> float:
    """The paper's annealing schedule γ(t): 1 for t ≤ τ1, 0 for t ≥ τ2, linear in between; t ∈ [0, 1] is the
    diffusion time (1 = pure noise), so the noise is full at the start and gone after t falls below τ1.

    What was checked against the paper (arXiv:2310.17347): only its abstract and introduction (the stored arXiv
    v3 / ar5iv pages reach no further): "scheduled, monotonically decreasing Gaussian noise" on the conditioning
    vector, any pretrained model and sampler. §3's schedule, its t convention, the τ1/τ2 defaults, the rescale
    and ψ, whether the uncond is noised, and Algorithm 1 (appendix) could not be read here, and the authors
    published no code (their lab's page lists none). This schedule, τ1 = 0.6, τ2 = 0.9, s = 0.25, ψ = 1 and the
    formulas of ``cads_condition`` agree with a third-party implementation (v0xie/sd-webui-cads
    ``scripts/cads.py``), not with a confirmed reading of the paper. That one differs from ours in noising the
    cond and the uncond (ours: ``apply_to``), taking the rescale's mean and std over the whole batch tensor
    (ours: per sample) and reading t as 1 − step/steps (ours: timestep(σ)/timestep(σ_max), nodes/host/step.py)."""
    if t <= tau1:
        return 1.0
    if t >= tau2:
        return 0.0
    return (tau2 - t) / (tau2 - tau1)


class ConditionNoiseState:
    """The run's noise generator: every run with the same seed draws the same noise, step after step."""

    def __init__(self, seed: int):
        self.seed = seed
        self.generator: torch.Generator | None = None

    def draw(self, like: Tensor) -> Tensor:
        # The generator lives on the embedding's device (made at the first draw, when the device is known), so
        # the noise is drawn where it is used; on the CPU the draws are those of a CPU generator of this seed.
        if self.generator is None or self.generator.device != like.device:
            self.generator = torch.Generator(device=like.device).manual_seed(self.seed)
        return torch.randn(like.shape, generator=self.generator, dtype=torch.float32, device=like.device).to(like)


def cads_condition(embedding: Tensor, gamma: float, noise: Tensor, noise_scale: float = 0.25,
                   psi: float = 1.0) -> Tensor:
    """The noised condition ``ŷ = √γ·y + s·√(1 − γ)·n``; then its rescale
    ``ŷ_rescaled = (ŷ − mean(ŷ)) / std(ŷ) · std(y) + mean(y)`` and ``ψ·ŷ_rescaled + (1 − ψ)·ŷ`` (ψ = 0: no
    rescale). ``s`` is ``noise_scale``, ``n`` standard normal noise of the embedding's shape. Mean and std per
    sample (one prompt's embedding), in the accumulation dtype; a constant ŷ (std 0) is left as it is."""
    wide = accumulation_dtype(embedding)
    y = embedding.to(wide)
    noised = math.sqrt(gamma) * y + noise_scale * math.sqrt(1.0 - gamma) * noise.to(wide)
    if psi == 0:
        return noised.to(embedding.dtype)
    dims = tuple(range(1, embedding.ndim))
    y_mean, y_std = y.mean(dim=dims, keepdim=True), y.std(dim=dims, keepdim=True)
    noised_mean, noised_std = noised.mean(dim=dims, keepdim=True), noised.std(dim=dims, keepdim=True)
    has_spread = noised_std > 0
    rescaled = torch.where(has_spread, (noised - noised_mean) / torch.where(has_spread, noised_std, 1.0) * y_std
                           + y_mean, noised)
    return (psi * rescaled + (1.0 - psi) * noised).to(embedding.dtype)
