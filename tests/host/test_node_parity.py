"""The pack's nodes against references, through ComfyUI's real sampling (KSampler unless a test says otherwise)
on tiny random-weight models.

References: ComfyUI's own nodes where it has the method (PerturbedAttentionGuidance, SelfAttentionGuidance,
SkipLayerGuidanceSD3/DiT); otherwise a plain model clone whose ``sampler_cfg_function`` calls the reference
package (cf_guidance 0.0.3, diffusers 0.42.1) on the predictions ComfyUI hands that hook, sampled the same
way. Every parity test also checks that the reference moves the result far away from plain CFG, so a node
that did nothing could not pass.

Host behaviour these tests depend on (ComfyUI 0.8.0, comfy/samplers.py):
- ``sampler_cfg_function`` gets ``cond``/``uncond`` as noise predictions (x − x0), ``cond_denoised`` /
  ``uncond_denoised`` as x0, ``input`` x and ``sigma``, and returns x − x0_guided;
- ``CFGGuider.inner_sample`` stores the run's sigmas in ``transformer_options["sample_sigmas"]`` (a
  reference's step index is the position of the call's sigma there);
- SkipLayerGuidanceDiT is active for sigma_end <= σ <= sigma_start (percent_to_sigma bounds) and rescales
  its whole result by ``r·std(cond_x0)/std(result) + 1 − r`` only on the steps where it is active.
"""

from __future__ import annotations

import pytest
import torch
from cf_guidance import schedules as cf_schedules
from cf_guidance import transforms as cf_transforms
from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeZeroStarGuidance
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer as DiffusersMomentumBuffer
from harness import assert_window_is_partial, sample, sample_custom_advanced, scheduler_sigmas
from references import joint_attention_rows_return_values, perturbed_pass_reference
from support import CFG, MIN_EFFECT, STEPS, assert_parity, node, relative_error
from support import sample_family as run
from tiny_models import SPECS, make_conditioning, make_latent


def step_index(args: dict) -> tuple[int, int]:
    """(step, number of steps) of a sampler_cfg_function call: the position of its sigma in the run's sigmas."""
    sample_sigmas = args["model_options"]["transformer_options"]["sample_sigmas"].float().cpu()
    sigma = float(args["sigma"].flatten()[0])
    return int(torch.argmin((sample_sigmas - sigma).abs())), len(sample_sigmas) - 1


def with_cfg_function(model, cfg_function):
    """A reference model: ``model`` with ``cfg_function(args) -> x − x0_guided`` as its sampler_cfg_function."""
    reference = model.clone()
    reference.set_model_sampler_cfg_function(cfg_function)
    return reference


@pytest.fixture(autouse=True)
def _pack(guiders_pack):
    return guiders_pack


# ---------------------------------------------------------------------------------------------------------
# Perturbed-attention methods against ComfyUI's built-in nodes


# SD1.5 and SDXL: SDXL's UNet adds the pooled text and sizes (``y``) to the time embedding.
UNETS = pytest.mark.parametrize("family", ["sd15", "sdxl"])


@UNETS
def test_pag_matches_builtin_perturbed_attention_guidance(tiny_model, family: str) -> None:
    model = tiny_model(family)
    ours = node("GuidersPAG", model=model, scale=3.0, layers="middle", start_percent=0.0, end_percent=1.0)
    builtin = node("PerturbedAttentionGuidance", model=model, scale=3.0)

    assert_parity(run(ours, family), run(builtin, family), run(model, family))


@UNETS
def test_sag_matches_builtin_self_attention_guidance(tiny_model, family: str) -> None:
    model = tiny_model(family)
    ours = node("GuidersSAG", model=model, scale=0.5, blur_sigma=2.0)
    builtin = node("SelfAttentionGuidance", model=model, scale=0.5, blur_sigma=2.0)

    assert_parity(run(ours, family), run(builtin, family), run(model, family))


@pytest.mark.parametrize("node_id", ["GuidersPAG", "GuidersSLG-attention_scores"])
@pytest.mark.parametrize(("layers", "block_type", "block_index"),
                         [("double.1", "double", 1), ("single.1", "single", 1)])
