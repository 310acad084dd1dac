"""Tests of guidance_core.cfg_rules, .frequency and .corrections (issue #13): each function against its
reference where one is importable (diffusers 0.42.1: TCFG's normalized_guidance, mambo_guidance,
FrequencyDecoupledGuidance, AdaptiveProjectedMixGuidance, DDPMScheduler._threshold_sample; kornia's
Laplacian pyramid) or written here, and on every fixture shape (4-D and 5-D, batch 1 and 3) and dtype
(float32, bfloat16, float16): same shape and dtype, finite, and finite for zero and identical cond/uncond.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.guiders import AdaptiveProjectedMixGuidance, FrequencyDecoupledGuidance
from diffusers.guiders.adaptive_projected_guidance_mix import MomentumBuffer as DiffusersMomentumBuffer
from diffusers.guiders.magnitude_aware_guidance import mambo_guidance
from diffusers.guiders.tangential_classifier_free_guidance import normalized_guidance as tcfg_guidance
from kornia.geometry.transform import build_laplacian_pyramid

from guidance_core import cfg_rules, corrections, frequency
from guidance_core.plan import COND, UNCOND, CFGRule, GuidanceStack, PostTransform, PreTransform, StepContext
from guidance_core.rules import MomentumBuffer

SCALE = 5.0


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected64 = expected.double()
    return ((actual.double() - expected64).norm() / expected64.norm().clamp_min(1e-30)).item()


# Every function as f(cond, uncond) -> tensor shaped like cond.
FUNCTIONS = {
    "tangential_damping": lambda c, u: cfg_rules.tangential_damping(c, u),
    "magnitude_aware_cfg": lambda c, u: cfg_rules.magnitude_aware_cfg(c, u, SCALE, 8.0),
    "mahiro": lambda c, u: cfg_rules.mahiro(c, u, SCALE),
    "apg_mix": lambda c, u: cfg_rules.apg_mix(c, u, SCALE, True, 10.0, 0.3, 2.0, MomentumBuffer(-0.5)),
    "fresca": lambda c, u: frequency.fresca(c, u, SCALE, 0.8, 1.5, 2),
    "fdg": lambda c, u: frequency.frequency_decoupled_cfg(c, u, (10.0, 5.0), (0.5, 1.0)),
    "channel_norm_cap": lambda c, u: corrections.channel_norm_cap(u + SCALE * (c - u), c),
    "channel_renorm": lambda c, u: corrections.channel_renorm(u + SCALE * (c - u), c, 0.7),
    "norm_cap": lambda c, u: corrections.norm_cap(u + SCALE * (c - u), c, 1.0),
    "dynamic_threshold": lambda c, u: corrections.dynamic_threshold(u + SCALE * (c - u), 0.9, 1.5),
    "mimic_threshold": lambda c, u: corrections.mimic_threshold(u + SCALE * (c - u), c, u, 2.0, 0.95),
}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_shape_dtype_and_finite_on_every_shape_and_dtype(name, shape, dtype, rand_pair) -> None:
    cond, uncond = rand_pair(shape, dtype, seed=1)
    out = FUNCTIONS[name](cond, uncond)
    assert out.shape == cond.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    if dtype != torch.float32:  # low precision follows float32 (a few roundings, amplified by the scale)
        reference = FUNCTIONS[name](*(t.float() for t in rand_pair(shape, torch.float32, seed=1)))
        assert relative_difference(out, reference) < 3e-2


@pytest.mark.parametrize("name", FUNCTIONS)
def test_zero_and_identical_inputs_stay_finite(name, shape, dtype, rand_pair) -> None:
    zero = torch.zeros(shape, dtype=dtype)
    cond, _ = rand_pair(shape, dtype, seed=2)
    for c, u in ((zero, zero), (cond, cond), (zero, cond), (cond, zero)):
        assert torch.isfinite(FUNCTIONS[name](c, u)).all(), name


def test_tcfg_matches_diffusers_svd_projection(shape, rand_pair) -> None:
    """The Gram-matrix eigenvector gives the references' SVD projection (float32 SVD: 1e-5)."""
    cond, uncond = rand_pair(shape, torch.float32, seed=3)
    damped = cfg_rules.tangential_damping(cond, uncond)
    ours = damped + SCALE * (cond - damped)
    torch.testing.assert_close(ours, tcfg_guidance(cond, uncond, SCALE), rtol=1e-4, atol=1e-4)
    assert relative_difference(ours, uncond + SCALE * (cond - uncond)) > 0.02  # not a no-op


def test_tcfg_of_parallel_branches_keeps_the_uncond() -> None:
    uncond = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cfg_rules.tangential_damping(3.0 * uncond, uncond), uncond)


