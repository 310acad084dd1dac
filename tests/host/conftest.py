"""Fixtures for tests against a real ComfyUI on the CPU (tests/conftest.py only collects this folder when
one exists).

- ``comfy_host`` (session, autouse): ComfyUI imported on the CPU with its built-in guidance nodes registered;
  torch runs on one thread while host tests run.
- ``guiders_pack`` (session): this repository loaded by ``nodes.load_custom_node``, as ComfyUI loads
  custom_nodes/; returns ``{node_id: class}``. A pack that fails to load is an error, never a skip.
- ``sd15_model``, ``sd3_model``, ``flux_model`` (session): tiny random-weight ModelPatchers. They are
  shared: ``clone()`` before patching, as every ComfyUI node does.
- ``tiny_model`` (session): ``tiny_model(family)`` for any family tiny_models.make_model builds ("sd15",
  "sd15_medium", "sdxl", "sd3", "sd3_medium", "flux", "wan", "ltxv", "hunyuan_video"), built once per family.

Helpers are plain imports: ``from harness import sample, run_node, ForwardCounter`` and
``from tiny_models import make_conditioning, make_latent``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def _host_available() -> bool:
    # tests/conftest.py decides whether this folder is collected; this conftest is imported anyway when
    # pytest is pointed straight at tests/host, so it must not fail to import without a host.
    host = Path(os.environ.get("COMFYUI_PATH") or "~/ComfyUI").expanduser()
    return importlib.util.find_spec("torch") is not None and (host / "comfy" / "samplers.py").is_file()


if _host_available():
    import harness
    import tiny_models
    import torch

    # Before any test module is imported: a test module may import comfy at its top, and
    # comfy.model_management must see args.cpu = True on its first import.
    harness.prepare_host_imports()


@pytest.fixture(scope="session", autouse=True)
def comfy_host() -> Iterator[harness.Host]:
    # One intra-op thread: tiny models gain nothing from more, and on a busy 2-core machine two threads
    # spinning against another process made a 0.1 s run take 2-9 s (measured here).
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield harness.bootstrap()
    torch.set_num_threads(threads_before)


@pytest.fixture(scope="session")
def guiders_pack(comfy_host: harness.Host) -> dict[str, type]:
    return harness.load_guiders_pack()


@pytest.fixture(scope="session")
def tiny_model(comfy_host: harness.Host) -> Callable:
    built: dict[str, object] = {}

    def get(family: str):
        if family not in built:
            built[family] = tiny_models.make_model(family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def weak_model_of(comfy_host: harness.Host) -> Callable:
    built: dict[str, object] = {}

    def get(family: str):
        if family not in built:
            built[family] = tiny_models.make_model(family, seed=tiny_models.WEAK_MODEL_SEED)
        return built[family]

    return get


@pytest.fixture(scope="session")
def sd15_model(tiny_model: Callable):
    return tiny_model("sd15")


@pytest.fixture(scope="session")
def sd3_model(tiny_model: Callable):
    return tiny_model("sd3")


@pytest.fixture(scope="session")
def flux_model(tiny_model: Callable):
    return tiny_model("flux")


# Whole prompts through ComfyUI's validator and executor (tests/host/prompts.py): the stand-in nodes, and what
# their latent recorder saw, per test module.
@pytest.fixture(scope="module")
def recorded() -> dict:
    return {}


@pytest.fixture(scope="module")
def registry(guiders_pack, tiny_model, weak_model_of, recorded):
    from prompts import registered_stand_ins

    with registered_stand_ins(tiny_model, weak_model_of, recorded) as registry:
        yield registry
