"""Per run and per step: fresh run state, the step's branches in one ``calc_cond_batch`` call (each
perturbation on its own chunk), late branches, and the combination in ``sampler_cfg_function``.

The ComfyUI plumbing: the only module that knows model_options, calc_cond_batch, attention and block
patches, cond_or_uncond and sample_sigmas.

A node calls ``add_guidance(model, update)``: the model is cloned, ``update`` turns the clone's
``GuidanceStack`` into a new one, and the hooks below are installed once per clone. At sampling time:

1. ``OUTER_SAMPLE`` wrapper: fresh per-run state (APG's momentum, ...); nothing survives the run.
2. ``PREDICT_NOISE`` wrapper: the sampler's cfg for this step (``sampler_calc_cond_batch_function`` does
   not receive it).
3. ``sampler_calc_cond_batch_function``: the step (index of σ in ``sample_sigmas``); on a CFG-Zero*
   zero-init step every prediction is x (zero noise) with no forward at all. Otherwise the branches the
   step needs go into ONE ``calc_cond_batch``
   call (cond, uncond and one chunk per perturbed branch, each chunk tagged by its index in
   ``cond_or_uncond``); a branch no active term needs is passed as ``None``. Branches of another model
   (autoguidance) run as their own call.
4. ``sampler_cfg_function``: the stack combines the predictions; built-in pre/post-CFG hooks still run.

Perturbations act on their own batch chunk only: UNet self-attention through ``attn1`` replace patches,
DiT blocks through ``dit`` block replace patches (which also mark the block for the attention override,
so joint attention can be perturbed on the image tokens only). On a UNet a ``DIFFUSION_MODEL`` wrapper
computes chunks with equal inputs once up to the first perturbed block (the shared prefix), when nothing
else patches the forward. A slot another node already filled is wrapped, never dropped; a slot a later
node overwrote is taken back for the run and wraps theirs.
"""

from __future__ import annotations

import contextvars
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import torch

from ...guidance_core.plan import CFG_TERM, COND, UNCOND, GuidanceStack, StepContext
from ...guidance_core.schedules import step_of_sigma
from .attention import claim_unet_attn1, make_attention_override
from .layers import Layer, model_family
from .marks import SETUP_KEY, GuidanceError, is_ours, mark_ours
from .module_hooks import uses_forward_hooks
from .perturbations import LateBranch, LateCall, patched_layers
from .routing import ForwardRouting, with_step_info
from .windows import resolve_windows

_current_runs: contextvars.ContextVar[dict | None] = contextvars.ContextVar("comfyui_guiders_runs", default=None)


@dataclass(frozen=True)
class GuidanceSetup:
    """What a patched model carries: the stack, the other models its branches use, and the layers whose
    patches this pack installed (checked at sampling time against what is still installed)."""

    stack: GuidanceStack = field(default_factory=GuidanceStack)
    extra_models: tuple[tuple[str, Any], ...] = ()
    owner_nodes: tuple[str, ...] = ()

    # ModelPatcher.clone() deep-copies model_options. The setup is immutable, and a model it holds
    # (autoguidance's weak model) cannot be deep-copied, so every copy is the setup itself.
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def get_setup(model) -> GuidanceSetup:
    return model.model_options.get("transformer_options", {}).get(SETUP_KEY) or GuidanceSetup()


def claim_single_slots(model_options: dict, layers: list[Layer]) -> None:
    """Puts our function in each single slot the stack needs, wrapping whatever another node put there:
    their CFG formula stands in for our CFG term, their batch function and attention override run
    under ours."""
    makers = {"sampler_calc_cond_batch_function": _make_calc_cond_batch, "sampler_cfg_function": _make_cfg_function}
    for slot, make in makers.items():
        if not is_ours(model_options.get(slot)):
            model_options[slot] = make(model_options.get(slot))
    transformer_options = model_options.setdefault("transformer_options", {})
    if any(layer.is_dit for layer in layers) and not is_ours(transformer_options.get("optimized_attention_override")):
        theirs = transformer_options.get("optimized_attention_override")
        transformer_options["optimized_attention_override"] = make_attention_override(theirs)


