"""The pack on the video DiTs: tiny random-weight Wan 2.1, LTXV and HunyuanVideo models (tiny_models.make_wan /
make_ltxv / make_hunyuan_video; (1, C, 3, 8, 8) latents) sampled by a real KSampler.

1. The tiny models themselves: the family's real noise schedule, one forward of cond + uncond per step,
   finite and deterministic results that depend on the prompt.
2. Every node that declares the family (PAG_FAMILIES / BLOCK_FAMILIES / the CFG rules in
   nodes/common.py) gives a finite result clearly different from plain CFG at the same cfg.
3. Parity with ComfyUI's own nodes where they exist: SkipLayerGuidanceDiT (SLG ``block``, an extra cond pass;
   double and single blocks) and SkipLayerGuidanceDiTSimple (SLG on the negative branch). Identity
   self-attention (PAG, SLG ``attention_scores``) against references written here from the PAG paper's
   definition, each perturbing the model in its own way: for Wan and LTXV a forward hook on the block's
   self-attention module that returns ``out_proj(V)``; for HunyuanVideo's joint attention (image tokens
   first, text after) an attention override that gives the image tokens' rows V and leaves the text tokens'
   rows as they are. Applied post-CFG as ComfyUI's PerturbedAttentionGuidance does on UNets.
4. Forward costs: the extra branches ride in the cond/uncond forward (PAG + cfg: one call of 3 per step).
5. SAG, which needs a UNet's attention map, refuses them and names what it supports.

Host behaviour these tests depend on (ComfyUI 0.8.0):
- Every family's forward calls ``patches_replace["dit"][("double_block", i)]`` (HunyuanVideo also
  ``("single_block", i)``) with ``{img, txt, ..., transformer_options}``; self-attention runs through
  ``optimized_attention`` and so through ``optimized_attention_override``.
- ``comfy/ldm/wan/model.py``: each block runs ``self_attn`` (WanSelfAttention: ``o(attention(q, k, v(x)))``)
  then cross-attention to the text. ``comfy/ldm/lightricks/model.py``: each block runs ``attn1`` (self:
  ``to_out(attention(q, k, to_v(x)))``), ``attn2`` (cross, masked by the T5 attention mask) and ``ff``,
  updating its input in place; the model needs the ``attention_mask`` its T5 gives.
  ``comfy/ldm/hunyuan_video/model.py``: Flux-style double and single blocks whose joint attention puts the
  image tokens first (``flipped_img_txt``; single blocks ``cat(img, txt)``); it sets
  ``transformer_options["block_type"]`` and ``["block_index"]`` before each block and passes q, k, v as
  (B, heads, L, D) with ``skip_reshape=True``.
- ``comfy/supported_models.py``: WAN21_T2V (flow, shift 8), LTXV (flux-type flow, shift 2.37), HunyuanVideo
  (flow, shift 7); SkipLayerGuidanceDiT(Simple) is active for sigma_end <= σ <= sigma_start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from harness import ForwardCounter, assert_window_is_partial, run_node, sample, scheduler_sigmas
from node_table import EffectCase, effect_params
from references import (
    attention_override_during_pass,
    inside_module,
    joint_attention_rows_return_values,
    modules_return,
    perturbed_pass_reference,
)
from support import CFG, MIN_EFFECT, STEPS, assert_effect, assert_parity, node, relative_error
from tiny_models import VIDEO_FAMILIES, family_spec, make_conditioning, make_latent

from guidance_core.perturb import smooth_queries

COND, UNCOND = 0, 1  # calc_cond_batch's indices of the positive and negative conds


@dataclass(frozen=True)
class VideoFamily:
    """What the tests need to know of a family, from the host's code (not from the pack)."""

    name: str  # as the pack's error messages name it
    diffusion_model: str  # class name
    sampling: str  # model_sampling class name
    shift: float
    image_tokens: int  # of the (1, C, 3, 8, 8) test latent
    text_in_self_attention: bool  # joint attention (HunyuanVideo) vs separate cross-attention
    has_single_blocks: bool


