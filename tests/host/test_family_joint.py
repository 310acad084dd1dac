"""The pack on Qwen-Image (and Edit), Lumina 2, Z-Image and Kandinsky 5 (video and image): tiny random-weight
models built with ComfyUI's own classes (tiny_models.make_qwen_image / make_lumina2 / make_z_image /
make_kandinsky5 / make_kandinsky5_image) sampled by a real KSampler.

1. The tiny models: the family's real noise schedule, one forward of cond + uncond per step, finite results
   that depend on the prompt.
2. Every node that declares the families (node_table.JOINT) changes the result and stays finite.
3. Identity attention (PAG, SLG ``attention_scores``), SEG, SLG ``block`` and the sublayer skips, each
   against a reference written here from the method's definition (or ComfyUI's SkipLayerGuidanceDiT where
   the host's skip works: Qwen-Image), applied post-CFG as an extra cond pass.
4. Forward costs: the perturbed branch rides in the cond/uncond forward (one call of 3 per step), and the
   block hooks do not outlive it.
5. Qwen-Image Edit: the reference image's tokens (after the image's) are left as they are, whatever their
   count; Edit 2511's timestep-zero reference modulation samples as the host does.

Host behaviour these tests depend on (ComfyUI 0.8.0; the same in 0.33.0 where noted):
- ``comfy/ldm/qwen_image/model.py``: every block calls ``patches_replace["dit"][("double_block", i)]`` with
  ``{img, txt, vec, pe, transformer_options}`` and sets ``block_type`` "double" and ``block_index`` i; its joint
  attention is one ``optimized_attention_masked`` call on ``cat(text, image [, reference images])`` with q, k, v
  as (B, heads, L, D) and ``skip_reshape=True``; ``ref_latents`` (from the conditioning's
  ``reference_latents``) are patchified and appended after the image tokens.
- ``comfy/ldm/lumina/model.py`` (NextDiT, Lumina 2 and Z-Image): the context and noise refiners run first
  without ``block_index``; then each main layer i runs with ``block_type`` "double", ``block_index`` i, on
  ``cat(caption, image)`` (Z-Image pads each to a multiple of 32), its only attention call in
  ``JointAttention`` with (B, heads, L, D) and ``skip_reshape``. No dit block patch in either version.
- ``comfy/ldm/kandinsky5/model.py``: text blocks, then visual blocks each running self-attention on the
  video tokens, cross-attention to the text, feed-forward; its dit block patch passes ``x=`` to a block
  forward that has no such argument (0.8.0 and 0.33.0), so ComfyUI's SkipLayerGuidanceDiT fails there.
- ``comfy/supported_models.py``: QwenImage (flux-type flow, shift 1.15), Lumina2 (flow, shift 6), ZImage
  (flow, shift 3), Kandinsky5 (flow, shift 10), Kandinsky5Image (flow, shift 3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from harness import ForwardCounter, assert_window_is_partial, run_node, sample, scheduler_sigmas
from node_table import JOINT, EffectCase, effect_params
from references import (
    attention_override_during_pass,
    inside_module,
    joint_attention_rows_return_values,
    modules_return,
    perturbed_pass_reference,
)
from support import CFG, MIN_EFFECT, STEPS, assert_effect, assert_parity, node, relative_error
from tiny_models import make_conditioning, make_latent, make_qwen_image

from guidance_core.perturb import smooth_queries

COND, UNCOND = 0, 1


@dataclass(frozen=True)
class JointFamily:
    """What the tests need to know of a family, from the host's code (not from the pack)."""

    name: str  # as the pack's error messages name it
    diffusion_model: str
    sampling: str
    shift: float
    blocks: str  # the attribute of the perturbable (main) blocks
    text_tokens: int | None  # tokens before the image in the block's self-attention; None: no text in it
    image_tokens: int  # of the test latent
    grid: tuple[int, int]  # the image tokens' height and width per frame
    frames: int
    sublayers: dict[str, tuple[str, ...]]
    host_skip_works: bool  # ComfyUI's SkipLayerGuidanceDiT skips a block of this family (its patch never calls
    # the block, so Kandinsky 5's broken block call does not matter to it)


