"""guidance_core.branch_rules and the plan's use of them: the guidance interval, adaptive guidance's cut-off and
Perp-Neg, each against a reference written here from the paper's equation (plain float64 loops over the
samples, no shared helper), and the branches the plan asks for.

Breaks shown to fail on a scratch copy: the interval closed at sigma_low (``<=``) fails the boundary test;
the cut-off applied at the step that detects agreement (instead of the next) fails the reference; a whole-batch
cosine instead of per sample fails the batch-of-3 reference; Perp-Neg's projection on the negative instead of
the positive, or per_sample ignored, fails both references.
"""

from __future__ import annotations

import pytest
import torch

from guidance_core import rules
from guidance_core.branch_rules import (
    AdaptiveCutoffState,
    GuidanceInterval,
    adaptive_cutoff_cfg,
    guidance_interval_cfg,
    per_sample_cosine_similarity,
    perp_neg,
)
from guidance_core.plan import COND, UNCOND, Branch, CFGRule, GuidanceStack, StepContext

LOW_PRECISION_REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))


# --- guidance interval ---------------------------------------------------------------------------------

def test_interval_is_open_below_and_closed_above():
    interval = GuidanceInterval(5.42, 0.28)
    assert interval.contains(5.42) and interval.contains(0.2801) and interval.contains(1.0)
    assert not interval.contains(0.28) and not interval.contains(5.43) and not interval.contains(0.0)
    with pytest.raises(ValueError, match="sigma_low < sigma_high"):
        GuidanceInterval(0.28, 0.28)


def test_interval_cfg_is_cfg_inside_and_cond_outside(shape, rand_pair, dtype):
    cond, uncond = rand_pair(shape, dtype, seed=0)
    inside = guidance_interval_cfg(cond, uncond, 5.0, 1.0, 5.42, 0.28)
    torch.testing.assert_close(inside, uncond + 5.0 * (cond - uncond))
    assert torch.equal(guidance_interval_cfg(cond, uncond, 5.0, 10.0, 5.42, 0.28), cond)
    assert torch.equal(guidance_interval_cfg(cond, uncond, 5.0, 0.28, 5.42, 0.28), cond)


def test_plan_with_an_interval_window_needs_no_uncond_outside_and_equals_the_definition(rand_pair):
    cond, uncond = rand_pair((3, 4, 8, 8), torch.float32, seed=1)
    stack = GuidanceStack().with_cfg(window=GuidanceInterval(5.42, 0.28))
    x = torch.zeros_like(cond)
    for sigma in (14.6, 5.42, 2.0, 0.28, 0.03):
        ctx = StepContext(0, 10, sigma, cond_scale=6.0)
        needed = stack.needed_branches(ctx)
        inside = 0.28 < sigma <= 5.42
        assert needed == ([COND, UNCOND] if inside else [COND]), (sigma, needed)
        preds = {COND: cond, UNCOND: uncond} if inside else {COND: cond}
        combined = stack.combine(preds, x, ctx)
        torch.testing.assert_close(combined, guidance_interval_cfg(cond, uncond, 6.0, sigma, 5.42, 0.28))


# --- adaptive guidance ---------------------------------------------------------------------------------

