"""GuidersModalityGuidance on LTX-2 (tiny_models.make_ltxav: ComfyUI's own LTXAVModel, shrunk; a real KSampler on a
(video, audio) NestedTensor latent), and its LTX-2.3 config (ComfyUI 0.33.0).

The reference is written here from the definitions with the host's own switches: a clone of the unpatched model
whose ``sampler_cfg_function`` applies u + w(c − u) with w = video_cfg on the packed latent's video part and
audio_cfg on its audio part (the packed latent's last dimension, split at the video's size per sample), and whose
post-CFG hook runs the cond once more with ``transformer_options`` ``a2v_cross_attn`` = ``v2a_cross_attn`` = False
(comfy/ldm/lightricks/av_model.py BasicAVTransformerBlock.forward skips both cross-modal attentions in every block)
and adds (s − 1)(cond − isolated) inside the σ window. On ComfyUI 0.33.0 the pack is also compared with the
host's own LTXVModalityGuidance + LTXVDualCFGGuider (comfy_extras/nodes_lt.py) through SamplerCustomAdvanced.

Breaks tried:
- ``all_streams`` ignored in dit_blocks (the isolated branch's audio taken from the unperturbed block): the
  parity tests fail;
- the two scales swapped in nodes/modality_nodes.py (``(audio_cfg, video_cfg)``): the parity tests fail;
- ``s`` instead of ``s − 1`` in guidance_core/modality.py: the parity tests fail;
- the window ignored (term window None): ``test_modality_window_is_respected`` fails;
- the schedule ignored (``scale_schedule(scale, None)`` in nodes/modality_nodes.py):
  ``test_modality_schedule_drives_s_per_step`` fails;
- only ``audio_to_video_attn`` cut (the record's cross_modal sublayer without ``video_to_audio_attn``): the
  parity tests fail.
"""

from __future__ import annotations

import math

import pytest
import torch
from harness import ForwardCounter, assert_window_is_partial, run_node, sample, sample_custom_advanced, scheduler_sigmas
from support import MIN_EFFECT, STEPS, linear_scale_per_step, node
from test_family_ltx2 import PER_CONFIG, assert_parity, relative_error
from tiny_models import make_conditioning, make_ltxav_latent

CFG = 5.0  # the sampler's cfg: the node replaces it by video_cfg / audio_cfg


def run(model, family: str, cfg: float = CFG):
    positive, negative = make_conditioning(family, batch=1, seed=1)
    return sample(model, positive, negative, {"samples": make_ltxav_latent(seed=2)}, cfg=cfg, steps=STEPS, seed=3)


def video_size() -> int:
    return math.prod(make_ltxav_latent(seed=2).unbind()[0].shape[1:])


def reference_model(model, scale, video_cfg: float, audio_cfg: float, sigma_window=None):
    """The definitions on a clone of the unpatched ``model`` (module docstring); ``sigma_window`` (σ_end, σ_start);
    ``scale``: s, or a function of the step's σ giving s (a schedule)."""
    import comfy.samplers

    split = video_size()

    def dual_cfg(args):  # noise space x − x0, as the host hands sampler_cfg_function; linear, so x0 alike
        cond, uncond = args["cond"], args["uncond"]
        weights = torch.full((cond.shape[-1],), audio_cfg, dtype=cond.dtype)
        weights[:split] = video_cfg
        return uncond + weights * (cond - uncond)

    def modality(args):
        sigma = float(args["sigma"].flatten()[0])
        if sigma_window is not None and not sigma_window[0] <= sigma <= sigma_window[1]:
            return args["denoised"]
        options = dict(args["model_options"])
        options["transformer_options"] = {**options.get("transformer_options", {}), "a2v_cross_attn": False,
                                          "v2a_cross_attn": False}
        (isolated,) = comfy.samplers.calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"],
                                                    options)
        s = scale(sigma) if callable(scale) else scale
        return args["denoised"] + (s - 1.0) * (args["cond_denoised"] - isolated)

    reference = model.clone()
    reference.set_model_sampler_cfg_function(dual_cfg, disable_cfg1_optimization=True)
    reference.set_model_sampler_post_cfg_function(modality)
    return reference


def ours(model, **settings):
    inputs = {"scale": 3.0, "video_cfg": 3.0, "audio_cfg": 7.0, "start_percent": 0.0, "end_percent": 1.0}
    inputs.update(settings)
    return node("GuidersModalityGuidance", model=model, **inputs)


@pytest.fixture(autouse=True)
def _pack(guiders_pack):
    return guiders_pack


@pytest.mark.parametrize("branch_mode", ["batched", "sequential"])
@PER_CONFIG
def test_modality_guidance_matches_the_definitions_through_sampling(tiny_model, family, branch_mode):
    """Dual CFG (video 3, audio 7) plus (s − 1)(cond − isolated) at s 3, equal to the reference; the isolation
    itself moves the result (the reference differs from dual CFG alone)."""
    model = tiny_model(family)
    result = run(ours(model, branch_mode=branch_mode), family)
    reference = run(reference_model(model, 3.0, 3.0, 7.0), family)
    dual_only = run(reference_model(model, 1.0, 3.0, 7.0), family)
    assert relative_error(reference, dual_only) > MIN_EFFECT, "cutting the audio-video attention does nothing"
    assert_parity(result, reference, run(model, family))


