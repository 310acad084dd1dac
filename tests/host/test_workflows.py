"""Every workflow in ``workflows/`` runs end to end through ComfyUI's own executor, on tiny models.

One test per file, found by globbing the folder (a new workflow is a new test):
1. the file is sound: LiteGraph 0.4 JSON whose node types are all registered once the pack is loaded,
   whose links agree with both of their ends, and whose widget values fit the live node definitions;
2. it is converted to the API prompt the frontend would queue (``workflow_convert.graph_to_prompt``);
3. the parts that need model files are replaced by test-only stand-ins of the same model family, told by
   the checkpoint names (loaders -> a tiny random-weight model, text encoders -> conditioning of the
   family's shape, ``Empty*Latent*`` -> an 8x8 latent, VAE decoding and what follows it -> a node that
   records the sampled latent); every other node, every Guiders node included, runs as saved;
4. ``execution.validate_prompt`` and ``execution.PromptExecutor`` run it as the server's prompt worker
   does. Every Guiders node must have executed and every recorded latent must be finite and of the
   expected shape. The same prompt is then run with the Guiders MODEL nodes bypassed (mode 4, rewired as
   the frontend does): each sampler downstream of a Guiders node must give another latent, the others
   the very same latent.

SD1.5, SDXL, SD3, Flux and the video DiTs (Wan 2.1 T2V, LTXV, HunyuanVideo) come from ``tiny_models``
(ComfyUI's own model classes, seeded random weights); the LTXV stand-in has LTX-Video 2B's 28 blocks, so
the block its workflow names (19) exists.

Host behaviour these tests depend on (ComfyUI 0.8.0):
- ``app/custom_node_manager.py``: ``GET /workflow_templates`` lists ``custom_nodes/*/workflows/*.json`` by
  pack folder ("workflows" is one of its example folder names) and ``/api/workflow_templates/<module>``
  serves the folder; that is what the template browser reads.
- ``execution.PromptExecutor(server, cache_type, cache_args)`` needs from ``server`` only ``client_id``,
  ``last_node_id`` and ``send_sync(event, data, sid)``; with a client id it sends "executing" for every
  node it runs, and it reads ``cache_args["ram"]`` after each node (0.33.0 also ``["ram_inactive"]``).
- ``execution.validate_prompt`` returns ``(valid, error, good_outputs, node_errors)``.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import harness
import pytest
import tiny_models
import torch
import workflow_convert as wc

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS_DIR = REPO_ROOT / "workflows"
WORKFLOW_FILES = sorted(WORKFLOWS_DIR.glob("*.json"))
WORKFLOW_IDS = [path.stem for path in WORKFLOW_FILES]

# comfy_extras files the shipped workflows need beyond those harness.bootstrap() loads.
WORKFLOW_EXTRAS = (
    "nodes_hunyuan.py",  # EmptyHunyuanLatentVideo
    "nodes_lt.py",  # EmptyLTXVLatentVideo, LTXVConditioning, LTXVScheduler
    "nodes_video.py",  # CreateVideo, SaveVideo
)

TINY_SIDE = tiny_models.TINY_LATENT_SIZE  # 8x8 latents (video: tiny_models' latent_frames frames)
GUIDERS_PREFIX = "Guiders"
STAND_INS = wc.StandIns(model="WorkflowTestTinyModel", conditioning="WorkflowTestTinyConditioning",
                        latent="WorkflowTestTinyLatent", recorder="WorkflowTestRecordLatent")


# The families the workflows run on: every tiny model (tiny_models has SDXL too, which no other test
# parametrization uses).
FAMILIES = (*tiny_models.FAMILIES, *tiny_models.VIDEO_FAMILIES, "sdxl")
# Stand-ins with the real model's depth, where a workflow names a block by number as users do: the LTXV
# workflow's STG uses block 19 (LTX-Video's choice), which needs LTX-Video 2B's 28 blocks, not the 3 of the
# shared tiny LTXV (on which "auto" falls back to the middle block).
REAL_DEPTH_STAND_INS = {"ltxv": lambda: tiny_models.make_ltxv(num_layers=28)}


def tiny_conditioning(family: str) -> tuple[list, list]:
    """(positive, negative) of the shape the family's text encoders give; the two differ."""
    return tiny_models.make_conditioning(family, seed=1)


