"""Workflows as the ComfyUI frontend saves them, checked and turned into the prompt it would queue.

A saved workflow is LiteGraph JSON (``version`` 0.4): ``nodes`` (id, type, mode, socket ``inputs`` with a
``link``, ``outputs`` with their ``links``, ``widgets_values``) and ``links`` ``[id, from_node, from_slot,
to_node, to_slot, type]``. ``widgets_values`` holds one value per widget input, in the order of the
node's ``INPUT_TYPES()`` (required, then optional), plus the values of frontend-only widgets that the
frontend (1.35) adds after some widgets: the "control_after_generate" combo after an INT or FLOAT with
``control_after_generate`` and after any INT named ``seed``/``noise_seed`` (``useIntWidget``); that combo
and a filter-list string after a COMBO with ``control_after_generate``; the upload button after a combo
with ``image_upload``/``video_upload``/``audio_upload``.

The shipped workflows are saved from ComfyUI 0.8.0 and must load on later hosts too (0.33.0): a host node
may since have gained trailing widgets (CreateVideo's ``bit_depth``), outputs (SaveImage's ``images``) or V3
dynamic combos (SaveVideo's ``format`` with its nested ``codec``). The checks accept exactly what the frontend
fills in when it loads an older save (new widgets at their defaults, new output slots); the pack's own nodes
must match the running host's definition exactly.

``graph_to_prompt`` follows the frontend's ``graphToPrompt``: frontend-only nodes (Note, MarkdownNote,
Reroute, PrimitiveNode) and muted (mode 2) or bypassed (mode 4) nodes are left out; a PrimitiveNode first
writes its value into the widgets it drives (``applyToGraph``); a link from a Reroute is followed to its
source; a link from a bypassed node is rewired to that node's input of the same type (the input at the
link's slot first, then the others in order); inputs that end at a node left out are dropped.

The second half is test-only: ``with_tiny_models`` replaces the parts of a prompt that need model files
(loaders, text encoders, empty latents, VAE decoding and what follows it) by stand-in nodes, so the rest
of the workflow, every guidance node included, runs unchanged on tiny random-weight models.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FRONTEND_ONLY_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
MODE_MUTED = 2  # LGraphEventMode.NEVER
MODE_BYPASSED = 4  # LGraphEventMode.BYPASS
# A V3 dynamic combo (ComfyUI after 0.8.0: SaveVideo's ``format``): a combo over its options' keys; the chosen
# option's own inputs follow it as widgets named ``<combo>.<input>`` (comfy_api's finalize_prefix).
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO})
# The node types whose saved form must match this host's definition exactly: the pack's own, the same on
# every host. A host node may have gained trailing widgets or outputs in a later ComfyUI; the frontend fills
# those in when it loads an older save (widget defaults, new output slots), and so do the checks here.
OWN_PREFIX = "Guiders"
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload")
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")

Registry = Mapping[str, type]
Prompt = dict[str, dict]


class WorkflowError(ValueError):
    """The workflow cannot be read, checked or converted; the message names the node and what is wrong."""


# ---------------------------------------------------------------------------------------------------------
# What the frontend builds from a node's definition


@dataclass(frozen=True)
class DeclaredInput:
    name: str
    type: str  # "COMBO" for a list of options
    options: dict
    optional: bool
    choices: tuple | None  # a combo's options

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def frontend_extra_values(self) -> int:
        """How many values of frontend-only widgets follow this widget's value in widgets_values."""
        control = self.options.get("control_after_generate")
        if self.type == "INT" and control is None:
            control = self.name in ("seed", "noise_seed")
        if self.type in ("INT", "FLOAT") and control:
            return 1
        if self.type == "COMBO":
            return (2 if control else 0) + sum(1 for key in UPLOAD_OPTIONS if self.options.get(key))
        return 0

    @property
    def default(self) -> Any:
        """The value of a freshly added widget: its default, else a combo's first option."""
        if "default" in self.options:
            return self.options["default"]
        return self.choices[0] if self.choices else None