QWEN_SUBLAYERS = {"attention": ("attn.to_out.0", "attn.to_add_out"), "feedforward": ("img_mlp", "txt_mlp")}
NEXTDIT_SUBLAYERS = {"attention": ("attention",), "feedforward": ("feed_forward",)}
KANDINSKY_SUBLAYERS = {"attention": ("self_attention",), "feedforward": ("feed_forward",)}

FAMILIES = {
    # 8x8 latents, 2x2 patches: 4x4 image tokens per frame; 16 text tokens.
    "qwen_image": JointFamily("Qwen-Image", "QwenImageTransformer2DModel", "ModelSamplingFlux", 1.15,
                              "transformer_blocks", 16, 16, (4, 4), 1, QWEN_SUBLAYERS, True),
    "lumina2": JointFamily("Lumina 2", "NextDiT", "ModelSamplingDiscreteFlow", 6.0, "layers", 16, 16, (4, 4), 1,
                           NEXTDIT_SUBLAYERS, False),
    # Z-Image pads the 16 caption tokens to 32 (and the 16 image tokens to 32, after them).
    "z_image": JointFamily("Lumina 2", "NextDiT", "ModelSamplingDiscreteFlow", 3.0, "layers", 32, 16, (4, 4), 1,
                           NEXTDIT_SUBLAYERS, False),
    "kandinsky5": JointFamily("Kandinsky 5", "Kandinsky5", "ModelSamplingDiscreteFlow", 10.0,
                              "visual_transformer_blocks", None, 48, (4, 4), 3, KANDINSKY_SUBLAYERS, True),
    "kandinsky5_image": JointFamily("Kandinsky 5", "Kandinsky5", "ModelSamplingDiscreteFlow", 3.0,
                                    "visual_transformer_blocks", None, 16, (4, 4), 1, KANDINSKY_SUBLAYERS, True),
}
PER_FAMILY = pytest.mark.parametrize("family", JOINT)
SCALE = 3.0


def run(model, family: str, cfg: float = CFG, positive=None, negative=None, latent=None) -> torch.Tensor:
    default_positive, default_negative = make_conditioning(family, seed=1)
    latent = make_latent(family, seed=2) if latent is None else latent
    return sample(model, positive or default_positive, negative or default_negative, latent, cfg=cfg, steps=STEPS,
                  seed=3)


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


def block_of(model, family: str, index: int):
    return getattr(model.model.diffusion_model, FAMILIES[family].blocks)[index]


# ---------------------------------------------------------------------------------------------------------
# The tiny models


@PER_FAMILY
def test_tiny_model_keeps_the_real_noise_schedule_and_samples_with_one_forward_per_step(tiny_model, family) -> None:
    model = tiny_model(family)
    expected = FAMILIES[family]
    sampling = model.get_model_object("model_sampling")
    sigmas = scheduler_sigmas(model, steps=STEPS)
    with ForwardCounter(model) as counter:
        out = run(model, family)

    assert type(model.model.diffusion_model).__name__ == expected.diffusion_model
    assert expected.sampling in [cls.__name__ for cls in type(sampling).__mro__]
    assert float(sampling.shift) == pytest.approx(expected.shift)
    assert (sigmas[1:] < sigmas[:-1]).all() and sigmas[-1].item() == 0.0
    assert torch.isfinite(out).all() and out.std() > 0.1
    assert counter.per_step() == [[2]] * STEPS
    assert torch.equal(out, run(model, family)), "the same model, prompt and seed gave another result"
    assert relative_error(out, run(model, family, cfg=1.0)) > MIN_EFFECT, "the prompt barely matters"


def test_the_joint_families_are_declared_where_this_file_tests_them(guiders_pack, tiny_model) -> None:
    import sys

    module = sys.modules[guiders_pack["GuidersPAG"].__module__.rsplit(".", 1)[0] + ".common"]
    host = sys.modules[guiders_pack["GuidersPAG"].__module__.rsplit(".", 1)[0] + ".host"]
    for family in JOINT:
        key = host.model_family(tiny_model(family))
        assert host.families.display_name(key).startswith(FAMILIES[family].name)
        assert key in module.PAG_FAMILIES and key in module.ATTENTION_FAMILIES and key in module.BLOCK_FAMILIES


