"""guidance_core.trajectory_rules (momentum guidance, SMC-CFG) against references written here from the papers'
equations (float64, one sample at a time), over several steps of one run; and the plan's velocity space and
stateful post transforms.

Breaks shown to fail on a scratch copy: the running average updated before the extrapolation (instead of
after) fails the momentum reference and the plan test; SMC's e_prev kept as the raw error instead of the
corrected one fails the SMC reference; SMC's elementwise sign replaced by the per-sample unit vector (or the
reverse: the two switching forms swapped) fails the SMC reference for both forms.
"""

from __future__ import annotations

import pytest
import torch

from guidance_core.plan import COND, UNCOND, CFGRule, GuidanceStack, PostTransform, StepContext
from guidance_core.trajectory_rules import MomentumGuidanceState, SlidingModeState, momentum_guidance, smc_cfg

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def relative_difference(actual, expected) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))


def trajectory(shape, dtype=torch.float32, steps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype))
            for _ in range(steps)]


def reference_momentum(velocities, alpha, beta):
    """Liao et al. 2026, Alg. 1: v̂_i = v_i + α(v_i − m_i); m_{i+1} = β m_i + (1 − β) v_i; m_0 = v_0."""
    out, m = [], None
    for v in velocities:
        v = v.double()
        m = v if m is None else m
        out.append(v + alpha * (v - m))
        m = beta * m + (1 - beta) * v
    return out


def reference_smc(steps, scale, lam, k, switching="sign"):
    """Wang et al. 2026 §3.4, per sample: e = c − u; s = (e − e_prev) + λ e_prev; ê = e − k·sign(s);
    e_prev ← ê (e_prev = e on the first step); result u + w ê. sign per element (the authors' code,
    hanyang-21/CFG-Ctrl pipeline/common_cfg_ctrl.py), or ``switching="unit"``: s/||s|| (sd-perturbed-attention)."""
    out, previous = [], None
    for cond, uncond in steps:
        c, u = cond.double(), uncond.double()
        results, corrected_all = [], []
        for i in range(c.shape[0]):
            e = c[i] - u[i]
            e_prev = e if previous is None else previous[i]
            s = (e - e_prev) + lam * e_prev
            direction = torch.sign(s) if switching == "sign" else s / s.norm()
            corrected = e - k * direction
            corrected_all.append(corrected)
            results.append(u[i] + scale * corrected)
        previous = corrected_all
        out.append(torch.stack(results))
    return out


def test_momentum_guidance_matches_algorithm_1(shape):
    velocities = [v for v, _ in trajectory(shape, seed=1)]
    state = MomentumGuidanceState()
    expected = reference_momentum(velocities, 0.5, 0.6)
    got = [momentum_guidance(v, state, 0.5, 0.6) for v in velocities]
    torch.testing.assert_close(got[0], velocities[0])  # no past yet: the first step is unchanged
    for g, e in zip(got, expected, strict=True):
        assert relative_difference(g, e) < 1e-6
    assert relative_difference(got[-1], velocities[-1]) > 0.05  # not a no-op


@pytest.mark.parametrize("switching", ["sign", "unit"])
def test_smc_cfg_matches_the_paper(shape, switching):
    steps = trajectory(shape, seed=2)
    state = SlidingModeState()
    expected = reference_smc(steps, 5.0, 6.0, 0.3, switching)
    for (cond, uncond), want in zip(steps, expected, strict=True):
        got = smc_cfg(cond, uncond, 5.0, state, 6.0, 0.3, switching)
        assert relative_difference(got, want) < 1e-6
        assert relative_difference(got, uncond + 5.0 * (cond - uncond)) > 1e-3  # not plain CFG


def test_smc_cfg_with_zero_gain_is_cfg(shape):
    state = SlidingModeState()
    for cond, uncond in trajectory(shape, seed=3):
        torch.testing.assert_close(smc_cfg(cond, uncond, 4.0, state, 6.0, 0.0), uncond + 4.0 * (cond - uncond))


