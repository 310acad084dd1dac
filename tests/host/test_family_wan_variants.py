"""The pack on every Wan variant ComfyUI builds from WanModel (tiny_models.make_wan_variant: each variant's own
supported_models config class, shrunk; its conditioning from make_wan_variant_conditioning), sampled by a real
KSampler, and Wan 2.2 A14B's two experts sampled as users do (two KSamplerAdvanced nodes). ComfyUI 0.8.0 and
0.33.0: I2V, Fun-Control (with Fun 1.1's reference image), Camera, VACE, HuMo, S2V, Animate, Wan 2.2 5B T2V and
TI2V, A14B; 0.33.0 only (skipped on 0.8.0): WanDancer, FlowRVS. Refused on 0.33.0 (6.): the causal
autoregressive model, Animate 2, SCAIL and SCAIL 2.

1. The tiny models: the host's class for each variant, the "wan" record, one forward of cond + uncond per step,
   finite and deterministic results that depend on the prompt; the self-attention sequence holds the video's
   tokens plus the variant's reference tokens where the host documents them (below).
2. Every node that declares Wan changes the result (node_table.effect_params(ALL_VARIANTS)).
3. Parity: SLG ``block`` with ComfyUI's SkipLayerGuidanceDiT; SLG ``attention`` / ``feedforward``, PAG, SLG
   ``attention_scores`` and SEG against references written here from the definitions (forward hooks on the
   chosen main block's modules, never the pack's patches), applied post-CFG as ComfyUI's
   PerturbedAttentionGuidance does on UNets.
4. Forward costs: the perturbed branch rides in the cond/uncond forward (one call of 3 per step).
5. Wan 2.2 A14B: each expert patched by our node gets its term only in its own steps, matching
   SkipLayerGuidanceDiT on both experts; percent windows are σ windows of the model's schedule (the whole
   denoising run, as ComfyUI's own nodes read them), not fractions of one KSamplerAdvanced's steps.

"Layer i" is main block i (``blocks[i]``) on every variant: VACE's vace_blocks, S2V's audio injectors and
Animate's face blocks run between main blocks on the whole batch and are not layers. Only the generated
video's tokens are perturbed by PAG and SEG; reference tokens in the same sequence are conditioning and
attend as they would (SLG attention_scores makes every row the identity).

Host behaviour these tests depend on (comfy/ldm/wan/model.py, model_animate.py; ComfyUI 0.8.0 and 0.33.0):
- Every variant's forward_orig calls ``patches_replace["dit"][("double_block", i)]`` for each main block with
  ``{img, txt, vec, pe, transformer_options}`` and sets ``block_index``; each block's self_attn
  (WanSelfAttention) is ``o(attention(q, k, v(x)))`` through optimized_attention with the options.
- WanModel with ``ref_conv`` (Fun 1.1) puts the reference image's tokens BEFORE the video's; HumoWanModel and
  WanModel_S2V append the reference latent's tokens AFTER them (S2V then its packed motion frames'). HuMo's
  block_wrap hands the block the audio tokens from its closure (not in the patch's args).
- VaceWanModel adds ``vace_blocks[k]`` hints to x after main blocks 0 and num_layers // vace_layers · k;
  WanModel_S2V runs its audio injector after its inject layers; AnimateWanModel a face block after every 5th.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from harness import ForwardCounter, run_node, sample, scheduler_sigmas
from node_table import WAN_VARIANTS, WAN_VARIANTS_0_33, EffectCase, effect_params
from references import attention_override_during_pass, inside_module, modules_return, perturbed_pass_reference
from support import CFG, MIN_EFFECT, STEPS, assert_effect, assert_parity, node, pack_module, relative_error
from tiny_models import make_wan_variant_conditioning, make_wan_variant_latent

from guidance_core.perturb import smooth_queries

COND, UNCOND = 0, 1
VIDEO_TOKENS = 3 * 4 * 4  # 3 latent frames of 8x8, patches (1, 2, 2)
GRID = (4, 4)


@dataclass(frozen=True)
class Variant:
    """What the tests need to know of a variant, from the host's code (not from the pack)."""

    diffusion_model: str  # "module:Class"
    reference_before: int = 0  # reference tokens before the video's in the self-attention sequence
    reference_after: int = 0  # and after them
    layer: int = 1  # the main block the parity tests perturb