@PER_FAMILY
def test_auto_layers_are_the_middle_main_block_and_the_tooltip_says_why(guiders_pack, tiny_model, family) -> None:
    # No published PAG/SEG/SLG layers for these families (field-2026.md §6): the middle of the main stack
    # (the refiners and text blocks are not in it). The tiny models have 3 main blocks: block 1.
    import sys

    host = sys.modules[guiders_pack["GuidersPAG"].__module__.rsplit(".", 1)[0] + ".host"]
    model = tiny_model(family)
    main_blocks = len(getattr(model.model.diffusion_model, FAMILIES[family].blocks))
    record = host.families.FAMILY_BY_KEY[host.model_family(model)]
    for method in ("pag", "seg", "slg"):
        layers = host.parse_layers("auto", model, "layers", method)
        assert [str(layer) for layer in layers] == [f"double.{main_blocks // 2}"]
        assert "middle of the stack" in record.recommended[method].source
    assert f"{record.display_name}: the middle block" in host.families.recommended_summary("pag")


@pytest.mark.parametrize(("case", "family"), effect_params(JOINT))
def test_node_changes_the_result_on_joint_models_and_stays_finite(tiny_model, weak_model_of, family: str,
                                                                  case: EffectCase) -> None:
    model = tiny_model(family)
    patched = case.build(model, weak_model_of(family))

    assert_effect(run(patched, family, cfg=case.cfg), run(model, family, cfg=case.cfg))


# ---------------------------------------------------------------------------------------------------------
# Identity attention against references written from the definition


def identity_attention_reference(family: str, index: int, image_rows_only: bool) -> Callable:
    """PAG (Ahn et al. 2024, arXiv:2403.17377): the self-attention map of block ``index`` is the identity
    for the image tokens' queries, whose outputs are their own V; text rows (and, on Qwen-Image Edit,
    the reference image's rows) keep their attention. ``image_rows_only=False``: every row (SLG
    attention_scores). Joint attention: an override keyed on the block_type/block_index the host sets (the
    NextDiT refiners set none, so they stay untouched). Kandinsky 5: the block's self-attention module returns
    out_layer(V)."""
    expected = FAMILIES[family]
    if expected.text_tokens is None:
        return modules_return(lambda dm: [getattr(dm, expected.blocks)[index].self_attention],
                              lambda m, x, out: m.out_layer(m.to_value(x)))
    text = expected.text_tokens
    rows = slice(text, text + expected.image_tokens) if image_rows_only else slice(None)
    return joint_attention_rows_return_values("double", index, rows)


IDENTITY_CASES = [pytest.param(family, node_id, id=f"{family}-{node_id}")
                  for family in JOINT for node_id in ("GuidersPAG", "GuidersSLG-attention_scores")]


@pytest.mark.parametrize(("family", "node_id"), IDENTITY_CASES)
def test_identity_attention_matches_a_reference_from_the_definition(tiny_model, plain_of, family: str,
                                                                   node_id: str) -> None:
    """Breaks caught (shown on a scratch copy): the text rows perturbed too (the grid at token 0; Z-Image's
    caption padding ignored; the grid guessed from the token count, which on Z-Image's padded sequence fits
    8x8 at token 0), the text rows of Qwen-Image's joint attention perturbed, the wrong block (index + 1),
    the perturbation on the other chunk."""
    model = tiny_model(family)
    if node_id == "GuidersPAG":
        ours = node("GuidersPAG", model=model, scale=SCALE, layers="1", start_percent=0.0, end_percent=1.0)
    else:
        ours = node("GuidersSLG", model=model, scale=SCALE, layers="1", mode="attention_scores",
                    start_percent=0.0, end_percent=1.0, rescale=0.0)

    reference = perturbed_pass_reference(model, identity_attention_reference(family, 1, node_id == "GuidersPAG"),
                                         SCALE)

    assert_parity(run(ours, family), run(reference, family), plain_of(family))


# ---------------------------------------------------------------------------------------------------------
# SEG against a blur of the queries on the family's token grid