def needs_uncond_at_cfg1(stack: GuidanceStack) -> bool:
    return any(t.negative == UNCOND or t.positive == UNCOND for t in stack.terms if t.name != CFG_TERM)


@dataclass
class RunState:
    """Everything a run may remember: the rules' state, the current step, and this step's predictions."""

    stack: GuidanceStack  # the setup's stack with its windows in σ of the run's model sampling
    rule_state: dict
    ctx: StepContext | None = None
    cond_scale: float | None = None  # the sampler's cfg, from the PREDICT_NOISE wrapper
    batch_calls: int = 0  # our sampler_calc_cond_batch_function's calls in the current predict_noise
    last_sigma: float | None = None
    preds: dict = field(default_factory=dict)
    scratch: dict = field(default_factory=dict)
    own_conds: dict = field(default_factory=dict)  # branches with a conditioning of their own, processed once


def _run_for(setup: GuidanceSetup, model_sampling) -> RunState:
    """The run's state, made on the run's first call: its windows in σ of ``model_sampling``, the one the
    run samples with (a ModelSampling* node applied after ours included)."""
    runs = _current_runs.get()
    if runs is None:  # sampled without CFGGuider.sample (a custom sampler loop): one run per call chain
        runs = {}
        _current_runs.set(runs)
    if id(setup) not in runs:
        runs[id(setup)] = RunState(resolve_windows(setup.stack, model_sampling), setup.stack.new_run_state())
    return runs[id(setup)]


def _existing_run(setup: GuidanceSetup) -> RunState | None:
    runs = _current_runs.get()
    return runs.get(id(setup)) if runs is not None else None


def _setup_of(model_options) -> GuidanceSetup | None:
    return model_options.get("transformer_options", {}).get(SETUP_KEY)


def outer_sample_wrapper(executor, *args, **kwargs):
    setup = _setup_of(executor.class_obj.model_options)
    extra_models = [m for _key, m in setup.extra_models] if setup is not None else []
    token = _current_runs.set({})
    try:
        for extra in extra_models:  # loaded with the main model (set_additional_models); made current here
            extra.pre_run()
        return executor(*args, **kwargs)
    finally:
        for extra in extra_models:
            extra.cleanup()
        _current_runs.reset(token)


def _step_context(model_options, sigma, cond_scale) -> StepContext:
    # The step's one scalar decision, read on the host: σ and the run's sigmas give the step index, the σ
    # windows and the schedules' values, which choose the branches (the batch's composition). ComfyUI makes
    # the same reads per step (SkipLayerGuidanceDiT's sigma[0].item(), the samplers' σ comparisons).
    sigma_value = float(sigma.flatten()[0])
    sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
    if sample_sigmas is None or len(sample_sigmas) < 2:
        return StepContext(0, 1, sigma_value, cond_scale)
    sigmas = sample_sigmas.tolist()  # one device-to-host copy, not one per entry
    return StepContext(step_of_sigma(sigma_value, sigmas), len(sigmas) - 1, sigma_value, cond_scale)


def predict_noise_wrapper(executor, x, timestep, model_options={}, seed=None):  # noqa: B006 (host signature)
    setup = _setup_of(model_options)
    if setup is None:
        return executor(x, timestep, model_options, seed)
    guider = executor.class_obj
    _reclaim_slots(model_options, setup, uses_forward_hooks(model_family(guider.model_patcher)))
    run = _run_for(setup, guider.model_patcher.get_model_object("model_sampling"))
    run.cond_scale = float(getattr(guider, "cfg", 1.0))
    run.batch_calls = 0
    out = executor(x, timestep, model_options, seed)
    if run.batch_calls == 0 and type(guider).predict_noise is not comfy.samplers.CFGGuider.predict_noise:
        # The guider's own predict_noise computed the predictions without sampling_function's batch slot
        # (DualCFGGuider and PerpNegGuider call calc_cond_batch themselves): none of our terms reached the
        # result. (With CFGGuider's own predict_noise, no call means a wrapper answered the step from its
        # cache, as LazyCache does on the steps it skips.)
        raise GuidanceError(_bypassing_guider_message(guider, setup))
    return out


