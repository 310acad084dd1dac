"""The ComfyUI plumbing: the only module that knows model_options, calc_cond_batch, attention and block
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
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import comfy.ldm.modules.attention as comfy_attention
import comfy.ldm.modules.diffusionmodules.openaimodel as comfy_unet
import comfy.patcher_extension
import comfy.samplers
import torch

from ..guidance_core.plan import CFG_TERM, COND, UNCOND, GuidanceStack, StepContext
from ..guidance_core.schedules import SigmaWindow, step_of_sigma
from .host import families

SETUP_KEY = "comfyui_guiders"  # model_options["transformer_options"][SETUP_KEY] -> GuidanceSetup
STEP_KEY = "comfyui_guiders_step"  # per forward: StepBranches
ACTIVE_LAYER_KEY = "comfyui_guiders_layer"  # set inside a patched DiT block for the attention override
TEXT_TOKENS_KEY = "comfyui_guiders_text_tokens"  # per forward, for DiTs whose blocks don't carry the text
WRAPPER_KEY = "comfyui_guiders"

_current_runs: contextvars.ContextVar[dict | None] = contextvars.ContextVar("comfyui_guiders_runs", default=None)


class GuidanceError(ValueError):
    """A user-facing error: names the input, what was wrong and the valid choices."""


# ---------------------------------------------------------------------------------------------------------
# Model families and layers
# ---------------------------------------------------------------------------------------------------------

def model_family(model) -> str:
    """The model's family key (a record of host/families.py), or its diffusion model's class name when unknown."""
    diffusion_model = model.get_model_object("diffusion_model")
    family = families.family_of_class(type(diffusion_model))
    return family.key if family is not None else type(diffusion_model).__name__


def require_family(model, node: str, supported: tuple[str, ...]) -> str:
    family = model_family(model)
    if family not in supported:
        names = ", ".join(families.display_name(f) for f in supported)
        raise GuidanceError(f"{node}: this model's architecture ({families.display_name(family)}) is not supported; "
                            f"{node} supports {names}.")
    return family


@dataclass(frozen=True)
class Layer:
    """A place a perturbation acts: a UNet transformer block (``input``/``middle``/``output`` + index, with
    an optional transformer index) or a DiT block (``double``/``single`` + index)."""

    kind: str
    index: int
    sub: int | None = None

    def __str__(self) -> str:
        """The name ``parse_layers`` reads back as this layer: ``middle`` (the whole middle block),
        ``middle.0.1`` (its transformer 1), ``input.4``, ``input.4.1``, ``double.7``, ``single.2``."""
        if self.kind == "middle":
            return "middle" if self.sub is None else f"middle.0.{self.sub}"
        return f"{self.kind}.{self.index}" + ("" if self.sub is None else f".{self.sub}")

    @property
    def is_dit(self) -> bool:
        return self.kind in ("double", "single")

    @property
    def patch_key(self) -> tuple[str, tuple]:
        """Where ComfyUI looks up a replace patch for this layer: ``patches_replace[name][key]``."""
        if self.is_dit:
            return "dit", (f"{self.kind}_block", self.index)
        return "attn1", (self.kind, self.index) if self.sub is None else (self.kind, self.index, self.sub)


def model_layers(model) -> list[Layer]:
    """Every layer of this model a perturbation can name."""
    family = model_family(model)
    dm = model.get_model_object("diffusion_model")
    if family == "unet":
        layers = []
        for kind, blocks in (("input", dm.input_blocks), ("middle", [dm.middle_block]), ("output", dm.output_blocks)):
            for index, block in enumerate(blocks):
                if any(type(m).__name__ == "SpatialTransformer" for m in block.modules()):
                    layers.append(Layer(kind, index))
        return layers
    block_lists = families.FAMILY_BY_KEY[family].block_lists if family in families.FAMILY_BY_KEY else {}
    return [Layer(kind, i) for kind, attribute in block_lists.items() for i in range(len(getattr(dm, attribute)))]


def unet_transformer_count(model, layer: Layer) -> int:
    dm = model.get_model_object("diffusion_model")
    block = {"input": dm.input_blocks, "output": dm.output_blocks}.get(layer.kind, [dm.middle_block])[
        0 if layer.kind == "middle" else layer.index
    ]
    return sum(len(m.transformer_blocks) for m in block.modules() if type(m).__name__ == "SpatialTransformer")


def parse_layers(text: str, model, input_name: str, method: str) -> tuple[Layer, ...]:
    """Layers from a widget: ``auto`` (the family record's recommended layers for ``method``), or a comma
    list. UNet: ``middle``,
    ``input.4``, ``output.1``, ``input.4.1`` (block, index, transformer). DiT: ``7, 8, 9`` (main / joint /
    double blocks), ``double.1``, ``single.2``. Unknown or out-of-range layers list what this model has."""
    family = model_family(model)
    available = model_layers(model)
    if not available:
        raise GuidanceError(f"{input_name}: this model's architecture ({family}) has no layers this pack can patch.")
    text = text.strip() or "auto"
    if text.lower() == "auto":
        record = families.FAMILY_BY_KEY.get(family)
        recommended = record.recommended.get(method) if record is not None else None
        chosen = [t for t in (recommended.layers if recommended else ()) if _parse_one(t, family) in available]
        if not chosen:  # a small or unusual model: use its middle layer, as the PAG and SEG papers do
            chosen = [str(available[len(available) // 2])] if family != "unet" else ["middle"]
        text = ", ".join(chosen)
    layers = []
    for token in [t for t in re.split(r"[,\s]+", text) if t]:
        layer = _parse_one(token, family)
        base = Layer(layer.kind, layer.index) if layer is not None else None
        if base is None or base not in available:
            listing = ", ".join(str(a) for a in available)
            raise GuidanceError(f"{input_name}: unknown layer {token!r} for this {families.display_name(family)} "
                                f"model. Its layers are: {listing} (or 'auto').")
        count = unet_transformer_count(model, base) if layer.sub is not None else 0
        if layer.sub is not None and not 0 <= layer.sub < count:
            raise GuidanceError(f"{input_name}: {token!r}: block {base} has {count} transformers (0..{count - 1}).")
        layers.append(layer)
    return tuple(dict.fromkeys(layers))


def _parse_one(token: str, family: str) -> Layer | None:
    token = token.strip().lower()
    if family == "unet":
        m = re.fullmatch(r"(input|middle|output)(?:\.(\d+))?(?:\.(\d+))?", token)
        if not m:
            return None
        kind = m.group(1)
        index = 0 if kind == "middle" else (int(m.group(2)) if m.group(2) else None)
        if index is None:
            return None
        sub = m.group(3) if kind != "middle" else (m.group(3) or (m.group(2) if m.group(2) else None))
        return Layer(kind, index, int(sub) if sub is not None else None)
    m = re.fullmatch(r"(?:(double|single|joint|block)\.)?(\d+)", token)
    if not m:
        return None
    kind = "single" if m.group(1) == "single" else "double"
    return Layer(kind, int(m.group(2)))


# ---------------------------------------------------------------------------------------------------------
# Perturbations: what a branch changes in the model, applied to its own batch chunk only
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenGrid:
    """Where the image tokens sit in an attention call's sequence: ``start`` .. ``start + frames·h·w``,
    frame by frame in row-major order; tokens outside (text tokens of joint attention) are not image
    tokens. ``frames`` is 1 for images."""

    start: int
    height: int
    width: int
    frames: int = 1

    @property
    def image_slice(self) -> slice:
        return slice(self.start, self.start + self.frames * self.height * self.width)


@dataclass(frozen=True)
class AttentionPerturbation:
    """Changes the self-attention of the image tokens in ``layers``. ``perturb(q, k, v, grid, attend)``
    gets q, k, v as (B, heads, L, D) and the normal attention ``attend(q, k, v)``, and returns the
    attention output as (B, heads, L, D)."""

    layers: tuple[Layer, ...]
    perturb: Callable[..., torch.Tensor]
    label: str = "attention"
    records: bool = False  # an observer: perturb returns (output, record), kept in the step's scratch


@dataclass(frozen=True)
class BlockSkip:
    """Skips whole DiT blocks: the block returns its inputs (SLG/STG ``block`` mode)."""

    layers: tuple[Layer, ...]
    label: str = "block skip"


@dataclass(frozen=True)
class SublayerSkip:
    """Skips one kind of sublayer inside DiT blocks: its residual contribution becomes zero, so the stream
    passes it unchanged (``x + gate·f(x)`` → ``x``). ``sublayer`` is ``attention`` (self/joint attention,
    not cross-attention) or ``feedforward``."""

    layers: tuple[Layer, ...]
    sublayer: str
    label: str = "sublayer skip"


def sublayer_modules(diffusion_model, family: str, layer: Layer, sublayer: str) -> list[torch.nn.Module]:
    """The modules of ``layer`` whose outputs are its ``sublayer`` contributions; an error if there are none."""
    record = families.FAMILY_BY_KEY.get(family)
    names = record.sublayers.get(layer.kind, {}).get(sublayer, ()) if record is not None else ()
    if names:
        block = getattr(diffusion_model, record.block_lists[layer.kind])[layer.index]
        modules = [block.get_submodule(name) for name in names if _has_submodule(block, name)]
        if modules:
            return modules
    raise GuidanceError(f"mode '{sublayer}' cannot skip part of block {layer} of this model "
                        f"({type(diffusion_model).__name__}); use mode 'block' there.")


def _has_submodule(module: torch.nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


@dataclass(frozen=True)
class LateBranch:
    """A branch computed after the main forward from its results (SAG) or by another model
    (autoguidance): ``evaluate(call)`` gets a ``LateCall`` and returns the branch's x0 prediction,
    expressed relative to the step's input x."""

    evaluate: Callable[[LateCall], torch.Tensor]
    observe: AttentionPerturbation | None = None  # records during the main forward (SAG's attention map)
    observe_branch: str = UNCOND
    label: str = "late"


@dataclass
class LateCall:
    """What a late branch can use: the step's predictions so far, its input, the conds, and a way to
    run a model on other inputs."""

    preds: dict[str, torch.Tensor]
    x: torch.Tensor
    sigma: torch.Tensor
    conds: dict[str, Any]
    model: Any
    model_options: dict
    scratch: dict
    run_model: Callable[..., torch.Tensor]
    extra_models: dict


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


def percent_window(model, start_percent: float, end_percent: float, input_prefix: str = "") -> SigmaWindow | None:
    """ComfyUI's percent window: active for sigma_end ≤ σ ≤ sigma_start (``percent_to_sigma``), both ends
    included as in SkipLayerGuidanceDiT."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise GuidanceError(f"{input_prefix}start_percent ({start_percent}) and end_percent ({end_percent}) must "
                            "satisfy 0 ≤ start_percent ≤ end_percent ≤ 1.")
    if start_percent <= 0.0 and end_percent >= 1.0:
        return None
    sampling = model.get_model_object("model_sampling")
    return SigmaWindow(float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent)))


# ---------------------------------------------------------------------------------------------------------
# Installing: one entry point for every node
# ---------------------------------------------------------------------------------------------------------


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
    layers = _patched_layers(setup.stack)
    _claim_single_slots(options, layers)
    cfg = setup.stack.cfg_term
    if cfg.schedule is not None or cfg.neutral_scale is None or _needs_uncond_at_cfg1(setup.stack):
        # We decide ourselves when the uncond is needed (a scheduled cfg may leave 1 mid-run).
        options["disable_cfg1_optimization"] = True
    wrappers = comfy.patcher_extension.WrappersMP
    if not patched.get_wrappers(wrappers.OUTER_SAMPLE, WRAPPER_KEY):
        patched.add_wrapper_with_key(wrappers.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample_wrapper)
        patched.add_wrapper_with_key(wrappers.PREDICT_NOISE, WRAPPER_KEY, _predict_noise_wrapper)
    for layer in layers + _dit_prefix_layers(patched, layers):
        _install_layer_patch(patched, layer)
    if layers and not patched.get_wrappers(wrappers.DIFFUSION_MODEL, WRAPPER_KEY):
        dit = any(layer.is_dit for layer in layers)
        patched.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY,
                                     _text_tokens_wrapper if dit else _shared_prefix_wrapper)


def _claim_single_slots(model_options: dict, layers: list[Layer]) -> None:
    """Puts our function in each single slot the stack needs, wrapping whatever another node put there:
    their CFG formula stands in for our CFG term, their batch function and attention override run
    under ours."""
    makers = {"sampler_calc_cond_batch_function": _make_calc_cond_batch, "sampler_cfg_function": _make_cfg_function}
    for slot, make in makers.items():
        if not _is_ours(model_options.get(slot)):
            model_options[slot] = make(model_options.get(slot))
    to = model_options.setdefault("transformer_options", {})
    if any(layer.is_dit for layer in layers) and not _is_ours(to.get("optimized_attention_override")):
        to["optimized_attention_override"] = _make_attention_override(to.get("optimized_attention_override"))


def _needs_uncond_at_cfg1(stack: GuidanceStack) -> bool:
    return any(t.negative == UNCOND or t.positive == UNCOND for t in stack.terms if t.name != CFG_TERM)


def _perturbations(stack: GuidanceStack):
    for branch in stack.branches:
        p = branch.perturbation
        if isinstance(p, LateBranch):
            if p.observe is not None:
                yield p.observe
        elif p is not None:
            yield p


def _patched_layers(stack: GuidanceStack) -> list[Layer]:
    layers = []
    for p in _perturbations(stack):
        layers.extend(p.layers)
    return list(dict.fromkeys(layers))


def _dit_prefix_layers(model, layers: list[Layer]) -> list[Layer]:
    """The DiT blocks before the last perturbed one, in forward order: their patch computes equal chunks
    once (the shared prefix)."""
    if not any(layer.is_dit for layer in layers):
        return []
    blocks = model_layers(model)  # double (main) blocks, then single blocks: the forward order
    last = max((blocks.index(layer) for layer in layers if layer in blocks), default=0)
    return [block for block in blocks[:last] if block not in layers]


def _mark_ours(fn, wraps: Callable | None = None):
    fn.__comfyui_guiders__ = True
    fn.__comfyui_guiders_wraps__ = wraps  # another node's function ours calls, if any
    return fn


def _is_ours(fn) -> bool:
    return getattr(fn, "__comfyui_guiders__", False)


def _install_layer_patch(patched, layer: Layer) -> None:
    name, key = layer.patch_key
    previous = patched.model_options["transformer_options"].get("patches_replace", {}).get(name, {}).get(key)
    if not _is_ours(previous):
        if layer.is_dit:
            patch = _make_dit_block_patch(layer, previous, model_family(patched))
        else:
            patch = _make_unet_attn1_patch(previous)
        patched.set_model_patch_replace(patch, name, *key)


# ---------------------------------------------------------------------------------------------------------
# Per run and per step
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RunState:
    """Everything a run may remember: the rules' state, the current step, and this step's predictions."""

    rule_state: dict
    ctx: StepContext | None = None
    cond_scale: float | None = None  # the sampler's cfg, from the PREDICT_NOISE wrapper
    last_sigma: float | None = None
    preds: dict = field(default_factory=dict)
    scratch: dict = field(default_factory=dict)


def _run_for(setup: GuidanceSetup) -> RunState:
    runs = _current_runs.get()
    if runs is None:  # sampled without CFGGuider.sample (a custom sampler loop): one run per call chain
        runs = {}
        _current_runs.set(runs)
    if id(setup) not in runs:
        runs[id(setup)] = RunState(setup.stack.new_run_state())
    return runs[id(setup)]


def _setup_of(model_options) -> GuidanceSetup | None:
    return model_options.get("transformer_options", {}).get(SETUP_KEY)


def _outer_sample_wrapper(executor, *args, **kwargs):
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
    sigma_value = float(sigma.flatten()[0])
    sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
    if sample_sigmas is None or len(sample_sigmas) < 2:
        return StepContext(0, 1, sigma_value, cond_scale)
    sigmas = [float(s) for s in sample_sigmas]
    return StepContext(step_of_sigma(sigma_value, sigmas), len(sigmas) - 1, sigma_value, cond_scale)


def _predict_noise_wrapper(executor, x, timestep, model_options={}, seed=None):  # noqa: B006 (host signature)
    setup = _setup_of(model_options)
    if setup is None:
        return executor(x, timestep, model_options, seed)
    _reclaim_slots(model_options, setup)
    run = _run_for(setup)
    run.cond_scale = float(getattr(executor.class_obj, "cfg", 1.0))
    return executor(x, timestep, model_options, seed)


def _reclaim_slots(model_options, setup: GuidanceSetup) -> None:
    """A node applied after ours may have overwritten one of our single slots, which would silently drop
    our guidance. For this run (``model_options`` is the run's own copy) ours goes back in and wraps
    theirs, exactly as when their node comes first. A replaced layer patch cannot be composed that way:
    that is an error naming both."""
    layers = _patched_layers(setup.stack)
    _claim_single_slots(model_options, layers)
    owners = " → ".join(dict.fromkeys(setup.owner_nodes))
    replace_patches = model_options["transformer_options"].get("patches_replace", {})
    for layer in layers:
        name, key = layer.patch_key
        fn = replace_patches.get(name, {}).get(key)
        if not _is_ours(fn):
            raise GuidanceError(f"The patch on layer {layer} set by ComfyUI-Guiders ({owners}) was replaced by a node "
                                f"applied after it ({getattr(fn, '__qualname__', fn)!r}). Apply that node first.")


def _uncond_required_by_others(model_options) -> bool:
    """A post-CFG hook of another node (CFG++ samplers, for example) may read the uncond prediction:
    then it is evaluated even where our terms do not need it."""
    return any(not _is_ours(fn) for fn in model_options.get("sampler_post_cfg_function", []))


def _make_calc_cond_batch(previous: Callable | None):
    def calc_cond_batch(args):
        model_options = args["model_options"]
        setup = _setup_of(model_options)
        conds = args["conds"]
        if setup is None:
            return _evaluate(previous, args["model"], conds, args["input"], args["sigma"], model_options)
        run = _run_for(setup)
        cond_scale = run.cond_scale if run.cond_scale is not None else (1.0 if conds[1] is None else math.inf)
        ctx = _step_context(model_options, args["sigma"], cond_scale)
        if conds[1] is None:  # ComfyUI's cfg = 1 shortcut: no uncond conditioning was passed
            ctx = replace(ctx, cond_scale=1.0)
        if run.last_sigma is not None and ctx.sigma > run.last_sigma * (1 + 1e-6):
            run.rule_state = setup.stack.new_run_state()  # σ went up: a new sampling pass, so fresh state
        run.ctx, run.last_sigma = ctx, ctx.sigma
        stack = setup.stack
        x = args["input"]
        if stack.zero_init(ctx):
            # CFG-Zero*'s zero init: zero noise, so every prediction is x0 = x, and no forward at all. The
            # rest of sampling_function still runs, so post-CFG hooks (CFG++ samplers) see that too.
            run.preds = {COND: x, UNCOND: x}
            return [x, x]
        needed = stack.needed_branches(ctx)
        if conds[1] is not None and UNCOND not in needed and _uncond_required_by_others(model_options):
            needed = needed + [UNCOND]
        sources = {COND: conds[0], UNCOND: conds[1]}
        sigma, model = args["sigma"], args["model"]

        layout = _batch_layout(stack, needed, sources, ctx.sigma)
        run.scratch = {}
        info = StepBranches(layout.perturbations, tuple(x.shape), run.scratch, getattr(model, "diffusion_model", None))
        outputs = _evaluate_batch(previous, model, layout.conds, x, sigma, _with_step_info(model_options, info),
                                  stack.sequential)

        preds = {COND: outputs[0]}
        if layout.conds[1] is not None:
            preds[UNCOND] = outputs[1]
        for index, name in layout.main_names:
            preds[name] = outputs[index]
        for name in layout.late_names:
            branch = stack.branch(name)
            call = LateCall(preds, x, sigma, sources, model, model_options, run.scratch,
                            lambda m, c, xi, opts=model_options: _evaluate(None, m, c, xi, sigma, opts),
                            dict(setup.extra_models))
            preds[name] = branch.perturbation.evaluate(call)
        run.preds = preds
        # What the rest of ComfyUI sees as the uncond: the CFG term's negative (the plain uncond, or the
        # perturbed uncond when a node perturbs the negative branch instead of adding one), else zeros as
        # ComfyUI's own cfg = 1 shortcut gives.
        negative = _negative_name(stack, preds)
        return [outputs[0], preds[negative] if negative else torch.zeros_like(x)]

    return _mark_ours(calc_cond_batch)


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
        layout.conds.append(sources[branch.source] if wanted else None)
        if wanted:
            layout.main_names.append((index, branch.name))
            if branch.perturbed_at(sigma):
                layout.perturbations.setdefault(index, []).append(branch.perturbation)
    return layout


def _evaluate_batch(previous, model, conds, x, sigma, model_options, sequential: bool) -> list[torch.Tensor]:
    """All entries of ``conds`` in one ``calc_cond_batch`` call, or (sequential) one call per entry with
    the same indices, so every chunk keeps its ``cond_or_uncond`` tag and perturbation."""
    if not sequential:
        return _evaluate(previous, model, conds, x, sigma, model_options)
    outputs = [torch.zeros_like(x) for _ in conds]
    for i, cond in enumerate(conds):
        if cond is not None:
            single = [None] * len(conds)
            single[i] = cond
            outputs[i] = _evaluate(previous, model, single, x, sigma, model_options)[i]
    return outputs


def _negative_name(stack: GuidanceStack, preds) -> str | None:
    for name in (stack.cfg_term.negative, UNCOND):
        if name in preds:
            return name
    return None


def _evaluate(previous, model, conds, x, sigma, model_options):
    if previous is not None:
        return previous({"conds": conds, "input": x, "sigma": sigma, "model": model, "model_options": model_options})
    return comfy.samplers.calc_cond_batch(model, conds, x, sigma, model_options)


@dataclass(frozen=True)
class StepBranches:
    """Per forward: which perturbations apply to which ``cond_or_uncond`` index, the latent shape (to find
    the token grid), and a scratch dict for observers (SAG's attention map)."""

    by_index: dict
    latent_shape: tuple
    scratch: dict
    diffusion_model: Any = None


def _with_step_info(model_options, info: StepBranches) -> dict:
    options = dict(model_options)
    to = dict(options.get("transformer_options", {}))
    to[STEP_KEY] = info
    options["transformer_options"] = to
    return options


def _make_cfg_function(previous: Callable | None):
    def cfg_function(args):
        x = args["input"]
        setup = _setup_of(args["model_options"])
        run = _run_for(setup) if setup is not None else None
        if run is None or run.ctx is None:  # not sampled through our calc_cond_batch: plain CFG
            if previous is not None:
                return previous(args)
            return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]
        ctx = replace(run.ctx, cond_scale=float(args["cond_scale"]))
        preds = dict(run.preds)
        preds[COND] = args["cond_denoised"]
        negative = _negative_name(setup.stack, preds)
        if negative:  # pre-CFG hooks of other nodes may have changed what they were handed
            preds[negative] = args["uncond_denoised"]
        cfg_result = None
        if previous is not None and negative:
            cfg_result = x - previous(args)  # another node's CFG formula stands in for our CFG term
        guided = setup.stack.combine(preds, x, ctx, run.rule_state, cfg_result=cfg_result)
        return x - guided

    return _mark_ours(cfg_function)


# ---------------------------------------------------------------------------------------------------------
# Patches inside the forward
# ---------------------------------------------------------------------------------------------------------


def _chunk_perturbations(transformer_options, layer: Layer) -> list[list]:
    """For each batch chunk of this forward, the perturbations that act on ``layer`` (empty: untouched)."""
    info: StepBranches | None = transformer_options.get(STEP_KEY)
    cond_or_uncond = transformer_options.get("cond_or_uncond") or []
    if info is None:
        return [[] for _ in cond_or_uncond]
    return [[p for p in info.by_index.get(i, []) if _acts_on(p, layer)] for i in cond_or_uncond]


def _acts_on(perturbation, layer: Layer) -> bool:
    for target in perturbation.layers:
        same_block = target.kind == layer.kind and target.index == layer.index
        if same_block and (target.sub is None or target.sub == layer.sub):
            return True
    return False


def _grid_for(tokens: int, latent_shape: tuple, text_tokens: int = 0, text_first: bool = True) -> TokenGrid | None:
    """The image token grid of an attention call with ``tokens`` tokens on a latent of ``latent_shape``
    ((B, C, H, W) or video (B, C, T, H, W)): the smallest downsampling factor f (a power of two: UNet
    levels, DiT patch size) whose grid frames·ceil(H/f)·ceil(W/f) fits beside the ``text_tokens`` text tokens
    of joint attention, which come before the image tokens (``text_first``) or after them. An exact fit is
    preferred (with the text, else without it); a grid plus more tokens (Flux Kontext's reference images,
    extra text of HunyuanVideo's single blocks) is accepted next to the text."""
    if len(latent_shape) < 4:
        return None
    height, width = latent_shape[-2], latent_shape[-1]
    frames = latent_shape[-3] if len(latent_shape) >= 5 else 1
    factors = (1, 2, 4, 8, 16, 32, 64)
    image_start = text_tokens if text_first else 0
    layouts = [(image_start, text_tokens)] + ([(0, 0)] if text_tokens else [])  # (image start, text tokens)
    for start, text in layouts:
        for f in factors:
            h, w = math.ceil(height / f), math.ceil(width / f)
            if text + frames * h * w == tokens:
                return TokenGrid(start, h, w, frames)
    for f in factors:
        h, w = math.ceil(height / f), math.ceil(width / f)
        if text_tokens + frames * h * w <= tokens:
            return TokenGrid(image_start, h, w, frames)
    return None


def _chunk_runs(chunks: list[list]) -> list[tuple[int, int, AttentionPerturbation | None]]:
    """The chunks as runs ``(first, end, perturbation)``: adjacent untouched chunks form one run (one
    attention call for all of them), each perturbed chunk is a run of its own."""
    runs, j, n = [], 0, len(chunks)
    while j < n:
        if chunks[j]:
            if len(chunks[j]) > 1:
                raise GuidanceError("Two attention perturbations on the same layer of one branch: "
                                    f"{[p.label for p in chunks[j]]}. Give each its own branch.")
            runs.append((j, j + 1, chunks[j][0]))
            j += 1
            continue
        end = j
        while end < n and not chunks[end]:
            end += 1
        runs.append((j, end, None))
        j = end
    return runs


def _apply_chunked(q, k, v, chunks: list[list], attend, perturb_chunk):
    """Runs ``attend(q, k, v)`` once on each run of adjacent untouched chunks and
    ``perturb_chunk(perturbation, q, k, v)`` on each perturbed chunk. q, k, v hold the chunks along dim 0,
    in whatever layout the two callables take and return; each result is written into one output
    tensor (no concatenation of the pieces afterwards)."""
    runs = _chunk_runs(chunks)
    size = q.shape[0] // len(chunks)
    out = None
    for first, end, perturbation in runs:
        rows = slice(first * size, end * size)
        if perturbation is None:
            piece = attend(q[rows], k[rows], v[rows])
        else:
            piece = perturb_chunk(perturbation, q[rows], k[rows], v[rows])
        if len(runs) == 1:  # the piece is the whole output: nothing to copy
            return piece
        if out is None:  # shaped from the first piece: attention may change the value width or dtype
            out = piece.new_empty((q.shape[0], *piece.shape[1:]))
        out[rows] = piece
    return out


def _perturbed(perturbation: AttentionPerturbation, q, k, v, grid, attend, scratch: dict) -> torch.Tensor:
    """The perturbation's attention output; an observer's record goes into the step's scratch."""
    out = perturbation.perturb(q, k, v, grid, attend)
    if perturbation.records:
        out, scratch[perturbation] = out
    return out


def _make_unet_attn1_patch(previous: Callable | None):
    def attn1_replace(q, k, v, extra_options):
        block = extra_options.get("block")
        layer = Layer(block[0], block[1], extra_options.get("block_index", 0))
        chunks = _chunk_perturbations(extra_options, layer)
        heads = extra_options["n_heads"]

        def attend_flat(q_, k_, v_):  # (B, L, heads·D) in and out, as ComfyUI hands them to the patch
            if previous is not None:
                return previous(q_, k_, v_, extra_options)
            precision = extra_options.get("attn_precision")
            return comfy_attention.optimized_attention(
                q_, k_, v_, heads, attn_precision=precision, transformer_options=extra_options)

        if not any(chunks):
            return attend_flat(q, k, v)

        def attend_heads(q_, k_, v_):  # for perturbations, which work on (B, heads, L, D)
            return _to_heads(attend_flat(_from_heads(q_), _from_heads(k_), _from_heads(v_)), heads)

        info = extra_options.get(STEP_KEY)
        grid = _grid_for(q.shape[1], info.latent_shape)

        def perturb_chunk(perturbation, q_, k_, v_):
            q4, k4, v4 = (_to_heads(t, heads) for t in (q_, k_, v_))
            return _from_heads(_perturbed(perturbation, q4, k4, v4, grid, attend_heads, info.scratch))

        # Untouched chunks stay in the flat layout (no reshape to heads and back): only a perturbed
        # chunk is viewed as heads, as perturbations expect.
        return _apply_chunked(q, k, v, chunks, attend_flat, perturb_chunk)

    return _mark_ours(attn1_replace, previous)


def _to_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, heads·D), or (B, L, heads, D) as MMDiT passes its values, to (B, heads, L, D)."""
    b, length = t.shape[:2]
    return t.reshape(b, length, heads, -1).transpose(1, 2)


def _from_heads(t: torch.Tensor) -> torch.Tensor:
    b, heads, length, dim = t.shape
    return t.transpose(1, 2).reshape(b, length, heads * dim)


# ---------------------------------------------------------------------------------------------------------
# A shared prefix for equal chunks
# ---------------------------------------------------------------------------------------------------------
# A perturbed branch usually has the cond branch's inputs (same x, σ and conditioning), so up to the first
# layer it perturbs it computes exactly what the cond chunk computes. Computing that prefix once and giving
# the perturbed chunk a copy is what makes one call of 3 cheaper than calls of 2 and 1: with PAG on a UNet's
# middle block, the input blocks (about a quarter of a forward) run on 2 chunks instead of 3. UNets do it in
# a DIFFUSION_MODEL wrapper (their blocks have no replace patch); DiTs in the block patch of every block up
# to the last perturbed one. Either way only where no other node patches the forward: another node's patch
# may treat chunks by their ``cond_or_uncond`` tag.


def _equal_chunks(tensors: list[torch.Tensor], n: int) -> tuple[list[int], list[int]]:
    """Groups the ``n`` chunks (along dim 0) of ``tensors``: ``kept`` has the first chunk of each group of
    chunks equal in every tensor, ``source`` gives each chunk its group's position in ``kept``."""
    pieces = [t.chunk(n) for t in tensors]
    kept, source = [], []
    for j in range(n):
        twin = next((k for k, i in enumerate(kept) if all(torch.equal(c[i], c[j]) for c in pieces)), None)
        if twin is None:
            kept.append(j)
            twin = len(kept) - 1
        source.append(twin)
    return kept, source


def _chunk_rows(chunks, size: int, device) -> torch.Tensor:
    """The batch rows of ``chunks`` (chunk indices), each chunk ``size`` rows."""
    return torch.cat([torch.arange(c * size, (c + 1) * size, device=device) for c in chunks])


def _no_other_patches(transformer_options) -> bool:
    """Whether no other node patches this forward (their patches, replace patches, or attention override,
    also where ours wraps theirs)."""
    if any(transformer_options.get("patches", {}).values()):
        return False
    for patches in transformer_options.get("patches_replace", {}).values():
        if not all(_is_ours_alone(fn) for fn in patches.values()):
            return False
    override = transformer_options.get("optimized_attention_override")
    return override is None or _is_ours_alone(override)


def _is_ours_alone(fn) -> bool:
    return _is_ours(fn) and fn.__comfyui_guiders_wraps__ is None


@dataclass(frozen=True)
class SharedPrefix:
    """How a forward's chunks share their prefix: ``kept`` are the chunks computed up to block position
    ``split`` (input blocks 0..n-1, then the middle block at n, then the output blocks), and ``source``
    gives each chunk the position in ``kept`` of the chunk whose prefix it takes."""

    kept: tuple[int, ...]
    source: tuple[int, ...]
    split: int


def _shared_prefix_wrapper(executor, x, timesteps=None, context=None, y=None, control=None,
                           transformer_options={}, **kwargs):  # noqa: B006 (the host's signature)
    """DIFFUSION_MODEL wrapper of a UNet: runs the forward with a shared prefix where the forward is one
    this pack can run exactly as the host would (``_unet_forward_shared``), else the host's forward."""
    unet = executor.class_obj
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
    if executor.idx != len(executor.wrappers) - 1:  # a wrapper inside ours would be skipped
        return False
    return _no_other_patches(transformer_options)


def _shared_prefix(unet, x, timesteps, context, y, transformer_options) -> SharedPrefix | None:
    """Chunks whose inputs are equal (x, timestep, context, y) form a group computed once, up to the first
    block where a perturbation acts on a chunk of a group; None when no two chunks are equal or a
    perturbation acts right at the first block."""
    info: StepBranches | None = transformer_options.get(STEP_KEY)
    tags = transformer_options.get("cond_or_uncond") or []
    n = len(tags)
    if info is None or n < 2 or x.shape[0] % n:
        return None
    kept, source = _equal_chunks([t for t in (x, timesteps, context, y) if t is not None], n)
    if len(kept) == n:
        return None
    positions = {(name, index): position for position, (name, index, _block) in enumerate(_unet_blocks(unet))}
    grouped = [j for j in range(n) if source.count(source[j]) > 1]
    split = min((positions[(layer.kind, layer.index)] for j in grouped for p in info.by_index.get(tags[j], [])
                 for layer in p.layers), default=len(positions))
    return SharedPrefix(tuple(kept), tuple(source), split) if split > 0 else None


def _unet_blocks(unet) -> list[tuple[str, int, Any]]:
    """The UNet's blocks in forward order, as (name, index, block): a block's position in this list is the
    ``split`` position of SharedPrefix."""
    return ([("input", i, block) for i, block in enumerate(unet.input_blocks)] + [("middle", 0, unet.middle_block)]
            + [("output", i, block) for i, block in enumerate(unet.output_blocks)])


def _unet_forward_shared(unet, plan: SharedPrefix, x, timesteps, context, y, to):
    """The host's UNet forward (UNetModel._forward less its patch and ControlNet hooks, which
    ``_only_our_patches`` ruled out), on the ``kept`` chunks up to position ``plan.split`` and on every
    chunk from there. The ``cond_or_uncond`` tags follow the chunks computed, for the attention patches."""
    tags = to["cond_or_uncond"]
    size = x.shape[0] // len(tags)
    kept_rows, spread_rows = (_chunk_rows(chunks, size, x.device) for chunks in (plan.kept, plan.source))
    emb = unet.time_embed(comfy_unet.timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(x.dtype))
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)
    h, hs = x.index_select(0, kept_rows), []
    emb_now = emb.index_select(0, kept_rows)
    context_now = None if context is None else context.index_select(0, kept_rows)
    to["cond_or_uncond"], to["original_shape"] = [tags[j] for j in plan.kept], list(h.shape)
    to["transformer_index"] = 0
    blocks = _unet_blocks(unet)
    try:
        for position, (name, index, block) in enumerate(blocks):
            if position == plan.split:  # from here every chunk runs on its own, from a copy of its source's state
                h, hs = h.index_select(0, spread_rows), [t.index_select(0, spread_rows) for t in hs]
                emb_now, context_now = emb, context
                to["cond_or_uncond"], to["original_shape"] = tags, list(x.shape)
            to["block"] = (name, index)
            output_shape = None
            if name == "output":
                h = torch.cat([h, hs.pop()], dim=1)
                output_shape = hs[-1].shape if hs else None
            if block is not None:
                h = comfy_unet.forward_timestep_embed(block, h, emb_now, context_now, to, output_shape,
                                                      num_video_frames=unet.default_num_video_frames)
            if name == "input":
                hs.append(h)
        out = unet.out(h.type(x.dtype))
        return out if plan.split < len(blocks) else out.index_select(0, spread_rows)
    finally:
        to["cond_or_uncond"] = tags


