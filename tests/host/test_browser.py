"""The schedule curve in a real browser: the real ComfyUI server and frontend with this pack, in Chromium.

A ComfyUI server is started for this module only: ``main.py --cpu`` of the host on 127.0.0.1 and a free port,
with a temporary ``--base-directory`` whose ``custom_nodes/ComfyUI-Guiders`` links to this repository (the
host checkout is not touched: settings, database and outputs live in the temporary folder). It is stopped
when the module ends, also when a test fails. Chromium (Debian's ``chromium`` package, or
``$CHROMIUM_PATH``) is driven with Playwright; without either the module is skipped with one loud line at the
end of the run.

Every browser test runs twice: on the classic LiteGraph canvas and with "Nodes 2.0"
(``Comfy.VueNodes.Enabled``), where the frontend renders nodes as Vue components and moves DOM widgets in.

Host behaviour relied on (ComfyUI 0.8.0, comfyui-frontend-package 1.35.9): ``--base-directory`` moves
custom_nodes/ and user/; a pack's WEB_DIRECTORY is served under /extensions/ and its modules are imported by
the frontend; routes added to ``PromptServer.instance.routes`` while custom nodes load are served, also under
/api; ``LiteGraph.createNode`` + ``app.graph.add`` is how the frontend adds a node; a number widget's
``setValue`` (what the canvas calls on a click or drag) runs its callback; the multiline text widget runs its
callback on every ``input`` event; ``app.handleFile`` (the Open menu's file input, a file dropped on the
canvas) awaits ``app.loadGraphData``, which validates the file (a notification for a schema or link
problem), stands a bare ``LGraphNode`` with ``has_errors`` in for a type it does not know, and shows the
missing-nodes dialog (its list is ``.comfy-missing-nodes``) before it returns; the "Comfy.Canvas.FitView"
command animates the view to the graph's nodes.

Every file in workflows/ is opened the way a user opens it (a new file is a new case): no missing-nodes
dialog, no validation notification, every node of a registered type, every Guiders node drawn with its
widgets and values, and every schedule node drawing its curve.

The screenshots in docs/images/ (one schedule node; the SDXL example workflow) are rewritten only when
``GUIDERS_UPDATE_SCREENSHOTS=1``; otherwise they are saved under pytest's temporary folder, so a test run
leaves the repository unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO_ROOT / "docs" / "images" / "schedule-node.png"
WORKFLOWS_DIR = REPO_ROOT / "workflows"
WORKFLOW_FILES = sorted(WORKFLOWS_DIR.glob("*.json"))  # a new workflow is a new test case
WORKFLOW_SCREENSHOT = REPO_ROOT / "docs" / "images" / "workflow-sdxl.png"
SCREENSHOT_WORKFLOW = WORKFLOWS_DIR / "sdxl_pag_cosine_tnorm.json"  # its cosine schedule node draws a curve
VIEWPORT = {"width": 1280, "height": 800}
# Large enough that "fit view" shows the whole workflow above the zoom where LiteGraph stops drawing text.
SCREENSHOT_VIEWPORT = {"width": 1920, "height": 1280}
SERVER_START_TIMEOUT_S = 240  # a cold start on 2 CPU cores (torch, every comfy_extras module) takes ~45 s
SERVER_STOP_TIMEOUT_S = 20
BROWSER_TIMEOUT_MS = 60_000
CURVE_TIMEOUT_MS = 15_000
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCHEDULE_NODES = [
    "GuidersScheduleConstant",
    "GuidersScheduleLinear",
    "GuidersScheduleCosine",
    "GuidersScheduleCustom",
]
EXTENSION_NAME = "Guiders.SchedulePreview"
PREVIEW_WIDGET = "schedule_preview"
STEPS_WIDGET = "preview steps"
DEFAULT_PREVIEW_STEPS = 20
SCHEDULE_KINDS = {"GuidersScheduleConstant": "constant", "GuidersScheduleLinear": "linear",
                  "GuidersScheduleCosine": "cosine", "GuidersScheduleCustom": "custom"}
SCHEDULE_CATEGORY = "sampling/guiders/schedules"
GUIDERS_PREFIX = "Guiders"
WIDGET_INPUT_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}  # an input of another type is a socket
COSINE_DEFAULTS = {"max_value": 7.5, "min_value": 0.15, "num_cycles": 0.5, "warmup": 0.0, "warmup_init": 0.0,
                   "k_decay": 1.0}


def _chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM_PATH"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _browser_missing_reason() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return (f"the playwright package is not installed in {sys.executable} "
                "(pip install -r requirements-dev.txt)")
    if _chromium_path() is None:
        return "no Chromium found at $CHROMIUM_PATH or /usr/bin/chromium (Debian: apt-get install chromium)"
    return None


_BROWSER_MISSING_REASON = _browser_missing_reason()
if _BROWSER_MISSING_REASON:
    # tests/conftest.py repeats skip reasons starting with "browser tests:" in one loud line at the end.
    pytest.skip(f"browser tests: {_BROWSER_MISSING_REASON}", allow_module_level=True)

from harness import host_path  # noqa: E402
from playwright.sync_api import Page, sync_playwright  # noqa: E402
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError  # noqa: E402

from guidance_core import schedules  # noqa: E402  (after the skip: the expected curves)

# --------------------------------------------------------------------------------------------------------
# The server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _http(url: str, body: object | None = None, timeout: float = 10) -> tuple[int, object]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def _log_tail(log_path: Path, lines: int = 40) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL to the server's own process group (it was started in a new session)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # anything the server started and left behind
    except ProcessLookupError:
        pass
    process.wait(SERVER_STOP_TIMEOUT_S)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("comfyui-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-Guiders").symlink_to(REPO_ROOT, target_is_directory=True)
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    # A new user gets the template browser over the canvas; the minimap would cover part of the screenshot.
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                                    "Comfy.Workflow.ShowMissingModelsWarning": False}))
    host = host_path()
    port = _free_port()
    command = [
        sys.executable, str(host / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--disable-auto-launch", "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
        "--disable-api-nodes",  # no partner nodes: the frontend then makes no request to the internet
    ]
    # Bytecode of the host's modules goes to a cache of ours, never into the host checkout.
    cache = os.environ.get("PYTHONPYCACHEPREFIX") or str(Path.home() / ".cache" / "comfyui-guiders-pycache")
    env = {**os.environ, "PYTHONPYCACHEPREFIX": cache}
    log_path = base / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with code {process.returncode} while starting:\n"
                            f"{_log_tail(log_path)}")
            try:
                if _http(f"{url}/system_stats", timeout=2)[0] == 200:
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not answer within {SERVER_START_TIMEOUT_S} s:\n"
                            f"{_log_tail(log_path)}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def object_info(server: str) -> dict:
    status, info = _http(f"{server}/object_info", timeout=60)
    assert status == 200
    return info


# --------------------------------------------------------------------------------------------------------
# The browser


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium_path(), args=CHROMIUM_ARGS,
                                             headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module", params=["canvas", "vue-nodes"])
def page(request: pytest.FixtureRequest, server: str, chromium) -> Iterator[Page]:
    """The ComfyUI app, loaded and empty; ``page.mode`` says how nodes are rendered."""
    assert _http(f"{server}/api/settings/Comfy.VueNodes.Enabled", request.param == "vue-nodes")[0] == 200
    page = chromium.new_page(viewport=VIEWPORT)
    page.set_default_timeout(BROWSER_TIMEOUT_MS)
    page.mode = request.param
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.schedule_requests = []
    page.on("request", lambda r: r.url.endswith("/guiders/schedule")
            and page.schedule_requests.append(r.post_data))
    page.goto(server)
    page.wait_for_function("() => window.app?.graph && app.extensions?.length > 0"
                           " && window.LiteGraph?.registered_node_types?.GuidersScheduleCosine")
    yield page
    page.close()


def _fresh_node(page: Page, node_type: str, pos: tuple[int, int] = (320, 120)) -> int:
    """An empty graph at 100 % zoom with one new node of ``node_type``; returns its id."""
    return page.evaluate(
        """async ([type, pos]) => {
            app.graph.clear();
            // Let the frontend render the empty graph first: with "Nodes 2.0", a node added in the same
            // tick as a removed one of the same id and type reuses the old Vue component and never mounts
            // the new node's DOM widgets (frontend 1.35.9; app.loadGraphData is not affected).
            await new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 50)));
            app.canvas.ds.offset = [0, 0];
            app.canvas.ds.scale = 1;
            const node = LiteGraph.createNode(type);
            node.pos = pos;
            app.graph.add(node);
            app.canvas.setDirty(true, true);
            return node.id;
        }""",
        [node_type, list(pos)],
    )


def _preview(page: Page, node_id: int) -> dict:
    """What the node's curve widget shows: state, values drawn, error, and where it is on the screen."""
    return page.evaluate(
        """(id) => {
            const node = app.graph.getNodeById(id);
            const element = node.widgets.find((w) => w.name === "schedule_preview").element;
            const curve = element.querySelector(".guiders-curve");
            const box = (el) => {
                const r = el.getBoundingClientRect();
                return [r.left, r.top, r.right, r.bottom];
            };
            let nodeBox;
            const vueNode = document.querySelector(`[data-node-id="${id}"]`);
            if (vueNode) nodeBox = box(vueNode);
            else {
                const canvas = app.canvas.canvas.getBoundingClientRect();
                const [x0, y0] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1]]);
                const [x1, y1] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0],
                                                                      node.pos[1] + node.size[1]]);
                nodeBox = [canvas.left + x0, canvas.top + y0, canvas.left + x1, canvas.top + y1];
            }
            const rootStyle = getComputedStyle(document.documentElement);
            return {
                state: element.dataset.state,
                values: element.dataset.values ? JSON.parse(element.dataset.values) : null,
                error: element.dataset.error ?? null,
                errorText: element.querySelector(".guiders-error").innerText,
                errorVisible: element.querySelector(".guiders-error").checkVisibility(),
                plotVisible: element.querySelector(".guiders-plot").checkVisibility(),
                points: curve
                    ? curve.getAttribute("points").trim().split(/\\s+/).map((p) => p.split(",").map(Number))
                    : [],
                curveStroke: curve ? getComputedStyle(curve).stroke : null,
                themeForeground: rootStyle.getPropertyValue("--fg-color").trim(),
                elementBox: box(element),
                curveBox: curve ? box(curve) : null,
                nodeBox,
            };
        }""",
        node_id,
    )