def test_mambo_g_matches_diffusers(shape, rand_pair) -> None:
    """diffusers' mambo_guidance takes a Frobenius norm over dims 1.., which torch refuses on more than 2 dims:
    it is given (B, C, rest), where that is the per-sample L2 norm."""
    cond, uncond = rand_pair(shape, torch.float32, seed=4)
    for alpha in (0.5, 8.0):
        expected = mambo_guidance(cond.flatten(2), uncond.flatten(2), SCALE, alpha).reshape(shape)
        torch.testing.assert_close(cfg_rules.magnitude_aware_cfg(cond, uncond, SCALE, alpha), expected,
                                   rtol=1e-5, atol=1e-5)


def mahiro_reference(cond, uncond, scale):
    """ComfyUI's Mahiro node's formula, per sample (its mean is over the batch: equal for batch 1)."""
    guided = uncond + scale * (cond - uncond)
    leap, uncond_leap = cond * scale, uncond * scale
    merge = (leap + guided) / 2
    root_u, root_m = uncond_leap.abs().sqrt() * uncond_leap.sign(), merge.abs().sqrt() * merge.sign()
    out = []
    for i in range(cond.shape[0]):
        sim = torch.nn.functional.cosine_similarity(root_u[i:i + 1], root_m[i:i + 1]).mean()
        weight = 2 * (sim + 1)
        out.append((weight * guided[i:i + 1] + (4 - weight) * leap[i:i + 1]) / 4)
    return torch.cat(out)


def test_mahiro_matches_comfyui_formula(shape, rand_pair) -> None:
    cond, uncond = rand_pair(shape, torch.float32, seed=5)
    torch.testing.assert_close(cfg_rules.mahiro(cond, uncond, SCALE), mahiro_reference(cond, uncond, SCALE),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cfg_rules.mahiro(cond, uncond, 1.0), cond)  # w = 1: the cond


def test_apg_mix_matches_diffusers_over_steps(shape, rand_pair) -> None:
    """Five steps, APG after step 1, momentum over all: the same sequence as diffusers' guider."""
    guider = AdaptiveProjectedMixGuidance(guidance_scale=SCALE, adaptive_projected_guidance_scale=8.0,
                                          adaptive_projected_guidance_momentum=-0.5,
                                          adaptive_projected_guidance_rescale=3.0, eta=0.2,
                                          adaptive_projected_guidance_start_step=1)
    guider.momentum_buffer = DiffusersMomentumBuffer(-0.5)
    buffer = MomentumBuffer(-0.5)
    for step in range(5):
        cond, uncond = rand_pair(shape, torch.float32, seed=10 + step)
        guider.set_state(step, 5, torch.tensor(999))
        expected = guider.forward(cond, uncond).pred
        ours = cfg_rules.apg_mix(cond, uncond, SCALE, step > 1, 8.0, 0.2, 3.0, buffer)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


# --- FDG and FreSca -------------------------------------------------------------------------------------

@pytest.mark.parametrize("levels", [1, 2, 3])
def test_pyramid_equals_kornia_on_power_of_two_sizes(levels) -> None:
    x = torch.randn(2, 4, 16, 32, generator=torch.Generator().manual_seed(0))
    for ours, theirs in zip(frequency.laplacian_pyramid(x, levels), build_laplacian_pyramid(x, levels), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [(12, 20), (7, 5), (3, 3), (1, 9), (16, 16)])
@pytest.mark.parametrize("levels", [1, 2, 4])
def test_pyramid_keeps_the_shape_and_reconstructs_exactly(size, levels) -> None:
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    pyramid = frequency.laplacian_pyramid(x, levels)
    assert [tuple(level.shape[-2:]) for level in pyramid] == frequency.pyramid_sizes(*size, levels)
    rebuilt = frequency.reconstruct_from_pyramid(pyramid)
    assert rebuilt.shape == x.shape
    torch.testing.assert_close(rebuilt, x, rtol=1e-5, atol=1e-5)


def test_fdg_matches_diffusers_on_power_of_two(rand_pair) -> None:
    cond, uncond = rand_pair((3, 4, 16, 16), torch.float32, seed=6)
    for scales, weights in (((10.0, 5.0), (1.0, 1.0)), ((8.0, 4.0, 2.0), (0.5, 0.0, 1.0))):
        guider = FrequencyDecoupledGuidance(guidance_scales=list(scales), parallel_weights=list(weights))
        torch.testing.assert_close(frequency.frequency_decoupled_cfg(cond, uncond, scales, weights),
                                   guider.forward(cond, uncond).pred, rtol=1e-5, atol=1e-5)


