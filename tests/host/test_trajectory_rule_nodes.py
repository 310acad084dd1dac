"""GuidersMomentumGuidance and GuidersSMCCFG through ComfyUI's real sampling on tiny SD1.5 and SD3 (a DiT),
against references written here from the papers' equations (Liao et al. 2026 Alg. 1; Wang et al. 2026 §3.4) in
a plain model clone's ``sampler_cfg_function`` / ``sampler_post_cfg_function``, in both spaces the nodes offer:
the paper's velocity (x − x0)/σ and the denoised x0 (the form of pamparamm/sd-perturbed-attention's nodes).

Host behaviour these tests depend on (ComfyUI 0.8.0 and 0.33.0, comfy/samplers.py): post-CFG functions run in
the order they were set, each getting the previous one's ``denoised`` (x0), with ``input`` x and ``sigma``;
PerturbedAttentionGuidance is such a post-CFG function (s·(cond − perturbed) added to the CFG result).

Breaks each test was shown to catch on a scratch copy: momentum's state kept between runs (the parity tests'
second run then differs); momentum's average updated before the extrapolation; SMC's e_prev kept as the raw
error; SMC's switching forms swapped (elementwise sign ↔ per-image unit vector); the velocity space
replaced by the noise space (x − x0, no division by σ) for rules and for post transforms; either schedule
ignored; the PAG term dropped from the stack (by the CFG rule, or by a post transform).
"""

from __future__ import annotations

import pytest
import torch
from support import assert_parity, node
from support import sample_family as run
from test_branch_rule_nodes import step_index, with_cfg_function

FAMILIES = pytest.mark.parametrize("family", ["sd15", "sd3"])
SPACES = pytest.mark.parametrize("space", ["velocity (the paper)", "x0 (sd-perturbed-attention)"])


@pytest.fixture(autouse=True)
def _pack(guiders_pack):
    return guiders_pack


def momentum_reference(model, momentum: float, ema: float, space: str, schedule=None):
    """Alg. 1 on the guided prediction: v̂ = v + α(v − m), m ← βm + (1 − β)v, m = v on the first step."""
    average: dict = {}

    def momentum_post_cfg(args):
        step, num_steps = step_index(args)
        if step == 0:
            average.clear()
        x, sigma = args["input"], float(args["sigma"].flatten()[0])
        guided = args["denoised"].double()
        value = (x.double() - guided) / sigma if space.startswith("velocity") else guided
        m = average.get("m", value)
        alpha = momentum if schedule is None else schedule(step, num_steps)
        extrapolated = value + alpha * (value - m)
        average["m"] = ema * m + (1 - ema) * value
        out = x.double() - sigma * extrapolated if space.startswith("velocity") else extrapolated
        return out.to(x.dtype)

    reference = model.clone()
    reference.set_model_sampler_post_cfg_function(momentum_post_cfg)
    return reference


def smc_reference(model, sliding_lambda: float, k: float, space: str, schedule=None, switching: str = "sign"):
    """§3.4 per sample: e = c − u, s = (e − e_prev) + λe_prev, ê = e − k·sign(s), e_prev ← ê; u + w·ê. sign per
    element as the authors' code (hanyang-21/CFG-Ctrl), or ``switching="unit"``: s/||s|| (sd-perturbed-attention)."""
    previous: dict = {}

    def smc_cfg(args):
        step, num_steps = step_index(args)
        if step == 0:
            previous.clear()
        x, sigma = args["input"].double(), float(args["sigma"].flatten()[0])
        if space.startswith("velocity"):
            cond, uncond = args["cond"].double() / sigma, args["uncond"].double() / sigma
        else:
            cond, uncond = args["cond_denoised"].double(), args["uncond_denoised"].double()
        scale = args["cond_scale"] if schedule is None else schedule(step, num_steps)
        out = []
        for i in range(cond.shape[0]):
            e = cond[i] - uncond[i]
            e_prev = previous.get(i, e)
            s = (e - e_prev) + sliding_lambda * e_prev
            corrected = e - k * (torch.sign(s) if switching == "sign" else s / s.norm())
            previous[i] = corrected
            out.append(uncond[i] + scale * corrected)
        result = torch.stack(out)
        noise = sigma * result if space.startswith("velocity") else x - result
        return noise.to(args["input"].dtype)

    return with_cfg_function(model, smc_cfg)


