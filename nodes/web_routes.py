"""The web route behind the curve drawn in every ``GuidersSchedule*`` node (``js/schedule_preview.js``).

``POST /guiders/schedule`` with ``{"kind": "cosine", "max_value": 7.5, ..., "steps": 20}`` (the node's widget
values, named as its inputs) answers ``{"values": [...]}``, the schedule's value at each step of a run of
``steps`` steps, or ``{"error": "..."}`` with status 400 when the widgets do not make a schedule. The values
come from guidance_core, the code that scales the guidance at sampling time, so the node never shows a
curve the sampler would not follow. ComfyUI serves the route under ``/api`` too, where ``api.fetchApi``
sends it.

A node whose ``schedule`` input is connected (a term or CFG node) sends its ``start_percent`` and
``end_percent`` with its schedule's fields; the answer then also holds ``"active"``, one flag per step saying
whether the node's window lets its term act at that step. The flags come from the code a run uses: the
node's window (``host.percent_window``) resolved to a σ window with a model sampling
(``PercentWindow.sigma_window``) and tested at each step's σ (``SigmaWindow.contains``, as
``Term.is_active`` does). The model sampling is a flow one with shift 1 and the σ are those of ComfyUI's
"simple" scheduler (``comfy.samplers.simple_scheduler``). With the simple scheduler the cut falls on the
same steps for every model (tests/host/test_schedule_route.py runs an EPS and a shifted flow model), because
ComfyUI's percent (``percent_to_sigma``) and that scheduler's σ are both spaced evenly in the model's
timesteps, step i at progress i / steps (a shift moves both alike); only a bound that falls exactly on a
step can round either way. Other schedulers space the σ differently (normal: i / (steps - 1); karras,
exponential: by σ), so there the cut can move by a step or more.

Any body is answered, never with a 500: each field's type and range is checked against the schedule node's
own widget (the node refuses at run time what the preview refuses here), and a message names the field and
what it should be.
"""

from __future__ import annotations

import sys
from typing import Any

from comfy_api.latest import io

from ..guidance_core import schedules
from .host.windows import percent_window
from .inputs import declared_inputs, describe, finite_in_range, public_id
from .schedule_nodes import NODE_OF_KIND, VALUE_MAX, VALUE_MIN

ROUTE = "/guiders/schedule"
MAX_PREVIEW_STEPS = 1000  # a preview, not a run: bounds the work one request can ask for


def evaluate_schedule_request(payload: Any) -> tuple[int, dict[str, Any]]:
    """``(http_status, json_body)`` for one request body; pure, so tests need no server."""
    if not isinstance(payload, dict):
        return 400, {"error": f"expected a JSON object with 'kind' and 'steps', got {type(payload).__name__}"}
    fields = dict(payload)
    steps = fields.pop("steps", None)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_PREVIEW_STEPS:
        return 400, {"error": f"steps must be an integer from 1 to {MAX_PREVIEW_STEPS}, got {describe(steps)}"}
    window_fields = {name: fields.pop(name) for name in WINDOW_FIELDS if name in fields}
    try:
        active = window_active_steps(window_fields, steps) if window_fields else None
        check_widget_fields(fields)
        schedule = schedules.schedule_from_dict(fields)
        if isinstance(schedule, schedules.Custom):  # a text of numbers is only read by schedule_from_dict
            for index, number in enumerate(schedule.points, start=1):
                finite_in_range("GuidersScheduleCustom", f"values: value #{index}", number, VALUE_MIN, VALUE_MAX)
        values = schedule.values(steps)  # raises ValueError on a value that overflows
    except ValueError as error:
        return 400, {"error": str(error)}
    return 200, {"values": values} if active is None else {"values": values, "active": active}


WINDOW_FIELDS = ("start_percent", "end_percent")


def window_active_steps(window_fields: dict[str, Any], steps: int) -> list[bool]:
    """Whether a node's start/end percent window lets its term act at each step of a run of ``steps`` steps,
    decided as a run decides it (see the module docstring for the model sampling and σ used)."""
    import comfy.model_sampling
    import comfy.samplers

    if set(window_fields) != set(WINDOW_FIELDS):
        raise ValueError(f"give both start_percent and end_percent for the window, got only {sorted(window_fields)}")
    for name in WINDOW_FIELDS:
        finite_in_range("window", name, window_fields[name], 0.0, 1.0)
    window = percent_window(window_fields["start_percent"], window_fields["end_percent"])
    if window is None:  # the whole run
        return [True] * steps
    model_sampling = comfy.model_sampling.ModelSamplingDiscreteFlow()  # no model config: shift 1
    sigma_window = window.sigma_window(model_sampling)
    step_sigmas = comfy.samplers.simple_scheduler(model_sampling, steps).tolist()[:-1]  # the last is the end
    return [sigma_window.contains(sigma) for sigma in step_sigmas]


def check_widget_fields(fields: dict[str, Any]) -> None:
    """Each field's type and range, as the schedule node's widget of that name declares it; a ValueError
    names the field and what it should be. The kind and unknown fields are left to schedule_from_dict,
    whose message lists the valid ones."""
    node_cls = NODE_OF_KIND.get(fields.get("kind")) if isinstance(fields.get("kind"), str) else None
    if node_cls is None:
        return
    node, declared = public_id(node_cls), declared_inputs(node_cls)
    for name, value in fields.items():
        widget = declared.get(name)
        if isinstance(widget, io.Float.Input):
            finite_in_range(node, name, value, widget.min, widget.max)
        elif isinstance(widget, io.String.Input) and not isinstance(value, str):
            if not isinstance(value, list):
                raise ValueError(f"{node}: {name} must be a text of numbers or a list of numbers, "
                                 f"got {describe(value)}")
            for index, number in enumerate(value):
                finite_in_range(node, f"{name}[{index}]", number, VALUE_MIN, VALUE_MAX)


async def _handle_schedule(request):
    from aiohttp import web

    try:
        payload = await request.json()
    except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return web.json_response({"error": f"the request body is not JSON: {error}"}, status=400)
    except RecursionError:  # json.loads recurses once per nesting level: a body nested ~1000 deep
        return web.json_response({"error": "the request body is nested too deeply; expected a JSON object "
                                           "with 'kind', 'steps' and the schedule's fields"}, status=400)
    status, body = evaluate_schedule_request(payload)
    return web.json_response(body, status=status)


def register() -> bool:
    """Add the route to the running ComfyUI server; return whether a server was there.

    main.py imports ``server`` and creates ``PromptServer.instance`` before it loads custom nodes, and adds
    ``PromptServer.instance.routes`` to the web app after. Without a server (tests, scripts) nothing happens.
    ``server`` is looked up, not imported: importing it here would only cost seconds and build no server.
    Calling this twice adds the route once.
    """
    prompt_server_class = getattr(sys.modules.get("server"), "PromptServer", None)
    prompt_server = getattr(prompt_server_class, "instance", None)
    if prompt_server is None:
        return False
    routes = prompt_server.routes
    if not any(getattr(route, "path", None) == ROUTE for route in routes):
        routes.post(ROUTE)(_handle_schedule)
    return True
