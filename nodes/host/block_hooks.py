"""Block forward hooks: the DiT block mechanism for families whose forward has no working ``dit`` block replace
patch (their record lists ``families.BLOCK_FORWARD_HOOKS`` instead of ``DIT_BLOCK_REPLACE``).

Lumina 2 / Z-Image (``comfy/ldm/lumina/model.py``) call their main blocks with no replace patch at all, and
Kandinsky 5's (``comfy/ldm/kandinsky5/model.py``) calls the block with keywords (``x=``, ``context=``) its
forward does not take, so any patch there fails (``kandinsky5_block_patch_works`` checks that on the host).
For those a ``DIFFUSION_MODEL`` wrapper puts a forward pre-hook and a forward hook on each block the stack
perturbs, for that one forward, and removes them when it ends (also when it raises). They do what
``dit_blocks``' patch does, on the block's own call: mark the block for the attention override (its first
attention call is its self or joint attention), with the image tokens' grid, zero the skipped sublayers' rows,
and give a skipped chunk its input back as the block's output. The host's own code is left as it is.
"""

from __future__ import annotations

import inspect
import math

import torch
from comfy.patcher_extension import WrappersMP

from ...guidance_core.tokens import TokenGrid
from . import families
from .dit_blocks import _sublayer_skip_hooks
from .layers import Layer
from .marks import ACTIVE_LAYER_KEY, SETUP_KEY, STEP_KEY, WRAPPER_KEY
from .perturbations import AttentionPerturbation, BlockSkip, patched_layers
from .routing import ActiveBlock, chunk_perturbations, patch_grid


def uses_block_hooks(family: str) -> bool:
    """Whether the family's blocks are perturbed through forward hooks (its record says so)."""
    record = families.FAMILY_BY_KEY.get(family)
    return record is not None and families.BLOCK_FORWARD_HOOKS in record.hooks


def kandinsky5_block_patch_works() -> bool:
    """Whether the host's Kandinsky 5 ``dit`` block patch could call its block: ``forward_orig``'s
    ``block_wrap`` calls ``block(x=, context=, time_embed=, freqs=)``, and in ComfyUI 0.8.0 and 0.33.0
    ``TransformerDecoderBlock.forward`` takes ``visual_embed`` and ``text_embed`` instead (a TypeError)."""
    import comfy.ldm.kandinsky5.model as kandinsky5

    parameters = inspect.signature(kandinsky5.TransformerDecoderBlock.forward).parameters
    return {"x", "context", "time_embed", "freqs"} <= parameters.keys()


def hooks_installed(transformer_options: dict) -> bool:
    """Whether this model's forwards run our block hooks wrapper (so its DiT layers carry no block patch)."""
    wrappers = transformer_options.get("wrappers", {}).get(WrappersMP.DIFFUSION_MODEL, {}).get(WRAPPER_KEY, [])
    return any(wrapper is block_hooks_wrapper for wrapper in wrappers)


def block_hooks_wrapper(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: the perturbed blocks' hooks live exactly as long as this forward."""
    transformer_options = next((value for value in list(args) + list(kwargs.values())
                                if isinstance(value, dict) and "cond_or_uncond" in value), None)
    setup = transformer_options.get(SETUP_KEY) if transformer_options is not None else None
    if setup is None or STEP_KEY not in transformer_options:
        return executor(*args, **kwargs)
    diffusion_model = executor.class_obj
    record = families.family_of_class(type(diffusion_model))
    handles = []
    try:
        for layer in patched_layers(setup.stack):
            if layer.is_dit and layer.kind in record.block_lists:
                block = getattr(diffusion_model, record.block_lists[layer.kind])[layer.index]
                handles.extend(_hook_block(block, layer, record, diffusion_model))
        return executor(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


def _hook_block(block, layer: Layer, record: families.ModelFamily, diffusion_model) -> list:
    calls = []  # per block call: the sublayer hooks and the skipped chunks' inputs, from pre-hook to hook

    def before(module, args, kwargs):
        transformer_options = kwargs.get("transformer_options") or {}
        chunks = chunk_perturbations(transformer_options, layer)
        if not any(chunks):
            calls.append(None)
            return None
        x = args[0]
        n = len(chunks)
        skipped = {j: x.chunk(n)[j].clone() for j, c in enumerate(chunks) if any(isinstance(p, BlockSkip) for p in c)}
        calls.append((_sublayer_skip_hooks(transformer_options, record.key, layer, chunks), skipped, n))
        attention_chunks = [[p for p in c if isinstance(p, AttentionPerturbation)] for c in chunks]
        if not any(attention_chunks):
            return None
        grid = image_grid(record, diffusion_model, x.shape[1], transformer_options[STEP_KEY].latent_shape)
        marked = dict(transformer_options)
        marked[ACTIVE_LAYER_KEY] = ActiveBlock(layer, attention_chunks, grid.start, record.text_position, grid=grid)
        return args, {**kwargs, "transformer_options": marked}

    def after(module, args, kwargs, output):
        call = calls.pop()
        if call is None:
            return None
        handles, skipped, n = call
        for handle in handles:
            handle.remove()
        if not skipped:
            return None
        parts = list(output.chunk(n))
        for j, kept in skipped.items():
            parts[j] = kept
        return torch.cat(parts)

    return [block.register_forward_pre_hook(before, with_kwargs=True),
            block.register_forward_hook(after, with_kwargs=True, always_call=True)]


def image_grid(record: families.ModelFamily, diffusion_model, tokens: int, latent_shape: tuple) -> TokenGrid:
    """The image tokens of a block's self-attention sequence of ``tokens`` tokens, from the latent and the
    family's patch (``record.patch_size``), never guessed from the token count: a NextDiT pads the image
    tokens to its ``pad_tokens_multiple`` (Z-Image: 32), and its sequence ends with the image (Z-Image Omni
    puts reference images and their captions before it), so everything before it is text."""
    grid = patch_grid(latent_shape, record.patch_size, 0)
    if record.text_position == families.NO_TEXT:
        return grid
    multiple = getattr(diffusion_model, "pad_tokens_multiple", None) or 1
    padded = math.ceil(grid.frames * grid.height * grid.width / multiple) * multiple
    return TokenGrid(tokens - padded, grid.height, grid.width, grid.frames)