VARIANTS = {
    "wan_i2v": Variant("comfy.ldm.wan.model:WanModel"),
    # The reference image (8x8 latent, ref_conv patches of 2x2): 16 tokens before the video.
    "wan_fun_control": Variant("comfy.ldm.wan.model:WanModel", reference_before=16),
    "wan_camera": Variant("comfy.ldm.wan.model:CameraWanModel"),
    # Block 2: a vace hint is added right after it.
    "wan_vace": Variant("comfy.ldm.wan.model:VaceWanModel", layer=2),
    "wan_humo": Variant("comfy.ldm.wan.model:HumoWanModel", reference_after=16),
    # Block 0: the audio is injected right after it (and, not being the last block, its reference tokens'
    # outputs reach the video through the blocks after it).
    # After the video: the reference latent's 16 tokens, then the packed motion frames' 24 (FramePackMotioner:
    # 1 frame at patch 2, 2 frames at (2, 4, 4), 16 frames at (4, 8, 8) on the 8x8 latent: 16 + 4 + 4).
    "wan_s2v": Variant("comfy.ldm.wan.model:WanModel_S2V", reference_after=16 + 24, layer=0),
    "wan_animate": Variant("comfy.ldm.wan.model_animate:AnimateWanModel", layer=0),
    "wan22_5b": Variant("comfy.ldm.wan.model:WanModel"),
    "wan22_ti2v": Variant("comfy.ldm.wan.model:WanModel"),
    # ComfyUI 0.33.0: music injected after blocks 0 and 2 (the tiny model's inject layers).
    "wan_dancer": Variant("comfy.ldm.wan.model_wandancer:WanDancerModel", layer=0),
    "wan_flow_rvs": Variant("comfy.ldm.wan.model:WanModel"),
}
ALL_VARIANTS = WAN_VARIANTS + WAN_VARIANTS_0_33
# The config class of each variant a host may lack (comfy/supported_models.py).
HOST_CONFIG = {"wan_dancer": "WAN22_WanDancer", "wan_flow_rvs": "WAN21_FlowRVS"}
PER_VARIANT = pytest.mark.parametrize("variant", ALL_VARIANTS)


@pytest.fixture(autouse=True)
def _host_has_the_variant(request) -> None:
    """Skips a test of a variant whose config class the host does not have (WanDancer on ComfyUI 0.8.0)."""
    import comfy.supported_models
    import comfyui_version

    variant = request.node.callspec.params.get("variant") if hasattr(request.node, "callspec") else None
    config = HOST_CONFIG.get(variant)
    if config is not None and not hasattr(comfy.supported_models, config):
        pytest.skip(f"ComfyUI {comfyui_version.__version__} has no {config} ({variant})")


def run(model, variant: str, cfg: float = CFG, positive_seed: int = 1) -> torch.Tensor:
    positive, negative = make_wan_variant_conditioning(variant, seed=positive_seed)
    return sample(model, positive, negative, make_wan_variant_latent(variant, seed=2), cfg=cfg, steps=STEPS, seed=3)


@pytest.fixture(autouse=True)
def _pack(guiders_pack):
    return guiders_pack


@pytest.fixture(scope="module")
def plain_of(tiny_model) -> Callable:
    results: dict[str, torch.Tensor] = {}

    def get(variant: str) -> torch.Tensor:
        if variant not in results:
            results[variant] = run(tiny_model(variant), variant)
        return results[variant]

    return get




def video_rows(variant: str) -> slice:
    start = VARIANTS[variant].reference_before
    return slice(start, start + VIDEO_TOKENS)


# ---------------------------------------------------------------------------------------------------------
# The tiny models


@PER_VARIANT
def test_tiny_model_is_the_hosts_class_one_call_per_step_deterministic_with_its_reference_tokens(
    guiders_pack, tiny_model, variant: str
) -> None:
    """Catches conditioning that does not reach the model (no reference tokens, the prompt ignored)."""
    model = tiny_model(variant)
    dm = model.model.diffusion_model
    expected = VARIANTS[variant]
    lengths = []
    handle = dm.blocks[0].self_attn.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    try:
        with ForwardCounter(model) as counter:
            out = run(model, variant)
    finally:
        handle.remove()

    assert f"{type(dm).__module__}:{type(dm).__qualname__}" == expected.diffusion_model
    assert pack_module(guiders_pack, "host.layers").model_family(model) == "wan"
    assert set(lengths) == {expected.reference_before + VIDEO_TOKENS + expected.reference_after}, lengths
    assert torch.isfinite(out).all() and out.shape == make_wan_variant_latent(variant)["samples"].shape
    assert counter.per_step() == [[2]] * STEPS
    assert torch.equal(out, run(model, variant))
    assert relative_error(out, run(model, variant, cfg=1.0)) > MIN_EFFECT, "the prompt does not matter"


