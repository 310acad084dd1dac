"""The CFG rules and corrections of 2023-2025, each a node: TCFG (a pre transform of the uncond), MAMBO-G,
FreSca, Mahiro, FDG and APG-Mix (CFG rules: one per chain, a second raises naming both), CFG renorm and
dynamic thresholding (post transforms of the guided result: they stack with any rule and term).
"""

from __future__ import annotations

import math
from functools import partial

from comfy_api.latest import io

from ..guidance_core import cfg_rules, corrections, frequency
from ..guidance_core.plan import COND, UNCOND, CFGRule, PostTransform, PreTransform, stateless_rule
from ..guidance_core.rules import MomentumBuffer
from . import host
from .common import CATEGORY, model_input, public_id, schedule_input, with_cfg_rule, with_cfg_schedule
from .inputs import check_inputs, finite_in_range
from .schedule_nodes import Schedule

RULE_NOTE = " A CFG rule: one per chain (a second CFG rule node raises naming both); PAG, SEG, SLG terms, " \
            "schedules and post transforms stack with it."
POST_NOTE = " A post transform of the guided result: it stacks with any CFG rule, term or other post transform " \
            "(applied in chain order)."


def cfg_scale_schedule_input() -> io.Input:
    return schedule_input("CFG scale (the sampler's cfg is then ignored)")


def strength_schedule_input() -> io.Input:
    return schedule_input("strength")


def with_rule(cls, rule: CFGRule, schedule):
    """The update of a CFG rule node: the rule, and the CFG scale from ``schedule`` when one is connected."""
    def update(stack):
        stack = with_cfg_rule(stack, rule)
        return with_cfg_schedule(stack, cls, schedule) if schedule is not None else stack

    return update


def strength_at(strength: float, schedule, step) -> float:
    return float(schedule(step.step, step.num_steps)) if schedule is not None else strength