@pytest.mark.parametrize("name", ["momentum", "smc"])
def test_low_precision_is_finite_and_close(shape, dtype, name):
    steps = trajectory(shape, seed=4)
    wide_state, low_state = (MomentumGuidanceState(), MomentumGuidanceState()) if name == "momentum" else (
        SlidingModeState(), SlidingModeState())
    for cond, uncond in steps:
        if name == "momentum":
            want, got = momentum_guidance(cond, wide_state), momentum_guidance(cond.to(dtype), low_state)
        else:
            want = smc_cfg(cond, uncond, 5.0, wide_state)
            got = smc_cfg(cond.to(dtype), uncond.to(dtype), 5.0, low_state)
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert relative_difference(got, want) < 5 * TOLERANCE[dtype]


@pytest.mark.parametrize("kind", ["zero", "identical"])
def test_zero_or_identical_predictions_are_finite(shape, dtype, kind):
    cond = torch.zeros(shape, dtype=dtype) if kind == "zero" else trajectory(shape, dtype, seed=5)[0][0]
    smc_state, mg_state = SlidingModeState(), MomentumGuidanceState()
    for _ in range(3):
        assert torch.isfinite(smc_cfg(cond, cond.clone(), 7.0, smc_state)).all()
        assert torch.isfinite(momentum_guidance(cond, mg_state)).all()


def test_smc_cfg_defaults_are_the_authors_recommendation():
    """λ = 5, k = 0.2, elementwise sign (hanyang-21/CFG-Ctrl README, recommended settings)."""
    steps = trajectory((2, 4, 3, 3), seed=7)
    state = SlidingModeState()
    for (cond, uncond), want in zip(steps, reference_smc(steps, 4.0, 5.0, 0.2, "sign"), strict=True):
        assert relative_difference(smc_cfg(cond, uncond, 4.0, state), want) < 1e-6


def test_smc_cfg_rejects_an_unknown_switching_form():
    with pytest.raises(ValueError, match="switching must be one of"):
        smc_cfg(torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), 5.0, SlidingModeState(), switching="tanh")


def test_the_states_reject_another_shape():
    state = SlidingModeState()
    smc_cfg(torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), 5.0, state)
    with pytest.raises(ValueError, match="fresh state"):
        smc_cfg(torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2), 5.0, state)


def test_plan_velocity_space_and_stateful_post_transform_follow_their_definitions():
    """A velocity-space rule sees (x − x0)/σ and its result is mapped back with x0 = x − σ·v; a stateful post
    transform gets a fresh state per run and the step's context."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 6, 6, generator=g)
    steps = [(torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)) for _ in range(3)]
    sigmas = [3.0, 1.5, 0.5]
    rule = CFGRule("smc", lambda c, u, w, state: smc_cfg(c, u, w, state, 6.0, 0.3), space="velocity",
                   make_state=SlidingModeState)
    post = PostTransform("mg", lambda guided, preds, state, ctx: momentum_guidance(guided, state, 0.5 * ctx.step, 0.6),
                         space="velocity", make_state=MomentumGuidanceState)
    stack = GuidanceStack().with_cfg_rule(rule).with_post(post)
    run_state = stack.new_run_state()
    velocities = [((x - c) / s, (x - u) / s) for (c, u), s in zip(steps, sigmas, strict=True)]
    smc_reference = reference_smc(velocities, 5.0, 6.0, 0.3)
    momentum_reference, m = [], None
    for step, v in enumerate(smc_reference):  # momentum with α = 0.5·step, on the SMC result
        m = v if m is None else m
        momentum_reference.append(v + 0.5 * step * (v - m))
        m = 0.6 * m + 0.4 * v
    for step, ((cond, uncond), sigma) in enumerate(zip(steps, sigmas, strict=True)):
        ctx = StepContext(step, 3, sigma, 5.0)
        got = stack.combine({COND: cond, UNCOND: uncond}, x, ctx, run_state)
        want = x.double() - sigma * momentum_reference[step]
        assert relative_difference(got, want) < 1e-6
    assert set(stack.new_run_state()) == {"cfg", "post:mg"}