def queries_blurred(family: str, index: int, blur_sigma: float) -> Callable:
    """SEG (Hong 2024, arXiv:2408.00760): inside block ``index``'s self-attention, the image tokens' queries,
    laid out frame by frame on the family's 4x4 token grid, are Gaussian-blurred (the pack's core
    ``smooth_queries``, checked against SEG-SDXL in tests/core); text and padding rows are left alone."""
    expected = FAMILIES[family]

    def blurred(q):  # (B, heads, L, D)
        return smooth_queries(q, expected.grid, blur_sigma, image_token_start=expected.text_tokens or 0,
                              frames=expected.frames)

    if expected.text_tokens is not None:
        def override(func, q, k, v, *args, **kwargs):
            options = kwargs.get("transformer_options") or {}
            if options.get("block_type") == "double" and options.get("block_index") == index:
                q = blurred(q)
            return func(q, k, v, *args, **kwargs)

        return attention_override_during_pass(override)

    inside = {"module": False}

    def override(func, q, k, v, *args, **kwargs):
        return func(blurred(q) if inside["module"] else q, k, v, *args, **kwargs)

    return inside_module(lambda dm: getattr(dm, expected.blocks)[index].self_attention, inside,
                         attention_override_during_pass(override))


@pytest.mark.parametrize("blur_sigma", [2.0, 99999.0])
@PER_FAMILY
def test_seg_blurs_the_image_token_grid_as_a_reference_from_the_definition(tiny_model, plain_of, family: str,
                                                                          blur_sigma: float) -> None:
    """Breaks caught (shown on a scratch copy): the grid starting at token 0 on the joint families (text blurred
    with the image), Z-Image's padding ignored, the frames of Kandinsky 5 video blurred as one grid."""
    model = tiny_model(family)
    ours = node("GuidersSEG", model=model, scale=SCALE, blur_sigma=blur_sigma, layers="0", start_percent=0.0,
                end_percent=1.0)

    reference = perturbed_pass_reference(model, queries_blurred(family, 0, blur_sigma), SCALE)

    assert_parity(run(ours, family), run(reference, family), plain_of(family))


# ---------------------------------------------------------------------------------------------------------
# SLG: block skip and sublayer skips

SLG_WINDOWS = [pytest.param(0.0, 1.0, id="always"), pytest.param(0.2, 0.6, id="window-0.2-0.6")]


HOST_SKIP = pytest.mark.parametrize("family", [f for f in JOINT if FAMILIES[f].host_skip_works])


@pytest.mark.parametrize(("start", "end"), SLG_WINDOWS)
@HOST_SKIP
def test_slg_block_matches_skip_layer_guidance_dit(tiny_model, plain_of, family, start, end) -> None:
    """Where ComfyUI's SkipLayerGuidanceDiT skips (its patch returns the block's inputs: Qwen-Image, and
    Kandinsky 5, whose forward takes the patch's "x" back), ours equals it; on Kandinsky 5 ours skips through
    block hooks, not the patch. Break caught (shown on a scratch copy): the skipped chunk's block output kept
    instead of its input."""
    model = tiny_model(family)
    assert_window_is_partial(model, start, end, STEPS)
    ours = node("GuidersSLG", model=model, scale=SCALE, layers="1", mode="block", start_percent=start,
                end_percent=end, rescale=0.0)
    builtin = node("SkipLayerGuidanceDiT", model=model, double_layers="1", single_layers="", scale=SCALE,
                   start_percent=start, end_percent=end, rescaling_scale=0.0)

    assert_parity(run(ours, family), run(builtin, family), plain_of(family))


@HOST_SKIP
def test_slg_on_the_negative_branch_matches_skip_layer_guidance_dit_simple(tiny_model, plain_of, family) -> None:
    model = tiny_model(family)
    ours = node("GuidersSLG", model=model, scale=SCALE, layers="1", mode="block", start_percent=0.0,
                end_percent=1.0, rescale=0.0, target="negative branch")
    builtin = node("SkipLayerGuidanceDiTSimple", model=model, double_layers="1", single_layers="",
                   start_percent=0.0, end_percent=1.0)

    assert_parity(run(ours, family), run(builtin, family), plain_of(family))


