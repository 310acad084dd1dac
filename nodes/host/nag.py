"""NAG inside the cond forward: the plumbing that puts ``guidance_core.nag.nag_combine`` in every text
cross-attention of a family, with no extra model call.

Per diffusion-model call, an ``APPLY_MODEL`` wrapper (only while the step is inside NAG's window and the call
has positive rows):
1. embeds the negative context the way the model embeds its own (``NagSite.context_embedding``: Wan's
   ``text_embedding``; nothing on UNets), once per call, on the positive rows' count;
2. registers forward hooks on the family's cross-attention modules (``NagSite.attribute`` / ``modules``) that
   mark which module is running, and removes them when the call returns or raises;
3. puts an ``optimized_attention_override`` in this call's transformer_options, wrapping whatever was there
   (another node's, or this pack's DiT override), and takes it out afterwards.

In the marked module's text attention call the override computes ``Z⁺`` as the host would (all rows), then
``Z⁻`` = the same attention with the positive rows' queries and the negative's keys and values (the module's
own projections of the embedded negative, at the negative's own length: no tiling of either context), and
writes ``nag_combine(Z⁺, Z⁻)`` into the positive rows before the module's output projection.

Families whose cross-attention call gets no transformer_options or splits the heads (PixArt, Cosmos Predict 2,
Anima, Kandinsky 5, HunyuanDiT: ``NagSite.output``) get no override: a forward pre-hook on the module's output
projection replaces its input (the host's Z⁺) on the positive rows, Z⁻ computed from the module's own input. Some
families embed the negative through call-dependent paths first (``NagSite.prepare_negative``: Anima's LLM adapter,
Kandinsky 5's text blocks at the call's t, HunyuanDiT's text states).

Positive rows are the cond chunk (``cond_or_uncond`` tag 0, whose entry is the sampler's positive: a
``PREDICT_NOISE`` wrapper reads their uuids) and every branch of this pack computed from it (PAG, SEG, SLG
branches: their term then compares like with like); the uncond chunk is never touched, as in ComfyUI-NAG
(``sd/attention.py`` replaces the last, positive rows only). Because the override is another node's as far as
the shared prefix knows, a forward with NAG active runs without a shared prefix (same result).

Checked against the authors' ComfyUI-NAG @ef8a641 (read, not copied):
- ``sd/attention.py`` NAGCrossAttention.forward: Z⁺ for every row with its own context, then one more attention
  of the positive rows' queries ``q[-B:]`` with the negative's ``to_k``/``to_v``, NAG on those rows, then
  ``to_out``; ``sd/openaimodel.py``: every module named attn2. ``wan/model.py``: the text attention of every
  block's cross_attn, before ``self.o``, the negative through ``text_embedding``; in I2V the CLIP image attention
  gets ``nag(Z⁺, Z⁺)``, the identity, so only the text attention changes, as here.
- ``utils.py:check_nag_activation``: NAG only in calls whose ``cond_or_uncond`` holds 0 (the positive), so at
  cfg 1 the cond-only call gets it and an uncond-only call does not, as here.
- Batching differs, not the result: ComfyUI-NAG appends the negative context as extra rows of ``context``
  (``utils.cat_context`` tiles the shorter of the two to a common length; Wan strips the padding again). Here
  the negative's keys and values are computed at the negative's own length, which is the same Z⁻, and the
  positive context is never tiled (a partial tile would change Z⁺ on UNets).
- Window: ComfyUI-NAG's ``nag_sigma_end`` (on while σ ≥ it) is ``end_percent`` here (σ_end ≤ σ ≤ σ_start).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ...guidance_core.nag import nag_combine
from ...guidance_core.plan import COND
from . import families
from .layers import Layer
from .marks import SETUP_KEY, GuidanceError, repeated_attention_call
from .windows import PercentWindow, scale_at_sigma

NAG_KEY = "comfyui_guiders_nag"  # model_options["transformer_options"][NAG_KEY] -> NagSetup
NAG_WRAPPER_KEY = "comfyui_guiders_nag"


@dataclass(frozen=True)
class NagSetup:
    """What a NAG-patched model carries: the negative context (the text encoder's output, batch first), φ (or
    a schedule of it), τ, α, the percent window, and the family's site."""

    negative: torch.Tensor
    scale: float
    tau: float
    alpha: float
    window: PercentWindow | None
    family: str
    schedule: Any = None
    layers: tuple[Layer, ...] | None = None  # None: every cross-attention ("auto")
    node: str = "GuidersNAG"
    negative_mask: torch.Tensor | None = None  # the negative conditioning's attention_mask, if its encoder gave one
    negative_extras: dict = field(default_factory=dict)  # the negative conditioning's dict (NagSite.prepare_negative)

    def __copy__(self):  # ModelPatcher.clone() deep-copies model_options: the setup is immutable
        return self

    def __deepcopy__(self, memo):
        return self

    def scale_at(self, sigma: float, sample_sigmas) -> float:
        return scale_at_sigma(self.scale, self.schedule, sigma, sample_sigmas)