def test_the_layers_are_the_main_blocks(guiders_pack, tiny_model) -> None:
    """VACE's vace_blocks are not layers: "layer i" is blocks[i] on every variant."""
    layers = pack_module(guiders_pack, "host.layers")
    assert [str(layer) for layer in layers.model_layers(tiny_model("wan_vace"))] == [f"double.{i}" for i in range(4)]


# ---------------------------------------------------------------------------------------------------------
# Every node that declares Wan changes the result


@pytest.mark.parametrize(("case", "variant"), effect_params(ALL_VARIANTS))
def test_node_changes_the_result_and_stays_finite(tiny_model, weak_model_of, variant: str, case: EffectCase) -> None:
    """SEG runs on the variant's test layer rather than "auto": "auto" is Wan's block 2 (STGuidance), the last
    block of these 3-block tiny models, where SEG's blur moves Fun-Control's result by 0.8 %, under the effect
    threshold (on the real 30- and 40-block models block 2 is an early block)."""
    model = tiny_model(variant)
    if case.name.startswith("SEG-sigma"):
        blur_sigma = float(case.name.removeprefix("SEG-sigma"))
        patched = node("GuidersSEG", model=model, scale=3.0, blur_sigma=blur_sigma, layers=str(VARIANTS[variant].layer))
    else:
        patched = case.build(model, weak_model_of(variant))

    assert_effect(run(patched, variant, cfg=case.cfg), run(model, variant, cfg=case.cfg))


# ---------------------------------------------------------------------------------------------------------
# Parity


@PER_VARIANT
def test_slg_block_matches_skip_layer_guidance_dit(tiny_model, plain_of, variant: str) -> None:
    """Catches skipping another block or chunk, and a chunk-reduced block missing an input the host hands it
    outside the patch's args (HuMo's audio tokens)."""
    model = tiny_model(variant)
    layer = str(VARIANTS[variant].layer)
    ours = node("GuidersSLG", model=model, scale=3.0, layers=layer, mode="block", start_percent=0.0,
                end_percent=1.0, rescale=0.0)
    builtin = node("SkipLayerGuidanceDiT", model=model, double_layers=layer, single_layers="", scale=3.0,
                   start_percent=0.0, end_percent=1.0, rescaling_scale=0.0)

    assert_parity(run(ours, variant), run(builtin, variant), plain_of(variant))


@PER_VARIANT
def test_slg_on_the_negative_branch_matches_skip_layer_guidance_dit_simple(tiny_model, plain_of, variant: str) -> None:
    """The uncond run with the block skipped (ComfyUI's SkipLayerGuidanceDiTSimple), as one forward of 2 per step
    (the cond and the skipped uncond; the plain uncond is not evaluated)."""
    model = tiny_model(variant)
    layer = str(VARIANTS[variant].layer)
    ours = node("GuidersSLG", model=model, scale=3.0, layers=layer, mode="block", start_percent=0.0,
                end_percent=1.0, rescale=0.0, target="negative branch")
    builtin = node("SkipLayerGuidanceDiTSimple", model=model, double_layers=layer, single_layers="",
                   start_percent=0.0, end_percent=1.0)

    with ForwardCounter(model) as counter:
        result = run(ours, variant)

    assert counter.per_step() == [[2]] * STEPS
    assert_parity(result, run(builtin, variant), plain_of(variant))


def self_attention_of(variant: str) -> Callable:
    return lambda dm: [dm.blocks[VARIANTS[variant].layer].self_attn]