def _wait_for_curve(page: Page, node_id: int) -> dict:
    """Wait until the node shows a curve, any curve."""
    page.wait_for_function(
        """(id) => {
            const node = app.graph.getNodeById(id);
            const element = node?.widgets?.find((w) => w.name === "schedule_preview")?.element;
            return element?.dataset.state === "curve" && element.querySelector(".guiders-curve") !== null;
        }""",
        arg=node_id,
        timeout=CURVE_TIMEOUT_MS,
    )
    return _preview(page, node_id)


def _wait_for_values(page: Page, node_id: int, expected: list[float]) -> dict:
    """Wait until the node draws ``expected`` (to 1e-12); fail with what it shows instead."""
    try:
        page.wait_for_function(
            """([id, expected]) => {
                const element = app.graph.getNodeById(id)?.widgets?.find((w) => w.name === "schedule_preview")
                    ?.element;
                if (element?.dataset.state !== "curve" || !element.querySelector(".guiders-curve")) {
                    return false;
                }
                const values = JSON.parse(element.dataset.values);
                const close = (value, want) => Math.abs(value - want) <= 1e-12 * Math.max(1, Math.abs(want));
                return values.length === expected.length
                    && values.every((value, step) => close(value, expected[step]));
            }""",
            arg=[node_id, expected],
            timeout=CURVE_TIMEOUT_MS,
        )
    except PlaywrightTimeoutError:
        shown = _preview(page, node_id)
        pytest.fail(f"the node did not draw {expected}; it shows state={shown['state']!r} "
                    f"values={shown['values']} error={shown['error']!r}")
    return _preview(page, node_id)


