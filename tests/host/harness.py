"""Drive a real ComfyUI from tests: bootstrap it on the CPU, run nodes as its executor does, sample, count forwards.

Nothing here mocks ComfyUI. ``prepare_host_imports()`` only makes the host importable with CPU settings;
``bootstrap()`` imports it and registers the built-in nodes the tests compare against;
``load_guiders_pack()`` loads this repository as a custom node pack with ComfyUI's own loader.

ComfyUI modules are imported inside the functions, never at the top of this file, because
``comfy.cli_args.args.cpu`` must be set before ``comfy.model_management`` is first imported.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

# The comfy_extras files whose nodes the tests run or compare against: samplers and guiders, and every
# built-in guidance node of ComfyUI 0.8.0. Loading only these takes a fraction of init_builtin_extra_nodes()
# and avoids its failures on optional dependencies (torchaudio) that have nothing to do with guidance.
BUILTIN_GUIDANCE_EXTRAS = (
    "nodes_custom_sampler.py",  # SamplerCustomAdvanced, CFGGuider, DualCFGGuider, BasicScheduler, RandomNoise
    "nodes_advanced_samplers.py",  # SamplerEulerCFGpp
    "nodes_model_advanced.py",  # RescaleCFG, ModelSamplingDiscrete/SD3/Flux
    "nodes_pag.py",  # PerturbedAttentionGuidance
    "nodes_sag.py",  # SelfAttentionGuidance
    "nodes_slg.py",  # SkipLayerGuidanceDiT, SkipLayerGuidanceDiTSimple
    "nodes_sd3.py",  # SkipLayerGuidanceSD3, EmptySD3LatentImage
    "nodes_flux.py",  # FluxGuidance, FluxDisableGuidance
    "nodes_apg.py",  # APG
    "nodes_cfg.py",  # CFGZeroStar, CFGNorm
    "nodes_tcfg.py",  # TCFG
    "nodes_mahiro.py",  # Mahiro
    "nodes_freelunch.py",  # FreeU, FreeU_V2 (UNet block patches)
    "nodes_fresca.py",  # FreSca
    "nodes_perpneg.py",  # PerpNeg, PerpNegGuider
    "nodes_video_model.py",  # VideoLinearCFGGuidance, VideoTriangleCFGGuidance
    "nodes_easycache.py",  # EasyCache, LazyCache
    "nodes_context_windows.py",  # ContextWindowsManual
    "nodes_lumina2.py",  # RenormCFG
)
# Built-in guidance nodes of later hosts, loaded where the host has the file (ComfyUI 0.33.0).
BUILTIN_GUIDANCE_EXTRAS_IF_PRESENT = (
    "nodes_nag.py",  # NAGuidance (added after 0.8.0)
)


class HostError(RuntimeError):
    """The ComfyUI host, or this pack inside it, could not be set up. Never a reason to skip."""


def host_path() -> Path:
    """Where the ComfyUI checkout is: ``$COMFYUI_PATH``, else ``~/ComfyUI``."""
    return Path(os.environ.get("COMFYUI_PATH") or "~/ComfyUI").expanduser().resolve()


def prepare_host_imports(cpu: bool = True) -> Path:
    """Make ``comfy``/``nodes`` importable and force the CPU, without importing anything heavy.

    The host goes to the FRONT of sys.path, as when ComfyUI runs main.py: this repository has a
    ``nodes/`` package of its own that must not shadow ComfyUI's ``nodes.py``. ``cpu=False`` (the GPU
    benchmark) leaves the device to ComfyUI's own choice.
    """
    path = host_path()
    _put_host_first(path)
    import comfy.cli_args  # parses no command line: comfy.options.args_parsing is False unless main.py sets it

    if "comfy.model_management" in sys.modules and comfy.cli_args.args.cpu != cpu:
        raise HostError("comfy.model_management was imported before the device was chosen; import order is broken")
    comfy.cli_args.args.cpu = cpu
    return path


def _put_host_first(path: Path) -> None:
    """The host at sys.path[0], even if it is already further down: pytest's ``pythonpath`` setting and its
    rootdir handling may have put this repository (whose ``nodes/`` package would shadow ComfyUI's
    ``nodes.py``) ahead of it since."""
    while str(path) in sys.path:
        sys.path.remove(str(path))
    sys.path.insert(0, str(path))


@dataclass(frozen=True)
class Host:
    """What bootstrap() set up: the checkout, its version and its populated ``nodes`` module."""

    path: Path
    version: str
    nodes: ModuleType


_host: Host | None = None


def bootstrap(cpu: bool = True) -> Host:
    """Import ComfyUI on the CPU (``cpu=False``: on the device ComfyUI picks) and register its built-in guidance
    nodes. Idempotent; no server starts."""
    global _host
    if _host is not None:
        return _host
    path = prepare_host_imports(cpu)
    import comfy.model_management
    import comfy.sample  # noqa: F401  (imported here so a broken host fails in bootstrap, not in a test)
    import comfy.samplers  # noqa: F401
    import comfy.utils
    import comfyui_version

    _put_host_first(path)
    import nodes  # ComfyUI's nodes.py: the host is ahead of this repository (and its nodes/) on sys.path

    if Path(nodes.__file__).resolve() != path / "nodes.py":
        raise HostError(f"'import nodes' found {nodes.__file__}, not ComfyUI's nodes.py in {path}")

    if cpu and comfy.model_management.get_torch_device().type != "cpu":
        raise HostError(f"ComfyUI picked {comfy.model_management.get_torch_device()} instead of the CPU")
    comfy.utils.set_progress_bar_enabled(False)  # no tqdm bars in test output

    async def register_builtin_nodes() -> list[str]:
        # The cheap part of nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False):
        # the public API registry, then only the extras listed above, each through load_custom_node.
        await nodes.init_public_apis()
        extras_dir = path / "comfy_extras"
        failed = []
        present = [name for name in BUILTIN_GUIDANCE_EXTRAS_IF_PRESENT if (extras_dir / name).is_file()]
        for file_name in (*BUILTIN_GUIDANCE_EXTRAS, *present):
            if not await nodes.load_custom_node(str(extras_dir / file_name), module_parent="comfy_extras"):
                failed.append(file_name)
        return failed

    failed = asyncio.run(register_builtin_nodes())
    if failed:
        raise HostError(f"ComfyUI at {path} could not load its built-in nodes from {failed} (see the log above)")
    _host = Host(path=path, version=comfyui_version.__version__, nodes=nodes)
    return _host


def load_guiders_pack(repo_root: Path = REPO_ROOT) -> dict[str, type]:
    """Load this repository as ComfyUI loads a folder in custom_nodes/, and return ``{node_id: class}``.

    Raises HostError with ComfyUI's own log of the failure (load_custom_node only logs and returns False),
    when the pack declares no node, or when one of its node ids is not registered afterwards (ComfyUI
    silently skips a custom node whose id a built-in node already has).
    """
    nodes = bootstrap().nodes
    built_in_ids = set(nodes.NODE_CLASS_MAPPINGS)
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        # ignore=built_in_ids, as init_external_custom_nodes passes: a custom node never replaces a built-in one.
        loaded = asyncio.run(nodes.load_custom_node(str(repo_root), ignore=built_in_ids, module_parent="custom_nodes"))
    finally:
        logging.getLogger().removeHandler(handler)
    if not loaded:
        raise HostError(f"ComfyUI could not load the pack at {repo_root}:\n{log.getvalue()}")
    module = sys.modules[str(repo_root).replace(".", "_x_")]  # the module name load_custom_node gives a folder
    declared = _declared_nodes(module)
    if not declared:
        raise HostError(f"The pack at {repo_root} loaded but declares no node")
    not_registered = [node_id for node_id, cls in declared.items() if nodes.NODE_CLASS_MAPPINGS.get(node_id) is not cls]
    if not_registered:
        raise HostError(f"The pack's nodes {not_registered} are not registered (a built-in node has that id)")
    return declared


def _declared_nodes(module: ModuleType) -> dict[str, type]:
    """The pack's nodes, read as load_custom_node reads them: NODE_CLASS_MAPPINGS if the module has it
    (comfy_entrypoint is then ignored), else the schema ids of the V3 extension's node list."""
    mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
    if mappings is not None:
        return dict(mappings)

    async def node_list() -> list[type]:
        extension = module.comfy_entrypoint()
        if inspect.isawaitable(extension):
            extension = await extension
        return await extension.get_node_list()

    return {node_cls.GET_SCHEMA().node_id: node_cls for node_cls in asyncio.run(node_list())}


