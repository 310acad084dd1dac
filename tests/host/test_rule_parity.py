"""The CFG rules and corrections of issue #13 (nodes/cfg_rule_nodes.py) against their references, through
ComfyUI's real sampling (KSampler) on the tiny SD1.5 UNet and a tiny DiT (Flux or SD3).

References: ComfyUI's own nodes where it has the method (TCFG, FreSca, Mahiro, CFGNorm, RenormCFG), else a
model clone whose ``sampler_cfg_function`` calls diffusers 0.42.1 (TangentialClassifierFreeGuidance,
MagnitudeAwareGuidance, FrequencyDecoupledGuidance, AdaptiveProjectedMixGuidance, DDPMScheduler's
``_threshold_sample``) on the predictions ComfyUI hands that hook, or a reference written here from the
method's definition (sd-dynamic-thresholding's mimic scale, which is no package). Every comparison also checks
that the reference is far from plain CFG (``assert_parity``), so a node that did nothing could not pass.

Each test's docstring names the break it was shown to catch (applied to the node or core function, run,
seen to fail, reverted).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.guiders import (
    AdaptiveProjectedMixGuidance,
    FrequencyDecoupledGuidance,
    MagnitudeAwareGuidance,
    TangentialClassifierFreeGuidance,
)
from diffusers.guiders.adaptive_projected_guidance_mix import MomentumBuffer as DiffusersMomentumBuffer
from diffusers.guiders.guider_utils import rescale_noise_cfg
from harness import host_path
from support import CFG, MIN_EFFECT, STEPS, assert_parity, node, relative_error
from support import sample_family as run

DIT = "flux"
FAMILIES = pytest.mark.parametrize("family", ["sd15", DIT])


@pytest.fixture(autouse=True)
def _pack(guiders_pack):
    return guiders_pack


def step_index(args: dict) -> tuple[int, int]:
    """(step, number of steps) of a sampler_cfg_function call: the position of its σ in the run's sigmas."""
    sample_sigmas = args["model_options"]["transformer_options"]["sample_sigmas"].float().cpu()
    sigma = float(args["sigma"].flatten()[0])
    return int(torch.argmin((sample_sigmas - sigma).abs())), len(sample_sigmas) - 1


def with_cfg_function(model, cfg_function):
    reference = model.clone()
    reference.set_model_sampler_cfg_function(cfg_function)
    return reference


def linear(start: float, end: float, step: int, num_steps: int) -> float:
    """GuidersScheduleLinear's value (guidance_core.schedules.Linear: start at step 0, end at the last)."""
    return start + (end - start) * step / max(num_steps - 1, 1)


# ---------------------------------------------------------------------------------------------------------
# TCFG: a pre transform of the uncond


@FAMILIES
def test_tcfg_matches_builtin_tcfg(tiny_model, family: str) -> None:
    """ComfyUI's TCFG node (pre-CFG, on x − x0). Breaks caught (error sd15 / flux): the cond projected in
    place of the uncond (``tangential_damping(preds[UNCOND], preds[COND])``): 2.0e-2 / 0.32; the projection on
    the second singular vector (e_u, e_c → −e_c, e_u): 1.8 / 1.5 (in the diffusers test); the pre transform
    declared in x0 space: 2.0e-2 / 0.25."""
    model = tiny_model(family)
    ours = node("GuidersTCFG", model=model)
    builtin = node("TCFG", model=model)
    assert_parity(run(ours, family), run(builtin, family), run(model, family))


@FAMILIES
def test_tcfg_matches_diffusers_tangential_cfg(tiny_model, family: str) -> None:
    """diffusers' TangentialClassifierFreeGuidance on ComfyUI's noise predictions (x − x0). Same breaks as
    test_tcfg_matches_builtin_tcfg."""
    model = tiny_model(family)
    guider = TangentialClassifierFreeGuidance(guidance_scale=CFG)

    def tcfg(args):
        return guider.forward(args["cond"], args["uncond"]).pred

    ours = node("GuidersTCFG", model=model)
    assert_parity(run(ours, family), run(with_cfg_function(model, tcfg), family), run(model, family))


def test_tcfg_with_pag_and_a_cfg_schedule_is_damped_uncond_then_scheduled_cfg_plus_pag(sd15_model) -> None:
    """The pre transform's composition (README): TCFG damps the uncond before any rule, the CFG term runs at the
    scheduled scale on the damped uncond, PAG adds s·(cond − perturbed). Reference: ComfyUI's TCFG (pre-CFG),
    a sampler_cfg_function at the schedule's scale, ComfyUI's PerturbedAttentionGuidance (post-CFG). Break
    caught: the plan's pre transforms not applied (``preds = self.pre_transformed(...)`` dropped): 0.45."""
    schedule = node("GuidersScheduleLinear", start_value=8.0, end_value=2.0)
    ours = node("GuidersScheduledCFG", model=sd15_model, schedule=schedule)
    ours = node("GuidersTCFG", model=ours)
    ours = node("GuidersPAG", model=ours, scale=2.0, layers="middle")

    def scheduled_cfg(args):
        step, num_steps = step_index(args)
        return args["uncond"] + linear(8.0, 2.0, step, num_steps) * (args["cond"] - args["uncond"])

    reference = node("TCFG", model=with_cfg_function(sd15_model, scheduled_cfg))
    reference = node("PerturbedAttentionGuidance", model=reference, scale=2.0)
    assert_parity(run(ours, "sd15"), run(reference, "sd15"), run(sd15_model, "sd15"))