def _wait_for_error(page: Page, node_id: int, part: str) -> dict:
    """Wait until the node shows an error message containing ``part``."""
    page.wait_for_function(
        """([id, part]) => {
            const element = app.graph.getNodeById(id).widgets.find((w) => w.name === "schedule_preview").element;
            return element.dataset.state === "error" && element.dataset.error.includes(part);
        }""",
        arg=[node_id, part],
        timeout=CURVE_TIMEOUT_MS,
    )
    return _preview(page, node_id)


def _set_widget(page: Page, node_id: int, name: str, value: float) -> None:
    """Set a number widget as the canvas does when it is clicked or dragged (its callback runs)."""
    page.evaluate(
        """([id, name, value]) => {
            const node = app.graph.getNodeById(id);
            node.widgets.find((w) => w.name === name).setValue(value, { node, canvas: app.canvas });
        }""",
        [node_id, name, value],
    )


def _assert_inside(inner: list[float], outer: list[float], what: str) -> None:
    left, top, right, bottom = inner
    assert right - left > 50 and bottom - top > 30, f"{what} is too small to read: {inner}"
    inside = outer[0] - 1 <= left and outer[1] - 1 <= top and right <= outer[2] + 1 and bottom <= outer[3] + 1
    assert inside, f"{what} {inner} is not inside the node {outer}"


def _approx(values: list[float]):
    return pytest.approx(values, rel=1e-12, abs=1e-12)


def _is_widget_input(spec: list) -> bool:
    """Whether an /object_info input spec is drawn as a widget (a combo's type is its list of choices)."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(spec[0], list) or spec[0] in WIDGET_INPUT_TYPES) and not options.get("forceInput")


def _open_workflow(page: Page, workflow: dict, file_name: str) -> None:
    """Open ``workflow`` as the user's file load does, and return once the frontend is done with it.

    ``app.handleFile`` is what the Open menu's file input and a file dropped on the canvas call. It awaits
    ``app.loadGraphData``, which has shown the missing-nodes dialog, if any, before it returns; two animation
    frames let the canvas draw the graph and Vue render that dialog.
    """
    page.evaluate(
        """async ([text, name]) => {
            await app.handleFile(new File([text], name, { type: "application/json" }));
            await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
        }""",
        [json.dumps(workflow), file_name],
    )


def _fit_view(page: Page) -> None:
    """The frontend's own "fit view" command (the button under the canvas); returns when its animation ends.

    The view is still once scale and offset stay the same over a few frames; one more frame draws it.
    """
    page.evaluate(
        """async () => {
            const frame = () => new Promise((resolve) => requestAnimationFrame(resolve));
            const view = () => JSON.stringify([app.canvas.ds.scale, ...app.canvas.ds.offset]);
            await app.extensionManager.command.execute("Comfy.Canvas.FitView");
            let last = view();
            for (let still = 0, frames = 0; still < 5 && frames < 300; frames++) {
                await frame();
                const now = view();
                still = now === last ? still + 1 : 0;
                last = now;
            }
            app.canvas.setDirty(true, true);
            await frame();
            await frame();
        }"""
    )


def _missing_nodes_listed(page: Page) -> list[str] | None:
    """The node types the frontend reports missing; None when it reports none.

    Frontend 1.35.9 (ComfyUI 0.8.0) shows a PrimeVue dialog ("This workflow has missing nodes") whose list of
    types is ``.comfy-missing-nodes``, one row per type (MissingNodesContent.vue). Frontend 1.49.6 (ComfyUI
    0.33.0) shows no dialog: the graph's breadcrumb gets a warning icon
    (``data-testid="subgraph-breadcrumb-missing-nodes-icon"``, drawn while the graph has a node whose type the
    server lacks); the types are then the graph's nodes without a registered type.
    """
    return page.evaluate(
        """() => {
            const list = document.querySelector(".p-dialog .comfy-missing-nodes");
            if (list) return [...list.children].map((row) => row.querySelector("span").innerText.trim());
            if (document.querySelector('[data-testid="subgraph-breadcrumb-missing-nodes-icon"]')) {
                const missing = app.graph.nodes.filter((node) => !LiteGraph.registered_node_types[node.type]);
                return [...new Set(missing.map((node) => node.type))];
            }
            return null;
        }"""
    )


def _dismiss_dialogs(page: Page) -> None:
    """Close every open dialog as a user does, with Escape (one dialog at a time, the topmost first)."""
    for _ in range(5):
        open_dialogs = page.locator(".p-dialog").count()
        if open_dialogs == 0:
            return
        page.keyboard.press("Escape")
        page.wait_for_function("(count) => document.querySelectorAll('.p-dialog').length < count",
                               arg=open_dialogs, timeout=5_000)
    assert page.locator(".p-dialog").count() == 0, "a dialog stays open after Escape"


def _clear_toasts(page: Page) -> None:
    """Close every notification (toast), also those an earlier test left."""
    page.evaluate("() => app.extensionManager.toast.removeAll()")
    page.wait_for_function("() => document.querySelectorAll('.p-toast-message').length === 0", timeout=5_000)


def _toasts(page: Page) -> list[str]:
    """The notifications shown, e.g. the frontend's workflow validation ("Alert", "Workflow Links Fixed")."""
    return page.evaluate("() => [...document.querySelectorAll('.p-toast-message')].map((t) => t.innerText)")


def _graph_nodes(page: Page) -> dict[int, dict]:
    """Every node of app.graph: what it is, whether it is a placeholder, and whether and how it is drawn."""
    nodes = page.evaluate(
        """() => app.graph.nodes.map((node) => {
            const registered = LiteGraph.registered_node_types[node.type];
            const element = document.querySelector(`[data-node-id="${node.id}"]`);  // "Nodes 2.0" only
            const box = element?.getBoundingClientRect();
            return {
                id: String(node.id),  // a number in frontend 1.35, a string in 1.49
                type: node.type,
                title: node.title,
                registered: registered !== undefined && node.constructor === registered,
                // LGraph.configure stands an unknown type in with a bare LGraphNode that keeps the saved data.
                // (Frontend 1.49 also sets has_errors on a registered loader whose model file is missing.)
                placeholder: !(registered !== undefined && node.constructor === registered)
                    && Boolean(node.has_errors || node.last_serialization),
                size: [...node.size],
                bounds: [...node.boundingRect],  // title bar included
                properties: node.properties ?? {},
                onCanvas: app.canvas.visible_nodes.includes(node),
                widgets: (node.widgets ?? []).map((widget) => ({
                    name: widget.name,
                    label: widget.label || widget.name,
                    value: widget.element ? null : widget.value,
                    drawnAt: widget.last_y ?? null,  // set by the canvas when it draws the widget
                    isDom: widget.element !== undefined,
                    domShown: widget.element
                        ? (element ? element.contains(widget.element) : widget.element.isConnected) : null,
                })),
                widgetsValues: node.serialize().widgets_values ?? [],
                elementBox: box ? [box.left, box.top, box.right, box.bottom] : null,
                elementText: element?.innerText ?? null,
            };
        })"""
    )
    return {node["id"]: node for node in nodes}


