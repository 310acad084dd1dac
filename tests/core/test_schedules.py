"""Schedules and windows: values from their definitions, cosine parity with cf_guidance, parsing, steps."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from guidance_core.schedules import (
    ALWAYS,
    Constant,
    Cosine,
    Custom,
    Linear,
    SigmaWindow,
    parse_values,
    schedule_from_dict,
    schedule_to_dict,
    step_of_sigma,
)

STEP_COUNTS = [1, 2, 3, 4, 7, 10, 20, 28, 50, 101]


# --- Constant, Linear, Custom against hand-derived values ------------------------------------------


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
def test_constant_is_the_value_at_every_step(num_steps: int) -> None:
    assert Constant(4.25).values(num_steps) == [4.25] * num_steps


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
@pytest.mark.parametrize(("start", "end"), [(7.5, 1.0), (0.0, 3.0), (-2.0, 2.0), (5.0, 5.0)])
def test_linear_runs_from_start_at_step_0_to_end_at_the_last_step(num_steps, start, end) -> None:
    values = Linear(start, end).values(num_steps)
    assert len(values) == num_steps
    assert values[0] == start  # exact: the first step is the start value
    if num_steps == 1:
        return
    assert values[-1] == end  # exact: the last step is the end value
    step_size = (end - start) / (num_steps - 1)
    for step, value in enumerate(values):
        assert value == pytest.approx(start + step * step_size, rel=1e-12, abs=1e-12)


def test_linear_midpoint_of_an_odd_run_is_the_mean() -> None:
    assert Linear(8.0, 2.0)(5, 11) == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("points", "num_steps", "expected"),
    [
        ((0.0, 10.0), 11, [float(i) for i in range(11)]),  # upsampled: one per unit
        ((1.0, 2.0, 3.0), 5, [1.0, 1.5, 2.0, 2.5, 3.0]),
        ((5.0, 1.0, 3.0), 3, [5.0, 1.0, 3.0]),  # exactly num_steps long: used as is
        ((0.0, 1.0, 2.0, 3.0, 4.0), 3, [0.0, 2.0, 4.0]),  # downsampled: positions 0, 2, 4
        ((0.0, 4.0, 8.0, 12.0), 2, [0.0, 12.0]),  # the ends are kept
        ((0.0, 3.0, 9.0), 4, [0.0, 2.0, 5.0, 9.0]),  # positions 0, 2/3, 4/3, 2
        ((6.0,), 5, [6.0] * 5),  # a single value is a constant
        ((7.0, 1.0), 1, [7.0]),  # a one-step run takes the first value
    ],
)
def test_custom_resamples_by_linear_interpolation(points, num_steps, expected) -> None:
    values = Custom(points).values(num_steps)
    assert values == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
def test_custom_matches_interpolation_at_positions_i_times_len_minus_1_over_n_minus_1(num_steps) -> None:
    points = (7.5, 6.0, 6.5, 4.0, 3.0, 1.0, 1.0, 0.5)
    values = Custom(values=points).values(num_steps)
    for step, value in enumerate(values):
        position = 0.0 if num_steps == 1 else step * (len(points) - 1) / (num_steps - 1)
        left = min(math.floor(position), len(points) - 2)
        expected = points[left] + (points[left + 1] - points[left]) * (position - left)
        assert value == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_custom_keeps_the_values_method_and_stores_floats() -> None:
    schedule = Custom(values=[1, 2, 3])
    assert schedule.points == (1.0, 2.0, 3.0)
    assert all(type(p) is float for p in schedule.points)
    assert schedule.values(3) == [1.0, 2.0, 3.0]
    assert Custom([1, 2, 3]) == Custom((1.0, 2.0, 3.0))
    assert hash(Custom([1, 2])) == hash(Custom((1.0, 2.0)))


# --- Cosine ------------------------------------------------------------------------------------------


def test_cosine_reference_checked_values() -> None:
    """The values the reference page checked against cf_guidance 0.0.3 by hand."""
    values = Cosine().values(50)
    assert values[0] == pytest.approx(7.5)
    assert values[25] == pytest.approx(3.825)
    assert values[49] == pytest.approx(0.15725, abs=1e-5)
    assert min(values) > 0.15  # never reaches min: progress stops at (N - 1 - W) / (N - W)

    warmed = Cosine(warmup=0.1, warmup_init=1.15).values(50)  # W = int(0.1 * 50) = 5
    assert warmed[:6] == pytest.approx([1.15, 2.42, 3.69, 4.96, 6.23, 7.5])
    assert warmed[6] == pytest.approx(7.491, abs=5e-4)


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
def test_cosine_half_cycle_matches_its_closed_form(num_steps: int) -> None:
    high, low = 9.0, 2.0
    values = Cosine(max_value=high, min_value=low).values(num_steps)
    for step, value in enumerate(values):
        expected = low + (high - low) * (1 + math.cos(math.pi * step / num_steps)) / 2
        assert value == pytest.approx(expected, rel=1e-12)


def test_cosine_full_cycle_comes_back_up() -> None:
    values = Cosine(max_value=7.5, min_value=1.0, num_cycles=1.0).values(100)
    assert values[0] == pytest.approx(7.5)
    assert values[50] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(7.5, abs=0.01)


def test_cosine_warmup_ramps_linearly_and_never_reaches_max_inside() -> None:
    values = Cosine(max_value=8.0, min_value=0.0, warmup=0.4, warmup_init=0.0).values(10)  # W = 4
    assert values[:4] == pytest.approx([0.0, 2.0, 4.0, 6.0])
    assert values[4] == pytest.approx(8.0)  # the cosine part starts at max


@pytest.mark.parametrize("num_steps", [1, 2, 3, 5, 7, 10, 20, 28, 50, 64, 100, 150])
def test_cosine_matches_cf_guidance_get_cos_sched(num_steps: int) -> None:
    cf_schedules = pytest.importorskip("cf_guidance.schedules", reason="cf-guidance (test-only reference)")
    warmups = [0.0, 0.05, 0.1, 0.25, 0.5, 0.99, 1.0]
    k_decays = [0.3, 0.5, 1.0, 2.0, 3.7]
    cycles = [0.0, 0.25, 0.5, 1.0, 1.5, 2.3]
    # (max, min, warmup_init); the last one is an increasing "cosine" (min above max)
    ranges = [(7.5, 0.15, 0.0), (12.0, 1.0, 3.0), (0.25, 0.05, 0.5), (2.0, 6.0, 1.0)]
    grid = itertools.product(warmups, k_decays, cycles, ranges)
    for warmup, k_decay, num_cycles, (high, low, warmup_init) in grid:
        schedule = Cosine(high, low, num_cycles, warmup, warmup_init, k_decay)
        expected = cf_schedules.get_cos_sched(
            num_steps, high, low, num_cycles, int(warmup * num_steps), warmup_init, k_decay
        )
        # Same operations in the same order: equal to the last bit.
        assert schedule.values(num_steps) == expected, (
            f"N={num_steps} warmup={warmup} k_decay={k_decay} num_cycles={num_cycles} max/min={high}/{low}"
        )


def test_cosine_defaults_equal_cf_guidance_defaults() -> None:
    cf_schedules = pytest.importorskip("cf_guidance.schedules", reason="cf-guidance (test-only reference)")
    assert Cosine().values(50) == cf_schedules.get_cos_sched()


# --- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda: Constant(math.nan), ["Constant.value", "finite"]),
        (lambda: Linear(1.0, math.inf), ["Linear.end_value", "finite"]),
        (lambda: Cosine(warmup=1.5), ["Cosine.warmup", "[0, 1]"]),
        (lambda: Cosine(warmup=-0.1), ["Cosine.warmup", "[0, 1]"]),
        (lambda: Cosine(k_decay=0.0), ["Cosine.k_decay", "> 0"]),
        (lambda: Cosine(num_cycles=-1.0), ["Cosine.num_cycles", ">= 0"]),
        (lambda: Cosine(max_value=math.nan), ["Cosine.max_value", "finite"]),
        (lambda: Custom([]), ["Custom.values", "at least one"]),
        (lambda: Custom([1.0, math.nan]), ["Custom.values[1]", "finite"]),
        (lambda: Constant("7"), ["Constant.value", "finite number"]),
    ],
)
def test_invalid_parameters_raise_naming_the_parameter(build, words) -> None:
    with pytest.raises(ValueError) as error:
        build()
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize(("step", "num_steps"), [(-1, 10), (10, 10), (0, 0), (2.0, 10)])
def test_calling_outside_the_run_raises(step, num_steps) -> None:
    with pytest.raises(ValueError, match=r"step|num_steps"):
        Linear(1.0, 2.0)(step, num_steps)


def test_schedules_are_frozen() -> None:
    schedule = Cosine()
    with pytest.raises(AttributeError):
        schedule.max_value = 3.0  # type: ignore[misc]


# --- parse_values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7.5, 6, 4, 3", (7.5, 6.0, 4.0, 3.0)),
        ("7.5 6\n4,3", (7.5, 6.0, 4.0, 3.0)),
        ("  1,2 ,3 ,", (1.0, 2.0, 3.0)),
        ("1e-1,\t-2, +0.5", (0.1, -2.0, 0.5)),
        ("5", (5.0,)),
    ],
)
def test_parse_values_reads_commas_and_whitespace(text, expected) -> None:
    assert parse_values(text) == expected


@pytest.mark.parametrize("text", ["", "   ", " , ,\n"])
def test_parse_values_rejects_empty_text(text) -> None:
    with pytest.raises(ValueError, match="empty") as error:
        parse_values(text)
    assert "7.5, 6, 4, 3" in str(error.value)  # says what a valid text looks like


@pytest.mark.parametrize(
    ("text", "bad_token", "number"),
    [
        ("7.5, x, 3", "x", "#2"),
        ("1 2 3 4abc", "4abc", "#4"),
        ("nan, 1", "nan", "#1"),
        ("1, inf", "inf", "#2"),
    ],
)
def test_parse_values_names_the_bad_token_and_its_position(text, bad_token, number) -> None:
    with pytest.raises(ValueError) as error:
        parse_values(text)
    message = str(error.value)
    assert repr(bad_token) in message
    assert number in message
    assert f"character {text.index(bad_token)}" in message
    assert "7.5, 6, 4, 3" in message


# --- dict round trip ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule",
    [Constant(3.0), Linear(7.0, 2.0), Cosine(9.0, 1.0, 1.5, 0.2, 0.5, 2.0), Custom([7.5, 6.0, 4.0])],
)
def test_schedule_dict_round_trip(schedule) -> None:
    data = schedule_to_dict(schedule)
    assert data["kind"] == type(schedule).__name__.lower()
    assert schedule_from_dict(data) == schedule
    assert schedule_from_dict(data).values(13) == schedule.values(13)


def test_schedule_to_dict_fields() -> None:
    assert schedule_to_dict(Linear(7.0, 2.0)) == {"kind": "linear", "start_value": 7.0, "end_value": 2.0}
    assert schedule_to_dict(Custom([1.0, 2.0])) == {"kind": "custom", "values": [1.0, 2.0]}
    assert schedule_to_dict(Cosine()) == {
        "kind": "cosine", "max_value": 7.5, "min_value": 0.15, "num_cycles": 0.5,
        "warmup": 0.0, "warmup_init": 0.0, "k_decay": 1.0,
    }


def test_schedule_from_dict_fills_cosine_defaults_and_parses_custom_text() -> None:
    assert schedule_from_dict({"kind": "cosine", "max_value": 5.0}) == Cosine(max_value=5.0)
    assert schedule_from_dict({"kind": "custom", "values": "3, 2 1"}) == Custom([3.0, 2.0, 1.0])


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"kind": "step"}, ["'constant'", "'linear'", "'cosine'", "'custom'", "'step'"]),
        ({}, ["kind", "'cosine'"]),
        ({"kind": "linear", "start_value": 1.0}, ["linear", "end_value"]),
        ({"kind": "constant", "value": 1.0, "scale": 2.0}, ["scale", "valid fields"]),
        ({"kind": "custom"}, ["values"]),
        ({"kind": "cosine", "warmup": 2.0}, ["Cosine.warmup"]),
    ],
)
def test_schedule_from_dict_errors(data, words) -> None:
    with pytest.raises(ValueError) as error:
        schedule_from_dict(data)
    for word in words:
        assert word in str(error.value)


def test_schedule_to_dict_rejects_non_schedules() -> None:
    with pytest.raises(ValueError, match="not a schedule"):
        schedule_to_dict(object())


# --- windows -----------------------------------------------------------------------------------------


def test_sigma_window_includes_both_ends_like_comfyui() -> None:
    # ComfyUI 0.8.0 SkipLayerGuidanceDiT: `sigma_ >= sigma_end and sigma_ <= sigma_start`.
    window = SigmaWindow(sigma_start=10.0, sigma_end=2.0)
    assert window.contains(10.0)
    assert window.contains(5.0)
    assert window.contains(2.0)
    assert not window.contains(10.0001)
    assert not window.contains(1.9999)
    assert not window.contains(0.0)


def test_always_contains_every_sigma() -> None:
    for sigma in [0.0, 1e-6, 1.0, 14.6, 1e9, math.inf]:
        assert ALWAYS.contains(sigma)


def test_sigma_window_with_start_below_end_raises() -> None:
    with pytest.raises(ValueError, match="sigma_start"):
        SigmaWindow(sigma_start=1.0, sigma_end=2.0)
    with pytest.raises(ValueError, match="nan"):
        SigmaWindow(sigma_start=math.nan, sigma_end=0.0)


# --- step_of_sigma -----------------------------------------------------------------------------------

RUN_SIGMAS = [14.6146, 7.0, 3.1, 1.0, 0.3, 0.0292, 0.0]  # 6 steps; the last entry is the end


def test_step_of_sigma_exact_entries_are_their_own_step() -> None:
    for index, sigma in enumerate(RUN_SIGMAS[:-1]):
        assert step_of_sigma(sigma, RUN_SIGMAS) == index


def test_step_of_sigma_between_entries_belongs_to_the_step_that_began_above() -> None:
    # Heun/dpm_2 evaluate between entries: that call belongs to the step from the larger entry.
    assert step_of_sigma(10.0, RUN_SIGMAS) == 0
    assert step_of_sigma(5.0, RUN_SIGMAS) == 1
    assert step_of_sigma(math.sqrt(3.1 * 1.0), RUN_SIGMAS) == 2
    assert step_of_sigma(0.1, RUN_SIGMAS) == 4
    assert step_of_sigma(0.01, RUN_SIGMAS) == 5


def test_step_of_sigma_clamps_outside_the_run() -> None:
    assert step_of_sigma(20.0, RUN_SIGMAS) == 0  # above the first entry
    assert step_of_sigma(0.0, RUN_SIGMAS) == len(RUN_SIGMAS) - 2  # the end entry is not a step
    assert step_of_sigma(-1.0, RUN_SIGMAS) == len(RUN_SIGMAS) - 2


def test_step_of_sigma_is_robust_to_float_noise() -> None:
    # Just above an entry would be "between entries, previous step" if matched exactly.
    assert step_of_sigma(3.1 * (1 + 3e-6), RUN_SIGMAS) == 2
    assert step_of_sigma(3.1 * (1 - 3e-6), RUN_SIGMAS) == 2
    # Far enough from the entry, it is a between-entries sigma again.
    assert step_of_sigma(3.1 * (1 + 1e-3), RUN_SIGMAS) == 1


def test_step_of_sigma_with_float32_tensor_sigmas() -> None:
    # ComfyUI hands the hook a float32 sigma and the run's sigmas as a tensor.
    karras = [
        (14.6146 ** (1 / 7) + i / 9 * (0.0292 ** (1 / 7) - 14.6146 ** (1 / 7))) ** 7 for i in range(10)
    ] + [0.0]
    as_tensor = torch.tensor(karras, dtype=torch.float32)
    for index in range(len(karras) - 1):
        assert step_of_sigma(as_tensor[index], karras) == index
        assert step_of_sigma(float(karras[index]), as_tensor) == index
    for index in range(len(karras) - 2):
        midpoint = (karras[index] * karras[index + 1]) ** 0.5
        assert step_of_sigma(midpoint, as_tensor) == index


def test_step_of_sigma_needs_a_run() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        step_of_sigma(1.0, [1.0])


def test_a_value_that_overflows_is_refused_naming_the_step() -> None:
    # Finite parameters, infinite value: (max - min) overflows. Catches the finite check dropped from
    # _ScheduleBase.__call__ (the schedule then handed inf to the sampler as a scale).
    with pytest.raises(ValueError, match=r"Cosine: the value at step 0 of 3 overflows to inf"):
        Cosine(max_value=1e308, min_value=-1e308).values(3)


@pytest.mark.parametrize("values", [5, None, {"a": 1}])
def test_schedule_from_dict_refuses_custom_values_of_the_wrong_type(values) -> None:
    # Catches the type check removed: tuple(5) said only "'int' object is not iterable".
    with pytest.raises(ValueError, match=r"Custom\.values must be a list of numbers or numbers separated"):
        schedule_from_dict({"kind": "custom", "values": values})