def test_tcfg_own_schedule_drives_the_cfg_scale_on_the_damped_uncond(sd15_model) -> None:
    """TCFG's optional schedule: the CFG scale per step (the sampler's cfg ignored), on TCFG's damped uncond.
    Reference: ComfyUI's TCFG around a sampler_cfg_function at the schedule's scale. Break caught: the
    schedule ignored (the sampler's cfg 5): 0.22."""
    schedule = node("GuidersScheduleLinear", start_value=8.0, end_value=2.0)
    ours = node("GuidersTCFG", model=sd15_model, schedule=schedule)

    def scheduled_cfg(args):
        step, num_steps = step_index(args)
        return args["uncond"] + linear(8.0, 2.0, step, num_steps) * (args["cond"] - args["uncond"])

    reference = node("TCFG", model=with_cfg_function(sd15_model, scheduled_cfg))
    assert_parity(run(ours, "sd15"), run(reference, "sd15"), run(sd15_model, "sd15"))


# ---------------------------------------------------------------------------------------------------------
# MAMBO-G: a CFG rule


def diffusers_mambo(cond: torch.Tensor, uncond: torch.Tensor, scale: float, alpha: float) -> torch.Tensor:
    """diffusers' MagnitudeAwareGuidance on (B, C, H, W) predictions. Its ``torch.norm(x, dim=[1, 2, 3])``
    raises on 4-D input (a Frobenius matrix norm needs 2 dims), so the predictions are handed to it as
    (B, C, H·W), where it is the per-sample L2 norm it means."""
    guider = MagnitudeAwareGuidance(guidance_scale=scale, alpha=alpha)
    return guider.forward(cond.flatten(2), uncond.flatten(2)).pred.reshape(cond.shape)


@FAMILIES
@pytest.mark.parametrize("alpha", [0.5, 8.0])
def test_mambo_g_matches_diffusers_magnitude_aware_guidance(tiny_model, family: str, alpha: float) -> None:
    """On ComfyUI's noise predictions. Breaks caught (error over the four cases): exp(+α·ratio): 0.24 .. 850;
    the ratio over ‖c‖ in place of ‖u‖: 1.2e-3 .. 4.4e-2; the rule declared in x0 space: 5.4e-2 .. 0.14."""
    model = tiny_model(family)
    ours = node("GuidersMAMBOG", model=model, alpha=alpha)

    def mambo(args):
        return diffusers_mambo(args["cond"], args["uncond"], args["cond_scale"], alpha)

    assert_parity(run(ours, family), run(with_cfg_function(model, mambo), family), run(model, family))


def test_mambo_g_with_pag_and_its_schedule_is_the_rule_at_the_scheduled_scale_plus_pag(sd15_model) -> None:
    """A CFG rule's composition: the rule at the schedule's scale, then PAG's s·(cond − perturbed) added.
    Reference: diffusers' MAMBO-G at the scheduled scale as sampler_cfg_function, then ComfyUI's PAG. Break
    caught: the node's schedule ignored (the sampler's cfg used): error 0.18."""
    schedule = node("GuidersScheduleLinear", start_value=8.0, end_value=2.0)
    ours = node("GuidersMAMBOG", model=sd15_model, alpha=2.0, schedule=schedule)
    ours = node("GuidersPAG", model=ours, scale=2.0, layers="middle")

    def scheduled_mambo(args):
        step, num_steps = step_index(args)
        return diffusers_mambo(args["cond"], args["uncond"], linear(8.0, 2.0, step, num_steps), 2.0)

    reference = node("PerturbedAttentionGuidance", model=with_cfg_function(sd15_model, scheduled_mambo), scale=2.0)
    assert_parity(run(ours, "sd15"), run(reference, "sd15"), run(sd15_model, "sd15"))


def test_a_second_cfg_rule_raises_naming_both(sd15_model) -> None:
    """Two rules cannot both define the combination: MAMBO-G then FDG (and FreSca then Mahiro) is an error that
    names both nodes."""
    first = node("GuidersMAMBOG", model=sd15_model, alpha=8.0)
    with pytest.raises(Exception, match=r"GuidersFDG.*GuidersMAMBOG|GuidersMAMBOG.*GuidersFDG"):
        node("GuidersFDG", model=first, scales="10, 5", parallel_weights="1.0")
    first = node("GuidersFreSca", model=sd15_model, scale_low=1.0, scale_high=1.25, freq_cutoff=20)
    with pytest.raises(Exception, match=r"GuidersMahiro.*GuidersFreSca"):
        node("GuidersMahiro", model=first)


# ---------------------------------------------------------------------------------------------------------
# FreSca and Mahiro: CFG rules against ComfyUI's nodes


