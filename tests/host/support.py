"""What host tests share: running a node, sampling a family's tiny model the same way everywhere, and the one
measure of "how different" every parity and effect assertion uses.

- ``node(node_id, **inputs)``: the first output of a node run through ComfyUI's executor.
- ``sample_family(model, family, ...)``: KSampler on the family's conditioning (seed 1) and latent (seed 2),
  noise seed 3, so results of different tests on the same family are comparable.
- ``relative_error(a, b)``: max|a − b| / max|b|.
- ``assert_parity(result, reference, plain)``: ours equals the reference to PARITY_RTOL of max|reference|,
  and the reference is at least MIN_EFFECT away from plain CFG (a node that did nothing could not pass).
- ``assert_effect(guided, plain)``: finite, same shape, and at least MIN_EFFECT away from plain CFG.
- ``pack_module(guiders_pack, name)``: a module of the loaded pack (``host.layers``), as ComfyUI's loader named it.
"""

from __future__ import annotations

import sys

import torch
from harness import run_node, sample, scheduler_sigmas
from tiny_models import make_conditioning, make_latent

STEPS = 4
CFG = 5.0
PARITY_RTOL = 1e-4  # of max|reference|; measured 5e-7 .. 4e-6 for the parity comparisons
MIN_EFFECT = 1e-2  # of max|plain|: how far a reference (or a node) must move the result


def node(node_id: str, **inputs):
    """The first output of a node run through ComfyUI's executor."""
    return run_node(node_id, **inputs)[0]


def sample_family(model, family: str, cfg: float = CFG, h: int = 16, w: int = 16, steps: int = STEPS,
                  **kwargs) -> torch.Tensor:
    positive, negative = make_conditioning(family, seed=1)
    latent = make_latent(family, h=h, w=w, seed=2)
    return sample(model, positive, negative, latent, cfg=cfg, steps=steps, seed=3, **kwargs)


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float((result - reference).abs().max() / reference.abs().max())


def assert_parity(result: torch.Tensor, reference: torch.Tensor, plain: torch.Tensor, rtol: float = PARITY_RTOL):
    """``result`` equals ``reference`` to ``rtol`` of max|reference|, and the reference is far from plain CFG."""
    assert torch.isfinite(reference).all() and torch.isfinite(result).all()
    effect = relative_error(reference, plain)
    assert effect > MIN_EFFECT, f"the reference barely differs from plain CFG ({effect:.2e}): the test is vacuous"
    error = relative_error(result, reference)
    assert error < rtol, f"max|ours − reference| / max|reference| = {error:.2e} (reference effect {effect:.2e})"


def assert_effect(guided: torch.Tensor, plain: torch.Tensor, what: str = "the node") -> None:
    """``guided`` is finite, shaped as ``plain``, and at least MIN_EFFECT (of max|plain|) away from it."""
    assert guided.shape == plain.shape
    assert torch.isfinite(guided).all() and torch.isfinite(plain).all(), f"{what}: NaN or inf in the result"
    effect = relative_error(guided, plain)
    assert effect > MIN_EFFECT, f"{what} barely changed the result: max|Δ|/max|plain| = {effect:.2e}"


def pack_module(guiders_pack, name: str):
    """A module of the pack as ComfyUI loaded it (``"host.layers"``): the package is the one the registered
    GuidersPAG node came from, whatever name the loader gave it."""
    package = guiders_pack["GuidersPAG"].__module__.rsplit(".", 1)[0]
    return sys.modules[f"{package}.{name}"]


def linear_scale_per_step(model, start: float, end: float, steps: int = STEPS):
    """GuidersScheduleLinear's value at each step, written here from its definition (start at step 0, end at the
    last, straight between), as a function of the step's σ (the KSampler's own sigmas, an exact match)."""
    sigmas = [float(s) for s in scheduler_sigmas(model, steps)[:-1]]
    values = [start + (end - start) * i / (steps - 1) for i in range(steps)]

    def at(sigma: float) -> float:
        step = min(range(steps), key=lambda i: abs(sigmas[i] - sigma))
        assert abs(sigmas[step] - sigma) <= 1e-5 * max(1.0, sigma), "a call between the steps' sigmas"
        return values[step]

    return at
