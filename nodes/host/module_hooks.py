"""PyTorch module hooks for families whose forward offers neither a ``dit`` block replace patch nor
``block_index`` (PixArt, HiDream, Cosmos Predict 1 and 2, OmniGen 2 in ComfyUI 0.8.0): the hooks a perturbed layer needs
are registered on exactly its modules (the block, its self-attention, its sublayers) by an ``APPLY_MODEL``
wrapper, for one diffusion-model forward, and removed when that forward returns or raises.

Each hook applies each batch chunk's perturbations to that chunk's rows only (``chunk_perturbations``, as
the ``dit`` block patch does):
- BlockSkip: the block returns its inputs (the streams its output stands for) for the skipped chunks' rows.
- SublayerSkip: the sublayer's output rows are zero for the skipped chunks (its residual contribution).
- AttentionPerturbation, where the family's attention goes through ``optimized_attention_override``: while
  the block's self-attention module runs, the block is marked for the override (ACTIVE_LAYER_KEY) exactly as
  the ``dit`` patch marks it, and the override perturbs the image tokens' rows of the perturbed chunks.
- AttentionPerturbation where it does not (PixArt calls ``optimized_attention`` without the options): the
  perturbed chunks' rows of the self-attention module's output are recomputed from that module's own q, k, v
  projections (``AttentionSite.qkv``) with the perturbed attention, then its output projection.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import comfy.ldm.modules.attention as comfy_attention
import torch

from . import families
from .layers import Layer
from .marks import ACTIVE_LAYER_KEY, STEP_KEY, GuidanceError
from .perturbations import AttentionPerturbation, BlockSkip, SublayerSkip, sublayer_modules
from .routing import ActiveBlock, apply_chunked, chunk_perturbations, grid_for, perturbed_attention


@dataclass(frozen=True)
class AttentionSite:
    """Where a block's self-attention is and how its image tokens are found.

    ``module``: its path inside the block. ``patch``: the diffusion model's (frames, height, width) patch
    size, for the image token count. ``text_tokens(args, kwargs, image_tokens)``: how many text tokens its
    sequence holds (joint attention), from the module's inputs. ``qkv(module, x)`` and ``project(module,
    out)``: for attention the override does not see, the module's own q, k, v as (B, heads, L, D) and its
    output projection of an attention output (B, heads, L, D)."""

    module: str
    patch: Callable[[torch.nn.Module], tuple[int, int, int]] | None = None
    text_tokens: Callable[..., int] | None = None
    qkv: Callable | None = None
    project: Callable | None = None


@dataclass(frozen=True)
class BlockSite:
    """A block kind's hook sites: ``streams`` are the forward arguments the block's output stands for, in
    the output's order (one: a tensor; several: a tuple), so a skipped block returns them. ``batch_dim``: the
    batch dimension of those streams and of the sublayers' outputs (Cosmos 1 runs its blocks on
    (T, H, W, B, D) tensors)."""

    streams: tuple[str, ...]
    attention: AttentionSite
    batch_dim: int = 0


def _pixart_qkv(attn, x):
    """AttentionKVCompress.forward up to its attention call (without KV compression): qkv, then q/k norms."""
    if attn.sr_ratio > 1:
        raise GuidanceError("PixArt blocks with KV compression have fewer keys than queries: identity attention is "
                            "not defined there; choose a block without KV compression.")
    b, n, c = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, c).unbind(2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return tuple(t.reshape(b, n, attn.num_heads, c // attn.num_heads).transpose(1, 2) for t in (q, k, v))


def _pixart_project(attn, out):
    b, heads, n, d = out.shape
    return attn.proj(out.transpose(1, 2).reshape(b, n, heads * d))


def _square_patch(dm):  # HiDream, OmniGen 2: patch_size × patch_size, one frame
    return 1, dm.patch_size, dm.patch_size


def _hidream_double_text(args, kwargs, image_tokens):
    text = args[2] if len(args) > 2 else kwargs.get("norm_text_tokens", kwargs.get("text_tokens"))
    return text.shape[1] if text is not None else 0


def _hidream_single_text(args, kwargs, image_tokens):  # one stream: image tokens, then the text appended
    return args[0].shape[1] - image_tokens


def _omnigen2_text(args, kwargs, image_tokens):  # one stream: text, reference images, then the image
    return args[0].shape[1] - image_tokens


SITES: dict[str, dict[str, BlockSite]] = {
    "pixart": {"double": BlockSite(("x",), AttentionSite("attn", qkv=_pixart_qkv, project=_pixart_project))},
    "hidream": {
        "double": BlockSite(("image_tokens", "text_tokens"),
                            AttentionSite("block.attn1", _square_patch, _hidream_double_text)),
        "single": BlockSite(("image_tokens",), AttentionSite("block.attn1", _square_patch, _hidream_single_text)),
    },
    "cosmos_predict2": {"double": BlockSite(("x_B_T_H_W_D",), AttentionSite("self_attn"))},
    "omnigen2": {"double": BlockSite(("hidden_states",), AttentionSite("attn", _square_patch, _omnigen2_text))},
    # GeneralDITTransformerBlock "FA-CA-MLP": blocks.0 self-attention (VideoAttn), blocks.1 cross, blocks.2 MLP.
    "cosmos": {"double": BlockSite(("x",), AttentionSite("blocks.0.block"), batch_dim=3)},
}


def uses_module_hooks(family: str) -> bool:
    record = families.FAMILY_BY_KEY.get(family)
    return record is not None and families.MODULE_FORWARD_HOOKS in record.hooks


def make_module_hooks_wrapper(family: str):
    """The APPLY_MODEL wrapper of a ``family`` model: the forward runs with the hooks its perturbed layers
    need for this forward's chunks, and none are left on a module afterwards."""

    def module_hooks_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None,
                             transformer_options={}, **kwargs):  # noqa: B006 (the host's signature)
        handles = []
        try:
            handles = install(executor.class_obj.diffusion_model, family, transformer_options, tuple(x.shape))
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
            transformer_options.pop(ACTIVE_LAYER_KEY, None)

    return module_hooks_wrapper