@FAMILIES
def test_fresca_matches_builtin_fresca(tiny_model, family: str) -> None:
    """ComfyUI's FreSca (a pre-CFG cond u + F(c − u)). The 16×16 latent's spectrum has 8 indices each side of
    its centre, so a cutoff of 3 splits it. Breaks caught (error sd15 / flux): scale_low and scale_high swapped:
    0.45 / 0.57; the filter on c in place of c − u: 2.3e3 / 1.3e2; the low band one index wider: 0.11 / 6.1e-2."""
    model = tiny_model(family)
    settings = {"scale_low": 0.8, "scale_high": 1.6, "freq_cutoff": 3}
    ours = node("GuidersFreSca", model=model, **settings)
    builtin = node("FreSca", model=model, **settings)
    assert_parity(run(ours, family), run(builtin, family), run(model, family))


@FAMILIES
def test_mahiro_matches_builtin_mahiro(tiny_model, family: str) -> None:
    """ComfyUI's Mahiro (post-CFG, on x0; batch 1, where its batch-wide mean is the per-image mean). Breaks
    caught (error sd15 / flux): the weight k = 2(s + 1) on the leap in place of the CFG: 2.5e2 / 25; the
    similarity without the signed square roots: 2.8e-2 / 2.6e-2; the rule in noise space: 0.14 / 0.42."""
    model = tiny_model(family)
    ours = node("GuidersMahiro", model=model)
    builtin = node("Mahiro", model=model)
    assert_parity(run(ours, family), run(builtin, family), run(model, family))


# ---------------------------------------------------------------------------------------------------------
# CFG renorm and dynamic thresholding: post transforms


def host_version() -> tuple[int, ...]:
    text = (host_path() / "comfyui_version.py").read_text()
    version = text.split("=")[-1].strip().strip("\"'")
    return tuple(int(part) for part in version.split("."))


@FAMILIES
@pytest.mark.parametrize("strength", [1.0, 0.8])
def test_cfg_renorm_cfg_norm_matches_builtin_cfg_norm(tiny_model, family: str, strength: float) -> None:
    """ComfyUI's CFGNorm (post-CFG, per-pixel channel norms of x0). Breaks caught: the ratio not clamped at 1
    (lengthened too): 1.6e-4 .. 0.27; strength ignored: 0.67 .. 1.2 (strength 0.8); the cond's norm taken from
    the uncond (``preds[UNCOND]``, every renorm mode): 5.9e-2 .. 0.12."""
    model = tiny_model(family)
    ours = node("GuidersCFGRenorm", model=model, mode="cfg_norm", strength=strength)
    builtin = node("CFGNorm", model=model, strength=strength)
    assert_parity(run(ours, family), run(builtin, family), run(model, family))


@FAMILIES
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_cfg_renorm_pre_cfg_matches_builtin_cfg_norm_pre_cfg(tiny_model, family: str, strength: float) -> None:
    """ComfyUI's CFGNorm with pre_cfg (noise space, renormed both ways), which ComfyUI added after 0.8.0 (so it
    runs on 0.33.0). Breaks caught: the blend weights swapped: 0.64 / 2.0 (strength 0.5); the mode in x0 space:
    0.19 .. 0.58."""
    if host_version() < (0, 9, 0):
        pytest.skip("CFGNorm's pre_cfg input is not in ComfyUI 0.8.0 (the reference); run on 0.33.0")
    model = tiny_model(family)
    ours = node("GuidersCFGRenorm", model=model, mode="cfg_norm_pre_cfg", strength=strength)
    builtin = node("CFGNorm", model=model, strength=strength, pre_cfg=True)
    assert_parity(run(ours, family), run(builtin, family), run(model, family))


@FAMILIES
@pytest.mark.parametrize("max_ratio", [1.0, 0.7])
def test_cfg_renorm_lumina_matches_builtin_renorm_cfg(tiny_model, family: str, max_ratio: float) -> None:
    """ComfyUI's RenormCFG (Lumina 2; cfg_trunc 100 keeps it on at every step of these models). Break caught:
    the cap at ‖c‖ whatever the ratio (max_ratio ignored): 1.3 .. 2.3 (ratio 0.7)."""
    model = tiny_model(family)
    ours = node("GuidersCFGRenorm", model=model, mode="lumina_renorm", strength=max_ratio)
    builtin = node("RenormCFG", model=model, cfg_trunc=100.0, renorm_cfg=max_ratio)
    assert_parity(run(ours, family), run(builtin, family), run(model, family))


def test_cfg_renorm_after_pag_and_a_cfg_schedule_renorms_the_whole_result(sd15_model) -> None:
    """A post transform's composition: applied to the guided result with every term in it (here the scheduled
    CFG and PAG). Reference: a scheduled sampler_cfg_function, ComfyUI's PAG, then ComfyUI's CFGNorm (post-CFG
    hooks run in the order they were added). Break caught: the cond's norm taken from the uncond: 0.12."""
    schedule = node("GuidersScheduleLinear", start_value=8.0, end_value=2.0)
    ours = node("GuidersScheduledCFG", model=sd15_model, schedule=schedule)
    ours = node("GuidersPAG", model=ours, scale=2.0, layers="middle")
    ours = node("GuidersCFGRenorm", model=ours, mode="cfg_norm", strength=1.0)

    def scheduled_cfg(args):
        step, num_steps = step_index(args)
        return args["uncond"] + linear(8.0, 2.0, step, num_steps) * (args["cond"] - args["uncond"])

    reference = node("PerturbedAttentionGuidance", model=with_cfg_function(sd15_model, scheduled_cfg), scale=2.0)
    reference = node("CFGNorm", model=reference, strength=1.0)
    assert_parity(run(ours, "sd15"), run(reference, "sd15"), run(sd15_model, "sd15"))