def _overlap(a: list[float], b: list[float]) -> bool:
    """Whether two [x, y, width, height] rectangles share more than an edge."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _assert_drawn(page: Page, node: dict) -> None:
    """The node is on screen with every one of its widgets: on the canvas, or as a "Nodes 2.0" element."""
    what = f"node {node['id']} ({node['type']})"
    width, height = node["size"]
    assert width >= 100 and height >= 20, f"{what} has no usable size: {node['size']}"
    if page.mode == "vue-nodes":
        assert node["elementBox"] is not None, f"{what} has no element on the page"
        left, top, right, bottom = node["elementBox"]
        assert right - left > 20 and bottom - top > 10, f"{what} is drawn empty: {node['elementBox']}"
        assert left >= 0 and top >= 0 and right <= VIEWPORT["width"] and bottom <= VIEWPORT["height"], (
            f"{what} is off screen after fitting the view: {node['elementBox']}")
        assert node["title"] in node["elementText"], f"{what} does not show its title {node['title']!r}"
        for widget in node["widgets"]:
            if widget["isDom"]:
                assert widget["domShown"], f"{what}: widget {widget['name']!r} is not inside the node"
            else:
                assert widget["label"] in node["elementText"], f"{what} does not show widget {widget['label']!r}"
    else:
        assert node["onCanvas"], f"{what} is not among the nodes the canvas draws"
        for widget in node["widgets"]:
            if widget["isDom"]:
                assert widget["domShown"], f"{what}: widget {widget['name']!r} is not on the page"
            else:
                drawn_at = widget["drawnAt"]
                assert drawn_at is not None and 0 <= drawn_at < height, (
                    f"{what}: widget {widget['name']!r} was not drawn inside the node (y={drawn_at})")


# --------------------------------------------------------------------------------------------------------
# Server side: no browser needed


def test_the_server_registers_our_nodes(server: str) -> None:
    status, object_info = _http(f"{server}/object_info")
    assert status == 200
    for node_id in SCHEDULE_NODES:
        assert node_id in object_info, f"{node_id} is not in /object_info"
        assert object_info[node_id]["category"] == "sampling/guiders/schedules"
    # The preview-steps control is frontend-only: no node declares it.
    for info in object_info.values():
        if info["name"].startswith("GuidersSchedule"):
            inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
            assert "preview_steps" not in inputs and STEPS_WIDGET not in inputs


@pytest.mark.parametrize("prefix", ["", "/api"])
def test_the_route_answers_on_the_real_server(server: str, prefix: str) -> None:
    route = f"{server}{prefix}/guiders/schedule"
    status, body = _http(route, {"kind": "linear", "start_value": 7.0, "end_value": 1.0, "steps": 4})
    assert (status, body) == (200, {"values": [7.0, 5.0, 3.0, 1.0]})
    status, body = _http(route, {**COSINE_DEFAULTS, "kind": "cosine", "steps": 9})
    assert status == 200 and body["values"] == _approx(schedules.Cosine(**COSINE_DEFAULTS).values(9))
    status, body = _http(route, {"kind": "custom", "values": "7, abc", "steps": 4})
    assert status == 400 and "'abc'" in body["error"]
    status, body = _http(route, b"{not json")
    assert status == 400 and "not JSON" in body["error"]


def test_the_extension_is_served(server: str) -> None:
    status, extensions = _http(f"{server}/extensions")
    assert status == 200
    assert any(path.endswith("/schedule_preview.js") for path in extensions), extensions


# --------------------------------------------------------------------------------------------------------
# In the browser


def test_the_extension_registers_once_without_errors(page: Page) -> None:
    names = page.evaluate("() => app.extensions.map((extension) => extension.name)")
    assert names.count(EXTENSION_NAME) == 1
    assert [error for error in page.errors if "Guiders" in error or "schedule_preview" in error] == []


@pytest.mark.parametrize("node_id", SCHEDULE_NODES)
def test_every_schedule_node_draws_the_curve_of_its_schedule(page: Page, node_id: str) -> None:
    node = _fresh_node(page, node_id)
    defaults = {
        "GuidersScheduleConstant": schedules.Constant(7.0),
        "GuidersScheduleLinear": schedules.Linear(7.0, 1.0),
        "GuidersScheduleCosine": schedules.Cosine(**COSINE_DEFAULTS),
        "GuidersScheduleCustom": schedules.Custom(schedules.parse_values("7.5, 6, 4, 3")),
    }
    preview = _wait_for_values(page, node, defaults[node_id].values(DEFAULT_PREVIEW_STEPS))
    assert len(preview["points"]) == DEFAULT_PREVIEW_STEPS
    _assert_inside(preview["elementBox"], preview["nodeBox"], "the curve widget")
    _assert_inside(preview["curveBox"] if node_id != "GuidersScheduleConstant" else preview["elementBox"],
                   preview["elementBox"], "the curve")


def test_the_curve_is_drawn_in_the_themes_colours(page: Page) -> None:
    node = _fresh_node(page, "GuidersScheduleCosine")
    preview = _wait_for_curve(page, node)
    foreground = page.evaluate(
        """(colour) => {
            const probe = document.createElement("div");
            probe.style.color = colour;
            document.body.append(probe);
            const rgb = getComputedStyle(probe).color;
            probe.remove();
            return rgb;
        }""",
        preview["themeForeground"],
    )
    assert preview["themeForeground"], "the frontend defines no --fg-color"
    assert preview["curveStroke"] == foreground
    # Screen y grows downwards: a decreasing cosine is drawn with increasing y, from left to right.
    xs = [x for x, _ in preview["points"]]
    ys = [y for _, y in preview["points"]]
    assert xs == sorted(xs) and ys == sorted(ys) and ys[-1] - ys[0] > 40


def test_the_curve_follows_widget_changes(page: Page) -> None:
    node = _fresh_node(page, "GuidersScheduleCosine")
    before = _wait_for_values(page, node, schedules.Cosine(**COSINE_DEFAULTS).values(DEFAULT_PREVIEW_STEPS))

    lower_peak = schedules.Cosine(**{**COSINE_DEFAULTS, "max_value": 3.0})
    _set_widget(page, node, "max_value", 3.0)
    after = _wait_for_values(page, node, lower_peak.values(DEFAULT_PREVIEW_STEPS))
    assert max(abs(a - b) for a, b in zip(after["values"], before["values"], strict=True)) > 1.0
    assert after["points"] != before["points"]

    _set_widget(page, node, STEPS_WIDGET, 8)
    eight = _wait_for_values(page, node, lower_peak.values(8))
    assert len(eight["points"]) == 8
    # Frontend-only: kept in the node's properties (saved with the workflow), never sent to the Python node.
    saved, prompt = page.evaluate(
        """async (id) => [
            app.graph.getNodeById(id).serialize(),
            (await app.graphToPrompt()).output[String(id)],
        ]""",
        node,
    )
    assert saved["properties"]["guiders_preview_steps"] == 8
    assert saved["widgets_values"] == [3.0, 0.15, 0.5, 0.0, 0.0, 1.0]
    assert prompt["inputs"] == {**COSINE_DEFAULTS, "max_value": 3.0}


def test_a_loaded_workflow_shows_its_own_values_and_preview_steps(page: Page) -> None:
    node = _fresh_node(page, "GuidersScheduleLinear")
    _wait_for_curve(page, node)
    workflow = page.evaluate("() => app.graph.serialize()")
    (saved_node,) = workflow["nodes"]
    saved_node["widgets_values"] = [2.0, 6.0]
    saved_node["properties"]["guiders_preview_steps"] = 5
    page.evaluate("async (workflow) => { await app.loadGraphData(workflow); }", workflow)
    _wait_for_values(page, saved_node["id"], [2.0, 3.0, 4.0, 5.0, 6.0])


# Canvas only: the check runs in onDrawForeground, which the canvas does not call for nodes rendered by Vue.
@pytest.mark.parametrize("page", ["canvas"], indirect=True)
def test_values_set_by_code_are_picked_up_on_the_next_frame(page: Page) -> None:
    node = _fresh_node(page, "GuidersScheduleConstant")
    _wait_for_values(page, node, [7.0] * DEFAULT_PREVIEW_STEPS)
    # No callback, as when another extension or a script writes the value: the next canvas frame notices.
    page.evaluate(
        "(id) => { app.graph.getNodeById(id).widgets[0].value = 2.5; app.canvas.setDirty(true, true); }", node
    )
    _wait_for_values(page, node, [2.5] * DEFAULT_PREVIEW_STEPS)


def test_typing_invalid_values_shows_the_error_instead_of_a_curve(page: Page) -> None:
    node = _fresh_node(page, "GuidersScheduleCustom")
    _wait_for_curve(page, node)
    textarea = (page.locator(f'[data-node-id="{node}"] textarea') if page.mode == "vue-nodes"
                else page.locator("textarea.comfy-multiline-input"))
    assert textarea.count() == 1

    textarea.select_text()  # the first keystroke replaces the default text
    page.schedule_requests.clear()
    typed = "7.5, six, 4"
    textarea.press_sequentially(typed, delay=20)  # one input event per character, well inside the debounce
    failed = _wait_for_error(page, node, "'six'")
    assert failed["errorVisible"] and "'six'" in failed["errorText"]
    assert not failed["plotVisible"] and failed["points"] == []
    # Debounced: far fewer requests than keystrokes, and the last one carries the whole text.
    page.wait_for_timeout(500)
    assert 1 <= len(page.schedule_requests) <= len(typed) // 3, page.schedule_requests
    assert json.loads(page.schedule_requests[-1])["values"] == typed

    textarea.fill("1 3")
    fixed = _wait_for_values(page, node, schedules.Custom((1.0, 3.0)).values(DEFAULT_PREVIEW_STEPS))
    assert fixed["values"][0] == 1.0 and fixed["values"][-1] == 3.0
    assert fixed["plotVisible"] and not fixed["errorVisible"]


def test_other_nodes_are_left_alone(page: Page) -> None:
    node = _fresh_node(page, "KSampler")
    touched = page.evaluate(
        """(id) => { const node = app.graph.getNodeById(id);
                     return [node.widgets.map((w) => w.name), node.guidersSchedulePreview ?? null,
                             "guiders_preview_steps" in (node.properties ?? {})]; }""",
        node,
    )
    widget_names, preview, has_property = touched
    assert "schedule_preview" not in widget_names and STEPS_WIDGET not in widget_names
    assert preview is None and not has_property


# --------------------------------------------------------------------------------------------------------
# The scale curve of a node whose schedule input is connected


SCALE_CURVE_WIDGET = "scale_curve"
_node_ids = iter(range(1000, 10**6))


def _add_node(page: Page, node_type: str, pos: tuple[int, int]) -> int:
    """A new node with an id no earlier test used: frontend 1.49 hands a node the widget values an earlier node
    of its id had, and "Nodes 2.0" (1.35) may reuse that node's component, which then never shows a widget
    added later."""
    return page.evaluate(
        """([type, pos, id]) => { const node = LiteGraph.createNode(type); node.id = id; node.pos = pos;
                                  app.graph.add(node); app.canvas.setDirty(true, true); return node.id; }""",
        [node_type, list(pos), next(_node_ids)],
    )


def _connect_schedule(page: Page, schedule_id: int, node_id: int) -> None:
    """Link the schedule node's output to the node's ``schedule`` input, as a drag from socket to socket does."""
    page.evaluate(
        """([from, to]) => {
            const target = app.graph.getNodeById(to);
            const slot = target.inputs.findIndex((input) => input.name === "schedule");
            app.graph.getNodeById(from).connect(0, target, slot);
            app.canvas.setDirty(true, true);
        }""",
        [schedule_id, node_id],
    )


def _disconnect_schedule(page: Page, node_id: int) -> None:
    page.evaluate(
        """(id) => {
            const node = app.graph.getNodeById(id);
            node.disconnectInput(node.inputs.findIndex((input) => input.name === "schedule"));
            app.canvas.setDirty(true, true);
        }""",
        node_id,
    )


def _scale_curve(page: Page, node_id: int) -> dict | None:
    """The node's scale curve: values, active flags, what is drawn; None when the node has no such widget."""
    return page.evaluate(
        """(id) => {
            const node = app.graph.getNodeById(id);
            const widget = node.widgets?.find((w) => w.name === "scale_curve");
            if (!widget) return null;
            const element = widget.element;
            const box = (el) => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
            const vueNode = document.querySelector(`[data-node-id="${id}"]`);
            let nodeBox;
            if (vueNode) nodeBox = box(vueNode);
            else {
                const canvas = app.canvas.canvas.getBoundingClientRect();
                const [x0, y0] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1]]);
                const [x1, y1] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0],
                                                                      node.pos[1] + node.size[1]]);
                nodeBox = [canvas.left + x0, canvas.top + y0, canvas.left + x1, canvas.top + y1];
            }
            return {
                state: element.dataset.state,
                values: element.dataset.values ? JSON.parse(element.dataset.values) : null,
                active: element.dataset.active ? JSON.parse(element.dataset.active) : null,
                error: element.dataset.error ?? null,
                caption: element.querySelector(".guiders-caption").innerText,
                solidRuns: element.querySelectorAll(".guiders-curve").length,
                shaded: element.querySelectorAll(".guiders-off").length,
                cuts: [...element.querySelectorAll(".guiders-cut")].map((line) => Number(line.getAttribute("x1"))),
                onDots: element.querySelectorAll(".guiders-dot").length,
                offDots: element.querySelectorAll(".guiders-dot-off").length,
                inPage: element.isConnected,
                elementBox: box(element),
                nodeBox,
            };
        }""",
        node_id,
    )


