"""Installing: one entry point for every node (``add_guidance``): clone, hooks installed once per clone, slots
claimed (another node's function is wrapped, never dropped).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import comfy.patcher_extension
import comfy.samplers

from ...guidance_core.plan import GuidanceStack
from . import families
from .attention import claim_unet_attn1, text_tokens_wrapper
from .dit_blocks import make_dit_block_patch
from .layers import Layer, model_family, model_layers
from .marks import SETUP_KEY, WRAPPER_KEY, is_ours
from .module_hooks import make_inner_forward_hooks_wrapper, make_module_hooks_wrapper, uses_forward_hooks
from .perturbations import TokenShuffle, patched_layers
from .shared_prefix import shared_prefix_wrapper
from .step import (
    GuidanceSetup,
    claim_single_slots,
    get_setup,
    needs_uncond_at_cfg1,
    outer_sample_wrapper,
    predict_noise_wrapper,
)
from .time_embedding import has_time_embedding_noise, make_time_embedding_wrapper
from .token_shuffle import unet_token_shuffle_wrapper


def add_guidance(model, node: str, update: Callable[[GuidanceStack], GuidanceStack], extra_models=()) -> Any:
    """A patched clone of ``model`` whose guidance stack is ``update(stack)``; the input is untouched."""
    patched = model.clone()
    setup = get_setup(patched)
    new_setup = replace(
        setup,
        stack=update(setup.stack),
        extra_models=setup.extra_models + tuple(extra_models),
        owner_nodes=setup.owner_nodes + (node,),
    )
    transformer_options = dict(patched.model_options.get("transformer_options", {}))
    transformer_options[SETUP_KEY] = new_setup
    patched.model_options["transformer_options"] = transformer_options
    if new_setup.extra_models:
        patched.set_additional_models(SETUP_KEY, [m for _key, m in new_setup.extra_models])
    _install_hooks(patched, new_setup)
    return patched


def _install_hooks(patched, setup: GuidanceSetup) -> None:
    options = patched.model_options
    layers = patched_layers(setup.stack)
    claim_single_slots(options, layers)
    cfg = setup.stack.cfg_term
    if cfg.schedule is not None or cfg.neutral_scale is None or needs_uncond_at_cfg1(setup.stack):
        # We decide ourselves when the uncond is needed (a scheduled cfg may leave 1 mid-run).
        options["disable_cfg1_optimization"] = True
    wrappers = comfy.patcher_extension.WrappersMP
    if not patched.get_wrappers(wrappers.OUTER_SAMPLE, WRAPPER_KEY):
        patched.add_wrapper_with_key(wrappers.OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
        patched.add_wrapper_with_key(wrappers.PREDICT_NOISE, WRAPPER_KEY, predict_noise_wrapper)
    family = model_family(patched)
    if has_time_embedding_noise(setup) and not patched.get_wrappers(wrappers.APPLY_MODEL, TSG_WRAPPER_KEY):
        patched.add_wrapper_with_key(wrappers.APPLY_MODEL, TSG_WRAPPER_KEY, make_time_embedding_wrapper(family))
    if layers and uses_forward_hooks(family):
        # No working block patch in this family's forward: hooks on its modules, registered for one forward at a time.
        if families.INNER_FORWARD_HOOKS in families.FAMILY_BY_KEY[family].hooks:
            if not patched.get_wrappers(wrappers.DIFFUSION_MODEL, WRAPPER_KEY):
                patched.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY,
                                             make_inner_forward_hooks_wrapper(family))
        elif not patched.get_wrappers(wrappers.APPLY_MODEL, WRAPPER_KEY):
            patched.add_wrapper_with_key(wrappers.APPLY_MODEL, WRAPPER_KEY, make_module_hooks_wrapper(family))
        return
    if family == "unet" and _has_token_shuffle(setup.stack) and not patched.get_wrappers(wrappers.APPLY_MODEL,
                                                                                           TPG_WRAPPER_KEY):
        patched.add_wrapper_with_key(wrappers.APPLY_MODEL, TPG_WRAPPER_KEY, unet_token_shuffle_wrapper)
    for layer in layers + _dit_prefix_layers(patched, layers):
        _install_layer_patch(patched, layer)
    if layers and not patched.get_wrappers(wrappers.DIFFUSION_MODEL, WRAPPER_KEY):
        dit = any(layer.is_dit for layer in layers)
        patched.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY,
                                     text_tokens_wrapper if dit else shared_prefix_wrapper)


# Their own APPLY_MODEL slots: module hooks hold WRAPPER_KEY's on the families that need them.
TSG_WRAPPER_KEY = WRAPPER_KEY + ".time_embedding"
TPG_WRAPPER_KEY = WRAPPER_KEY + ".token_shuffle"


def _has_token_shuffle(stack: GuidanceStack) -> bool:
    return any(isinstance(branch.perturbation, TokenShuffle) for branch in stack.branches)


def _dit_prefix_layers(model, layers: list[Layer]) -> list[Layer]:
    """The DiT blocks before the last perturbed one, in forward order: their patch computes equal chunks
    once (the shared prefix)."""
    if not any(layer.is_dit for layer in layers):
        return []
    blocks = model_layers(model)  # double (main) blocks, then single blocks: the forward order
    last = max((blocks.index(layer) for layer in layers if layer in blocks), default=0)
    return [block for block in blocks[:last] if block not in layers]


def _install_layer_patch(patched, layer: Layer) -> None:
    name, key = layer.patch_key
    transformer_options = patched.model_options["transformer_options"]
    if not layer.is_dit:
        # clone() deep-copied model_options, so these dicts are the clone's own.
        claim_unet_attn1(transformer_options.setdefault("patches_replace", {}).setdefault("attn1", {}), [layer])
        return
    previous = transformer_options.get("patches_replace", {}).get(name, {}).get(key)
    if not is_ours(previous):
        patched.set_model_patch_replace(make_dit_block_patch(layer, previous, model_family(patched)), name, *key)