# The node names of ComfyUI's guiders whose class names differ from them.
_GUIDER_NODES = {"Guider_DualCFG": "DualCFGGuider", "Guider_PerpNeg": "PerpNegGuider", "Guider_Basic": "BasicGuider"}


def _bypassing_guider_message(guider, setup: GuidanceSetup) -> str:
    owners = ", ".join(dict.fromkeys(setup.owner_nodes))
    name = type(guider).__name__
    return (f"{_GUIDER_NODES.get(name, name)} computes its predictions without ComfyUI's sampling_function (it calls "
            f"calc_cond_batch itself), so {owners} would do nothing under it. Use CFGGuider, BasicGuider or "
            "GuidersGuider with SamplerCustomAdvanced, or KSampler, with the model from "
            f"{setup.owner_nodes[-1] if setup.owner_nodes else 'the Guiders node'}.")


def _reclaim_slots(model_options, setup: GuidanceSetup, forward_hooks: bool = False) -> None:
    """A node applied after ours may have overwritten one of our slots or patches, or put a patch on a key
    that shadows ours, which would silently drop our guidance. For this run (``model_options`` is the run's
    own copy) ours goes back in and wraps theirs, exactly as when their node comes first. A replaced DiT
    block patch cannot be composed that way: that is an error naming both. A family hooked through its modules
    for one forward (``forward_hooks``) has no block patch to check."""
    layers = patched_layers(setup.stack)
    claim_single_slots(model_options, layers)
    replace_patches = model_options["transformer_options"].setdefault("patches_replace", {})
    if any(not layer.is_dit for layer in layers):
        replace_patches["attn1"] = dict(replace_patches.get("attn1", {}))
        claim_unet_attn1(replace_patches["attn1"], layers)
    owners = " → ".join(dict.fromkeys(setup.owner_nodes))
    for layer in layers:
        name, key = layer.patch_key
        fn = replace_patches.get(name, {}).get(key)
        if layer.is_dit and not forward_hooks and not is_ours(fn):
            raise GuidanceError(f"The patch on layer {layer} set by ComfyUI-Guiders ({owners}) was replaced by "
                                f"{foreign_node_name(fn)}, applied after it. Apply {foreign_node_name(fn)} first.")


def _uncond_required_by_others(model_options) -> bool:
    """A post-CFG hook of another node (CFG++ samplers, for example) may read the uncond prediction:
    then it is evaluated even where our terms do not need it."""
    return any(not is_ours(fn) for fn in model_options.get("sampler_post_cfg_function", []))