def _wait_for_scale_curve(page: Page, node_id: int, values: list[float], active: list[bool]) -> dict:
    try:
        page.wait_for_function(
            """([id, values, active]) => {
                const element = app.graph.getNodeById(id)?.widgets?.find((w) => w.name === "scale_curve")?.element;
                if (element?.dataset.state !== "curve" || !element.querySelector(".guiders-dot, .guiders-dot-off")) {
                    return false;
                }
                const shownValues = JSON.parse(element.dataset.values);
                const close = (value, want) => Math.abs(value - want) <= 1e-12 * Math.max(1, Math.abs(want));
                return shownValues.length === values.length && shownValues.every((v, i) => close(v, values[i]))
                    && element.dataset.active === JSON.stringify(active);
            }""",
            arg=[node_id, values, active],
            timeout=CURVE_TIMEOUT_MS,
        )
    except PlaywrightTimeoutError:
        pytest.fail(f"node {node_id} did not draw the scale curve {values} / {active}; "
                    f"it shows {_scale_curve(page, node_id)}")
    return _scale_curve(page, node_id)


def _steps_in_window(steps: int, start: float, end: float) -> list[bool]:
    """The simple scheduler puts step i at progress i / steps; a window [start, end] holds the steps in it
    (bounds chosen between two steps, where every model sampling agrees; test_schedule_route.py runs it)."""
    assert all(abs(bound * steps - round(bound * steps)) > 1e-6 for bound in (start, end) if 0 < bound < 1)
    return [start <= step / steps <= end for step in range(steps)]


