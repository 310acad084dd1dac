"""Every guidance node on every model family it supports (tiny SD1.5 UNet, SD3 MMDiT, Flux DiT), through a real
KSampler run: the result is finite and differs clearly from plain CFG at the same sampler cfg. The settings
each node runs with, and on which families, are its effect cases in tests/host/node_table.py.

The families a node supports are the pack's own declaration (ATTENTION_FAMILIES / BLOCK_FAMILIES in
nodes/common.py, unet = SD1.5 here; the video DiTs are in test_video_dits.py); test_node_errors.py
checks that the others are refused.
SEG also runs on a non-square latent, where its query blur needs the token grid's true height and width.

Host behaviour these tests depend on (ComfyUI 0.8.0): KSampler with cfg != 1 evaluates cond and uncond;
Flux takes a guidance embedding from the conditioning (FluxGuidance), so a sampler cfg > 1 still runs CFG.
"""

from __future__ import annotations

import pytest
import torch
from harness import sample
from node_table import IMAGE, EffectCase, effect_params
from support import CFG, STEPS, assert_effect, node
from tiny_models import make_conditioning, make_latent

FAMILY_OF_POOL = {"unet": "sd15", "sd3": "sd3", "flux": "flux"}


ATTENTION = ("sd15", "sd3", "flux")
BLOCKS = ("sd3", "flux")


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


@pytest.mark.parametrize(("case", "family"), effect_params(IMAGE))
def test_node_changes_the_result_and_stays_finite(tiny_model, weak_model_of, case: EffectCase, family: str) -> None:
    model = tiny_model(family)
    patched = case.build(model, weak_model_of(family))

    assert_effect(run(patched, family, case.cfg, 8, 8), run(model, family, case.cfg, 8, 8))


@pytest.mark.parametrize("blur_sigma", [10.0, 99999.0])
@pytest.mark.parametrize(("h", "w"), [(16, 24), (24, 16)])
@pytest.mark.parametrize("family", ATTENTION)
def test_seg_on_a_non_square_latent(tiny_model, family: str, h: int, w: int, blur_sigma: float) -> None:
    model = tiny_model(family)
    patched = node("GuidersSEG", model=model, scale=3.0, blur_sigma=blur_sigma)

    assert_effect(run(patched, family, CFG, h, w), run(model, family, CFG, h, w))
