"""The route behind the schedule curve (nodes/web_routes.py), without a browser.

- ``evaluate_schedule_request``: a node's widget values, sent as the frontend sends them (its input names
  plus ``kind`` and ``steps``), give the values of the very schedule the node hands the sampler; invalid
  values give 400 with guidance_core's message.
- ``register`` adds the route to a PromptServer's route table once, and does nothing without a server.
- the aiohttp handler answers over HTTP (an aiohttp test server; the real ComfyUI server: test_browser.py).

Host behaviour relied on: main.py creates ``server.PromptServer.instance`` before loading custom nodes and
adds ``PromptServer.instance.routes`` (an aiohttp RouteTableDef) to its app afterwards.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from types import ModuleType, SimpleNamespace

import pytest
from harness import run_node

SCHEDULE_NODES = [
    "GuidersScheduleConstant",
    "GuidersScheduleLinear",
    "GuidersScheduleCosine",
    "GuidersScheduleCustom",
]


@pytest.fixture(scope="module")
def web_routes(guiders_pack: dict[str, type]) -> ModuleType:
    # The pack is loaded as ComfyUI loads it (a package named after its folder), so reach its modules
    # through that package rather than importing the repository's ``nodes`` (ComfyUI's nodes.py wins there).
    package = guiders_pack["GuidersScheduleCosine"].__module__.rsplit(".nodes.", 1)[0]
    return importlib.import_module(f"{package}.nodes.web_routes")


def _widget_defaults(node_cls: type) -> dict:
    declared = node_cls.INPUT_TYPES()
    specs = {**declared.get("required", {}), **declared.get("optional", {})}
    return {name: spec[1]["default"] for name, spec in specs.items()}


def _kind(node_id: str) -> str:
    return node_id.removeprefix("GuidersSchedule").lower()  # what js/schedule_preview.js sends


@pytest.mark.parametrize("node_id", SCHEDULE_NODES)
@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_a_nodes_widget_values_give_the_curve_of_the_schedule_it_outputs(
    web_routes, guiders_pack, node_id: str, steps: int
) -> None:
    widgets = _widget_defaults(guiders_pack[node_id])
    status, body = web_routes.evaluate_schedule_request({"kind": _kind(node_id), **widgets, "steps": steps})
    assert status == 200, body
    (schedule,) = run_node(node_id, **widgets)
    assert body == {"values": [schedule(step, steps) for step in range(steps)]}
    assert len(body["values"]) == steps


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        # Hand-derived from each definition, independently of the code.
        ({"kind": "constant", "value": 4.5, "steps": 3}, [4.5, 4.5, 4.5]),
        ({"kind": "linear", "start_value": 7, "end_value": 1, "steps": 4}, [7.0, 5.0, 3.0, 1.0]),
        ({"kind": "custom", "values": "1, 3", "steps": 3}, [1.0, 2.0, 3.0]),
        ({"kind": "custom", "values": [2, 4, 6], "steps": 5}, [2.0, 3.0, 4.0, 5.0, 6.0]),
        # Half a cosine over 2 steps: step 1 sits at progress 1/2, where (1 + cos(pi/2))/2 = 1/2.
        (
            {"kind": "cosine", "max_value": 8, "min_value": 2, "num_cycles": 0.5, "warmup": 0,
             "warmup_init": 0, "k_decay": 1, "steps": 2},
            [8.0, 5.0],
        ),
    ],
)
def test_known_curves(web_routes, payload: dict, expected: list[float]) -> None:
    status, body = web_routes.evaluate_schedule_request(payload)
    assert status == 200, body
    assert body["values"] == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(
    ("payload", "message_part"),
    [
        ({"kind": "custom", "values": "7, abc", "steps": 4}, "'abc'"),
        ({"kind": "custom", "values": "  ", "steps": 4}, "empty"),
        ({"kind": "custom", "values": 5, "steps": 4}, "int"),
        ({"kind": "cosine", "max_value": 7.5, "min_value": 0.1, "num_cycles": 0.5, "warmup": 1.5,
          "warmup_init": 0, "k_decay": 1, "steps": 4}, "warmup"),
        ({"kind": "cosine", "k_decay": 0, "steps": 4}, "k_decay"),
        ({"kind": "linear", "start_value": None, "end_value": 1, "steps": 4}, "start_value"),
        ({"kind": "constant", "value": 1, "colour": "red", "steps": 4}, "colour"),
        ({"kind": "spline", "steps": 4}, "kind"),
        ({"value": 1, "steps": 4}, "kind"),
        ({"kind": "constant", "value": 1}, "steps"),
        ({"kind": "constant", "value": 1, "steps": 0}, "steps"),
        ({"kind": "constant", "value": 1, "steps": 2.5}, "steps"),
        ({"kind": "constant", "value": 1, "steps": True}, "steps"),
        ({"kind": "constant", "value": 1, "steps": 10**9}, "steps"),
        ({"kind": "cosine", "max_value": 1e308, "min_value": -1e308, "steps": 3}, "max_value"),
        ([1, 2, 3], "JSON object"),
    ],
)
def test_invalid_requests_answer_400_with_the_reason(web_routes, payload, message_part: str) -> None:
    status, body = web_routes.evaluate_schedule_request(payload)
    assert status == 400
    assert set(body) == {"error"}
    assert message_part in body["error"]


def test_the_error_is_guidance_cores_message(web_routes, guiders_pack) -> None:
    package = web_routes.__name__.rsplit(".nodes.", 1)[0]
    schedules = importlib.import_module(f"{package}.guidance_core.schedules")
    with pytest.raises(ValueError) as raised:
        schedules.parse_values("7.5, six")
    status, body = web_routes.evaluate_schedule_request({"kind": "custom", "values": "7.5, six", "steps": 3})
    assert (status, body) == (400, {"error": str(raised.value)})


def test_register_without_a_server_does_nothing(web_routes, monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert web_routes.register() is False
    # A server module whose PromptServer was never instantiated: still no server.
    monkeypatch.setitem(sys.modules, "server", SimpleNamespace(PromptServer=type("PromptServer", (), {})))
    assert web_routes.register() is False


def _fake_prompt_server(monkeypatch):
    from aiohttp import web

    prompt_server = SimpleNamespace(routes=web.RouteTableDef())
    server_module = SimpleNamespace(PromptServer=SimpleNamespace(instance=prompt_server))
    monkeypatch.setitem(sys.modules, "server", server_module)
    return prompt_server


def test_register_adds_one_post_route_once(web_routes, monkeypatch) -> None:
    prompt_server = _fake_prompt_server(monkeypatch)
    assert web_routes.register() is True
    assert web_routes.register() is True
    assert [(route.method, route.path) for route in prompt_server.routes] == [("POST", "/guiders/schedule")]


def test_the_handler_answers_over_http(web_routes, monkeypatch) -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    prompt_server = _fake_prompt_server(monkeypatch)
    web_routes.register()

    async def exchange() -> list[tuple[int, dict]]:
        app = web.Application()
        app.add_routes(prompt_server.routes)
        async with TestClient(TestServer(app)) as client:
            answers = []
            for body in (
                '{"kind": "linear", "start_value": 3, "end_value": 1, "steps": 3}',
                '{"kind": "custom", "values": "x", "steps": 3}',
                "not json",
                "",
            ):
                response = await client.post("/guiders/schedule", data=body)
                answers.append((response.status, await response.json()))
            return answers

    (ok_status, ok_body), (bad_status, bad_body), (not_json_status, not_json_body), (empty_status, _) = (
        asyncio.run(exchange())
    )
    assert (ok_status, ok_body) == (200, {"values": [3.0, 2.0, 1.0]})
    assert bad_status == 400 and "'x'" in bad_body["error"]
    assert not_json_status == 400 and "not JSON" in not_json_body["error"]
    assert empty_status == 400


# ---------------------------------------------------------------------------------------------------------
# Issue #10 item 7: every malformed body is a 400 naming the field and the type it should be, never a 500.

WRONG_TYPES = ["7", None, True, [], {}, [1.0]]  # a text, null, a boolean, a list, an object, a list of a number


def _fields_of(guiders_pack, node_id: str) -> dict:
    return _widget_defaults(guiders_pack[node_id])


@pytest.mark.parametrize("node_id", SCHEDULE_NODES[:3])
@pytest.mark.parametrize("wrong", WRONG_TYPES, ids=repr)
def test_a_number_field_of_the_wrong_type_is_a_400_naming_it(web_routes, guiders_pack, node_id, wrong) -> None:
    # Catches check_widget_fields skipped: guidance_core's own message then named the dataclass field
    # ("Linear.start_value must be a finite number, got '7'"), not the widget, and gave no range.
    for name in _fields_of(guiders_pack, node_id):
        status, body = web_routes.evaluate_schedule_request(
            {"kind": _kind(node_id), **_fields_of(guiders_pack, node_id), name: wrong, "steps": 4})
        assert status == 400, (name, wrong, body)
        assert f"{node_id}: {name} must be a finite number from" in body["error"], body


@pytest.mark.parametrize("wrong", [5, 2.5, True, None, {"a": 1}], ids=repr)
def test_custom_values_of_the_wrong_type_is_a_400_naming_the_expected_type(web_routes, wrong) -> None:
    # Catches the type check of 'values' removed: {"values": 5} answered "'int' object is not iterable".
    status, body = web_routes.evaluate_schedule_request({"kind": "custom", "values": wrong, "steps": 4})
    assert status == 400
    assert "values must be a text of numbers or a list of numbers" in body["error"], body


@pytest.mark.parametrize(("values", "name"), [([1, "x"], "values[1]"), ([[1]], "values[0]"), ([1, None], "values[1]"),
                                              ([7, 1e300], "values[1]"), ("7, 1e300", "value #2")])
def test_a_bad_number_in_custom_values_is_a_400_naming_its_place(web_routes, values, name: str) -> None:
    # Catches the range check of custom values dropped from the route (1e300 answered 200 with a curve the
    # node refuses to run) and a nested list reaching the schedule unchecked.
    status, body = web_routes.evaluate_schedule_request({"kind": "custom", "values": values, "steps": 4})
    assert status == 400
    assert name in body["error"], body


@pytest.mark.parametrize(("field", "value"), [("value", 1000.0), ("value", -100.5), ("warmup", 2.0),
                                              ("num_cycles", 21.0)])
def test_a_field_beyond_its_widget_range_is_a_400_giving_the_range(web_routes, field: str, value: float) -> None:
    # The same range the node's widget declares (and the node checks when it runs), read from its schema.
    kind = "constant" if field == "value" else "cosine"
    status, body = web_routes.evaluate_schedule_request({"kind": kind, field: value, "steps": 4})
    assert status == 400
    assert field in body["error"] and "from" in body["error"], body


@pytest.mark.parametrize("kind", [["custom"], {"a": 1}, 3, None])
def test_a_kind_that_is_not_a_string_is_a_400_naming_kind(web_routes, kind) -> None:
    # Catches the isinstance check removed from schedule_from_dict: a list kind raised "unhashable type: 'list'".
    status, body = web_routes.evaluate_schedule_request({"kind": kind, "steps": 4})
    assert status == 400
    assert "kind must be one of" in body["error"] and "(a string)" in body["error"], body


def _nested(depth: int, inner) -> list:
    for _ in range(depth):  # built in a loop: a recursive builder would itself overflow the stack
        inner = [inner]
    return inner


@pytest.mark.parametrize("field", ["steps", "kind", "values", "value"])
def test_a_deeply_nested_field_is_a_400_not_a_recursion_error(web_routes, field: str) -> None:
    # Catches a message that prints the value with repr(): repr of a list 10000 deep raises RecursionError.
    payload = {"kind": "constant", "value": 1.0, "steps": 4} if field == "value" else \
        {"kind": "custom", "values": [1, 2], "steps": 4}
    payload[field] = _nested(10000, 1)
    status, body = web_routes.evaluate_schedule_request(payload)
    assert status == 400
    assert field in body["error"] and "a list" in body["error"], body


def test_deeply_nested_json_over_http_is_a_400(web_routes, monkeypatch) -> None:
    # Catches the RecursionError branch removed from the handler: json.loads raised it and aiohttp answered 500.
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    prompt_server = _fake_prompt_server(monkeypatch)
    web_routes.register()
    deep_list = "[" * 10000 + "]" * 10000
    deep_field = '{"kind": "custom", "steps": 3, "values": ' + "[" * 10000 + "1" + "]" * 10000 + "}"
    deep_object = '{"a": ' * 10000 + "1" + "}" * 10000

    async def exchange() -> list[tuple[int, dict]]:
        app = web.Application()
        app.add_routes(prompt_server.routes)
        async with TestClient(TestServer(app)) as client:
            answers = []
            for body in (deep_list, deep_field, deep_object, '{"kind": "custom", "values": 5, "steps": 3}'):
                response = await client.post("/guiders/schedule", data=body)
                answers.append((response.status, await response.json()))
            return answers

    answers = asyncio.run(exchange())
    for status, body in answers[:3]:
        assert status == 400 and "nested too deeply" in body["error"], body
    status, body = answers[3]
    assert status == 400 and "values must be a text of numbers or a list of numbers, got 5 (int)" in body["error"]


# ---------------------------------------------------------------------------------------------------------
# The window's cut: the steps the route marks active are the steps a run evaluates the term at

WINDOW_STEPS = 10


def _pag_steps_of_a_run(model, family: str, start: float, end: float, scheduler: str) -> list[bool]:
    """Which steps of a real KSampler run evaluate GuidersPAG's branch (a forward of 3 chunks, not 2)."""
    from harness import ForwardCounter, sample
    from tiny_models import make_conditioning, make_latent

    (schedule,) = run_node("GuidersScheduleLinear", start_value=3.0, end_value=1.0)
    (guided,) = run_node("GuidersPAG", model=model, scale=3.0, schedule=schedule, start_percent=start,
                         end_percent=end)
    positive, negative = make_conditioning(family, seed=1)
    with ForwardCounter(model) as counter:
        sample(guided, positive, negative, make_latent(family, seed=2), cfg=4.0, steps=WINDOW_STEPS,
               scheduler=scheduler)
    assert len(counter.calls) == WINDOW_STEPS, counter.batch_sizes
    return [len(set(call.cond_or_uncond)) == 3 for call in counter.calls]