def _make_calc_cond_batch(previous: Callable | None):
    def calc_cond_batch(args):
        model_options = args["model_options"]
        setup = _setup_of(model_options)
        conds = args["conds"]
        if setup is None:
            return evaluate_conds(previous, args["model"], conds, args["input"], args["sigma"], model_options)
        run = _run_for(setup, args["model"].model_sampling)
        run.batch_calls += 1
        if previous is not None and setup.stack.cfg_term.negative != UNCOND:
            owners = ", ".join(dict.fromkeys(setup.owner_nodes))
            raise GuidanceError(f"{foreign_node_name(previous)} computes the negative branch its own way "
                                f"(sampler_calc_cond_batch_function), and {owners} perturbs the negative branch "
                                "too (target 'negative branch'): only one of them can. Use target 'new branch', "
                                "or remove one of them.")
        cond_scale = run.cond_scale if run.cond_scale is not None else (1.0 if conds[1] is None else math.inf)
        ctx = _step_context(model_options, args["sigma"], cond_scale)
        if conds[1] is None:  # ComfyUI's cfg = 1 shortcut: no uncond conditioning was passed
            ctx = replace(ctx, cond_scale=1.0)
        ctx = replace(ctx, stream_sizes=packed_stream_sizes(conds[0]))
        if run.last_sigma is not None and ctx.sigma > run.last_sigma * (1 + 1e-6):
            run.rule_state = setup.stack.new_run_state()  # σ went up: a new sampling pass, so fresh state
        run.ctx, run.last_sigma = ctx, ctx.sigma
        stack = run.stack
        x = args["input"]
        if stack.zero_init(ctx):
            # CFG-Zero*'s zero init: zero noise, so every prediction is x0 = x, and no forward at all. The
            # rest of sampling_function still runs, so post-CFG hooks (CFG++ samplers) see that too. A node
            # whose post-CFG hook reads what its patches recorded in the forward (SelfAttentionGuidance's
            # attention map) still gets that forward; its predictions are not used.
            if _uncond_required_by_others(model_options):
                evaluate_conds(previous, args["model"], conds, x, args["sigma"], model_options)
            run.preds = {COND: x, UNCOND: x}
            return [x, x]
        needed = stack.needed_branches(ctx, run.rule_state)
        if conds[1] is not None and UNCOND not in needed and _uncond_required_by_others(model_options):
            needed = needed + [UNCOND]
        sources = {COND: conds[0], UNCOND: conds[1]}
        sigma, model = args["sigma"], args["model"]
        sources.update(_own_conditionings(run, stack, needed, model, x))
        sources = _transformed_conditionings(stack, sources, run.rule_state, model.model_sampling, ctx)

        layout = _batch_layout(stack, needed, sources, ctx.sigma)
        run.scratch = {}
        routing = ForwardRouting(layout.perturbations, tuple(x.shape), run.scratch,
                                 getattr(model, "diffusion_model", None), step=ctx.step)
        outputs = _evaluate_batch(previous, model, layout.conds, x, sigma, with_step_info(model_options, routing),
                                  stack.sequential)

        preds = {COND: outputs[0]}
        if layout.conds[1] is not None:
            preds[UNCOND] = outputs[1]
        for index, name in layout.main_names:
            preds[name] = outputs[index]
        for name in layout.late_names:
            branch = stack.branch(name)
            own_sources = {key: _with_branch_identity(cond, name) for key, cond in sources.items()}
            call = LateCall(preds, x, sigma, own_sources, model, model_options, run.scratch,
                            lambda m, c, xi, opts=model_options: evaluate_conds(None, m, c, xi, sigma, opts),
                            dict(setup.extra_models))
            preds[name] = branch.perturbation.evaluate(call)
        run.preds = preds
        # What the rest of ComfyUI sees as the uncond: the CFG term's negative (the plain uncond, or the
        # perturbed uncond when a node perturbs the negative branch instead of adding one), else zeros as
        # ComfyUI's own cfg = 1 shortcut gives.
        negative = _negative_name(stack, preds)
        return [outputs[0], preds[negative] if negative else torch.zeros_like(x)]

    return mark_ours(calc_cond_batch)


def packed_stream_sizes(cond: list | None) -> tuple[int, ...]:
    """The per-sample sizes of the latents the sampler packed into one (comfy/utils.py pack_latents: each
    flattened after the batch dim, concatenated on the last), from the ``latent_shapes`` the sampler hands
    the model's extra_conds (model_base.LTXAV.extra_conds: a CONDConstant); () where it packed nothing."""
    for entry in cond or ():
        shapes = getattr(entry.get("model_conds", {}).get("latent_shapes"), "cond", None)
        if shapes is not None and len(shapes) > 1:
            return tuple(math.prod(shape[1:]) for shape in shapes)
    return ()


def _own_conditionings(run: RunState, stack: GuidanceStack, needed: list[str], model, x) -> dict:
    """The needed branches that run on a conditioning of their own (Perp-Neg's empty prompt), keyed by branch
    name, processed once per run as ComfyUI's PerpNeg processes its empty prompt (convert_cond, then
    encode_model_conds with the model's extra_conds, as a negative prompt)."""
    own = {}
    for branch in stack.branches:
        if branch.conditioning is None or branch.name not in needed:
            continue
        if branch.name not in run.own_conds:
            converted = comfy.sampler_helpers.convert_cond(branch.conditioning)
            run.own_conds[branch.name] = comfy.samplers.encode_model_conds(model.extra_conds, converted, x, x.device,
                                                                           "negative")
        own[branch.source] = run.own_conds[branch.name]
    return own


