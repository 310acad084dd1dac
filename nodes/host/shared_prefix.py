"""A shared prefix for equal chunks: the one module that depends on the host's forward internals
(``UNetModel._forward``'s loop), behind one switch (``only_our_patches`` / ``no_other_patches``).

A perturbed branch usually has the cond branch's inputs (same x, σ and conditioning), so up to the first
layer it perturbs it computes exactly what the cond chunk computes. That prefix is computed once and the
perturbed chunk gets a copy: UNets in a DIFFUSION_MODEL wrapper, DiTs in the block patch of every block up
to the last perturbed one. Only where no other node patches the forward: another node's patch may treat
chunks by their ``cond_or_uncond`` tag.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any

import comfy.ldm.modules.diffusionmodules.openaimodel as comfy_unet
import torch

from .attention import with_call_patches_claimed
from .marks import SETUP_KEY, STEP_KEY
from .perturbations import patched_layers
from .routing import ForwardRouting, chunk_rows, equal_chunks, no_other_patches


@dataclass(frozen=True)
class SharedPrefix:
    """How a forward's chunks share their prefix: ``kept`` are the chunks computed up to block position
    ``split`` (input blocks 0..n-1, then the middle block at n, then the output blocks), and ``source``
    gives each chunk the position in ``kept`` of the chunk whose prefix it takes."""

    kept: tuple[int, ...]
    source: tuple[int, ...]
    split: int


def shared_prefix_wrapper(executor, x, timesteps=None, context=None, y=None, control=None,
                           transformer_options={}, **kwargs):  # noqa: B006 (the host's signature)
    """DIFFUSION_MODEL wrapper of a UNet: runs the forward with a shared prefix where the forward is one
    this pack can run exactly as the host would (``_unet_forward_shared``), else the host's forward."""
    unet = executor.class_obj
    setup = transformer_options.get(SETUP_KEY)
    if setup is not None:
        transformer_options = with_call_patches_claimed(transformer_options, patched_layers(setup.stack))
    plan = None
    if control is None and not kwargs and _only_our_patches(executor, unet, transformer_options):
        plan = _shared_prefix(unet, x, timesteps, context, y, transformer_options)
    if plan is None:
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
    return _unet_forward_shared(unet, plan, x, timesteps, context, y, transformer_options)


def _only_our_patches(executor, unet, transformer_options) -> bool:
    """Whether nothing but this pack changes the forward: another node's patch or wrapper may treat the
    chunks differently (by their ``cond_or_uncond`` tag) or expect the host's own loop, so then the forward
    is left to the host."""
    if type(unet)._forward is not comfy_unet.UNetModel._forward or unet.predict_codebook_ids:
        return False
    if not host_forward_is_verified():
        return False
    if executor.idx != len(executor.wrappers) - 1:  # a wrapper inside ours would be skipped
        return False
    return no_other_patches(transformer_options)


# SHA-256 of the source of ``UNetModel._forward`` in the ComfyUI versions whose loop ``_unet_forward_shared``
# was checked against: 0.8.0, and 0.33.0 (which adds the ``middle_block_after_patch`` patch, a patch that turns
# the shared prefix off, and output blocks without a skip connection, which the loop below handles too). Any
# other source, a ComfyUI update that changed the loop, leaves the forward to the host until it is checked.
VERIFIED_UNET_FORWARD_SOURCES = frozenset({
    "72661dcee84e858e",  # ComfyUI 0.8.0
    "11e121c735e4b0eb",  # ComfyUI 0.33.0
})


@functools.cache
def unet_forward_fingerprint() -> str | None:
    """The first 16 hex digits of the SHA-256 of the host's ``UNetModel._forward`` source (None if unreadable)."""
    try:
        source = textwrap.dedent(inspect.getsource(comfy_unet.UNetModel._forward)).strip()
    except (OSError, TypeError):
        return None
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def host_forward_is_verified() -> bool:
    return unet_forward_fingerprint() in VERIFIED_UNET_FORWARD_SOURCES