def latent_shape(family: str, batch_size: int) -> tuple[int, ...]:
    """What the family's Empty*Latent* node would give, at 8x8 (a video family: with its latent frames)."""
    spec = tiny_models.family_spec(family)
    frames = () if spec.latent_frames is None else (spec.latent_frames,)
    return (batch_size, spec.latent_channels, *frames, TINY_SIDE, TINY_SIDE)


# ---------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def registry(guiders_pack: dict[str, type]) -> dict[str, type]:
    """ComfyUI's node registry with this pack and the extras the workflows use, as a running server has."""
    import harness

    import nodes

    for file_name in WORKFLOW_EXTRAS:
        path = harness.host_path() / "comfy_extras" / file_name
        if str(path.with_suffix("")) not in nodes.LOADED_MODULE_DIRS:
            loaded = asyncio.run(nodes.load_custom_node(str(path), module_parent="comfy_extras"))
            assert loaded, f"ComfyUI could not load {path} (see the log above)"
    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def model_of(tiny_model: Callable) -> Callable[[str], object]:
    built: dict[str, object] = {}

    def get(family: str):
        if family not in REAL_DEPTH_STAND_INS:
            return tiny_model(family)
        if family not in built:
            built[family] = REAL_DEPTH_STAND_INS[family]()
        return built[family]

    return get


@dataclass
class RecordingServer:
    """The part of server.PromptServer the executor talks to; it only keeps the messages."""

    client_id: str | None = None
    last_node_id: str | None = None
    messages: list[tuple[str, dict]] = field(default_factory=list)

    def send_sync(self, event: str, data: dict, sid: str | None = None) -> None:
        self.messages.append((event, data))

    def executed_node_ids(self) -> set[str]:
        return {str(data["node"]) for event, data in self.messages
                if event == "executing" and data.get("node") is not None}

    def errors(self) -> list[dict]:
        return [data for event, data in self.messages if event == "execution_error"]


