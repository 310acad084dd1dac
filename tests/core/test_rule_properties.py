"""Property tests: every rule returns finite values for finite inputs.

Includes the degenerate inputs that break the unguarded reference implementations: all-zero
tensors (a zero norm or std in a denominator), cond == uncond (a zero guidance direction), one
branch zero, and constant tensors (zero std). Values are bounded so that the exact results are
representable in the dtype under test (float16 tops out at 65504, so its inputs are kept smaller).
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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

PROPERTY_SETTINGS = settings(max_examples=50, deadline=None)

# dtype -> largest input magnitude drawn for it.
VALUE_BOUNDS = {torch.float32: 1e3, torch.bfloat16: 1e3, torch.float16: 2.0}
PAIR_KINDS = ["random", "zeros", "identical", "cond_zero", "uncond_zero", "constant"]


@st.composite
def prediction_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``(cond, uncond)`` pair of shape ``(B, ...)`` with 1 to 4 non-batch dims, in some dtype."""
    dtype = draw(st.sampled_from(list(VALUE_BOUNDS)))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=2, max_size=5)))
    size = math.prod(shape)
    bound = VALUE_BOUNDS[dtype]
    values = st.lists(
        st.floats(-bound, bound, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32),
        min_size=size,
        max_size=size,
    )

    def tensor() -> torch.Tensor:
        return torch.tensor(draw(values), dtype=torch.float32).reshape(shape).to(dtype)

    kind = draw(st.sampled_from(PAIR_KINDS))
    if kind == "zeros":
        cond = uncond = torch.zeros(shape, dtype=dtype)
    elif kind == "identical":
        cond = tensor()
        uncond = cond.clone()
    elif kind == "cond_zero":
        cond, uncond = torch.zeros(shape, dtype=dtype), tensor()
    elif kind == "uncond_zero":
        cond, uncond = tensor(), torch.zeros(shape, dtype=dtype)
    elif kind == "constant":
        value = draw(st.floats(-bound, bound, allow_subnormal=False, width=32))
        cond, uncond = torch.full(shape, value, dtype=dtype), tensor()
    else:
        cond, uncond = tensor(), tensor()
    return cond, uncond


scales = st.floats(-2.0, 10.0, allow_subnormal=False)
unit_interval = st.floats(0.0, 1.0, allow_subnormal=False)


def assert_finite_like(result: torch.Tensor, like: torch.Tensor) -> None:
    assert result.dtype == like.dtype
    assert torch.isfinite(result).all(), result


@PROPERTY_SETTINGS
@given(pair=prediction_pairs(), scale=scales, original_formulation=st.booleans())
def test_cfg_is_finite(pair, scale, original_formulation):
    cond, uncond = pair
    result = cfg(cond, uncond, scale, original_formulation)
    assert result.shape == cond.shape
    assert_finite_like(result, cond)


@PROPERTY_SETTINGS
@given(pair=prediction_pairs(), scale=scales, multiplier=unit_interval)
def test_rescale_is_finite(pair, scale, multiplier):
    cond, uncond = pair
    # Rescale both a CFG result and an unrelated tensor (uncond), which may be constant or zero.
    for guided in (cfg(cond, uncond, scale), uncond):
        result = rescale(guided, cond, multiplier)
        assert result.shape == guided.shape
        assert_finite_like(result, guided)


@PROPERTY_SETTINGS
@given(pair=prediction_pairs())
def test_cfg_zero_star_alpha_is_finite(pair):
    cond, uncond = pair
    alpha = cfg_zero_star_alpha(cond, uncond)
    assert alpha.shape == (cond.shape[0],) + (1,) * (cond.ndim - 1)
    if cond.dtype != torch.float16:  # alpha itself may exceed float16's range; cfg_zero_star may not
        assert_finite_like(alpha, cond)


@PROPERTY_SETTINGS
@given(
    pair=prediction_pairs(),
    scale=scales,
    optimize=st.sampled_from(["uncond", "cond"]),
    original_formulation=st.booleans(),
)
def test_cfg_zero_star_is_finite(pair, scale, optimize, original_formulation):
    cond, uncond = pair
    result = cfg_zero_star(cond, uncond, scale, optimize, original_formulation)
    assert result.shape == cond.shape
    assert_finite_like(result, cond)


@PROPERTY_SETTINGS
@given(
    pairs=st.lists(prediction_pairs(), min_size=1, max_size=3),
    scale=scales,
    eta=unit_interval,
    norm_threshold=st.sampled_from([0.0, 1e-3, 1.0, 15.0]),
    momentum=st.sampled_from([None, -0.75, -0.5, 0.5]),
)
def test_apg_is_finite_over_a_run(pairs, scale, eta, norm_threshold, momentum):
    # Consecutive steps share one buffer, so the pairs of a run must share shape and dtype.
    cond0, uncond0 = pairs[0]
    steps = [(c, u) for c, u in pairs if c.shape == cond0.shape and c.dtype == cond0.dtype]
    buffer = MomentumBuffer(momentum) if momentum is not None else None
    for cond, uncond in steps:
        result = apg(cond, uncond, scale, eta=eta, norm_threshold=norm_threshold, momentum_buffer=buffer)
        assert result.shape == cond.shape
        assert_finite_like(result, cond)


@PROPERTY_SETTINGS
@given(pair=prediction_pairs(), scale=scales, per_sample=st.booleans())
def test_norms_are_finite(pair, scale, per_sample):
    cond, uncond = pair
    results = [
        base_norm(cfg(cond, uncond, scale), uncond, per_sample),
        base_norm(cond, uncond, per_sample),
        t_norm(cond, uncond, scale, per_sample),
        full_norm(cond, uncond, scale, per_sample),
    ]
    for result in results:
        assert result.shape == cond.shape
        assert_finite_like(result, cond)


@PROPERTY_SETTINGS
@given(pair=prediction_pairs(), scale=scales)
def test_identical_predictions_leave_nothing_to_guide(pair, scale):
    # With c == u there is no guidance direction: CFG, APG and T-Norm all return the prediction itself.
    cond, _ = pair
    uncond = cond.clone()
    torch.testing.assert_close(cfg(cond, uncond, scale), cond, rtol=0, atol=0)
    torch.testing.assert_close(apg(cond, uncond, scale, eta=0.0, norm_threshold=1.0), cond, rtol=0, atol=0)
    torch.testing.assert_close(t_norm(cond, uncond, scale), cond, rtol=0, atol=0)


def test_tiny_denominators_do_not_overflow_the_ratios():
    # Found by hypothesis: a CFG result scaled down to float32 subnormals has a std and a norm so small
    # that std_c / std_g (or ||u|| / ||g||) overflowed float32 to inf, and 0 * inf made NaN.
    cond = torch.zeros(2, 2, 2, 2)
    cond[1, 1, 1, 1] = 1.0
    uncond = 0.5 * torch.ones(2, 2, 2, 2)
    tiny_guided = cfg(cond, torch.zeros_like(cond), 4.2e-45)
    assert 0 < tiny_guided.abs().max() < 1e-44
    for multiplier in (0.0, 0.7, 1.0):
        assert torch.isfinite(rescale(tiny_guided, cond, multiplier)).all()
    # BaseNorm stays finite and still rescales the tiny (nonzero) sample to ||u||; the zero sample stays 0.
    normed = base_norm(tiny_guided, uncond)
    assert torch.isfinite(normed).all()
    assert torch.count_nonzero(normed[0]) == 0
    torch.testing.assert_close(normed[1].norm(), uncond[1].norm())