def _shared_prefix(unet, x, timesteps, context, y, transformer_options) -> SharedPrefix | None:
    """Chunks whose inputs are equal (x, timestep, context, y) form a group computed once, up to the first
    block where a perturbation acts on a chunk of a group; None when no two chunks are equal or a
    perturbation acts right at the first block."""
    routing: ForwardRouting | None = transformer_options.get(STEP_KEY)
    tags = transformer_options.get("cond_or_uncond") or []
    n = len(tags)
    if routing is None or n < 2 or x.shape[0] % n:
        return None
    kept, source = equal_chunks([t for t in (x, timesteps, context, y) if t is not None], n)
    if len(kept) == n:
        return None
    positions = {(name, index): position for position, (name, index, _block) in enumerate(_unet_blocks(unet))}
    grouped = [j for j in range(n) if source.count(source[j]) > 1]
    if any(not p.layers for j in grouped for p in routing.by_index.get(tags[j], [])):
        return None  # a perturbation of the whole forward (TSG's time embedding): nothing is shared
    split = min((positions[(layer.kind, layer.index)] for j in grouped for p in routing.by_index.get(tags[j], [])
                 for layer in p.layers), default=len(positions))
    return SharedPrefix(tuple(kept), tuple(source), split) if split > 0 else None


def _unet_blocks(unet) -> list[tuple[str, int, Any]]:
    """The UNet's blocks in forward order, as (name, index, block): a block's position in this list is the
    ``split`` position of SharedPrefix."""
    return ([("input", i, block) for i, block in enumerate(unet.input_blocks)] + [("middle", 0, unet.middle_block)]
            + [("output", i, block) for i, block in enumerate(unet.output_blocks)])


def _unet_forward_shared(unet, plan: SharedPrefix, x, timesteps, context, y, transformer_options):
    """The host's UNet forward (UNetModel._forward less its patch and ControlNet hooks, which
    ``_only_our_patches`` ruled out), on the ``kept`` chunks up to position ``plan.split`` and on every
    chunk from there. The ``cond_or_uncond`` tags follow the chunks computed, for the attention patches."""
    tags = transformer_options["cond_or_uncond"]
    size = x.shape[0] // len(tags)
    kept_rows, spread_rows = (chunk_rows(chunks, size, x.device) for chunks in (plan.kept, plan.source))
    emb = unet.time_embed(comfy_unet.timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(x.dtype))
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)
    h, hs = x.index_select(0, kept_rows), []
    emb_now = emb.index_select(0, kept_rows)
    context_now = None if context is None else context.index_select(0, kept_rows)
    transformer_options["cond_or_uncond"] = [tags[j] for j in plan.kept]
    transformer_options["original_shape"] = list(h.shape)
    transformer_options["transformer_index"] = 0
    blocks = _unet_blocks(unet)
    try:
        for position, (name, index, block) in enumerate(blocks):
            if position == plan.split:  # from here every chunk runs on its own, from a copy of its source's state
                h, hs = h.index_select(0, spread_rows), [t.index_select(0, spread_rows) for t in hs]
                emb_now, context_now = emb, context
                transformer_options["cond_or_uncond"], transformer_options["original_shape"] = tags, list(x.shape)
            transformer_options["block"] = (name, index)
            output_shape = None
            if name == "output":
                skip = hs.pop()
                if skip is not None:  # ComfyUI 0.33.0 allows output blocks without a skip connection
                    h = torch.cat([h, skip], dim=1)
                output_shape = hs[-1].shape if hs else None
            if block is not None:
                h = comfy_unet.forward_timestep_embed(block, h, emb_now, context_now, transformer_options, output_shape,
                                                      num_video_frames=unet.default_num_video_frames)
            if name == "input":
                hs.append(h)
        out = unet.out(h.type(x.dtype))
        return out if plan.split < len(blocks) else out.index_select(0, spread_rows)
    finally:
        transformer_options["cond_or_uncond"] = tags


def once_per_equal_chunk(original, args: dict, transformer_options: dict) -> dict:
    """A DiT block no perturbation acts on: chunks whose inputs are all equal are computed once, and each
    gets a copy of its group's output. The block's batched inputs are the tensors (also inside tuples, as
    some families pass modulations and rotary embeddings, and inside dataclasses, as Flux.2 and Chroma pass
    theirs) whose first dimension is the batch."""
    tags = transformer_options.get("cond_or_uncond") or []
    n, batch = len(tags), batch_size_of(args["img"])
    if n < 2 or batch % n or STEP_KEY not in transformer_options or not no_other_patches(transformer_options):
        return original(args)
    inputs = {key: value for key, value in args.items() if key != "transformer_options"}
    if not rows_follow_the_batch(inputs, batch) or closure_holds_batch(original, batch):
        return original(args)
    kept, source = equal_chunks(list(batched_tensors(inputs, batch)), n)
    if len(kept) == n:
        return original(args)
    size = batch // n
    device = next(batched_tensors(args["img"], batch)).device
    kept_rows, spread_rows = (chunk_rows(chunks, size, device) for chunks in (kept, source))
    transformer_options["cond_or_uncond"] = [tags[j] for j in kept]
    try:
        out = original({**select_rows(inputs, kept_rows, batch), "transformer_options": transformer_options})
    finally:
        transformer_options["cond_or_uncond"] = tags
    return select_rows(out, spread_rows, len(kept) * size)


