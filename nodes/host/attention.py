"""The attention hooks, side by side: the UNet ``attn1`` replace patch and the DiT attention override
(``optimized_attention_override``), each perturbing only its own chunks' image tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import comfy.ldm.modules.attention as comfy_attention
import torch

from . import families
from .layers import Layer
from .marks import ACTIVE_LAYER_KEY, IMAGE_LATENT_SHAPE_KEY, STEP_KEY, TEXT_TOKENS_KEY, is_ours, mark_ours
from .perturbations import AttentionPerturbation
from .routing import apply_chunked, chunk_perturbations, grid_for, image_latent_shape, perturbed_attention


def make_unet_attn1_patch(previous: Callable | None):
    """Our attn1 replace patch; ``previous`` is another node's patch on the same transformer, which attends
    for every chunk we do not perturb (and inside perturbations that attend), seeing only those chunks'
    ``cond_or_uncond`` tags, so a patch that picks a chunk by its tag (SelfAttentionGuidance records the
    uncond's attention map) finds it."""

    def attn1_replace(q, k, v, extra_options):
        block = extra_options.get("block")
        layer = Layer(block[0], block[1], extra_options.get("block_index", 0))
        # Only attention perturbations act here: TPG's token shuffle on the same layer acts at the block's input.
        chunks = [[p for p in c if isinstance(p, AttentionPerturbation)]
                  for c in chunk_perturbations(extra_options, layer)]
        heads = extra_options["n_heads"]

        theirs = previous

        def attend_flat(q_, k_, v_, which=slice(None)):  # (B, L, heads·D) in and out, as ComfyUI hands them
            if theirs is not None:
                return theirs(q_, k_, v_, _options_for_chunks(extra_options, which))
            precision = extra_options.get("attn_precision")
            return comfy_attention.optimized_attention(
                q_, k_, v_, heads, attn_precision=precision, transformer_options=extra_options)

        if not any(chunks):
            return attend_flat(q, k, v)

        routing = extra_options.get(STEP_KEY)
        grid = grid_for(q.shape[1], routing.latent_shape)

        def perturb_chunk(perturbation, q_, k_, v_, which):
            def attend_heads(qh, kh, vh):  # for perturbations, which work on (B, heads, L, D)
                return _to_heads(attend_flat(_from_heads(qh), _from_heads(kh), _from_heads(vh), which), heads)

            q4, k4, v4 = (_to_heads(t, heads) for t in (q_, k_, v_))
            out = perturbed_attention(perturbation, q4, k4, v4, grid, attend_heads, routing.scratch)
            if perturbation.records and theirs is not None:
                # An observer leaves the output as it is: here that is the other node's patch's output (it
                # may record too, as SelfAttentionGuidance does on the uncond chunk).
                return attend_flat(q_, k_, v_, which)
            return _from_heads(out)

        # Untouched chunks stay in the flat layout (no reshape to heads and back): only a perturbed
        # chunk is viewed as heads, as perturbations expect.
        return apply_chunked(q, k, v, chunks, attend_flat, perturb_chunk)

    return mark_ours(attn1_replace, previous)


def _options_for_chunks(extra_options: dict, which: slice) -> dict:
    """``extra_options`` as a patch sees them when handed only the chunks ``which`` of the batch."""
    if which == slice(None):
        return extra_options
    options = dict(extra_options)
    for key in ("cond_or_uncond", "uuids"):
        if isinstance(options.get(key), list):
            options[key] = options[key][which]
    return options


def _to_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, heads·D), or (B, L, heads, D) as MMDiT passes its values, to (B, heads, L, D)."""
    b, length = t.shape[:2]
    return t.reshape(b, length, heads, -1).transpose(1, 2)


def _from_heads(t: torch.Tensor) -> torch.Tensor:
    b, heads, length, dim = t.shape
    return t.transpose(1, 2).reshape(b, length, heads * dim)


def text_tokens_wrapper(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: records the text token count, which Flux's single blocks (text and image
    tokens in one stream) do not carry, so their image tokens can be found; and, where the model is handed
    a list of latents (the sampler's packed latent unpacked: LTX-2's video and audio), the first one's shape,
    which the packed latent's does not give."""
    context = args[2] if len(args) > 2 else kwargs.get("context")
    latents = args[0] if args else kwargs.get("x")
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, dict) and "cond_or_uncond" in value:
            if context is not None:
                value[TEXT_TOKENS_KEY] = context.shape[1]
            if isinstance(latents, (list, tuple)) and latents and isinstance(latents[0], torch.Tensor):
                value[IMAGE_LATENT_SHAPE_KEY] = tuple(latents[0].shape)
    return executor(*args, **kwargs)


# optimized_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False)
_ATTENTION_ARGUMENTS_AFTER_HEADS = ("mask", "attn_precision", "skip_reshape", "skip_output_reshape")


