"""Our nodes next to ComfyUI 0.8.0's own guiders, caches and guidance nodes: both apply (checked by value), or the
run stops with an error that names both. One test per way a combination went silently wrong (issue #10).

Many references use a one-step run: Euler from σ_max to 0 returns the first step's denoised prediction, and
there every method here adds its own term to the same CFG result, so "both applied" is exactly
``both − plain = (theirs − plain) + (ours − plain)``. A method that was dropped leaves its term out of the sum.

Host behaviour these tests depend on (ComfyUI 0.8.0):
- ``DualCFGGuider`` and ``PerpNegGuider`` override ``predict_noise`` and call ``comfy.samplers.calc_cond_batch``
  themselves, never ``sampling_function`` and its ``sampler_calc_cond_batch_function`` slot.
- ``SelfAttentionGuidance`` patches ``attn1`` under ``('middle', 0, 0)``, which the UNet looks up before
  ``('middle', 0)``, and records the uncond chunk's attention there (found by its ``cond_or_uncond`` tag).
- ``RescaleCFG`` and ``VideoLinearCFGGuidance`` fill the single ``sampler_cfg_function`` slot.
- ``SkipLayerGuidanceDiTSimple`` fills ``sampler_calc_cond_batch_function`` with a function that unpacks
  exactly two conds.
- ``EasyCache`` keys its cached output differences by each cond's ``uuid``.
"""

from __future__ import annotations

import pytest
import torch
from harness import run_node, sample_custom_advanced, scheduler_sigmas
from support import CFG, MIN_EFFECT, assert_effect, assert_parity, node, relative_error, sample_family
from tiny_models import make_conditioning, make_latent


@pytest.fixture(autouse=True)
def _pack(guiders_pack):
    return guiders_pack


def one_step(model, family: str, cfg: float = CFG) -> torch.Tensor:
    return sample_family(model, family, cfg=cfg, steps=1)


def assert_both_applied(both, theirs, ours, plain) -> None:
    """``both − plain`` equals ``(theirs − plain) + (ours − plain)``, each of the two terms far from zero."""
    assert relative_error(theirs, plain) > MIN_EFFECT and relative_error(ours, plain) > MIN_EFFECT
    assert_parity(both, theirs + ours - plain, plain)


# ---------------------------------------------------------------------------------------------------------
# 1. Guiders that bypass sampler_calc_cond_batch_function


def _custom(guider, family: str = "sd15", steps: int = 2) -> torch.Tensor:
    model = guider.model_patcher
    return sample_custom_advanced(guider, make_latent(family, h=16, w=16, seed=2), "euler",
                                  scheduler_sigmas(model, steps=steps), seed=3)


@pytest.mark.parametrize("style", ["regular", "nested"])
def test_dual_cfg_guider_with_a_guiders_model_is_an_error_naming_it(sd15_model, style: str) -> None:
    # Before: the PAG term silently did nothing (equal to the unpatched model's result to 1e-6).
    # Catches: the bypass check removed, or counting our batch calls across steps instead of per step.
    patched = node("GuidersPAG", model=sd15_model, scale=3.0, layers="middle")
    positive, negative = make_conditioning("sd15", seed=1)
    guider = node("DualCFGGuider", model=patched, cond1=positive, cond2=positive, negative=negative, cfg_conds=5.0,
                  cfg_cond2_negative=3.0, style=style)
    with pytest.raises(Exception, match=r"DualCFGGuider.*GuidersPAG"):
        _custom(guider)


def test_perp_neg_guider_with_a_guiders_model_is_an_error_naming_it(sd15_model) -> None:
    patched = node("GuidersSEG", model=sd15_model, scale=3.0, blur_sigma=10.0)
    positive, negative = make_conditioning("sd15", seed=1)
    guider = node("PerpNegGuider", model=patched, positive=positive, negative=negative, empty_conditioning=negative,
                  cfg=5.0, neg_scale=1.0)
    with pytest.raises(Exception, match=r"PerpNegGuider.*GuidersSEG"):
        _custom(guider)


