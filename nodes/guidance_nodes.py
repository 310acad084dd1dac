"""Guidance nodes: each takes a MODEL and returns a patched clone whose guidance stack has one more term,
a changed CFG rule or one more transform. They chain in any order; all hooks live in nodes/host."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import comfy.samplers
import torch
from comfy_api.latest import io

from ..guidance_core import perturb, rules
from ..guidance_core.plan import (
    COND,
    UNCOND,
    Branch,
    CFGRule,
    CFGRuleConflict,
    PostTransform,
    perturbation_term,
    stateless_rule,
)
from ..guidance_core.schedules import Constant
from . import host
from .host import families
from .schedule_nodes import Schedule

CATEGORY = "sampling/guiders"

# The families each method supports, from the family records (nodes/host/families.py).
PAG_FAMILIES = families.families_supporting(families.PAG)
ATTENTION_FAMILIES = families.families_supporting(families.SEG)  # SEG: a token grid per frame
BLOCK_FAMILIES = families.families_supporting(families.SLG)
SAG_FAMILIES = families.families_supporting(families.SAG)
SLG_MODES = ["block", "attention", "feedforward", "attention_scores"]

LAYERS_TOOLTIP = ("Where to perturb. 'auto' = recommended for the model: " + families.recommended_summary(families.PAG)
                  + ". Or a list: UNet 'middle', 'input.4', 'output.1', 'input.4.1' (block, index, transformer); DiT "
                  "'7, 8, 9' (joint/double/main blocks), 'double.1', 'single.2' (Flux, HunyuanVideo). An unknown "
                  "layer lists the layers the model has.")


def _node_id(cls) -> str:
    """The node's public id, for messages (the V3 executor runs a clone of the class named ``<id>Clone``)."""
    return cls.__name__.removesuffix("Clone")


def _model_input() -> io.Model.Input:
    return io.Model.Input("model", tooltip="The model to guide; a patched copy is returned, the input is unchanged.")


def _window_inputs(start: float = 0.0, end: float = 1.0) -> list[io.Input]:
    return [
        io.Float.Input("start_percent", default=start, min=0.0, max=1.0, step=0.001,
                       tooltip="Sampling progress where the term turns on (0 = first step), as in ComfyUI's own "
                               "nodes: active for sigma_end ≤ σ ≤ sigma_start."),
        io.Float.Input("end_percent", default=end, min=0.0, max=1.0, step=0.001,
                       tooltip="Sampling progress where the term turns off (1 = last step). Outside the window the "
                               "term's branch is not evaluated at all."),
    ]


def _schedule_input(what: str) -> io.Input:
    return Schedule.Input("schedule", optional=True,
                          tooltip=f"Optional: drives the {what} per step (overrides the scale widget).")


def _branch_mode_input() -> io.Input:
    return io.Combo.Input("branch_mode", options=["batched", "sequential"], default="batched", optional=True,
                          tooltip="batched: every branch of the step in one forward call (fastest). sequential: one "
                                  "call per branch, same result, less memory.")


def _scale_schedule(scale: float, schedule):
    return schedule if schedule is not None else Constant(scale)


def _with_branch_mode(stack, branch_mode):
    return replace(stack, sequential=True) if branch_mode == "sequential" else stack


def _with_cfg_rule(stack, rule: CFGRule):
    """The stack with ``rule`` as its CFG rule; a rule another node set earlier is an error naming both."""
    try:
        return stack.with_cfg_rule(rule)
    except CFGRuleConflict as conflict:
        raise host.GuidanceError(str(conflict)) from None


def _with_cfg_schedule(stack, cls, schedule):
    """The stack with the CFG scale driven by ``schedule``; a second schedule would silently replace the
    first, so that is an error."""
    if stack.cfg_term.schedule is not None:
        raise host.GuidanceError(f"{_node_id(cls)}: the CFG scale is already driven by a schedule from an earlier "
                                    "GuidersScheduledCFG or GuidersGuider in the chain; connect only one CFG schedule.")
    return stack.with_cfg(schedule=schedule)


