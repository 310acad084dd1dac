"""The DiT ``dit`` block replace patch: block skip (SLG/STG block mode), sublayer skip through forward hooks
alive for one block call, and marking the block for the attention override.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import families
from .layers import Layer
from .marks import ACTIVE_LAYER_KEY, STEP_KEY, TEXT_TOKENS_KEY, mark_ours
from .perturbations import AttentionPerturbation, BlockSkip, SublayerSkip, sublayer_modules
from .routing import ActiveBlock, chunk_perturbations, chunk_rows, no_other_patches, patch_grid
from .shared_prefix import batch_outside_args, once_per_equal_chunk, rows_follow_the_batch, select_rows


def make_dit_block_patch(layer: Layer, previous: Callable | None, family: str):
    """A ``dit`` block replace patch for ``layer`` of a ``family`` model: where the text tokens sit in the
    block's self-attention sequence (its family record's ``text_position``), so only the image tokens are
    perturbed, and which modules are its sublayers (the record's ``sublayers``)."""
    record = families.FAMILY_BY_KEY[family]
    text_position = record.text_position

    def block_replace(args, extra):
        original = extra["original_block"]
        if previous is not None:
            inner = original

            def original(block_args):  # noqa: F811 (compose with the patch that was here before)
                return previous(block_args, {"original_block": inner})

        transformer_options = args.get("transformer_options") or {}
        chunks = chunk_perturbations(transformer_options, layer)
        # Fewer rows than the batch only where every batched input of the block is in ``args``.
        rows_in_args = not batch_outside_args(extra["original_block"], args["img"].shape[0])
        if not any(chunks):
            if previous is not None or not rows_in_args:
                return original(args)
            return once_per_equal_chunk(original, args, transformer_options)
        only_skips = all(isinstance(p, BlockSkip) for c in chunks for p in c)
        # Another node's patch may count on every chunk being computed: then the skipped ones are computed too.
        if only_skips and previous is None and rows_in_args and no_other_patches(transformer_options) and \
                rows_follow_the_batch({key: value for key, value in args.items() if key != "transformer_options"},
                                      args["img"].shape[0]):
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
                grid = patch_grid(transformer_options[STEP_KEY].latent_shape, record.patch_size, text_tokens)
            marked[ACTIVE_LAYER_KEY] = ActiveBlock(layer, attention_chunks, text_tokens, text_position, grid=grid)
            call_args = dict(args)
            call_args["transformer_options"] = marked
        n = len(chunks)
        skipped = [j for j, c in enumerate(chunks) if any(isinstance(p, BlockSkip) for p in c)]
        # Copies, taken before the call: some blocks (Flux) update their inputs in place.
        kept_inputs = {key: {j: args[key].chunk(n)[j].clone() for j in skipped}
                       for key in ("img", "txt") if args.get(key) is not None}
        hooks = _sublayer_skip_hooks(transformer_options, family, layer, chunks)
        try:
            out = original(call_args)
        finally:
            for hook in hooks:
                hook.remove()
        if skipped:
            out = dict(out)
            for key, inputs in kept_inputs.items():
                if out.get(key) is not None:
                    parts = list(out[key].chunk(n))
                    for j, kept in inputs.items():
                        parts[j] = kept
                    out[key] = torch.cat(parts)
        return out

    return mark_ours(block_replace, previous)


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


def _sublayer_skip_hooks(transformer_options, family: str, layer: Layer, chunks: list[list]) -> list:
    """Forward hooks, alive for one block call, that zero the skipped chunks' rows of the sublayer outputs."""
    by_sublayer: dict[str, list[int]] = {}
    for j, chunk in enumerate(chunks):
        for p in chunk:
            if isinstance(p, SublayerSkip):
                by_sublayer.setdefault(p.sublayer, []).append(j)
    if not by_sublayer:
        return []
    diffusion_model = transformer_options[STEP_KEY].diffusion_model
    n = len(chunks)
    handles = []
    for sublayer, skipped in by_sublayer.items():
        def zero_skipped_rows(module, inputs, output, skipped=skipped):
            size = output.shape[0] // n
            output = output.clone()
            for j in skipped:
                output[j * size:(j + 1) * size] = 0
            return output

        for module in sublayer_modules(diffusion_model, family, layer, sublayer):
            handles.append(module.register_forward_hook(zero_skipped_rows))
    return handles