@pytest.fixture
def recorded_latents(registry: dict[str, type], model_of: Callable, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Registers the stand-in nodes for this test only; returns where the recorder keeps the latents."""
    recorded: dict[str, torch.Tensor] = {}
    families = list(FAMILIES)

    class TinyModel:
        RETURN_TYPES = ("MODEL",)
        FUNCTION = "run"
        CATEGORY = "_for_testing"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"family": (families,)}}

        def run(self, family):
            return (model_of(family),)

    class TinyConditioning:
        RETURN_TYPES = ("CONDITIONING",)
        FUNCTION = "run"
        CATEGORY = "_for_testing"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"family": (families,), "role": (["positive", "negative"],)}}

        def run(self, family, role):
            positive, negative = tiny_conditioning(family)
            return (positive if role == "positive" else negative,)

    class TinyLatent:
        RETURN_TYPES = ("LATENT",)
        FUNCTION = "run"
        CATEGORY = "_for_testing"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"family": (families,),
                                 "batch_size": ("INT", {"default": 1, "min": 1, "max": 64})}}

        def run(self, family, batch_size):
            return ({"samples": torch.zeros(latent_shape(family, batch_size))},)  # as Empty*Latent*: zeros

    class RecordLatent:
        RETURN_TYPES = ()
        FUNCTION = "run"
        OUTPUT_NODE = True
        CATEGORY = "_for_testing"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"samples": ("LATENT",)}, "hidden": {"unique_id": "UNIQUE_ID"}}

        def run(self, samples, unique_id):
            recorded[str(unique_id)] = samples["samples"].detach().clone()
            return {"ui": {"latent_shape": [list(samples["samples"].shape)]}}

    for node_id, cls in ((STAND_INS.model, TinyModel), (STAND_INS.conditioning, TinyConditioning),
                         (STAND_INS.latent, TinyLatent), (STAND_INS.recorder, RecordLatent)):
        monkeypatch.setitem(registry, node_id, cls)
    return recorded


# ---------------------------------------------------------------------------------------------------------
# Running a prompt


def run_prompt(prompt: dict, prompt_id: str,
               recorded: dict) -> tuple[dict[str, torch.Tensor], RecordingServer]:
    """Validate and execute ``prompt`` as main.prompt_worker does; return the recorded latents and the
    executor's messages."""
    import execution

    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    assert valid, f"ComfyUI rejected the prompt: {error}\n{json.dumps(node_errors, indent=1, default=str)}"
    server = RecordingServer()
    executor = harness.prompt_executor(server)
    recorded.clear()
    executor.execute(prompt, prompt_id, extra_data={"client_id": "guiders-tests"}, execute_outputs=outputs)
    failures = [f"{e['node_type']} (node {e['node_id']}): {e['exception_message']}\n{''.join(e['traceback'])}"
                for e in server.errors()]
    assert executor.success, "execution failed:\n" + "\n".join(failures)
    return dict(recorded), server


def tiny_prompt(workflow: dict, registry: dict, family: str) -> dict:
    return wc.with_tiny_models(wc.graph_to_prompt(workflow, registry), registry, family, STAND_INS)


def with_guiders_bypassed(workflow: dict, registry: dict) -> dict:
    """The workflow with every Guiders node that maps a MODEL to a MODEL set to bypass (mode 4)."""
    copy = json.loads(json.dumps(workflow))
    for node in copy["nodes"]:
        class_def = registry.get(node["type"])
        if node["type"].startswith(GUIDERS_PREFIX) and wc.output_types(class_def) == ["MODEL"]:
            if any(spec.type == "MODEL" for spec in wc.sockets_of(class_def)):
                node["mode"] = wc.MODE_BYPASSED
    return copy


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / (b.abs().mean() + 1e-12))


# ---------------------------------------------------------------------------------------------------------
# The folder


def test_the_folder_ships_one_workflow_per_family(registry: dict) -> None:
    families = {}
    for path in WORKFLOW_FILES:
        prompt = wc.graph_to_prompt(wc.load_workflow(path), registry)
        families.setdefault(wc.detect_family(prompt), []).append(path.name)
    assert set(families) == {"sd15", "sdxl", "sd3", "flux", "wan", "ltxv", "hunyuan_video"}, families


def test_the_readme_has_a_line_for_every_workflow() -> None:
    readme = (WORKFLOWS_DIR / "README.md").read_text(encoding="utf-8")
    missing = [path.name for path in WORKFLOW_FILES if path.name not in readme]
    assert not missing, f"workflows/README.md does not mention {missing}"


def _import_custom_node_manager(host: Path) -> type:
    """app.custom_node_manager imports ``utils.json_util`` from ComfyUI's utils/ package. main.py imports that
    package before nodes.py puts comfy/ (which has a utils.py) at the front of sys.path; in this process the
    bare name "utils" may already be comfy/utils.py. Import it as main.py would, then put "utils" back."""
    def is_utils(name: str) -> bool:
        return name == "utils" or name.startswith("utils.")

    saved = {name: module for name, module in sys.modules.items() if is_utils(name)}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(host))
    try:
        from app.custom_node_manager import CustomNodeManager
    finally:
        sys.path.remove(str(host))
        for name in [name for name in sys.modules if is_utils(name)]:
            del sys.modules[name]
        sys.modules.update(saved)
    return CustomNodeManager