def parse_numbers(node: str, name: str, text, lo: float, hi: float) -> tuple[float, ...]:
    """A comma-separated list of numbers, each finite within lo..hi; an error naming the input otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise host.GuidanceError(f"{node}: {name} must be a list of numbers such as '10, 5', got {text!r}.")
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise host.GuidanceError(f"{node}: {name} {text!r} has {item.strip()!r}, which is not a number; write "
                                     "numbers separated by commas, such as '10, 5'.") from None
        values.append(finite_in_range(node, name, value, lo, hi))
    return tuple(values)


class GuidersTCFG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersTCFG",
            display_name="TCFG Tangential Damping (Guiders)",
            category=CATEGORY,
            description="Tangential Damping CFG (Kwon et al., CVPR 2025, arXiv:2503.18137): before any rule, the "
                        "uncond noise prediction is replaced by its projection on the top singular vector of "
                        "[uncond; cond], per image, dropping the part that pulls away from the prompt. A pre "
                        "transform: it stacks with any CFG rule (APG, MAMBO-G, FDG, ...), term and post transform. "
                        "Use the cfg you would use without it (SD1.5 5-8, SDXL 4-7, SD3.5 3.5-5).",
            inputs=[model_input(), cfg_scale_schedule_input()],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, schedule=None) -> io.NodeOutput:
        def damped_uncond(preds):
            return {UNCOND: cfg_rules.tangential_damping(preds[COND], preds[UNCOND])}

        transform = PreTransform("tcfg", damped_uncond, space="noise", requires=(COND, UNCOND))

        def update(stack):
            stack = stack.with_pre(transform)
            return with_cfg_schedule(stack, cls, schedule) if schedule is not None else stack

        return io.NodeOutput(host.add_guidance(model, public_id(cls), update))


class GuidersMAMBOG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersMAMBOG",
            display_name="MAMBO-G Magnitude-Aware CFG (Guiders)",
            category=CATEGORY,
            description="MAMBO-G (arXiv:2508.03442): the CFG scale of each image is damped where the update is "
                        "large against the uncond, w' = 1 + (w − 1)·exp(−α‖c − u‖/‖u‖), on noise predictions "
                        "(diffusers' MagnitudeAwareGuidance). Allows high cfg without blow-ups in early steps."
                        + RULE_NOTE,
            inputs=[
                model_input(),
                io.Float.Input("alpha", default=8.0, min=0.0, max=100.0, step=0.1,
                               tooltip="α: how fast the scale falls toward 1 as ‖c − u‖/‖u‖ grows. 8 = the paper "
                                       "and diffusers; 0 = plain CFG. Pair with a high cfg (SD3.5/Flux/Qwen 6-10)."),
                cfg_scale_schedule_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, alpha, schedule=None) -> io.NodeOutput:
        check_inputs(cls, alpha=alpha)
        rule = CFGRule(public_id(cls), stateless_rule(partial(cfg_rules.magnitude_aware_cfg, alpha=alpha)),
                       space="noise")
        return io.NodeOutput(host.add_guidance(model, public_id(cls), with_rule(cls, rule, schedule)))


class GuidersFreSca(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersFreSca",
            display_name="FreSca Frequency-Scaled CFG (Guiders)",
            category=CATEGORY,
            description="FreSca (Huang et al. 2025, arXiv:2504.02154; ComfyUI's FreSca node): the guidance term "
                        "c − u is scaled separately in its low and high spatial frequencies (a Fourier gain), then "
                        "CFG: u + w·F(c − u). scale_high > 1 sharpens details." + RULE_NOTE,
            inputs=[
                model_input(),
                io.Float.Input("scale_low", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Gain of the low frequencies of the guidance (1 = unchanged)."),
                io.Float.Input("scale_high", default=1.25, min=0.0, max=10.0, step=0.01,
                               tooltip="Gain of the high frequencies of the guidance; 1.1-1.5 sharpens."),
                io.Int.Input("freq_cutoff", default=20, min=1, max=10000, step=1,
                             tooltip="Half-width, in frequency indices of the latent, of the centred box counted "
                                     "as low frequency (20 = ComfyUI's default; a 128×128 SDXL latent has 64)."),
                cfg_scale_schedule_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale_low, scale_high, freq_cutoff, schedule=None) -> io.NodeOutput:
        check_inputs(cls, scale_low=scale_low, scale_high=scale_high, freq_cutoff=freq_cutoff)
        rule = stateless_rule(partial(frequency.fresca, scale_low=scale_low, scale_high=scale_high,
                                      cutoff=freq_cutoff))
        return io.NodeOutput(host.add_guidance(
            model, public_id(cls), with_rule(cls, CFGRule(public_id(cls), rule, space="x0"), schedule)))


class GuidersMahiro(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersMahiro",
            display_name="Mahiro Positive-Biased CFG (Guiders)",
            category=CATEGORY,
            description="Mahiro / positive-biased guidance (ComfyUI's Mahiro node), on denoised predictions: CFG "
                        "blended with the cond's own leap w·c by how much the uncond agrees with it, so the "
                        "guidance follows the prompt's direction more than its difference from the negative. "
                        "Averages per image (ComfyUI's node averages over the batch)." + RULE_NOTE,
            inputs=[model_input(), cfg_scale_schedule_input()],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, schedule=None) -> io.NodeOutput:
        rule = CFGRule(public_id(cls), stateless_rule(cfg_rules.mahiro), space="x0")
        return io.NodeOutput(host.add_guidance(model, public_id(cls), with_rule(cls, rule, schedule)))


RENORM_MODES = ("cfg_norm", "cfg_norm_pre_cfg", "lumina_renorm")


class GuidersCFGRenorm(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersCFGRenorm",
            display_name="CFG Renorm (Guiders)",
            category=CATEGORY,
            description="Norm corrections of the guided result. cfg_norm: ComfyUI's CFGNorm (per pixel, the guided "
                        "denoised channel vector capped at the cond's length, times strength). cfg_norm_pre_cfg: "
                        "CFGNorm's pre_cfg mode (ComfyUI after 0.8.0; per pixel, the guided noise set to the cond's "
                        "length, blended by strength). lumina_renorm: Lumina 2's RenormCFG (per image, the guided "
                        "denoised norm capped at strength × the cond's)." + POST_NOTE,
            inputs=[
                model_input(),
                io.Combo.Input("mode", options=list(RENORM_MODES), default="cfg_norm",
                               tooltip="cfg_norm / cfg_norm_pre_cfg: ComfyUI's CFGNorm without / with pre_cfg "
                                       "(Lens-style models). lumina_renorm: Lumina 2 / Z-Image's RenormCFG."),
                io.Float.Input("strength", default=1.0, min=0.0, max=100.0, step=0.01,
                               tooltip="cfg_norm: multiplies the capped result (1 = the cap alone, as ComfyUI). "
                                       "cfg_norm_pre_cfg: 1 = full renorm, 0 = off. lumina_renorm: the largest "
                                       "allowed ‖guided‖/‖cond‖ (1 = Lumina's default, 0 = off)."),
                strength_schedule_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, mode, strength, schedule=None) -> io.NodeOutput:
        check_inputs(cls, mode=mode, strength=strength)
        correction, space = {
            "cfg_norm": (corrections.channel_norm_cap, "x0"),
            "cfg_norm_pre_cfg": (corrections.channel_renorm, "noise"),
            "lumina_renorm": (corrections.norm_cap, "x0"),
        }[mode]

        def renorm(guided, preds, step):
            return correction(guided, preds[COND], strength_at(strength, schedule, step))

        transform = PostTransform(mode, renorm, space=space, requires=(COND,), takes_step=True)
        return io.NodeOutput(host.add_guidance(model, public_id(cls), lambda s: s.with_post(transform)))


class GuidersDynamicThresholding(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersDynamicThresholding",
            display_name="Dynamic Thresholding (Guiders)",
            category=CATEGORY,
            description="Clips the guided denoised prediction so high cfg does not saturate. imagen: Imagen's "
                        "dynamic thresholding (diffusers' _threshold_sample): per image, clip to the percentile s "
                        "of |x0| (s in [1, max_value]) and divide by s; for pixel-space models. mimic_scale: "
                        "sd-dynamic-thresholding's mimic CFG (per channel, the spread of a CFG at mimic_scale)."
                        + POST_NOTE,
            inputs=[
                model_input(),
                io.Combo.Input("mode", options=["imagen", "mimic_scale"], default="imagen",
                               tooltip="imagen: the paper's x0 clip (pixel models, DeepFloyd IF). mimic_scale: "
                                       "high cfg with the look of a lower one on latent models (SD1.5, SDXL)."),
                io.Float.Input("percentile", default=0.995, min=0.0, max=1.0, step=0.001,
                               tooltip="imagen: the percentile of |x0| used as s (0.995 = Imagen). mimic_scale: the "
                                       "percentile of the guided spread (sd-dynamic-thresholding uses 1.0)."),
                io.Float.Input("max_value", default=1.0, min=1.0, max=100.0, step=0.01,
                               tooltip="imagen: the largest s (1.0 = diffusers' default: a static clip to [-1, 1])."),
                io.Float.Input("mimic_scale", default=7.0, min=0.0, max=100.0, step=0.1,
                               tooltip="mimic_scale: the cfg whose spread the result keeps (7 = the extension's "
                                       "default); use a sampler cfg above it."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Blend of the thresholded result with the unthresholded one (1 = full)."),
                strength_schedule_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, mode, percentile, max_value, mimic_scale, strength, schedule=None) -> io.NodeOutput:
        check_inputs(cls, mode=mode, percentile=percentile, max_value=max_value, mimic_scale=mimic_scale,
                     strength=strength)
        if mode == "imagen":
            def threshold(guided, preds, step):
                return corrections.dynamic_threshold(guided, percentile, max_value,
                                                     strength_at(strength, schedule, step))
            requires = (COND,)
        else:
            def threshold(guided, preds, step):
                return corrections.mimic_threshold(guided, preds[COND], preds[UNCOND], mimic_scale, percentile,
                                                   strength_at(strength, schedule, step))
            requires = (COND, UNCOND)
        transform = PostTransform("dynamic_threshold", threshold, space="x0", requires=requires, takes_step=True)
        return io.NodeOutput(host.add_guidance(model, public_id(cls), lambda s: s.with_post(transform)))


FDG_MAX_LEVELS = 6


class GuidersFDG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersFDG",
            display_name="FDG Frequency-Decoupled Guidance (Guiders)",
            category=CATEGORY,
            description="Frequency-Decoupled Guidance (Sadat et al. 2025, arXiv:2506.19713): cond and uncond are "
                        "split into Laplacian pyramid levels and each level gets its own CFG scale (high "
                        "frequencies strong, low ones weak: detail without oversaturation). The levels' scales "
                        "replace the sampler's cfg (keep cfg above 1). Any latent size." + RULE_NOTE,
            inputs=[
                model_input(),
                io.String.Input("scales", default="10, 5",
                                tooltip="One CFG scale per level, highest frequency first. '10, 5' = diffusers' "
                                        "default (SDXL, paper Table 8); SD1.5 '12, 6'; flow models about half."),
                io.String.Input("parallel_weights", default="1.0",
                                tooltip="Weight of the guidance parallel to the cond per level (one value for all, "
                                        "or one per level); 1 = plain CFG shift, the paper uses 0-1."),
                io.Combo.Input("space", options=["noise", "x0"], default="noise", optional=True,
                               tooltip="Where the parallel part is projected: noise (as diffusers, on the model "
                                       "output) or x0. Without parallel weights both give the same result."),
                Schedule.Input("schedule", optional=True,
                               tooltip="Optional: a strength per step; each level's scale becomes 1 + strength·"
                                       "(scale − 1) (1 = the scales as given, 0 = the cond alone)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scales, parallel_weights, space="noise", schedule=None) -> io.NodeOutput:
        check_inputs(cls, scales=scales, parallel_weights=parallel_weights, space=space)
        node = public_id(cls)
        level_scales = parse_numbers(node, "scales", scales, -100.0, 100.0)
        if len(level_scales) > FDG_MAX_LEVELS:
            raise host.GuidanceError(f"{node}: scales has {len(level_scales)} levels; at most {FDG_MAX_LEVELS}.")
        weights = parse_numbers(node, "parallel_weights", parallel_weights, -10.0, 10.0)
        if len(weights) == 1:
            weights = weights * len(level_scales)
        elif len(weights) != len(level_scales):
            raise host.GuidanceError(f"{node}: parallel_weights has {len(weights)} values but scales has "
                                     f"{len(level_scales)} levels; give one value, or one per level.")

        def fdg_rule(cond, uncond, scale, state, step):
            scales_now = level_scales
            if schedule is not None:
                strength = float(schedule(step.step, step.num_steps))
                scales_now = tuple(1.0 + strength * (w - 1.0) for w in level_scales)
            if all(math.isclose(w, 1.0) for w in scales_now):  # diffusers' _is_fdg_enabled: no guidance at all
                return cond
            return frequency.frequency_decoupled_cfg(cond, uncond, scales_now, weights)

        rule = CFGRule(node, fdg_rule, space=space, neutral_scale=None, takes_step=True)
        return io.NodeOutput(host.add_guidance(model, node, lambda s: with_cfg_rule(s, rule)))


class GuidersAPGMix(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersAPGMix",
            display_name="APG-Mix (Guiders)",
            category=CATEGORY,
            description="diffusers' AdaptiveProjectedMixGuidance (HunyuanImage 2.1): plain CFG at the sampler's cfg "
                        "for the first steps, then APG (Sadat et al., arXiv:2410.02416) at its own scale, "
                        "u + s·(Δ⊥ + η·Δ∥) with momentum and a norm threshold, on the model output (noise / σ: ε, "
                        "or a flow model's velocity). The momentum runs over every step." + RULE_NOTE,
            inputs=[
                model_input(),
                io.Float.Input("apg_scale", default=10.0, min=0.0, max=100.0, step=0.1,
                               tooltip="APG's scale after apg_start_step (diffusers: 10). The sampler's cfg is the "
                                       "scale before it (diffusers: 3.5)."),
                io.Int.Input("apg_start_step", default=5, min=0, max=10000,
                             tooltip="APG from the step after this one (0-based; diffusers: 5); CFG up to it."),
                io.Float.Input("eta", default=0.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Weight of the update parallel to the cond (η; diffusers: 0)."),
                io.Float.Input("norm_threshold", default=10.0, min=0.0, max=1000.0, step=0.5,
                               tooltip="Caps the update's per-image norm on the model output (r; diffusers: 10); "
                                       "0 = off."),
                io.Float.Input("momentum", default=-0.5, min=-1.5, max=1.0, step=0.01,
                               tooltip="β of the running average of c − u over every step (diffusers: -0.5); "
                                       "0 = none. Reset at the start of every run."),
                cfg_scale_schedule_input(),
                io.Float.Input("start", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Guidance (CFG or APG) from this fraction of the steps on (diffusers' "
                                       "start: step ≥ int(start·steps)); before it the cond alone, and the "
                                       "momentum does not move. 0 = from the first step."),
                io.Float.Input("stop", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Guidance up to this fraction of the steps (diffusers' stop: step < "
                                       "int(stop·steps)); after it the cond alone. 1 = to the last step."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, apg_scale, apg_start_step, eta, norm_threshold, momentum, schedule=None, start=0.0,
                stop=1.0) -> io.NodeOutput:
        check_inputs(cls, apg_scale=apg_scale, apg_start_step=apg_start_step, eta=eta,
                     norm_threshold=norm_threshold, momentum=momentum, start=start, stop=stop)
        if start >= stop:
            raise host.GuidanceError(f"GuidersAPGMix: start ({start}) must be below stop ({stop}): guidance runs on "
                                     "the steps from int(start·steps) up to, not including, int(stop·steps).")

        def apg_mix_rule(cond, uncond, scale, momentum_buffer, step):
            # diffusers' _is_cfg_enabled: outside [start, stop) of the steps the cond alone, momentum untouched.
            if not int(start * step.num_steps) <= step.step < int(stop * step.num_steps):
                return cond
            # Noise predictions are σ·(model output) on EPS and flow models: the threshold and the momentum
            # average act on the model output, as diffusers'.
            sigma = step.sigma if step.sigma > 0 and math.isfinite(step.sigma) else 1.0
            guided = cfg_rules.apg_mix(cond / sigma, uncond / sigma, scale, use_apg=step.step > apg_start_step,
                                       apg_scale=apg_scale, eta=eta, norm_threshold=norm_threshold,
                                       momentum_buffer=momentum_buffer)
            return guided * sigma

        make_state = (lambda: MomentumBuffer(momentum)) if momentum != 0 else None
        rule = CFGRule(public_id(cls), apg_mix_rule, space="noise", make_state=make_state, takes_step=True)
        return io.NodeOutput(host.add_guidance(model, public_id(cls), with_rule(cls, rule, schedule)))


NODES = [GuidersTCFG, GuidersMAMBOG, GuidersFreSca, GuidersMahiro, GuidersCFGRenorm, GuidersDynamicThresholding,
         GuidersFDG, GuidersAPGMix]