# ---------------------------------------------------------------------------------------------------------
# Running nodes


def _widget_inputs(class_def: type, inputs: dict[str, Any]) -> dict[str, Any]:
    """Fill widget defaults as the frontend does, and validate values as execution.validate_inputs does.

    Stricter than the executor in one way: an input name the node does not declare is an error here
    (the executor silently drops it, which would hide a typo in a test).
    """
    declared = class_def.INPUT_TYPES()
    specs = {**declared.get("required", {}), **declared.get("optional", {})}
    unknown = set(inputs) - set(specs)
    if unknown:
        raise TypeError(f"{class_def.__name__} has no input(s) {sorted(unknown)}; it declares {sorted(specs)}")
    filled = dict(inputs)
    for name, spec in specs.items():
        input_type, info = spec[0], (spec[1] if len(spec) > 1 else {})
        if name not in filled:
            if "default" in info:
                filled[name] = info["default"]
            elif name in declared.get("required", {}):
                raise TypeError(f"{class_def.__name__} needs input {name!r} (it has no default)")
            continue
        value = filled[name]
        converters = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
        if isinstance(input_type, str) and input_type in converters:
            value = filled[name] = converters[input_type](value)
            if "min" in info and value < info["min"]:
                raise ValueError(f"{class_def.__name__}.{name}={value} is below its min {info['min']}")
            if "max" in info and value > info["max"]:
                raise ValueError(f"{class_def.__name__}.{name}={value} is above its max {info['max']}")
        options = input_type if isinstance(input_type, list) else info.get("options") if input_type == "COMBO" else None
        if options is not None and value not in options:
            raise ValueError(f"{class_def.__name__}.{name}={value!r} is not one of {options}")
    return filled