def declared_inputs(class_def: type) -> list[DeclaredInput]:
    """The node's inputs in the order the frontend creates them: required, then optional (hidden skipped)."""
    return _inputs_of(class_def.INPUT_TYPES())


def _inputs_of(declared: dict, prefix: str = "") -> list[DeclaredInput]:
    inputs = []
    for section in ("required", "optional"):
        for name, spec in declared.get(section, {}).items():
            kind, options = spec[0], dict(spec[1]) if len(spec) > 1 and spec[1] else {}
            if options.get("hidden"):  # a dynamic combo's nested input, also listed at the top level
                continue
            choices = None
            if isinstance(kind, (list, tuple)):
                kind, choices = "COMBO", tuple(kind)
            elif kind == "COMBO":
                choices = tuple(options.get("options", ()))
            elif kind == DYNAMIC_COMBO:
                choices = tuple(option["key"] for option in options.get("options", ()))
            inputs.append(DeclaredInput(prefix + str(name), str(kind), options, section == "optional", choices))
    return inputs


def nested_widgets(widget: DeclaredInput, value: Any) -> list[DeclaredInput]:
    """The widgets a dynamic combo's chosen option adds after it (none for any other widget)."""
    if widget.type != DYNAMIC_COMBO:
        return []
    for option in widget.options.get("options", ()):
        if option["key"] == value:
            return [spec for spec in _inputs_of(option.get("inputs") or {}, prefix=widget.name + ".")
                    if spec.is_widget]
    return []


def widgets_of(class_def: type) -> list[DeclaredInput]:
    return [spec for spec in declared_inputs(class_def) if spec.is_widget]


def sockets_of(class_def: type) -> list[DeclaredInput]:
    return [spec for spec in declared_inputs(class_def) if not spec.is_widget]


def output_types(class_def: type) -> list[str]:
    return [str(kind) for kind in class_def.RETURN_TYPES]


def output_names(class_def: type) -> list[str]:
    names = getattr(class_def, "RETURN_NAMES", None)
    return [str(name) for name in names] if names else output_types(class_def)


# ---------------------------------------------------------------------------------------------------------
# Reading and checking a saved workflow


def load_workflow(path: Path) -> dict:
    workflow = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(workflow, dict) or workflow.get("version") != 0.4:
        raise WorkflowError(f"{path}: not a LiteGraph workflow of version 0.4 (what the frontend saves)")
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowError(f"{path}: subgraphs are not supported by this converter")
    return workflow


def _nodes_by_id(workflow: dict) -> dict[int, dict]:
    return {node["id"]: node for node in workflow["nodes"]}


def _links_by_id(workflow: dict) -> dict[int, list]:
    return {link[0]: link for link in workflow["links"]}


def _label(node: dict) -> str:
    return f"node {node['id']} ({node['type']})"


def widget_values(node: dict, class_def: type, strict: bool = True) -> dict[str, Any]:
    """Map ``widgets_values`` to widget input names, skipping the frontend-only values.

    strict: the number of values must be exactly what the node's definition gives (a workflow saved by
    the frontend for this version of the node). Otherwise, as the frontend does when it loads an older
    save, missing trailing values take the widget's default.
    """
    values = node.get("widgets_values") or []
    if not isinstance(values, list):
        raise WorkflowError(f"{_label(node)}: widgets_values is not a list")
    mapped: dict[str, Any] = {}
    layout = []
    pending, position = list(widgets_of(class_def)), 0
    while pending:
        widget = pending.pop(0)
        mapped[widget.name] = values[position] if position < len(values) else widget.default
        layout.append(widget.name + " +control" * widget.frontend_extra_values)
        position += 1 + widget.frontend_extra_values
        pending[:0] = nested_widgets(widget, mapped[widget.name])
    # An older save of a host node may lack the widgets a later ComfyUI appended (they take their defaults,
    # as when the frontend loads it); more values than widgets, or fewer for a node of ours, is a wrong save.
    too_few = len(values) < position and node["type"].startswith(OWN_PREFIX)
    if strict and (len(values) > position or too_few):
        raise WorkflowError(f"{_label(node)}: {len(values)} widgets_values {values} but the node's widgets "
                            f"are {layout} ({position} values); re-save the workflow with this version "
                            "of the node")
    return mapped