def block_returns_its_input(family: str, index: int, sigma_start: float, sigma_end: float) -> Callable:
    """SLG ``block`` (Stability AI's SD3.5 skip_layer_guidance): in passes at sigma_end ≤ σ ≤ sigma_start
    (ComfyUI's percent window, both ends in; σ as calc_cond_batch puts it in the block's transformer_options)
    the block passes its input on; outside it the pass is plain, so the term s·(cond − perturbed) is zero."""

    @contextlib.contextmanager
    def perturbed(diffusion_model, model_options):
        def pass_input_on(module, args, kwargs, output):
            sigma = float(kwargs["transformer_options"]["sigmas"].flatten()[0])
            return args[0] if sigma_end <= sigma <= sigma_start else output

        block = getattr(diffusion_model, FAMILIES[family].blocks)[index]
        handle = block.register_forward_hook(pass_input_on, with_kwargs=True)
        try:
            yield model_options
        finally:
            handle.remove()

    return perturbed


@pytest.mark.parametrize(("start", "end"), SLG_WINDOWS)
@pytest.mark.parametrize("family", [f for f in JOINT if not FAMILIES[f].host_skip_works])
def test_slg_block_matches_a_reference_from_the_definition(tiny_model, plain_of, family: str, start, end) -> None:
    """Where the host's own skip does nothing (Lumina 2 / Z-Image: no dit patch is ever called).
    Breaks caught (shown on a scratch copy): the wrong block hooked, the skipped chunk's output kept (its input
    not passed on)."""
    model = tiny_model(family)
    assert_window_is_partial(model, start, end, STEPS)
    ours = node("GuidersSLG", model=model, scale=SCALE, layers="1", mode="block", start_percent=start,
                end_percent=end, rescale=0.0)
    sampling = model.get_model_object("model_sampling")
    sigma_start, sigma_end = float(sampling.percent_to_sigma(start)), float(sampling.percent_to_sigma(end))

    reference = perturbed_pass_reference(model, block_returns_its_input(family, 1, sigma_start, sigma_end), SCALE)

    assert_parity(run(ours, family), run(reference, family), plain_of(family))


def test_the_hosts_block_patch_does_nothing_on_lumina_and_cannot_call_kandinsky5_blocks(guiders_pack, tiny_model,
                                                                                      plain_of) -> None:
    """Why these families run on block hooks: ComfyUI's SkipLayerGuidanceDiT sets a dit block patch that
    NextDiT never calls (its extra pass is the plain cond, so the result is plain CFG), and a Kandinsky 5
    dit patch that calls its ``original_block`` (as every perturbation but a whole-block skip must) fails:
    the host's ``block_wrap`` passes ``x=`` to a block forward without it. When a ComfyUI fixes that, this
    test fails: then Kandinsky 5's record can use the dit block patch."""
    import sys

    forward_hooks = sys.modules[guiders_pack["GuidersPAG"].__module__.rsplit(".", 1)[0] + ".host.module_hooks"]
    for family in ("lumina2", "z_image"):
        builtin = node("SkipLayerGuidanceDiT", model=tiny_model(family), double_layers="1", single_layers="",
                       scale=SCALE, start_percent=0.0, end_percent=1.0, rescaling_scale=0.0)
        assert relative_error(run(builtin, family), plain_of(family)) < 1e-5
    assert not forward_hooks.kandinsky5_block_patch_works()
    for family in ("kandinsky5", "kandinsky5_image"):
        calling = tiny_model(family).clone()
        calling.set_model_patch_replace(lambda args, extra: extra["original_block"](args), "dit", "double_block", 1)
        with pytest.raises(TypeError, match="unexpected keyword argument 'x'"):
            run(calling, family)


