"""GuidersSWG (Kaiser et al. 2024, arXiv:2411.10257; masked SWG, BMVC 2025) on the UNets (SD1.5, SDXL), through
ComfyUI's real KSampler on tiny random-weight models.

The reference is written here from the paper and the authors' code (edm2/sample_edm2.py ``swg_guidance``): a clone
of the unpatched model whose post-CFG hook runs the cond on each crop of an n × n grid ONE CROP PER CALL (side k,
stride (side − k)//(n − 1)), adds each crop's x0 prediction into place, divides by the coverage count, and returns
cfg_result + g·M·(cond − crops) with M = (coverage > 1) (masked) or (coverage > 0).

Breaks tried, each fails ``test_swg_matches_the_paper_through_sampling``:
- the stride (side − k)//n instead of //(n − 1) (guidance_core/swg.py ``crop_origins``);
- the mask dropped (``masked_crops_prediction`` always ``coverage > 0``): fails the masked cases;
- the window ignored: fails ``test_swg_window_is_respected``;
- the schedule ignored (``scale_schedule`` returning the widget's scale): fails
  ``test_swg_schedule_drives_the_scale_per_step``.
"""

from __future__ import annotations

import pytest
import torch
from harness import ForwardCounter, assert_window_is_partial
from support import STEPS, assert_parity, linear_scale_per_step, node, relative_error, sample_family


def paper_crops(x, crop: int, n: int):
    """The authors' grid: the (top, left) of each crop, stride (side − crop)//(n − 1)."""
    def origins(side):
        stride = (side - crop) // (n - 1) if n > 1 else 0
        return [stride * i for i in range(n)]

    return [(top, left) for top in origins(x.shape[-2]) for left in origins(x.shape[-1])]


def reference_model(model, scale, crop: int, n: int, masked: bool, sigma_window=None):
    """``scale``: g, or a function of the step's σ giving g (a schedule)."""
    import comfy.samplers

    def swg(args):
        sigma = float(args["sigma"].flatten()[0])
        if sigma_window is not None and not sigma_window[0] <= sigma <= sigma_window[1]:
            return args["denoised"]
        g = scale(sigma) if callable(scale) else scale
        x, cond = args["input"], args["cond_denoised"]
        total, count = torch.zeros_like(x), torch.zeros_like(x)
        for top, left in paper_crops(x, crop, n):
            piece = x[..., top:top + crop, left:left + crop]
            (pred,) = comfy.samplers.calc_cond_batch(args["model"], [args["cond"]], piece, args["sigma"],
                                                    args["model_options"])
            total[..., top:top + crop, left:left + crop] += pred
            count[..., top:top + crop, left:left + crop] += 1
        crops = total / count.clamp_min(1)
        mask = (count > (1 if masked else 0)).to(x.dtype)
        return args["denoised"] + g * mask * (cond - crops)

    reference = model.clone()
    reference.set_model_sampler_post_cfg_function(swg)
    return reference


def swg_model(model, **settings):
    inputs = {"scale": 2.0, "crop_size": 12, "grid": 2, "masked": True, "start_percent": 0.0, "end_percent": 1.0}
    inputs.update(settings)
    return node("GuidersSWG", model=model, **inputs)


CASES = [("sd15", 12, 2, True, 5.0), ("sd15", 10, 3, False, 5.0), ("sd15", 12, 2, True, 1.0),
         ("sdxl", 12, 2, True, 5.0)]


@pytest.mark.parametrize(("family", "crop", "grid", "masked", "cfg"), CASES)
def test_swg_matches_the_paper_through_sampling(guiders_pack, tiny_model, family, crop, grid, masked, cfg):
    model = tiny_model(family)
    ours = sample_family(swg_model(model, crop_size=crop, grid=grid, masked=masked), family, cfg=cfg)
    reference = sample_family(reference_model(model, 2.0, crop, grid, masked), family, cfg=cfg)
    assert_parity(ours, reference, sample_family(model, family, cfg=cfg))


def test_swg_crops_are_one_extra_call_per_step(guiders_pack, tiny_model):
    """cond + uncond in one call of 2, then the 4 crops in one call of 4; at scale 0 no crops call."""
    model = tiny_model("sd15")
    with ForwardCounter(model) as counter:
        sample_family(swg_model(model), "sd15")
    assert counter.per_step() == [[2, 4]] * STEPS
    with ForwardCounter(model) as counter:
        sample_family(swg_model(model, scale=0.0), "sd15")
    assert counter.per_step() == [[2]] * STEPS


def test_swg_window_is_respected(guiders_pack, tiny_model):
    model = tiny_model("sd15")
    start, end = 0.0, 0.5
    assert_window_is_partial(model, start, end, STEPS)
    sampling = model.get_model_object("model_sampling")
    window = (float(sampling.percent_to_sigma(end)), float(sampling.percent_to_sigma(start)))
    reference = sample_family(reference_model(model, 2.0, 12, 2, True, sigma_window=window), "sd15")
    everywhere = sample_family(reference_model(model, 2.0, 12, 2, True), "sd15")
    assert relative_error(reference, everywhere) > 1e-3
    assert_parity(sample_family(swg_model(model, start_percent=start, end_percent=end), "sd15"), reference,
                  sample_family(model, "sd15"))


def test_swg_refuses_dits_and_too_large_crops(guiders_pack, tiny_model):
    with pytest.raises(ValueError, match=r"GuidersSWG: .*is not supported; GuidersSWG supports UNet"):
        swg_model(tiny_model("flux"))
    with pytest.raises(ValueError, match=r"GuidersSWG: crop_size 20 is larger than this latent \(16 × 16"):
        sample_family(swg_model(tiny_model("sd15"), crop_size=20), "sd15")


def test_swg_schedule_drives_the_scale_per_step(guiders_pack, tiny_model):
    """With a GuidersScheduleLinear 3 → 0.5 the scale widget (9) is ignored and step i uses the schedule's g_i:
    equal to the reference at those scales. Catches: the schedule ignored (the widget's 9 everywhere)."""
    model = tiny_model("sd15")
    schedule = node("GuidersScheduleLinear", start_value=3.0, end_value=0.5)
    ours = sample_family(swg_model(model, scale=9.0, schedule=schedule), "sd15")
    reference = sample_family(reference_model(model, linear_scale_per_step(model, 3.0, 0.5), 12, 2, True), "sd15")
    constant = sample_family(reference_model(model, 3.0, 12, 2, True), "sd15")
    assert relative_error(reference, constant) > 1e-3  # the schedule changes the reference
    assert_parity(ours, reference, sample_family(model, "sd15"))