def _make_dit_block_patch(layer: Layer, previous: Callable | None, family: str):
    """A ``dit`` block replace patch for ``layer`` of a ``family`` model: where the text tokens sit in the
    block's self-attention sequence (its family record's ``text_position``), so only the image tokens are
    perturbed, and which modules are its sublayers (the record's ``sublayers``)."""
    text_position = families.FAMILY_BY_KEY[family].text_position

    def block_replace(args, extra):
        original = extra["original_block"]
        if previous is not None:
            inner = original

            def original(block_args):  # noqa: F811 (compose with the patch that was here before)
                return previous(block_args, {"original_block": inner})

        to = args.get("transformer_options") or {}
        chunks = _chunk_perturbations(to, layer)
        if not any(chunks):
            return original(args) if previous is not None else _once_per_equal_chunk(original, args, to)
        only_skips = all(isinstance(p, BlockSkip) for c in chunks for p in c)
        if only_skips and previous is None and _no_other_patches(to):  # else theirs may count on every chunk
            return _without_skipped_chunks(original, args, to, chunks)
        attention_chunks = [[p for p in c if isinstance(p, AttentionPerturbation)] for c in chunks]
        call_args = args
        if any(attention_chunks):
            text_tokens = 0
            if text_position != families.NO_TEXT:  # single blocks carry no "txt": the count the forward began with
                text_tokens = args["txt"].shape[1] if args.get("txt") is not None else to.get(TEXT_TOKENS_KEY, 0)
            marked = dict(to)
            # A fresh call counter per block call: only the block's first attention call is perturbed.
            marked[ACTIVE_LAYER_KEY] = (layer, attention_chunks, text_tokens, text_position, {"calls": 0})
            call_args = dict(args)
            call_args["transformer_options"] = marked
        n = len(chunks)
        skipped = [j for j, c in enumerate(chunks) if any(isinstance(p, BlockSkip) for p in c)]
        # Copies, taken before the call: some blocks (Flux) update their inputs in place.
        kept_inputs = {key: {j: args[key].chunk(n)[j].clone() for j in skipped}
                       for key in ("img", "txt") if args.get(key) is not None}
        hooks = _sublayer_skip_hooks(to, family, layer, chunks)
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

    return _mark_ours(block_replace, previous)