@PER_CONFIG
def test_modality_guidance_equals_the_hosts_ltxv_nodes(tiny_model, family):
    """ComfyUI 0.33.0's LTXVModalityGuidance (modality_scale 3) under LTXVDualCFGGuider (video 3, audio 7), through
    SamplerCustomAdvanced, against ours under CFGGuider (its cfg unused)."""
    try:
        import comfy_extras.nodes_lt as nodes_lt
    except ImportError as missing:
        pytest.skip(f"this ComfyUI's comfy_extras/nodes_lt.py does not import here: {missing}")
    if not hasattr(nodes_lt, "LTXVDualCFGGuider"):
        pytest.skip("this ComfyUI has no LTXVDualCFGGuider / LTXVModalityGuidance (added after 0.8.0)")
    model = tiny_model(family)
    positive, negative = make_conditioning(family, batch=1, seed=1)
    latent = {"samples": make_ltxav_latent(seed=2)}
    sigmas = scheduler_sigmas(model, steps=STEPS)
    # The host's node classes called as its executor calls them (their execute classmethods).
    theirs_model = nodes_lt.LTXVModalityGuidance.execute(model, 3.0, 0.0, 1.0).args[0]
    theirs = nodes_lt.LTXVDualCFGGuider.execute(theirs_model, positive, negative, 3.0, 7.0).args[0]
    guider = run_node("CFGGuider", model=ours(model), positive=positive, negative=negative, cfg=CFG)[0]
    plain = run_node("CFGGuider", model=model, positive=positive, negative=negative, cfg=3.0)[0]
    assert_parity(sample_custom_advanced(guider, latent, "euler", sigmas, seed=3),
                  sample_custom_advanced(theirs, latent, "euler", sigmas, seed=3),
                  sample_custom_advanced(plain, latent, "euler", sigmas, seed=3))


def test_modality_window_is_respected(tiny_model):
    """Outside start/end percent the modality term is off (its branch not evaluated); the dual CFG stays."""
    model = tiny_model("ltxav")
    start, end = 0.0, 0.5
    assert_window_is_partial(model, start, end, STEPS)
    sampling = model.get_model_object("model_sampling")
    window = (float(sampling.percent_to_sigma(end)), float(sampling.percent_to_sigma(start)))
    reference = run(reference_model(model, 3.0, 3.0, 7.0, sigma_window=window), "ltxav")
    everywhere = run(reference_model(model, 3.0, 3.0, 7.0), "ltxav")
    assert relative_error(reference, everywhere) > 1e-3
    assert_parity(run(ours(model, start_percent=start, end_percent=end), "ltxav"), reference, run(model, "ltxav"))
    with ForwardCounter(model) as counter:
        run(ours(model, start_percent=start, end_percent=end), "ltxav")
    inside = sum(window[0] <= s <= window[1] for s in scheduler_sigmas(model, steps=STEPS)[:-1].tolist())
    assert counter.per_step() == [[3]] * inside + [[2]] * (STEPS - inside)


def test_the_isolated_branch_rides_in_the_one_forward_and_scale_1_needs_none(tiny_model):
    """One call of 3 per step (cond, uncond, isolated); s = 1: one call of 2, and exactly dual CFG."""
    model = tiny_model("ltxav")
    with ForwardCounter(model) as counter:
        run(ours(model), "ltxav")
    assert counter.per_step() == [[3]] * STEPS
    assert all(sorted(call.cond_or_uncond)[:2] == [0, 1] for call in counter.calls)
    with ForwardCounter(model) as counter:
        off = run(ours(model, scale=1.0), "ltxav")
    assert counter.per_step() == [[2]] * STEPS
    assert relative_error(off, run(reference_model(model, 1.0, 3.0, 7.0), "ltxav")) < 1e-5


def test_modality_guidance_refuses_other_families(tiny_model):
    with pytest.raises(ValueError, match=r"GuidersModalityGuidance: .*\(LTXV.*is not supported.*LTX-2"):
        ours(tiny_model("ltxv"))


def test_modality_schedule_drives_s_per_step(tiny_model):
    """With a GuidersScheduleLinear 4 → 1.5 the scale widget (9) is ignored and step i uses the schedule's s_i in
    (s_i − 1)(cond − isolated), the dual CFG unchanged: equal to the reference at those scales. Catches: the
    schedule ignored (the widget's 9 everywhere)."""
    model = tiny_model("ltxav")
    schedule = node("GuidersScheduleLinear", start_value=4.0, end_value=1.5)
    result = run(ours(model, scale=9.0, schedule=schedule), "ltxav")
    reference = run(reference_model(model, linear_scale_per_step(model, 4.0, 1.5), 3.0, 7.0), "ltxav")
    constant = run(reference_model(model, 4.0, 3.0, 7.0), "ltxav")
    assert relative_error(reference, constant) > 1e-3  # the schedule changes the reference
    assert_parity(result, reference, run(model, "ltxav"))