@FAMILIES
@SPACES
def test_momentum_guidance_matches_the_paper(tiny_model, family: str, space: str) -> None:
    model = tiny_model(family)
    ours = node("GuidersMomentumGuidance", model=model, momentum=2.0, ema=0.6, space=space)
    first = run(ours, family)

    assert_parity(first, run(momentum_reference(model, 2.0, 0.6, space), family), run(model, family))
    assert torch.equal(run(ours, family), first)  # a second run starts from a fresh average


SWITCHING = {"sign": "sign (the authors' code)", "unit": "unit vector (sd-perturbed-attention)"}


@FAMILIES
@SPACES
@pytest.mark.parametrize("switching", list(SWITCHING))
def test_smc_cfg_matches_the_paper(tiny_model, family: str, space: str, switching: str) -> None:
    # k relative to the error's size: the x0 and velocity errors differ in scale (x0 = x − σ·v), and the unit
    # vector's correction has norm k per image where the sign's has k per element.
    k = {"velocity (the paper)": 1.0, "x0 (sd-perturbed-attention)": 2.0}[space] if switching == "unit" else 0.2
    model = tiny_model(family)
    ours = node("GuidersSMCCFG", model=model, sliding_lambda=6.0, k=k, space=space, switching=SWITCHING[switching])
    first = run(ours, family)

    assert_parity(first, run(smc_reference(model, 6.0, k, space, switching=switching), family), run(model, family))
    assert torch.equal(run(ours, family), first)


@FAMILIES
def test_momentum_guidance_with_a_schedule_and_pag_equals_the_documented_composition(tiny_model, family) -> None:
    """guided = MG(CFG + s·(cond − perturbed)): momentum acts on the whole guided result, α_k from the schedule.
    Reference: ComfyUI's PerturbedAttentionGuidance, then the momentum reference (post-CFG, in that order)."""
    model = tiny_model(family)
    schedule = node("GuidersScheduleLinear", start_value=3.0, end_value=0.5)
    layers = "middle" if family == "sd15" else "auto"
    ours = node("GuidersPAG", model=model, scale=3.0, layers=layers)
    ours = node("GuidersMomentumGuidance", model=ours, momentum=0.5, ema=0.6, schedule=schedule)
    if family == "sd15":
        pag = node("PerturbedAttentionGuidance", model=model, scale=3.0)
    else:
        pag = node("GuidersPAG", model=model, scale=3.0)
    reference = momentum_reference(pag, 0.5, 0.6, "velocity", schedule)

    assert_parity(run(ours, family), run(reference, family), run(pag, family))


@FAMILIES
def test_smc_cfg_with_a_schedule_and_pag_equals_the_documented_composition(tiny_model, family: str) -> None:
    """guided = u + w_k·ê + s·(cond − perturbed), w_k from the schedule."""
    model = tiny_model(family)
    schedule = node("GuidersScheduleLinear", start_value=8.0, end_value=2.0)
    layers = "middle" if family == "sd15" else "auto"
    ours = node("GuidersPAG", model=model, scale=3.0, layers=layers)
    ours = node("GuidersSMCCFG", model=ours, sliding_lambda=6.0, k=0.5, schedule=schedule)
    if family == "sd15":
        reference = node("PerturbedAttentionGuidance", model=smc_reference(model, 6.0, 0.5, "velocity", schedule),
                         scale=3.0)
    else:
        reference = smc_reference(node("GuidersPAG", model=model, scale=3.0), 6.0, 0.5, "velocity", schedule)
    plain_pag = node("GuidersPAG", model=model, scale=3.0, layers=layers)

    assert_parity(run(ours, family), run(reference, family), run(plain_pag, family))