FAMILIES = {
    # Patch (1, 2, 2): 3 frames of 4x4 tokens.
    "wan": VideoFamily("Wan", "WanModel", "ModelSamplingDiscreteFlow", 8.0, 48, False, False),
    # Patch 1: one token per latent pixel.
    "ltxv": VideoFamily("LTXV", "LTXVModel", "ModelSamplingFlux", 2.37, 192, False, False),
    "hunyuan_video": VideoFamily("HunyuanVideo", "HunyuanVideo", "ModelSamplingDiscreteFlow", 7.0, 48, True, True),
}
PER_FAMILY = pytest.mark.parametrize("family", VIDEO_FAMILIES)


def run(model, family: str, cfg: float = CFG, batch: int = 1, positive_seed: int = 1) -> torch.Tensor:
    positive, negative = make_conditioning(family, seed=positive_seed)
    latent = make_latent(family, batch=batch, seed=2)
    return sample(model, positive, negative, latent, cfg=cfg, steps=STEPS, seed=3)


def run_counted(model, family: str, cfg: float = CFG) -> tuple[torch.Tensor, ForwardCounter]:
    with ForwardCounter(model) as counter:
        out = run(model, family, cfg=cfg)
    return out, counter


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
# The tiny models


@PER_FAMILY
def test_tiny_video_model_keeps_the_real_noise_schedule(tiny_model, family: str) -> None:
    # Random weights go into the network only; model_sampling is the family's own flow schedule.
    model = tiny_model(family)
    expected = FAMILIES[family]
    sampling = model.get_model_object("model_sampling")
    sigmas = scheduler_sigmas(model, steps=STEPS)

    assert type(model.model.diffusion_model).__name__ == expected.diffusion_model
    assert expected.sampling in [cls.__name__ for cls in type(sampling).__mro__]
    assert float(sampling.shift) == pytest.approx(expected.shift)
    assert sigmas[0].item() == pytest.approx(1.0, rel=1e-5)
    assert sigmas[-1].item() == 0.0
    assert (sigmas[1:] < sigmas[:-1]).all(), f"the schedule is not strictly decreasing: {sigmas}"


def test_wan_flow_schedule_is_the_shifted_one(tiny_model) -> None:
    # σ(t) = shift·t / (1 + (shift − 1)·t) (SD3 paper, Eq. 23), so 50 % of the way σ = 4 / 4.5 at shift 8.
    sampling = tiny_model("wan").get_model_object("model_sampling")
    assert float(sampling.percent_to_sigma(0.5)) == pytest.approx(8 * 0.5 / (1 + 7 * 0.5), rel=1e-5)


@PER_FAMILY
def test_ksampler_on_a_tiny_video_model_is_one_call_of_two_per_step_finite_and_deterministic(
    tiny_model, family: str
) -> None:
    model = tiny_model(family)
    out, counter = run_counted(model, family)
    again = run(model, family)
    cond_only = run(model, family, cfg=1.0)
    latent = make_latent(family, seed=2)

    assert out.shape == latent.shape == (1, family_spec(family).latent_channels, 3, 8, 8)
    assert torch.isfinite(out).all()
    assert (out - latent).abs().mean() > 0.1, "sampling left the latent (nearly) unchanged"
    assert out.std() > 0.1, "the model collapsed its output to a constant"
    assert counter.per_step() == [[2]] * STEPS, "cond and uncond should run as one forward of batch 2"
    assert all(set(call.cond_or_uncond) == {COND, UNCOND} for call in counter.calls)
    assert torch.equal(out, again), "the same model, prompt and seed gave another result"
    # The prompt matters, so guidance has something to amplify.
    assert relative_error(out, cond_only) > MIN_EFFECT, "cfg 5 and cfg 1 give (nearly) the same latent"