def install(diffusion_model, family: str, transformer_options: dict, latent_shape: tuple) -> list:
    """Registers the hooks of every layer a perturbation acts on in this forward; returns their handles."""
    routing = transformer_options.get(STEP_KEY)
    if routing is None:
        return []
    record = families.FAMILY_BY_KEY[family]
    layers = {layer for ps in routing.by_index.values() for p in ps for layer in p.layers}
    handles: list = []
    try:
        for layer in sorted(layers, key=str):
            chunks = chunk_perturbations(transformer_options, layer)
            if not any(chunks):
                continue
            block = block_module(diffusion_model, record, layer)
            site = SITES[family][layer.kind]
            handles += _block_skip_hooks(block, site, chunks)
            handles += _sublayer_skip_hooks(diffusion_model, family, layer, chunks, site.batch_dim)
            attention_chunks = [[p for p in c if isinstance(p, AttentionPerturbation)] for c in chunks]
            if any(attention_chunks):
                handles += _attention_hooks(diffusion_model, block, site, layer, attention_chunks, record,
                                            transformer_options, latent_shape)
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


def block_module(diffusion_model, record, layer: Layer) -> torch.nn.Module:
    """The layer's block (Cosmos 1 keeps its blocks in a ModuleDict, in forward order)."""
    blocks = getattr(diffusion_model, record.block_lists[layer.kind])
    return list(blocks.values())[layer.index] if isinstance(blocks, torch.nn.ModuleDict) else blocks[layer.index]


def _rows(j: int, size: int) -> slice:
    return slice(j * size, (j + 1) * size)


def _chunk(t: torch.Tensor, dim: int, j: int, n: int) -> torch.Tensor:
    """Chunk ``j`` of ``n`` of ``t`` along its batch dimension ``dim`` (a view)."""
    size = t.shape[dim] // n
    return t.narrow(dim, j * size, size)


def _block_skip_hooks(block, site: BlockSite, chunks: list[list]) -> list:
    skipped = [j for j, c in enumerate(chunks) if any(isinstance(p, BlockSkip) for p in c)]
    if not skipped:
        return []
    n, signature, kept = len(chunks), inspect.signature(block.forward), {}

    def keep_inputs(module, args, kwargs):
        # Copies taken before the block runs, in case it updates its inputs in place.
        bound = signature.bind(*args, **kwargs).arguments
        kept["streams"] = [bound[name] for name in site.streams]
        kept["rows"] = [{j: _chunk(s, site.batch_dim, j, n).clone() for j in skipped} for s in kept["streams"]]

    def return_inputs(module, args, kwargs, output):
        outputs = list(output) if isinstance(output, tuple) else [output]
        for i, rows in enumerate(kept.pop("rows")):
            outputs[i] = outputs[i].clone()
            for j, value in rows.items():
                _chunk(outputs[i], site.batch_dim, j, n).copy_(value)
        kept.clear()
        return tuple(outputs) if isinstance(output, tuple) else outputs[0]

    return [block.register_forward_pre_hook(keep_inputs, with_kwargs=True),
            block.register_forward_hook(return_inputs, with_kwargs=True)]


def _sublayer_skip_hooks(diffusion_model, family: str, layer: Layer, chunks: list[list], batch_dim: int) -> list:
    """Hooks that zero the skipped chunks' rows of the sublayer's outputs (each output of a module that
    returns several, as HiDream's joint attention returns the image and text parts)."""
    by_sublayer: dict[str, list[int]] = {}
    for j, chunk in enumerate(chunks):
        for p in chunk:
            if isinstance(p, SublayerSkip):
                by_sublayer.setdefault(p.sublayer, []).append(j)
    n, handles = len(chunks), []
    for sublayer, skipped in by_sublayer.items():
        def zero_skipped_rows(module, inputs, output, skipped=skipped):
            def zeroed(t):
                t = t.clone()
                for j in skipped:
                    _chunk(t, batch_dim, j, n).zero_()
                return t

            return tuple(zeroed(t) for t in output) if isinstance(output, tuple) else zeroed(output)

        for module in sublayer_modules(diffusion_model, family, layer, sublayer):
            handles.append(module.register_forward_hook(zero_skipped_rows))
    return handles