# The model_conds key of the text embedding, the same on every family ComfyUI has (CONDCrossAttn).
TEXT_EMBEDDING_KEY = "c_crossattn"


def _transformed_conditionings(stack: GuidanceStack, sources: dict, run_state: dict, model_sampling,
                               ctx: StepContext) -> dict:
    """``sources`` with each conditioning transform (CADS) applied to the text embedding of the sources it
    names, at the diffusion time t = timestep(σ) / timestep(σ_max) (999ths on discrete models, σ on flow models;
    ComfyUI-CADS reads t the same way). A perturbed branch copies its source afterwards, so it sees the change."""
    if not stack.conditioning:
        return sources
    sigma_max = model_sampling.sigma_max.reshape(1)  # a tensor of the model sampling's sigmas, on its device
    sigma_tensor = torch.full_like(sigma_max, ctx.sigma)
    # One read per step: t decides the annealing γ(t), a scalar decision as step context's σ is.
    t = float(model_sampling.timestep(sigma_tensor)[0] / model_sampling.timestep(sigma_max)[0])
    changed = dict(sources)
    for transform in stack.conditioning:
        state = run_state.get(transform.state_key)
        for name in transform.sources:
            if changed.get(name) is None:
                continue
            entries = []
            for entry in changed[name]:
                model_conds = dict(entry["model_conds"])
                embedding = model_conds.get(TEXT_EMBEDDING_KEY)
                if embedding is not None:
                    model_conds[TEXT_EMBEDDING_KEY] = embedding._copy_with(transform.fn(embedding.cond, t, state, ctx))
                entries.append({**entry, "model_conds": model_conds})
            changed[name] = entries
    return changed


@dataclass
class BatchLayout:
    """One step's ``calc_cond_batch`` call: the conds list (cond, uncond, then one entry per stack branch,
    ``None`` where not needed), which of its indices are main-forward branches, which branches run after
    it, and the perturbations per ``cond_or_uncond`` index."""

    conds: list
    main_names: list[tuple[int, str]]
    late_names: list[str]
    perturbations: dict[int, list]


def _batch_layout(stack: GuidanceStack, needed: list[str], sources: dict, sigma: float) -> BatchLayout:
    layout = BatchLayout([sources[COND], sources[UNCOND] if UNCOND in needed else None], [], [], {})
    for index, branch in enumerate(stack.branches, start=2):
        wanted = branch.name in needed and sources.get(branch.source) is not None
        if wanted and isinstance(branch.perturbation, LateBranch):
            layout.late_names.append(branch.name)
            observe = branch.perturbation.observe
            if observe is not None:  # it watches another branch's chunk of the main forward
                observed_index = 0 if branch.perturbation.observe_branch == COND else 1
                layout.perturbations.setdefault(observed_index, []).append(observe)
            wanted = False
        layout.conds.append(_with_branch_identity(sources[branch.source], branch.name) if wanted else None)
        if wanted:
            layout.main_names.append((index, branch.name))
            if branch.perturbed_at(sigma):
                layout.perturbations.setdefault(index, []).append(branch.perturbation)
    return layout


def _with_branch_identity(cond: list | None, branch_name: str) -> list | None:
    """The branch's conditioning with its own uuid per entry (the same on every step of the run): caches
    keyed by cond uuid (EasyCache, LazyCache, TeaCache-style packs) then keep the perturbed branch apart
    from the cond it was copied from, instead of giving it the cond's cached output."""
    if cond is None:
        return None
    return [{**entry, "uuid": uuid.uuid5(entry["uuid"], branch_name)} if isinstance(entry.get("uuid"), uuid.UUID)
            else entry for entry in cond]


