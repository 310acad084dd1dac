"""Hooks for one forward: the one mechanism for every family whose forward offers no working ``dit`` block
replace patch (its record lists ``families.FORWARD_HOOKS``, also spelt ``BLOCK_FORWARD_HOOKS`` and
``MODULE_FORWARD_HOOKS``): Lumina 2 / Z-Image, Kandinsky 5, PixArt, HiDream, Cosmos Predict 1 and 2,
OmniGen 2, HunyuanDiT, Stable Cascade stage C.

An ``APPLY_MODEL`` wrapper registers PyTorch hooks on exactly the modules a perturbed layer needs (the block,
its self-attention, its sublayers) for one diffusion-model forward, and removes them when that forward
returns or raises; the host's code is left as it is. Where those modules sit and how their tensors are laid
out is the family's ``BlockSite`` (``SITES``; a family without an entry uses ``WHOLE_BLOCK``). Each hook
applies each batch chunk's perturbations to that chunk's rows only (``chunk_perturbations``, as the ``dit``
block patch does):
- BlockSkip: the block returns its inputs (the streams its output stands for) for the skipped chunks' rows.
- SublayerSkip: the sublayer's output rows are zero for the skipped chunks (its residual contribution).
- AttentionPerturbation, where the family's attention goes through ``optimized_attention_override``: while
  the site's attention module runs, it is marked for the override (ACTIVE_LAYER_KEY) exactly as the ``dit``
  patch marks a block (its first attention call is its self or joint attention), and the override perturbs
  the image tokens' rows of the perturbed chunks.
- AttentionPerturbation where it does not (PixArt and HunyuanDiT call ``optimized_attention`` without the
  options; Stable Cascade's queries and keys differ in length, which the override declines): the perturbed
  chunks' rows of the self-attention module's output are recomputed from that module's own q, k, v
  projections (``AttentionSite.qkv``) with the perturbed attention, then its output projection.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import comfy.ldm.modules.attention as comfy_attention
import torch

from ...guidance_core.tokens import TokenGrid
from . import families
from .layers import Layer
from .marks import ACTIVE_LAYER_KEY, STEP_KEY, TEXT_TOKENS_KEY, GuidanceError, mark_ours
from .perturbations import AttentionPerturbation, BlockSkip, SublayerSkip, block_module, sublayer_modules
from .routing import ActiveBlock, apply_chunked, chunk_perturbations, grid_for, patch_grid, perturbed_attention


@dataclass(frozen=True)
class AttentionSite:
    """Where a block's self-attention is and how its image tokens are found.

    ``module``: its path inside the block; ``""``: the block itself, whose first attention call is its self
    or joint attention (the override counts the calls, ``ActiveBlock.attention_calls``). ``patch``: the
    diffusion model's (frames, height, width) patch size, for the image token count. ``text_tokens(args,
    kwargs, image_tokens)``: how many text tokens its sequence holds (joint attention), from the module's
    inputs. A family whose record has a ``patch_size`` needs neither: its image grid comes from the latent
    and that patch (``image_grid``). ``qkv(module, *inputs)`` and ``project(module, out)``: for attention the
    override does not see, the module's own q, k, v as (B, heads, L, D) from its inputs, and its output
    projection of an attention output (B, heads, L, D)."""

    module: str = ""
    patch: Callable[[torch.nn.Module], tuple[int, int, int]] | None = None
    text_tokens: Callable[..., int] | None = None
    qkv: Callable | None = None
    project: Callable | None = None
    # The attention call gets the queries of the sequence's last rows only (HiDream O1's two-pass attention): the
    # image grid is placed in the keys' positions, after the record's ``prompt_tokens_input`` tokens.
    queries_are_last_rows: bool = False


@dataclass(frozen=True)
class BlockSite:
    """A block kind's hook sites: ``streams`` are the forward arguments the block's output stands for, in
    the output's order (one: a tensor; several: a tuple), so a skipped block returns them; ``()``: its first
    argument. ``batch_dim``: the batch dimension of those streams and of the sublayers' outputs (Cosmos 1
    runs its blocks on (T, H, W, B, D) tensors)."""

    streams: tuple[str, ...] = ()
    attention: AttentionSite = AttentionSite()
    batch_dim: int = 0


# A block that takes its stream first and returns it, and whose first attention call is its self-attention
# (Lumina 2's JointTransformerBlock, Kandinsky 5's TransformerDecoderBlock).
WHOLE_BLOCK = BlockSite()


def _pixart_qkv(attn, x, *inputs, **kw_inputs):
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


def _hydit_qkv(attn, x, freqs_cis_img=None):
    """hydit/attn_layers.py Attention.forward up to its attention call: Wqkv, the per-head q/k norms, RoPE."""
    from comfy.ldm.hydit.attn_layers import apply_rotary_emb

    b, n, _ = x.shape
    q, k, v = attn.Wqkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if freqs_cis_img is not None:
        q, k = apply_rotary_emb(q, k, freqs_cis_img, head_first=True)
    return q, k, v


def _hydit_project(attn, out):
    b, heads, n, d = out.shape
    return attn.proj_drop(attn.out_proj(out.transpose(1, 2).reshape(b, n, heads * d)))


def _cascade_qkv(attn, x, kv, _v=None, transformer_options=None):
    """cascade/common.py OptimizedAttention.forward up to its attention call: to_q of the image tokens x,
    to_k and to_v of [image tokens; text tokens] (Attention2D passes that concatenation as k and v)."""
    def heads(t):
        b, n, c = t.shape
        return t.reshape(b, n, attn.heads, c // attn.heads).transpose(1, 2)

    return heads(attn.to_q(x)), heads(attn.to_k(kv)), heads(attn.to_v(kv))


def _cascade_project(attn, out):
    b, heads, n, d = out.shape
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, heads * d))


_CASCADE_ATTN_BLOCK = BlockSite(("x",), AttentionSite("attention.attn", qkv=_cascade_qkv, project=_cascade_project))


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
    "hunyuan_dit": {"double": BlockSite(("x",), AttentionSite("attn1", qkv=_hydit_qkv, project=_hydit_project))},
    "stable_cascade_c": {"down": _CASCADE_ATTN_BLOCK, "up": _CASCADE_ATTN_BLOCK},
}


def site_of(family: str, kind: str) -> BlockSite:
    """The hook sites of a ``kind`` block of a ``family`` model: its entry in ``SITES``, else ``WHOLE_BLOCK``."""
    return SITES.get(family, {}).get(kind, WHOLE_BLOCK)


def uses_forward_hooks(family: str) -> bool:
    """Whether the family's layers are perturbed through hooks for one forward (its record says so)."""
    record = families.FAMILY_BY_KEY.get(family)
    return record is not None and families.FORWARD_HOOKS in record.hooks


