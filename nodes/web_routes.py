"""The web route behind the curve drawn in every ``GuidersSchedule*`` node (``js/schedule_preview.js``).

``POST /guiders/schedule`` with ``{"kind": "cosine", "max_value": 7.5, ..., "steps": 20}`` (the node's widget
values, named as its inputs) answers ``{"values": [...]}``, the schedule's value at each step of a run of
``steps`` steps, or ``{"error": "..."}`` with status 400 when the widgets do not make a schedule. The values
come from guidance_core, the code that scales the guidance at sampling time, so the node never shows a
curve the sampler would not follow. ComfyUI serves the route under ``/api`` too, where ``api.fetchApi``
sends it.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from ..guidance_core import schedules

ROUTE = "/guiders/schedule"
MAX_PREVIEW_STEPS = 1000  # a preview, not a run: bounds the work one request can ask for


def evaluate_schedule_request(payload: Any) -> tuple[int, dict[str, Any]]:
    """``(http_status, json_body)`` for one request body; pure, so tests need no server."""
    if not isinstance(payload, dict):
        return 400, {"error": f"expected a JSON object with 'kind' and 'steps', got {type(payload).__name__}"}
    fields = dict(payload)
    steps = fields.pop("steps", None)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_PREVIEW_STEPS:
        return 400, {"error": f"steps must be an integer from 1 to {MAX_PREVIEW_STEPS}, got {steps!r}"}
    try:
        values = schedules.schedule_from_dict(fields).values(steps)
    except (ValueError, TypeError) as error:  # TypeError: JSON of the wrong shape, e.g. "values": 5
        return 400, {"error": str(error)}
    if not all(math.isfinite(value) for value in values):
        # Finite fields can still overflow (e.g. max_value - min_value beyond 1e308); JSON has no inf.
        return 400, {"error": "the schedule's values overflow to infinity; use smaller numbers"}
    return 200, {"values": values}


async def _handle_schedule(request):
    from aiohttp import web

    try:
        payload = await request.json()
    except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return web.json_response({"error": f"the request body is not JSON: {error}"}, status=400)
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