def run_node(node_id: str, **inputs: Any) -> tuple:
    """Run one node from nodes.NODE_CLASS_MAPPINGS with literal inputs and return its outputs tuple.

    Goes through the executor's own functions (execution.get_input_data, _async_map_node_over_list,
    get_output_from_returns): a V1 node is instantiated and its FUNCTION called; a V3 io.ComfyNode runs
    as ``EXECUTE_NORMALIZED[_ASYNC]`` on a locked clone of the class, and its io.NodeOutput is unwrapped.
    Widget inputs left out take their declared default, as a freshly added node in the UI would.
    """
    import execution

    nodes = bootstrap().nodes
    if node_id not in nodes.NODE_CLASS_MAPPINGS:
        raise KeyError(f"No node {node_id!r} is registered (is the pack loaded? use the guiders_pack fixture)")
    class_def = nodes.NODE_CLASS_MAPPINGS[node_id]
    prompt_inputs = _widget_inputs(class_def, inputs)
    unique_id = f"test:{node_id}"
    input_data_all, missing, v3_data = execution.get_input_data(prompt_inputs, class_def, unique_id)
    if missing:
        raise TypeError(f"{node_id}: inputs {sorted(missing)} look like links ([str, int]); pass values")
    node = class_def()  # the executor instantiates V3 classes too (execution.execute: obj = class_def())

    async def execute() -> tuple:
        returns = await execution._async_map_node_over_list(
            "test-prompt", unique_id, node, input_data_all, node.FUNCTION, v3_data=v3_data
        )
        returns = await execution.resolve_map_node_over_list_results(returns)
        return execution.get_output_from_returns(returns, node)

    output, _ui, has_subgraph = asyncio.run(execute())
    if has_subgraph:
        raise NotImplementedError(f"{node_id} expanded into a subgraph; run_node runs single nodes only")
    # output holds one list per output socket with one entry per input slice (literal inputs make one
    # slice), except that a socket in OUTPUT_IS_LIST already holds the node's whole list.
    is_list = getattr(node, "OUTPUT_IS_LIST", None) or [False] * len(output)
    return tuple(values if listed else values[0] for values, listed in zip(output, is_list, strict=False))


# ---------------------------------------------------------------------------------------------------------
# Sampling


def sample(
    model,
    positive: list,
    negative: list,
    latent: torch.Tensor | dict,
    cfg: float,
    steps: int = 4,
    sampler: str = "euler",
    scheduler: str = "normal",
    seed: int = 0,
    denoise: float = 1.0,
) -> torch.Tensor:
    """Run the KSampler node (common_ksampler -> comfy.sample.sample) and return the sampled latent tensor."""
    latent_dict = latent if isinstance(latent, dict) else {"samples": latent}
    (out,) = run_node(
        "KSampler",
        model=model,
        seed=seed,
        steps=steps,
        cfg=cfg,
        sampler_name=sampler,
        scheduler=scheduler,
        positive=positive,
        negative=negative,
        latent_image=latent_dict,
        denoise=denoise,
    )
    return out["samples"]


def cfg_guider(model, positive: list, negative: list, cfg: float):
    """The built-in CFGGuider node's GUIDER (a comfy.samplers.CFGGuider)."""
    return run_node("CFGGuider", model=model, positive=positive, negative=negative, cfg=cfg)[0]


def scheduler_sigmas(model, steps: int = 4, scheduler: str = "normal", denoise: float = 1.0) -> torch.Tensor:
    """The BasicScheduler node's sigmas: the same schedule KSampler computes for these settings."""
    return run_node("BasicScheduler", model=model, scheduler=scheduler, steps=steps, denoise=denoise)[0]


def sample_custom_advanced(
    guider, latent: torch.Tensor | dict, sampler_name: str, sigmas: torch.Tensor, seed: int
) -> torch.Tensor:
    """Run SamplerCustomAdvanced (RandomNoise + KSamplerSelect + the guider) and return the latent tensor."""
    latent_dict = latent if isinstance(latent, dict) else {"samples": latent}
    (noise,) = run_node("RandomNoise", noise_seed=seed)
    (sampler,) = run_node("KSamplerSelect", sampler_name=sampler_name)
    output, _denoised_output = run_node(
        "SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas, latent_image=latent_dict
    )
    return output["samples"]