def test_cfg_renorm_strength_schedule_gives_each_step_its_strength(sd15_model) -> None:
    """The strength schedule: strength at step i = the schedule's value there (linear 1 → 0.5), against a
    reference applying ComfyUI's CFGNorm formula (written here, as its node has one strength) at that value.
    Break caught: the schedule ignored (the strength widget used): 2.3."""
    schedule = node("GuidersScheduleLinear", start_value=1.0, end_value=0.5)
    ours = node("GuidersCFGRenorm", model=sd15_model, mode="cfg_norm", strength=1.0, schedule=schedule)

    def cfg_norm(args):
        step, num_steps = step_index(args)
        x0 = args["uncond_denoised"] + args["cond_scale"] * (args["cond_denoised"] - args["uncond_denoised"])
        ratio = torch.norm(args["cond_denoised"], dim=1, keepdim=True) / (torch.norm(x0, dim=1, keepdim=True) + 1e-8)
        return args["input"] - x0 * ratio.clamp(0.0, 1.0) * linear(1.0, 0.5, step, num_steps)

    assert_parity(run(ours, "sd15"), run(with_cfg_function(sd15_model, cfg_norm), "sd15"), run(sd15_model, "sd15"))


def diffusers_threshold(x0: torch.Tensor, percentile: float, max_value: float) -> torch.Tensor:
    scheduler = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=percentile, sample_max_value=max_value)
    return scheduler._threshold_sample(x0)


@FAMILIES
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_dynamic_thresholding_imagen_matches_diffusers_threshold_sample(tiny_model, family: str,
                                                                        strength: float) -> None:
    """diffusers' ``_threshold_sample`` (DDPMScheduler, thresholding on) applied to the CFG x0. max_value 1.5
    puts s between 1 and its cap on these latents. Breaks caught: no division by s (a clip only): 0.20 .. 1.7;
    strength as 1 − strength: 0.83 .. 13."""
    model = tiny_model(family)
    ours = node("GuidersDynamicThresholding", model=model, mode="imagen", percentile=0.9, max_value=1.5,
                mimic_scale=7.0, strength=strength)

    def thresholded(args):
        x0 = args["uncond_denoised"] + args["cond_scale"] * (args["cond_denoised"] - args["uncond_denoised"])
        return args["input"] - (strength * diffusers_threshold(x0, 0.9, 1.5) + (1 - strength) * x0)

    assert_parity(run(ours, family), run(with_cfg_function(model, thresholded), family), run(model, family))


def mimic_reference(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float, mimic_scale: float,
                    percentile: float) -> torch.Tensor:
    """sd-dynamic-thresholding's ``dynthresh`` with its defaults (separate feature channels, MEAN start point, AD
    variability measure, interpolate_phi 1), written here from its algorithm, on x0 predictions."""
    mimic = (uncond + mimic_scale * (cond - uncond)).flatten(2)
    target = (uncond + cfg_scale * (cond - uncond)).flatten(2)
    mimic_centred = mimic - mimic.mean(dim=2, keepdim=True)
    target_mean = target.mean(dim=2, keepdim=True)
    target_centred = target - target_mean
    mimic_reference_value = mimic_centred.abs().max(dim=2).values.unsqueeze(2)
    target_reference_value = torch.quantile(target_centred.abs(), percentile, dim=2).unsqueeze(2)
    largest = torch.maximum(mimic_reference_value, target_reference_value)
    clamped = target_centred.clamp(-largest, largest)
    return ((clamped / largest) * mimic_reference_value + target_mean).unflatten(2, cond.shape[2:])


@FAMILIES
@pytest.mark.parametrize("percentile", [1.0, 0.95])
def test_dynamic_thresholding_mimic_matches_sd_dynamic_thresholding(tiny_model, family: str,
                                                                    percentile: float) -> None:
    """The mimic-scale variant at cfg 5 mimicking 2. Breaks caught: the mimic built at cfg 5 (``mimic_scale``
    ignored): 0.31 .. 0.87; the mean not put back: 5.5e-2 .. 0.65."""
    model = tiny_model(family)
    ours = node("GuidersDynamicThresholding", model=model, mode="mimic_scale", percentile=percentile,
                max_value=1.0, mimic_scale=2.0, strength=1.0)

    def mimic(args):
        x0 = mimic_reference(args["cond_denoised"], args["uncond_denoised"], args["cond_scale"], 2.0, percentile)
        return args["input"] - x0

    assert_parity(run(ours, family), run(with_cfg_function(model, mimic), family), run(model, family))


# ---------------------------------------------------------------------------------------------------------
# FDG: a CFG rule with one scale per pyramid level