def _target_input() -> io.Input:
    return io.Combo.Input("target", options=["new branch", "negative branch"], default="new branch", optional=True,
                          tooltip="new branch: adds s·(cond − perturbed) with an extra branch in the batch. "
                                  "negative branch: no extra branch; the CFG's negative prediction is computed "
                                  "with the perturbation instead (scale unused; needs cfg > 1), as ComfyUI's "
                                  "SkipLayerGuidanceDiTSimple.")


def _perturbation_node(model, node, prefix, perturbation, scale, schedule, start_percent, end_percent, branch_mode,
                       source=COND, positive=COND, target="new branch"):
    window = host.percent_window(model, start_percent, end_percent)

    def update(stack):
        name = stack.unique_name(prefix)
        if target == "negative branch":
            if stack.cfg_term.negative != UNCOND:
                raise host.GuidanceError(f"{node}: the negative branch is already perturbed by "
                                            f"'{stack.cfg_term.negative}'; use target 'new branch' here.")
            stack = stack.with_branch(Branch(name, source=UNCOND, perturbation=perturbation, window=window))
            stack = stack.with_cfg(negative=name)
        elif target == "new branch":
            term = perturbation_term(name, name, _scale_schedule(scale, schedule), window)
            if positive != COND:
                term = replace(term, positive=positive)
            stack = stack.with_term(term, Branch(name, source=source, perturbation=perturbation))
        else:
            raise host.GuidanceError(f"{node}: target {target!r} is not one of 'new branch', 'negative branch'.")
        return _with_branch_mode(stack, branch_mode)

    return host.add_guidance(model, node, update)


# ------------------------------------------------------------------------------------------------------
# CFG and its variants
# ------------------------------------------------------------------------------------------------------


class GuidersScheduledCFG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersScheduledCFG",
            display_name="Scheduled CFG (Guiders)",
            category=CATEGORY,
            description="The CFG scale at each step is the schedule's value (the sampler's cfg is ignored). "
                        "Steps where the value is exactly 1 skip the uncond pass.",
            inputs=[_model_input(),
                    Schedule.Input("schedule", tooltip="The CFG scale per step, from a Guidance Schedule node.")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, schedule) -> io.NodeOutput:
        return io.NodeOutput(host.add_guidance(model, _node_id(cls), lambda s: _with_cfg_schedule(s, cls, schedule)))


