"""Every value a node is given, checked where the node runs, against what its own widget declares.

ComfyUI's prompt validation compares a widget value with its min and max, but ``NaN < min`` and
``NaN > max`` are both false, so a JSON ``NaN`` sent to ``/prompt`` passes; and a value that arrives through
a link (a primitive or math node wired into the widget) is not range-checked at all. Either way the value
would reach the math as NaN latents, or as a term silently switched off (``NaN > 0`` is false). So each
node's ``execute`` hands its widget values to ``check_inputs``, which reads the ranges from the node's own
schema: the widget and the check cannot disagree.
"""

from __future__ import annotations

import math
from typing import Any

from comfy_api.latest import io

from .host.marks import GuidanceError


def public_id(cls) -> str:
    """The node's public id, for messages (the V3 executor runs a clone of the class named ``<id>Clone``)."""
    return cls.__name__.removesuffix("Clone")


def describe(value: Any) -> str:
    """A short, always printable picture of a value for a message: a repr of a nested list 10000 deep
    would itself raise RecursionError, and a huge text would flood the message."""
    if value is None:
        return "None"
    if isinstance(value, (bool, int, float)):
        return f"{value!r} ({type(value).__name__})"
    if isinstance(value, str):
        return f"{value!r} (str)" if len(value) <= 60 else f"{value[:57] + '...'!r} (str)"
    return f"a {type(value).__name__}"


def _number(bound: float) -> str:
    """A widget bound as the user reads it on the widget: 100, not 100.0."""
    return str(int(bound)) if isinstance(bound, float) and bound.is_integer() and abs(bound) < 1e15 else str(bound)


def finite_in_range(node: str, name: str, value: Any, lo: float | None, hi: float | None,
                    integer: bool = False) -> float | int:
    """``value`` if it is a finite number (an integer if ``integer``) within ``lo`` .. ``hi``, else a
    GuidanceError naming the node, the input, what was wrong and the valid range."""
    kind = "an integer" if integer else "a finite number"
    valid = f"{kind} from {_number(lo)} to {_number(hi)}" if lo is not None and hi is not None else kind
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise GuidanceError(f"{node}: {name} must be {valid}, got {describe(value)}.")
    if not math.isfinite(value):
        raise GuidanceError(f"{node}: {name} must be {valid}, got {value}.")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise GuidanceError(f"{node}: {name} = {value} is out of range; it must be {valid}.")
    return value


def declared_inputs(cls) -> dict[str, io.Input]:
    """The node's inputs by name, from its schema (the same objects ComfyUI builds its widgets from)."""
    return {declared.id: declared for declared in cls.define_schema().inputs}


def check_inputs(cls, **values: Any) -> None:
    """Check each named widget value against the node's declaration of it: numbers finite and within the
    widget's min..max, texts texts, combo values among the options. Raises GuidanceError naming the input."""
    node, declared = public_id(cls), declared_inputs(cls)
    for name, value in values.items():
        widget = declared[name]  # a KeyError here is a typo in the node, not a user's mistake
        if isinstance(widget, io.Float.Input):
            finite_in_range(node, name, value, widget.min, widget.max)
        elif isinstance(widget, io.Int.Input):
            finite_in_range(node, name, value, widget.min, widget.max, integer=True)
        elif isinstance(widget, io.String.Input):
            if not isinstance(value, str):
                raise GuidanceError(f"{node}: {name} must be a text, got {describe(value)}.")
        elif isinstance(widget, io.Combo.Input):
            if value not in widget.options:
                raise GuidanceError(f"{node}: {name} {describe(value)} is not one of "
                                    f"{', '.join(map(repr, widget.options))}.")
        elif isinstance(widget, io.Boolean.Input):
            if not isinstance(value, bool):
                raise GuidanceError(f"{node}: {name} must be true or false, got {describe(value)}.")