@FAMILIES
@pytest.mark.parametrize(("scales", "weights"), [((10.0, 5.0), (1.0, 1.0)), ((8.0, 4.0, 2.0), (0.5, 0.0, 1.0))])
def test_fdg_matches_diffusers_frequency_decoupled_guidance(tiny_model, family: str, scales, weights) -> None:
    """diffusers' FrequencyDecoupledGuidance (kornia pyramid) on ComfyUI's noise predictions of a 16×16
    latent (a power of two, where kornia pads nothing). Breaks caught: the level scales reversed (low first):
    0.54 .. 0.92; the parallel weight on the orthogonal part (second case): 0.48 / 0.62; the pyramid blur
    zero-padded in place of reflect-padded: 9.4e-2 .. 0.15."""
    model = tiny_model(family)
    ours = node("GuidersFDG", model=model, scales=", ".join(map(str, scales)),
                parallel_weights=", ".join(map(str, weights)), space="noise")
    guider = FrequencyDecoupledGuidance(guidance_scales=list(scales), parallel_weights=list(weights))

    def fdg(args):
        return guider.forward(args["cond"], args["uncond"]).pred

    assert_parity(run(ours, family), run(with_cfg_function(model, fdg), family), run(model, family))


def test_fdg_schedule_scales_every_level_guidance_per_step(sd15_model) -> None:
    """FDG's optional schedule: a strength f per step, each level's scale 1 + f·(w − 1). Reference: diffusers'
    FrequencyDecoupledGuidance rebuilt at each step with those scales (f 0 → 1: the first step has every scale
    1, where diffusers returns the cond). Breaks caught: the schedule ignored: 1.5; f multiplying the scales
    themselves (f·w): 0.18; all-1 scales combined as u + Δ⊥ + w·Δ∥ in place of the cond: 1.0e-3."""
    scales, weights = (10.0, 5.0), (1.0, 0.5)
    schedule = node("GuidersScheduleLinear", start_value=0.0, end_value=1.0)
    ours = node("GuidersFDG", model=sd15_model, scales="10, 5", parallel_weights="1.0, 0.5", space="noise",
                schedule=schedule)

    def fdg(args):
        step, num_steps = step_index(args)
        strength = linear(0.0, 1.0, step, num_steps)
        guider = FrequencyDecoupledGuidance(guidance_scales=[1.0 + strength * (w - 1.0) for w in scales],
                                            parallel_weights=list(weights))
        return guider.forward(args["cond"], args["uncond"]).pred

    assert_parity(run(ours, "sd15"), run(with_cfg_function(sd15_model, fdg), "sd15"), run(sd15_model, "sd15"))


def test_fdg_keeps_a_non_power_of_two_latent_and_equal_scales_give_plain_cfg(sd15_model) -> None:
    """On a 12×20 latent in 4 levels (12, 6, 3, 2 by 20, 10, 5, 3; kornia would pad it to 16×32): the result has
    the latent's shape, FDG with every level at the sampler's scale is plain CFG (the pyramid reconstructs
    exactly), and unequal scales are not. Break caught: a level expanded to twice its size instead of its
    parent's (a shape mismatch at the 3×5 level: 2·3 ≠ 5)."""
    plain = run(sd15_model, "sd15", h=12, w=20)
    equal = node("GuidersFDG", model=sd15_model, scales=", ".join([str(CFG)] * 4), parallel_weights="1.0")
    equal_out = run(equal, "sd15", h=12, w=20)
    assert equal_out.shape == plain.shape
    assert relative_error(equal_out, plain) < 1e-4
    decoupled = node("GuidersFDG", model=sd15_model, scales="10, 5, 2, 1", parallel_weights="1.0")
    assert relative_error(run(decoupled, "sd15", h=12, w=20), plain) > MIN_EFFECT


# ---------------------------------------------------------------------------------------------------------
# APG-Mix: a CFG rule that reads the step


def diffusers_apg_mix_model(model, start_step: int, apg_scale: float, eta: float, norm_threshold: float,
                            momentum: float, log: list, cfg_scale_at=None, start: float = 0.0, stop: float = 1.0):
    """A reference whose CFG is diffusers' AdaptiveProjectedMixGuidance on the model output (noise / σ: ε for
    SD1.5, the velocity for Flux), multiplied back by σ. ``log`` records per call whether APG was on;
    ``cfg_scale_at(step, num_steps)``, when given, sets the guider's CFG scale at each step (a schedule)."""
    guider = AdaptiveProjectedMixGuidance(
        guidance_scale=CFG, adaptive_projected_guidance_scale=apg_scale, adaptive_projected_guidance_momentum=momentum,
        adaptive_projected_guidance_rescale=norm_threshold, eta=eta,
        adaptive_projected_guidance_start_step=start_step, start=start, stop=stop)

    def apg_mix(args):
        step, num_steps = step_index(args)
        if step == 0:  # as diffusers' prepare_inputs: a fresh buffer at each run's step 0
            guider.momentum_buffer = DiffusersMomentumBuffer(momentum)
        guider.set_state(step, num_steps, args["sigma"])
        if cfg_scale_at is not None:
            guider.guidance_scale = cfg_scale_at(step, num_steps)
        log.append(guider._is_apg_enabled())
        sigma = args["sigma"].reshape(-1, *([1] * (args["cond"].ndim - 1)))
        return guider.forward(args["cond"] / sigma, args["uncond"] / sigma).pred * sigma

    return with_cfg_function(model, apg_mix)


@FAMILIES
@pytest.mark.parametrize(("start_step", "eta", "norm_threshold", "momentum"),
                         [(1, 0.0, 10.0, -0.5), (0, 0.5, 1.0, 0.3)])
