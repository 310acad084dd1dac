"""Whole API prompts for one Guiders node, validated and executed as the server's prompt worker does
(``execution.validate_prompt``, then ``execution.PromptExecutor``), on the tiny models.

A prompt is the node under test between test-only stand-ins: the family's tiny model, conditioning and a
16x16 latent, then the sampler that consumes its output (KSampler for a MODEL; ScheduledCFG + KSampler for a
schedule; SamplerCustomAdvanced for a GUIDER) and a node that records the sampled latent. A widget value can
be sent as a literal (what a JSON body to ``/prompt`` gives the node: ComfyUI range-checks it, but a NaN
passes, as ``NaN < min`` is false) or through a link from a stand-in source with no range of its own (what a
primitive or math node wired into the widget gives: ComfyUI does not range-check linked values at all).

Host behaviour relied on (ComfyUI 0.8.0): ``validate_prompt`` returns ``(valid, error, outputs,
node_errors)``; ``PromptExecutor(server, cache_type, cache_args)`` needs from ``server`` only ``client_id``,
``last_node_id`` and ``send_sync``; a node's exception becomes an ``execution_error`` message naming the node
id and the exception's text, and ``executor.success`` is False; with a client id it sends ``executing`` for
each node it runs (a cached node is not run).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from tiny_models import make_conditioning, make_latent, make_ltxav_latent

MODEL_FAMILY = {"GuidersSLG": "sd3"}  # SLG needs a DiT; every other node runs on the tiny SD1.5
MODEL_FAMILY["GuidersModalityGuidance"] = "ltxav"  # LTX-2 only: its (video, audio) latent
LINKABLE = {"FLOAT": "GuidersTestFloat", "INT": "GuidersTestInt", "STRING": "GuidersTestString"}
TESTED = "g"  # the node under test's id in every prompt
SAMPLER = "k"  # the sampler's


@dataclass
class RecordingServer:
    """The part of server.PromptServer the executor talks to; it keeps the messages."""

    client_id: str | None = None
    last_node_id: str | None = None
    messages: list[tuple[str, dict]] = field(default_factory=list)

    def send_sync(self, event: str, data: dict, sid: str | None = None) -> None:
        self.messages.append((event, data))


@dataclass(frozen=True)
class Outcome:
    """How a prompt ended: ``succeeded``, with the ``latent`` when the recorder ran (not when it was cached);
    else the failing node and message (an execution error) or ComfyUI's validation errors (``invalid``);
    ``executed`` is every node id that ran."""

    succeeded: bool = False
    latent: torch.Tensor | None = None
    invalid: dict | None = None
    failed_node: str | None = None
    message: str = ""
    executed: frozenset = frozenset()

    @property
    def error_text(self) -> str:
        """Every word ComfyUI would show the user about the failure."""
        if self.invalid is not None:
            return repr(self.invalid)
        return self.message


def stand_in_nodes(tiny_model: Callable, weak_model_of: Callable, recorded: dict) -> dict[str, type]:
    """The test-only nodes a prompt is built from, to register in nodes.NODE_CLASS_MAPPINGS."""

    def simple(name: str, return_type: str, inputs: dict, run: Callable, output: bool = False) -> type:
        return type(name, (), {"RETURN_TYPES": (return_type,) if return_type else (), "FUNCTION": "run",
                               "CATEGORY": "_for_testing", "OUTPUT_NODE": output,
                               "INPUT_TYPES": classmethod(lambda cls: {"required": inputs}),
                               "run": lambda self, **kw: run(**kw)})

    families = ["sd15", "sd3", "ltxav"]

    def record(samples):
        latent = samples["samples"]
        if getattr(latent, "is_nested", False):  # LTX-2's (video, audio): one flat tensor to compare
            latent = torch.cat([part.flatten() for part in latent.unbind()])
        recorded["latent"] = latent.detach().clone()
        return {}

    return {
        "GuidersTestModel": simple("GuidersTestModel", "MODEL", {"family": (families,), "weak": ("BOOLEAN",)},
                                   lambda family, weak: ((weak_model_of if weak else tiny_model)(family),)),
        "GuidersTestConditioning": simple(
            "GuidersTestConditioning", "CONDITIONING", {"family": (families,), "role": (["positive", "negative"],)},
            lambda family, role: (make_conditioning(family, seed=1)[0 if role == "positive" else 1],)),
        "GuidersTestLatent": simple("GuidersTestLatent", "LATENT", {"family": (families,)},
                                    lambda family: ({"samples": make_ltxav_latent(seed=2) if family == "ltxav"
                                                     else make_latent(family, h=16, w=16, seed=2)},)),
        # Sources with no min/max: whatever they are given reaches the linked widget unchecked.
        "GuidersTestFloat": simple("GuidersTestFloat", "FLOAT", {"value": ("FLOAT", {})}, lambda value: (value,)),
        "GuidersTestInt": simple("GuidersTestInt", "INT", {"value": ("INT", {})}, lambda value: (value,)),
        "GuidersTestString": simple("GuidersTestString", "STRING", {"value": ("STRING", {})},
                                    lambda value: (value,)),
        "GuidersTestRecord": simple("GuidersTestRecord", "", {"samples": ("LATENT",)}, record, output=True),
    }


@contextlib.contextmanager
def registered_stand_ins(tiny_model: Callable, weak_model_of: Callable, recorded: dict):
    """The stand-ins in ComfyUI's node registry while the block runs (a module fixture's lifetime)."""
    import nodes

    with pytest.MonkeyPatch.context() as patch:
        for node_id, cls in stand_in_nodes(tiny_model, weak_model_of, recorded).items():
            patch.setitem(nodes.NODE_CLASS_MAPPINGS, node_id, cls)
        yield nodes.NODE_CLASS_MAPPINGS


def widget_specs(class_def: type) -> dict[str, tuple]:
    """``{name: (type, options)}`` of the node's widget inputs (numbers, texts, combos, booleans)."""
    declared = class_def.INPUT_TYPES()
    specs = {**declared.get("required", {}), **declared.get("optional", {})}
    return {name: (spec[0], spec[1] if len(spec) > 1 else {}) for name, spec in specs.items()
            if spec[0] in ("FLOAT", "INT", "STRING", "BOOLEAN", "COMBO") or isinstance(spec[0], list)}


