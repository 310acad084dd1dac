"""Scales that vary over the steps of a run, and the windows outside which a guidance term is off.

A schedule is a small frozen dataclass called as ``schedule(step, num_steps) -> float`` with
``step`` in ``0 .. num_steps - 1``; ``schedule.values(num_steps)`` lists the whole curve. Schedules
are plain numbers in and out (no tensors), so the same object draws the curve in the node and
scales the term at sampling time.

Windows say *when* a term is on. ``SigmaWindow`` follows ComfyUI's ``SkipLayerGuidanceDiT``
(active for ``sigma_end <= sigma <= sigma_start``); ``step_of_sigma`` finds the step a sigma belongs to.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ALWAYS",
    "Constant",
    "Cosine",
    "Custom",
    "Linear",
    "Schedule",
    "SigmaWindow",
    "parse_values",
    "schedule_from_dict",
    "schedule_to_dict",
    "step_of_sigma",
]


def _shown(value: Any) -> str:
    """A value as a message shows it: numbers and short texts as typed, anything else by its type (the repr of
    a JSON list nested 10000 deep would itself raise RecursionError)."""
    if value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 60):
        return repr(value)
    return f"a {type(value).__name__}"


def _require_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {_shown(value)}")


def _check_step(step: int, num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < num_steps:
        raise ValueError(
            f"step must be an integer in [0, {num_steps - 1}] for num_steps={num_steps}, got {step!r}"
        )


class _ScheduleBase:
    """Shared calling convention: validate (step, num_steps), then evaluate ``_at``."""

    def _at(self, step: int, num_steps: int) -> float:
        raise NotImplementedError

    def __call__(self, step: int, num_steps: int) -> float:
        _check_step(step, num_steps)
        value = float(self._at(step, num_steps))
        if not math.isfinite(value):  # finite parameters can still overflow, e.g. max_value - min_value > 1e308
            raise ValueError(f"{type(self).__name__}: the value at step {step} of {num_steps} overflows to {value}; "
                             "use smaller numbers")
        return value

    def values(self, num_steps: int) -> list[float]:
        """The schedule's value at every step of a run of ``num_steps`` steps."""
        return [self(step, num_steps) for step in range(num_steps)]


@dataclass(frozen=True)
class Constant(_ScheduleBase):
    """The same value at every step."""

    value: float

    def __post_init__(self) -> None:
        _require_finite("Constant.value", self.value)

    def _at(self, step: int, num_steps: int) -> float:
        return self.value


@dataclass(frozen=True)
class Linear(_ScheduleBase):
    """A straight line from ``start_value`` at step 0 to ``end_value`` at the last step."""

    start_value: float
    end_value: float

    def __post_init__(self) -> None:
        _require_finite("Linear.start_value", self.start_value)
        _require_finite("Linear.end_value", self.end_value)

    def _at(self, step: int, num_steps: int) -> float:
        if num_steps == 1:
            return self.start_value
        progress = step / (num_steps - 1)
        # this form returns both endpoints exactly
        return self.start_value * (1 - progress) + self.end_value * progress