def test_fdg_with_equal_scales_is_cfg_on_any_size(rand_pair) -> None:
    for shape in ((1, 4, 12, 20), (3, 16, 2, 6, 10)):
        cond, uncond = rand_pair(shape, torch.float32, seed=7)
        torch.testing.assert_close(frequency.frequency_decoupled_cfg(cond, uncond, (SCALE,) * 3),
                                   uncond + SCALE * (cond - uncond), rtol=1e-4, atol=1e-4)
        assert relative_difference(frequency.frequency_decoupled_cfg(cond, uncond, (10.0, 2.0)),
                                   uncond + SCALE * (cond - uncond)) > 0.02


def fresca_reference(x, scale_low, scale_high, cutoff):
    """ComfyUI 0.33.0's Fourier_filter (nodes_fresca.py), written here: a box of ±cutoff around the centre of
    the shifted spectrum of the last two dims."""
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    mask = torch.full(spectrum.shape, scale_high)
    view = mask
    for dim in (x.ndim - 2, x.ndim - 1):
        centre = x.shape[dim] // 2
        half = min(cutoff, centre)
        view = view.narrow(dim, centre - half, 2 * half)
    view[:] = scale_low
    return torch.fft.ifftn(torch.fft.ifftshift(spectrum * mask, dim=(-2, -1)), dim=(-2, -1)).real


def test_fresca_matches_comfyui_fourier_filter(shape, rand_pair) -> None:
    cond, uncond = rand_pair(shape, torch.float32, seed=8)
    expected = uncond + SCALE * fresca_reference(cond - uncond, 0.8, 1.5, 2)
    torch.testing.assert_close(frequency.fresca(cond, uncond, SCALE, 0.8, 1.5, 2), expected, rtol=1e-5, atol=1e-5)


# --- corrections ----------------------------------------------------------------------------------------

def test_dynamic_threshold_matches_diffusers_threshold_sample(shape, rand_pair) -> None:
    cond, uncond = rand_pair(shape, torch.float32, seed=9)
    guided = uncond + SCALE * (cond - uncond)
    scheduler = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    torch.testing.assert_close(corrections.dynamic_threshold(guided, 0.9, 1.5), scheduler._threshold_sample(guided),
                               rtol=1e-5, atol=1e-5)


def test_quantile_equals_torch_quantile() -> None:
    x = torch.randn(3, 1001, generator=torch.Generator().manual_seed(2))
    for q in (0.0, 0.5, 0.9, 0.995, 1.0):
        torch.testing.assert_close(corrections._quantile(x, q), torch.quantile(x, q, dim=1, keepdim=True))


def test_norm_caps_never_lengthen_and_renorm_matches_the_cond() -> None:
    cond, guided = torch.randn(2, 4, 6, 6), 3.0 * torch.randn(2, 4, 6, 6)
    capped = corrections.channel_norm_cap(guided, cond)
    assert (capped.norm(dim=1) <= cond.norm(dim=1) + 1e-5).all()
    renormed = corrections.channel_renorm(guided, cond)
    torch.testing.assert_close(renormed.norm(dim=1), cond.norm(dim=1))
    capped = corrections.norm_cap(guided, cond, 0.5)
    torch.testing.assert_close(capped.flatten(1).norm(dim=1), 0.5 * cond.flatten(1).norm(dim=1))


# --- composition in the plan ----------------------------------------------------------------------------

def test_a_rule_that_takes_the_step_and_a_post_transform_with_a_strength_schedule_see_the_step() -> None:
    seen = []

    def rule(cond, uncond, scale, state, step):
        seen.append(("rule", step.step))
        return uncond + scale * (cond - uncond)

    def post(guided, preds, step):
        seen.append(("post", step.step))
        return guided * (1 + step.step)

    stack = GuidanceStack().with_cfg_rule(CFGRule("Node", rule, takes_step=True))
    stack = stack.with_post(PostTransform("p", post, space="x0", takes_step=True))
    stack = stack.with_pre(PreTransform("t", lambda preds: {UNCOND: 2 * preds[UNCOND]}, space="x0"))
    cond, uncond, x = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2) + 0.5, torch.zeros(1, 1, 2, 2)
    out = stack.combine({COND: cond, UNCOND: uncond}, x, StepContext(2, 4, 1.0, 3.0))
    # the pre transform's uncond (1.0) then CFG at 3 then ×3: (1 + 3·(1 − 1))·3
    torch.testing.assert_close(out, torch.full_like(cond, 3.0))
    assert seen == [("rule", 2), ("post", 2)]