class GuidersCFGNormalize(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersCFGNormalize",
            display_name="CFG Normalize (Guiders)",
            category=CATEGORY,
            description="cf_guidance's normalizations, per image: base_norm rescales the guided prediction to "
                        "the uncond's norm; t_norm normalizes the guidance term to the uncond's norm (use small "
                        "scales, cf_guidance uses 0.25→0.05); full_norm does both.",
            inputs=[
                _model_input(),
                io.Combo.Input("mode", options=["base_norm", "t_norm", "full_norm"], default="base_norm",
                               tooltip="base_norm keeps your cfg; t_norm and full_norm expect cfg around 0.05-0.3 "
                                       "(a schedule from GuidersScheduleCosine with max 0.25, min 0.05 works)."),
                io.Boolean.Input("per_image", default=True, optional=True,
                                 tooltip="Norms per image (a batch is not mixed). Off: one norm over the whole batch, "
                                         "exactly as cf_guidance."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, mode, per_image=True) -> io.NodeOutput:
        def update(stack):
            if mode in ("t_norm", "full_norm"):
                rule = stateless_rule(partial(rules.t_norm, per_sample=per_image))
                stack = _with_cfg_rule(stack, CFGRule(_node_id(cls), rule, space="noise", neutral_scale=None))
            if mode in ("base_norm", "full_norm"):
                stack = stack.with_post(PostTransform(
                    "base_norm", lambda guided, preds: rules.base_norm(guided, preds[UNCOND], per_sample=per_image),
                    space="noise", requires=(UNCOND,)))
            return stack

        return io.NodeOutput(host.add_guidance(model, _node_id(cls), update))


class GuidersRescaleCFG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersRescaleCFG",
            display_name="Rescale CFG (Guiders)",
            category=CATEGORY,
            description="Lin et al. 2023 (arXiv:2305.08891) §3.4: rescales the guided noise prediction to the "
                        "cond's per-image std, mixed by multiplier. Fixes over-exposure at high CFG, most of all "
                        "on v-prediction and zero-terminal-SNR models.",
            inputs=[
                _model_input(),
                io.Float.Input("multiplier", default=0.7, min=0.0, max=1.0, step=0.01,
                               tooltip="φ: 0 = off, 0.7 = the paper's recommendation."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, multiplier) -> io.NodeOutput:
        def update(stack):
            return stack.with_post(PostTransform(
                "rescale", lambda guided, preds: rules.rescale(guided, preds[COND], multiplier), space="noise"))

        return io.NodeOutput(host.add_guidance(model, _node_id(cls), update))


class GuidersCFGZeroStar(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersCFGZeroStar",
            display_name="CFG-Zero* (Guiders)",
            category=CATEGORY,
            description="Fan et al. 2025 (arXiv:2503.18886): scales the uncond by the optimal α before guidance "
                        "and returns zero noise for the first steps (no model call there). Made for flow models "
                        "(SD3.5, Flux, Wan); works in noise space (x − x0 ∝ velocity).",
            inputs=[
                _model_input(),
                io.Int.Input("zero_init_steps", default=1, min=0, max=100,
                             tooltip="Steps at the start that return zero noise. The paper suggests about 4% of the "
                                     "steps (Wan T2V: 2, I2V: 1). 0 = off."),
                io.Combo.Input("optimize", options=["uncond", "cond"], default="uncond", optional=True,
                               tooltip="uncond: the paper (α scales the uncond). cond: this pack's variant, α scales "
                                       "the cond toward the uncond instead."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, zero_init_steps, optimize="uncond") -> io.NodeOutput:
        rule = stateless_rule(partial(rules.cfg_zero_star, optimize=optimize))
        return io.NodeOutput(host.add_guidance(
            model, _node_id(cls),
            lambda s: _with_cfg_rule(s, CFGRule(_node_id(cls), rule, space="noise", zero_init_steps=zero_init_steps))))


class GuidersAPG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersAPG",
            display_name="APG (Guiders)",
            category=CATEGORY,
            description="Adaptive Projected Guidance (Sadat et al., ICLR 2025, arXiv:2410.02416) with the paper's "
                        "c + (w − 1)(Δ⊥ + η·Δ∥) on denoised predictions: high CFG without oversaturation. At the "
                        "same cfg, η = 1 with no threshold and no momentum is plain CFG.",
            inputs=[
                _model_input(),
                io.Float.Input("eta", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Weight of the guidance parallel to the cond (η). The paper recommends 0."),
                io.Float.Input("norm_threshold", default=0.0, min=0.0, max=100.0, step=0.5,
                               tooltip="Caps the per-image norm of the guidance update (r); 0 = off. The paper "
                                       "uses 15 at high cfg."),
                io.Float.Input("momentum", default=0.0, min=-1.5, max=1.0, step=0.01,
                               tooltip="β of the running average of updates; the paper uses negative values "
                                       "(-0.5, -0.75). Reset at the start of every run."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, eta, norm_threshold, momentum) -> io.NodeOutput:
        def apg_rule(cond, uncond, scale, momentum_buffer):
            return rules.apg(cond, uncond, scale, eta=eta, norm_threshold=norm_threshold,
                             momentum_buffer=momentum_buffer)

        make_state = (lambda: rules.MomentumBuffer(momentum)) if momentum != 0 else None
        return io.NodeOutput(host.add_guidance(
            model, _node_id(cls),
            lambda s: _with_cfg_rule(s, CFGRule(_node_id(cls), apg_rule, space="x0", make_state=make_state))))


# ------------------------------------------------------------------------------------------------------
# Perturbed-model guidance
# ------------------------------------------------------------------------------------------------------


def _require_grid(grid, method: str, tokens: int):
    if grid is None:
        raise host.GuidanceError(f"{method}: could not find the image tokens among the {tokens} tokens of this "
                                    "attention call; choose another layer.")


def identity_image_attention(q, k, v, grid, attend):
    """PAG's perturbation on the image tokens: their self-attention map becomes the identity (output = V);
    text tokens of joint attention keep their normal attention."""
    _require_grid(grid, "PAG", q.shape[-2])
    if grid.start == 0 and grid.image_slice.stop == q.shape[-2]:
        return perturb.identity_attention(q, k, v)
    out = attend(q, k, v).clone()
    out[..., grid.image_slice, :] = v[..., grid.image_slice, :]
    return out


def smoothed_energy_attention(q, k, v, grid, attend, blur_sigma: float):
    """SEG's perturbation: the image tokens' queries are blurred over the 2-D token grid (each video frame
    on its own)."""
    _require_grid(grid, "SEG", q.shape[-2])
    smoothed = perturb.smooth_queries(q, (grid.height, grid.width), blur_sigma, image_token_start=grid.start,
                                      frames=grid.frames)
    return attend(smoothed, k, v)


def identity_all_attention(q, k, v, grid, attend):
    """SLG's ``attention_scores`` mode (diffusers' skip_attention_scores): attention returns V."""
    return perturb.identity_attention(q, k, v)


class GuidersPAG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersPAG",
            display_name="Perturbed-Attention Guidance (Guiders)",
            category=CATEGORY,
            description="PAG (Ahn et al., ECCV 2024, arXiv:2403.17377): adds s·(cond − perturbed), where the "
                        "perturbed branch replaces the image tokens' self-attention map by the identity. Works on "
                        "UNets (SD1.5, SDXL) and DiTs (SD3, Flux, Wan, LTXV, HunyuanVideo; text tokens "
                        "untouched). Batched with cond and uncond in one forward.",
            inputs=[
                _model_input(),
                io.Float.Input("scale", default=3.0, min=0.0, max=100.0, step=0.01,
                               tooltip="s. SD1.5/SDXL: 2-5 (paper: 3 with cfg, 5 alone); SD3/Flux: 1-3; video "
                                       "DiTs (Wan, LTXV, HunyuanVideo): ≤ 2, as STG's identity-attention mode."),
                io.String.Input("layers", default="auto", tooltip=LAYERS_TOOLTIP),
                *_window_inputs(),
                _schedule_input("PAG scale"),
                _branch_mode_input(),
                _target_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, layers, start_percent, end_percent, schedule=None, branch_mode="batched",
                target="new branch"):
        host.require_family(model, _node_id(cls), PAG_FAMILIES)
        chosen = host.parse_layers(layers, model, "layers", families.PAG)
        perturbation = host.AttentionPerturbation(chosen, identity_image_attention, "PAG")
        return io.NodeOutput(_perturbation_node(model, _node_id(cls), "pag", perturbation, scale, schedule,
                                                start_percent, end_percent, branch_mode, target=target))


class GuidersSEG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersSEG",
            display_name="Smoothed Energy Guidance (Guiders)",
            category=CATEGORY,
            description="SEG (Hong, NeurIPS 2024, arXiv:2408.00760): adds s·(cond − perturbed), where the "
                        "perturbed branch Gaussian-blurs the image tokens' attention queries over the token grid "
                        "(non-square grids and text tokens handled; video frame by frame). UNets and DiTs (SD3, "
                        "Flux, Wan, LTXV, HunyuanVideo).",
            inputs=[
                _model_input(),
                io.Float.Input("scale", default=3.0, min=0.0, max=100.0, step=0.01,
                               tooltip="s. The paper uses 3 on SDXL; SD1.5 2-4; SD3/Flux 1-3; video DiTs (Wan, "
                                       "LTXV, HunyuanVideo): no published value, start at 1-2."),
                io.Float.Input("blur_sigma", default=10.0, min=0.1, max=99999.0, step=0.1,
                               tooltip="σ of the query blur, in tokens. Larger = stronger. ≥ 9999 means infinite "
                                       "(every query becomes the mean query); the paper's examples use 10-100."),
                io.String.Input("layers", default="auto", tooltip=LAYERS_TOOLTIP),
                *_window_inputs(),
                _schedule_input("SEG scale"),
                _branch_mode_input(),
                _target_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, blur_sigma, layers, start_percent, end_percent, schedule=None,
                branch_mode="batched", target="new branch"):
        host.require_family(model, _node_id(cls), ATTENTION_FAMILIES)
        if blur_sigma <= 0:
            raise host.GuidanceError(f"{_node_id(cls)}: blur_sigma must be > 0 (got {blur_sigma}); "
                                        "use ≥ 9999 for the infinite blur.")
        chosen = host.parse_layers(layers, model, "layers", families.SEG)
        seg = partial(smoothed_energy_attention, blur_sigma=blur_sigma)
        return io.NodeOutput(_perturbation_node(
            model, _node_id(cls), "seg", host.AttentionPerturbation(chosen, seg, "SEG"),
            scale, schedule, start_percent, end_percent, branch_mode, target=target))


class GuidersSLG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersSLG",
            display_name="Skip Layer Guidance / STG (Guiders)",
            category=CATEGORY,
            description="SLG (Stability AI, SD3.5) and STG (Hyung et al. 2024, arXiv:2411.18664): adds "
                        "s·(cond − perturbed), where the perturbed branch skips whole DiT blocks (block) or "
                        "turns their attention into the identity (attention_scores). SD3/3.5, Flux, Wan, LTXV, "
                        "HunyuanVideo.",
            inputs=[
                _model_input(),
                io.Float.Input("scale", default=3.0, min=0.0, max=100.0, step=0.01,
                               tooltip="s. SD3.5: 2.5-3 (reference: 2.5 on Medium); Flux 1-3; video DiTs (STG: Wan, "
                                       "LTXV, HunyuanVideo) ≤ 2."),
                io.String.Input("layers", default="auto",
                                tooltip="Blocks to skip. 'auto': " + families.recommended_summary(families.SLG)
                                        + ". Or '7, 8, 9', 'double.1', 'single.2'."),
                io.Combo.Input("mode", options=SLG_MODES, default="block",
                               tooltip="block: the block returns its inputs (SLG, STG-R). attention: the block's "
                                       "self/joint attention adds nothing (its residual passes through). "
                                       "feedforward: the block's MLP adds nothing. attention_scores: the block's "
                                       "attention returns V (STG-A, PAG-like). attention and feedforward are for "
                                       "SD3 joint blocks, Flux and HunyuanVideo double blocks, Wan and LTXV "
                                       "blocks."),
                *_window_inputs(0.01, 0.2),
                io.Float.Input("rescale", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="STG's rescale: mixes in result·std(cond)/std(result) (whole tensor), only "
                                       "while SLG is active. 0 = off; STG uses 0.7."),
                _schedule_input("SLG scale"),
                _branch_mode_input(),
                _target_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, layers, mode, start_percent, end_percent, rescale, schedule=None,
                branch_mode="batched", target="new branch"):
        host.require_family(model, _node_id(cls), BLOCK_FAMILIES)
        chosen = host.parse_layers(layers, model, "layers", families.SLG)
        if mode == "block":
            perturbation = host.BlockSkip(chosen, "SLG")
        elif mode == "attention_scores":
            perturbation = host.AttentionPerturbation(chosen, identity_all_attention, "SLG attention_scores")
        elif mode in ("attention", "feedforward"):
            diffusion_model = model.get_model_object("diffusion_model")
            for layer in chosen:  # fails now, naming the layer, rather than at the first step
                host.sublayer_modules(diffusion_model, host.model_family(model), layer, mode)
            perturbation = host.SublayerSkip(chosen, mode, f"SLG {mode}")
        else:
            raise host.GuidanceError(f"{_node_id(cls)}: mode {mode!r} is not one of {', '.join(SLG_MODES)}.")
        patched = _perturbation_node(model, _node_id(cls), "slg", perturbation, scale, schedule, start_percent,
                                     end_percent, branch_mode, target=target)
        if rescale > 0 and target == "new branch":
            slg_name = host.get_setup(patched).stack.terms[-1].name

            def update(stack):
                return stack.with_post(PostTransform(
                    "slg_rescale", lambda guided, preds: rules.whole_tensor_rescale(guided, preds[COND], rescale),
                    space="x0", while_term_active=slg_name))

            patched = host.add_guidance(patched, _node_id(cls), update)
        return io.NodeOutput(patched)


def record_attention(q, k, v, grid, attend):
    """SAG's observer: the normal attention output, and the attention map it came from."""
    probabilities = perturb.attention_probabilities(q, k)
    return torch.matmul(probabilities.to(v.dtype), v), probabilities


def sag_branch(observer: host.AttentionPerturbation, blur_sigma: float):
    """SAG's degraded branch (Hong et al., ICCV 2023, Eq. 11-12): blur the uncond x0 where its attention is
    salient, re-noise it with the uncond's own noise, and run the uncond on that input. Returned relative
    to the step's input, so the term s·(uncond − branch) is s·(degraded − model(degraded input))."""

    def evaluate(call: host.LateCall):
        uncond_x0, x = call.preds[UNCOND], call.x
        attention = call.scratch.get(observer)
        if attention is None or min(x.shape[-2:]) <= 4:  # too small for the blur's padding, as ComfyUI's SAG
            return uncond_x0
        latent_hw = tuple(x.shape[-2:])
        mask = perturb.sag_attention_mask(attention, perturb.sag_grid_hw(attention.shape[-1], latent_hw), latent_hw)
        degraded = perturb.sag_blur(uncond_x0, mask, blur_sigma)
        degraded_input = degraded + x - uncond_x0
        (sag_x0,) = call.run_model(call.model, [call.conds[UNCOND]], degraded_input)
        return sag_x0 + (x - degraded_input)

    return host.LateBranch(evaluate, observe=observer, observe_branch=UNCOND, label="SAG")


class GuidersSAG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersSAG",
            display_name="Self-Attention Guidance (Guiders)",
            category=CATEGORY,
            description="SAG (Hong et al., ICCV 2023, arXiv:2210.00939): blurs the uncond prediction where the "
                        "middle block's self-attention is salient, runs the uncond again on it, and adds "
                        "s·(blurred − prediction). UNet models (SD1.5, SDXL); one extra forward per step.",
            inputs=[
                _model_input(),
                io.Float.Input("scale", default=0.5, min=-2.0, max=5.0, step=0.01,
                               tooltip="s. SD1.5: 0.5-0.8 (diffusers default 0.75); SDXL 0.3-0.6."),
                io.Float.Input("blur_sigma", default=2.0, min=0.1, max=10.0, step=0.1,
                               tooltip="σ of the 9-tap blur of the salient regions (ComfyUI's default 2)."),
                *_window_inputs(),
                _schedule_input("SAG scale"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, blur_sigma, start_percent, end_percent, schedule=None) -> io.NodeOutput:
        host.require_family(model, _node_id(cls), SAG_FAMILIES)
        observer = host.AttentionPerturbation((host.Layer("middle", 0, 0),), record_attention, "SAG",
                                                 records=True)
        return io.NodeOutput(_perturbation_node(
            model, _node_id(cls), "sag", sag_branch(observer, blur_sigma), scale, schedule,
            start_percent, end_percent, "batched", source=UNCOND, positive=UNCOND))


def weak_model_branch(key: str):
    """Autoguidance's branch: the weak model's prediction for the same input and condition."""

    def evaluate(call: host.LateCall):
        weak = call.extra_models[key]
        # The weak model's own options, with the run's sigmas so its step-dependent patches see the run.
        options = dict(weak.model_options)
        transformer_options = dict(options.get("transformer_options", {}))
        transformer_options["sample_sigmas"] = call.model_options.get("transformer_options", {}).get("sample_sigmas")
        options["transformer_options"] = transformer_options
        (weak_x0,) = call.run_model(weak.model, [call.conds[COND]], call.x, options)
        return weak_x0

    return host.LateBranch(evaluate, label="autoguidance")


class GuidersAutoguidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersAutoguidance",
            display_name="Autoguidance (Guiders)",
            category=CATEGORY,
            description="Autoguidance (Karras et al., NeurIPS 2024, arXiv:2406.02507): adds s·(cond − weak), "
                        "where weak is a smaller or less-trained model of the same family run on the same "
                        "input and prompt. One extra forward per step, on the weak model.",
            inputs=[
                _model_input(),
                io.Model.Input("weak_model", tooltip="The 'bad version' of the model: same family and latent "
                                                     "space, fewer parameters or fewer training steps."),
                io.Float.Input("scale", default=2.0, min=0.0, max=100.0, step=0.01,
                               tooltip="s (the paper's w − 1). 1-3 is typical."),
                *_window_inputs(),
                _schedule_input("autoguidance scale"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, weak_model, scale, start_percent, end_percent, schedule=None) -> io.NodeOutput:
        family, weak_family = host.model_family(model), host.model_family(weak_model)
        if family != weak_family:
            raise host.GuidanceError(f"{_node_id(cls)}: weak_model is a {weak_family} model but model is "
                                        f"{family}; both must be the same family.")
        window = host.percent_window(model, start_percent, end_percent)
        key = f"weak{id(weak_model)}"

        def update(stack):
            name = stack.unique_name("autoguidance")
            term = perturbation_term(name, name, _scale_schedule(scale, schedule), window)
            return stack.with_term(term, Branch(name, source=COND, perturbation=weak_model_branch(key)))

        return io.NodeOutput(host.add_guidance(model, _node_id(cls), update, extra_models=[(key, weak_model)]))


class GuidersGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersGuider",
            display_name="Guider (Guiders)",
            category=CATEGORY,
            description="A GUIDER for SamplerCustomAdvanced: the model with every Guiders node applied to it, the "
                        "prompts, and the cfg (or a cfg schedule).",
            inputs=[
                io.Model.Input("model", tooltip="The model, usually after Guiders nodes (PAG, APG, ...)."),
                io.Conditioning.Input("positive", tooltip="The prompt to guide toward (the cond branch)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (the uncond branch CFG guides away "
                                                          "from)."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG scale. SD1.5 5-8, SDXL 4-7, SD3.5 3.5-5, Flux dev 1."),
                Schedule.Input("schedule", optional=True,
                               tooltip="Optional: the CFG scale per step (overrides cfg)."),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, schedule=None) -> io.NodeOutput:
        if schedule is not None:
            model = host.add_guidance(model, _node_id(cls), lambda s: _with_cfg_schedule(s, cls, schedule))
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


NODES = [GuidersScheduledCFG, GuidersCFGNormalize, GuidersRescaleCFG, GuidersCFGZeroStar, GuidersAPG, GuidersPAG,
         GuidersSEG, GuidersSAG, GuidersSLG, GuidersAutoguidance, GuidersGuider]