# The uuids of the sampler's positive conditioning entries during one predict_noise (None: not known, e.g. a
# forward outside a guider): a call of the cond kind (cond_or_uncond 0) whose entry is not one of them is
# another node's own prediction (PerpNeg's empty prompt, SelfAttentionGuidance's re-run uncond) and is left alone.
_positive_uuids: contextvars.ContextVar[frozenset | None] = contextvars.ContextVar("guiders_nag_positive",
                                                                                 default=None)


def nag_predict_noise_wrapper(executor, *args, **kwargs):
    positive = (getattr(executor.class_obj, "conds", None) or {}).get("positive")
    uuids = frozenset(c["uuid"] for c in positive if "uuid" in c) if positive else None
    token = _positive_uuids.set(uuids or None)
    try:
        return executor(*args, **kwargs)
    finally:
        _positive_uuids.reset(token)


def install_nag(patched, setup: NagSetup) -> None:
    """Puts ``setup`` and the wrapper on ``patched`` (a clone); a second NAG on the same model is an error."""
    import comfy.patcher_extension

    transformer_options = patched.model_options.setdefault("transformer_options", {})
    if transformer_options.get(NAG_KEY) is not None:
        raise GuidanceError(f"{setup.node}: the model already has NAG from an earlier {setup.node} in the chain; "
                            "use one (one negative prompt per model).")
    transformer_options[NAG_KEY] = setup
    wrappers = comfy.patcher_extension.WrappersMP
    patched.add_wrapper_with_key(wrappers.APPLY_MODEL, NAG_WRAPPER_KEY, nag_apply_model_wrapper)
    patched.add_wrapper_with_key(wrappers.PREDICT_NOISE, NAG_WRAPPER_KEY, nag_predict_noise_wrapper)


def _positive_rows(transformer_options: dict, batch: int) -> list[int]:
    """The batch rows NAG guides: the cond chunk and the chunks of this pack's branches computed from it."""
    tags = transformer_options.get("cond_or_uncond")
    if not tags or batch % len(tags):
        return []
    size = batch // len(tags)
    guidance = transformer_options.get(SETUP_KEY)
    from_cond = set()
    if guidance is not None:  # branch i of the stack runs as tag i + 2 (step.py _batch_layout)
        from_cond |= {i + 2 for i, branch in enumerate(guidance.stack.branches) if branch.source == COND}
    positive, uuids = _positive_uuids.get(), transformer_options.get("uuids")
    known = positive is not None and isinstance(uuids, list) and len(uuids) == len(tags)

    def guided(j: int, tag: int) -> bool:
        if tag in from_cond:
            return True
        return tag == 0 and (not known or uuids[j] in positive)

    return [j * size + r for j, tag in enumerate(tags) if guided(j, tag) for r in range(size)]


def _in_window(setup: NagSetup, sigma: float, model_sampling) -> bool:
    if setup.window is None:
        return True
    return setup.window.sigma_window(model_sampling).contains(sigma)


def _rows_of(negative: torch.Tensor, count: int) -> torch.Tensor:
    """The negative context for ``count`` positive rows: one prompt for all, or one per latent, cycled."""
    index = torch.arange(count, device=negative.device) % negative.shape[0]
    return negative.index_select(0, index)