# A term node and a CFG node (its percent mode; its σ mode falls on steps that depend on the model).
SCALE_CURVE_CASES = {"GuidersPAG": {}, "GuidersCFGInterval": {"mode": "percent"}}


@pytest.mark.parametrize("node_type", list(SCALE_CURVE_CASES))
def test_a_connected_schedule_draws_the_scale_curve_cut_by_the_window(page: Page, node_type: str) -> None:
    """The node draws its schedule's values and shades the steps its window leaves out; the curve follows the
    schedule's widgets and the window's, and goes when the schedule is disconnected. Catches: a window ignored
    (every step drawn on), a curve not from the connected schedule, a curve left after disconnecting.
    Tried: the window fields never sent (this test and the loading test fail on both modes)."""
    frontend = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? ''")
    if page.mode == "vue-nodes" and node_type == "GuidersCFGInterval" and frontend.startswith("1.35."):
        pytest.skip("known gap: with Nodes 2.0 on frontend 1.35 (ComfyUI 0.8.0) the curve widget added to a "
                    "GuidersCFGInterval node after it was drawn is not mounted; GuidersPAG's is")
    _fresh_node(page, "KSampler", pos=(20, 500))
    schedule = _add_node(page, "GuidersScheduleLinear", (20, 120))
    node = _add_node(page, node_type, (360, 80))
    for name, value in SCALE_CURVE_CASES[node_type].items():
        page.evaluate("""([id, name, value]) => { const node = app.graph.getNodeById(id);
                         node.widgets.find((w) => w.name === name).setValue(value, { node, canvas: app.canvas }); }""",
                      [node, name, value])
    assert _scale_curve(page, node) is None, "a node without a connected schedule draws no curve"
    size_before = page.evaluate("(id) => [...app.graph.getNodeById(id).size]", node)

    _connect_schedule(page, schedule, node)
    linear = schedules.Linear(7.0, 1.0).values(DEFAULT_PREVIEW_STEPS)
    whole = _wait_for_scale_curve(page, node, linear, [True] * DEFAULT_PREVIEW_STEPS)
    assert whole["shaded"] == 0 and whole["cuts"] == [] and whole["onDots"] == DEFAULT_PREVIEW_STEPS
    _assert_inside(whole["elementBox"], whole["nodeBox"], "the scale curve")

    size_with_curve = page.evaluate("(id) => [...app.graph.getNodeById(id).size]", node)
    _set_widget(page, node, "start_percent", 0.22)
    _set_widget(page, node, "end_percent", 0.63)
    active = _steps_in_window(DEFAULT_PREVIEW_STEPS, 0.22, 0.63)
    cut = _wait_for_scale_curve(page, node, linear, active)
    assert cut["shaded"] == 2 and len(cut["cuts"]) == 2, cut  # before and after the window
    assert cut["solidRuns"] == 1 and cut["onDots"] == sum(active) and cut["offDots"] == active.count(False)
    assert "on at step 6–13 of 20" in cut["caption"], cut["caption"]

    # The schedule node's own widgets and preview steps drive it.
    _set_widget(page, schedule, "start_value", 3.0)
    _set_widget(page, schedule, STEPS_WIDGET, 10)
    _wait_for_scale_curve(page, node, schedules.Linear(3.0, 1.0).values(10), _steps_in_window(10, 0.22, 0.63))

    _disconnect_schedule(page, node)
    page.wait_for_function(
        """(id) => !app.graph.getNodeById(id).widgets.some((w) => w.name === 'scale_curve')
                   && ![...document.querySelectorAll('.guiders-scale-curve')].some((el) => el.isConnected)""",
        arg=node, timeout=CURVE_TIMEOUT_MS)
    size_after = page.evaluate("(id) => [...app.graph.getNodeById(id).size]", node)
    # (Nodes 2.0 measures the node from its DOM and may differ by a few pixels.)
    assert size_after[1] <= min(size_before[1] + 10, size_with_curve[1] - 100), (
        f"the node kept the curve's room: {size_before} -> {size_with_curve} -> {size_after}")
    assert [error for error in page.errors if "Guiders" in error or "schedule_preview" in error] == []