@pytest.mark.parametrize("mode", ["attention", "feedforward"])
@PER_VARIANT
def test_sublayer_skip_matches_its_definition(tiny_model, plain_of, variant: str, mode: str) -> None:
    """The block's self-attention (``self_attn.o``) or feed-forward (``ffn``) adds nothing for the perturbed
    branch. Catches zeroing another module or the cond/uncond rows."""
    model = tiny_model(variant)
    index = VARIANTS[variant].layer
    module = "self_attn.o" if mode == "attention" else "ffn"
    ours = node("GuidersSLG", model=model, scale=3.0, layers=str(index), mode=mode, start_percent=0.0,
                end_percent=1.0, rescale=0.0)
    zeroed = modules_return(lambda dm: [dm.blocks[index].get_submodule(module)],
                            lambda m, x, out: torch.zeros_like(out))

    assert_parity(run(ours, variant), run(perturbed_pass_reference(model, zeroed, 3.0), variant), plain_of(variant))


def identity_rows(variant: str, every_row: bool) -> Callable:
    """PAG (Ahn et al. 2024, arXiv:2403.17377, Eq. 9-10): in the block's self_attn (o(attention(q, k, v(x)))),
    the attention map's rows of the video tokens are the identity, so those rows of the attention output are
    their own V and the module returns o(V) there; the reference tokens' rows attend as before.
    ``every_row``: the whole map is the identity (SLG attention_scores)."""

    def output_of(module, x, out):
        identity = module.o(module.v(x))
        rows = slice(None) if every_row else video_rows(variant)
        out = out.clone()
        out[:, rows] = identity[:, rows]
        return out

    return modules_return(self_attention_of(variant), output_of)


@pytest.mark.parametrize("node_id", ["GuidersPAG", "GuidersSLG-attention_scores"])
@PER_VARIANT
def test_identity_self_attention_matches_a_reference_from_the_definition(
    tiny_model, plain_of, variant: str, node_id: str
) -> None:
    """Catches perturbing the reference tokens under PAG (Fun's before the video, HuMo's and S2V's after), the
    wrong block (a vace block, the main block next to it) and the wrong chunk."""
    model = tiny_model(variant)
    layer = str(VARIANTS[variant].layer)
    if node_id == "GuidersPAG":
        ours = node("GuidersPAG", model=model, scale=3.0, layers=layer, start_percent=0.0, end_percent=1.0)
    else:
        ours = node("GuidersSLG", model=model, scale=3.0, layers=layer, mode="attention_scores", start_percent=0.0,
                    end_percent=1.0, rescale=0.0)
    reference = perturbed_pass_reference(model, identity_rows(variant, node_id != "GuidersPAG"), 3.0)

    assert_parity(run(ours, variant), run(reference, variant), plain_of(variant))


def video_queries_blurred(variant: str, blur_sigma: float) -> Callable:
    """SEG (Hong 2024, arXiv:2408.00760) on the video tokens, each frame's 4x4 grid as the paper blurs an image
    (the pack's core ``smooth_queries``, itself checked against SEG-SDXL in tests/core), inside the block's
    self_attn (its only attention call); the reference tokens' queries unchanged."""
    inside = {"module": False}

    def override(func, q, k, v, *args, **kwargs):  # q: (B, L, heads·D)
        if inside["module"]:
            q = smooth_queries(q, GRID, blur_sigma, image_token_start=video_rows(variant).start, frames=3)
        return func(q, k, v, *args, **kwargs)

    return inside_module(lambda dm: self_attention_of(variant)(dm)[0], inside, attention_override_during_pass(override))


@pytest.mark.parametrize("blur_sigma", [2.0, 99999.0])
@PER_VARIANT
def test_seg_blurs_the_video_queries_as_a_reference_from_the_definition(
    tiny_model, plain_of, variant: str, blur_sigma: float
) -> None:
    """Catches a wrong token grid: where the video's tokens start (after Fun's reference tokens), their
    height, width and frames, or blurring the reference tokens with them."""
    model = tiny_model(variant)
    ours = node("GuidersSEG", model=model, scale=3.0, blur_sigma=blur_sigma, layers=str(VARIANTS[variant].layer),
                start_percent=0.0, end_percent=1.0)
    reference = perturbed_pass_reference(model, video_queries_blurred(variant, blur_sigma), 3.0)

    assert_parity(run(ours, variant), run(reference, variant), plain_of(variant))


# ---------------------------------------------------------------------------------------------------------
# Forward costs