uses_module_hooks = uses_block_hooks = uses_forward_hooks  # the names the two former mechanisms had


def kandinsky5_block_patch_works() -> bool:
    """Whether the host's Kandinsky 5 ``dit`` block patch could call its block: ``forward_orig``'s
    ``block_wrap`` calls ``block(x=, context=, time_embed=, freqs=)``, and in ComfyUI 0.8.0 and 0.33.0
    ``TransformerDecoderBlock.forward`` takes ``visual_embed`` and ``text_embed`` instead (a TypeError)."""
    import comfy.ldm.kandinsky5.model as kandinsky5

    parameters = inspect.signature(kandinsky5.TransformerDecoderBlock.forward).parameters
    return {"x", "context", "time_embed", "freqs"} <= parameters.keys()


def make_module_hooks_wrapper(family: str):
    """The APPLY_MODEL wrapper of a ``family`` model: the forward runs with the hooks its perturbed layers
    need for this forward's chunks, and none are left on a module afterwards."""

    def module_hooks_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None,
                             transformer_options={}, **kwargs):  # noqa: B006 (the host's signature)
        handles = []
        try:
            handles = install(executor.class_obj.diffusion_model, family, transformer_options)
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
            transformer_options.pop(ACTIVE_LAYER_KEY, None)

    return module_hooks_wrapper


