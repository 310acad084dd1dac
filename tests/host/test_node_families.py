"""Every guidance node on every model family it supports (tiny SD1.5 UNet, SD3 MMDiT, Flux DiT), through a real
KSampler run: the result is finite and differs clearly from plain CFG at the same sampler cfg.

The families a node supports are the pack's own declaration (ATTENTION_FAMILIES / BLOCK_FAMILIES in
nodes/common.py, unet = SD1.5 here; the video DiTs are in test_video_dits.py); test_node_errors.py
checks that the others are refused.
SEG also runs on a non-square latent, where its query blur needs the token grid's true height and width.

Host behaviour these tests depend on (ComfyUI 0.8.0): KSampler with cfg != 1 evaluates cond and uncond;
Flux takes a guidance embedding from the conditioning (FluxGuidance), so a sampler cfg > 1 still runs CFG.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from harness import sample
from support import CFG, STEPS, assert_effect, node
from tiny_models import make_conditioning, make_latent

FAMILY_OF_POOL = {"unet": "sd15", "sd3": "sd3", "flux": "flux"}


@dataclass(frozen=True)
class Case:
    """A node (or chain of nodes) to apply: ``build(model, family, weak_model_of)`` returns the patched model."""

    name: str
    build: Callable
    families: tuple[str, ...]
    cfg: float = CFG


def _scheduled_cfg(model, family, weak):
    return node("GuidersScheduledCFG", model=model, schedule=node("GuidersScheduleLinear", start_value=8.0,
                                                                   end_value=2.0))


def _autoguidance(model, family, weak):
    return node("GuidersAutoguidance", model=model, weak_model=weak(family), scale=2.0)


def _stack(model, family, weak):
    model = node("GuidersPAG", model=model, scale=2.0)
    model = node("GuidersSEG", model=model, scale=2.0, blur_sigma=10.0)
    model = node("GuidersAPG", model=model, eta=0.0, norm_threshold=5.0, momentum=-0.5)
    return node("GuidersRescaleCFG", model=model, multiplier=0.7)


ALL = ("sd15", "sd3", "flux")
ATTENTION = ("sd15", "sd3", "flux")
BLOCKS = ("sd3", "flux")

CASES = [
    Case("ScheduledCFG", _scheduled_cfg, ALL),
    Case("CFGNormalize-base_norm", lambda m, f, w: node("GuidersCFGNormalize", model=m, mode="base_norm"), ALL),
    # t_norm's scale multiplies a direction normalised to the uncond's norm: cf_guidance uses 0.25 → 0.05.
    Case("CFGNormalize-t_norm", lambda m, f, w: node("GuidersCFGNormalize", model=m, mode="t_norm"), ALL, cfg=0.3),
    Case("CFGNormalize-full_norm", lambda m, f, w: node("GuidersCFGNormalize", model=m, mode="full_norm"), ALL,
         cfg=0.3),
    Case("RescaleCFG", lambda m, f, w: node("GuidersRescaleCFG", model=m, multiplier=0.7), ALL),
    Case("CFGZeroStar", lambda m, f, w: node("GuidersCFGZeroStar", model=m, zero_init_steps=1), ALL),
    Case("APG", lambda m, f, w: node("GuidersAPG", model=m, eta=0.0, norm_threshold=5.0, momentum=-0.5), ALL),
    Case("PAG", lambda m, f, w: node("GuidersPAG", model=m, scale=3.0), ATTENTION),
    Case("SEG-sigma10", lambda m, f, w: node("GuidersSEG", model=m, scale=3.0, blur_sigma=10.0), ATTENTION),
    Case("SEG-sigma99999", lambda m, f, w: node("GuidersSEG", model=m, scale=3.0, blur_sigma=99999.0), ATTENTION),
    Case("SAG", lambda m, f, w: node("GuidersSAG", model=m, scale=0.5, blur_sigma=2.0), ("sd15",)),
    Case("SLG-block", lambda m, f, w: node("GuidersSLG", model=m, scale=3.0, layers="1", mode="block",
                                           start_percent=0.0, end_percent=1.0), BLOCKS),
    Case("SLG-attention_scores", lambda m, f, w: node("GuidersSLG", model=m, scale=3.0, layers="1",
                                                      mode="attention_scores", start_percent=0.0, end_percent=1.0),
         BLOCKS),
    Case("Autoguidance", _autoguidance, ALL),
    Case("PAG+SEG+APG+Rescale", _stack, ATTENTION),
]

CASE_FAMILY = [pytest.param(case, family, id=f"{case.name}-{family}") for case in CASES for family in case.families]


@pytest.fixture(autouse=True)
def _pack(guiders_pack):
    return guiders_pack


def run(model, family: str, cfg: float, h: int, w: int) -> torch.Tensor:
    positive, negative = make_conditioning(family, seed=1)
    latent = make_latent(family, h=h, w=w, seed=2)
    return sample(model, positive, negative, latent, cfg=cfg, steps=STEPS, seed=3)


def test_the_declared_families_are_the_ones_tested(guiders_pack) -> None:
    # If the pack adds a family to a method, this file must grow with it (and the other way round).
    import sys

    # The families each method supports, as nodes/common.py derives them from the family records.
    module = sys.modules[guiders_pack["GuidersPAG"].__module__.rsplit(".", 1)[0] + ".common"]
    assert tuple(FAMILY_OF_POOL[f] for f in module.ATTENTION_FAMILIES if f in FAMILY_OF_POOL) == ATTENTION
    assert tuple(FAMILY_OF_POOL[f] for f in module.BLOCK_FAMILIES if f in FAMILY_OF_POOL) == BLOCKS


@pytest.mark.parametrize(("case", "family"), CASE_FAMILY)
def test_node_changes_the_result_and_stays_finite(tiny_model, weak_model_of, case: Case, family: str) -> None:
    model = tiny_model(family)
    patched = case.build(model, family, weak_model_of)

    assert_effect(run(patched, family, case.cfg, 8, 8), run(model, family, case.cfg, 8, 8))


@pytest.mark.parametrize("blur_sigma", [10.0, 99999.0])
@pytest.mark.parametrize(("h", "w"), [(16, 24), (24, 16)])
@pytest.mark.parametrize("family", ATTENTION)
def test_seg_on_a_non_square_latent(tiny_model, family: str, h: int, w: int, blur_sigma: float) -> None:
    model = tiny_model(family)
    patched = node("GuidersSEG", model=model, scale=3.0, blur_sigma=blur_sigma)

    assert_effect(run(patched, family, CFG, h, w), run(model, family, CFG, h, w))