@dataclass(frozen=True)
class Cosine(_ScheduleBase):
    """cf_guidance's cosine schedule (``get_cos_sched``, enzokro/cf_guidance 0.0.3), with warmup and k-decay.

    ``warmup`` is a fraction of the run: the first ``W = int(warmup * num_steps)`` steps ramp linearly
    from ``warmup_init`` towards ``max_value`` (never reaching it inside the warmup, as in the
    reference). After that, with ``progress = (step - W)^k / max(1, N - W)^k``,

        value = min + (max - min) * (1 + cos(2 pi * num_cycles * progress)) / 2

    so ``num_cycles = 0.5`` is a half cosine from max down towards min; it never quite reaches min,
    because progress stops at ``(N - 1 - W) / (N - W)``.
    """

    max_value: float = 7.5
    min_value: float = 0.15
    num_cycles: float = 0.5
    warmup: float = 0.0
    warmup_init: float = 0.0
    k_decay: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_value", "min_value", "num_cycles", "warmup", "warmup_init", "k_decay"):
            _require_finite(f"Cosine.{name}", getattr(self, name))
        if self.num_cycles < 0:
            raise ValueError(f"Cosine.num_cycles must be >= 0, got {self.num_cycles!r}")
        if not 0.0 <= self.warmup <= 1.0:
            raise ValueError(
                f"Cosine.warmup is a fraction of the steps and must be in [0, 1], got {self.warmup!r}"
            )
        if self.k_decay <= 0:
            raise ValueError(f"Cosine.k_decay must be > 0, got {self.k_decay!r}")

    def warmup_steps(self, num_steps: int) -> int:
        """W, the number of warmup steps in a run of ``num_steps`` steps."""
        return int(self.warmup * num_steps)

    def _at(self, step: int, num_steps: int) -> float:
        warmup_steps = self.warmup_steps(num_steps)
        if step < warmup_steps:
            return self.warmup_init + step * (self.max_value - self.warmup_init) / max(1, warmup_steps)
        steps_since_warmup = step - warmup_steps
        decay_steps = max(1, num_steps - warmup_steps)
        progress = steps_since_warmup**self.k_decay / decay_steps**self.k_decay
        cosine = 1 + math.cos(math.pi * 2 * self.num_cycles * progress)
        return self.min_value + 0.5 * (self.max_value - self.min_value) * cosine


@dataclass(frozen=True)
class Custom(_ScheduleBase):
    """A user's list of values, stretched or squeezed to the run's length by linear interpolation.

    Step ``i`` of ``N`` reads the list at position ``i * (len - 1) / (N - 1)``; a list exactly ``N``
    long is used as is and a single value is a constant.
    """

    points: tuple[float, ...]

    def __init__(self, values: Sequence[float]) -> None:
        # The field is named ``points`` because ``values`` is the method every schedule has;
        # the constructor still takes ``values=``.
        object.__setattr__(self, "points", tuple(values))
        self.__post_init__()
        object.__setattr__(self, "points", tuple(float(value) for value in self.points))

    def __post_init__(self) -> None:
        if len(self.points) == 0:
            raise ValueError("Custom.values must hold at least one number, got an empty list")
        for index, value in enumerate(self.points):
            _require_finite(f"Custom.values[{index}]", value)

    def _at(self, step: int, num_steps: int) -> float:
        points = self.points
        if len(points) == 1 or num_steps == 1:
            return points[0]
        if len(points) == num_steps:
            return points[step]
        position = step * (len(points) - 1) / (num_steps - 1)
        left = min(int(math.floor(position)), len(points) - 2)
        fraction = position - left
        return points[left] * (1 - fraction) + points[left + 1] * fraction


Schedule = Constant | Linear | Cosine | Custom

_VALUES_EXAMPLE = "numbers separated by commas, spaces or new lines, e.g. '7.5, 6, 4, 3'"


def parse_values(text: str) -> tuple[float, ...]:
    """Read a custom schedule typed by a user: ``"7.5, 6, 4, 3"`` (commas and/or whitespace)."""
    tokens = list(re.finditer(r"[^,\s]+", text))
    if not tokens:
        raise ValueError(f"the schedule text is empty; expected {_VALUES_EXAMPLE}")
    numbers = []
    for number_index, token in enumerate(tokens, start=1):
        try:
            number = float(token.group())
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(
                f"value #{number_index} {token.group()!r} (at character {token.start()}) "
                f"is not a finite number; expected {_VALUES_EXAMPLE}"
            )
        numbers.append(number)
    return tuple(numbers)


_KINDS: dict[str, type] = {"constant": Constant, "linear": Linear, "cosine": Cosine, "custom": Custom}


def schedule_to_dict(schedule: Schedule) -> dict[str, Any]:
    """``{"kind": "cosine", "max_value": 7.5, ...}``: plain JSON-ready data for the web route."""
    kind = next((kind for kind, cls in _KINDS.items() if type(schedule) is cls), None)
    if kind is None:
        names = ", ".join(cls.__name__ for cls in _KINDS.values())
        raise ValueError(f"not a schedule: {schedule!r}; expected one of {names}")
    if isinstance(schedule, Custom):
        return {"kind": kind, "values": list(schedule.points)}
    return {"kind": kind, **dataclasses.asdict(schedule)}