def check_workflow(workflow: dict, registry: Registry) -> list[str]:
    """Everything that would make the frontend load this workflow wrongly or the server reject it.

    Returns the problems found (empty when the workflow is sound): unknown node types, links that do
    not match both of their ends, sockets and outputs that differ from the node's definition, required
    sockets left unconnected, widget values that do not fit the widgets.
    """
    problems: list[str] = []
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"):
        if key not in workflow:
            problems.append(f"missing top-level key {key!r}")
    nodes, links = _nodes_by_id(workflow), _links_by_id(workflow)
    if len(nodes) != len(workflow["nodes"]):
        problems.append("node ids are not unique")
    if len(links) != len(workflow["links"]):
        problems.append("link ids are not unique")
    if nodes and workflow.get("last_node_id", 0) < max(nodes):
        problems.append(f"last_node_id {workflow.get('last_node_id')} is below the highest node id")
    if links and workflow.get("last_link_id", 0) < max(links):
        problems.append(f"last_link_id {workflow.get('last_link_id')} is below the highest link id")

    for link in workflow["links"]:
        problems += _link_problems(link, nodes)
    for node in workflow["nodes"]:
        for slot, socket in enumerate(node.get("inputs") or []):
            link_id = socket.get("link")
            if link_id is not None and (link_id not in links or links[link_id][3:5] != [node["id"], slot]):
                problems.append(f"{_label(node)} input {socket['name']!r}: link {link_id} does not end there")
        for slot, output in enumerate(node.get("outputs") or []):
            for link_id in output.get("links") or []:
                if link_id not in links or links[link_id][1:3] != [node["id"], slot]:
                    problems.append(f"{_label(node)} output {output['name']!r}: link {link_id} does not "
                                    "start there")
        if node["type"] in FRONTEND_ONLY_TYPES:
            continue
        class_def = registry.get(node["type"])
        if class_def is None:
            problems.append(f"{_label(node)}: no such node type is registered")
            continue
        problems += _node_problems(node, class_def)
    return problems


def _link_problems(link: list, nodes: dict[int, dict]) -> list[str]:
    link_id, from_id, from_slot, to_id, to_slot, link_type = link
    if from_id not in nodes or to_id not in nodes:
        return [f"link {link_id} joins missing nodes {from_id} -> {to_id}"]
    outputs, inputs = nodes[from_id].get("outputs") or [], nodes[to_id].get("inputs") or []
    if from_slot >= len(outputs) or to_slot >= len(inputs):
        return [f"link {link_id}: output {from_slot} of node {from_id} or input {to_slot} of node {to_id} "
                "does not exist"]
    problems = []
    if link_id not in (outputs[from_slot].get("links") or []):
        problems.append(f"link {link_id} is missing from the links of node {from_id} output {from_slot}")
    if inputs[to_slot].get("link") != link_id:
        problems.append(f"link {link_id} is not the link of node {to_id} input {to_slot}")
    from_type, to_type = outputs[from_slot].get("type"), inputs[to_slot].get("type")
    if "*" not in (from_type, to_type) and {from_type, to_type} != {link_type}:
        problems.append(f"link {link_id} has type {link_type} but joins {from_type} to {to_type}")
    return problems