@pytest.mark.parametrize("mode", ["attention", "feedforward"])
@PER_FAMILY
def test_sublayer_skip_matches_its_definition(tiny_model, plain_of, family: str, mode: str) -> None:
    """GuidersSLG ``attention`` / ``feedforward``: the sublayer's modules add nothing for the perturbed branch
    (their outputs zero, so the residual passes through). Breaks caught: the wrong module (the text MLP only
    on Qwen-Image), the wrong block hooked, block hooks left after the run (all shown on a scratch copy)."""
    model = tiny_model(family)
    block = block_of(model, family, 1)
    modules = [block.get_submodule(name) for name in FAMILIES[family].sublayers[mode]]
    ours = node("GuidersSLG", model=model, scale=SCALE, layers="1", mode=mode, start_percent=0.0, end_percent=1.0,
                rescale=0.0)
    reference = perturbed_pass_reference(
        model, modules_return(lambda dm: modules, lambda m, x, out: torch.zeros_like(out)), SCALE)
    with ForwardCounter(model) as counter:
        result = run(ours, family)

    assert counter.per_step() == [[3]] * STEPS
    assert_parity(result, run(reference, family), plain_of(family))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules + [block]), "hooks outlived the run"


# ---------------------------------------------------------------------------------------------------------
# Qwen-Image Edit: the reference image's tokens follow the image's and are left as they are


def edit_conditioning(reference_side: int) -> tuple[list, list]:
    """Qwen-Image Edit's conditioning: the prompt plus ``reference_latents`` (what TextEncodeQwenImageEdit and
    ReferenceLatent put there), one reference latent of ``reference_side`` x ``reference_side``, the same one
    on both (as the Edit workflows give the negative too)."""
    positive, negative = make_conditioning("qwen_image", seed=1)
    reference = torch.randn(1, 16, 1, reference_side, reference_side, generator=torch.Generator().manual_seed(4))
    return ([[positive[0][0], {**positive[0][1], "reference_latents": [reference]}]],
            [[negative[0][0], {**negative[0][1], "reference_latents": [reference]}]])


@pytest.fixture(scope="module")
def qwen_image_edit_2511(comfy_host):
    # Qwen-Image Edit 2511 (model_detection: the __index_timestep_zero__ buffer): its reference tokens get
    # timestep-0 modulation, the block's modulation then has twice the batch's rows.
    return make_qwen_image(default_ref_method="index_timestep_zero")


EDIT_CASES = [pytest.param("index", 8, id="edit-same-size-reference"),
              pytest.param("index", 16, id="edit-larger-reference"),
              pytest.param("index_timestep_zero", 16, id="edit-2511-larger-reference")]


@pytest.mark.parametrize(("ref_method", "reference_side"), EDIT_CASES)
@pytest.mark.parametrize("node_id", ["GuidersPAG", "GuidersSEG"])
def test_qwen_image_edit_perturbs_the_image_rows_and_leaves_the_reference_rows(
        tiny_model, qwen_image_edit_2511, ref_method: str, reference_side: int, node_id: str) -> None:
    """PAG and SEG on Qwen-Image Edit: in the joint sequence [16 text, 16 image, reference tokens] only the 16
    image rows are perturbed (identity map, or their queries blurred on the 4x4 grid); the text and the
    reference image (16 or 64 tokens, conditioning as the text is) keep their attention. Breaks caught (shown
    on a scratch copy): the grid guessed from the sequence length (with a 64-token reference an 8x8 grid fits:
    image and reference rows perturbed together), Edit 2511's doubled modulation rows selected as batch rows
    by the shared prefix (a shape error)."""
    model = tiny_model("qwen_image") if ref_method == "index" else qwen_image_edit_2511
    positive, negative = edit_conditioning(reference_side)
    latent = make_latent("qwen_image", seed=2)
    image_rows = slice(16, 32)
    if node_id == "GuidersPAG":
        ours = node("GuidersPAG", model=model, scale=SCALE, layers="1", start_percent=0.0, end_percent=1.0)
        perturbed = joint_attention_rows_return_values("double", 1, image_rows)
    else:
        ours = node("GuidersSEG", model=model, scale=SCALE, blur_sigma=2.0, layers="1", start_percent=0.0,
                    end_percent=1.0)

        def override(func, q, k, v, *args, **kwargs):
            options = kwargs.get("transformer_options") or {}
            if options.get("block_type") == "double" and options.get("block_index") == 1:
                q = smooth_queries(q, (4, 4), 2.0, image_token_start=image_rows.start)
            return func(q, k, v, *args, **kwargs)

        perturbed = attention_override_during_pass(override)
    reference = perturbed_pass_reference(model, perturbed, SCALE)

    def sampled(m):
        return sample(m, positive, negative, latent, cfg=CFG, steps=STEPS, seed=3)

    assert_parity(sampled(ours), sampled(reference), sampled(model))