def test_basic_guider_carries_our_terms(sd15_model) -> None:
    # BasicGuider samples the positive alone at cfg 1, through sampling_function: our PAG term applies, the
    # same as KSampler at cfg 1. Catches: the bypass check firing on a guider that does call our slot.
    patched = node("GuidersPAG", model=sd15_model, scale=3.0, layers="middle")
    positive, _negative = make_conditioning("sd15", seed=1)
    basic = _custom(node("BasicGuider", model=patched, conditioning=positive), steps=4)
    ksampler = sample_family(patched, "sd15", cfg=1.0, steps=4)

    assert_effect(ksampler, sample_family(sd15_model, "sd15", cfg=1.0, steps=4), "PAG at cfg 1")
    torch.testing.assert_close(basic, ksampler, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# 2. Patch keys that shadow ours


@pytest.mark.parametrize("order", ["sag_first", "ours_first"])
@pytest.mark.parametrize("ours_id", ["GuidersPAG", "GuidersSEG"])
def test_builtin_sag_and_our_middle_block_perturbation_both_apply(sd15_model, order: str, ours_id: str) -> None:
    # SAG's ('middle', 0, 0) key shadowed our ('middle', 0): our term was dropped while its chunk was still
    # computed. Catches: ours not put on the more specific key; SAG's patch not called inside ours (its
    # attention map is then never recorded); SAG's patch handed the full batch's cond_or_uncond tags while
    # seeing only some chunks (it then records the wrong chunk's attention).
    ours_inputs = dict(scale=3.0, layers="middle") | ({"blur_sigma": 10.0} if ours_id == "GuidersSEG" else {})
    sag_inputs = dict(scale=0.5, blur_sigma=2.0)
    if order == "sag_first":
        both = node(ours_id, model=node("SelfAttentionGuidance", model=sd15_model, **sag_inputs), **ours_inputs)
    else:
        both = node("SelfAttentionGuidance", model=node(ours_id, model=sd15_model, **ours_inputs), **sag_inputs)
    theirs = node("SelfAttentionGuidance", model=sd15_model, **sag_inputs)
    ours = node(ours_id, model=sd15_model, **ours_inputs)

    assert_both_applied(one_step(both, "sd15"), one_step(theirs, "sd15"), one_step(ours, "sd15"),
                        one_step(sd15_model, "sd15"))


def test_a_foreign_patch_on_our_whole_block_is_called_inside_ours_on_a_transformer_key(sd15_model) -> None:
    # Ours on one transformer ('middle.0.0') would shadow another node's patch on the whole middle block.
    # Catches: ours installed without the block-level patch as the one it calls.
    calls = []

    def theirs(q, k, v, extra_options):
        calls.append(list(extra_options["cond_or_uncond"]))
        heads = extra_options["n_heads"]
        return torch.nn.functional.scaled_dot_product_attention(*(_heads(t, heads) for t in (q, k, v))
                                                                ).transpose(1, 2).flatten(2)

    foreign = sd15_model.clone()
    foreign.set_model_attn1_replace(theirs, "middle", 0)
    patched = node("GuidersPAG", model=foreign, scale=3.0, layers="middle.0.0")
    sample_family(patched, "sd15", steps=1)

    # Their patch ran on the untouched chunks (cond and uncond) and never on the perturbed one (tag 2).
    assert calls and all(2 not in tags for tags in calls) and any(sorted(tags) == [0, 1] for tags in calls), calls


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, length, _ = t.shape
    return t.reshape(b, length, heads, -1).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------
# 3. Single-slot CFG functions set by others


@pytest.mark.parametrize("order", ["theirs_first", "ours_first"])
@pytest.mark.parametrize(("theirs_id", "theirs_inputs"), [
    ("RescaleCFG", {"multiplier": 0.7}),
    ("VideoLinearCFGGuidance", {"min_cfg": 1.0}),
])
@pytest.mark.parametrize(("ours_id", "ours_inputs"), [
    ("GuidersAPG", {"eta": 0.0, "norm_threshold": 5.0, "momentum": -0.5}),
    ("GuidersCFGNormalize", {"mode": "t_norm"}),
    ("GuidersCFGZeroStar", {"zero_init_steps": 0}),
])
def test_a_foreign_cfg_formula_and_our_cfg_rule_is_an_error_naming_both(
    sd15_model, order, theirs_id, theirs_inputs, ours_id, ours_inputs
) -> None:
    # Before: their sampler_cfg_function replaced our CFG rule silently, in both orders. Catches: the
    # conflict check removed (the run then succeeds with our rule dropped).
    if order == "theirs_first":
        model = node(ours_id, model=node(theirs_id, model=sd15_model, **theirs_inputs), **ours_inputs)
    else:
        model = node(theirs_id, model=node(ours_id, model=sd15_model, **ours_inputs), **theirs_inputs)
    with pytest.raises(Exception, match=rf"{ours_id}.*{theirs_id}"):
        sample_family(model, "sd15", steps=2)


@pytest.mark.parametrize("order", ["theirs_first", "ours_first"])
def test_rescale_cfg_runs_at_our_scheduled_cfg_scale(sd15_model, order: str) -> None:
    # A CFG schedule composes with RescaleCFG's formula: theirs at our scale. With a constant schedule of 3
    # under a sampler cfg of 5 the chain equals RescaleCFG at KSampler cfg 3. Catches: the schedule's scale
    # not handed to their function (the result is RescaleCFG at cfg 5).
    schedule = node("GuidersScheduleConstant", value=3.0)
    if order == "theirs_first":
        chain = node("GuidersScheduledCFG", model=node("RescaleCFG", model=sd15_model, multiplier=0.7),
                     schedule=schedule)
    else:
        chain = node("RescaleCFG", model=node("GuidersScheduledCFG", model=sd15_model, schedule=schedule),
                     multiplier=0.7)
    reference = sample_family(node("RescaleCFG", model=sd15_model, multiplier=0.7), "sd15", cfg=3.0)

    assert_parity(sample_family(chain, "sd15", cfg=CFG), reference, sample_family(sd15_model, "sd15", cfg=3.0))
    assert relative_error(reference, sample_family(node("RescaleCFG", model=sd15_model, multiplier=0.7), "sd15",
                                                   cfg=CFG)) > MIN_EFFECT


# ---------------------------------------------------------------------------------------------------------
# 4. Step caches keyed by cond uuid


def test_easycache_keeps_our_perturbed_branch_apart_from_the_cond(sd15_model) -> None:
    # Before: the perturbed branch carried the cond's uuid, so on every step EasyCache skipped, the cond and
    # the perturbed prediction came out equal and the PAG term was zero. Catches: the branch's own uuid
    # removed (on a skipped step the PAG chunk then equals the cond chunk exactly).
    steps = 8
    pag = dict(scale=3.0, layers="middle")
    cache = dict(reuse_threshold=0.1, start_percent=0.0, end_percent=1.0, verbose=False)
    cached_pag = node("EasyCache", model=node("GuidersPAG", model=sd15_model, **pag), **cache)
    computed = []  # UNet forwards that really ran
    term_sizes = {"computed": [], "skipped": []}  # per step: |PAG branch − cond| / |cond|, in noise space

    def record(executor, *args, **kwargs):
        before = len(computed)
        outputs = executor(*args, **kwargs)
        x = args[2]  # (model, conds, x, timestep, model_options)
        cond, _uncond, perturbed = (x - out for out in outputs)  # noise space: σ·ε, whatever σ is
        # On a skipped step EasyCache answered from its cache, with no UNet forward.
        term_sizes["computed" if len(computed) > before else "skipped"].append(relative_error(perturbed, cond))
        return outputs

    cached_pag.add_wrapper_with_key(comfy_wrappers().CALC_COND_BATCH, "test-recorder", record)
    hook = sd15_model.model.diffusion_model.out.register_forward_hook(lambda *_: computed.append(1))
    try:
        cached = sample_family(cached_pag, "sd15", steps=steps)
    finally:
        hook.remove()
    uncached = sample_family(node("GuidersPAG", model=sd15_model, **pag), "sd15", steps=steps)
    plain = sample_family(sd15_model, "sd15", steps=steps)

    assert term_sizes["skipped"] and len(computed) < steps, "EasyCache skipped no step: the test would not see it"
    # A skipped step keeps the PAG branch's own cached difference: about as far from the cond as on the steps
    # computed (with the cond's uuid it is exactly the cond).
    smallest_computed = min(term_sizes["computed"])
    assert all(size > 0.1 * smallest_computed for size in term_sizes["skipped"]), term_sizes  # measured ≥ 0.3×
    # The cache's own error stays well below the PAG term's size (measured: 0.06 against 0.52).
    assert relative_error(cached, uncached) < 0.25 * relative_error(uncached, plain)


def comfy_wrappers():
    import comfy.patcher_extension

    return comfy.patcher_extension.WrappersMP


# ---------------------------------------------------------------------------------------------------------
# 5. Foreign slots called only with what they support; what cannot work is refused at the node


def test_skip_layer_guidance_dit_simple_and_our_term_both_apply(sd3_model) -> None:
    # Before: ValueError "too many values to unpack" inside nodes_slg.py (we called their batch function
    # with our extra conds). Catches: their function handed more than cond and uncond, or our extra
    # branches dropped when their function computes cond and uncond.
    slg = dict(double_layers="0", single_layers="", start_percent=0.0, end_percent=1.0)
    ours_inputs = dict(scale=3.0, layers="1", mode="block", start_percent=0.0, end_percent=1.0)
    both = node("GuidersSLG", model=node("SkipLayerGuidanceDiTSimple", model=sd3_model, **slg), **ours_inputs)
    theirs = node("SkipLayerGuidanceDiTSimple", model=sd3_model, **slg)
    ours = node("GuidersSLG", model=sd3_model, **ours_inputs)

    assert_both_applied(one_step(both, "sd3"), one_step(theirs, "sd3"), one_step(ours, "sd3"),
                        one_step(sd3_model, "sd3"))


def test_skip_layer_guidance_dit_simple_and_our_negative_branch_is_an_error_naming_both(sd3_model) -> None:
    both = node("GuidersSLG", model=node("SkipLayerGuidanceDiTSimple", model=sd3_model, double_layers="0",
                                         single_layers="", start_percent=0.0, end_percent=1.0),
                scale=3.0, layers="1", mode="block", target="negative branch")
    with pytest.raises(Exception, match=r"SkipLayerGuidanceDiTSimple.*GuidersSLG"):
        one_step(both, "sd3")


def test_autoguidance_refuses_a_weak_model_of_another_model_type(sd15_model, tiny_model) -> None:
    # Before: an SD1.5 weak model for an SDXL model failed inside the UNet. Catches: the input check removed.
    with pytest.raises(Exception, match=r"GuidersAutoguidance: weak_model takes other inputs"):
        run_node("GuidersAutoguidance", model=tiny_model("sdxl"), weak_model=sd15_model, scale=2.0)


# ---------------------------------------------------------------------------------------------------------
# A model-sampling node applied after ours: the windows follow the schedule the run uses


def _active_steps(model, start: float, end: float, steps: int, scheduler: str) -> list[bool]:
    sampling = model.get_model_object("model_sampling")
    sigma_start, sigma_end = float(sampling.percent_to_sigma(start)), float(sampling.percent_to_sigma(end))
    sigmas = scheduler_sigmas(model, steps=steps, scheduler=scheduler)[:-1].tolist()
    return [sigma_end <= s <= sigma_start for s in sigmas]


def test_a_window_follows_a_model_sampling_node_applied_after_ours(sd3_model) -> None:
    # ModelSamplingSD3 (shift 12) after GuidersSLG changes which steps a percent window holds (on a scheduler
    # that spaces σ by its own rule, as karras does; the "normal" one spaces them in percent, so any shift keeps
    # the same steps). The reference is the built-in SkipLayerGuidanceSD3 applied after ModelSamplingSD3, which
    # converts the percents with the schedule the run uses. Catches: percents turned into σ at our node (with
    # the input model's shift 3).
    start, end, steps, scheduler = 0.5, 0.9, 8, "karras"
    shifted = node("ModelSamplingSD3", model=sd3_model, shift=12.0)
    active = _active_steps(shifted, start, end, steps, scheduler)
    assert active != _active_steps(sd3_model, start, end, steps, scheduler)
    assert any(active) and not all(active), active
    ours = node("ModelSamplingSD3", model=node("GuidersSLG", model=sd3_model, scale=3.0, layers="1", mode="block",
                                               start_percent=start, end_percent=end, rescale=0.0), shift=12.0)
    builtin = node("SkipLayerGuidanceSD3", model=shifted, layers="1", scale=3.0, start_percent=start,
                   end_percent=end)

    def run(model):
        return sample_family(model, "sd3", steps=steps, scheduler=scheduler)

    assert_parity(run(ours), run(builtin), run(shifted))

