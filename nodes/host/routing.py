"""Inside one forward: which perturbations act on which batch chunk (by its ``cond_or_uncond`` tag), the
image token grid of an attention call, and running attention once per run of untouched chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ...guidance_core.tokens import TokenGrid
from .layers import Layer
from .marks import IMAGE_LATENT_SHAPE_KEY, STEP_KEY, GuidanceError, is_ours_alone
from .perturbations import AttentionPerturbation


@dataclass(frozen=True)
class ForwardRouting:
    """Per forward: which perturbations apply to which ``cond_or_uncond`` index, the latent shape (to find
    the token grid), and a scratch dict for observers (SAG's attention map)."""

    by_index: dict
    latent_shape: tuple
    scratch: dict
    diffusion_model: Any = None
    step: int = 0  # the step's index in the run (perturbations that draw per step: TPG's permutations)


@dataclass
class ActiveBlock:
    """Set under ACTIVE_LAYER_KEY while one DiT block call runs, for the attention override: the block's
    layer, the attention perturbations per batch chunk, how many text tokens its self-attention sequence has
    and where they sit (families.TEXT_BEFORE_IMAGE / TEXT_AFTER_IMAGE / NO_TEXT), and how many attention
    calls the block has made so far (only its first, the self/joint attention, is perturbed)."""

    layer: Layer
    chunks: list
    text_tokens: int
    text_position: str
    attention_calls: int = 0
    grid: TokenGrid | None = None  # the image tokens' grid where the family knows it (record.patch_size)
    # The attention call gets the queries of the sequence's last rows only, against every key (HiDream O1's
    # two-pass attention: the prompt's causal rows are computed apart); ``grid`` is in the keys' positions.
    queries_are_last_rows: bool = False


def with_step_info(model_options, routing: ForwardRouting) -> dict:
    options = dict(model_options)
    transformer_options = dict(options.get("transformer_options", {}))
    transformer_options[STEP_KEY] = routing
    options["transformer_options"] = transformer_options
    return options


def chunk_perturbations(transformer_options, layer: Layer) -> list[list]:
    """For each batch chunk of this forward, the perturbations that act on ``layer`` (empty: untouched)."""
    routing: ForwardRouting | None = transformer_options.get(STEP_KEY)
    cond_or_uncond = transformer_options.get("cond_or_uncond") or []
    if routing is None:
        return [[] for _ in cond_or_uncond]
    return [[p for p in routing.by_index.get(i, []) if _acts_on(p, layer)] for i in cond_or_uncond]


def _acts_on(perturbation, layer: Layer) -> bool:
    for target in perturbation.layers:
        same_block = target.kind == layer.kind and target.index == layer.index
        if same_block and (target.sub is None or target.sub == layer.sub):
            return True
    return False


def image_latent_shape(transformer_options) -> tuple:
    """The shape of the latent whose tokens a forward's perturbations act on: the first of the latents the model
    was handed where the sampler packed several (attention.text_tokens_wrapper records it), else the step's."""
    shape = transformer_options.get(IMAGE_LATENT_SHAPE_KEY)
    return shape if shape is not None else transformer_options[STEP_KEY].latent_shape


def grid_for(tokens: int, latent_shape: tuple, text_tokens: int = 0, text_first: bool = True) -> TokenGrid | None:
    """The image token grid of an attention call with ``tokens`` tokens on a latent of ``latent_shape``
    ((B, C, H, W) or video (B, C, T, H, W)): the smallest downsampling factor f (a power of two: UNet
    levels, DiT patch size) whose grid frames·ceil(H/f)·ceil(W/f) fits beside the ``text_tokens`` text tokens
    of joint attention, which come before the image tokens (``text_first``) or after them. An exact fit is
    preferred (with the text, else without it); a grid plus more tokens (Flux Kontext's reference images,
    extra text of HunyuanVideo's single blocks) is accepted next to the text."""
    if len(latent_shape) < 4:
        return None
    height, width = latent_shape[-2], latent_shape[-1]
    frames = latent_shape[-3] if len(latent_shape) >= 5 else 1
    factors = (1, 2, 4, 8, 16, 32, 64)
    image_start = text_tokens if text_first else 0
    layouts = [(image_start, text_tokens)] + ([(0, 0)] if text_tokens else [])  # (image start, text tokens)
    for start, text in layouts:
        for f in factors:
            h, w = math.ceil(height / f), math.ceil(width / f)
            if text + frames * h * w == tokens:
                return TokenGrid(start, h, w, frames)
    for f in factors:
        h, w = math.ceil(height / f), math.ceil(width / f)
        if text_tokens + frames * h * w <= tokens:
            return TokenGrid(image_start, h, w, frames)
    return None


def patch_grid(latent_shape: tuple, patch_size: tuple[int, int, int], start: int) -> TokenGrid:
    """The image tokens' grid of a DiT with patches ``patch_size`` (frames, height, width) on a latent of
    ``latent_shape`` (4-D, or 5-D video), the first image token at ``start``: the host pads the latent to
    whole patches, so each side is ceil(side / patch)."""
    frames = latent_shape[-3] if len(latent_shape) >= 5 else 1
    patch_t, patch_h, patch_w = patch_size
    return TokenGrid(start, math.ceil(latent_shape[-2] / patch_h), math.ceil(latent_shape[-1] / patch_w),
                     math.ceil(frames / patch_t))


def _chunk_runs(chunks: list[list]) -> list[tuple[int, int, AttentionPerturbation | None]]:
    """The chunks as runs ``(first, end, perturbation)``: adjacent untouched chunks form one run (one
    attention call for all of them), each perturbed chunk is a run of its own."""
    runs, j, n = [], 0, len(chunks)
    while j < n:
        if chunks[j]:
            if len(chunks[j]) > 1:
                raise GuidanceError("Two attention perturbations on the same layer of one branch: "
                                    f"{[p.label for p in chunks[j]]}. Give each its own branch.")
            runs.append((j, j + 1, chunks[j][0]))
            j += 1
            continue
        end = j
        while end < n and not chunks[end]:
            end += 1
        runs.append((j, end, None))
        j = end
    return runs


def apply_chunked(q, k, v, chunks: list[list], attend, perturb_chunk):
    """Runs ``attend(q, k, v, which)`` once on each run of adjacent untouched chunks and
    ``perturb_chunk(perturbation, q, k, v, which)`` on each perturbed chunk, ``which`` being the slice of chunk
    indices the rows hold (so another node's patch called inside can be told which chunks it sees). q, k, v
    hold the chunks along dim 0, in whatever layout the two callables take and return; each result is
    written into one output tensor (no concatenation of the pieces afterwards)."""
    runs = _chunk_runs(chunks)
    size = q.shape[0] // len(chunks)
    out = None
    for first, end, perturbation in runs:
        rows = slice(first * size, end * size)
        if perturbation is None:
            piece = attend(q[rows], k[rows], v[rows], slice(first, end))
        else:
            piece = perturb_chunk(perturbation, q[rows], k[rows], v[rows], slice(first, end))
        if len(runs) == 1:  # the piece is the whole output: nothing to copy
            return piece
        if out is None:  # shaped from the first piece: attention may change the value width or dtype
            out = piece.new_empty((q.shape[0], *piece.shape[1:]))
        out[rows] = piece
    return out


def perturbed_attention(perturbation: AttentionPerturbation, q, k, v, grid, attend, scratch: dict) -> torch.Tensor:
    """The perturbation's attention output; an observer's record goes into the step's scratch."""
    out = perturbation.perturb(q, k, v, grid, attend)
    if perturbation.records:
        out, scratch[perturbation] = out
    return out


def equal_chunks(tensors: list[torch.Tensor], n: int) -> tuple[list[int], list[int]]:
    """Groups the ``n`` chunks (along dim 0) of ``tensors``: ``kept`` has the first chunk of each group of
    chunks equal in every tensor, ``source`` gives each chunk its group's position in ``kept``."""
    pieces = [t.chunk(n) for t in tensors]
    # Which chunks are equal decides which rows are computed (a shape), so the answer must reach the host: every
    # pair is compared on the device and the table read once (one transfer per call, not one per pair and tensor).
    pairs = [(i, j) for j in range(n) for i in range(j)]
    device = tensors[0].device
    same = [torch.stack([(c[i] == c[j]).all().to(device) for c in pieces]).all() for i, j in pairs]
    equal = dict(zip(pairs, torch.stack(same).tolist() if same else [], strict=True))
    kept, source = [], []
    for j in range(n):
        twin = next((k for k, i in enumerate(kept) if equal[(i, j)]), None)
        if twin is None:
            kept.append(j)
            twin = len(kept) - 1
        source.append(twin)
    return kept, source


def chunk_rows(chunks, size: int, device) -> torch.Tensor:
    """The batch rows of ``chunks`` (chunk indices), each chunk ``size`` rows."""
    return torch.cat([torch.arange(c * size, (c + 1) * size, device=device) for c in chunks])


def no_other_patches(transformer_options) -> bool:
    """Whether no other node patches this forward (their patches, replace patches, or attention override,
    also where ours wraps theirs)."""
    if any(transformer_options.get("patches", {}).values()):
        return False
    for patches in transformer_options.get("patches_replace", {}).values():
        if not all(is_ours_alone(fn) for fn in patches.values()):
            return False
    override = transformer_options.get("optimized_attention_override")
    return override is None or is_ours_alone(override)

