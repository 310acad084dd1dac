"""Guidance that needs no trained unconditional model: the "weaker" prediction made from the cond branch by
shuffling its tokens (TPG), by noising its time-step embedding (TSG), or by an input-independent condition
(ICG). Pure tensor functions; the host decides where in the network they act.

- TPG: Rajabi, Mehraban, Sadat, Taati, *Token Perturbation Guidance for Diffusion Models*, arXiv:2506.10036.
- ICG and TSG: Sadat, Kansy, Hilliges, Weber, *No Training, No Problem: Rethinking Classifier-Free Guidance
  for Diffusion Models*, ICLR 2025, arXiv:2407.02687.

Each combines like CFG, linear in the predictions, so any prediction space (x0, ε, v) gives the same step:
``D̂ = D_c + s·(D_c − D_perturbed)`` next to the sampler's CFG term (``guided_prediction``).
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

__all__ = [
    "IndependentConditionState",
    "guided_prediction",
    "independent_condition",
    "keyed_normal",
    "noised_time_embedding",
    "shuffle_tokens",
    "token_permutation",
]


def token_permutation(count: int, seed: int, *keys, device=None) -> Tensor:
    """A random permutation of ``count`` token positions, the same for the same ``seed`` and ``keys``.

    TPG's shuffling matrix P (§3 of the paper; the authors' ``pipeline_sdxl_tpg.py`` draws one
    ``randperm(N)`` per block call, shared by every sample of the branch). The authors draw it from the global
    RNG; here it is drawn from a generator seeded by ``seed`` and ``keys`` (the step, the layer), so a run
    is reproducible and a permutation is fresh for each step and layer as theirs is. Drawn on ``device`` by a
    generator there (the same draws on every CPU; a GPU's generator draws its own)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    return torch.randperm(count, generator=_keyed_generator(device, seed, keys), device=device)


def _keyed_generator(device: torch.device, seed: int, keys: tuple) -> torch.Generator:
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def keyed_normal(shape, seed: int, *keys, device=None, dtype=torch.float32) -> Tensor:
    """Standard normal noise of ``shape``, the same for the same ``seed`` and ``keys`` (TSG's n per step),
    drawn on ``device`` by a generator there."""
    device = torch.device("cpu") if device is None else torch.device(device)
    noise = torch.randn(tuple(shape), generator=_keyed_generator(device, seed, keys), dtype=torch.float32,
                        device=device)
    return noise.to(dtype)


def shuffle_tokens(hidden: Tensor, permutation: Tensor, start: int = 0) -> Tensor:
    """``hidden`` (B, L, C) with its tokens ``start .. start + len(permutation)`` reordered by
    ``permutation`` (token ``start + i`` takes token ``start + permutation[i]``); the others (a joint
    sequence's text tokens) stay. TPG's perturbation ``x ↦ P x`` on the token dimension (arXiv:2506.10036,
    §3: P is a permutation matrix, so it keeps every token's norm and the tokens' mean). A new tensor."""
    out = hidden.clone()
    stop = start + permutation.shape[0]
    out[:, start:stop] = hidden[:, start:stop].index_select(1, permutation.to(hidden.device))
    return out


def noised_time_embedding(embedding: Tensor, noise: Tensor, noise_scale: float) -> Tensor:
    """TSG's perturbed time-step embedding ``t̃_emb = t_emb + s_n·std(t_emb)·n``, n ~ N(0, I) of the
    embedding's shape (arXiv:2407.02687 §4: the negative branch is the model at a perturbed time-step
    embedding). The noise is relative to the embedding's own spread, per sample (its std over the feature
    dimensions), so one ``noise_scale`` means the same on every architecture; v0xie's "TCG" also scales by the
    embedding's std. Computed in float32, returned in the embedding's dtype."""
    wide = embedding.float()
    dims = tuple(range(1, wide.ndim))
    spread = wide.std(dim=dims, keepdim=True) if wide[0].numel() > 1 else torch.ones_like(wide)
    return (wide + noise_scale * spread * noise.to(wide)).to(embedding.dtype)


def independent_condition(embedding: Tensor, noise: Tensor) -> Tensor:
    """ICG's condition ŷ independent of the input (arXiv:2407.02687 §3: replace the unconditional
    model by the conditional one at a random ŷ drawn independently of x): for text, a Gaussian embedding of
    the text embedding's shape and whole-tensor standard deviation, ``ŷ = std(y)·n`` (the paper's text-to-
    image setting as v0xie's sd-webui-incantations reads it). ``noise`` is n ~ N(0, I); float32 inside."""
    wide = embedding.float()
    return (wide.std() * noise.to(wide)).to(embedding.dtype)


def guided_prediction(cond: Tensor, uncond: Tensor | None, perturbed: Tensor, cfg: float, scale: float) -> Tensor:
    """``D̂ = D_u + w·(D_c − D_u) + s·(D_c − D_p)``, or ``D_c + s·(D_c − D_p)`` without an uncond (cfg 1):
    TPG's guidance with CFG (arXiv:2506.10036 §3; the authors' pipeline: ε_u + w·(ε_c − ε_u) + s·(ε_c − ε_tpg)),
    TSG's (arXiv:2407.02687 §4, D_p the time-perturbed branch); ICG (§3) is the CFG term with D_u the model
    at ŷ. Any prediction space: the
    form is linear, so x0, ε and v give the same sampler step."""
    base = cond if uncond is None else uncond + cfg * (cond - uncond)
    return base + scale * (cond - perturbed)


class IndependentConditionState:
    """ICG's draws for one run: with ``fixed``, one ŷ per conditioning entry (the i-th entry of a step keeps
    the first step's i-th draw) for the whole run; else a fresh ŷ every step. The same seed gives the same
    draws; the generator lives on the embedding's device (a CPU generator's draws on the CPU)."""

    def __init__(self, seed: int, fixed: bool):
        self.seed, self.fixed = seed, fixed
        self.generator: torch.Generator | None = None
        self.kept: dict[tuple, Tensor] = {}
        self.step, self.entry = None, 0

    def draw(self, like: Tensor, step: int) -> Tensor:
        if step != self.step:
            self.step, self.entry = step, 0
        key = (self.entry, tuple(like.shape))
        self.entry += 1
        if self.fixed and key in self.kept:
            return self.kept[key].to(like)
        if self.generator is None or self.generator.device != like.device:
            self.generator = torch.Generator(device=like.device).manual_seed(self.seed)
        noise = torch.randn(like.shape, generator=self.generator, dtype=torch.float32, device=like.device)
        if self.fixed:
            self.kept[key] = noise
        return noise.to(like)