@pytest.mark.parametrize("node_id", ["GuidersPAG", "GuidersSEG", "GuidersSLG"])
@PER_VARIANT
def test_the_perturbed_branch_rides_in_the_one_forward_per_step(tiny_model, plain_of, variant: str, node_id) -> None:
    inputs = {"layers": str(VARIANTS[variant].layer)}
    if node_id == "GuidersSLG":
        inputs["mode"] = "block"
    patched = node(node_id, model=tiny_model(variant), scale=3.0, start_percent=0.0, end_percent=1.0, **inputs)

    with ForwardCounter(patched) as counter:
        out = run(patched, variant)

    assert counter.per_step() == [[3]] * STEPS
    for call in counter.calls:
        indices = sorted(call.cond_or_uncond)
        assert indices[:2] == [COND, UNCOND] and indices[2] >= 2, call.cond_or_uncond
    assert relative_error(out, plain_of(variant)) > MIN_EFFECT


# ---------------------------------------------------------------------------------------------------------
# Wan 2.2 A14B: two experts, two KSamplerAdvanced nodes
#
# As ComfyUI's Wan 2.2 template samples it: the high-noise expert runs steps 0..k with
# return_with_leftover_noise, the low-noise expert steps k..end on that latent without adding noise. Each
# expert is patched by our node on its own. Percent windows are σ windows of the model's schedule
# (percent_to_sigma, nodes/host/windows.py), as ComfyUI's SkipLayerGuidanceDiT reads them: they refer to the
# whole denoising run, so a window 0..0.7 covers the high-noise expert's steps and the low-noise expert's first
# ones, whichever sampler runs them. (Step-indexed scale schedules, by contrast, count the steps of the
# sampler they run in: KSamplerAdvanced hands each its own slice of the sigmas.)

EXPERT_STEPS, BOUNDARY = 6, 3


def two_experts(high, low) -> tuple[torch.Tensor, list, list]:
    """The two-sampler run; the σ of each expert's forwards (ForwardCounter on each) and their batch sizes."""
    positive, negative = make_wan_variant_conditioning("wan", seed=1)
    latent = {"samples": make_wan_variant_latent("wan", seed=2)["samples"]}
    common = {"noise_seed": 3, "steps": EXPERT_STEPS, "cfg": CFG, "sampler_name": "euler", "scheduler": "normal",
              "positive": positive, "negative": negative}
    with ForwardCounter(high) as high_calls:
        (leftover,) = run_node("KSamplerAdvanced", model=high, add_noise="enable", latent_image=latent,
                               start_at_step=0, end_at_step=BOUNDARY, return_with_leftover_noise="enable", **common)
    with ForwardCounter(low) as low_calls:
        (out,) = run_node("KSamplerAdvanced", model=low, add_noise="disable", latent_image=leftover,
                          start_at_step=BOUNDARY, end_at_step=10000, return_with_leftover_noise="disable", **common)
    return out["samples"], high_calls.calls, low_calls.calls


def schedule_steps(calls, sigmas: list[float]) -> list[tuple[int, int]]:
    """(step of the whole schedule, batch size) of each forward."""
    return [(min(range(len(sigmas)), key=lambda i: abs(sigmas[i] - call.sigma)), call.batch_size) for call in calls]


@pytest.fixture(scope="module")
def experts(tiny_model):
    return tiny_model("wan22_high_noise"), tiny_model("wan22_low_noise")


def test_two_experts_each_get_their_term_only_in_their_own_steps(experts) -> None:
    """PAG on the high-noise expert only: its three steps run the perturbed branch, the low-noise expert's
    run plain; the result equals the reference on the high-noise expert and plain sampling on the other.
    Catches a term leaking into the other expert's steps (or run state shared between the two samplers)."""
    high, low = experts
    sigmas = scheduler_sigmas(high, steps=EXPERT_STEPS).tolist()
    ours = node("GuidersPAG", model=high, scale=3.0, layers="1", start_percent=0.0, end_percent=1.0)
    reference = perturbed_pass_reference(high, identity_rows_of_block(1), 3.0)

    result, high_calls, low_calls = two_experts(ours, low)
    expected, _, _ = two_experts(reference, low)
    plain, _, _ = two_experts(high, low)

    assert schedule_steps(high_calls, sigmas) == [(i, 3) for i in range(BOUNDARY)]
    assert schedule_steps(low_calls, sigmas) == [(i, 2) for i in range(BOUNDARY, EXPERT_STEPS)]
    assert_parity(result, expected, plain)