def test_a_saved_workflow_with_a_connected_schedule_draws_the_cut_curve_on_loading(page: Page) -> None:
    _fresh_node(page, "KSampler", pos=(20, 500))
    schedule = _add_node(page, "GuidersScheduleConstant", (20, 120))
    node = _add_node(page, "GuidersSLG", (360, 80))
    _connect_schedule(page, schedule, node)
    _set_widget(page, node, "start_percent", 0.03)
    _set_widget(page, node, "end_percent", 0.48)
    active = _steps_in_window(DEFAULT_PREVIEW_STEPS, 0.03, 0.48)
    _wait_for_scale_curve(page, node, [7.0] * DEFAULT_PREVIEW_STEPS, active)
    workflow = page.evaluate("() => app.graph.serialize()")
    assert all(SCALE_CURVE_WIDGET not in json.dumps(saved.get("widgets_values")) for saved in workflow["nodes"])
    page.evaluate("async (workflow) => { app.graph.clear(); await app.loadGraphData(workflow); }", workflow)
    _wait_for_scale_curve(page, node, [7.0] * DEFAULT_PREVIEW_STEPS, active)


# --------------------------------------------------------------------------------------------------------
# The shipped workflows, opened as a user opens a file


@pytest.mark.parametrize("workflow_file", WORKFLOW_FILES, ids=[path.stem for path in WORKFLOW_FILES])
def test_every_shipped_workflow_opens_without_missing_nodes_and_draws_our_nodes(
    page: Page, object_info: dict, workflow_file: Path
) -> None:
    workflow = json.loads(workflow_file.read_text())
    saved_guiders_nodes = [node for node in workflow["nodes"] if node["type"].startswith(GUIDERS_PREFIX)]
    assert saved_guiders_nodes, f"{workflow_file.name} has no {GUIDERS_PREFIX} node"
    errors_before = len(page.errors)
    _clear_toasts(page)
    # The checkpoints it names are not on the test server; the missing-models notice is off in its settings
    # and would be fine: only missing nodes are a failure.
    _open_workflow(page, workflow, workflow_file.name)
    try:
        _fit_view(page)
        assert _missing_nodes_listed(page) is None, (
            f"opening {workflow_file.name} shows the missing-nodes dialog for {_missing_nodes_listed(page)}")
        for saved in saved_guiders_nodes:
            if _schedule_linked(workflow, saved):
                _wait_for_scale_curve_shown(page, saved["id"])
        nodes = _graph_nodes(page)
        assert sorted(nodes) == sorted(str(node["id"]) for node in workflow["nodes"])
        not_loaded = [(node["id"], node["type"]) for node in nodes.values()
                      if not node["registered"] or node["placeholder"]]
        assert not_loaded == [], f"nodes without a registered type (placeholders): {not_loaded}"

        for saved in saved_guiders_nodes:
            node = nodes[str(saved["id"])]
            assert node["type"] == saved["type"]
            assert node["widgetsValues"] == saved["widgets_values"], f"node {saved['id']} lost its values"
            _assert_drawn(page, node)
            info = object_info[saved["type"]]
            is_schedule = info["category"] == SCHEDULE_CATEGORY
            declared = {name for section in ("required", "optional")
                        for name, spec in info["input"].get(section, {}).items() if _is_widget_input(spec)}
            # The schedule nodes get the curve and its "preview steps" control; a node whose schedule input is
            # linked to a schedule node, the scale curve.
            expected = declared | ({STEPS_WIDGET, PREVIEW_WIDGET} if is_schedule else set())
            if _schedule_linked(workflow, saved):
                expected |= {SCALE_CURVE_WIDGET}
            shown = [widget["name"] for widget in node["widgets"]]
            assert sorted(shown) == sorted(expected), (
                f"node {saved['id']} ({saved['type']}) shows the widgets {shown}; expected {sorted(expected)}")
            if is_schedule:
                fields = {widget["name"]: widget["value"] for widget in node["widgets"]
                          if widget["name"] in declared}
                steps = saved.get("properties", {}).get("guiders_preview_steps", DEFAULT_PREVIEW_STEPS)
                schedule = schedules.schedule_from_dict({"kind": SCHEDULE_KINDS[saved["type"]], **fields})
                drawn = _wait_for_values(page, saved["id"], schedule.values(steps))
                assert len(drawn["points"]) == steps

        # Checked again once the curves have come: a dialog shown late would show by now.
        assert _missing_nodes_listed(page) is None
        # The frontend validates the file on loading (schema, then links) and says so in a notification.
        assert _toasts(page) == [], f"opening {workflow_file.name} shows notifications"
        assert page.errors[errors_before:] == [], "the page threw while opening the workflow"
    finally:
        _dismiss_dialogs(page)


