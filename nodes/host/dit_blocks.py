"""The DiT ``dit`` block replace patch: block skip (SLG/STG block mode), sublayer skip through forward hooks
alive for one block call, and marking the block for the attention override. A block whose ``img`` is a tuple
of streams (LTX-2: video and audio; the record's ``block_streams``) is perturbed on its first stream only: the
other streams leave it as the unperturbed block gives them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ...guidance_core.condition_free import shuffle_tokens
from . import families
from .layers import Layer
from .marks import ACTIVE_LAYER_KEY, STEP_KEY, TEXT_TOKENS_KEY, mark_ours
from .module_hooks import sublayer_skip_hooks
from .perturbations import AttentionPerturbation, BlockSkip, TokenShuffle
from .routing import (
    ActiveBlock,
    chunk_perturbations,
    chunk_rows,
    equal_chunks,
    image_latent_shape,
    no_other_patches,
    patch_grid,
)
from .shared_prefix import (
    batch_size_of,
    batched_tensors,
    closure_holds_batch,
    once_per_equal_chunk,
    rows_follow_the_batch,
    select_rows,
)


def make_dit_block_patch(layer: Layer, previous: Callable | None, family: str):
    """A ``dit`` block replace patch for ``layer`` of a ``family`` model: where the text tokens sit in the
    block's self-attention sequence (its family record's ``text_position``), so only the image tokens are
    perturbed, and which modules are its sublayers (the record's ``sublayers``)."""
    record = families.FAMILY_BY_KEY[family]
    text_position = record.text_position
    streams = len(record.block_streams) > 1  # img is (perturbed stream, other streams...)

    def block_replace(args, extra):
        original = extra["original_block"]
        if previous is not None:
            inner = original

            def original(block_args):  # noqa: F811 (compose with the patch that was here before)
                return previous(block_args, {"original_block": inner})

        transformer_options = args.get("transformer_options") or {}
        chunks = chunk_perturbations(transformer_options, layer)
        if not any(chunks):
            return original(args) if previous is not None else once_per_equal_chunk(original, args, transformer_options)
        only_skips = all(isinstance(p, BlockSkip) for c in chunks for p in c)
        # Another node's patch may count on every chunk being computed: then the skipped ones are computed too.
        # So are they where the block has other streams, which leave the block as it computes them.
        if only_skips and not streams and previous is None and no_other_patches(transformer_options) and (
                rows_follow_the_batch({key: value for key, value in args.items() if key != "transformer_options"},
                                      batch_size_of(args["img"]))) and (
                not closure_holds_batch(original, batch_size_of(args["img"]))):
            return _without_skipped_chunks(original, args, transformer_options, chunks)
        attention_chunks = [[p for p in c if isinstance(p, AttentionPerturbation)] for c in chunks]
        call_args = args
        if any(attention_chunks):
            text_tokens = 0
            if text_position != families.NO_TEXT:
                text_tokens = _text_tokens(args, transformer_options, record)
            marked = dict(transformer_options)
            # A fresh call counter per block call: only the block's first attention call is perturbed.
            grid = None
            if record.patch_size is not None and text_position != families.TEXT_AFTER_IMAGE:
                # The image right after the text; reference-image tokens after it (Qwen-Image Edit) stay as they are.
                grid = patch_grid(image_latent_shape(transformer_options), record.patch_size, text_tokens)
                grid = _after_reference_tokens(grid, args, transformer_options, record)
            elif record.patch_size_attribute and text_position == families.TEXT_AFTER_IMAGE:
                # The image first; reference-image tokens after it (JoyImage-Edit), then the text, stay as they are.
                patch = tuple(getattr(transformer_options[STEP_KEY].diffusion_model, record.patch_size_attribute))
                grid = patch_grid(image_latent_shape(transformer_options), patch, 0)
            marked[ACTIVE_LAYER_KEY] = ActiveBlock(layer, attention_chunks, text_tokens, text_position, grid=grid)
            call_args = dict(args)
            call_args["transformer_options"] = marked
        n = len(chunks)
        skipped = [j for j, c in enumerate(chunks) if any(isinstance(p, BlockSkip) for p in c)]
        # Copies, taken before the call: some blocks (Flux, LTX-2) update their inputs in place.
        kept_inputs = {key: {j: _perturbed_stream(args[key]).chunk(n)[j].clone() for j in skipped}
                       for key in ("img", "txt") if args.get(key) is not None}
        touched = [j for j, c in enumerate(chunks)
                   if any(not isinstance(p, BlockSkip) and not getattr(p, "all_streams", False) for p in c)]
        other_streams = (_unperturbed_other_streams(original, args, transformer_options, chunks, touched)
                         if streams and touched else None)
        if any(isinstance(p, TokenShuffle) for c in chunks for p in c):
            call_args = {**call_args, "img": _tokens_shuffled(args, transformer_options, record, layer, chunks)}
        hooks = sublayer_skip_hooks(transformer_options[STEP_KEY].diffusion_model, family, layer, chunks)
        try:
            out = original(call_args)
        finally:
            for hook in hooks:
                hook.remove()
        if other_streams is not None:
            out = other_streams(out)
        if skipped:
            out = dict(out)
            for key, inputs in kept_inputs.items():
                if out.get(key) is not None:
                    parts = list(_perturbed_stream(out[key]).chunk(n))
                    for j, kept in inputs.items():
                        parts[j] = kept
                    out[key] = _with_perturbed_stream(out[key], torch.cat(parts))
        return out

    return mark_ours(block_replace, previous)


def _tokens_shuffled(args: dict, transformer_options: dict, record: families.ModelFamily, layer: Layer,
                     chunks: list[list]):
    """The block's ``img`` with the image tokens of each TPG chunk's rows shuffled (TokenShuffle): the whole
    image stream where the text comes as ``txt`` of its own (double and joint blocks, Wan, LTXV), else the
    sequence less its text tokens (single blocks of one ``[text, image]`` sequence). Reference-image tokens in
    the image stream (Flux Kontext, Qwen-Image Edit) are shuffled with it: TPG perturbs every token the block's
    image stream holds, as the authors do the UNet block's hidden states."""
    stream = _perturbed_stream(args["img"])
    tokens = stream.shape[1]
    start, count = 0, tokens
    if args.get("txt") is None and record.text_position != families.NO_TEXT:
        text = _text_tokens(args, transformer_options, record)
        count = tokens - text
        start = text if record.text_position == families.TEXT_BEFORE_IMAGE else 0
    n, step = len(chunks), transformer_options[STEP_KEY].step
    size = stream.shape[0] // n
    shuffled = stream.clone()
    for j, chunk in enumerate(chunks):
        for shuffle in (p for p in chunk if isinstance(p, TokenShuffle)):
            rows = slice(j * size, (j + 1) * size)
            permutation = shuffle.permutation(count, step, layer, stream.device)
            shuffled[rows] = shuffle_tokens(shuffled[rows], permutation, start)
    return _with_perturbed_stream(args["img"], shuffled)


def _after_reference_tokens(grid, args: dict, transformer_options: dict, record: families.ModelFamily):
    """``grid`` moved past the reference-image tokens a family puts before the image's (the record's
    ``reference_tokens_before``: Wan Fun 1.1's ``ref_conv`` tokens, comfy/ldm/wan/model.py forward_orig): the
    sequence's tokens beyond the text and the image's own are those."""
    module = record.reference_tokens_before
    if not module or getattr(transformer_options[STEP_KEY].diffusion_model, module, None) is None:
        return grid
    extra = _perturbed_stream(args["img"]).shape[1] - grid.start - grid.frames * grid.height * grid.width
    return dataclasses.replace(grid, start=grid.start + extra) if extra > 0 else grid


def _perturbed_stream(value):
    """The stream a perturbation acts on: ``value`` itself, or the first of a block's tuple of streams."""
    return value[0] if isinstance(value, (tuple, list)) else value


def _with_perturbed_stream(value, stream: torch.Tensor):
    """``value`` with its perturbed stream replaced by ``stream`` (a tuple of streams keeps the others)."""
    return (stream, *value[1:]) if isinstance(value, (tuple, list)) else stream


def _unperturbed_other_streams(original, args: dict, transformer_options: dict, chunks: list[list],
                               touched: list[int]) -> Callable[[dict], dict]:
    """For a block with several streams whose ``touched`` chunks are perturbed inside it (attention, sublayers):
    a function that gives the block's output with those chunks' other streams (LTX-2's audio) as the
    unperturbed block computes them. The perturbed stream reaches the others inside the block (LTX-2's
    video-to-audio cross-attention reads the video after its self-attention), so they are taken from a chunk
    with the same inputs that nothing perturbs when there is one (no extra work: the perturbed branch
    usually shares the cond's inputs up to its first perturbed block), else from the block run once more,
    unperturbed, on the touched chunks' rows (or on every row, where some input holds the batch in a form
    whose rows cannot be taken: ComfyUI 0.33.0's CompressedTimestep). Everything is read or copied now,
    before the block updates its inputs in place."""
    n = len(chunks)
    inputs = {key: value for key, value in args.items() if key != "transformer_options"}
    batch = batch_size_of(args["img"])
    rows_selectable = rows_follow_the_batch(inputs, batch)
    twins: dict[int, int] = {}
    if rows_selectable:
        _kept, source = equal_chunks(list(batched_tensors(inputs, batch)), n)
        for j in touched:
            twin = next((i for i in range(n) if i not in touched and source[i] == source[j]), None)
            if twin is not None:
                twins[j] = twin
    rest = [j for j in touched if j not in twins]
    device = _perturbed_stream(args["img"]).device
    if not rest:
        rerun = None
    elif rows_selectable:
        rerun = select_rows(inputs, chunk_rows(rest, batch // n, device), batch)
    else:
        rerun = {**inputs, "img": tuple(stream.clone() for stream in args["img"])}

    def with_other_streams(out: dict) -> dict:
        parts = [list(stream.chunk(n)) for stream in out["img"][1:]]
        for j, i in twins.items():
            for stream_parts in parts:
                stream_parts[j] = stream_parts[i]
        if rerun is not None:
            tags = transformer_options.get("cond_or_uncond") or []
            if rows_selectable:
                transformer_options["cond_or_uncond"] = [tags[j] for j in rest]
            try:
                again = original({**rerun, "transformer_options": transformer_options})["img"]
            finally:
                transformer_options["cond_or_uncond"] = tags
            for stream_parts, stream in zip(parts, again[1:], strict=True):
                pieces = stream.chunk(len(rest) if rows_selectable else n)
                for k, j in enumerate(rest):
                    stream_parts[j] = pieces[k] if rows_selectable else pieces[j]
        return {**out, "img": (out["img"][0], *(torch.cat(stream_parts) for stream_parts in parts))}

    return with_other_streams


def _text_tokens(args: dict, transformer_options: dict, record: families.ModelFamily) -> int:
    """How many text tokens the block's self-attention sequence holds. Its ``txt``, of which Mochi attends
    to the first ``num_tokens`` only (the prompt without padding); single blocks carry no ``txt``: the count
    the forward began with, plus the register tokens a family prepends to the text (AuraFlow)."""
    text = args.get("txt")
    if text is not None:
        return min(text.shape[1], args.get("num_tokens", text.shape[1]))
    tokens = transformer_options.get(TEXT_TOKENS_KEY, 0)
    if record.register_tokens:
        registers = getattr(transformer_options[STEP_KEY].diffusion_model, record.register_tokens)
        tokens += registers.shape[1]
    return tokens


def _without_skipped_chunks(original, args: dict, transformer_options: dict, chunks: list[list]) -> dict:
    """A DiT block whose only perturbation is skipping it for some chunks: the other chunks are computed
    (the block's work for a skipped chunk would be thrown away), the skipped ones pass their inputs on."""
    tags = transformer_options.get("cond_or_uncond") or []
    n, batch = len(chunks), args["img"].shape[0]
    computed = [j for j, c in enumerate(chunks) if not c]
    passed = {key: args[key] for key in ("img", "txt") if args.get(key) is not None}
    if not computed:
        return passed
    rows = chunk_rows(computed, batch // n, args["img"].device)
    inputs = {key: value for key, value in args.items() if key != "transformer_options"}
    transformer_options["cond_or_uncond"] = [tags[j] for j in computed]
    try:  # the selected rows are copies: blocks that update their inputs in place (Flux) leave args alone
        out = original({**select_rows(inputs, rows, batch), "transformer_options": transformer_options})
    finally:
        transformer_options["cond_or_uncond"] = tags
    result = dict(out)
    for key, kept in passed.items():
        if out.get(key) is not None:
            result[key] = kept.clone()
            result[key][rows] = out[key]
    return result

