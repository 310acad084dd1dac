"""Tests for guidance_core.rules: parity with the references, properties from the papers, no-op guards.

References (test-only dependencies):
- diffusers 0.42.1 guiders: ClassifierFreeGuidance, ClassifierFreeZeroStarGuidance,
  AdaptiveProjectedGuidance (+ its MomentumBuffer), rescale_noise_cfg, cfg_zero_star_scale.
- cf_guidance 0.0.3 transforms: BaseNormGuidance, TNormGuidance, FullNormGuidance.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from cf_guidance.transforms import BaseNormGuidance, FullNormGuidance, TNormGuidance
from diffusers.guiders import (
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    ClassifierFreeZeroStarGuidance,
)
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer as DiffusersMomentumBuffer
from diffusers.guiders.classifier_free_zero_star_guidance import cfg_zero_star_scale
from diffusers.guiders.guider_utils import rescale_noise_cfg

from guidance_core import rules
from guidance_core.rules import (
    MomentumBuffer,
    apg,
    base_norm,
    cfg,
    cfg_zero_star,
    cfg_zero_star_alpha,
    full_norm,
    rescale,
    t_norm,
)

NUM_INFERENCE_STEPS = 10
# A no-op (or a trivial substitute) must miss the real result by at least this relative L2 distance.
# The real differences on the fixture's random predictions are 0.1 and up, at least 5x this margin.
NOOP_MARGIN = 0.02
# ||low-precision result - float32 result|| / ||float32 result||. bfloat16 keeps 8 significant bits
# (relative rounding 2^-9 ≈ 0.002) and float16 11 (≈ 0.0005); a few rounded operations, amplified by
# the guidance scale, stay well inside these bounds, while any real formula change exceeds NOOP_MARGIN.
LOW_PRECISION_REL_TOL = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    expected64 = expected.double()
    return ((actual.double() - expected64).norm() / expected64.norm().clamp_min(1e-30)).item()


def assert_matches_float32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Tight float32 parity: elementwise rtol 1e-5 with an absolute floor of 1e-5 for values near 0."""
    assert actual.dtype == expected.dtype == torch.float32
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def diffusers_step(guider, step: int) -> None:
    """Advance a diffusers guider through its per-step lifecycle (state, then input preparation)."""
    guider.set_state(step=step, num_inference_steps=NUM_INFERENCE_STEPS, timestep=torch.tensor(999 - 100 * step))
    # prepare_inputs is where APG creates a fresh MomentumBuffer at step 0; no inputs are needed for that.
    guider.prepare_inputs({})


