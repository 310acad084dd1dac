"""The pack on Mochi and AuraFlow (tiny_models.make_mochi / make_auraflow, sampled by a real KSampler), and the
recommended layers per model size (LTX-Video 2B vs 13B).

1. The tiny models: ComfyUI's own classes (supported_models.GenmoMochi / AuraFlow, shrunk), their real
   noise schedules, one forward of cond + uncond per step, finite and deterministic results.
2. The records: AuraFlow's ``comfy.ldm.aura.mmdit.MMDiT`` is its own family, never SD3's; "auto" picks the
   recommended layers for the model's size.
3. Every node that declares the families gives a finite result clearly different from plain CFG
   (node_table.effect_params(BLOCKPATCH)).
4. Parity: SLG ``block`` with ComfyUI's SkipLayerGuidanceDiT (double and, on AuraFlow, single layers);
   identity self-attention (PAG: the video/image rows only; SLG attention_scores: every row) and SEG
   (the image queries blurred on the family's token grid) against references written here from the
   definitions, applied post-CFG as ComfyUI's PerturbedAttentionGuidance does on UNets.
5. Forward costs: the perturbed branch rides in the cond/uncond forward (one call of 3 per step).

Host behaviour these tests depend on (ComfyUI 0.8.0):
- ``comfy/ldm/genmo/joint_model/asymm_models_joint.py``: each ``AsymmetricJointBlock`` is called through
  ``patches_replace["dit"][("double_block", i)]`` with ``{img, txt, vec, rope_cos, rope_sin, num_tokens,
  transformer_options}``; its ``attn`` (AsymmetricAttention) makes ONE ``optimized_attention`` call over
  ``cat(video, text[:num_tokens])`` (video first; q, k, v as (B, heads, L, D), ``skip_reshape``) with the
  transformer_options, so through ``optimized_attention_override``. ``model_base.GenmoMochi`` turns the
  T5 ``attention_mask`` into ``num_tokens`` = the unpadded prompt length. No ``block_index`` is set.
- ``comfy/ldm/aura/mmdit.py``: double layers (MMDiTBlock) through ``("double_block", i)`` with
  ``{img, txt, vec}``, one attention over ``cat(text, image)`` where the text is 8 register tokens and the
  prompt; single layers (DiTBlock) through ``("single_block", i)`` with ``{img: cat(registers, text,
  image), vec}``; both pass the transformer_options to ``optimized_attention``. No ``block_index``.
- ``comfy/supported_models.py``: GenmoMochi flow shift 6, AuraFlow flow shift 1.73 (ModelSamplingDiscreteFlow).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from harness import ForwardCounter, sample, scheduler_sigmas
from node_table import BLOCKPATCH, EffectCase, effect_params
from references import attention_override_during_pass, inside_module, perturbed_pass_reference
from support import CFG, MIN_EFFECT, STEPS, assert_effect, assert_parity, node, pack_module, relative_error
from tiny_models import make_conditioning, make_latent, make_ltxv

from guidance_core.perturb import smooth_queries

COND, UNCOND = 0, 1


@dataclass(frozen=True)
class Family:
    """What the tests need to know of a family, from the host's code (not from the pack)."""

    name: str
    diffusion_model: str  # "module:Class"
    shift: float
    image_tokens: int  # of the test latent: (1, C, 3, 8, 8) for Mochi, (1, C, 8, 8) for AuraFlow, patch 2
    text_tokens: int  # in the joint attention sequence: Mochi the unpadded prompt, AuraFlow registers + prompt
    text_first: bool
    grid: tuple[int, int]
    frames: int
    attention_of: Callable  # (diffusion_model, layer name) -> the module making the block's joint attention


def _mochi_attention(dm, layer: str):
    return dm.blocks[int(layer)].attn


def _auraflow_attention(dm, layer: str):
    kind, _, index = layer.rpartition(".")
    return (dm.single_layers if kind == "single" else dm.double_layers)[int(index)].attn