def node_prompt(node_id: str, class_def: type, values: dict | None = None, linked: frozenset = frozenset()) -> dict:
    """The prompt that runs ``node_id`` with its widget defaults, ``values`` instead where given (sent through
    a link from a stand-in source for the names in ``linked``), and samples with what it outputs."""
    family = MODEL_FAMILY.get(node_id, "sd15")
    prompt = {
        "model": {"class_type": "GuidersTestModel", "inputs": {"family": family, "weak": False}},
        "weak": {"class_type": "GuidersTestModel", "inputs": {"family": family, "weak": True}},
        "pos": {"class_type": "GuidersTestConditioning", "inputs": {"family": family, "role": "positive"}},
        "neg": {"class_type": "GuidersTestConditioning", "inputs": {"family": family, "role": "negative"}},
        "latent": {"class_type": "GuidersTestLatent", "inputs": {"family": family}},
    }
    inputs = {name: info["default"] for name, (_type, info) in widget_specs(class_def).items() if "default" in info}
    inputs.update(values or {})
    specs = widget_specs(class_def)
    for name in linked:
        prompt[f"src_{name}"] = {"class_type": LINKABLE[specs[name][0]], "inputs": {"value": inputs[name]}}
        inputs[name] = [f"src_{name}", 0]
    declared = {**class_def.INPUT_TYPES().get("required", {}), **class_def.INPUT_TYPES().get("optional", {})}
    links = {"model": ["model", 0], "weak_model": ["weak", 0], "positive": ["pos", 0], "negative": ["neg", 0]}
    links["empty_conditioning"] = ["neg", 0]  # GuidersPerpNeg: any conditioning of the family
    inputs.update({name: link for name, link in links.items() if name in declared})
    if "schedule" in class_def.INPUT_TYPES().get("required", {}):  # GuidersScheduledCFG: a CFG from 8 to 2
        prompt["sched"] = {"class_type": "GuidersScheduleLinear", "inputs": {"start_value": 8.0, "end_value": 2.0}}
        inputs["schedule"] = ["sched", 0]
    prompt[TESTED] = {"class_type": node_id, "inputs": inputs}
    output_type = class_def.RETURN_TYPES[0]
    sampled = {"model": ["model", 0], "seed": 3, "steps": 4, "cfg": 5.0, "sampler_name": "euler",
               "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0],
               "latent_image": ["latent", 0], "denoise": 1.0}
    if output_type == "MODEL":
        prompt[SAMPLER] = {"class_type": "KSampler", "inputs": {**sampled, "model": [TESTED, 0]}}
    elif output_type == "GUIDANCE_SCHEDULE":
        prompt["cfg"] = {"class_type": "GuidersScheduledCFG", "inputs": {"model": ["model", 0],
                                                                         "schedule": [TESTED, 0]}}
        prompt[SAMPLER] = {"class_type": "KSampler", "inputs": {**sampled, "model": ["cfg", 0]}}
    elif output_type == "GUIDER":
        prompt["noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}}
        prompt["sampler"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
        prompt["sigmas"] = {"class_type": "BasicScheduler", "inputs": {"model": ["model", 0], "scheduler": "normal",
                                                                       "steps": 4, "denoise": 1.0}}
        prompt[SAMPLER] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": [TESTED, 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}}
    else:
        raise NotImplementedError(f"{node_id} outputs {output_type}; no sampler for it here")
    prompt["record"] = {"class_type": "GuidersTestRecord", "inputs": {"samples": [SAMPLER, 0]}}
    return prompt


def new_executor():
    """A prompt executor with the server's default (classic) cache, as ``main.py`` makes one."""
    import harness

    return harness.prompt_executor(RecordingServer())


def run(executor, prompt: dict, recorded: dict) -> Outcome:
    """Validate and execute ``prompt`` as main.prompt_worker does."""
    import execution

    prompt_id = str(uuid.uuid4())
    valid, _error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        return Outcome(invalid=node_errors or {"prompt": _error})
    server = executor.server
    server.messages.clear()
    recorded.clear()
    executor.execute(prompt, prompt_id, extra_data={"client_id": "guiders-tests"}, execute_outputs=outputs)
    executed = frozenset(str(data["node"]) for event, data in server.messages
                         if event == "executing" and data.get("node") is not None)
    errors = [data for event, data in server.messages if event == "execution_error"]
    if errors:
        return Outcome(failed_node=str(errors[0]["node_id"]), message=errors[0]["exception_message"],
                       executed=executed)
    assert executor.success, "the executor failed without an execution_error message"
    return Outcome(succeeded=True, latent=recorded.get("latent"), executed=executed)


NAN, INF = math.nan, math.inf


def sample_good_prompts_in_a_fresh_process(node_ids: list[str], out_file) -> dict[str, torch.Tensor]:
    """Each node's good prompt (its widget defaults), sampled in a new Python process that has run nothing else
    (this file run as a script): the latents a user gets from a freshly started ComfyUI, to compare with what a
    long-lived one gives after bad prompts. Same seeds, one torch thread, the CPU: equal bit for bit when
    nothing leaked."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out_file), *node_ids],
                            capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert result.returncode == 0, f"the fresh process failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return load_file(str(out_file))


def _main(out_file: str, node_ids: list[str]) -> None:
    """The fresh process: ComfyUI and the pack loaded as the test session loads them, one new executor per
    node, the latents written to ``out_file`` (safetensors)."""
    import harness
    import tiny_models
    from safetensors.torch import save_file

    harness.prepare_host_imports()
    torch.set_num_threads(1)  # as the test session (tests/host/conftest.py): the same kernels, the same bits
    harness.bootstrap()
    pack = harness.load_guiders_pack()
    built: dict[tuple, object] = {}

    def model_of(seed: int) -> Callable:
        def get(family: str):
            if (family, seed) not in built:
                built[family, seed] = tiny_models.make_model(family, seed=seed)
            return built[family, seed]
        return get

    recorded: dict = {}
    latents = {}
    with registered_stand_ins(model_of(0), model_of(tiny_models.WEAK_MODEL_SEED), recorded):
        for node_id in node_ids:
            outcome = run(new_executor(), node_prompt(node_id, pack[node_id]), recorded)
            if outcome.latent is None:
                raise SystemExit(f"{node_id}: the good prompt failed in the fresh process: {outcome.error_text}")
            latents[node_id] = outcome.latent.contiguous()
    save_file(latents, out_file)


if __name__ == "__main__":
    import sys

    _main(sys.argv[1], sys.argv[2:])