@dataclass
class _ForwardState:
    """One diffusion-model call's NAG: which module is running and how many attention calls it has made."""

    site: families.NagSite
    rows: torch.Tensor
    negative_context: torch.Tensor  # embedded, one row per positive row
    scale: float
    tau: float
    alpha: float
    module: torch.nn.Module | None = None
    text_call: int = 0
    calls: int = 0
    used: int = 0  # text attention calls guided in this forward (tests read it)
    negative_kv: dict = field(default_factory=dict)
    negative_bias: torch.Tensor | None = None  # the negative's text mask as the family's attention bias
    positive_chunks: tuple[int, ...] = ()  # the batch chunks ``rows`` make up, by position in cond_or_uncond


def nag_apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None,
                            transformer_options={}, **kwargs):  # noqa: B006 (the host's signature)
    setup: NagSetup | None = transformer_options.get(NAG_KEY)
    base_model = executor.class_obj
    sigmas = transformer_options.get("sigmas")
    if setup is None or sigmas is None or c_crossattn is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    sigma = float(sigmas.flatten()[0])
    scale = setup.scale_at(sigma, transformer_options.get("sample_sigmas"))
    rows = _positive_rows(transformer_options, x.shape[0])
    if not rows or scale == 0 or not _in_window(setup, sigma, base_model.model_sampling):
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    if setup.family in families.JOINT_NAG_SITES:
        from .nag_joint import run_joint_nag

        return run_joint_nag(executor, setup, rows, scale, x, t, c_concat, c_crossattn, control, transformer_options,
                             kwargs)
    site = families.NAG_SITES[setup.family]
    diffusion_model = base_model.diffusion_model
    dtype = base_model.manual_cast_dtype or base_model.get_dtype()
    negative = setup.negative.to(device=x.device, dtype=dtype)
    if site.prepare_negative is not None:
        timestep = base_model.model_sampling.timestep(t).float().index_select(0, torch.tensor(rows, device=t.device))
        negative = site.prepare_negative(diffusion_model, negative, setup.negative_extras, timestep)
    negative = _rows_of(negative, len(rows))
    if site.context_embedding:
        negative = attribute_path(diffusion_model, site.context_embedding)(negative)
    state = _ForwardState(site, torch.tensor(rows, device=x.device), negative, scale, setup.tau, setup.alpha)
    chunk_size = x.shape[0] // len(transformer_options["cond_or_uncond"])
    state.positive_chunks = tuple(sorted({row // chunk_size for row in rows}))
    if site.attention_mask and setup.negative_mask is not None:
        mask = _rows_of(setup.negative_mask.to(device=x.device), len(rows))
        state.negative_bias = getattr(diffusion_model, site.attention_mask)(mask, dtype)
    handles = _mark_modules(diffusion_model, setup, state)
    previous = transformer_options.get("optimized_attention_override")
    if not site.output:
        transformer_options["optimized_attention_override"] = _make_override(state, previous)
    replace_patches = transformer_options.get("patches_replace")
    if setup.family == "unet" and replace_patches and replace_patches.get("attn2"):
        transformer_options["patches_replace"] = {**replace_patches, "attn2": _wrap_attn2_replace_patches(
            replace_patches["attn2"], _modules_by_layer(diffusion_model, setup), state, transformer_options)}
    try:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        if site.output:  # no override was installed
            pass
        elif previous is None:
            transformer_options.pop("optimized_attention_override", None)
        else:
            transformer_options["optimized_attention_override"] = previous
        if replace_patches is not None:
            transformer_options["patches_replace"] = replace_patches


def attribute_path(owner, dotted: str):
    """``owner.a.b`` for ``dotted`` "a.b" (a site names a submodule, e.g. PixArt's ``y_embedder.y_proj``)."""
    for name in dotted.split("."):
        owner = getattr(owner, name)
    return owner


def _modules_by_layer(diffusion_model, setup: NagSetup) -> dict[Layer, torch.nn.Module]:
    chosen = {id(module) for module, _call in nag_modules(diffusion_model, setup.family, setup.layers)}
    return {layer_of_module(name, setup.family): module for name, module in diffusion_model.named_modules()
            if id(module) in chosen}


def _wrap_attn2_replace_patches(patches: dict, modules: dict, state: _ForwardState, transformer_options) -> dict:
    """Another node's UNet attn2 replace patch (IPAdapter-style) makes the host skip the attn2 module's forward:
    it calls ``to_q``/``to_k``/``to_v``, the patch, then ``to_out`` itself (BasicTransformerBlock.forward), so no
    module hook sees that layer. There, for this forward, their patch is wrapped: Z⁺ is their output, Z⁻ their
    patch called on the positive rows' queries with the negative's keys and values (and those rows' options),
    so whatever else their patch adds (an image prompt's attention) is in both and cancels in Z⁺ − Z⁻."""
    tags = transformer_options.get("cond_or_uncond") or []

    def wrap(theirs):
        def nag_attn2_replace(q, k, v, extra_options):
            z_pos = theirs(q, k, v, extra_options)
            block = extra_options.get("block")
            module = modules.get(Layer(block[0], block[1], extra_options.get("block_index", 0))) if block else None
            if module is None:
                return z_pos
            positive_chunks = state.positive_chunks
            options = dict(extra_options)
            for key in ("cond_or_uncond", "uuids"):
                if isinstance(options.get(key), list) and len(options[key]) == len(tags):
                    options[key] = [options[key][j] for j in positive_chunks]
            negative_keys, negative_values = _negative_keys_values(state, module)
            z_neg = theirs(q.index_select(0, state.rows), negative_keys, negative_values, options)
            guided = nag_combine(z_pos.index_select(0, state.rows), z_neg, state.scale, state.tau, state.alpha)
            state.used += 1
            return z_pos.index_copy(0, state.rows, guided)

        return nag_attn2_replace

    return {key: wrap(fn) for key, fn in patches.items()}


def layer_of_module(name: str, family: str) -> Layer | None:
    """The layer a module named ``name`` (in the diffusion model) sits in: UNet ``input_blocks.4.1.
    transformer_blocks.0.attn2`` is ``input.4.0``; a DiT's ``blocks.7.cross_attn`` is block 7 of its block list."""
    parts = name.split(".")
    if family == "unet":
        kinds = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}
        if parts[0] not in kinds or "transformer_blocks" not in parts:
            return None
        index = 0 if parts[0] == "middle_block" else int(parts[1])
        return Layer(kinds[parts[0]], index, int(parts[parts.index("transformer_blocks") + 1]))
    for kind, attribute in families.FAMILY_BY_KEY[family].block_lists.items():
        prefix = attribute.split(".")
        if parts[:len(prefix)] == prefix and len(parts) > len(prefix) and parts[len(prefix)].isdigit():
            return Layer(kind, int(parts[len(prefix)]))
    return None


def _chosen(layer: Layer | None, chosen: tuple[Layer, ...] | None) -> bool:
    if chosen is None:
        return True
    return layer is not None and any(c.kind == layer.kind and c.index == layer.index and c.sub in (None, layer.sub)
                                     for c in chosen)


def nag_modules(diffusion_model, family: str, chosen: tuple[Layer, ...] | None = None
                ) -> list[tuple[torch.nn.Module, int]]:
    """The family's text cross-attention modules in the ``chosen`` layers (None: all), each with the index of
    its text attention call."""
    site = families.NAG_SITES[family]
    found = []
    for name, module in diffusion_model.named_modules():
        if name.rsplit(".", 1)[-1] != site.attribute or not _chosen(layer_of_module(name, family), chosen):
            continue
        for cls in type(module).__mro__:
            text_call = site.modules.get(f"{cls.__module__}:{cls.__qualname__}")
            if text_call is not None:
                found.append((module, text_call))
                break
    return found


def _mark_modules(diffusion_model, setup: NagSetup, state: _ForwardState) -> list:
    site = state.site
    modules = nag_modules(diffusion_model, setup.family, setup.layers)
    if not modules:
        raise GuidanceError(f"GuidersNAG: found no {site.attribute} cross-attention module of the expected classes "
                            f"({', '.join(site.modules)}) in {type(diffusion_model).__name__}; this ComfyUI "
                            "version's model code differs from the one NAG was written for.")
    handles = []
    for module, text_call in modules:
        def enter(mod, args, text_call=text_call):
            state.module, state.text_call, state.calls = mod, text_call, 0

        def leave(mod, args, output):
            state.module = None

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
        if site.output:
            handles += _hook_output_projection(module, state)
    return handles


def _hook_output_projection(module, state: _ForwardState) -> list:
    """NAG at the input of the module's output projection, for a module whose attention call no override sees
    or sees heads-split (``NagSite.output``): Z⁺ is what the host computed; Z⁻ is the same attention (the host's
    ``optimized_attention``, heads merged, or the module's own op) of the positive rows' queries, recomputed
    from the module's input, with the negative's keys and values."""
    import comfy.ldm.modules.attention as comfy_attention

    site, module_input = state.site, {}

    def remember_input(mod, args):
        module_input["x"], module_input["rest"] = args[0], args[2:]  # rest: e.g. HunyuanDiT's image rope

    def guide(projection, args):
        if "x" not in module_input:
            return None
        z_pos, x = args[0], module_input.pop("x").index_select(0, state.rows)
        if site.negative_attention is not None:
            z_neg = site.negative_attention(module, x, state.negative_context, *module_input["rest"])
        elif site.projections:
            q, k, v = getattr(module, site.projections)(x, state.negative_context)
            z_neg = getattr(module, site.attention)(q, k, v)
        else:
            negative_keys, negative_values = _negative_keys_values(state, module)
            z_neg = comfy_attention.optimized_attention(getattr(module, site.queries)(x), negative_keys,
                                                        negative_values, getattr(module, site.heads))
        guided = nag_combine(z_pos.index_select(0, state.rows), z_neg, state.scale, state.tau, state.alpha)
        state.used += 1
        return (z_pos.index_copy(0, state.rows, guided), *args[1:])

    return [module.register_forward_pre_hook(remember_input),
            getattr(module, site.output).register_forward_pre_hook(guide)]


def _negative_keys_values(state: _ForwardState, module) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's keys and values of the negative context, computed once per module and call."""
    cached = state.negative_kv.get(id(module))
    if cached is None:
        site = state.site
        if site.keys_values:
            keys, values = getattr(module, site.keys_values)(state.negative_context).chunk(2, dim=-1)
        else:
            keys, values = getattr(module, site.keys)(state.negative_context), None
        if site.key_norm:
            keys = getattr(module, site.key_norm)(keys)
        if values is None:
            values = getattr(module, site.values)(state.negative_context)
        cached = (keys, values)
        state.negative_kv[id(module)] = cached
    return cached


def _make_override(state: _ForwardState, previous: Callable | None):
    def nag_attention_override(func, *args, **kwargs):
        call = (lambda *a, **kw: previous(func, *a, **kw)) if previous is not None else func
        module = state.module
        if module is None:
            return call(*args, **kwargs)
        index = state.calls
        state.calls += 1
        if index != state.text_call:
            return call(*args, **kwargs)
        z_pos = call(*args, **kwargs)
        if kwargs.get("skip_reshape") or kwargs.get("skip_output_reshape") or z_pos.ndim != 3:
            raise GuidanceError("GuidersNAG: the cross-attention was called in a layout NAG does not handle "
                                "(heads split); this ComfyUI version's model code differs from the one NAG was "
                                "written for.")
        q, heads = args[0], args[3] if len(args) > 3 else kwargs["heads"]
        negative_keys, negative_values = _negative_keys_values(state, module)
        rest = {key: value for key, value in kwargs.items() if key not in ("heads", "mask")}
        # The negative's keys have their own length: the positive's text mask does not apply to them (its own does).
        if state.negative_bias is not None:
            rest["mask"] = state.negative_bias
        with repeated_attention_call():  # the same site's attention again: an inner PLADIS changes it too
            z_neg = call(q.index_select(0, state.rows), negative_keys, negative_values, heads, **rest)
        guided = nag_combine(z_pos.index_select(0, state.rows), z_neg, state.scale, state.tau, state.alpha)
        state.used += 1
        return z_pos.index_copy(0, state.rows, guided)

    return nag_attention_override