FAMILIES = {
    # 16 prompt tokens of which the last 4 are padding: Mochi attends to 12 (crop_y).
    "mochi": Family("Mochi", "comfy.ldm.genmo.joint_model.asymm_models_joint:AsymmDiTJoint", 6.0, 48, 12, False,
                    (4, 4), 3, _mochi_attention),
    "auraflow": Family("AuraFlow", "comfy.ldm.aura.mmdit:MMDiT", 1.73, 16, 8 + 16, True, (4, 4), 1,
                       _auraflow_attention),
}
PER_FAMILY = pytest.mark.parametrize("family", BLOCKPATCH)


def run(model, family: str, cfg: float = CFG) -> torch.Tensor:
    positive, negative = make_conditioning(family, seed=1)
    return sample(model, positive, negative, make_latent(family, seed=2), cfg=cfg, steps=STEPS, seed=3)


@pytest.fixture(autouse=True)
def _pack(guiders_pack):
    return guiders_pack


@pytest.fixture(scope="module")
def plain_of(tiny_model) -> Callable:
    results: dict[str, torch.Tensor] = {}

    def get(family: str) -> torch.Tensor:
        if family not in results:
            results[family] = run(tiny_model(family), family)
        return results[family]

    return get




# ---------------------------------------------------------------------------------------------------------
# The tiny models and the records


@PER_FAMILY
def test_tiny_model_is_the_hosts_class_with_its_real_schedule_one_call_per_step_and_deterministic(
    tiny_model, family: str
) -> None:
    model = tiny_model(family)
    expected = FAMILIES[family]
    dm = model.model.diffusion_model
    sigmas = scheduler_sigmas(model, steps=STEPS)
    with ForwardCounter(model) as counter:
        out = run(model, family)

    assert f"{type(dm).__module__}:{type(dm).__qualname__}" == expected.diffusion_model
    assert float(model.get_model_object("model_sampling").shift) == pytest.approx(expected.shift)
    assert sigmas[0].item() == pytest.approx(1.0, rel=1e-5) and sigmas[-1].item() == 0.0
    assert out.shape == make_latent(family).shape and torch.isfinite(out).all()
    assert counter.per_step() == [[2]] * STEPS
    assert torch.equal(out, run(model, family))
    assert relative_error(out, run(model, family, cfg=1.0)) > MIN_EFFECT, "the prompt does not matter"


def test_auraflow_has_its_own_record_never_sd3s(guiders_pack, tiny_model) -> None:
    # Both classes are named MMDiT: a match by bare class name took AuraFlow for SD3 (no joint_blocks).
    layers = pack_module(guiders_pack, "host.layers")
    model = tiny_model("auraflow")

    assert layers.model_family(model) == "auraflow"
    assert layers.model_family(tiny_model("sd3")) == "sd3"
    assert [str(layer) for layer in layers.model_layers(model)] == ["double.0", "double.1", "single.0", "single.1"]


@PER_FAMILY
def test_the_families_are_declared_for_pag_seg_and_slg_and_refused_by_sag(guiders_pack, tiny_model, family) -> None:
    common = pack_module(guiders_pack, "common")
    assert family in common.PAG_FAMILIES and family in common.ATTENTION_FAMILIES and family in common.BLOCK_FAMILIES
    with pytest.raises(ValueError, match=rf"GuidersSAG: .*\({FAMILIES[family].name}\) is not supported.*UNet"):
        node("GuidersSAG", model=tiny_model(family), scale=0.5, blur_sigma=2.0)


def test_auto_picks_the_stg_block_for_the_ltxv_models_size(guiders_pack) -> None:
    # LTX-Video 2B has 28 blocks: STGuidance's block 19; 13B has 48: Lightricks' 13B config skips block 28.
    layers = pack_module(guiders_pack, "host.layers")
    families = pack_module(guiders_pack, "host.families")
    for blocks, expected in ((28, "double.19"), (48, "double.28")):
        model = make_ltxv(num_layers=blocks)
        for method in (families.PAG, families.SEG, families.SLG):
            assert [str(layer) for layer in layers.parse_layers("auto", model, "layers", method)] == [expected]
    summary = families.recommended_summary(families.SLG)
    assert "LTXV (LTX-Video): 19 (2B), 28 (13B)" in summary, summary


