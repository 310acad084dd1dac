"""CFG rules that change which branches a step evaluates: the guidance interval (no uncond outside it),
adaptive guidance (no uncond once cond and uncond agree) and Perp-Neg (the empty prompt joins the batch); and
the rules that remember the run's trajectory: momentum guidance (a post transform) and SMC-CFG (a CFG rule).
The math is in guidance_core/branch_rules and trajectory_rules; each node sets one window, rule or transform.
"""

from __future__ import annotations

import math
from functools import partial

from comfy_api.latest import io

from ..guidance_core import branch_rules, condition_annealing, trajectory_rules
from ..guidance_core.plan import COND, UNCOND, Branch, CFGRule, ConditioningTransform, PostTransform
from . import host
from .common import CATEGORY, model_input, public_id, with_cfg_rule, with_cfg_schedule
from .host.windows import NoiseRatioInterval
from .inputs import check_inputs
from .schedule_nodes import Schedule

SIGMA_NO_BOUND = 1000.0  # sigma_high at its maximum: no upper bound (the interval starts at the first step)


def cfg_schedule_input() -> io.Input:
    return Schedule.Input("schedule", optional=True,
                          tooltip="Optional: the CFG scale per step (overrides the sampler's cfg) where CFG applies.")


def _with_optional_schedule(stack, cls, schedule):
    return stack if schedule is None else with_cfg_schedule(stack, cls, schedule)


