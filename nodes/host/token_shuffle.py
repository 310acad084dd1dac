"""TPG on UNets: the input of each BasicTransformerBlock of a TPG layer, shuffled on the TPG chunk's rows.

ComfyUI offers no patch at a UNet transformer block's input (``attn1_patch`` sees the normed tokens, not the
residual stream the authors shuffle: pipeline_sdxl_tpg.py permutes ``hidden_states`` before norm1), so a
forward pre-hook on each such block does it, registered by an APPLY_MODEL wrapper for one forward and always
removed, as module_hooks.py registers its hooks. The DiT families shuffle in their ``dit`` block patch
(dit_blocks.py).
"""

from __future__ import annotations

from ...guidance_core.condition_free import shuffle_tokens
from .layers import Layer
from .marks import SETUP_KEY, STEP_KEY
from .perturbations import TokenShuffle
from .routing import chunk_perturbations


def _unet_transformer_blocks(diffusion_model, layer: Layer) -> list[tuple[int, object]]:
    """(transformer index, BasicTransformerBlock) of ``layer`` (a UNet block; ``sub``: one transformer), the
    index as ComfyUI counts it in ``block_index`` (its attn1 patch key)."""
    block = {"input": diffusion_model.input_blocks, "output": diffusion_model.output_blocks}.get(
        layer.kind, [diffusion_model.middle_block])[0 if layer.kind == "middle" else layer.index]
    found = []
    for module in block.modules():
        if type(module).__name__ == "SpatialTransformer":
            found.extend(enumerate(module.transformer_blocks))
    return [(i, b) for i, b in found if layer.sub is None or i == layer.sub]


def _shuffle_at_input(layer: Layer):
    def pre_hook(module, args, kwargs):
        transformer_options = kwargs.get("transformer_options")
        if transformer_options is None and len(args) > 2:
            transformer_options = args[2]
        if not transformer_options or STEP_KEY not in transformer_options:
            return None
        chunks = [[p for p in c if isinstance(p, TokenShuffle)]
                  for c in chunk_perturbations(transformer_options, layer)]
        if not any(chunks):
            return None
        x = args[0] if args else kwargs["x"]
        size, step = x.shape[0] // len(chunks), transformer_options[STEP_KEY].step
        shuffled = x.clone()
        for j, chunk in enumerate(chunks):
            for shuffle in chunk:
                rows = slice(j * size, (j + 1) * size)
                shuffled[rows] = shuffle_tokens(shuffled[rows], shuffle.permutation(x.shape[1], step, layer, x.device))
        if args:
            return (shuffled, *args[1:]), kwargs
        return args, {**kwargs, "x": shuffled}

    return pre_hook


def unet_token_shuffle_wrapper(executor, *args, **kwargs):
    """APPLY_MODEL wrapper: pre-hooks on the TPG layers' transformer blocks for this forward only."""
    base_model = executor.class_obj
    transformer_options = kwargs.get("transformer_options", args[5] if len(args) > 5 else {}) or {}
    setup = transformer_options.get(SETUP_KEY)
    layers = []
    if setup is not None:
        for branch in setup.stack.branches:
            if isinstance(branch.perturbation, TokenShuffle):
                layers.extend(branch.perturbation.layers)
    handles = []
    try:
        for layer in dict.fromkeys(layers):
            for index, block in _unet_transformer_blocks(base_model.diffusion_model, layer):
                own = Layer(layer.kind, layer.index, index)
                handles.append(block.register_forward_pre_hook(_shuffle_at_input(own), with_kwargs=True))
        return executor(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()