def per_sample_std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased per-sample std (torch's default), float64, one value per sample."""
    return x.double().flatten(1).std(dim=1)


def per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    return x.double().flatten(1).norm(dim=1)


# --- CFG ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("original_formulation", [False, True], ids=["imagen", "original"])
@pytest.mark.parametrize("scale", [0.5, 3.0, 7.5])
def test_cfg_matches_diffusers(shape, rand_pair, original_formulation, scale):
    cond, uncond = rand_pair(shape, seed=1)
    guider = ClassifierFreeGuidance(guidance_scale=scale, use_original_formulation=original_formulation)
    diffusers_step(guider, step=0)
    expected = guider.forward(pred_cond=cond, pred_uncond=uncond).pred

    assert_matches_float32(cfg(cond, uncond, scale, original_formulation), expected)


def test_cfg_scale_one_is_cond_and_formulations_differ_by_one(shape, rand_pair):
    cond, uncond = rand_pair(shape, seed=2)
    torch.testing.assert_close(cfg(cond, uncond, 1.0), cond)
    torch.testing.assert_close(cfg(cond, uncond, 0.0, original_formulation=True), cond)
    # Ho & Salimans' w is Imagen's w - 1.
    torch.testing.assert_close(cfg(cond, uncond, 4.0, original_formulation=True), cfg(cond, uncond, 5.0))


# --- Rescale ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("multiplier", [0.0, 0.3, 0.7, 1.0])
def test_rescale_matches_diffusers_rescale_noise_cfg(shape, rand_pair, rand_tensor, multiplier):
    cond, uncond = rand_pair(shape, seed=3)
    guided = cfg(cond, uncond, 7.5)
    expected = rescale_noise_cfg(guided, cond, guidance_rescale=multiplier)

    assert_matches_float32(rescale(guided, cond, multiplier), expected)

    # Also on an arbitrary tensor that is not a CFG result of cond (different mean and spread).
    other = 3.0 * rand_tensor(shape, seed=4) + 1.5
    assert_matches_float32(rescale(other, cond, multiplier), rescale_noise_cfg(other, cond, multiplier))


@pytest.mark.parametrize("original_formulation", [False, True], ids=["imagen", "original"])
def test_cfg_then_rescale_matches_diffusers_guider(shape, rand_pair, original_formulation):
    cond, uncond = rand_pair(shape, seed=5)
    guider = ClassifierFreeGuidance(
        guidance_scale=6.0, guidance_rescale=0.7, use_original_formulation=original_formulation
    )
    diffusers_step(guider, step=0)
    expected = guider.forward(pred_cond=cond, pred_uncond=uncond).pred

    actual = rescale(cfg(cond, uncond, 6.0, original_formulation), cond, 0.7)
    assert_matches_float32(actual, expected)


def test_rescale_full_multiplier_matches_cond_std(shape, rand_pair):
    # Lin et al. Alg. 2 with phi = 1: the rescaled prediction has exactly the conditional std.
    cond, uncond = rand_pair(shape, seed=6)
    rescaled = rescale(cfg(cond, uncond, 9.0), cond, 1.0)
    torch.testing.assert_close(per_sample_std(rescaled), per_sample_std(cond), rtol=1e-5, atol=0)


@pytest.mark.parametrize("constant", [0.0, 2.5])
def test_rescale_of_constant_guided_is_unchanged(shape, rand_pair, constant):
    # std_g = 0: diffusers returns NaN here; the ratio is taken as 1 instead.
    cond, _ = rand_pair(shape, seed=7)
    guided = torch.full(shape, constant)
    torch.testing.assert_close(rescale(guided, cond, 0.7), guided, rtol=0, atol=0)


# --- CFG-Zero* ----------------------------------------------------------------------------------------

def test_cfg_zero_star_alpha_matches_diffusers(shape, rand_pair):
    cond, uncond = rand_pair(shape, seed=8)
    expected = cfg_zero_star_scale(cond.flatten(1), uncond.flatten(1)).view(-1, *([1] * (len(shape) - 1)))

    alpha = cfg_zero_star_alpha(cond, uncond)
    assert alpha.shape == (shape[0],) + (1,) * (len(shape) - 1)
    assert_matches_float32(alpha, expected)


def test_cfg_zero_star_alpha_is_least_squares_scale(shape, rand_pair):
    # s* minimises ||c - s u||: nudging it either way can only make the residual longer.
    cond, uncond = rand_pair(shape, seed=9)
    alpha = cfg_zero_star_alpha(cond, uncond).double()
    cond64, uncond64 = cond.double(), uncond.double()
    best = per_sample_norm(cond64 - alpha * uncond64)
    for nudge in (-1e-2, 1e-2):
        assert torch.all(per_sample_norm(cond64 - (alpha + nudge) * uncond64) > best)


@pytest.mark.parametrize("original_formulation", [False, True], ids=["imagen", "original"])
@pytest.mark.parametrize("scale", [3.0, 7.5])
def test_cfg_zero_star_matches_diffusers(shape, rand_pair, original_formulation, scale):
    cond, uncond = rand_pair(shape, seed=10)
    guider = ClassifierFreeZeroStarGuidance(
        guidance_scale=scale, zero_init_steps=1, use_original_formulation=original_formulation
    )
    diffusers_step(guider, step=3)  # past the zero-init steps, which the plan handles, not the rule
    expected = guider.forward(pred_cond=cond, pred_uncond=uncond).pred

    assert_matches_float32(cfg_zero_star(cond, uncond, scale, "uncond", original_formulation), expected)


@pytest.mark.parametrize("original_formulation", [False, True], ids=["imagen", "original"])
def test_cfg_zero_star_cond_variant_matches_its_formula(shape, rand_pair, original_formulation):
    # This pack's variant has no external reference: re-derive it here in float64 from its definition,
    # c' = (<u, c> / (||c||^2 + 1e-8)) c, then CFG with c' in place of c.
    cond, uncond = rand_pair(shape, seed=11)
    cond64, uncond64 = cond.double(), uncond.double()
    alpha_cond = (cond64 * uncond64).flatten(1).sum(1) / (cond64.flatten(1).pow(2).sum(1) + 1e-8)
    projected_cond = alpha_cond.view(-1, *([1] * (len(shape) - 1))) * cond64
    base = projected_cond if original_formulation else uncond64
    expected = (base + 4.0 * (projected_cond - uncond64)).float()

    actual = cfg_zero_star(cond, uncond, 4.0, optimize="cond", original_formulation=original_formulation)
    assert_matches_float32(actual, expected)


def test_cfg_zero_star_rejects_unknown_optimize(rand_pair):
    cond, uncond = rand_pair((1, 4, 8, 8))
    with pytest.raises(ValueError, match="optimize") as excinfo:
        cfg_zero_star(cond, uncond, 5.0, optimize="both")
    message = str(excinfo.value)
    assert "uncond" in message and "cond" in message and "both" in message


# --- APG ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("norm_threshold", [0.0, 4.0], ids=["no_threshold", "threshold"])
@pytest.mark.parametrize("momentum", [None, -0.5, 0.5], ids=["no_momentum", "reverse_momentum", "momentum"])
def test_apg_matches_diffusers_over_steps(shape, rand_pair, eta, norm_threshold, momentum):
    # diffusers' paper semantics: the original formulation with guidance_scale = w - 1.
    scale = 5.0
    guider = AdaptiveProjectedGuidance(
        guidance_scale=scale - 1.0,
        adaptive_projected_guidance_momentum=momentum,
        adaptive_projected_guidance_rescale=norm_threshold,
        eta=eta,
        use_original_formulation=True,
    )
    buffer = MomentumBuffer(momentum) if momentum is not None else None
    for step in range(4):  # several consecutive steps, so the momentum state is exercised
        cond, uncond = rand_pair(shape, seed=100 + step)
        diffusers_step(guider, step)
        expected = guider.forward(pred_cond=cond, pred_uncond=uncond).pred

        actual = apg(cond, uncond, scale, eta=eta, norm_threshold=norm_threshold, momentum_buffer=buffer)
        assert_matches_float32(actual, expected)


@pytest.mark.parametrize("scale", [1.0, 3.0, 7.5])
def test_apg_without_projection_threshold_or_momentum_is_cfg(shape, rand_pair, scale):
    cond, uncond = rand_pair(shape, seed=12)
    assert_matches_float32(apg(cond, uncond, scale, eta=1.0), cfg(cond, uncond, scale))


def test_apg_eta_zero_update_is_orthogonal_to_cond(shape, rand_pair):
    cond, uncond = rand_pair(shape, seed=13)
    update = (apg(cond, uncond, 5.0, eta=0.0).double() - cond.double()) / 4.0
    cosine = (update * cond.double()).flatten(1).sum(1) / (per_sample_norm(update) * per_sample_norm(cond))
    assert torch.all(cosine.abs() < 1e-5)
    assert torch.all(per_sample_norm(update) > 1.0)  # and the update is not simply zero


def test_apg_threshold_bounds_the_update_norm(shape, rand_pair):
    cond, uncond = rand_pair(shape, seed=14)
    assert torch.all(per_sample_norm(cond - uncond) > 4.0)  # so the threshold is active
    update = (apg(cond, uncond, 5.0, eta=1.0, norm_threshold=4.0).double() - cond.double()) / 4.0
    torch.testing.assert_close(per_sample_norm(update), torch.full((shape[0],), 4.0, dtype=torch.float64))


def test_momentum_buffer_matches_diffusers_running_average(rand_pair):
    ours, reference = MomentumBuffer(-0.75), DiffusersMomentumBuffer(-0.75)
    for step in range(5):
        delta, _ = rand_pair((3, 4, 8, 8), seed=200 + step)
        reference.update(delta)
        assert_matches_float32(ours.update(delta), reference.running_average)


def test_momentum_buffer_reset_starts_a_new_run(rand_pair):
    steps = [rand_pair((3, 4, 8, 8), seed=300 + step) for step in range(4)]
    buffer = MomentumBuffer(-0.5)

    def run() -> list[torch.Tensor]:
        return [apg(c, u, 5.0, eta=0.0, norm_threshold=10.0, momentum_buffer=buffer) for c, u in steps]

    first_run = run()
    continued_run = run()  # without reset the state leaks in
    buffer.reset()
    second_run = run()
    for first, second in zip(first_run, second_run, strict=True):
        torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert relative_difference(continued_run[0], first_run[0]) > NOOP_MARGIN


def test_momentum_buffer_rejects_a_new_shape_without_reset():
    buffer = MomentumBuffer(-0.5)
    buffer.update(torch.ones(1, 4, 8, 8))
    with pytest.raises(ValueError, match="reset"):
        buffer.update(torch.ones(2, 4, 8, 8))
    buffer.reset()
    torch.testing.assert_close(buffer.update(torch.ones(2, 4, 8, 8)), torch.ones(2, 4, 8, 8))


# --- cf_guidance norms --------------------------------------------------------------------------------

def _ours_base(cond, uncond, g, per_sample):
    return base_norm(cfg(cond, uncond, g), uncond, per_sample)


NORM_CASES = {
    # name: (cf_guidance transform, our equivalent, g). T-Norm's g is small (the cf_guidance README's range).
    "base_norm": (BaseNormGuidance, _ours_base, 7.5),
    "t_norm": (TNormGuidance, t_norm, 0.25),
    "full_norm": (FullNormGuidance, full_norm, 0.25),
}


def cf_guidance_reference(name: str, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    transform_class, _, g = NORM_CASES[name]
    transform = transform_class({"g": [g]})
    return transform(uncond, cond, 0)  # cf_guidance's argument order: (uncond, text, step index)


@pytest.mark.parametrize("name", NORM_CASES)
@pytest.mark.parametrize("batch_shape", [(1, 4, 8, 8), (1, 4, 3, 8, 8), (1, 16, 2, 6, 10)], ids=str)
def test_norms_match_cf_guidance_at_batch_one(rand_pair, name, batch_shape):
    cond, uncond = rand_pair(batch_shape, seed=15)
    _, ours, g = NORM_CASES[name]
    assert_matches_float32(ours(cond, uncond, g, True), cf_guidance_reference(name, cond, uncond))


def vary_sample_magnitudes(cond: torch.Tensor, uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give the 3 samples different magnitudes, as different prompts would, so whole-tensor norms differ."""
    magnitudes = torch.tensor([0.5, 1.0, 3.0]).view(3, *([1] * (cond.ndim - 1)))
    return cond * magnitudes, uncond * magnitudes.flip(0)


@pytest.mark.parametrize("name", NORM_CASES)
@pytest.mark.parametrize("batch_shape", [(3, 4, 8, 8), (3, 16, 2, 6, 10)], ids=str)
def test_norms_whole_tensor_match_cf_guidance_at_batch_three(rand_pair, name, batch_shape):
    cond, uncond = rand_pair(batch_shape, seed=16)
    cond, uncond = vary_sample_magnitudes(cond, uncond)
    _, ours, g = NORM_CASES[name]
    assert_matches_float32(ours(cond, uncond, g, False), cf_guidance_reference(name, cond, uncond))


@pytest.mark.parametrize("name", NORM_CASES)
@pytest.mark.parametrize("batch_shape", [(3, 4, 8, 8), (3, 16, 2, 6, 10)], ids=str)
def test_norms_per_sample_equal_cf_guidance_sample_by_sample(rand_pair, name, batch_shape):
    cond, uncond = rand_pair(batch_shape, seed=17)
    cond, uncond = vary_sample_magnitudes(cond, uncond)
    _, ours, g = NORM_CASES[name]
    expected = torch.cat(
        [cf_guidance_reference(name, cond[i : i + 1], uncond[i : i + 1]) for i in range(batch_shape[0])]
    )
    assert_matches_float32(ours(cond, uncond, g, True), expected)
    # And on this batch the whole-tensor norms really do give a different answer.
    assert relative_difference(ours(cond, uncond, g, False), expected) > NOOP_MARGIN


def test_base_norm_restores_uncond_norm_and_t_norm_step_length(shape, rand_pair):
    cond, uncond = rand_pair(shape, seed=18)
    guided = cfg(cond, uncond, 7.5)
    torch.testing.assert_close(
        per_sample_norm(base_norm(guided, uncond)), per_sample_norm(uncond), rtol=1e-5, atol=0
    )
    # T-Norm moves u by exactly g * ||u||.
    step = t_norm(cond, uncond, 0.25) - uncond
    torch.testing.assert_close(per_sample_norm(step), 0.25 * per_sample_norm(uncond), rtol=1e-5, atol=0)


# --- samples in a batch stay independent --------------------------------------------------------------

PER_SAMPLE_RULES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "rescale": lambda c, u: rescale(cfg(c, u, 7.5), c, 0.7),
    "cfg_zero_star_alpha": cfg_zero_star_alpha,
    "cfg_zero_star_uncond": lambda c, u: cfg_zero_star(c, u, 5.0),
    "cfg_zero_star_cond": lambda c, u: cfg_zero_star(c, u, 5.0, optimize="cond"),
    "apg": lambda c, u: apg(c, u, 5.0, eta=0.0, norm_threshold=4.0),
    "base_norm": lambda c, u: base_norm(cfg(c, u, 7.5), u),
    "t_norm": lambda c, u: t_norm(c, u, 0.25),
    "full_norm": lambda c, u: full_norm(c, u, 0.25),
}
WHOLE_TENSOR_RULES = {
    "base_norm": lambda c, u: base_norm(cfg(c, u, 7.5), u, per_sample=False),
    "t_norm": lambda c, u: t_norm(c, u, 0.25, per_sample=False),
    "full_norm": lambda c, u: full_norm(c, u, 0.25, per_sample=False),
}


@pytest.mark.parametrize("name", PER_SAMPLE_RULES)
@pytest.mark.parametrize("batch_shape", [(3, 4, 8, 8), (3, 16, 2, 6, 10)], ids=str)
def test_per_sample_rules_do_not_mix_samples(rand_pair, rand_tensor, name, batch_shape):
    rule = PER_SAMPLE_RULES[name]
    cond, uncond = rand_pair(batch_shape, seed=19)
    changed_cond, changed_uncond = cond.clone(), uncond.clone()
    changed_cond[1] = 10.0 * rand_tensor(batch_shape[1:], seed=20) + 3.0
    changed_uncond[1] = 0.1 * rand_tensor(batch_shape[1:], seed=21)

    before, after = rule(cond, uncond), rule(changed_cond, changed_uncond)
    for untouched in (0, 2):
        torch.testing.assert_close(after[untouched], before[untouched], rtol=1e-6, atol=1e-6)
    assert relative_difference(after[1], before[1]) > NOOP_MARGIN


@pytest.mark.parametrize("name", WHOLE_TENSOR_RULES)
def test_whole_tensor_norms_do_mix_samples(rand_pair, rand_tensor, name):
    rule = WHOLE_TENSOR_RULES[name]
    cond, uncond = rand_pair((3, 4, 8, 8), seed=22)
    changed_cond = cond.clone()
    changed_cond[1] = 10.0 * rand_tensor((4, 8, 8), seed=23)
    assert relative_difference(rule(changed_cond, uncond)[0], rule(cond, uncond)[0]) > NOOP_MARGIN


# --- low precision ------------------------------------------------------------------------------------

ALL_RULES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cfg": lambda c, u: cfg(c, u, 7.5),
    "cfg_original": lambda c, u: cfg(c, u, 6.5, original_formulation=True),
    **PER_SAMPLE_RULES,
    "apg_eta_one": lambda c, u: apg(c, u, 5.0),
    **{f"{name}_whole_tensor": rule for name, rule in WHOLE_TENSOR_RULES.items()},
}


@pytest.mark.parametrize("name", ALL_RULES)
def test_low_precision_is_finite_and_close_to_float32(shape, rand_pair, low_precision_dtype, name):
    rule = ALL_RULES[name]
    cond32, uncond32 = rand_pair(shape, torch.float32, seed=24)
    cond, uncond = rand_pair(shape, low_precision_dtype, seed=24)

    result = rule(cond, uncond)
    assert result.dtype == low_precision_dtype
    assert torch.isfinite(result).all()
    assert relative_difference(result, rule(cond32, uncond32)) < LOW_PRECISION_REL_TOL[low_precision_dtype]


def test_low_precision_apg_with_momentum_is_close_to_float32(shape, rand_pair, low_precision_dtype):
    buffer32, buffer_low = MomentumBuffer(-0.5), MomentumBuffer(-0.5)
    for step in range(4):
        cond32, uncond32 = rand_pair(shape, torch.float32, seed=400 + step)
        cond, uncond = rand_pair(shape, low_precision_dtype, seed=400 + step)
        result = apg(cond, uncond, 5.0, eta=0.0, norm_threshold=4.0, momentum_buffer=buffer_low)
        expected = apg(cond32, uncond32, 5.0, eta=0.0, norm_threshold=4.0, momentum_buffer=buffer32)
        assert result.dtype == low_precision_dtype
        assert torch.isfinite(result).all()
        assert relative_difference(result, expected) < LOW_PRECISION_REL_TOL[low_precision_dtype]


def test_float16_cfg_zero_star_survives_an_alpha_beyond_float16_range():
    # ||u||^2 near the eps makes alpha ~1e5 (> float16's 65504), but alpha * u, a projection of c,
    # is small: the result must stay finite.
    cond = torch.full((1, 4, 8, 8), 20.0, dtype=torch.float16)
    uncond = torch.zeros_like(cond)
    uncond[0, 0, 0, 0] = 1e-4
    assert cfg_zero_star_alpha(cond.float(), uncond.float()).item() > 65504
    result = cfg_zero_star(cond, uncond, 5.0)
    assert torch.isfinite(result).all()
    expected = cfg_zero_star(cond.float(), uncond.float(), 5.0)
    assert relative_difference(result, expected) < LOW_PRECISION_REL_TOL[torch.float16]


# --- no-op guards -------------------------------------------------------------------------------------

def _noop_cases(cond: torch.Tensor, uncond: torch.Tensor) -> dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """name -> (the rule's output, the trivial results it must not be mistaken for)."""
    guided = cfg(cond, uncond, 7.5)
    apg_buffer = MomentumBuffer(-0.5)
    apg(cond, uncond, 5.0, eta=0.0, momentum_buffer=apg_buffer)  # step 1 of a run...
    apg_second_step_with_momentum = apg(uncond, cond, 5.0, eta=0.0, momentum_buffer=apg_buffer)
    return {
        "cfg": (guided, {"cond": cond, "uncond": uncond, "original": cfg(cond, uncond, 7.5, True)}),
        "cfg_original": (cfg(cond, uncond, 7.5, True), {"cond": cond, "uncond": uncond, "imagen": guided}),
        "rescale": (rescale(guided, cond, 0.7), {"guided": guided, "cond": cond}),
        "cfg_zero_star_alpha": (cfg_zero_star_alpha(cond, uncond), {"one": torch.ones(())}),
        "cfg_zero_star": (
            cfg_zero_star(cond, uncond, 7.5),
            {"cond": cond, "cfg": guided, "cond_variant": cfg_zero_star(cond, uncond, 7.5, "cond")},
        ),
        "cfg_zero_star_cond": (cfg_zero_star(cond, uncond, 7.5, "cond"), {"cond": cond, "cfg": guided}),
        "apg_eta_zero": (apg(cond, uncond, 7.5, eta=0.0), {"cond": cond, "cfg": guided}),
        "apg_threshold": (apg(cond, uncond, 7.5, norm_threshold=4.0), {"cond": cond, "cfg": guided}),
        "apg_momentum": (
            apg_second_step_with_momentum,
            {"no_momentum": apg(uncond, cond, 5.0, eta=0.0), "cond": uncond},
        ),
        "base_norm": (base_norm(guided, uncond), {"guided": guided, "cond": cond, "uncond": uncond}),
        "t_norm": (t_norm(cond, uncond, 0.25), {"cfg": cfg(cond, uncond, 0.25), "uncond": uncond, "cond": cond}),
        # At g = 0.25 the final BaseNorm changes T-Norm's result by only ~3%; g = 1 makes it ~30%.
        "full_norm": (
            full_norm(cond, uncond, 1.0),
            {"t_norm": t_norm(cond, uncond, 1.0), "base_norm": base_norm(cfg(cond, uncond, 1.0), uncond)},
        ),
    }


# Read the case names off a dummy call, so the parametrisation cannot drift from _noop_cases.
NOOP_CASE_NAMES = list(_noop_cases(torch.ones(1, 2, 2), torch.zeros(1, 2, 2)))


@pytest.mark.parametrize("name", NOOP_CASE_NAMES)
def test_rules_are_not_noops(shape, rand_pair, name):
    cond, uncond = rand_pair(shape, seed=25)
    output, trivial_alternatives = _noop_cases(cond, uncond)[name]
    assert torch.isfinite(output).all()
    for alternative_name, alternative in trivial_alternatives.items():
        alternative = alternative.expand_as(output)
        assert relative_difference(output, alternative) > NOOP_MARGIN, f"{name} looks like {alternative_name}"


def test_public_api_is_complete():
    expected = {
        "cfg", "rescale", "cfg_zero_star_alpha", "cfg_zero_star", "MomentumBuffer", "apg",
        "base_norm", "t_norm", "full_norm",
    }
    assert expected <= set(rules.__all__)


# --- STG / SLG whole-tensor rescale ---------------------------------------------------------------------

@pytest.mark.parametrize("multiplier", [0.0, 0.7, 1.0])
def test_whole_tensor_rescale_matches_the_stg_reference_formula(shape, rand_pair, multiplier):
    # ComfyUI's SkipLayerGuidanceDiT / the STG code: factor = c.std() / out.std() over the whole tensor,
    # out *= multiplier * factor + (1 - multiplier).
    guided, cond = rand_pair(shape, seed=11)
    guided = 3.0 * guided
    factor = cond.std() / guided.std()
    expected = guided * (multiplier * factor + (1 - multiplier))
    torch.testing.assert_close(rules.whole_tensor_rescale(guided, cond, multiplier), expected, rtol=1e-5, atol=1e-5)


def test_whole_tensor_rescale_mixes_the_batch_and_is_not_a_no_op(rand_pair):
    guided, cond = rand_pair((3, 4, 8, 8), seed=12)
    guided = 3.0 * guided
    out = rules.whole_tensor_rescale(guided, cond, 0.7)
    assert relative_difference(out, guided) > NOOP_MARGIN
    changed = guided.clone()
    changed[1] *= 5
    assert relative_difference(rules.whole_tensor_rescale(changed, cond, 0.7)[0], out[0]) > NOOP_MARGIN
    assert torch.isfinite(rules.whole_tensor_rescale(torch.zeros_like(cond), cond, 0.7)).all()