class GuidersCFGInterval(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersCFGInterval",
            display_name="CFG Guidance Interval (Guiders)",
            category=CATEGORY,
            description="Kynkäänniemi et al., NeurIPS 2024 (arXiv:2404.07724): CFG only for noise levels in "
                        "(sigma_low, sigma_high]; the cond alone elsewhere, and there the uncond is not evaluated "
                        "at all (one forward of one batch instead of two). Composes with any CFG rule (APG, ...) "
                        "and guidance term.",
            inputs=[
                model_input(),
                io.Combo.Input("mode", options=["sigma", "percent"], default="sigma",
                               tooltip="sigma: the interval in the paper's σ (EDM's noise-to-signal ratio). SD1.5, "
                                       "SDXL and other EPS/v models sample in that σ; on flow models (SD3, Flux, Wan, "
                                       "...) it is converted to their t = σ/(1 + σ), so the same defaults mean the "
                                       "same noise levels on every family. percent: start_percent..end_percent of "
                                       "the run, as ComfyUI's own windows."),
                io.Float.Input("sigma_high", default=5.42, min=0.0, max=SIGMA_NO_BOUND, step=0.01,
                               tooltip="Upper end of the interval (included). The paper: SDXL 5.42, EDM2 2.9 (its "
                                       "Table 1). 1000 = no upper bound. Flow models: 5.42 is t = 0.84."),
                io.Float.Input("sigma_low", default=0.28, min=0.0, max=SIGMA_NO_BOUND, step=0.01,
                               tooltip="Lower end of the interval (excluded). The paper: 0.28 for SDXL and EDM2. "
                                       "Flow models: 0.28 is t = 0.22. 0 = guide to the end."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, optional=True,
                               tooltip="mode percent: where CFG turns on (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, optional=True,
                               tooltip="mode percent: where CFG turns off (1 = last step)."),
                cfg_schedule_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, mode, sigma_high, sigma_low, start_percent=0.0, end_percent=1.0,
                schedule=None) -> io.NodeOutput:
        node = public_id(cls)
        check_inputs(cls, mode=mode, sigma_high=sigma_high, sigma_low=sigma_low, start_percent=start_percent,
                     end_percent=end_percent)
        if mode == "sigma":
            if not sigma_low < sigma_high:
                raise host.GuidanceError(f"{node}: sigma_low ({sigma_low}) must be below sigma_high ({sigma_high}).")
            window = NoiseRatioInterval(math.inf if sigma_high >= SIGMA_NO_BOUND else sigma_high, sigma_low)
        else:
            window = host.percent_window(start_percent, end_percent)

        def update(stack):
            if stack.cfg_term.window is not None:
                raise host.GuidanceError(f"{node}: the CFG term already has an interval from an earlier "
                                         f"{node} in the chain; connect only one.")
            stack = stack.with_cfg(window=window) if window is not None else stack
            return _with_optional_schedule(stack, cls, schedule)

        return io.NodeOutput(host.add_guidance(model, node, update))


class GuidersAdaptiveCutoff(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersAdaptiveCutoff",
            display_name="Adaptive Guidance Cut-off (Guiders)",
            category=CATEGORY,
            description="Adaptive guidance (Castillo et al. 2023, arXiv:2312.12487): CFG until the cosine "
                        "similarity of the cond and uncond noise predictions passes the threshold, then the cond "
                        "alone for the rest of the run, without evaluating the uncond (per image; the uncond "
                        "stops once every image of the batch has stopped). Sets the CFG rule.",
            inputs=[
                model_input(),
                io.Float.Input("threshold", default=0.99, min=0.0, max=1.0, step=0.001,
                               tooltip="γ̄: CFG stops after the first step whose cos(cond, uncond) exceeds it. The "
                                       "paper uses about 0.99 on SD/Emu; lower stops earlier (faster, less "
                                       "guidance), 1 never stops."),
                cfg_schedule_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, threshold, schedule=None) -> io.NodeOutput:
        node = public_id(cls)
        check_inputs(cls, threshold=threshold)

        def cutoff_rule(cond, uncond, scale, state):
            return branch_rules.adaptive_cutoff_cfg(cond, uncond, scale, state, threshold)

        rule = CFGRule(node, cutoff_rule, space="noise", make_state=branch_rules.AdaptiveCutoffState,
                       stopped=lambda state: state.finished)
        return io.NodeOutput(host.add_guidance(
            model, node, lambda s: _with_optional_schedule(with_cfg_rule(s, rule), cls, schedule)))


PERP_NEG_PROJECTIONS = ["per image", "whole batch (ComfyUI PerpNeg)"]


class GuidersPerpNeg(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersPerpNeg",
            display_name="Perp-Neg (Guiders)",
            category=CATEGORY,
            description="Perp-Neg (Armandpour et al. 2023, arXiv:2304.04968): the negative prompt only pushes away "
                        "along what it does not share with the positive, both taken relative to the empty prompt. "
                        "The empty prompt's branch joins the one batched forward with cond and uncond (ComfyUI's "
                        "PerpNeg makes a second call per step). Sets the CFG rule; KSampler's negative is the "
                        "negative prompt.",
            inputs=[
                model_input(),
                io.Conditioning.Input("empty_conditioning",
                                      tooltip="The empty prompt (CLIP Text Encode of \"\"), the base both prompts are "
                                              "measured from."),
                io.Float.Input("neg_scale", default=1.0, min=0.0, max=100.0, step=0.01,
                               tooltip="s: weight of the perpendicular negative (times cfg), as ComfyUI's PerpNeg. "
                                       "1 is the usual; 0 is CFG from the empty prompt, without the negative."),
                io.Combo.Input("projection", options=PERP_NEG_PROJECTIONS, default="per image", optional=True,
                               tooltip="per image: the projection per image (the paper). whole batch: one projection "
                                       "over the whole batch, exactly as ComfyUI's PerpNeg / PerpNegGuider (images "
                                       "of a batch then affect each other)."),
                cfg_schedule_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, empty_conditioning, neg_scale, projection="per image", schedule=None) -> io.NodeOutput:
        node = public_id(cls)
        check_inputs(cls, neg_scale=neg_scale, projection=projection)
        if not isinstance(empty_conditioning, list) or not empty_conditioning:
            raise host.GuidanceError(f"{node}: empty_conditioning must be a CONDITIONING (from CLIP Text Encode of "
                                     "an empty prompt).")
        per_sample = projection == "per image"

        def update(stack):
            name = stack.unique_name("perp_neg_empty")
            stack = stack.with_branch(Branch(name, source=name, conditioning=empty_conditioning))
            rule = stateless_empty_rule(partial(branch_rules.perp_neg, neg_scale=neg_scale, per_sample=per_sample))
            # neutral_scale None: at cfg 1 Perp-Neg is not the cond (the negative still acts), so every branch runs.
            stack = with_cfg_rule(stack, CFGRule(node, rule, space="x0", neutral_scale=None, reads=(name,)))
            return _with_optional_schedule(stack, cls, schedule)

        return io.NodeOutput(host.add_guidance(model, node, update))


def stateless_empty_rule(fn):
    """``fn(cond, uncond, empty, scale)`` as a rule that reads one more branch: ``rule(c, u, w, state, empty)``."""
    def rule(cond, uncond, scale, state, empty):
        return fn(cond, uncond, empty, scale)

    return rule


NODES = [GuidersCFGInterval, GuidersAdaptiveCutoff, GuidersPerpNeg]


# --- rules that remember the trajectory (guidance_core/trajectory_rules) --------------------------------

TRAJECTORY_SPACES = {"velocity (the paper)": "velocity", "x0 (sd-perturbed-attention)": "x0"}


def trajectory_space_input(what: str) -> io.Input:
    return io.Combo.Input("space", options=list(TRAJECTORY_SPACES), default="velocity (the paper)", optional=True,
                          tooltip=f"velocity: {what} on (x − x0)/σ, the flow velocity (ε on SD1.5/SDXL), as the paper. "
                                  "x0: on the denoised prediction, as pamparamm/sd-perturbed-attention's node.")


class GuidersMomentumGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersMomentumGuidance",
            display_name="Momentum Guidance (Guiders)",
            category=CATEGORY,
            description="Momentum guidance (Liao et al. 2026, arXiv:2602.20360): each step's guided velocity is "
                        "pushed away from the running average of the previous steps' (v + α(v − m)), with no extra "
                        "model call. Acts on the whole guided result (CFG and every term), after the post transforms "
                        "added before it. Made for flow models (SD3, Flux); works on every family.",
            inputs=[
                model_input(),
                io.Float.Input("momentum", default=0.5, min=0.0, max=100.0, step=0.01,
                               tooltip="α: 0 = off. 0.5 with CFG, as the reference node recommends; larger without "
                                       "CFG (cfg 1)."),
                io.Float.Input("ema", default=0.6, min=0.0, max=0.999, step=0.01,
                               tooltip="β of the running average m ← β·m + (1 − β)·v: higher remembers more steps."),
                trajectory_space_input("the average and extrapolation"),
                Schedule.Input("schedule", optional=True, tooltip="Optional: α per step (overrides momentum)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, momentum, ema, space="velocity (the paper)", schedule=None) -> io.NodeOutput:
        node = public_id(cls)
        check_inputs(cls, momentum=momentum, ema=ema, space=space)

        def momentum_step(guided, preds, state, ctx):
            alpha = momentum if schedule is None else float(schedule(ctx.step, ctx.num_steps))
            return trajectory_rules.momentum_guidance(guided, state, alpha, ema)

        def update(stack):
            name = stack.unique_name("momentum_guidance")
            return stack.with_post(PostTransform(name, momentum_step, space=TRAJECTORY_SPACES[space],
                                                 make_state=trajectory_rules.MomentumGuidanceState))

        return io.NodeOutput(host.add_guidance(model, node, update))


# The switching term's form: the authors' code takes sign(s) per element; pamparamm's node s/‖s‖ per image.
SMC_SWITCHING = {"sign (the authors' code)": "sign", "unit vector (sd-perturbed-attention)": "unit"}
SMC_SWITCHING_DEFAULT = "sign (the authors' code)"


class GuidersSMCCFG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersSMCCFG",
            display_name="SMC-CFG (Guiders)",
            category=CATEGORY,
            description="Sliding Mode Control CFG (Wang et al., CVPR 2026, arXiv:2603.03281): the guidance error "
                        "c − u is corrected each step toward a sliding surface over its history (ê = e − k·sign(s), "
                        "s = (e − e_prev) + λ·e_prev), then u + w·ê. Steadier at high cfg. Sets the CFG rule.",
            inputs=[
                model_input(),
                io.Float.Input("sliding_lambda", default=5.0, min=0.0, max=100.0, step=0.1,
                               tooltip="λ, the sliding surface's shape. The authors' code recommends 5 (SD3.5, Flux, "
                                       "Qwen-Image, Wan)."),
                io.Float.Input("k", default=0.2, min=0.0, max=2.0, step=0.01,
                               tooltip="Switching gain toward the surface; 0 = plain CFG. The authors' code recommends "
                                       "0.2 with the sign; with the unit vector about 0.1 (sd-perturbed-attention). "
                                       "Lower keeps more realism, higher more prompt alignment."),
                io.Combo.Input("switching", options=list(SMC_SWITCHING), default=SMC_SWITCHING_DEFAULT,
                               optional=True,
                               tooltip="sign: k·sign(s) per element, as the authors' code (hanyang-21/CFG-Ctrl). "
                                       "unit vector: k·s/‖s‖ per image, as pamparamm/sd-perturbed-attention's "
                                       "node (a much smaller correction for the same k)."),
                trajectory_space_input("the error and its correction"),
                cfg_schedule_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, sliding_lambda, k, space="velocity (the paper)", schedule=None,
                switching=SMC_SWITCHING_DEFAULT) -> io.NodeOutput:
        node = public_id(cls)
        check_inputs(cls, sliding_lambda=sliding_lambda, k=k, space=space, switching=switching)
        form = SMC_SWITCHING[switching]

        def sliding_mode_rule(cond, uncond, scale, state):
            return trajectory_rules.smc_cfg(cond, uncond, scale, state, sliding_lambda, k, form)

        rule = CFGRule(node, sliding_mode_rule, space=TRAJECTORY_SPACES[space],
                       make_state=trajectory_rules.SlidingModeState)
        return io.NodeOutput(host.add_guidance(
            model, node, lambda s: _with_optional_schedule(with_cfg_rule(s, rule), cls, schedule)))


NODES += [GuidersMomentumGuidance, GuidersSMCCFG]


# --- CADS: noise on the conditioning (guidance_core/condition_annealing) ----------------------------------

CADS_SOURCES = {"cond": (COND,), "cond and uncond": (COND, UNCOND)}


class GuidersCADS(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersCADS",
            display_name="CADS Condition Annealing (Guiders)",
            category=CATEGORY,
            description="CADS (Sadat et al., ICLR 2024, arXiv:2310.17347): Gaussian noise on the text embedding, "
                        "full early in sampling and annealed away between tau2 and tau1 (the paper's γ(t)), for more "
                        "diverse images at high cfg. Changes the model's input, so it stacks with every rule and term.",
            inputs=[
                model_input(),
                io.Float.Input("noise_scale", default=0.25, min=0.0, max=5.0, step=0.01,
                               tooltip="s: the noise's size next to the embedding. The paper: 0.025-0.25; 0 = off."),
                io.Float.Input("tau1", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="τ1: below this diffusion time (1 = pure noise) the embedding is clean."),
                io.Float.Input("tau2", default=0.9, min=0.0, max=1.0, step=0.01,
                               tooltip="τ2: above this diffusion time the embedding is all noise (γ = 0)."),
                io.Float.Input("psi", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="ψ: mix of the noised embedding rescaled to the clean one's mean and std "
                                       "(§3); 1 = fully rescaled (avoids divergence at large s), 0 = no rescale."),
                io.Combo.Input("apply_to", options=list(CADS_SOURCES), default="cond", optional=True,
                               tooltip="Which prompts get the noise: the positive only, or both."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, optional=True,
                             tooltip="Seed of the embedding noise (the same seed gives the same images)."),
                Schedule.Input("schedule", optional=True, tooltip="Optional: s per step (overrides noise_scale)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, noise_scale, tau1, tau2, psi, apply_to="cond", seed=0, schedule=None) -> io.NodeOutput:
        node = public_id(cls)
        check_inputs(cls, noise_scale=noise_scale, tau1=tau1, tau2=tau2, psi=psi, apply_to=apply_to, seed=seed)
        if not tau1 < tau2:
            raise host.GuidanceError(f"{node}: tau1 ({tau1}) must be below tau2 ({tau2}).")

        def noised_embedding(embedding, t, state, ctx):
            scale = noise_scale if schedule is None else float(schedule(ctx.step, ctx.num_steps))
            gamma = condition_annealing.cads_gamma(t, tau1, tau2)
            return condition_annealing.cads_condition(embedding, gamma, state.draw(embedding), scale, psi)

        def update(stack):
            name = stack.unique_name("cads")
            return stack.with_conditioning(ConditioningTransform(
                name, noised_embedding, sources=CADS_SOURCES[apply_to],
                make_state=lambda: condition_annealing.ConditionNoiseState(seed)))

        return io.NodeOutput(host.add_guidance(model, node, update))


NODES += [GuidersCADS]