# The route's σ are the simple scheduler's (step i at progress i / N). The normal scheduler spaces the timesteps
# by i / (N - 1), so there a bound can fall one step later: the curve's caption names the scheduler.
@pytest.mark.parametrize("scheduler", ["simple"])
@pytest.mark.parametrize("family", ["sd15", "sd3"])  # an EPS model, and a flow model with shift 3
# Bounds between two steps' progress (step / 10): at a bound that falls exactly on a step, the models'
# samplings round differently (an EPS model's percent maps to timestep (1 - p)·999, a flow model's to σ = 1 - p
# against float32 σ), so such a step may be in for one family and out for another; the curve marks it as the
# route's flow model does.
@pytest.mark.parametrize(("start", "end"), [(0.0, 1.0), (0.25, 0.65), (0.35, 1.0), (0.0, 0.33), (0.12, 0.48)])
def test_the_window_cuts_the_curve_where_a_run_turns_the_term_off(
    web_routes, guiders_pack, tiny_model, family: str, scheduler: str, start: float, end: float
) -> None:
    """The route's ``active`` flags equal the steps at which a run of GuidersPAG with that window evaluates
    its branch, on models of other model samplings than the route's own (EPS; flow with shift 3), with the
    simple scheduler. Catches a cut made in raw step fractions that ignores the ends'
    inclusion, a cut one step late (tried: flags shifted by one step, 8 cases fail), or the window ignored."""
    status, body = web_routes.evaluate_schedule_request(
        {"kind": "linear", "start_value": 3.0, "end_value": 1.0, "steps": WINDOW_STEPS,
         "start_percent": start, "end_percent": end})
    assert status == 200, body
    assert body["values"] == pytest.approx([3.0 - 2.0 * step / (WINDOW_STEPS - 1) for step in range(WINDOW_STEPS)])
    assert body["active"] == _pag_steps_of_a_run(tiny_model(family), family, start, end, scheduler)
    if (start, end) != (0.0, 1.0):
        assert not all(body["active"]), "the window should cut this curve"


def test_without_a_window_the_answer_has_no_flags(web_routes) -> None:
    status, body = web_routes.evaluate_schedule_request({"kind": "constant", "value": 2.0, "steps": 3})
    assert (status, body) == (200, {"values": [2.0, 2.0, 2.0]})


@pytest.mark.parametrize(
    ("window", "message_part"),
    [({"start_percent": 0.5}, "end_percent"), ({"start_percent": 0.6, "end_percent": 0.4}, "start_percent"),
     ({"start_percent": -0.1, "end_percent": 0.4}, "start_percent"), ({"start_percent": 0, "end_percent": "1"},
                                                                       "end_percent")],
)
def test_a_bad_window_is_a_400_naming_it(web_routes, window: dict, message_part: str) -> None:
    status, body = web_routes.evaluate_schedule_request({"kind": "constant", "value": 2.0, "steps": 3, **window})
    assert status == 400 and message_part in body["error"], body