def _node_problems(node: dict, class_def: type) -> list[str]:
    label, problems = _label(node), []
    if (node.get("properties") or {}).get("Node name for S&R") != node["type"]:
        problems.append(f"{label}: properties['Node name for S&R'] is not {node['type']!r}")
    inputs = node.get("inputs") or []
    by_name = {socket["name"]: socket for socket in inputs}
    declared = {spec.name: spec for spec in declared_inputs(class_def)}
    for spec in sockets_of(class_def):
        socket = by_name.get(spec.name)
        if socket is None:
            problems.append(f"{label}: the socket {spec.name!r} ({spec.type}) is missing from inputs")
        elif socket.get("type") != spec.type:
            problems.append(f"{label}: input {spec.name!r} is {socket.get('type')}, not {spec.type}")
        elif socket.get("link") is None and not spec.optional and node.get("mode", 0) == 0:
            problems.append(f"{label}: the required input {spec.name!r} is not connected")
    for socket in inputs:
        spec = declared.get(socket["name"])
        if spec is None:
            problems.append(f"{label}: input {socket['name']!r} is not declared by the node")
        elif spec.is_widget and (socket.get("widget") or {}).get("name") != spec.name:
            problems.append(f"{label}: input {socket['name']!r} is a widget input but lacks widget.name")
    saved_outputs = [(output.get("name"), output.get("type")) for output in node.get("outputs") or []]
    declared_outputs = list(zip(output_names(class_def), output_types(class_def), strict=True))
    # A host node may have gained outputs after the ComfyUI the workflow was saved with (SaveImage's
    # ``images``): the frontend adds their slots on load. Ours, and the outputs a save has, must match.
    appended = not node["type"].startswith(OWN_PREFIX) and saved_outputs == declared_outputs[:len(saved_outputs)]
    if saved_outputs != declared_outputs and not appended:
        problems.append(f"{label}: outputs {saved_outputs} differ from the node's {declared_outputs}")
    try:
        values = widget_values(node, class_def, strict=True)
    except WorkflowError as error:
        return [*problems, str(error)]
    raw, position = node.get("widgets_values") or [], 0
    pending = list(widgets_of(class_def))
    while pending:
        widget = pending.pop(0)
        value, extras = values[widget.name], raw[position + 1: position + 1 + widget.frontend_extra_values]
        position += 1 + widget.frontend_extra_values
        pending[:0] = nested_widgets(widget, value)
        if widget.type in ("INT", "FLOAT") and extras and extras[0] not in CONTROL_VALUES:
            problems.append(f"{label}: {widget.name}'s control_after_generate value {extras[0]!r} is not "
                            f"one of {CONTROL_VALUES}")
        user_file = isinstance(value, str) and value.endswith(MODEL_FILE_SUFFIXES)  # the user's own models
        if widget.type in ("COMBO", DYNAMIC_COMBO) and widget.choices and value not in widget.choices \
                and not user_file:
            problems.append(f"{label}: {widget.name}={value!r} is not one of {list(widget.choices)}")
    return problems


# ---------------------------------------------------------------------------------------------------------
# graphToPrompt


def graph_to_prompt(workflow: dict, registry: Registry, strict: bool = True) -> Prompt:
    """The API prompt ``{node_id: {"class_type", "inputs", "_meta"}}`` the frontend would queue."""
    nodes, links = _nodes_by_id(workflow), _links_by_id(workflow)
    primitive_values = _primitive_widget_values(workflow, nodes, links)
    prompt: Prompt = {}
    for node in sorted(workflow["nodes"], key=lambda n: (n.get("order", 0), n["id"])):
        if node["type"] in FRONTEND_ONLY_TYPES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
            continue
        class_def = registry.get(node["type"])
        if class_def is None:
            raise WorkflowError(f"{_label(node)}: no such node type is registered")
        inputs: dict[str, Any] = widget_values(node, class_def, strict=strict)
        inputs.update(primitive_values.get(node["id"], {}))
        for socket in node.get("inputs") or []:
            if socket.get("link") is None:
                continue
            source = _resolve_source(links[socket["link"]], socket.get("type"), nodes, links)
            if source is not None:
                inputs[socket["name"]] = [str(source[0]), source[1]]
        title = node.get("title") or getattr(class_def, "DISPLAY_NAME", None) or node["type"]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": title}}
    for entry in prompt.values():  # inputs that end at a node left out (muted, or a bypass without a match)
        for name, value in list(entry["inputs"].items()):
            if is_link(value) and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