def make_attention_override(previous: Callable | None):
    def attention_override(func, *args, **kwargs):
        transformer_options = kwargs.get("transformer_options") or {}
        active = transformer_options.get(ACTIVE_LAYER_KEY)
        call = (lambda *a, **kw: previous(func, *a, **kw)) if previous is not None else func
        if active is None:
            return call(*args, **kwargs)
        chunks, text_tokens, text_position = active.chunks, active.text_tokens, active.text_position
        active.attention_calls += 1
        if active.attention_calls > 1:
            # Every DiT block runs its self (or joint) attention first; later calls are cross-attention
            # (Wan) or extra attentions, which token counts alone cannot tell apart when they coincide.
            return call(*args, **kwargs)
        q, k, v, heads = args[0], args[1], args[2], args[3] if len(args) > 3 else kwargs["heads"]
        # Arguments after heads may come by position (Qwen-Image and MageFlow pass their mask so, through
        # optimized_attention_masked): named here, so the calls made below keep them.
        named = {**dict(zip(_ATTENTION_ARGUMENTS_AFTER_HEADS, args[4:], strict=False)), **kwargs}
        rest = {key: val for key, val in named.items() if key not in ("skip_reshape", "skip_output_reshape", "heads")}
        skip_reshape = named.get("skip_reshape", False)
        skip_output_reshape = named.get("skip_output_reshape", False)
        q4, k4, v4 = (t if skip_reshape else _to_heads(t, heads) for t in (q, k, v))
        prefix = 0
        if active.queries_are_last_rows and q4.shape[2] < k4.shape[2]:
            # The queries of the sequence's last rows (HiDream O1): placed at their positions, the rows before them
            # zero (their outputs are dropped), so the perturbation sees the whole sequence's layout.
            prefix = k4.shape[2] - q4.shape[2]
            q4 = torch.cat([q4.new_zeros((*q4.shape[:2], prefix, q4.shape[3])), q4], dim=2)
        if q4.shape[2] != k4.shape[2]:  # cross-attention: not the image tokens' self-attention
            return call(*args, **kwargs)

        batch, chunk_size = q4.shape[0], q4.shape[0] // len(chunks)

        def attend(q_, k_, v_, which=None):
            return call(q_, k_, v_, heads, skip_reshape=True, skip_output_reshape=True,
                        **_options_for_rows(rest, which, batch, chunk_size))

        routing = transformer_options.get(STEP_KEY)
        grid = active.grid if active.grid is not None else grid_for(
            q4.shape[2], image_latent_shape(transformer_options), text_tokens,
            text_position != families.TEXT_AFTER_IMAGE)

        def perturb_chunk(perturbation, q_, k_, v_, which):
            if k_.shape[1] < q_.shape[1]:  # grouped-query attention (enable_gqa): each key/value head serves a group
                k_, v_ = (t.repeat_interleave(q_.shape[1] // t.shape[1], dim=1) for t in (k_, v_))

            def attend_these_rows(qc, kc, vc, _which=None):
                return attend(qc, kc, vc, which)

            return perturbed_attention(perturbation, q_, k_, v_, grid, attend_these_rows, routing.scratch)

        out = apply_chunked(q4, k4, v4, chunks, attend, perturb_chunk)[:, :, prefix:]
        return out if skip_output_reshape else _from_heads(out)

    return mark_ours(attention_override, previous)



def _options_for_rows(options: dict, which: slice | None, batch: int, chunk_size: int) -> dict:
    """The attention call's other arguments for the chunks ``which`` only: a mask with a row per batch entry
    (Lens passes its joint text mask as (B, 1, 1, L)) keeps the rows of those chunks."""
    mask = options.get("mask")
    if which is None or not isinstance(mask, torch.Tensor) or mask.ndim < 3 or mask.shape[0] != batch or batch == 1:
        return options
    return {**options, "mask": mask[which.start * chunk_size:which.stop * chunk_size]}


def claim_unet_attn1(attn1_patches: dict, layers: list[Layer]) -> None:
    """Puts our attn1 patch on every key ComfyUI looks up for our UNet layers, wrapping what another node put
    there. The UNet looks up ``(block, index, transformer)`` before ``(block, index)``, so a node's patch on
    one transformer (SelfAttentionGuidance: ``('middle', 0, 0)``) would shadow ours on the whole block, and
    ours on one transformer would shadow theirs on the block: ours goes on every such key, and calls theirs,
    the one ComfyUI would have called there without us."""
    for layer in layers:
        if layer.is_dit:
            continue
        block = (layer.kind, layer.index)
        if layer.sub is not None:
            keys = [block + (layer.sub,)]
        else:
            keys = [block] + [key for key in attn1_patches if len(key) == 3 and key[:2] == block]
        for key in keys:
            current = attn1_patches.get(key)
            theirs = current.__comfyui_guiders_wraps__ if is_ours(current) else current
            if theirs is None and len(key) == 3:  # nothing on the transformer: the block's patch applies there
                block_patch = attn1_patches.get(block)
                theirs = block_patch.__comfyui_guiders_wraps__ if is_ours(block_patch) else block_patch
            if not is_ours(current) or current.__comfyui_guiders_wraps__ is not theirs:
                attn1_patches[key] = make_unet_attn1_patch(theirs)


def with_call_patches_claimed(transformer_options: dict, layers: list[Layer]) -> dict:
    """The options of one forward with ours claiming, for this forward, patches another node added only to its
    own call's options (PerturbedAttentionGuidance puts ``('middle', 0)`` in the options of its perturbed
    call, which ours on ``('middle', 0, 0)`` would shadow). Unchanged (the same dict) when nothing needs it."""
    attn1 = transformer_options.get("patches_replace", {}).get("attn1", {})
    claimed = dict(attn1)
    claim_unet_attn1(claimed, layers)
    if all(claimed.get(key) is attn1.get(key) for key in claimed):
        return transformer_options
    patches_replace = {**transformer_options["patches_replace"], "attn1": claimed}
    return {**transformer_options, "patches_replace": patches_replace}