# ---------------------------------------------------------------------------------------------------------
# Every node that declares these families changes the result


@pytest.mark.parametrize(("case", "family"), effect_params(BLOCKPATCH))
def test_node_changes_the_result_and_stays_finite(tiny_model, weak_model_of, family: str, case: EffectCase) -> None:
    model = tiny_model(family)
    patched = case.build(model, weak_model_of(family))

    assert_effect(run(patched, family, cfg=case.cfg), run(model, family, cfg=case.cfg))


# ---------------------------------------------------------------------------------------------------------
# SLG block: parity with ComfyUI's SkipLayerGuidanceDiT

BLOCKS = [
    pytest.param("mochi", "1", "1", "", id="mochi-block1"),
    pytest.param("auraflow", "1", "1", "", id="auraflow-double1"),
    pytest.param("auraflow", "single.1", "", "1", id="auraflow-single1"),
]


@pytest.mark.parametrize(("family", "layers", "double_layers", "single_layers"), BLOCKS)
def test_slg_block_matches_skip_layer_guidance_dit(
    tiny_model, plain_of, family: str, layers: str, double_layers: str, single_layers: str
) -> None:
    """Catches skipping another block, or the wrong chunk (the uncond instead of the extra cond branch)."""
    model = tiny_model(family)
    ours = node("GuidersSLG", model=model, scale=3.0, layers=layers, mode="block", start_percent=0.0,
                end_percent=1.0, rescale=0.0)
    builtin = node("SkipLayerGuidanceDiT", model=model, double_layers=double_layers, single_layers=single_layers,
                   scale=3.0, start_percent=0.0, end_percent=1.0, rescaling_scale=0.0)

    assert_parity(run(ours, family), run(builtin, family), plain_of(family))


# ---------------------------------------------------------------------------------------------------------
# Identity self-attention and SEG against references from the definitions


def image_rows(family: str, sequence: int) -> slice:
    """The image (video) tokens' rows of the block's joint attention sequence of ``sequence`` tokens."""
    expected = FAMILIES[family]
    assert sequence == expected.image_tokens + expected.text_tokens, "the host's sequence is not as documented"
    return slice(expected.text_tokens, None) if expected.text_first else slice(0, expected.image_tokens)


def in_joint_attention(family: str, layer: str, change: Callable) -> Callable:
    """A pass in which the one attention call of ``layer``'s joint-attention module (found by module
    boundaries: these families set no block_index) is ``change(func, q, k, v, *args, **kwargs)``."""
    inside = {"module": False}

    def override(func, q, k, v, *args, **kwargs):
        if not inside["module"]:
            return func(q, k, v, *args, **kwargs)
        assert kwargs.get("skip_reshape") and q.ndim == 4  # (B, heads, L, D)
        return change(func, q, k, v, *args, **kwargs)

    return inside_module(lambda dm: FAMILIES[family].attention_of(dm, layer), inside,
                         attention_override_during_pass(override))


def rows_return_values(family: str, layer: str, every_row: bool) -> Callable:
    """PAG (Ahn et al. 2024, arXiv:2403.17377, Eq. 9-10) on a joint attention: the attention map's rows of
    the image tokens are the identity, so their outputs are their own V; the text tokens' rows attend as
    before. ``every_row``: the whole map is the identity (SLG attention_scores)."""

    def change(func, q, k, v, *args, **kwargs):
        out = func(q, k, v, *args, **kwargs).clone()  # (B, L, heads·D)
        values = v.transpose(1, 2).reshape(out.shape)
        rows = slice(None) if every_row else image_rows(family, q.shape[2])
        out[:, rows] = values[:, rows]
        return out

    return in_joint_attention(family, layer, change)