def test_apg_mix_matches_diffusers_adaptive_projected_mix_guidance(tiny_model, family: str, start_step: int, eta: float,
                                                                   norm_threshold: float, momentum: float) -> None:
    """CFG up to the start step, APG after it (steps 2-3 for start step 1; 1-3 for 0), momentum over all.
    Breaks caught: the momentum not updated on the CFG steps: 4.2e-3 .. 0.12; APG from the start step itself
    (``>=``): 0.58 .. 0.66; the threshold and momentum on x − x0 in place of the model output (no division by
    σ): 1.2e-2 .. 0.23."""
    model = tiny_model(family)
    log: list[bool] = []
    reference = diffusers_apg_mix_model(model, start_step, 6.0, eta, norm_threshold, momentum, log)
    ours = node("GuidersAPGMix", model=model, apg_scale=6.0, apg_start_step=start_step, eta=eta,
                norm_threshold=norm_threshold, momentum=momentum)
    reference_out = run(reference, family)
    assert log == [step > start_step for step in range(STEPS)], log
    ours_first = run(ours, family)
    assert_parity(ours_first, reference_out, run(model, family))
    assert torch.equal(run(ours, family), ours_first)  # momentum is per run


@pytest.mark.parametrize(("start", "stop"), [(0.25, 0.75), (0.5, 1.0)])
def test_apg_mix_start_and_stop_match_diffusers(sd15_model, start: float, stop: float) -> None:
    """diffusers' start/stop (fractions of the steps): outside int(start·n) <= step < int(stop·n) the cond alone
    and the momentum buffer untouched (4 steps: guidance on steps 1-2, or 2-3; APG from step 1 on).
    Breaks caught: start/stop ignored: 0.82 (0.25..0.75), 0.84 (0.5..1); the momentum updated outside the window
    as well: 0.11 (0.25..0.75), 2.4e-2 (0.5..1)."""
    log: list[bool] = []
    reference = diffusers_apg_mix_model(sd15_model, 0, 6.0, 0.0, 10.0, 0.5, log, start=start, stop=stop)
    ours = node("GuidersAPGMix", model=sd15_model, apg_scale=6.0, apg_start_step=0, eta=0.0, norm_threshold=10.0,
                momentum=0.5, start=start, stop=stop)
    reference_out = run(reference, "sd15")
    assert log == [int(start * STEPS) <= step < int(stop * STEPS) for step in range(STEPS)], log
    assert_parity(run(ours, "sd15"), reference_out, run(sd15_model, "sd15"))


def test_apg_mix_start_not_below_stop_is_an_error(sd15_model) -> None:
    with pytest.raises(Exception, match="start .* must be below stop"):
        node("GuidersAPGMix", model=sd15_model, apg_scale=6.0, apg_start_step=0, eta=0.0, norm_threshold=10.0,
             momentum=0.5, start=0.6, stop=0.6)


# ---------------------------------------------------------------------------------------------------------
# One of each kind with a CFG rule: a pre transform before it, a post transform after it


def test_tcfg_then_mambo_g_is_mambo_g_on_the_damped_uncond(sd15_model) -> None:
    """Pre transform + CFG rule: MAMBO-G combines the cond with TCFG's damped uncond. Reference: ComfyUI's TCFG
    (pre-CFG: the cfg function is handed the damped uncond) and diffusers' MAMBO-G as sampler_cfg_function.
    Break caught: the plan's pre transforms not applied: 8.2e-2."""
    ours = node("GuidersMAMBOG", model=node("GuidersTCFG", model=sd15_model), alpha=2.0)

    def mambo(args):
        return diffusers_mambo(args["cond"], args["uncond"], args["cond_scale"], 2.0)

    reference = node("TCFG", model=with_cfg_function(sd15_model, mambo))
    assert_parity(run(ours, "sd15"), run(reference, "sd15"), run(sd15_model, "sd15"))


def test_fdg_then_dynamic_thresholding_thresholds_the_fdg_result(sd15_model) -> None:
    """CFG rule + post transform: Imagen's threshold on the x0 of FDG's result. Reference: diffusers' FDG on the
    noise predictions, then diffusers' ``_threshold_sample`` on its x0. Break caught: the threshold given the
    cond in place of the guided result (``dynamic_threshold(preds[COND], ...)``): 2.0."""
    ours = node("GuidersFDG", model=sd15_model, scales="10, 5", parallel_weights="0.5")
    ours = node("GuidersDynamicThresholding", model=ours, mode="imagen", percentile=0.9, max_value=1.5,
                mimic_scale=7.0, strength=1.0)
    guider = FrequencyDecoupledGuidance(guidance_scales=[10.0, 5.0], parallel_weights=[0.5, 0.5])

    def fdg_thresholded(args):
        x0 = args["input"] - guider.forward(args["cond"], args["uncond"]).pred
        return args["input"] - diffusers_threshold(x0, 0.9, 1.5)

    assert_parity(run(ours, "sd15"), run(with_cfg_function(sd15_model, fdg_thresholded), "sd15"),
                  run(sd15_model, "sd15"))


# ---------------------------------------------------------------------------------------------------------
# Each CFG rule stacked with PAG (and its CFG-scale schedule where it takes one), and with a node of another
# kind: the README's composition (pre transforms, the rule, the terms, post transforms in chain order) against
# an independent rule as sampler_cfg_function and ComfyUI's nodes for the terms and post transforms.