@PER_FAMILY
def test_a_latent_batch_of_two_samples_each_video(tiny_model, family: str) -> None:
    out = run(tiny_model(family), family, batch=2)

    assert out.shape[0] == 2
    assert torch.isfinite(out).all()
    assert relative_error(out[0], out[1]) > MIN_EFFECT, "two noise draws gave the same video"


# ---------------------------------------------------------------------------------------------------------
# Every node that declares these families changes the result


def test_the_video_families_are_declared_where_this_file_tests_them(guiders_pack) -> None:
    # If the pack drops a family from a method (or adds one to SEG), this file must change with it.
    import sys

    # The families each method supports, as nodes/common.py derives them from the family records.
    module = sys.modules[guiders_pack["GuidersPAG"].__module__.rsplit(".", 1)[0] + ".common"]
    for family in VIDEO_FAMILIES:
        assert family in module.PAG_FAMILIES and family in module.BLOCK_FAMILIES
        assert family in module.ATTENTION_FAMILIES


@pytest.mark.parametrize(("case", "family"), effect_params(VIDEO_FAMILIES))
def test_node_changes_the_result_on_video_models_and_stays_finite(
    tiny_model, weak_model_of, family: str, case: EffectCase
) -> None:
    model = tiny_model(family)
    patched = case.build(model, weak_model_of(family))

    assert_effect(run(patched, family, cfg=case.cfg), run(model, family, cfg=case.cfg))


# ---------------------------------------------------------------------------------------------------------
# Parity with ComfyUI's own nodes

SLG_WINDOWS = [pytest.param(0.0, 1.0, id="always"), pytest.param(0.2, 0.6, id="window-0.2-0.6")]
BLOCKS = [pytest.param(family, "1", "1", "", id=f"{family}-block1") for family in VIDEO_FAMILIES] + [
    pytest.param("hunyuan_video", "single.1", "", "1", id="hunyuan_video-single1"),
]


@pytest.mark.parametrize(("start", "end"), SLG_WINDOWS)
@pytest.mark.parametrize(("family", "layers", "double_layers", "single_layers"), BLOCKS)
def test_slg_block_matches_skip_layer_guidance_dit(
    tiny_model, plain_of, family: str, layers: str, double_layers: str, single_layers: str, start: float, end: float
) -> None:
    model = tiny_model(family)
    assert_window_is_partial(model, start, end, STEPS)
    ours = node("GuidersSLG", model=model, scale=3.0, layers=layers, mode="block", start_percent=start,
                end_percent=end, rescale=0.0)
    builtin = node("SkipLayerGuidanceDiT", model=model, double_layers=double_layers, single_layers=single_layers,
                   scale=3.0, start_percent=start, end_percent=end, rescaling_scale=0.0)

    assert_parity(run(ours, family), run(builtin, family), plain_of(family))


@PER_FAMILY
def test_slg_on_the_negative_branch_matches_skip_layer_guidance_dit_simple(tiny_model, plain_of, family) -> None:
    model = tiny_model(family)
    ours = node("GuidersSLG", model=model, scale=3.0, layers="1", mode="block", start_percent=0.0,
                end_percent=1.0, rescale=0.0, target="negative branch")
    builtin = node("SkipLayerGuidanceDiTSimple", model=model, double_layers="1", single_layers="",
                   start_percent=0.0, end_percent=1.0)

    assert_parity(run(ours, family), run(builtin, family), plain_of(family))


# ---------------------------------------------------------------------------------------------------------
# Identity self-attention against references written from the definition


def self_attention_returns_values(family: str, block_index: int) -> Callable:
    """Identity attention map in a block whose self-attention is its own module: it returns out_proj(V)."""
    if family == "wan":  # WanSelfAttention: o(attention(q, k, v(x)))
        return modules_return(lambda dm: [dm.blocks[block_index].self_attn], lambda m, x, out: m.o(m.v(x)))
    # LTXV's attn1 (CrossAttention without context): to_out(attention(q, k, to_v(x)))
    return modules_return(lambda dm: [dm.transformer_blocks[block_index].attn1],
                          lambda m, x, out: m.to_out(m.to_v(x)))