def test_the_template_browser_lists_and_serves_every_workflow(tmp_path: Path, monkeypatch) -> None:
    # What the frontend's template browser asks the server: GET /workflow_templates, then the files under
    # /api/workflow_templates/<pack module>/. Here the pack is installed as custom_nodes/ComfyUI-Guiders.
    import folder_paths
    import harness
    from aiohttp import web

    CustomNodeManager = _import_custom_node_manager(harness.host_path())

    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / "ComfyUI-Guiders").symlink_to(REPO_ROOT, target_is_directory=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "custom_nodes", ([str(custom_nodes)], set()))
    routes, app = web.RouteTableDef(), web.Application()
    CustomNodeManager().add_routes(routes, app, [("ComfyUI-Guiders", str(custom_nodes / "ComfyUI-Guiders"))])

    handler = next(route.handler for route in routes if getattr(route, "path", None) == "/workflow_templates")
    listed = json.loads(asyncio.run(handler(None)).body)
    served = {resource.canonical: Path(resource.get_info()["directory"]).resolve()
              for resource in app.router.resources() if isinstance(resource, web.StaticResource)}

    assert sorted(listed.get("ComfyUI-Guiders", [])) == sorted(WORKFLOW_IDS)
    assert served.get("/api/workflow_templates/ComfyUI-Guiders") == WORKFLOWS_DIR.resolve()


# ---------------------------------------------------------------------------------------------------------
# Each workflow


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=WORKFLOW_IDS)
def test_workflow_is_sound(path: Path, registry: dict) -> None:
    workflow = wc.load_workflow(path)

    problems = wc.check_workflow(workflow, registry)

    assert not problems, f"{path.name}:\n- " + "\n- ".join(problems)
    notes = [node for node in workflow["nodes"] if node["type"] in ("Note", "MarkdownNote")]
    texts = [text for note in notes for text in note["widgets_values"]]
    assert notes and all(isinstance(text, str) and text.strip() for text in texts), \
        f"{path.name} needs a note saying what it shows and the recommended values"
    assert any(node["type"].startswith(GUIDERS_PREFIX) for node in workflow["nodes"]), path.name


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=WORKFLOW_IDS)
def test_workflow_runs_end_to_end(path: Path, registry: dict, recorded_latents: dict) -> None:
    workflow = wc.load_workflow(path)
    assert not wc.check_workflow(workflow, registry), "see test_workflow_is_sound"
    family = wc.detect_family(wc.graph_to_prompt(workflow, registry))
    prompt = tiny_prompt(workflow, registry, family)
    guiders_ids = wc.node_ids_of_types(prompt, [GUIDERS_PREFIX])
    recorder_ids = wc.node_ids_of_types(prompt, [STAND_INS.recorder])
    assert guiders_ids and recorder_ids, f"nothing to test in {path.name}: {prompt}"

    latents, server = run_prompt(prompt, f"test-{path.stem}", recorded_latents)

    not_run = sorted(set(guiders_ids) - server.executed_node_ids())
    assert not not_run, f"Guiders nodes {[(i, prompt[i]['class_type']) for i in not_run]} did not execute"
    assert sorted(latents) == sorted(recorder_ids), "a sampler's latent was not recorded"
    for node_id, latent in latents.items():
        upstream = wc.ancestors(prompt, node_id)
        empty_latent = next(i for i in upstream if prompt[i]["class_type"] == STAND_INS.latent)
        expected_shape = latent_shape(family, prompt[empty_latent]["inputs"]["batch_size"])
        assert tuple(latent.shape) == expected_shape, f"node {node_id}: shape {tuple(latent.shape)}"
        assert torch.isfinite(latent).all(), f"node {node_id}: the sampled latent is not finite"
        assert latent.std() > 1e-3, f"node {node_id}: the sampled latent is constant"

    # The same seeds with the Guiders MODEL nodes bypassed: the guidance must be what changed the result.
    bypassed = tiny_prompt(with_guiders_bypassed(workflow, registry), registry, family)
    plain_latents, _ = run_prompt(bypassed, f"test-{path.stem}-bypassed", recorded_latents)
    for node_id, latent in latents.items():
        upstream = wc.ancestors(prompt, node_id)
        guided = any(prompt[i]["class_type"].startswith(GUIDERS_PREFIX) for i in upstream)
        difference = relative_difference(latent, plain_latents[node_id])
        if guided:
            assert difference > 1e-3, f"node {node_id}: bypassing its Guiders nodes changed {difference:.1e}"
        else:
            assert torch.equal(latent, plain_latents[node_id]), f"node {node_id}: no Guiders node yet changed"


