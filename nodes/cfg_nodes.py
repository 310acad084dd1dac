"""CFG and its rules: a scheduled scale, cf_guidance's norms, rescale, CFG-Zero*, APG, and the GUIDER. A CFG
rule is one whole value per chain (a second rule node raises naming both); post transforms stack.
"""

from __future__ import annotations

from functools import partial

import comfy.samplers
from comfy_api.latest import io

from ..guidance_core import rules
from ..guidance_core.plan import (
    COND,
    UNCOND,
    CFGRule,
    PostTransform,
    stateless_rule,
)
from . import host
from .common import CATEGORY, model_input, public_id, with_cfg_rule, with_cfg_schedule
from .inputs import check_inputs
from .schedule_nodes import Schedule


class GuidersScheduledCFG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersScheduledCFG",
            display_name="Scheduled CFG (Guiders)",
            category=CATEGORY,
            description="The CFG scale at each step is the schedule's value (the sampler's cfg is ignored). "
                        "Steps where the value is exactly 1 skip the uncond pass.",
            inputs=[model_input(),
                    Schedule.Input("schedule", tooltip="The CFG scale per step, from a Guidance Schedule node.")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, schedule) -> io.NodeOutput:
        return io.NodeOutput(host.add_guidance(model, public_id(cls), lambda s: with_cfg_schedule(s, cls, schedule)))


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
                model_input(),
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
        check_inputs(cls, mode=mode, per_image=per_image)
        def update(stack):
            if mode in ("t_norm", "full_norm"):
                rule = stateless_rule(partial(rules.t_norm, per_sample=per_image))
                stack = with_cfg_rule(stack, CFGRule(public_id(cls), rule, space="noise", neutral_scale=None))
            if mode in ("base_norm", "full_norm"):
                stack = stack.with_post(PostTransform(
                    "base_norm", lambda guided, preds: rules.base_norm(guided, preds[UNCOND], per_sample=per_image),
                    space="noise", requires=(UNCOND,)))
            return stack

        return io.NodeOutput(host.add_guidance(model, public_id(cls), update))


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
                model_input(),
                io.Float.Input("multiplier", default=0.7, min=0.0, max=1.0, step=0.01,
                               tooltip="φ: 0 = off, 0.7 = the paper's recommendation."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, multiplier) -> io.NodeOutput:
        check_inputs(cls, multiplier=multiplier)
        def update(stack):
            return stack.with_post(PostTransform(
                "rescale", lambda guided, preds: rules.rescale(guided, preds[COND], multiplier), space="noise"))

        return io.NodeOutput(host.add_guidance(model, public_id(cls), update))


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
                model_input(),
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
        check_inputs(cls, zero_init_steps=zero_init_steps, optimize=optimize)
        rule = stateless_rule(partial(rules.cfg_zero_star, optimize=optimize))
        return io.NodeOutput(host.add_guidance(
            model, public_id(cls),
            lambda s: with_cfg_rule(s, CFGRule(public_id(cls), rule, space="noise", zero_init_steps=zero_init_steps))))


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
                model_input(),
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
        check_inputs(cls, eta=eta, norm_threshold=norm_threshold, momentum=momentum)
        def apg_rule(cond, uncond, scale, momentum_buffer):
            return rules.apg(cond, uncond, scale, eta=eta, norm_threshold=norm_threshold,
                             momentum_buffer=momentum_buffer)

        make_state = (lambda: rules.MomentumBuffer(momentum)) if momentum != 0 else None
        return io.NodeOutput(host.add_guidance(
            model, public_id(cls),
            lambda s: with_cfg_rule(s, CFGRule(public_id(cls), apg_rule, space="x0", make_state=make_state))))


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
        check_inputs(cls, cfg=cfg)
        if schedule is not None:
            model = host.add_guidance(model, public_id(cls), lambda s: with_cfg_schedule(s, cls, schedule))
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


NODES = [GuidersScheduledCFG, GuidersCFGNormalize, GuidersRescaleCFG, GuidersCFGZeroStar, GuidersAPG, GuidersGuider]