def video_queries_blurred(family: str, block_index: int, blur_sigma: float) -> Callable:
    """SEG (Hong 2024, arXiv:2408.00760) on a video DiT, each frame as the paper blurs an image: inside the
    block's self-attention, the queries of each frame's 4x4 token grid are Gaussian-blurred (the pack's
    core ``smooth_queries``, itself checked against SEG-SDXL in tests/core). Wan and LTXV: the self-
    attention module's attention call (its only one), found by module boundaries; HunyuanVideo: the joint
    attention the host marks with block_type/block_index, image tokens first."""
    grid = (8, 8) if family == "ltxv" else (8 // 2, 8 // 2)  # LTXV: patch 1; Wan, HunyuanVideo: 2x2
    frames = family_spec(family).latent_frames

    def blurred(q):
        return smooth_queries(q, grid, blur_sigma, image_token_start=0, frames=frames)

    if FAMILIES[family].text_in_self_attention:
        def override(func, q, k, v, *args, **kwargs):
            options = kwargs.get("transformer_options") or {}
            if options.get("block_type") == "double" and options.get("block_index") == block_index:
                q = blurred(q)  # (B, heads, L, D): the image tokens come first
            return func(q, k, v, *args, **kwargs)

        return attention_override_during_pass(override)

    inside = {"module": False}

    def override(func, q, k, v, *args, **kwargs):
        return func(blurred(q) if inside["module"] else q, k, v, *args, **kwargs)  # q: (B, L, heads·D)

    def module_of(dm):
        return dm.blocks[block_index].self_attn if family == "wan" else dm.transformer_blocks[block_index].attn1

    return inside_module(module_of, inside, attention_override_during_pass(override))


@pytest.mark.parametrize("blur_sigma", [2.0, 99999.0])
@PER_FAMILY
def test_seg_blurs_each_frame_as_a_reference_from_the_definition(tiny_model, plain_of, family: str, blur_sigma):
    model = tiny_model(family)
    ours = node("GuidersSEG", model=model, scale=3.0, blur_sigma=blur_sigma, layers="1", start_percent=0.0,
                end_percent=1.0)

    reference = perturbed_pass_reference(model, video_queries_blurred(family, 1, blur_sigma), scale=3.0)

    assert_parity(run(ours, family), run(reference, family), plain_of(family))


IDENTITY_CASES = [
    pytest.param(family, layers, node_id, id=f"{family}-{layers}-{node_id}")
    for family in VIDEO_FAMILIES
    for layers in (["1", "single.1"] if FAMILIES[family].has_single_blocks else ["1"])
    for node_id in ("GuidersPAG", "GuidersSLG-attention_scores")
]


@pytest.mark.parametrize(("family", "layers", "node_id"), IDENTITY_CASES)
def test_identity_self_attention_matches_a_reference_from_the_definition(
    tiny_model, plain_of, family: str, layers: str, node_id: str
) -> None:
    model = tiny_model(family)
    if node_id == "GuidersPAG":
        ours = node("GuidersPAG", model=model, scale=3.0, layers=layers, start_percent=0.0, end_percent=1.0)
    else:
        ours = node("GuidersSLG", model=model, scale=3.0, layers=layers, mode="attention_scores",
                    start_percent=0.0, end_percent=1.0, rescale=0.0)
    expected = FAMILIES[family]
    if expected.text_in_self_attention:
        block_type, index = ("single", 1) if layers.startswith("single") else ("double", int(layers))
        # Image tokens first, then the text.
        rows = slice(0, expected.image_tokens) if node_id == "GuidersPAG" else slice(None)
        perturbed = joint_attention_rows_return_values(block_type, index, rows)
    else:
        perturbed = self_attention_returns_values(family, int(layers))

    reference = perturbed_pass_reference(model, perturbed, scale=3.0)

    assert_parity(run(ours, family), run(reference, family), plain_of(family))


@pytest.mark.parametrize("family", [f for f in VIDEO_FAMILIES if not FAMILIES[f].text_in_self_attention])
def test_pag_leaves_cross_attention_alone_when_text_and_image_token_counts_coincide(tiny_model, family) -> None:
    # As many text tokens as image tokens: token counts cannot tell self- and cross-attention apart.
    model = tiny_model(family)
    tokens = FAMILIES[family].image_tokens
    spec = family_spec(family)
    generator = torch.Generator().manual_seed(1)

    def conditioning():
        extras = {"attention_mask": torch.ones(1, tokens, dtype=torch.long)} if spec.padded_text_tokens else {}
        return [[torch.randn(1, tokens, spec.context_dim, generator=generator), extras]]

    positive, negative = conditioning(), conditioning()
    latent = make_latent(family, seed=2)
    reference_model = perturbed_pass_reference(model, self_attention_returns_values(family, 1), 3.0)
    ours = node("GuidersPAG", model=model, scale=3.0, layers="1", start_percent=0.0, end_percent=1.0)
    plain_result = sample(model, positive, negative, latent, cfg=CFG, seed=3)
    reference = sample(reference_model, positive, negative, latent, cfg=CFG, seed=3)
    assert_parity(sample(ours, positive, negative, latent, cfg=CFG, seed=3), reference, plain_result)


# ---------------------------------------------------------------------------------------------------------
# Forward costs


@PER_FAMILY
def test_guiders_pag_with_cfg_is_one_call_of_three_per_step(tiny_model, plain_of, family: str) -> None:
    pag_model = node("GuidersPAG", model=tiny_model(family), scale=3.0)

    out, counter = run_counted(pag_model, family)

    assert counter.per_step() == [[3]] * STEPS
    for call in counter.calls:
        indices = sorted(call.cond_or_uncond)
        assert indices[:2] == [COND, UNCOND] and indices[2] >= 2, call.cond_or_uncond
    assert relative_error(out, plain_of(family)) > MIN_EFFECT


@PER_FAMILY
def test_guiders_slg_block_is_one_call_of_three_per_step(tiny_model, plain_of, family: str) -> None:
    slg_model = node("GuidersSLG", model=tiny_model(family), scale=3.0, layers="1", mode="block",
                     start_percent=0.0, end_percent=1.0)

    out, counter = run_counted(slg_model, family)

    assert counter.per_step() == [[3]] * STEPS
    assert relative_error(out, plain_of(family)) > MIN_EFFECT


@PER_FAMILY
def test_slg_on_the_negative_branch_adds_no_forward(tiny_model, plain_of, family: str) -> None:
    # SkipLayerGuidanceDiTSimple runs cond and the skipped uncond as two calls; the pack keeps one call of 2:
    # the cond and the perturbed uncond (an extra-branch index), the plain uncond is not evaluated.
    slg_model = node("GuidersSLG", model=tiny_model(family), scale=3.0, layers="1", mode="block",
                     start_percent=0.0, end_percent=1.0, target="negative branch")

    out, counter = run_counted(slg_model, family)

    assert counter.per_step() == [[2]] * STEPS
    for call in counter.calls:
        indices = sorted(call.cond_or_uncond)
        assert indices[0] == COND and indices[1] >= 2, call.cond_or_uncond
    assert relative_error(out, plain_of(family)) > MIN_EFFECT


# ---------------------------------------------------------------------------------------------------------
# SAG refuses video models


@PER_FAMILY
def test_sag_refuses_video_models_and_names_the_supported_families(tiny_model, family: str) -> None:
    supported = ("UNet",)
    with pytest.raises(ValueError) as raised:
        run_node("GuidersSAG", model=tiny_model(family), scale=0.5, blur_sigma=2.0)

    # The node's own name in the message is checked by test_node_errors.py; here: the families.
    message = str(raised.value)
    name = FAMILIES[family].name
    assert name in message and "supports" in message, message
    supports_part = message.split("supports", 1)[-1]
    assert all(s in supports_part for s in supported), message
    assert name not in supports_part, f"the message lists {name} as supported: {message}"