def _schedule_linked(workflow: dict, saved: dict) -> bool:
    """Whether the saved node's ``schedule`` input is linked to one of our schedule nodes."""
    link_id = next((slot.get("link") for slot in saved.get("inputs", []) if slot["name"] == "schedule"), None)
    if link_id is None:
        return False
    source = next(link[1] for link in workflow["links"] if link[0] == link_id)
    return next(node["type"] for node in workflow["nodes"] if node["id"] == source) in SCHEDULE_KINDS


def _wait_for_scale_curve_shown(page: Page, node_id: int) -> None:
    page.wait_for_function(
        """(id) => app.graph.getNodeById(id)?.widgets?.find((w) => w.name === "scale_curve")?.element
                   ?.dataset.state === "curve" """,
        arg=node_id, timeout=CURVE_TIMEOUT_MS)


def test_the_missing_nodes_check_sees_a_missing_node(page: Page) -> None:
    """The same file load with one node type the server lacks shows the dialog the test above looks for."""
    workflow = json.loads(SCREENSHOT_WORKFLOW.read_text())
    unknown = next(node for node in workflow["nodes"] if node["type"] == "GuidersPAG")
    unknown["type"] = "GuidersNoSuchNode"
    _open_workflow(page, workflow, "unknown-node.json")
    try:
        assert _missing_nodes_listed(page) == ["GuidersNoSuchNode"]  # no waiting: as soon as the check above
        node = _graph_nodes(page)[str(unknown["id"])]
        assert node["placeholder"] and not node["registered"]
    finally:
        _dismiss_dialogs(page)
    assert page.locator(".p-dialog").count() == 0  # the dialog (frontend 1.35) went with Escape


@pytest.mark.parametrize("page", ["canvas"], indirect=True)  # the default rendering, as users first see it
def test_screenshot_of_a_schedule_node(page: Page, tmp_path: Path) -> None:
    node = _fresh_node(page, "GuidersScheduleCosine", pos=(340, 140))
    _wait_for_curve(page, node)
    shown = {"max_value": 7.0, "min_value": 1.0, "num_cycles": 0.5, "warmup": 0.2, "warmup_init": 1.0,
             "k_decay": 1.0}
    for name, value in shown.items():
        _set_widget(page, node, name, value)
    preview = _wait_for_values(page, node, schedules.Cosine(**shown).values(DEFAULT_PREVIEW_STEPS))
    page.wait_for_timeout(300)  # let the canvas draw its next frame
    left, top, right, bottom = preview["nodeBox"]
    title_height = page.evaluate("() => LiteGraph.NODE_TITLE_HEIGHT")
    # Margins take in the node's shadow and its source badge ("Guiders"), drawn above the title bar.
    clip = {"x": left - 24, "y": top - title_height - 40, "width": right - left + 48,
            "height": bottom - top + title_height + 64}
    target = SCREENSHOT if os.environ.get("GUIDERS_UPDATE_SCREENSHOTS") == "1" else tmp_path / SCREENSHOT.name
    target.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target), clip=clip)
    assert target.stat().st_size > 5_000


@pytest.mark.parametrize("page", ["canvas"], indirect=True)  # the default rendering, as users first see it
def test_screenshot_of_a_workflow(page: Page, tmp_path: Path) -> None:
    workflow = json.loads(SCREENSHOT_WORKFLOW.read_text())
    page.set_viewport_size(SCREENSHOT_VIEWPORT)
    try:
        page.wait_for_function(
            "([width, height]) => app.canvas.canvas.width === width * devicePixelRatio"
            " && app.canvas.canvas.height === height * devicePixelRatio",
            arg=[SCREENSHOT_VIEWPORT["width"], SCREENSHOT_VIEWPORT["height"]],
        )
        _open_workflow(page, workflow, SCREENSHOT_WORKFLOW.name)
        _dismiss_dialogs(page)  # a missing-models notice, where the settings show one
        _clear_toasts(page)
        _fit_view(page)
        for saved in workflow["nodes"]:
            if saved["type"] in SCHEDULE_KINDS:
                _wait_for_curve(page, saved["id"])
        view = page.evaluate(
            """() => {
                const canvas = app.canvas.canvas.getBoundingClientRect();
                const toScreen = ([x, y, width, height]) => {
                    const [left, top] = app.canvas.ds.convertOffsetToCanvas([x, y]);
                    const [right, bottom] = app.canvas.ds.convertOffsetToCanvas([x + width, y + height]);
                    return [canvas.left + left, canvas.top + top, canvas.left + right, canvas.top + bottom];
                };
                return {
                    scale: app.canvas.ds.scale,
                    lowQuality: app.canvas.low_quality,
                    boxes: [...app.graph.nodes, ...app.graph.groups].map((item) => toScreen(item.boundingRect)),
                };
            }"""
        )
        assert not view["lowQuality"], f"at zoom {view['scale']:.2f} the canvas draws nodes without text"
        nodes = list(_graph_nodes(page).values())
        overlapping = [(a["id"], b["id"]) for i, a in enumerate(nodes) for b in nodes[i + 1:]
                       if _overlap(a["bounds"], b["bounds"])]
        assert overlapping == [], f"nodes drawn over each other in {SCREENSHOT_WORKFLOW.name}: {overlapping}"
        margin = 24
        left = max(0, min(box[0] for box in view["boxes"]) - margin)
        top = max(0, min(box[1] for box in view["boxes"]) - margin)
        right = min(SCREENSHOT_VIEWPORT["width"], max(box[2] for box in view["boxes"]) + margin)
        bottom = min(SCREENSHOT_VIEWPORT["height"], max(box[3] for box in view["boxes"]) + margin)
        page.wait_for_timeout(300)  # let the canvas draw its next frame
        update = os.environ.get("GUIDERS_UPDATE_SCREENSHOTS") == "1"
        target = WORKFLOW_SCREENSHOT if update else tmp_path / WORKFLOW_SCREENSHOT.name
        target.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target), clip={"x": left, "y": top, "width": right - left,
                                                "height": bottom - top})
        assert target.stat().st_size > 50_000
    finally:
        _dismiss_dialogs(page)
        page.set_viewport_size(VIEWPORT)