def queries_blurred(family: str, layer: str, blur_sigma: float) -> Callable:
    """SEG (Hong 2024, arXiv:2408.00760): the image tokens' queries Gaussian-blurred over their token grid,
    each frame on its own (the pack's core ``smooth_queries``, itself checked against SEG-SDXL in tests/core);
    the text tokens' queries unchanged."""
    expected = FAMILIES[family]

    def change(func, q, k, v, *args, **kwargs):
        start = image_rows(family, q.shape[2]).start or 0
        q = smooth_queries(q, expected.grid, blur_sigma, image_token_start=start, frames=expected.frames)
        return func(q, k, v, *args, **kwargs)

    return in_joint_attention(family, layer, change)


IDENTITY_CASES = [
    pytest.param(family, layers, node_id, id=f"{family}-{layers}-{node_id}")
    for family, layers in (("mochi", "1"), ("auraflow", "1"), ("auraflow", "single.1"))
    for node_id in ("GuidersPAG", "GuidersSLG-attention_scores")
]


@pytest.mark.parametrize(("family", "layers", "node_id"), IDENTITY_CASES)
def test_identity_self_attention_matches_a_reference_from_the_definition(
    tiny_model, plain_of, family: str, layers: str, node_id: str
) -> None:
    """Catches perturbing the text rows too under PAG (Mochi's text after the video, counted as its
    ``num_tokens``; AuraFlow's registers and prompt before the image, also in its single layers), the
    wrong block, and the perturbation landing on another chunk than the extra cond branch."""
    model = tiny_model(family)
    if node_id == "GuidersPAG":
        ours = node("GuidersPAG", model=model, scale=3.0, layers=layers, start_percent=0.0, end_percent=1.0)
    else:
        ours = node("GuidersSLG", model=model, scale=3.0, layers=layers, mode="attention_scores",
                    start_percent=0.0, end_percent=1.0, rescale=0.0)
    reference = perturbed_pass_reference(model, rows_return_values(family, layers, node_id != "GuidersPAG"), 3.0)

    assert_parity(run(ours, family), run(reference, family), plain_of(family))


@pytest.mark.parametrize("blur_sigma", [2.0, 99999.0])
# AuraFlow single.1: the tiny model's SEG effect there is below MIN_EFFECT (the test would be vacuous).
@pytest.mark.parametrize(("family", "layers"), [("mochi", "1"), ("auraflow", "1")])
def test_seg_blurs_the_image_queries_as_a_reference_from_the_definition(
    tiny_model, plain_of, family: str, layers: str, blur_sigma: float
) -> None:
    """Catches a wrong token grid (where the image tokens start, their height and width, the frames)."""
    model = tiny_model(family)
    ours = node("GuidersSEG", model=model, scale=3.0, blur_sigma=blur_sigma, layers=layers, start_percent=0.0,
                end_percent=1.0)
    reference = perturbed_pass_reference(model, queries_blurred(family, layers, blur_sigma), scale=3.0)

    assert_parity(run(ours, family), run(reference, family), plain_of(family))


# ---------------------------------------------------------------------------------------------------------
# Forward costs


@pytest.mark.parametrize("node_id", ["GuidersPAG", "GuidersSLG"])
@PER_FAMILY
def test_the_perturbed_branch_rides_in_the_one_forward_per_step(tiny_model, plain_of, family: str, node_id) -> None:
    inputs = {"layers": "1", "mode": "block"} if node_id == "GuidersSLG" else {"layers": "1"}
    patched = node(node_id, model=tiny_model(family), scale=3.0, start_percent=0.0, end_percent=1.0, **inputs)

    with ForwardCounter(patched) as counter:
        out = run(patched, family)

    assert counter.per_step() == [[3]] * STEPS
    for call in counter.calls:
        indices = sorted(call.cond_or_uncond)
        assert indices[:2] == [COND, UNCOND] and indices[2] >= 2, call.cond_or_uncond
    assert relative_error(out, plain_of(family)) > MIN_EFFECT