# ---------------------------------------------------------------------------------------------------------
# The converter against the frontend's rules, on edited copies of a shipped workflow


def _sd15() -> tuple[dict, dict[str, dict]]:
    workflow = wc.load_workflow(WORKFLOWS_DIR / "sd15_pag_seg.json")
    first_of_type = {}
    for node in workflow["nodes"]:
        first_of_type.setdefault(node["type"], node)
    return workflow, first_of_type


def test_convert_maps_widgets_by_name_and_skips_the_seed_control_value(registry: dict) -> None:
    workflow, node = _sd15()
    seed, control, steps, cfg, sampler, scheduler, denoise = node["KSampler"]["widgets_values"]

    prompt = wc.graph_to_prompt(workflow, registry)

    inputs = prompt[str(node["KSampler"]["id"])]["inputs"]
    assert control in wc.CONTROL_VALUES
    assert {k: inputs[k] for k in ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise")} == {
        "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
        "denoise": denoise}
    assert inputs["model"] == [str(node["GuidersSEG"]["id"]), 0]
    assert not any(entry["class_type"] in wc.FRONTEND_ONLY_TYPES for entry in prompt.values())
    assert all(set(entry) == {"class_type", "inputs", "_meta"} for entry in prompt.values())


def test_convert_rewires_bypassed_nodes_and_drops_inputs_from_muted_ones(registry: dict) -> None:
    workflow, node = _sd15()
    pag, seg, ksampler = node["GuidersPAG"], node["GuidersSEG"], node["KSampler"]

    pag["mode"] = wc.MODE_BYPASSED
    bypassed = wc.graph_to_prompt(workflow, registry)
    seg["mode"] = wc.MODE_MUTED
    muted = wc.graph_to_prompt(workflow, registry)

    assert str(pag["id"]) not in bypassed
    assert bypassed[str(seg["id"])]["inputs"]["model"] == [str(node["CheckpointLoaderSimple"]["id"]), 0]
    assert str(seg["id"]) not in muted and "model" not in muted[str(ksampler["id"])]["inputs"]


def test_convert_follows_reroutes_and_applies_primitive_values(registry: dict) -> None:
    workflow, node = _sd15()
    ksampler, seg = node["KSampler"], node["GuidersSEG"]
    # Put a Reroute on the SEG -> KSampler model link, and drive the seed from a PrimitiveNode.
    model_link = next(link for link in workflow["links"] if link[3] == ksampler["id"] and link[5] == "MODEL")
    reroute_id, primitive_id = workflow["last_node_id"] + 1, workflow["last_node_id"] + 2
    in_link, seed_link = workflow["last_link_id"] + 1, workflow["last_link_id"] + 2
    workflow["nodes"] += [
        {"id": reroute_id, "type": "Reroute", "mode": 0,
         "inputs": [{"name": "", "type": "*", "link": in_link}],
         "outputs": [{"name": "", "type": "MODEL", "links": [model_link[0]]}], "properties": {}},
        {"id": primitive_id, "type": "PrimitiveNode", "mode": 0, "inputs": [],
         "outputs": [{"name": "INT", "type": "INT", "widget": {"name": "seed"}, "links": [seed_link]}],
         "widgets_values": [987654, "fixed"], "properties": {}},
    ]
    seg["outputs"][0]["links"] = [in_link]
    ksampler["inputs"].append({"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": seed_link})
    workflow["links"] = [link for link in workflow["links"] if link[0] != model_link[0]] + [
        [model_link[0], reroute_id, 0, ksampler["id"], model_link[4], "MODEL"],
        [in_link, seg["id"], 0, reroute_id, 0, "MODEL"],
        [seed_link, primitive_id, 0, ksampler["id"], len(ksampler["inputs"]) - 1, "INT"],
    ]
    workflow["last_node_id"], workflow["last_link_id"] = primitive_id, seed_link
    assert not wc.check_workflow(workflow, registry)

    prompt = wc.graph_to_prompt(workflow, registry)

    inputs = prompt[str(ksampler["id"])]["inputs"]
    assert inputs["model"] == [str(seg["id"]), 0]
    assert inputs["seed"] == 987654
    assert str(reroute_id) not in prompt and str(primitive_id) not in prompt