SCHEDULE = (8.0, 2.0)  # GuidersScheduleLinear's start and end value in these tests


def builtin_hook(model, slot: str, node_id: str, **settings):
    """The function a ComfyUI node installs in ``model_options[slot]`` (its last entry): its own code, called
    here by a reference that has to give it a scale of its own (a schedule's) or another place in the chain."""
    return node(node_id, model=model, **settings).model_options[slot][-1]


def fresca_noise(fresca_pre_cfg, args: dict, scale: float) -> torch.Tensor:
    """ComfyUI's FreSca (its pre-CFG function: u + F(c − u) as the cond) then CFG at ``scale``, as
    sampler_cfg_function output (x − x0)."""
    cond, uncond = fresca_pre_cfg({"conds_out": [args["cond_denoised"], args["uncond_denoised"]],
                                   "conds": ["cond", "uncond"]})[:2]
    return args["input"] - (uncond + scale * (cond - uncond))


def mahiro_noise(mahiro_post_cfg, args: dict, scale: float) -> torch.Tensor:
    """ComfyUI's Mahiro (its post-CFG function, on x0) on CFG at ``scale``, as sampler_cfg_function output."""
    cond, uncond = args["cond_denoised"], args["uncond_denoised"]
    guided = mahiro_post_cfg({"cond_scale": scale, "cond_denoised": cond, "uncond_denoised": uncond,
                              "denoised": uncond + scale * (cond - uncond)})
    return args["input"] - guided


def with_pag(model, scale: float = 2.0):
    return node("PerturbedAttentionGuidance", model=model, scale=scale)


def test_fresca_with_pag_and_its_schedule_is_the_rule_at_the_scheduled_scale_plus_pag(sd15_model) -> None:
    """FreSca (a CFG rule) at the schedule's scale, then PAG's s·(cond − perturbed) on the unfiltered cond.
    Reference: ComfyUI's FreSca function and CFG at the scheduled scale as sampler_cfg_function, then ComfyUI's PAG.
    (ComfyUI's FreSca node itself, a pre-CFG hook, would hand PAG the filtered cond: 0.12 from ours.)
    Breaks caught (error): the node's schedule ignored (``with_rule`` not applying it: the sampler's cfg used):
    0.36; the PAG term dropped (``combine`` skipping terms that give a contribution): 0.21."""
    settings = {"scale_low": 0.8, "scale_high": 1.6, "freq_cutoff": 3}
    schedule = node("GuidersScheduleLinear", start_value=SCHEDULE[0], end_value=SCHEDULE[1])
    ours = node("GuidersFreSca", model=sd15_model, schedule=schedule, **settings)
    ours = node("GuidersPAG", model=ours, scale=2.0, layers="middle")
    fresca = builtin_hook(sd15_model, "sampler_pre_cfg_function", "FreSca", **settings)

    def scheduled_fresca(args):
        return fresca_noise(fresca, args, linear(*SCHEDULE, *step_index(args)))

    reference = with_pag(with_cfg_function(sd15_model, scheduled_fresca))
    assert_parity(run(ours, "sd15"), run(reference, "sd15"), run(sd15_model, "sd15"))


def test_mahiro_with_pag_and_its_schedule_is_the_rule_at_the_scheduled_scale_plus_pag(sd15_model) -> None:
    """Mahiro at the schedule's scale (its leap and CFG both at that scale), then PAG. Reference: ComfyUI's Mahiro
    function handed the scheduled scale, as sampler_cfg_function, then ComfyUI's PAG. Breaks caught (error): the
    node's schedule ignored (``with_rule`` not applying it: the sampler's cfg used): 0.27; the PAG term dropped
    (``combine`` skipping terms that give a contribution): 0.25."""
    schedule = node("GuidersScheduleLinear", start_value=SCHEDULE[0], end_value=SCHEDULE[1])
    ours = node("GuidersMahiro", model=sd15_model, schedule=schedule)
    ours = node("GuidersPAG", model=ours, scale=2.0, layers="middle")
    mahiro = builtin_hook(sd15_model, "sampler_post_cfg_function", "Mahiro")

    def scheduled_mahiro(args):
        return mahiro_noise(mahiro, args, linear(*SCHEDULE, *step_index(args)))

    reference = with_pag(with_cfg_function(sd15_model, scheduled_mahiro))
    assert_parity(run(ours, "sd15"), run(reference, "sd15"), run(sd15_model, "sd15"))


def test_fdg_with_pag_is_fdg_plus_pag(sd15_model) -> None:
    """FDG (no schedule input: one scale per level) then PAG. Reference: diffusers' FDG as sampler_cfg_function,
    then ComfyUI's PAG. Break caught: the PAG term dropped (``combine`` skipping terms that give a contribution):
    0.27."""
    ours = node("GuidersFDG", model=sd15_model, scales="10, 5", parallel_weights="0.5", space="noise")
    ours = node("GuidersPAG", model=ours, scale=2.0, layers="middle")
    guider = FrequencyDecoupledGuidance(guidance_scales=[10.0, 5.0], parallel_weights=[0.5, 0.5])

    def fdg(args):
        return guider.forward(args["cond"], args["uncond"]).pred

    reference = with_pag(with_cfg_function(sd15_model, fdg))
    assert_parity(run(ours, "sd15"), run(reference, "sd15"), run(sd15_model, "sd15"))