def identity_rows_of_block(index: int) -> Callable:
    """PAG on Wan 2.1's block ``index``: its self_attn returns o(V) (every token is a video token)."""
    return modules_return(lambda dm: [dm.blocks[index].self_attn], lambda m, x, out: m.o(m.v(x)))


@pytest.mark.parametrize(("start", "end"), [pytest.param(0.0, 1.0, id="always"),
                                            pytest.param(0.0, 0.7, id="window-0-0.7")])
def test_slg_on_both_experts_matches_skip_layer_guidance_dit_with_windows_of_the_whole_schedule(
    experts, start: float, end: float
) -> None:
    """SLG block on both experts, each patched by its own node, against SkipLayerGuidanceDiT on both. With the
    window 0..0.7 the term runs where σ ≥ percent_to_sigma(0.7) of the whole schedule: all the high-noise
    expert's steps and only the first of the low-noise expert's. Catches windows read as fractions of one
    sampler's steps (the low-noise expert's window would then start at its own first step and cover two)."""
    high, low = experts
    sigmas = scheduler_sigmas(high, steps=EXPERT_STEPS).tolist()
    sigma_end = float(high.get_model_object("model_sampling").percent_to_sigma(end))
    active = [i for i in range(EXPERT_STEPS) if sigmas[i] >= sigma_end]

    def ours(model):
        return node("GuidersSLG", model=model, scale=3.0, layers="1", mode="block", start_percent=start,
                    end_percent=end, rescale=0.0)

    def builtin(model):
        return node("SkipLayerGuidanceDiT", model=model, double_layers="1", single_layers="", scale=3.0,
                    start_percent=start, end_percent=end, rescaling_scale=0.0)

    result, high_calls, low_calls = two_experts(ours(high), ours(low))
    expected, _, _ = two_experts(builtin(high), builtin(low))
    plain, _, _ = two_experts(high, low)

    if end < 1.0:
        assert active == [0, 1, 2, 3], f"the window should end inside the low-noise expert's steps: {sigmas}"
    steps = schedule_steps(high_calls, sigmas) + schedule_steps(low_calls, sigmas)
    assert steps == [(i, 3 if i in active else 2) for i in range(EXPERT_STEPS)]
    assert_parity(result, expected, plain)


# ---------------------------------------------------------------------------------------------------------
# The Wan variants of ComfyUI 0.33.0 the pack refuses (nodes/host/families.py says why for each)

REFUSED = {
    "comfy.ldm.wan.ar_model:CausalWanModel": "Wan 2.1 causal (autoregressive)",
    "comfy.ldm.wan.model_animate2:WanAnimate2Model": "Wan Animate 2",
    "comfy.ldm.wan.model:SCAILWanModel": "Wan SCAIL",
    "comfy.ldm.wan.model:SCAIL2WanModel": "Wan SCAIL",
}


@pytest.mark.parametrize("class_name", list(REFUSED))
def test_refused_variants_have_their_own_record_never_wans(guiders_pack, class_name: str) -> None:
    """Their MRO reaches WanModel: without their own record they would be taken for Wan and perturbed wrongly
    (or not at all: the causal model's autoregressive forward calls no block patch)."""
    import importlib

    module_name, _, name = class_name.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        pytest.skip(f"this ComfyUI has no {class_name}")
    families = pack_module(guiders_pack, "host.families")
    record = families.family_of_class(cls)

    assert record.display_name == REFUSED[class_name] and not record.methods


@pytest.mark.parametrize("node_id", ["GuidersPAG", "GuidersSEG", "GuidersSLG"])
def test_the_nodes_refuse_the_causal_wan_model_and_name_it(node_id: str) -> None:
    import comfy.supported_models

    if not hasattr(comfy.supported_models, "WAN21_CausalAR_T2V"):
        pytest.skip("this ComfyUI has no WAN21_CausalAR_T2V")
    from tiny_models import _to_patcher, _wan_config

    model = _to_patcher(comfy.supported_models.WAN21_CausalAR_T2V(_wan_config(causal_ar=True)), seed=0)
    with pytest.raises(ValueError, match=rf"{node_id}: .*\(Wan 2\.1 causal \(autoregressive\)\) is not supported"):
        node(node_id, model=model, scale=3.0)