# ---------------------------------------------------------------------------------------------------------
# Counting forwards


@dataclass(frozen=True)
class ForwardCall:
    """One call of the diffusion model: how many latents it ran, at which sigma and sampling step."""

    batch_size: int
    sigma: float | None
    step: int | None  # index into the run's sample_sigmas (nearest entry), None outside a sampler
    cond_or_uncond: tuple[int, ...] | None  # the chunk order calc_cond_batch sent (0 cond, 1 uncond, 2+ extra)


class ForwardCounter:
    """Record every forward of ``model``'s diffusion model while the ``with`` block runs.

    Wraps ``model.model.diffusion_model.forward`` with an instance attribute and removes it on exit, so it
    uses no model_options slot a guidance patch could also use, and it counts the extra forwards that
    patches make through calc_cond_batch themselves. Clones of a ModelPatcher share the diffusion model,
    so counting on the base model also counts its patched clones.
    """

    def __init__(self, model) -> None:
        self.diffusion_model = model.model.diffusion_model
        self.calls: list[ForwardCall] = []

    def __enter__(self) -> ForwardCounter:
        if "forward" in vars(self.diffusion_model):
            raise RuntimeError("diffusion_model.forward is already wrapped (nested ForwardCounter?)")
        original_forward = self.diffusion_model.forward

        def counting_forward(x, *args, **kwargs):
            self.calls.append(_describe_call(x, kwargs.get("transformer_options") or {}))
            return original_forward(x, *args, **kwargs)

        self.diffusion_model.forward = counting_forward
        return self

    def __exit__(self, *exc_info) -> None:
        del self.diffusion_model.forward

    @property
    def batch_sizes(self) -> list[int]:
        return [call.batch_size for call in self.calls]

    def per_step(self) -> list[list[int]]:
        """Batch sizes grouped by sampling step, in call order: ``[[2, 1], [2, 1], ...]``.

        Consecutive calls at the same step form one group, so two runs of 4 steps give 8 groups.
        """
        groups: list[list[int]] = []
        previous_step: object = object()
        for call in self.calls:
            if call.step != previous_step or not groups:
                groups.append([])
                previous_step = call.step
            groups[-1].append(call.batch_size)
        return groups


def _describe_call(x: torch.Tensor, transformer_options: dict) -> ForwardCall:
    sigmas = transformer_options.get("sigmas")  # set per forward by calc_cond_batch
    sample_sigmas = transformer_options.get("sample_sigmas")  # set per run by CFGGuider.inner_sample
    sigma = float(sigmas.flatten()[0]) if isinstance(sigmas, torch.Tensor) else None
    step = None
    if sigma is not None and isinstance(sample_sigmas, torch.Tensor):
        step = int(torch.argmin((sample_sigmas.float().cpu() - sigma).abs()))
    cond_or_uncond = transformer_options.get("cond_or_uncond")
    first = x[0] if isinstance(x, (list, tuple)) else x  # a list of latents (LTX-2: video, audio): one batch
    return ForwardCall(
        batch_size=int(first.shape[0]),
        sigma=sigma,
        step=step,
        cond_or_uncond=tuple(cond_or_uncond) if cond_or_uncond is not None else None,
    )


def assert_window_is_partial(model, start: float, end: float, steps: int) -> None:
    """A start/end window under test must hold some of the run's steps and not others, or it tests nothing.
    ComfyUI's percent windows include both ends: sigma_end <= sigma <= sigma_start."""
    if (start, end) == (0.0, 1.0):
        return
    sampling = model.get_model_object("model_sampling")
    sigma_start, sigma_end = float(sampling.percent_to_sigma(start)), float(sampling.percent_to_sigma(end))
    step_sigmas = scheduler_sigmas(model, steps=steps)[:-1].tolist()
    inside = [sigma_end <= s <= sigma_start for s in step_sigmas]
    assert any(inside) and not all(inside), f"window {start}..{end} vs sigmas {step_sigmas}: {inside}"


# The cache limits main.py passes by default: no LRU size, no RAM pressure limit. ComfyUI 0.33.0 also reads
# "ram_inactive" (the RAM cache's limit while idle); 0.8.0 ignores the key.
DEFAULT_CACHE_ARGS = {"lru": 0, "ram": 0, "ram_inactive": 0}


def prompt_executor(server):
    """A prompt executor with the server's default (classic) cache, as ``main.py`` makes one."""
    import execution

    return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                    cache_args=dict(DEFAULT_CACHE_ARGS))