def test_apg_mix_with_pag_and_its_schedule_is_the_rule_at_the_scheduled_scale_plus_pag(sd15_model) -> None:
    """APG-Mix with its CFG steps (0-2) at the schedule's scale and APG (step 3) at apg_scale, then PAG. Reference:
    diffusers' AdaptiveProjectedMixGuidance with its guidance_scale set from the schedule at each step, then
    ComfyUI's PAG. Breaks caught (error): the node's schedule ignored (``with_rule`` not applying it: the sampler's
    cfg used): 0.32; the PAG term dropped (``combine`` skipping terms that give a contribution): 0.29."""
    schedule = node("GuidersScheduleLinear", start_value=SCHEDULE[0], end_value=SCHEDULE[1])
    ours = node("GuidersAPGMix", model=sd15_model, apg_scale=6.0, apg_start_step=2, eta=0.5, norm_threshold=10.0,
                momentum=-0.5, schedule=schedule)
    ours = node("GuidersPAG", model=ours, scale=2.0, layers="middle")
    log: list[bool] = []
    reference = diffusers_apg_mix_model(sd15_model, 2, 6.0, 0.5, 10.0, -0.5, log,
                                        cfg_scale_at=lambda step, num_steps: linear(*SCHEDULE, step, num_steps))
    reference_out = run(with_pag(reference), "sd15")
    assert log == [step > 2 for step in range(STEPS)], log
    assert_parity(run(ours, "sd15"), reference_out, run(sd15_model, "sd15"))


def test_fresca_then_rescale_cfg_rescales_the_fresca_result(sd15_model) -> None:
    """CFG rule + post transform: RescaleCFG (Lin et al. 2023 Alg. 2, in noise space) on FreSca's result, with the
    std of the unfiltered cond. Reference: ComfyUI's FreSca function and CFG, then diffusers' ``rescale_noise_cfg``
    on the noise predictions. Breaks caught (error): the post transforms applied before the rule (``combine``'s post
    loop moved above its terms loop): 0.51; the post transform given the cond in place of the guided result
    (``fn(preds[COND], ...)``): 0.51."""
    settings = {"scale_low": 0.8, "scale_high": 1.6, "freq_cutoff": 3}
    ours = node("GuidersRescaleCFG", model=node("GuidersFreSca", model=sd15_model, **settings), multiplier=0.7)
    fresca = builtin_hook(sd15_model, "sampler_pre_cfg_function", "FreSca", **settings)

    def fresca_rescaled(args):
        return rescale_noise_cfg(fresca_noise(fresca, args, args["cond_scale"]), args["cond"], guidance_rescale=0.7)

    assert_parity(run(ours, "sd15"), run(with_cfg_function(sd15_model, fresca_rescaled), "sd15"),
                  run(sd15_model, "sd15"))


def test_mahiro_then_cfg_renorm_renorms_the_mahiro_result(sd15_model) -> None:
    """CFG rule + post transform: CFGNorm on Mahiro's x0, capped at the cond's norm. Reference: ComfyUI's Mahiro
    then ComfyUI's CFGNorm (post-CFG functions run in the order added). Breaks caught (error): the post transforms
    applied before the rule (``combine``'s post loop moved above its terms loop): 0.57; the post transform given the
    cond in place of the guided result (``fn(preds[COND], ...)``): 0.48."""
    ours = node("GuidersCFGRenorm", model=node("GuidersMahiro", model=sd15_model), mode="cfg_norm", strength=1.0)
    reference = node("CFGNorm", model=node("Mahiro", model=sd15_model), strength=1.0)
    assert_parity(run(ours, "sd15"), run(reference, "sd15"), run(sd15_model, "sd15"))


def test_apg_mix_then_dynamic_thresholding_thresholds_the_apg_mix_result(sd15_model) -> None:
    """CFG rule + post transform: Imagen's threshold on the x0 of APG-Mix's result (CFG steps and APG steps).
    Reference: diffusers' AdaptiveProjectedMixGuidance, then diffusers' ``_threshold_sample`` on its x0. Breaks
    caught (error): the post transforms applied before the rule (``combine``'s post loop moved above its terms
    loop): 2.0; the post transform given the cond in place of the guided result (``fn(preds[COND], ...)``): 1.95."""
    ours = node("GuidersAPGMix", model=sd15_model, apg_scale=6.0, apg_start_step=1, eta=0.5, norm_threshold=10.0,
                momentum=-0.5)
    ours = node("GuidersDynamicThresholding", model=ours, mode="imagen", percentile=0.9, max_value=1.5,
                mimic_scale=7.0, strength=1.0)
    log: list[bool] = []
    apg_mix = diffusers_apg_mix_model(sd15_model, 1, 6.0, 0.5, 10.0, -0.5, log).model_options["sampler_cfg_function"]

    def apg_mix_thresholded(args):
        x0 = args["input"] - apg_mix(args)
        return args["input"] - diffusers_threshold(x0, 0.9, 1.5)

    reference_out = run(with_cfg_function(sd15_model, apg_mix_thresholded), "sd15")
    assert log == [step > 1 for step in range(STEPS)], log
    assert_parity(run(ours, "sd15"), reference_out, run(sd15_model, "sd15"))