def reference_cosine(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    out = []
    for a_i, b_i in zip(a.double(), b.double(), strict=True):
        out.append(float((a_i * b_i).sum() / (a_i.norm() * b_i.norm())))
    return out


def reference_adaptive_guidance(steps: list[tuple[torch.Tensor, torch.Tensor]], scale: float, threshold: float):
    """Castillo et al. 2023, the AG policy, one sample at a time: CFG while not truncated; a step whose γ exceeds
    γ̄ truncates guidance from the next step on."""
    results = []
    truncated = [False] * steps[0][0].shape[0]
    for cond, uncond in steps:
        step_out = []
        for i in range(cond.shape[0]):
            c, u = cond[i].double(), uncond[i].double()
            if truncated[i]:
                step_out.append(c)
                continue
            step_out.append(u + scale * (c - u))
            if reference_cosine(c[None], u[None])[0] > threshold:
                truncated[i] = True
        results.append(torch.stack(step_out))
    return results


def test_cosine_similarity_matches_its_definition(shape, rand_pair):
    cond, uncond = rand_pair(shape, torch.float32, seed=2)
    got = per_sample_cosine_similarity(cond, uncond)
    assert got.shape == (shape[0],)
    torch.testing.assert_close(got.tolist(), reference_cosine(cond, uncond), rtol=1e-6, atol=1e-7)


def agreeing_steps(shape, seed: int, count: int = 6):
    """Per step, a (cond, uncond) pair whose agreement grows step by step at a different rate per sample, so
    the samples of a batch stop at different steps."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(shape, generator=g)
    apart = torch.randn(shape, generator=g)
    rate = torch.linspace(0.3, 0.1, shape[0]).reshape(-1, *([1] * (len(shape) - 1)))
    return [(shared + apart * rate ** k, shared - apart * rate ** k) for k in range(count)]


@pytest.mark.parametrize("batch", [1, 3])
def test_adaptive_cutoff_matches_algorithm_1_per_sample(batch):
    steps = agreeing_steps((batch, 4, 8, 8), seed=3)
    cosines = [reference_cosine(c, u) for c, u in steps]
    threshold = 0.99
    # The fixture makes the samples stop at different steps, and at least one stops before the last step.
    stop_steps = [next((k for k, cos in enumerate(cosines) if cos[i] > threshold), None) for i in range(batch)]
    assert any(s is not None and s < len(steps) - 1 for s in stop_steps), cosines
    if batch > 1:
        assert len(set(stop_steps)) > 1, stop_steps
    state = AdaptiveCutoffState()
    expected = reference_adaptive_guidance(steps, 5.0, threshold)
    for (cond, uncond), want in zip(steps, expected, strict=True):
        got = adaptive_cutoff_cfg(cond, uncond, 5.0, state, threshold)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert state.finished == all(s is not None for s in stop_steps)


def test_adaptive_cutoff_in_low_precision_is_finite_and_close(shape, rand_pair, dtype):
    cond, uncond = rand_pair(shape, torch.float32, seed=4)
    want = adaptive_cutoff_cfg(cond, uncond, 5.0, AdaptiveCutoffState(), 0.99)
    got = adaptive_cutoff_cfg(cond.to(dtype), uncond.to(dtype), 5.0, AdaptiveCutoffState(), 0.99)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert relative_difference(got, want) < LOW_PRECISION_REL_TOL[dtype]


@pytest.mark.parametrize("kind", ["zero", "identical"])
def test_adaptive_cutoff_on_zero_or_identical_predictions_is_finite(shape, rand_pair, dtype, kind):
    cond, _ = rand_pair(shape, dtype, seed=5)
    if kind == "zero":
        cond = torch.zeros_like(cond)
    state = AdaptiveCutoffState()
    out = adaptive_cutoff_cfg(cond, cond.clone(), 7.0, state, 0.99)
    assert torch.isfinite(out).all()
    assert state.finished  # identical predictions agree (cos = 1, or both zero)


def test_plan_stops_evaluating_the_uncond_once_every_sample_stopped():
    steps = agreeing_steps((2, 4, 8, 8), seed=3)
    rule = CFGRule("test", lambda c, u, w, state: adaptive_cutoff_cfg(c, u, w, state, 0.99), space="x0",
                   make_state=AdaptiveCutoffState, stopped=lambda state: state.finished)
    stack = GuidanceStack().with_cfg_rule(rule)
    run_state = stack.new_run_state()
    expected = reference_adaptive_guidance(steps, 5.0, 0.99)
    needed_per_step = []
    for k, ((cond, uncond), want) in enumerate(zip(steps, expected, strict=True)):
        ctx = StepContext(k, len(steps), 1.0, 5.0)
        needed = stack.needed_branches(ctx, run_state)
        needed_per_step.append(needed)
        preds = {COND: cond, UNCOND: uncond} if UNCOND in needed else {COND: cond}
        got = stack.combine(preds, torch.zeros_like(cond), ctx, run_state)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert needed_per_step[0] == [COND, UNCOND] and needed_per_step[-1] == [COND], needed_per_step
    # A new run's state starts over: the uncond is needed again.
    assert stack.needed_branches(StepContext(0, 5, 1.0, 5.0), stack.new_run_state()) == [COND, UNCOND]


# --- Perp-Neg ------------------------------------------------------------------------------------------

def reference_perp_neg(cond, uncond, empty, scale, neg_scale, per_sample):
    """Armandpour et al. 2023 with one negative (weight scale·neg_scale), in float64; whole batch as
    ComfyUI's perp_neg (one dot product and norm over the whole tensor)."""
    c, u, e = cond.double(), uncond.double(), empty.double()
    if not per_sample:
        pos, neg = c - e, u - e
        perp = neg - (neg * pos).sum() / pos.norm() ** 2 * pos
        return e + scale * (pos - neg_scale * perp)
    return torch.cat([reference_perp_neg(c[i:i + 1], u[i:i + 1], e[i:i + 1], scale, neg_scale, False)
                      for i in range(c.shape[0])])


@pytest.mark.parametrize("per_sample", [True, False])
def test_perp_neg_matches_the_paper(shape, rand_pair, rand_tensor, per_sample):
    cond, uncond = rand_pair(shape, torch.float32, seed=6)
    empty = 0.5 * (cond + uncond) + 0.3 * rand_tensor(shape, seed=7)
    got = perp_neg(cond, uncond, empty, 6.0, 1.5, per_sample)
    want = reference_perp_neg(cond, uncond, empty, 6.0, 1.5, per_sample)
    assert relative_difference(got, want) < 1e-6
    # Not a no-op: it differs from CFG from the empty prompt and from plain CFG.
    assert relative_difference(rules.cfg(cond, uncond, 6.0), want) > 0.02
    assert relative_difference(perp_neg(cond, uncond, empty, 6.0, 0.0), empty + 6.0 * (cond - empty)) < 1e-6


def test_perp_neg_per_image_does_not_mix_the_batch_and_whole_batch_does(rand_pair, rand_tensor):
    cond, uncond = rand_pair((3, 4, 8, 8), torch.float32, seed=8)
    empty = rand_tensor((3, 4, 8, 8), seed=9)
    alone = perp_neg(cond[:1], uncond[:1], empty[:1], 6.0, 1.0, per_sample=True)
    torch.testing.assert_close(perp_neg(cond, uncond, empty, 6.0, 1.0, per_sample=True)[:1], alone)
    batch = perp_neg(cond, uncond, empty, 6.0, 1.0, per_sample=False)[:1]
    assert relative_difference(batch, alone) > 1e-3


def test_perp_neg_negative_is_perpendicular_to_the_positive(rand_pair, rand_tensor):
    cond, uncond = rand_pair((3, 4, 8, 8), torch.float32, seed=10)
    empty = rand_tensor((3, 4, 8, 8), seed=11)
    # result = e + w·pos − w·s·perp: recover perp and check it is orthogonal to pos per sample.
    perp = (empty + 2.0 * (cond - empty) - perp_neg(cond, uncond, empty, 2.0, 1.0)).double() / 2.0
    dots = (perp * (cond - empty).double()).flatten(1).sum(1)
    assert dots.abs().max() < 1e-6 * (cond - empty).double().norm() ** 2


def test_perp_neg_in_low_precision_is_finite_and_close(shape, rand_pair, rand_tensor, dtype):
    cond, uncond = rand_pair(shape, torch.float32, seed=12)
    empty = rand_tensor(shape, seed=13)
    want = perp_neg(cond, uncond, empty, 5.0, 1.0)
    got = perp_neg(cond.to(dtype), uncond.to(dtype), empty.to(dtype), 5.0, 1.0)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert relative_difference(got, want) < 5 * LOW_PRECISION_REL_TOL[dtype]


@pytest.mark.parametrize("kind", ["zero", "identical"])
@pytest.mark.parametrize("per_sample", [True, False])
def test_perp_neg_on_zero_or_identical_predictions_is_finite(shape, rand_pair, dtype, kind, per_sample):
    cond, uncond = rand_pair(shape, dtype, seed=14)
    if kind == "zero":
        cond, uncond = torch.zeros_like(cond), torch.zeros_like(uncond)
    out = perp_neg(cond, uncond, cond.clone(), 7.0, 1.0, per_sample)  # positive = empty: no direction
    assert torch.isfinite(out).all()
    # With no positive direction the whole negative is perpendicular: e − w·s·(u − e).
    want = cond.double() - 7.0 * (uncond.double() - cond.double())
    assert relative_difference(out, want) < 5 * LOW_PRECISION_REL_TOL[dtype] or want.norm() == 0


def test_plan_evaluates_the_empty_branch_a_perp_neg_rule_reads(rand_pair, rand_tensor):
    cond, uncond = rand_pair((2, 4, 8, 8), torch.float32, seed=15)
    empty = rand_tensor((2, 4, 8, 8), seed=16)
    rule = CFGRule("test", lambda c, u, w, state, e: perp_neg(c, u, e, w, 1.0), neutral_scale=None, reads=("empty",))
    stack = GuidanceStack().with_branch(Branch("empty", source="empty", conditioning=[])).with_cfg_rule(rule)
    ctx = StepContext(0, 4, 1.0, 1.0)
    assert stack.needed_branches(ctx) == [COND, UNCOND, "empty"]
    got = stack.combine({COND: cond, UNCOND: uncond, "empty": empty}, torch.zeros_like(cond), ctx)
    assert relative_difference(got, reference_perp_neg(cond, uncond, empty, 1.0, 1.0, True)) < 1e-6