def make_inner_forward_hooks_wrapper(family: str):
    """The DIFFUSION_MODEL wrapper of a family whose attention sees only the forward's own options (its record
    lists ``INNER_FORWARD_HOOKS``): the hooks go in inside the forward, on the options it runs with, and are
    removed when it returns. It records the prompt's token count (the record's ``prompt_tokens_input``) and,
    where the record lists ``PROMPT_CACHE_OFF`` and this forward perturbs, turns the forward's prompt K/V cache
    off with a dit patch entry no block looks up (HiDream O1 caches only without dit patches)."""
    record = families.FAMILY_BY_KEY[family]

    def inner_forward_hooks_wrapper(executor, *args, **kwargs):
        options = next((value for value in (*args, *kwargs.values())
                        if isinstance(value, dict) and STEP_KEY in value), None)
        if options is None:
            return executor(*args, **kwargs)
        prompt = kwargs.get(record.prompt_tokens_input) if record.prompt_tokens_input else None
        if prompt is not None:
            options[TEXT_TOKENS_KEY] = prompt.shape[1]
        handles = []
        try:
            handles = install(executor.class_obj, family, options)
            if handles and families.PROMPT_CACHE_OFF in record.hooks:
                replace = options.get("patches_replace", {})
                options["patches_replace"] = {**replace, "dit": {**replace.get("dit", {}), _CACHE_OFF: _cache_off}}
            return executor(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
            options.pop(ACTIVE_LAYER_KEY, None)

    return inner_forward_hooks_wrapper


# The dit patch entry that turns HiDream O1's prompt K/V cache off: its key names no block, so it never runs.
_CACHE_OFF = ("comfyui-guiders: prompt cache off while perturbing",)
_cache_off = mark_ours(lambda args, extra: extra["original_block"](args), None)


def install(diffusion_model, family: str, transformer_options: dict) -> list:
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
            site = site_of(family, layer.kind)
            handles += _block_skip_hooks(block, site, chunks)
            handles += sublayer_skip_hooks(diffusion_model, family, layer, chunks, site.batch_dim)
            attention_chunks = [[p for p in c if isinstance(p, AttentionPerturbation)] for c in chunks]
            if any(attention_chunks):
                handles += _attention_hooks(diffusion_model, block, site, layer, attention_chunks, record,
                                            transformer_options)
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


def _chunk(t: torch.Tensor, dim: int, j: int, n: int) -> torch.Tensor:
    """Chunk ``j`` of ``n`` of ``t`` along its batch dimension ``dim`` (a view)."""
    size = t.shape[dim] // n
    return t.narrow(dim, j * size, size)


def _block_skip_hooks(block, site: BlockSite, chunks: list[list]) -> list:
    skipped = [j for j, c in enumerate(chunks) if any(isinstance(p, BlockSkip) for p in c)]
    if not skipped:
        return []
    n, signature, kept = len(chunks), inspect.signature(block.forward), {}
    streams = site.streams or (next(iter(signature.parameters)),)

    def keep_inputs(module, args, kwargs):
        # Copies taken before the block runs, in case it updates its inputs in place.
        bound = signature.bind(*args, **kwargs).arguments
        kept["rows"] = [{j: _chunk(bound[name], site.batch_dim, j, n).clone() for j in skipped} for name in streams]

    def return_inputs(module, args, kwargs, output):
        outputs = list(output) if isinstance(output, tuple) else [output]
        for i, rows in enumerate(kept.pop("rows")):
            outputs[i] = outputs[i].clone()
            for j, value in rows.items():
                _chunk(outputs[i], site.batch_dim, j, n).copy_(value)
        return tuple(outputs) if isinstance(output, tuple) else outputs[0]

    return [block.register_forward_pre_hook(keep_inputs, with_kwargs=True),
            block.register_forward_hook(return_inputs, with_kwargs=True)]


def sublayer_skip_hooks(diffusion_model, family: str, layer: Layer, chunks: list[list], batch_dim: int = 0) -> list:
    """Hooks that zero the skipped chunks' rows of the sublayer's outputs (each output of a module that
    returns several, as HiDream's joint attention returns the image and text parts). The ``dit`` block
    patch registers them for one block call, the forward hooks for one forward."""
    by_sublayer: dict[str, list[int]] = {}
    for j, chunk in enumerate(chunks):
        for p in chunk:
            if isinstance(p, SublayerSkip):
                by_sublayer.setdefault(p.sublayer, []).append(j)
    n, handles = len(chunks), []
    for sublayer, skipped in by_sublayer.items():
        def zero_skipped_rows(module, inputs, output, skipped=skipped):
            def zeroed(t):
                if not isinstance(t, torch.Tensor):  # HiDream O1's attention also returns its K/V cache (or None)
                    return t
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


def image_grid(record: families.ModelFamily, diffusion_model, tokens: int, latent_shape: tuple,
               trailing_tokens: int = 0) -> TokenGrid:
    """The image tokens of a self-attention sequence of ``tokens`` tokens, from the latent and the family's
    patch (``record.patch_size``), never guessed from the token count: a NextDiT pads the image tokens to its
    ``pad_tokens_multiple`` (Z-Image: 32), and its sequence ends with the image (Z-Image Omni puts reference
    images and their captions before it), so everything before it is text; except ``trailing_tokens``
    reference-image tokens the host appends after the image (Krea 2 edit: ``reference_image_num_tokens``)."""
    grid = patch_grid(latent_shape, record.patch_size, 0)
    if record.text_position in (families.NO_TEXT, families.TEXT_AFTER_IMAGE):  # the image first (Ernie Image)
        return grid
    multiple = getattr(diffusion_model, "pad_tokens_multiple", None) or 1
    padded = math.ceil(grid.frames * grid.height * grid.width / multiple) * multiple
    return TokenGrid(tokens - trailing_tokens - padded, grid.height, grid.width, grid.frames)


def _attention_hooks(diffusion_model, block, site: BlockSite, layer: Layer, chunks: list[list], record,
                     transformer_options: dict) -> list:
    attention = block.get_submodule(site.attention.module)
    if families.ATTENTION_OVERRIDE in record.hooks:
        return _marker_hooks(diffusion_model, attention, site.attention, layer, chunks, record, transformer_options)
    hook = _recomputing_hook(site.attention, chunks, transformer_options, record, diffusion_model)
    return [attention.register_forward_hook(hook, with_kwargs=True)]


def _marker_hooks(diffusion_model, attention, site: AttentionSite, layer: Layer, chunks: list[list], record,
                  transformer_options: dict) -> list:
    """While the attention module runs, it is marked for the attention override, as the ``dit`` block patch
    marks a block (only the module's own attention calls see the mark). The mark goes into the options the
    module is called with, a copy: the forward may have copied its options before the blocks (ComfyUI
    0.33.0's Cosmos does when a ``post_input`` patch is set), so the forward's own dict may not be the one
    the attention call sees."""
    latent_shape = transformer_options[STEP_KEY].latent_shape
    image_tokens = _image_tokens(diffusion_model, site, latent_shape) if site.text_tokens is not None else 0

    def mark(module, args, kwargs):
        if site.queries_are_last_rows:
            grid = patch_grid(latent_shape, record.patch_size, transformer_options[TEXT_TOKENS_KEY])
            active = ActiveBlock(layer, chunks, grid.start, record.text_position, grid=grid, queries_are_last_rows=True)
        elif record.patch_size is not None:
            # The reference images' token counts the host appends after the image and records in the options
            # (comfy/ldm/krea2/model.py, as flux, qwen_image, mage_flow do), in the module's options or the forward's.
            options = kwargs.get("transformer_options")
            options = options if isinstance(options, dict) else transformer_options
            references = sum(options.get("reference_image_num_tokens") or ())
            grid = image_grid(record, diffusion_model, args[0].shape[1], latent_shape, references)
            active = ActiveBlock(layer, chunks, grid.start, record.text_position, grid=grid)
        else:
            text_tokens = site.text_tokens(args, kwargs, image_tokens) if site.text_tokens is not None else 0
            active = ActiveBlock(layer, chunks, text_tokens, record.text_position)
        if isinstance(kwargs.get("transformer_options"), dict):
            return args, {**kwargs, "transformer_options": {**kwargs["transformer_options"], ACTIVE_LAYER_KEY: active}}
        transformer_options[ACTIVE_LAYER_KEY] = active  # called without its options: the forward's own dict
        return None

    def unmark(module, args, kwargs, output):
        transformer_options.pop(ACTIVE_LAYER_KEY, None)

    return [attention.register_forward_pre_hook(mark, with_kwargs=True),
            attention.register_forward_hook(unmark, with_kwargs=True)]


def _recomputing_hook(site: AttentionSite, chunks: list[list], transformer_options: dict,
                      record: families.ModelFamily | None = None, diffusion_model=None):
    """A self-attention module whose attention the override does not see: the perturbed chunks' output rows
    are its output projection of the perturbed attention of its own q, k, v. A module that returns a tuple
    (HunyuanDiT's ``(out,)``) has its first element recomputed. The image grid comes from the latent and the
    record's ``patch_size`` where it has one (Ernie Image: [image; text]), else from the sequence length
    (PixArt, HunyuanDiT, Stable Cascade: image tokens alone)."""
    routing = transformer_options[STEP_KEY]

    def grid_of(tokens: int) -> TokenGrid | None:
        if record is not None and record.patch_size is not None:
            return image_grid(record, diffusion_model, tokens, routing.latent_shape)
        return grid_for(tokens, routing.latent_shape)

    def recompute(module, args, kwargs, output):
        q, k, v = site.qkv(module, *args, **kwargs)
        heads = q.shape[1]
        computed = output[0] if isinstance(output, tuple) else output

        def attend(q_, k_, v_, which=None):
            return comfy_attention.optimized_attention(q_, k_, v_, heads, skip_reshape=True, skip_output_reshape=True,
                                                       attn_precision=getattr(module, "attn_precision", None))

        grid = grid_of(q.shape[2])

        def perturb_chunk(perturbation, q_, k_, v_, which):
            return site.project(module, perturbed_attention(perturbation, q_, k_, v_, grid, attend, routing.scratch))

        def untouched(q_, k_, v_, which):
            return computed[which.start * size:which.stop * size]

        size = computed.shape[0] // len(chunks)
        out = apply_chunked(q, k, v, chunks, untouched, perturb_chunk)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return recompute


# Sites of families ComfyUI added after 0.8.0 (additive data; the records are in families.py).
def _ernie_qkv(attention, x, attention_mask=None, image_rotary_emb=None):
    """ernie/model.py ErnieImageAttention.forward up to its attention call: to_q, to_k, to_v, the per-head RMS
    norms and the rotary embedding the block hands it as a keyword (the fused rms_rope_split_half outside
    training, as the host), as (B, heads, L, D). ErnieImageModel.forward calls its blocks without a mask."""
    import comfy.model_management
    import comfy.ops
    import comfy.quant_ops

    if attention_mask is not None:
        raise GuidanceError("Ernie Image: an attention mask reached the self-attention, which the perturbed "
                            "attention does not apply; run without the node that adds it.")
    b, n, _ = x.shape
    query = attention.to_q(x).view(b, n, attention.heads, attention.head_dim)
    key = attention.to_k(x).view(b, n, attention.heads, attention.head_dim)
    value = attention.to_v(x).view(b, n, attention.heads, attention.head_dim)
    if image_rotary_emb is not None and not comfy.model_management.in_training:
        q_scale, _, q_stream = comfy.ops.cast_bias_weight(attention.norm_q, query, offloadable=True)
        k_scale, _, k_stream = comfy.ops.cast_bias_weight(attention.norm_k, key, offloadable=True)
        query, key = comfy.quant_ops.ck.rms_rope_split_half(query, key, image_rotary_emb, q_scale, k_scale,
                                                             attention.norm_q.eps)
        comfy.ops.uncast_bias_weight(attention.norm_q, q_scale, None, q_stream)
        comfy.ops.uncast_bias_weight(attention.norm_k, k_scale, None, k_stream)
    else:
        query, key = attention.norm_q(query), attention.norm_k(key)
        if image_rotary_emb is not None:
            query, key = comfy.quant_ops.ck.apply_rope_split_half(query, key, image_rotary_emb)
    return tuple(t.transpose(1, 2) for t in (query, key, value))


def _ernie_project(attention, out):
    b, heads, n, d = out.shape
    return attention.to_out[0](out.transpose(1, 2).reshape(b, n, heads * d))


def _cogvideox_patch(dm):  # CogVideoX 1.0: patch_size per frame (patch_size_t None)
    return dm.patch_size_t or 1, dm.patch_size, dm.patch_size


def _cogvideox_text(args, kwargs, image_tokens):  # the block is called with keywords; its text comes first
    return kwargs["encoder_hidden_states"].shape[1]


# Ernie Image's attention gets no options (the override never sees it): recomputed from its own projections.
SITES["ernie"] = {"double": BlockSite(("x",), AttentionSite("self_attention", qkv=_ernie_qkv, project=_ernie_project))}
# CogVideoX computes its joint attention inline (no attention module): the block itself is marked for the override.
SITES["cogvideox"] = {"double": BlockSite(("hidden_states", "encoder_hidden_states"),
                                          AttentionSite("", _cogvideox_patch, _cogvideox_text))}

# Boogu-Image: double blocks return (image, instruction) and are marked on their image self-attention (see the
# record); single blocks are OmniGen 2's. The image grid comes from the record's patch_size (image last).
SITES["boogu"] = {"double": BlockSite(("img_hidden_states", "instruct_hidden_states"), AttentionSite("img_self_attn")),
                  "single": BlockSite(("hidden_states",), AttentionSite("attn"))}


def _pixeldit_text(args, kwargs, image_tokens):  # MMDiTJointAttention.forward(x, y, ...): the text is y
    return (args[1] if len(args) > 1 else kwargs["y"]).shape[1]


SITES["pixeldit"] = {"double": BlockSite(("x", "y"), AttentionSite("attn", _square_patch, _pixeldit_text))}


# HiDream O1: its decoder layers return (x, K/V cache); their self-attention's one override-visible call has the
# generated rows' queries alone (the record says why).
SITES["hidream_o1"] = {"double": BlockSite(("x",), AttentionSite("self_attn", queries_are_last_rows=True))}