def _primitive_widget_values(workflow: dict, nodes: dict, links: dict) -> dict[int, dict[str, Any]]:
    """PrimitiveNode.applyToGraph: each active primitive writes its value into the widgets it drives."""
    written: dict[int, dict[str, Any]] = {}
    for node in workflow["nodes"]:
        if node["type"] != "PrimitiveNode" or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
            continue
        value = (node.get("widgets_values") or [None])[0]
        for output in node.get("outputs") or []:
            for link_id in output.get("links") or []:
                _, _, _, target_id, target_slot, _ = links[link_id]
                widget = (nodes[target_id]["inputs"][target_slot].get("widget") or {}).get("name")
                if widget is None:
                    raise WorkflowError(f"{_label(node)} drives input {target_slot} of "
                                        f"{_label(nodes[target_id])}, which is not a widget")
                written.setdefault(target_id, {})[widget] = value
    return written


def _resolve_source(link: list, wanted_type: str | None, nodes: dict, links: dict) -> tuple[int, int] | None:
    """Follow a link upstream through Reroutes and bypassed nodes, as graphToPrompt does."""
    _, origin_id, origin_slot, _, _, _ = link
    seen = set()
    while True:
        parent = nodes[origin_id]
        if parent["id"] in seen:
            raise WorkflowError(f"a cycle of reroutes or bypassed nodes through {_label(parent)}")
        seen.add(parent["id"])
        if parent["type"] == "PrimitiveNode":
            return None  # its value reached the widget through _primitive_widget_values
        if parent["type"] == "Reroute":
            upstream = (parent.get("inputs") or [{}])[0].get("link")
        elif parent.get("mode", 0) == MODE_BYPASSED:
            parent_inputs = parent.get("inputs") or []
            candidates = [origin_slot, *range(len(parent_inputs))]
            match = next((i for i in candidates
                          if i < len(parent_inputs) and parent_inputs[i].get("type") == wanted_type), None)
            if match is None:
                return (origin_id, origin_slot)  # dropped later: a bypassed node is not in the prompt
            upstream = parent_inputs[match].get("link")
        else:
            return (origin_id, origin_slot)
        if upstream is None:
            return None
        _, origin_id, origin_slot, _, _, _ = links[upstream]


def is_link(value: Any) -> bool:
    """An API prompt input that names another node's output: ``[node_id, output_slot]``."""
    return (isinstance(value, list) and len(value) == 2
            and isinstance(value[0], str) and isinstance(value[1], int))


def ancestors(prompt: Mapping[str, dict], node_id: str) -> set[str]:
    """Every node whose output ``node_id`` depends on."""
    found, frontier = set(), [node_id]
    while frontier:
        for value in prompt[frontier.pop()]["inputs"].values():
            if is_link(value) and value[0] not in found and value[0] in prompt:
                found.add(value[0])
                frontier.append(value[0])
    return found


def node_ids_of_types(prompt: Mapping[str, dict], prefixes: Iterable[str]) -> list[str]:
    prefixes = tuple(prefixes)
    return [node_id for node_id, entry in prompt.items() if entry["class_type"].startswith(prefixes)]


# ---------------------------------------------------------------------------------------------------------
# Test only: tiny models in place of model files


MODEL_LOADERS = frozenset({"CheckpointLoaderSimple", "CheckpointLoader", "UNETLoader",
                           "ImageOnlyCheckpointLoader", "unCLIPCheckpointLoader"})