def test_check_reports_widget_values_that_do_not_fit_the_node(registry: dict) -> None:
    workflow, node = _sd15()
    node["GuidersPAG"]["widgets_values"] = node["GuidersPAG"]["widgets_values"][:-1]
    node["KSampler"]["widgets_values"][4] = "no_such_sampler"

    problems = wc.check_workflow(workflow, registry)

    assert any("GuidersPAG" in problem and "widgets_values" in problem for problem in problems), problems
    assert any("no_such_sampler" in problem for problem in problems), problems


def test_check_accepts_what_a_later_comfyui_appended_to_a_host_node_and_nothing_else(registry: dict) -> None:
    # A save from an older ComfyUI lacks a host node's later trailing widgets and outputs; the frontend fills
    # them in on load (defaults, new slots), so both hosts' checks accept it. Catches: the tolerance applied to
    # our own nodes too, to a value missing from the middle (too many values), or to outputs that differ.
    workflow, node = _sd15()
    ksampler = node["KSampler"]
    ksampler["widgets_values"] = ksampler["widgets_values"][:-1]  # denoise, the last widget: its default
    assert not wc.check_workflow(workflow, registry)
    assert wc.graph_to_prompt(workflow, registry)[str(ksampler["id"])]["inputs"]["denoise"] == 1.0

    ksampler["widgets_values"] = [*ksampler["widgets_values"], 1.0, "extra"]
    assert any("KSampler" in p and "widgets_values" in p for p in wc.check_workflow(workflow, registry))

    workflow, node = _sd15()
    node["GuidersPAG"]["outputs"] = []
    assert any("GuidersPAG" in p and "outputs" in p for p in wc.check_workflow(workflow, registry))
    workflow, node = _sd15()
    node["KSampler"]["outputs"][0]["type"] = "IMAGE"
    assert any("KSampler" in p and "outputs" in p for p in wc.check_workflow(workflow, registry))


def test_a_dynamic_combo_takes_its_chosen_options_widgets() -> None:
    # SaveVideo's ``format`` on ComfyUI 0.33.0: a V3 dynamic combo whose chosen option adds ``format.codec``
    # after it. Catches: the combo taken for a socket (0.8.0 saves then "lack" it), or the nested widget not
    # read from the value that follows.
    class SaveLike:
        @classmethod
        def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's name)
            codec = {"required": {"codec": (["auto", "h264"], {})}}
            return {"required": {"prefix": ("STRING", {"default": "v"}),
                                 "format": (wc.DYNAMIC_COMBO, {"options": [{"key": "auto", "inputs": codec},
                                                                           {"key": "mp4", "inputs": codec}]})},
                    "optional": {"codec": (wc.DYNAMIC_COMBO, {"hidden": True, "options": []})}}

    node = {"id": 1, "type": "SaveLike", "widgets_values": ["v", "mp4", "h264"]}
    assert wc.widget_values(node, SaveLike) == {"prefix": "v", "format": "mp4", "format.codec": "h264"}
    assert [w.name for w in wc.widgets_of(SaveLike)] == ["prefix", "format"]
    assert wc.sockets_of(SaveLike) == []


def test_the_tiny_sdxl_is_an_sdxl_that_samples(model_of: Callable) -> None:
    import harness

    model = model_of("sdxl")
    positive, negative = tiny_conditioning("sdxl")
    latent = torch.zeros(latent_shape("sdxl", 1))

    out = harness.sample(model, positive, negative, latent, cfg=5.0, steps=3)

    assert type(model.model).__name__ == "SDXL"
    assert math.isclose(float(harness.scheduler_sigmas(model, steps=3)[0]), 14.6146, rel_tol=1e-4)
    assert out.shape == latent.shape and torch.isfinite(out).all() and out.std() > 1e-3