def _image_tokens(diffusion_model, site: AttentionSite, latent_shape: tuple) -> int:
    frames, height, width = site.patch(diffusion_model)
    t = math.ceil(latent_shape[-3] / frames) if len(latent_shape) >= 5 else 1
    return t * math.ceil(latent_shape[-2] / height) * math.ceil(latent_shape[-1] / width)


def _attention_hooks(diffusion_model, block, site: BlockSite, layer: Layer, chunks: list[list], record,
                     transformer_options: dict, latent_shape: tuple) -> list:
    attention = block.get_submodule(site.attention.module)
    if families.ATTENTION_OVERRIDE in record.hooks:
        return _marker_hooks(diffusion_model, attention, site.attention, layer, chunks, record.text_position,
                             transformer_options, latent_shape)
    return [attention.register_forward_hook(_recomputing_hook(site.attention, chunks, transformer_options),
                                            with_kwargs=True)]


def _marker_hooks(diffusion_model, attention, site: AttentionSite, layer: Layer, chunks: list[list],
                  text_position: str, transformer_options: dict, latent_shape: tuple) -> list:
    """While the self-attention module runs, its block is marked for the attention override, as the ``dit``
    block patch marks a block (only the module's own attention calls see the mark). The mark goes into the
    options the module is called with, a copy: the forward may have copied its options before the blocks
    (ComfyUI 0.33.0's Cosmos does when a ``post_input`` patch is set), so the forward's own dict may not be
    the one the attention call sees."""
    image_tokens = _image_tokens(diffusion_model, site, latent_shape) if site.text_tokens is not None else 0

    def mark(module, args, kwargs):
        text_tokens = site.text_tokens(args, kwargs, image_tokens) if site.text_tokens is not None else 0
        active = ActiveBlock(layer, chunks, text_tokens, text_position)
        if isinstance(kwargs.get("transformer_options"), dict):
            return args, {**kwargs, "transformer_options": {**kwargs["transformer_options"], ACTIVE_LAYER_KEY: active}}
        transformer_options[ACTIVE_LAYER_KEY] = active  # called without its options: the forward's own dict
        return None

    def unmark(module, args, kwargs, output):
        transformer_options.pop(ACTIVE_LAYER_KEY, None)

    return [attention.register_forward_pre_hook(mark, with_kwargs=True),
            attention.register_forward_hook(unmark, with_kwargs=True)]


def _recomputing_hook(site: AttentionSite, chunks: list[list], transformer_options: dict):
    """A self-attention module whose attention the override does not see: the perturbed chunks' output rows
    are its output projection of the perturbed attention of its own q, k, v."""
    routing = transformer_options[STEP_KEY]

    def recompute(module, args, kwargs, output):
        x = args[0] if args else kwargs["x"]
        q, k, v = site.qkv(module, x)
        heads = q.shape[1]

        def attend(q_, k_, v_, which=None):
            return comfy_attention.optimized_attention(q_, k_, v_, heads, skip_reshape=True, skip_output_reshape=True)

        grid = grid_for(q.shape[2], routing.latent_shape)

        def perturb_chunk(perturbation, q_, k_, v_, which):
            return site.project(module, perturbed_attention(perturbation, q_, k_, v_, grid, attend, routing.scratch))

        def untouched(q_, k_, v_, which):
            rows = slice(which.start * size, which.stop * size)
            return output[rows]

        size = output.shape[0] // len(chunks)
        return apply_chunked(q, k, v, chunks, untouched, perturb_chunk)

    return recompute


# Sites of families ComfyUI added after 0.8.0 (additive data; the records are in families.py).
def _ernie_qkv(attention, x):
    """Never reached: Ernie Image's record offers no attention perturbation (its attention module applies the
    rotary embedding the block hands it as a keyword, which a recomputation from ``x`` alone would lack)."""
    raise GuidanceError("Ernie Image: attention perturbations (PAG, SEG, SLG attention_scores) are not supported on "
                        "this family; use SLG mode 'block', 'attention' or 'feedforward'.")


def _cogvideox_patch(dm):  # CogVideoX 1.0: patch_size per frame (patch_size_t None)
    return dm.patch_size_t or 1, dm.patch_size, dm.patch_size


def _cogvideox_text(args, kwargs, image_tokens):  # the block is called with keywords; its text comes first
    return kwargs["encoder_hidden_states"].shape[1]


SITES["ernie"] = {"double": BlockSite(("x",), AttentionSite("self_attention", qkv=_ernie_qkv))}
# CogVideoX computes its joint attention inline (no attention module): the block itself is marked for the override.
SITES["cogvideox"] = {"double": BlockSite(("hidden_states", "encoder_hidden_states"),
                                          AttentionSite("", _cogvideox_patch, _cogvideox_text))}