# The model family a checkpoint or diffusion-model file name names. First match wins: "sd3" before "sdxl".
FAMILY_PATTERNS = (
    ("hunyuan_video", re.compile(r"hunyuan[_-]?video", re.IGNORECASE)),
    ("ltxv", re.compile(r"ltx[-_]?v", re.IGNORECASE)),  # ltx-video-2b-v0.9.5, ltxv-2b-0.9.8 (not LTX-2: ltx-2-*)
    ("wan", re.compile(r"wan2?[._]?[12]|\bwan[_-]", re.IGNORECASE)),
    ("flux", re.compile(r"flux", re.IGNORECASE)),
    ("sd3", re.compile(r"sd3", re.IGNORECASE)),
    ("sdxl", re.compile(r"sd_?xl", re.IGNORECASE)),
    ("sd15", re.compile(r"v1-5|sd_?1\.?5", re.IGNORECASE)),
)


@dataclass(frozen=True)
class StandIns:
    """Node ids of the test-only nodes ``with_tiny_models`` puts in the prompt.

    model(family) -> MODEL; conditioning(family, role) -> CONDITIONING; latent(family, batch_size) ->
    LATENT; recorder(samples: LATENT) is an output node that keeps the sampled latent.
    """

    model: str
    conditioning: str
    latent: str
    recorder: str


def model_files(prompt: Mapping[str, dict]) -> list[str]:
    """The checkpoint / diffusion-model file names the prompt's model loaders load."""
    return [value for entry in prompt.values() if entry["class_type"] in MODEL_LOADERS
            for key, value in entry["inputs"].items() if key.endswith("_name") and isinstance(value, str)]


def detect_family(prompt: Mapping[str, dict]) -> str:
    """The model family of a workflow, from the file names its model loaders load."""
    files = model_files(prompt)
    families = {next((family for family, pattern in FAMILY_PATTERNS if pattern.search(name)), None)
                for name in files}
    if not files or None in families or len(families) != 1:
        raise WorkflowError(f"cannot tell the model family from the model files {files}: expected one of "
                            f"{[family for family, _ in FAMILY_PATTERNS]}")
    return families.pop()


def _consumers(prompt: Mapping[str, dict], node_id: str) -> list[tuple[str, str]]:
    return [(consumer_id, name) for consumer_id, entry in prompt.items()
            for name, value in entry["inputs"].items() if is_link(value) and value[0] == node_id]


def conditioning_role(prompt: Mapping[str, dict], node_id: str, registry: Registry) -> str:
    """"positive" if the node's conditioning reaches a ``positive`` input (also through conditioning-to-
    conditioning nodes such as FluxGuidance), else "negative" if it reaches a ``negative`` one."""
    roles, frontier, seen = set(), [node_id], {node_id}
    while frontier:
        for consumer_id, input_name in _consumers(prompt, frontier.pop()):
            if input_name in ("positive", "negative"):
                roles.add(input_name)
            elif consumer_id not in seen:
                if "CONDITIONING" in output_types(registry[prompt[consumer_id]["class_type"]]):
                    seen.add(consumer_id)
                    frontier.append(consumer_id)
    return "positive" if "positive" in roles or not roles else "negative"