def schedule_from_dict(data: dict[str, Any]) -> Schedule:
    """The inverse of ``schedule_to_dict``. A custom schedule's ``values`` may also be a text to parse."""
    if not isinstance(data, dict):
        raise ValueError(f"a schedule is an object with a 'kind' and its fields, got {_shown(data)}")
    fields = dict(data)
    kind = fields.pop("kind", None)
    if not isinstance(kind, str) or kind not in _KINDS:  # not a str: a list kind would fail as unhashable
        raise ValueError(f"schedule kind must be one of {', '.join(map(repr, _KINDS))} (a string), got {_shown(kind)}")
    if kind == "custom":
        allowed = {"values"}
    else:
        allowed = {field.name for field in dataclasses.fields(_KINDS[kind])}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(
            f"unknown field(s) {unknown} for a {kind!r} schedule; valid fields: {sorted(allowed)}"
        )
    if kind == "custom":
        if "values" not in fields:
            raise ValueError(f"a 'custom' schedule needs 'values': a list of numbers, or {_VALUES_EXAMPLE}")
        values = fields["values"]
        if isinstance(values, str):
            return Custom(parse_values(values))
        if not isinstance(values, (list, tuple)):  # tuple(5) would say only "'int' object is not iterable"
            raise ValueError(f"Custom.values must be a list of numbers or {_VALUES_EXAMPLE}, got {_shown(values)}")
        return Custom(values)
    try:
        return _KINDS[kind](**fields)
    except TypeError as error:  # a required field is missing
        raise ValueError(
            f"bad fields for a {kind!r} schedule: {error}; valid fields: {sorted(allowed)}"
        ) from None


@dataclass(frozen=True)
class SigmaWindow:
    """A term is on for ``sigma_end <= sigma <= sigma_start``, both ends included.

    That is what ComfyUI 0.8.0 does with its percent windows (``SkipLayerGuidanceDiT``,
    ``PatchModelAddDownscale`` and conditioning ``timestep_start``/``timestep_end``), with the bounds from
    ``model_sampling.percent_to_sigma``; matching it keeps our windows step-for-step equal to the
    built-in nodes'. Noise levels fall during a run, so ``sigma_start`` (where the term turns on) is
    the larger one.
    """

    sigma_start: float
    sigma_end: float

    def __post_init__(self) -> None:
        for name in ("sigma_start", "sigma_end"):
            if math.isnan(getattr(self, name)):
                raise ValueError(f"SigmaWindow.{name} must be a number, got nan")
        if self.sigma_start < self.sigma_end:
            raise ValueError(
                f"SigmaWindow.sigma_start ({self.sigma_start}) must be >= sigma_end ({self.sigma_end}): "
                "sigma decreases during sampling, so the window starts at the larger sigma"
            )

    def contains(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start


ALWAYS = SigmaWindow(math.inf, -math.inf)
"""The window that never closes."""


def step_of_sigma(sigma: float, sample_sigmas: Sequence[float]) -> int:
    """The step a model call at ``sigma`` belongs to, in a run whose sigmas decrease along ``sample_sigmas``.

    Step ``i`` runs from ``sample_sigmas[i]`` down to ``sample_sigmas[i + 1]``: an exact entry is its
    own step, and a sigma between two entries (multi-evaluation samplers such as heun or dpm_2 call
    the model there) belongs to the step that began at the larger one. The last entry is the end of
    the run (usually 0), so the result is clamped to ``[0, len(sample_sigmas) - 2]``.
    """
    sigmas = [float(s) for s in sample_sigmas]
    if len(sigmas) < 2:
        raise ValueError(
            "sample_sigmas must hold at least 2 entries (the first step's sigma and the end), "
            f"got {len(sigmas)}"
        )
    sigma = float(sigma)
    last_step = len(sigmas) - 2
    # Sigmas reach us after a round trip through tensors (often float16/32): match entries with a
    # relative tolerance so an "exact" entry is not mistaken for a point just below it.
    nearest = min(range(len(sigmas)), key=lambda i: abs(sigmas[i] - sigma))
    if math.isclose(sigma, sigmas[nearest], rel_tol=1e-5, abs_tol=1e-9):
        return min(nearest, last_step)
    steps_started_above = sum(1 for s in sigmas if s > sigma)
    return min(max(steps_started_above - 1, 0), last_step)