def _evaluate_batch(previous, model, conds, x, sigma, model_options, sequential: bool) -> list[torch.Tensor]:
    """Every entry of ``conds`` evaluated, each chunk keeping its index as its ``cond_or_uncond`` tag.

    Another node's batch function (``previous``) takes the two conds of ComfyUI's own call, cond and
    uncond, and nothing more (SkipLayerGuidanceDiTSimple unpacks exactly two): it computes those two its
    way, and our extra branches run in a call of their own through ComfyUI's calc_cond_batch."""
    if previous is None:
        return _evaluate_entries(None, model, conds, x, sigma, model_options, sequential)
    outputs = list(_evaluate_entries(previous, model, conds[:2], x, sigma, model_options, sequential))
    if any(c is not None for c in conds[2:]):
        extra = _evaluate_entries(None, model, [None, None] + conds[2:], x, sigma, model_options, sequential)
        return outputs + list(extra[2:])
    return outputs + [torch.zeros_like(x) for _ in conds[2:]]


def _evaluate_entries(previous, model, conds, x, sigma, model_options, sequential: bool) -> list[torch.Tensor]:
    """All entries of ``conds`` in one call, or (sequential) one call per entry with the same indices, so
    every chunk keeps its ``cond_or_uncond`` tag and perturbation."""
    if not sequential:
        return evaluate_conds(previous, model, conds, x, sigma, model_options)
    outputs = [torch.zeros_like(x) for _ in conds]
    for i, cond in enumerate(conds):
        if cond is not None:
            single = [None] * len(conds)
            single[i] = cond
            outputs[i] = evaluate_conds(previous, model, single, x, sigma, model_options)[i]
    return outputs


def _negative_name(stack: GuidanceStack, preds) -> str | None:
    for name in (stack.cfg_term.negative, UNCOND):
        if name in preds:
            return name
    return None


def evaluate_conds(previous, model, conds, x, sigma, model_options):
    if previous is not None:
        return previous({"conds": conds, "input": x, "sigma": sigma, "model": model, "model_options": model_options})
    return comfy.samplers.calc_cond_batch(model, conds, x, sigma, model_options)


def foreign_node_name(fn) -> str:
    """The node a function another pack or ComfyUI put in a slot comes from, by its qualified name
    (``RescaleCFG.execute.<locals>.rescale_cfg`` → ``RescaleCFG``)."""
    qualname = getattr(fn, "__qualname__", None) or repr(fn)
    return qualname.split(".<locals>")[0].split(".")[0]


def foreign_cfg_conflict(rule_owner: str, theirs) -> str:
    return (f"{rule_owner} sets the CFG rule, and {foreign_node_name(theirs)} replaces ComfyUI's CFG formula "
            "(sampler_cfg_function) with its own: only one of them can compute CFG, in either order. Remove one "
            f"of {rule_owner} and {foreign_node_name(theirs)} (GuidersRescaleCFG, schedules and guidance terms "
            "stack with either).")


def _make_cfg_function(previous: Callable | None):
    def cfg_function(args):
        x = args["input"]
        setup = _setup_of(args["model_options"])
        run = _existing_run(setup) if setup is not None else None
        if run is None or run.ctx is None:  # not sampled through our calc_cond_batch: plain CFG
            if previous is not None:
                return previous(args)
            return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]
        ctx = replace(run.ctx, cond_scale=float(args["cond_scale"]))
        preds = dict(run.preds)
        preds[COND] = args["cond_denoised"]
        negative = _negative_name(run.stack, preds)
        if negative:  # pre-CFG hooks of other nodes may have changed what they were handed
            preds[negative] = args["uncond_denoised"]
        cfg_result = None
        if previous is not None and negative:
            cfg_term = run.stack.cfg_term
            if cfg_term.rule_owner is not None:
                raise GuidanceError(foreign_cfg_conflict(cfg_term.rule_owner, previous))
            if cfg_term.schedule is not None:  # their formula at our scheduled scale
                args = {**args, "cond_scale": cfg_term.scale_at(ctx)}
            cfg_result = x - previous(args)  # another node's CFG formula stands in for our CFG term
        guided = run.stack.combine(preds, x, ctx, run.rule_state, cfg_result=cfg_result)
        return x - guided

    return mark_ours(cfg_function)

