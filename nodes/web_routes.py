"""The web route behind the curve drawn in every ``GuidersSchedule*`` node (``js/schedule_preview.js``).

``POST /guiders/schedule`` with ``{"kind": "cosine", "max_value": 7.5, ..., "steps": 20}`` (the node's widget
values, named as its inputs) answers ``{"values": [...]}``, the schedule's value at each step of a run of
``steps`` steps, or ``{"error": "..."}`` with status 400 when the widgets do not make a schedule. The values
come from guidance_core, the code that scales the guidance at sampling time, so the node never shows a
curve the sampler would not follow. ComfyUI serves the route under ``/api`` too, where ``api.fetchApi``
sends it.

Any body is answered, never with a 500: each field's type and range is checked against the schedule node's
own widget (the node refuses at run time what the preview refuses here), and a message names the field and
what it should be.
"""

from __future__ import annotations

import sys
from typing import Any

from comfy_api.latest import io

from ..guidance_core import schedules
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
    try:
        check_widget_fields(fields)
        schedule = schedules.schedule_from_dict(fields)
        if isinstance(schedule, schedules.Custom):  # a text of numbers is only read by schedule_from_dict
            for index, number in enumerate(schedule.points, start=1):
                finite_in_range("GuidersScheduleCustom", f"values: value #{index}", number, VALUE_MIN, VALUE_MAX)
        values = schedule.values(steps)  # raises ValueError on a value that overflows
    except ValueError as error:
        return 400, {"error": str(error)}
    return 200, {"values": values}


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