def test_identity_attention_on_flux_joint_attention_matches_a_reference_from_the_definition(
    flux_model, node_id: str, layers: str, block_type: str, block_index: int
) -> None:
    # Flux's joint attention (double and single blocks) is the text tokens, then the image tokens: a 16x16
    # latent in 2x2 patches gives 64 image tokens after the prompt's. PAG perturbs only the image tokens'
    # rows of the attention map (their outputs become their V); SLG attention_scores perturbs every row.
    text_tokens, image_tokens = SPECS["flux"].context_tokens, (16 // 2) * (16 // 2)
    if node_id == "GuidersPAG":
        ours = node("GuidersPAG", model=flux_model, scale=3.0, layers=layers, start_percent=0.0, end_percent=1.0)
        rows = slice(text_tokens, text_tokens + image_tokens)
    else:
        ours = node("GuidersSLG", model=flux_model, scale=3.0, layers=layers, mode="attention_scores",
                    start_percent=0.0, end_percent=1.0, rescale=0.0)
        rows = slice(None)
    perturbed = joint_attention_rows_return_values(block_type, block_index, rows)
    reference = perturbed_pass_reference(flux_model, perturbed, scale=3.0)

    assert_parity(run(ours, "flux"), run(reference, "flux"), run(flux_model, "flux"))


SLG_WINDOWS = [pytest.param(0.0, 1.0, id="always"), pytest.param(0.2, 0.6, id="window-0.2-0.6")]


@pytest.mark.parametrize(("start", "end"), SLG_WINDOWS)
def test_slg_block_matches_skip_layer_guidance_sd3(sd3_model, start: float, end: float) -> None:
    assert_window_is_partial(sd3_model, start, end, STEPS)
    ours = node("GuidersSLG", model=sd3_model, scale=3.0, layers="1", mode="block", start_percent=start,
                end_percent=end, rescale=0.0)
    builtin = node("SkipLayerGuidanceSD3", model=sd3_model, layers="1", scale=3.0, start_percent=start,
                   end_percent=end)

    assert_parity(run(ours, "sd3"), run(builtin, "sd3"), run(sd3_model, "sd3"))


@pytest.mark.parametrize(("ours_layers", "double_layers", "single_layers"),
                         [("double.1", "1", ""), ("single.1", "", "1")])
@pytest.mark.parametrize(("start", "end"), SLG_WINDOWS)
def test_slg_block_matches_skip_layer_guidance_dit_on_flux(
    flux_model, ours_layers: str, double_layers: str, single_layers: str, start: float, end: float
) -> None:
    assert_window_is_partial(flux_model, start, end, STEPS)
    ours = node("GuidersSLG", model=flux_model, scale=3.0, layers=ours_layers, mode="block", start_percent=start,
                end_percent=end, rescale=0.0)
    builtin = node("SkipLayerGuidanceDiT", model=flux_model, double_layers=double_layers,
                   single_layers=single_layers, scale=3.0, start_percent=start, end_percent=end,
                   rescaling_scale=0.0)

    assert_parity(run(ours, "flux"), run(builtin, "flux"), run(flux_model, "flux"))


@pytest.mark.parametrize(("family", "ours_layers", "double_layers"), [("sd3", "1", "1"), ("flux", "double.1", "1")])
@pytest.mark.parametrize(("start", "end"), SLG_WINDOWS)
def test_slg_rescale_matches_builtin_rescaling_scale(
    tiny_model, family: str, ours_layers: str, double_layers: str, start: float, end: float
) -> None:
    model = tiny_model(family)
    assert_window_is_partial(model, start, end, STEPS)
    ours = node("GuidersSLG", model=model, scale=3.0, layers=ours_layers, mode="block", start_percent=start,
                end_percent=end, rescale=0.7)
    builtin = node("SkipLayerGuidanceDiT", model=model, double_layers=double_layers, single_layers="", scale=3.0,
                   start_percent=start, end_percent=end, rescaling_scale=0.7)
    builtin_unrescaled = node("SkipLayerGuidanceDiT", model=model, double_layers=double_layers, single_layers="",
                              scale=3.0, start_percent=start, end_percent=end, rescaling_scale=0.0)

    reference = run(builtin, family)
    assert_parity(run(ours, family), reference, run(model, family))
    rescale_effect = relative_error(reference, run(builtin_unrescaled, family))
    assert rescale_effect > MIN_EFFECT, f"rescaling_scale 0.7 barely changes the reference ({rescale_effect:.2e})"


# ---------------------------------------------------------------------------------------------------------
# Scheduled CFG and cf_guidance's norms against cf_guidance


COSINE = {"max_value": 7.5, "min_value": 1.5, "num_cycles": 0.5, "warmup": 0.34, "warmup_init": 2.0, "k_decay": 1.5}


def test_scheduled_cfg_uses_cf_guidance_cosine_value_at_every_step(sd15_model) -> None:
    steps = 6
    expected = cf_schedules.get_cos_sched(
        num_steps=steps, max_val=COSINE["max_value"], min_val=COSINE["min_value"], num_cycles=COSINE["num_cycles"],
        num_warmup_steps=int(COSINE["warmup"] * steps), warmup_init_val=COSINE["warmup_init"],
        k_decay=COSINE["k_decay"])
    assert max(expected) - min(expected) > 2.0, f"the schedule hardly varies: {expected}"
    schedule = node("GuidersScheduleCosine", **COSINE)
    ours = node("GuidersScheduledCFG", model=sd15_model, schedule=schedule)
    used_steps = []

    def scheduled_cfg(args):
        step, _ = step_index(args)
        used_steps.append(step)
        return args["uncond"] + expected[step] * (args["cond"] - args["uncond"])

    reference = with_cfg_function(sd15_model, scheduled_cfg)

    reference_out = run(reference, "sd15", steps=steps)
    assert used_steps == list(range(steps))
    # The sampler's cfg (5) is ignored by ours: a constant cfg 5 is "plain" here.
    assert_parity(run(ours, "sd15", steps=steps), reference_out, run(sd15_model, "sd15", steps=steps))


CF_NORMS = [
    pytest.param("base_norm", cf_transforms.BaseNormGuidance, CFG, id="base_norm"),
    pytest.param("t_norm", cf_transforms.TNormGuidance, 0.3, id="t_norm"),
    pytest.param("full_norm", cf_transforms.FullNormGuidance, 0.3, id="full_norm"),
]


@pytest.mark.parametrize(("mode", "transform_class", "cfg"), CF_NORMS)
def test_cfg_normalize_matches_cf_guidance_transforms(sd15_model, mode: str, transform_class, cfg: float) -> None:
    ours = node("GuidersCFGNormalize", model=sd15_model, mode=mode)  # per_image default; batch 1 here
    transform = transform_class({"g": [cfg] * STEPS})

    def cf_guidance_cfg(args):
        step, _ = step_index(args)
        # cf_guidance works on noise predictions: (u, t) = (uncond, cond) in ComfyUI's x − x0 space.
        return transform(args["uncond"], args["cond"], step)

    reference = with_cfg_function(sd15_model, cf_guidance_cfg)

    assert_parity(run(ours, "sd15", cfg=cfg), run(reference, "sd15", cfg=cfg), run(sd15_model, "sd15", cfg=cfg))


# ---------------------------------------------------------------------------------------------------------
# CFG-Zero* and APG against diffusers' guiders


def diffusers_cfg_zero_star_model(model, zero_init_steps: int, cfg: float):
    """A reference model whose CFG is diffusers' ClassifierFreeZeroStarGuidance on ComfyUI's noise predictions.
    On a zero-init step diffusers returns zero noise, i.e. x0 = x (our node skips the forward there)."""
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=cfg, zero_init_steps=zero_init_steps)

    def cfg_zero_star(args):
        step, num_steps = step_index(args)
        guider.set_state(step, num_steps, args["sigma"])
        return guider.forward(args["cond"], args["uncond"]).pred

    return with_cfg_function(model, cfg_zero_star)


