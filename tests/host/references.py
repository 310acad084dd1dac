"""References written from a method's definition, for methods whose host has no built-in node on a family.

Each perturbs the model in its own way (a forward hook on a module, an attention override keyed on what the
host's own forward sets), never through the pack's patches, and is applied the way ComfyUI's
PerturbedAttentionGuidance applies PAG on UNets: an extra cond pass after CFG, added as
``denoised + s·(cond − perturbed)``.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable

import comfy.samplers


def perturbed_pass_reference(model, perturbed: Callable, scale: float):
    """A clone of ``model`` whose post-CFG hook runs the cond alone inside ``perturbed(diffusion_model,
    model_options)`` (a context manager giving the pass's model_options) and adds ``s·(cond − perturbed)``."""

    def post_cfg(args):
        with perturbed(args["model"].diffusion_model, args["model_options"]) as model_options:
            (prediction,) = comfy.samplers.calc_cond_batch(
                args["model"], [args["cond"]], args["input"], args["sigma"], model_options)
        return args["denoised"] + scale * (args["cond_denoised"] - prediction)

    reference = model.clone()
    reference.set_model_sampler_post_cfg_function(post_cfg)
    return reference


def modules_return(modules_of: Callable, output_of: Callable) -> Callable:
    """While the pass runs, each module in ``modules_of(diffusion_model)`` returns ``output_of(module, x,
    output)``, x being its first input and output what it computed. PAG (Ahn et al. 2024, arXiv:2403.17377,
    Eq. 9-10) on a self-attention module: the map is the identity, so the module returns its output
    projection of V; a skipped sublayer returns zeros."""

    @contextlib.contextmanager
    def perturbed(diffusion_model, model_options):
        def replace_output(module, args, kwargs, output):
            x = args[0] if args else kwargs.get("x", next(iter(kwargs.values()), None))  # HiDream O1: hidden_states=
            return output_of(module, x, output)

        handles = [module.register_forward_hook(replace_output, with_kwargs=True)
                   for module in modules_of(diffusion_model)]
        try:
            yield model_options
        finally:
            for handle in handles:
                handle.remove()

    return perturbed


def joint_attention_rows_return_values(block_type: str, block_index: int, rows: slice) -> Callable:
    """PAG on a Flux-style joint attention (text and image tokens in one sequence): in the block the host
    marks with ``transformer_options["block_type"]`` and ``["block_index"]``, the attention map's ``rows``
    (the image tokens' queries) are the identity, so their outputs are their own V; the other rows (the
    text tokens attending to everything) are unchanged. ``rows = slice(None)``: every row (SLG
    attention_scores). The host passes q, k, v as (B, heads, L, D) with ``skip_reshape``."""

    def override(func, q, k, v, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        if options.get("block_type") != block_type or options.get("block_index") != block_index:
            return func(q, k, v, *args, **kwargs)
        assert kwargs.get("skip_reshape") and not kwargs.get("skip_output_reshape") and v.ndim == 4
        out = func(q, k, v, *args, **kwargs).clone()  # (B, L, heads·D)
        values = v.transpose(1, 2).reshape(out.shape)  # (B, heads, L, D) → (B, L, heads·D)
        out[:, rows] = values[:, rows]
        return out

    return attention_override_during_pass(override)


def attention_override_during_pass(override: Callable) -> Callable:
    """While the pass runs, ``override`` is the model's ``optimized_attention_override``."""

    @contextlib.contextmanager
    def perturbed(diffusion_model, model_options):
        options = dict(model_options)
        options["transformer_options"] = dict(options.get("transformer_options", {}))
        options["transformer_options"]["optimized_attention_override"] = override
        yield options

    return perturbed


def inside_module(module_of: Callable, flag: dict, perturbed: Callable) -> Callable:
    """``perturbed``, with ``flag["module"]`` true exactly while the module ``module_of(diffusion_model)``
    runs (forward pre- and post-hooks), so an attention override can act on that module's calls only."""

    @contextlib.contextmanager
    def within(diffusion_model, model_options):
        module = module_of(diffusion_model)

        def enter(*_):
            flag["module"] = True

        def leave(*_):
            flag["module"] = False

        handles = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
        try:
            with perturbed(diffusion_model, model_options) as options:
                yield options
        finally:
            for handle in handles:
                handle.remove()
            flag["module"] = False

    return within


def host_function_during_pass(where: str, override: Callable) -> Callable:
    """While the pass runs, the host module's global function ``where`` ("module:name") is replaced by
    ``override(func, *args, **kwargs)``, ``func`` the original: for a family whose attention module calls
    ``optimized_attention`` without the options (Ernie Image), so no override reaches it."""
    module_name, name = where.split(":")

    @contextlib.contextmanager
    def perturbed(diffusion_model, model_options):
        module = importlib.import_module(module_name)
        original = getattr(module, name)
        setattr(module, name, lambda *args, **kwargs: override(original, *args, **kwargs))
        try:
            yield model_options
        finally:
            setattr(module, name, original)

    return perturbed