def with_tiny_models(prompt: Mapping[str, dict], registry: Registry, family: str,
                     stand_ins: StandIns) -> Prompt:
    """A copy of ``prompt`` that runs without model files; every other node keeps its inputs.

    - model loaders -> ``stand_ins.model`` (only their MODEL output may still be used);
    - model-only LoRA loaders -> taken out, their consumers wired to the model they were given;
    - text encoders (a CLIP input, a CONDITIONING output) -> ``stand_ins.conditioning`` with the role
      their conditioning plays (positive / negative);
    - ``Empty*Latent*`` nodes -> ``stand_ins.latent`` with the same batch size;
    - VAE decoders (LATENT and VAE in, IMAGE out) -> ``stand_ins.recorder`` on the same latent, keeping
      the decoder's node id; what consumed the images (previews, savers, video makers) is removed;
    - then every node no output depends on (the CLIP and VAE loaders) is removed.
    Raises WorkflowError when a node that stays needs an output the stand-ins do not provide.
    """
    new: Prompt = {node_id: {**entry, "inputs": dict(entry["inputs"])} for node_id, entry in prompt.items()}
    removed: set[str] = set()
    for node_id, entry in prompt.items():
        class_type, class_def = entry["class_type"], registry[entry["class_type"]]
        outputs = output_types(class_def)
        inputs = {spec.type: spec.name for spec in declared_inputs(class_def)}
        if class_type in MODEL_LOADERS:
            new[node_id] = _stand_in(stand_ins.model, entry, family=family)
        elif "CLIP" in inputs and outputs == ["CONDITIONING"]:
            role = conditioning_role(prompt, node_id, registry)
            new[node_id] = _stand_in(stand_ins.conditioning, entry, family=family, role=role)
        elif re.match(r"Empty\w*Latent", class_type) and outputs == ["LATENT"]:
            batch_size = entry["inputs"].get("batch_size", 1)
            new[node_id] = _stand_in(stand_ins.latent, entry, family=family, batch_size=batch_size)
        elif "LATENT" in inputs and "VAE" in inputs and outputs == ["IMAGE"]:
            new[node_id] = _stand_in(stand_ins.recorder, entry, samples=entry["inputs"][inputs["LATENT"]])
            removed |= _downstream(prompt, node_id)

    for node_id in removed:
        new.pop(node_id, None)
    _pass_model_only_loras(new)
    kept = set(output_node_ids(new, registry))
    for node_id in list(kept):
        kept |= ancestors(new, node_id)
    new = {node_id: entry for node_id, entry in new.items() if node_id in kept}
    single_output = (stand_ins.model, stand_ins.conditioning, stand_ins.latent)
    for node_id, entry in new.items():
        for name, value in entry["inputs"].items():
            if not is_link(value):
                continue
            where = f"node {node_id} ({entry['class_type']}) input {name!r}"
            if value[0] not in new:
                raise WorkflowError(f"{where} ends at a removed node")
            if new[value[0]]["class_type"] in single_output and value[1] != 0:
                raise WorkflowError(f"{where} uses output {value[1]} of {prompt[value[0]]['class_type']} "
                                    f"(node {value[0]}), which its tiny stand-in does not provide")
    return new


# Model-only LoRA loaders (a distilled model's LoRA, e.g. DMD2's on SDXL): a tiny model has none of the LoRA's
# keys, so the loader is taken out and its consumers get the model it was given.
MODEL_ONLY_LORA_LOADERS = frozenset({"LoraLoaderModelOnly"})


def _pass_model_only_loras(prompt: Prompt) -> None:
    loras = {node_id: entry["inputs"]["model"] for node_id, entry in prompt.items()
             if entry["class_type"] in MODEL_ONLY_LORA_LOADERS}
    for lora_id in loras:
        source = loras[lora_id]
        while is_link(source) and source[0] in loras:  # chained LoRAs
            source = loras[source[0]]
        for entry in prompt.values():
            for name, value in entry["inputs"].items():
                if is_link(value) and value[0] == lora_id:
                    entry["inputs"][name] = list(source)
    for lora_id in loras:
        del prompt[lora_id]


def _stand_in(class_type: str, original: dict, **inputs: Any) -> dict:
    return {"class_type": class_type, "inputs": inputs,
            "_meta": {"title": f"test stand-in for {original['class_type']}"}}


def _downstream(prompt: Mapping[str, dict], node_id: str) -> set[str]:
    found, frontier = set(), [node_id]
    while frontier:
        for consumer_id, _ in _consumers(prompt, frontier.pop()):
            if consumer_id not in found:
                found.add(consumer_id)
                frontier.append(consumer_id)
    return found


def output_node_ids(prompt: Mapping[str, dict], registry: Registry) -> list[str]:
    return [node_id for node_id, entry in prompt.items()
            if getattr(registry[entry["class_type"]], "OUTPUT_NODE", False) is True]