@pytest.mark.parametrize("ref_method", ["index", "index_timestep_zero"])
def test_slg_block_on_qwen_image_edit_matches_skip_layer_guidance_dit(tiny_model, qwen_image_edit_2511,
                                                                      ref_method: str) -> None:
    """With a reference image, and on Edit 2511 whose modulation rows are twice the batch (the batch's
    timesteps, then zeros): the skipped chunk is never computed where rows can be selected, and is where
    they cannot. Break caught: selecting rows of the doubled modulation (a shape error)."""
    model = tiny_model("qwen_image") if ref_method == "index" else qwen_image_edit_2511
    positive, negative = edit_conditioning(16)
    latent = make_latent("qwen_image", seed=2)
    ours = node("GuidersSLG", model=model, scale=SCALE, layers="1", mode="block", start_percent=0.0,
                end_percent=1.0, rescale=0.0)
    builtin = node("SkipLayerGuidanceDiT", model=model, double_layers="1", single_layers="", scale=SCALE,
                   start_percent=0.0, end_percent=1.0, rescaling_scale=0.0)

    def sampled(m):
        return sample(m, positive, negative, latent, cfg=CFG, steps=STEPS, seed=3)

    assert_parity(sampled(ours), sampled(builtin), sampled(model))


# ---------------------------------------------------------------------------------------------------------
# Forward costs, hooks' lifetime, and what is refused


@PER_FAMILY
def test_guiders_pag_with_cfg_is_one_call_of_three_per_step_and_leaves_no_hooks(tiny_model, plain_of, family):
    """Break caught (shown on a scratch copy): the wrapper not removing its block hooks."""
    model = tiny_model(family)
    pag_model = node("GuidersPAG", model=model, scale=SCALE)

    with ForwardCounter(model) as counter:
        out = run(pag_model, family)

    assert counter.per_step() == [[3]] * STEPS
    for call in counter.calls:
        indices = sorted(call.cond_or_uncond)
        assert indices[:2] == [COND, UNCOND] and indices[2] >= 2, call.cond_or_uncond
    assert relative_error(out, plain_of(family)) > MIN_EFFECT
    for module in model.model.diffusion_model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"a hook outlived the run: {module}"


def test_block_hooks_are_removed_when_the_forward_raises(tiny_model) -> None:
    """A forward that fails inside a hooked block (a hook of the test raising in its feed-forward) leaves no
    hook of ours behind on the block or its sublayers. Breaks caught (shown on a scratch copy): the block
    hooks removed only when the forward returns, the sublayer hooks removed by a hook that does not run on
    an exception (no ``always_call``)."""
    model = tiny_model("lumina2")
    block = block_of(model, "lumina2", 1)
    patched = node("GuidersSLG", model=model, scale=SCALE, layers="1", mode="attention", start_percent=0.0,
                   end_percent=1.0)

    def fail(module, args, output):
        raise RuntimeError("inside the block")

    handle = block.feed_forward.register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="inside the block"):
            run(patched, "lumina2")
    finally:
        handle.remove()
    assert not block._forward_hooks and not block._forward_pre_hooks
    assert not block.attention._forward_hooks and not block.feed_forward._forward_hooks


@PER_FAMILY
def test_sag_refuses_joint_models_and_names_the_supported_families(tiny_model, family: str) -> None:
    with pytest.raises(ValueError) as raised:
        run_node("GuidersSAG", model=tiny_model(family), scale=0.5, blur_sigma=2.0)

    message = str(raised.value)
    name = FAMILIES[family].name
    assert name in message and "supports" in message, message
    supports_part = message.split("supports", 1)[-1]
    assert "UNet" in supports_part and name not in supports_part, message
