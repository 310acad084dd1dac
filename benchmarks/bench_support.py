"""What the two benchmarks share: finding the host, the accelerator checks, and the bare model's batching floor.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def locate_host() -> Path:
    host = Path(os.environ.get("COMFYUI_PATH") or "~/ComfyUI").expanduser().resolve()
    if not (host / "comfy" / "samplers.py").is_file():
        sys.exit(f"No ComfyUI at {host}: set COMFYUI_PATH to a ComfyUI checkout.")
    os.environ["COMFYUI_PATH"] = str(host)  # what harness.host_path() reads
    return host


def accelerator_missing(device: str) -> str | None:
    """Why ``device`` cannot run here, or None if it can (checked with torch alone, before ComfyUI starts)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return "No CUDA device is present (torch.cuda.is_available() is False)"
    if device == "mps" and not torch.backends.mps.is_available():
        return "No MPS device is present (torch.backends.mps.is_available() is False)"
    return None


def synchronize(device: str) -> None:
    """Wait for the accelerator's queued work, so a timer read after it includes that work."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


@dataclass
class Measured:
    wall: float
    cpu: float
    counters: list
    peak_mib: float | None = None  # torch.cuda.max_memory_allocated over the run, on CUDA


FLOOR_EVALUATIONS = 2  # per repeat and arrangement


def measure_floor(model, inputs, sigmas, repeats: int, device: str = "cpu") -> dict[str, list[Measured]]:
    """The bare model's forwards for one step's cond, uncond and cond: as one batch of 3 (this pack's
    arrangement) and as a batch of 2 then 1 (the built-in nodes'), interleaved, the order alternating."""
    import comfy.model_management
    import torch

    positive, negative, latent = inputs
    if device != "cpu":  # sampling loads the weights for its run; the bare model needs them loaded too
        comfy.model_management.load_models_gpu([model])
    target = comfy.model_management.get_torch_device()
    sigma = sigmas[len(sigmas) // 2].reshape(1).to(target)
    x = latent.to(target) * sigma  # a noisy latent at a mid step; only its shape matters for the time
    cond, uncond = bare_conds(positive, target), bare_conds(negative, target)
    base = model.model  # the BaseModel: apply_model as calc_cond_batch calls it, without any patch

    def forward(conds) -> None:
        batch = len(conds)
        base.apply_model(x.repeat(batch, 1, 1, 1), sigma.repeat(batch),
                         transformer_options={"cond_or_uncond": list(range(batch))},
                         **{key: torch.cat([c[key] for c in conds]) for key in conds[0]})

    arrangements = {"one call (3)": [[cond, uncond, cond]], "two calls (2, 1)": [[cond, uncond], [cond]]}
    with torch.no_grad():  # as the samplers run
        for calls in arrangements.values():  # warm-up
            for conds in calls:
                forward(conds)
        measured: dict[str, list[Measured]] = {label: [] for label in arrangements}
        for repeat in range(repeats):
            order = list(arrangements.items())
            for label, calls in order if repeat % 2 == 0 else reversed(order):
                gc.collect()
                synchronize(device)
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(FLOOR_EVALUATIONS):
                    for conds in calls:
                        forward(conds)
                synchronize(device)
                measured[label].append(Measured(time.perf_counter() - wall, time.process_time() - cpu, []))
    return measured


def bare_conds(conditioning: list, device) -> dict:
    """The model inputs of one CONDITIONING entry, as the BaseModel's extra_conds would give them: the text
    context, and the pooled text as ``y`` where the family has one (SD3; SDXL's ``y`` adds size embeddings,
    which the floor fills with zeros)."""
    import torch

    context, extras = conditioning[0]
    conds = {"c_crossattn": context.to(device)}
    if "pooled_output" in extras:
        pooled = extras["pooled_output"].to(device)
        conds["y"] = pooled
        if pooled.shape[-1] == 1280:  # SDXL: the pooled text and six 256-d size embeddings
            conds["y"] = torch.cat([pooled, pooled.new_zeros(pooled.shape[0], 6 * 256)], dim=-1)
    return conds
