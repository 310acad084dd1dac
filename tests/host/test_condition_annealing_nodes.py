"""GuidersCADS through ComfyUI's real sampling on tiny SD1.5 and SD3 (a DiT), against a reference written here from
the paper (Sadat et al., ICLR 2024, arXiv:2310.17347, §3): a plain model clone whose
``model_function_wrapper`` noises the text-embedding rows of the chosen chunks with the same seeded draws (one
standard-normal draw of the conditioning's shape per prompt per step, the positive first), at
t = timestep(σ)/999 on the discrete SD1.5 and t = σ on the flow SD3.

Host behaviour these tests depend on (ComfyUI 0.8.0 and 0.33.0): ``model_function_wrapper`` gets ``c`` with
``c_crossattn`` concatenated over the call's chunks (one row per chunk for a batch-1 latent), ``timestep`` = σ
and ``cond_or_uncond`` (0 cond, 1 uncond, 2+ the pack's extra branches).

Breaks each test was shown to catch on a scratch copy: the noise put on the uncond as well under "cond" (or not
on it under "cond and uncond"); t read as 1 − t; the schedule ignored; the PAG branch left with the clean
embedding (its source is the cond, so it must see the cond's noise); the state kept between runs.
"""

from __future__ import annotations

import math

import comfy.model_sampling
import pytest
import torch
from support import assert_parity, node
from support import sample_family as run

FAMILIES = pytest.mark.parametrize("family", ["sd15", "sd3"])


@pytest.fixture(autouse=True)
def _pack(guiders_pack):
    return guiders_pack


def paper_gamma(t: float, tau1: float, tau2: float) -> float:
    return 1.0 if t <= tau1 else 0.0 if t >= tau2 else (tau2 - t) / (tau2 - tau1)


def paper_noised(y: torch.Tensor, gamma: float, noise: torch.Tensor, s: float, psi: float) -> torch.Tensor:
    y64, n64 = y.double(), noise.double()
    noised = math.sqrt(gamma) * y64 + s * math.sqrt(1 - gamma) * n64
    rescaled = (noised - noised.mean()) / noised.std() * y64.std() + y64.mean()
    return (psi * rescaled + (1 - psi) * noised).to(y.dtype)


def cads_reference(model, noise_scale: float, tau1: float, tau2: float, psi: float, seed: int,
                   noised_chunks: tuple[int, ...] = (0,), uncond_too: bool = False, schedule=None):
    sampling = model.get_model_object("model_sampling")
    flow = isinstance(sampling, comfy.model_sampling.CONST)
    state: dict = {}

    def wrapper(apply_model, args):
        x, sigma, chunks = args["input"], args["timestep"], args["cond_or_uncond"]
        sigma_value = float(sigma.flatten()[0])
        if state.get("last_sigma") is None or sigma_value >= state["last_sigma"]:
            state["generator"] = torch.Generator().manual_seed(seed)  # a new run
        state["last_sigma"] = sigma_value
        t = sigma_value if flow else float(sampling.timestep(sigma.flatten()[:1])[0]) / 999.0
        gamma = paper_gamma(t, tau1, tau2)
        c = dict(args["c"])
        embeddings = c["c_crossattn"].clone()
        rows = embeddings.shape[0] // len(chunks)
        s = noise_scale
        if schedule is not None:  # the run's sigmas give the step, as CFGGuider stores them in transformer_options
            sample_sigmas = args["c"]["transformer_options"]["sample_sigmas"].float().cpu()
            step = int(torch.argmin((sample_sigmas - sigma_value).abs()))
            s = schedule(step, len(sample_sigmas) - 1)
        draws = {0: torch.randn(embeddings[:1].shape, generator=state["generator"])}
        if uncond_too:
            draws[1] = torch.randn(embeddings[:1].shape, generator=state["generator"])
        for j, chunk in enumerate(chunks):
            source = 0 if chunk in noised_chunks else chunk
            if source in draws:
                block = embeddings[j * rows:(j + 1) * rows]
                embeddings[j * rows:(j + 1) * rows] = paper_noised(block, gamma, draws[source].to(block), s, psi)
        c["c_crossattn"] = embeddings
        return apply_model(x, sigma, **c)

    reference = model.clone()
    reference.set_model_unet_function_wrapper(wrapper)
    return reference


@FAMILIES
@pytest.mark.parametrize("apply_to", ["cond", "cond and uncond"])
def test_cads_matches_the_paper(tiny_model, family: str, apply_to: str) -> None:
    model = tiny_model(family)
    # τ2 = 0.95 and τ1 = 0.3 so the 4-step runs have steps with γ = 0, 0 < γ < 1 and γ = 1 on both families.
    ours = node("GuidersCADS", model=model, noise_scale=0.5, tau1=0.3, tau2=0.95, psi=1.0, apply_to=apply_to, seed=7)
    reference = cads_reference(model, 0.5, 0.3, 0.95, 1.0, seed=7, uncond_too=apply_to != "cond")
    first = run(ours, family)

    assert_parity(first, run(reference, family), run(model, family))
    assert torch.equal(run(ours, family), first)  # a new run draws the same noise again


def test_cads_seed_changes_the_noise(sd15_model) -> None:
    a = run(node("GuidersCADS", model=sd15_model, noise_scale=0.5, tau1=0.3, tau2=0.95, psi=1.0, seed=1), "sd15")
    b = run(node("GuidersCADS", model=sd15_model, noise_scale=0.5, tau1=0.3, tau2=0.95, psi=1.0, seed=2), "sd15")
    assert float((a - b).abs().max() / b.abs().max()) > 1e-3


@FAMILIES
def test_cads_with_a_schedule_and_pag_equals_the_documented_composition(tiny_model, family: str) -> None:
    """CADS changes the cond's input, so PAG's perturbed copy of the cond runs on the same noised embedding:
    guided = CFG(cond*, uncond) + s·(cond* − perturbed*), * = the noised embedding, s_k of CADS from the schedule."""
    model = tiny_model(family)
    schedule = node("GuidersScheduleLinear", start_value=1.0, end_value=0.2)
    pag = node("GuidersPAG", model=model, scale=3.0)
    ours = node("GuidersCADS", model=pag, noise_scale=0.5, tau1=0.3, tau2=0.95, psi=1.0, seed=7, schedule=schedule)
    reference = cads_reference(pag, 0.5, 0.3, 0.95, 1.0, seed=7, noised_chunks=(0, 2), schedule=schedule)

    assert_parity(run(ours, family), run(reference, family), run(pag, family))