def _once_per_equal_chunk(original, args: dict, to: dict) -> dict:
    """A DiT block no perturbation acts on: chunks whose inputs are all equal are computed once, and each
    gets a copy of its group's output. The block's batched inputs are the tensors (also inside tuples, as
    some families pass modulations and rotary embeddings) whose first dimension is the batch."""
    tags = to.get("cond_or_uncond") or []
    n, batch = len(tags), args["img"].shape[0]
    if n < 2 or batch % n or STEP_KEY not in to or not _no_other_patches(to):
        return original(args)
    inputs = {key: value for key, value in args.items() if key != "transformer_options"}
    kept, source = _equal_chunks(list(_batched_tensors(inputs, batch)), n)
    if len(kept) == n:
        return original(args)
    size = batch // n
    kept_rows, spread_rows = (_chunk_rows(chunks, size, args["img"].device) for chunks in (kept, source))
    to["cond_or_uncond"] = [tags[j] for j in kept]
    try:
        out = original({**_select_rows(inputs, kept_rows, batch), "transformer_options": to})
    finally:
        to["cond_or_uncond"] = tags
    return _select_rows(out, spread_rows, len(kept) * size)


def _without_skipped_chunks(original, args: dict, to: dict, chunks: list[list]) -> dict:
    """A DiT block whose only perturbation is skipping it for some chunks: the other chunks are computed
    (the block's work for a skipped chunk would be thrown away), the skipped ones pass their inputs on."""
    tags = to.get("cond_or_uncond") or []
    n, batch = len(chunks), args["img"].shape[0]
    computed = [j for j, c in enumerate(chunks) if not c]
    passed = {key: args[key] for key in ("img", "txt") if args.get(key) is not None}
    if not computed:
        return passed
    rows = _chunk_rows(computed, batch // n, args["img"].device)
    inputs = {key: value for key, value in args.items() if key != "transformer_options"}
    to["cond_or_uncond"] = [tags[j] for j in computed]
    try:  # the selected rows are copies: blocks that update their inputs in place (Flux) leave args alone
        out = original({**_select_rows(inputs, rows, batch), "transformer_options": to})
    finally:
        to["cond_or_uncond"] = tags
    result = dict(out)
    for key, kept in passed.items():
        if out.get(key) is not None:
            result[key] = kept.clone()
            result[key][rows] = out[key]
    return result


def _batched_tensors(value, batch: int):
    """The tensors in ``value`` (nested dicts, tuples and lists) whose first dimension is ``batch``."""
    if isinstance(value, torch.Tensor):
        if value.ndim and value.shape[0] == batch:
            yield value
    elif isinstance(value, (dict, tuple, list)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _batched_tensors(item, batch)


def _select_rows(value, rows: torch.Tensor, batch: int):
    """``value`` with ``rows`` taken from every tensor in it whose first dimension is ``batch``."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows) if value.ndim and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {key: _select_rows(item, rows, batch) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        items = [_select_rows(item, rows, batch) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # a namedtuple or not
    return value


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


def _text_tokens_wrapper(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: records the text token count, which Flux's single blocks (text and image
    tokens in one stream) do not carry, so their image tokens can be found."""
    context = args[2] if len(args) > 2 else kwargs.get("context")
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, dict) and "cond_or_uncond" in value and context is not None:
            value[TEXT_TOKENS_KEY] = context.shape[1]
    return executor(*args, **kwargs)


def _make_attention_override(previous: Callable | None):
    def attention_override(func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        active = to.get(ACTIVE_LAYER_KEY)
        call = (lambda *a, **kw: previous(func, *a, **kw)) if previous is not None else func
        if active is None:
            return call(*args, **kwargs)
        layer, chunks, text_tokens, text_position, counter = active
        counter["calls"] += 1
        if counter["calls"] > 1:
            # Every DiT block runs its self (or joint) attention first; later calls are cross-attention
            # (Wan) or extra attentions, which token counts alone cannot tell apart when they coincide.
            return call(*args, **kwargs)
        q, k, v, heads = args[0], args[1], args[2], args[3] if len(args) > 3 else kwargs["heads"]
        rest = {key: val for key, val in kwargs.items() if key not in ("skip_reshape", "skip_output_reshape", "heads")}
        skip_reshape = kwargs.get("skip_reshape", False)
        skip_output_reshape = kwargs.get("skip_output_reshape", False)
        q4, k4, v4 = (t if skip_reshape else _to_heads(t, heads) for t in (q, k, v))
        if q4.shape[2] != k4.shape[2]:  # cross-attention: not the image tokens' self-attention
            return call(*args, **kwargs)

        def attend(q_, k_, v_):
            return call(q_, k_, v_, heads, skip_reshape=True, skip_output_reshape=True, **rest)

        info = to.get(STEP_KEY)
        grid = _grid_for(q4.shape[2], info.latent_shape, text_tokens, text_position != families.TEXT_AFTER_IMAGE)

        def perturb_chunk(perturbation, q_, k_, v_):
            return _perturbed(perturbation, q_, k_, v_, grid, attend, info.scratch)

        out = _apply_chunked(q4, k4, v4, chunks, attend, perturb_chunk)
        return out if skip_output_reshape else _from_heads(out)

    return _mark_ours(attention_override, previous)

