"""guidance_core.condition_annealing (CADS) against the paper's equations written here (Sadat et al., ICLR 2024,
arXiv:2310.17347, §3), in float64 one sample at a time.

Breaks shown to fail on a scratch copy: γ's ramp reversed ((t − τ1)/(τ2 − τ1)), the noise scaled by (1 − γ)
instead of √(1 − γ), the rescale's mean and std taken over the whole batch instead of per sample.
"""

from __future__ import annotations

import math

import pytest
import torch

from guidance_core.condition_annealing import ConditionNoiseState, cads_condition, cads_gamma

EMBEDDING_SHAPES = [(1, 77, 32), (3, 16, 32), (1, 4, 8, 8), (3, 16, 2, 6, 10)]
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def reference_cads(y, gamma, noise, s, psi):
    out = []
    for y_i, n_i in zip(y.double(), noise.double(), strict=True):
        noised = math.sqrt(gamma) * y_i + s * math.sqrt(1 - gamma) * n_i
        rescaled = (noised - noised.mean()) / noised.std() * y_i.std() + y_i.mean()
        out.append(psi * rescaled + (1 - psi) * noised)
    return torch.stack(out)


def relative_difference(actual, expected) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))


def test_gamma_is_the_papers_piecewise_linear_schedule():
    assert [cads_gamma(t, 0.6, 0.9) for t in (0.0, 0.6, 0.75, 0.9, 1.0)] == [1.0, 1.0, pytest.approx(0.5), 0.0, 0.0]
    assert cads_gamma(0.66, 0.6, 0.9) == pytest.approx(0.8)


@pytest.mark.parametrize("shape", EMBEDDING_SHAPES)
@pytest.mark.parametrize(("gamma", "psi"), [(0.0, 1.0), (0.3, 1.0), (0.3, 0.5), (0.7, 0.0), (1.0, 1.0)])
def test_cads_condition_matches_the_papers_noised_and_rescaled_condition(shape, gamma, psi):
    g = torch.Generator().manual_seed(1)
    y, noise = 2.0 + 3.0 * torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    got = cads_condition(y, gamma, noise, 0.25, psi)
    want = reference_cads(y, gamma, noise, 0.25, psi)
    assert relative_difference(got, want) < 1e-6
    if gamma < 1:
        assert relative_difference(got, y) > 1e-3  # not a no-op


@pytest.mark.parametrize("shape", EMBEDDING_SHAPES)
def test_low_precision_and_zero_embeddings_are_finite(shape, dtype):
    g = torch.Generator().manual_seed(2)
    y, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    want = cads_condition(y, 0.4, noise, 0.25, 1.0)
    got = cads_condition(y.to(dtype), 0.4, noise.to(dtype), 0.25, 1.0)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert relative_difference(got, want) < 5 * TOLERANCE[dtype]
    zero = torch.zeros(shape, dtype=dtype)
    assert torch.isfinite(cads_condition(zero, 0.4, torch.zeros_like(zero), 0.25, 1.0)).all()  # constant ŷ
    assert torch.isfinite(cads_condition(zero, 0.4, noise.to(dtype), 0.25, 1.0)).all()


def test_the_noise_state_repeats_per_seed():
    like = torch.zeros(1, 77, 32)
    first, again, other = ConditionNoiseState(3), ConditionNoiseState(3), ConditionNoiseState(4)
    draws = [first.draw(like) for _ in range(2)]
    assert torch.equal(draws[0], again.draw(like)) and torch.equal(draws[1], again.draw(like))
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], other.draw(like))