@pytest.mark.parametrize("family", ["sd3", "flux", "sd15"])
@pytest.mark.parametrize("zero_init_steps", [0, 1, 2])
def test_cfg_zero_star_matches_diffusers(tiny_model, family: str, zero_init_steps: int) -> None:
    model = tiny_model(family)
    ours = node("GuidersCFGZeroStar", model=model, zero_init_steps=zero_init_steps)
    reference = diffusers_cfg_zero_star_model(model, zero_init_steps, CFG)

    assert_parity(run(ours, family), run(reference, family), run(model, family))


def diffusers_apg_model(model, eta: float, norm_threshold: float, momentum: float, cfg: float, log: list | None = None):
    """A reference model whose CFG is diffusers' AdaptiveProjectedGuidance in the paper's form
    (``use_original_formulation``: c + (w − 1)·update) on ComfyUI's x0 predictions. ``log`` collects, per
    call, whether the norm threshold clipped the guidance update."""
    guider = AdaptiveProjectedGuidance(
        guidance_scale=cfg - 1.0, eta=eta, adaptive_projected_guidance_rescale=norm_threshold,
        adaptive_projected_guidance_momentum=momentum if momentum != 0 else None, use_original_formulation=True)

    def apg(args):
        step, num_steps = step_index(args)
        if step == 0 and momentum != 0:  # as diffusers' prepare_inputs: a fresh buffer at each run's step 0
            guider.momentum_buffer = DiffusersMomentumBuffer(momentum)
        guider.set_state(step, num_steps, args["sigma"])
        cond_x0, uncond_x0 = args["cond_denoised"], args["uncond_denoised"]
        if log is not None:
            log.append(float((cond_x0 - uncond_x0).norm()) > norm_threshold > 0)
        return args["input"] - guider.forward(cond_x0, uncond_x0).pred

    return with_cfg_function(model, apg)