def batch_size_of(img) -> int:
    """The batch of a block's ``img``: a tensor, or a tuple of streams (LTX-2's video and audio tokens)."""
    return (img[0] if isinstance(img, (tuple, list)) else img).shape[0]


def batched_tensors(value, batch: int):
    """The tensors in ``value`` (nested dicts, tuples, lists and dataclass instances) whose first dimension is
    ``batch``."""
    if isinstance(value, torch.Tensor):
        if value.ndim and value.shape[0] == batch:
            yield value
    elif isinstance(value, (dict, tuple, list)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from batched_tensors(item, batch)
    elif _is_dataclass_instance(value):
        for f in dataclasses.fields(value):
            yield from batched_tensors(getattr(value, f.name), batch)


def _is_dataclass_instance(value) -> bool:
    # Flux.2's global modulations and Chroma's per-block ones reach the blocks as ModulationOut dataclasses
    # (shift, scale, gate), each (B, 1, D): the batch is in them too.
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def closure_holds_batch(block_function, batch: int) -> bool:
    """Whether the host's block function (the patch's ``original_block``) holds a tensor of the batch in its
    closure: the block then gets an input the patch's args do not carry (HuMo's ``block_wrap`` hands its blocks
    the audio tokens that way, comfy/ldm/wan/model.py HumoWanModel.forward_orig), so it cannot run on a subset
    of the chunks, whose rows ``select_rows`` could take from the args only."""
    for cell in getattr(block_function, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # a cell not filled yet
            continue
        if next(batched_tensors(value, batch), None) is not None or not rows_follow_the_batch(value, batch):
            return True
    return False


def rows_follow_the_batch(value, batch: int) -> bool:
    """Whether no tensor in ``value`` has a multiple of ``batch`` rows other than ``batch``: such a tensor
    holds the batch in a layout of its own (Qwen-Image Edit 2511's modulation: the batch's timesteps, then
    zeros for its reference tokens), whose rows ``select_rows`` would not take; nor is one the attribute of an
    object ``select_rows`` does not look into (ComfyUI 0.33.0's LTX-2 CompressedTimestep: per-frame
    timestep embeddings with the batch, in a class of its own)."""
    if isinstance(value, torch.Tensor):
        return not (value.ndim and value.shape[0] > batch and value.shape[0] % batch == 0)
    if isinstance(value, (dict, tuple, list)):
        items = value.values() if isinstance(value, dict) else value
        return all(rows_follow_the_batch(item, batch) for item in items)
    if _is_dataclass_instance(value):
        return all(rows_follow_the_batch(getattr(value, f.name), batch) for f in dataclasses.fields(value))
    return not any(isinstance(attribute, torch.Tensor) and attribute.ndim and attribute.shape[0] % batch == 0
                   for attribute in _attributes(value))


def _attributes(value) -> list:
    """The attribute values of a plain object (its ``__dict__`` or ``__slots__``); none for anything else."""
    if isinstance(value, (str, bytes, int, float, bool, type)) or value is None:
        return []
    names = list(getattr(value, "__dict__", {}))
    for cls in type(value).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        names.extend([slots] if isinstance(slots, str) else slots)
    return [getattr(value, name) for name in names if hasattr(value, name)]


def select_rows(value, rows: torch.Tensor, batch: int):
    """``value`` with ``rows`` taken from every tensor in it whose first dimension is ``batch``."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows) if value.ndim and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {key: select_rows(item, rows, batch) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        items = [select_rows(item, rows, batch) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # a namedtuple or not
    if _is_dataclass_instance(value):
        return dataclasses.replace(value, **{f.name: select_rows(getattr(value, f.name), rows, batch)
                                             for f in dataclasses.fields(value) if f.init})
    return value