APG_SETTINGS = [
    pytest.param(0.0, 0.0, 0.0, id="eta0"),
    pytest.param(0.5, 2.0, 0.0, id="eta0.5-threshold2"),
    pytest.param(0.0, 2.0, -0.5, id="eta0-threshold2-momentum-0.5"),
    pytest.param(1.0, 0.0, 0.7, id="eta1-momentum0.7"),
]


@pytest.mark.parametrize(("eta", "norm_threshold", "momentum"), APG_SETTINGS)
@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_apg_matches_diffusers(tiny_model, family: str, eta: float, norm_threshold: float, momentum: float) -> None:
    model = tiny_model(family)
    ours = node("GuidersAPG", model=model, eta=eta, norm_threshold=norm_threshold, momentum=momentum)
    clipped: list[bool] = []
    reference = diffusers_apg_model(model, eta, norm_threshold, momentum, CFG, log=clipped)

    reference_out = run(reference, family)
    if norm_threshold > 0:
        assert any(clipped), "the norm threshold never clipped the update: pick a smaller one"
    ours_first = run(ours, family)
    assert_parity(ours_first, reference_out, run(model, family))
    # Momentum is per-run state: a second run of the same model starts from a fresh buffer.
    assert torch.equal(run(ours, family), ours_first)


# ---------------------------------------------------------------------------------------------------------
# GuidersGuider (SamplerCustomAdvanced) against KSampler


def test_guiders_guider_with_sampler_custom_advanced_equals_ksampler(sd15_model) -> None:
    patched = node("GuidersPAG", model=sd15_model, scale=3.0, layers="middle", start_percent=0.0, end_percent=1.0)
    patched = node("GuidersAPG", model=patched, eta=0.0, norm_threshold=2.0, momentum=-0.5)
    positive, negative = make_conditioning("sd15", seed=1)
    latent = make_latent("sd15", h=16, w=16, seed=2)

    guider = node("GuidersGuider", model=patched, positive=positive, negative=negative, cfg=CFG)
    custom = sample_custom_advanced(guider, latent, "euler", scheduler_sigmas(patched, steps=STEPS), seed=3)
    ksampler = sample(patched, positive, negative, latent, cfg=CFG, steps=STEPS, seed=3)

    assert relative_error(ksampler, run(sd15_model, "sd15")) > MIN_EFFECT
    torch.testing.assert_close(custom, ksampler, rtol=1e-6, atol=1e-6)


def test_guiders_guider_schedule_equals_scheduled_cfg_with_ksampler(sd15_model) -> None:
    schedule = node("GuidersScheduleLinear", start_value=8.0, end_value=2.0)
    positive, negative = make_conditioning("sd15", seed=1)
    latent = make_latent("sd15", h=16, w=16, seed=2)

    guider = node("GuidersGuider", model=sd15_model, positive=positive, negative=negative, cfg=CFG, schedule=schedule)
    custom = sample_custom_advanced(guider, latent, "euler", scheduler_sigmas(sd15_model, steps=STEPS), seed=3)
    scheduled = node("GuidersScheduledCFG", model=sd15_model, schedule=schedule)
    ksampler = sample(scheduled, positive, negative, latent, cfg=CFG, steps=STEPS, seed=3)

    assert relative_error(ksampler, run(sd15_model, "sd15")) > MIN_EFFECT
    torch.testing.assert_close(custom, ksampler, rtol=1e-6, atol=1e-6)
