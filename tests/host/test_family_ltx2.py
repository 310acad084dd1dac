"""The pack on LTX-2, the audio-video model (tiny_models.make_ltxav: ComfyUI's own LTXAVModel, shrunk; sampled by
a real KSampler on a (video, audio) NestedTensor latent), and its LTX-2.3 checkpoint config (ComfyUI 0.33.0).

Every method perturbs the VIDEO stream of the chosen block only. The text reaches the video by cross-attention
alone, so it is never in the perturbed self-attention; the audio stream leaves the perturbed block exactly as
the unperturbed block gives it (the pack's definition: the block's video-to-audio cross-attention would
otherwise carry the video's perturbation into the audio inside that very block). Later blocks see the
perturbed video as they see any input.

1. The tiny models: the host's class, its flow schedule (shift 2.37), one forward of cond + uncond per step,
   finite, deterministic, prompt-dependent results.
2. The record: LTX-2 is its own family (LTXAVModel subclasses LTXVModel); "auto" is block 29 on LTX-2's 48
   blocks (ComfyUI's LTXVSpatioTemporalGuidance default, Lightricks' ltx-pipelines LTX_2_PARAMS) and the middle
   block on a model without a block 29.
3. Every node that declares the family changes the result (node_table.effect_params(LTX2)).
4. Parity with references written here from the definitions, each a dit block patch of the test's own that
   runs the host's block twice (unperturbed: its audio; perturbed by a forward hook or an attention override
   of the test's own: its video): PAG and SLG attention_scores (identity self-attention on the video tokens:
   ``to_out(V)``, through the per-head gate where the block has one), SEG (the video queries blurred on each
   frame's 8x8 token grid), SLG block (the video passes the block unchanged), SLG attention / feedforward
   (the video's self-attention or feed-forward adds nothing). Applied post-CFG, as ComfyUI's
   PerturbedAttentionGuidance applies PAG on UNets. ComfyUI's own SkipLayerGuidanceDiT and 0.33.0's
   LTXVSpatioTemporalGuidance perturb both streams (the block returns both inputs; every self-attention of
   the block returns V), another definition, so they are no reference here.
5. The audio leaving the perturbed block is the unperturbed block's (seen by the next block), the video is not.
6. Forward costs: the perturbed branch rides in the cond/uncond forward (one call of 3 per step).

Host behaviour these tests depend on (ComfyUI 0.8.0 and 0.33.0, comfy/ldm/lightricks/av_model.py):
- ``LTXAVModel._process_transformer_blocks`` calls ``patches_replace["dit"][("double_block", i)]`` with
  ``img = (video tokens, audio tokens)`` and keyword inputs (contexts, timesteps, rotary embeddings, and in
  0.33.0 CompressedTimestep objects), and no block_index.
- ``BasicAVTransformerBlock.forward``: video ``attn1`` (self-attention, its first attention call, through
  ``optimized_attention`` and so the override), video ``attn2`` (text), audio ``audio_attn1`` / ``audio_attn2``,
  then audio-to-video and video-to-audio cross-attention, then ``ff`` and ``audio_ff``; streams updated in
  place. 0.33.0: ``to_gate_logits`` gates attn1's heads (2·sigmoid) before ``to_out`` in LTX-2.3 checkpoints.
- ``comfy/model_base.py`` LTXAV unpacks the sampler's packed latent (``latent_shapes``) into ``[video, audio]``
  before the diffusion model; patch 1 (one token per video latent pixel: 3 frames of 8x8).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable

import pytest
import torch
from harness import ForwardCounter, sample, scheduler_sigmas
from node_table import LTX2, EffectCase, effect_params
from references import perturbed_pass_reference
from support import CFG, MIN_EFFECT, PARITY_RTOL, STEPS, node, pack_module
from tiny_models import LTXAV_AUDIO_SHAPE, make_conditioning, make_ltxav, make_ltxav_latent

from guidance_core.perturb import smooth_queries

COND, UNCOND = 0, 1
VIDEO_GRID, FRAMES = (8, 8), 3  # the test latent's video tokens: patch 1


def host_has_ltx_2_3() -> bool:
    import comfy.ldm.lightricks.av_model as av_model

    return "cross_attention_adaln" in inspect.signature(av_model.LTXAVModel.__init__).parameters


def config_marks(family: str) -> list:
    """LTX-2.3 is skipped where the host cannot build it."""
    return [pytest.mark.skipif(family == "ltxav_2_3" and not host_has_ltx_2_3(),
                               reason="ComfyUI 0.8.0's LTXAVModel has no LTX-2.3 config (cross_attention_adaln, "
                                      "gated attention)")]


def with_config_marks(params: list, family_position: int) -> list:
    return [pytest.param(*p.values, id=p.id, marks=config_marks(p.values[family_position])) for p in params]


PER_CONFIG = pytest.mark.parametrize("family", [pytest.param(f, marks=config_marks(f)) for f in LTX2])


def flat(latent) -> torch.Tensor:
    """A (video, audio) NestedTensor as one tensor, for the shared error measures."""
    return torch.cat([part.flatten() for part in latent.unbind()])


def relative_error(result, reference) -> float:
    result, reference = flat(result), flat(reference)
    return float((result - reference).abs().max() / reference.abs().max())


def assert_parity(result, reference, plain) -> None:
    """As support.assert_parity, on (video, audio) latents."""
    assert all(torch.isfinite(part).all() for part in (*result.unbind(), *reference.unbind()))
    effect = relative_error(reference, plain)
    assert effect > MIN_EFFECT, f"the reference barely differs from plain CFG ({effect:.2e}): the test is vacuous"
    error = relative_error(result, reference)
    assert error < PARITY_RTOL, f"max|ours − reference| / max|reference| = {error:.2e} (reference effect {effect:.2e})"


def run(model, family: str, cfg: float = CFG, batch: int = 1):
    positive, negative = make_conditioning(family, batch=1, seed=1)
    latent = {"samples": make_ltxav_latent(batch=batch, seed=2)}
    return sample(model, positive, negative, latent, cfg=cfg, steps=STEPS, seed=3)


@pytest.fixture(autouse=True)
def _pack(guiders_pack):
    return guiders_pack


@pytest.fixture(scope="module")
def plain_of(tiny_model) -> Callable:
    results: dict = {}

    def get(family: str, batch: int = 1):
        if (family, batch) not in results:
            results[family, batch] = run(tiny_model(family), family, batch=batch)
        return results[family, batch]

    return get




# ---------------------------------------------------------------------------------------------------------
# The tiny models and the record


@PER_CONFIG
def test_tiny_model_is_the_hosts_class_with_its_schedule_one_call_per_step_and_deterministic(tiny_model, family):
    model = tiny_model(family)
    dm = model.model.diffusion_model
    with ForwardCounter(model) as counter:
        out = run(model, family)
    video, audio = out.unbind()

    assert f"{type(dm).__module__}:{type(dm).__qualname__}" == "comfy.ldm.lightricks.av_model:LTXAVModel"
    assert float(model.get_model_object("model_sampling").shift) == pytest.approx(2.37)
    assert scheduler_sigmas(model, steps=STEPS)[-1].item() == 0.0
    assert video.shape == (1, 128, FRAMES, *VIDEO_GRID) and audio.shape == (1, *LTXAV_AUDIO_SHAPE)
    assert torch.isfinite(video).all() and torch.isfinite(audio).all()
    assert counter.per_step() == [[2]] * STEPS
    assert torch.equal(flat(out), flat(run(model, family)))
    assert relative_error(out, run(model, family, cfg=1.0)) > MIN_EFFECT, "the prompt does not matter"
    assert (getattr(dm.transformer_blocks[0].attn1, "to_gate_logits", None) is not None) == (family == "ltxav_2_3")


@PER_CONFIG
def test_ltx_2_is_its_own_family_with_pag_seg_slg_and_refused_by_sag(guiders_pack, tiny_model, family) -> None:
    layers = pack_module(guiders_pack, "host.layers")
    common = pack_module(guiders_pack, "common")
    model = tiny_model(family)

    assert layers.model_family(model) == "ltxav"  # never LTXV's record (LTXAVModel subclasses LTXVModel)
    assert layers.model_family(tiny_model("ltxv")) == "ltxv"
    assert [str(layer) for layer in layers.model_layers(model)] == ["double.0", "double.1", "double.2"]
    assert "ltxav" in common.PAG_FAMILIES and "ltxav" in common.ATTENTION_FAMILIES and "ltxav" in common.BLOCK_FAMILIES
    with pytest.raises(ValueError, match=r"GuidersSAG: .*\(LTX-2 \(audio-video\)\) is not supported.*UNet"):
        node("GuidersSAG", model=model, scale=0.5, blur_sigma=2.0)


def test_auto_is_block_29_on_ltx_2s_depth_and_the_middle_block_on_a_shallow_model(guiders_pack, tiny_model) -> None:
    """Catches the LTX-Video record's choices (19, 28) reaching LTX-2, and a missing block 29 not falling back."""
    layers = pack_module(guiders_pack, "host.layers")
    families = pack_module(guiders_pack, "host.families")
    deep = make_ltxav(num_layers=48)  # LTX-2's depth (its blocks 0-47), still narrow
    for method in (families.PAG, families.SEG, families.SLG):
        assert [str(layer) for layer in layers.parse_layers("auto", deep, "layers", method)] == ["double.29"]
        assert [str(layer) for layer in layers.parse_layers("auto", tiny_model("ltxav"), "layers", method)] == [
            "double.1"]
        source = families.FAMILY_BY_KEY["ltxav"].recommended_for(method, 48).source
        assert "LTXVSpatioTemporalGuidance" in source and "LTX_2_PARAMS stg_blocks [29]" in source
    summary = families.recommended_summary(families.SLG)
    assert "LTX-2 (audio-video): 29 [ComfyUI's LTXVSpatioTemporalGuidance" in summary, summary


# ---------------------------------------------------------------------------------------------------------
# Every node that declares the family changes the result


@pytest.mark.parametrize(("case", "family"), with_config_marks(effect_params(LTX2), 1))
def test_node_changes_the_result_and_stays_finite(tiny_model, weak_model_of, family: str, case: EffectCase) -> None:
    model = tiny_model(family)
    patched = case.build(model, weak_model_of(family))
    guided, plain = run(patched, family, cfg=case.cfg), run(model, family, cfg=case.cfg)

    assert all(torch.isfinite(part).all() for part in guided.unbind())
    assert relative_error(guided, plain) > MIN_EFFECT


# ---------------------------------------------------------------------------------------------------------
# References from the definitions: the video of the perturbed block, the audio of the unperturbed one


def identity_attention_output(attention, x: torch.Tensor) -> torch.Tensor:
    """PAG (Ahn et al. 2024, arXiv:2403.17377, Eq. 9-10) on LTX-2's video self-attention: the attention map is
    the identity, so the attention returns V; the host's per-head gate (LTX-2.3: 2·sigmoid(to_gate_logits(x)),
    comfy/ldm/lightricks/model.py CrossAttention.forward) then scales each head, and ``to_out`` projects."""
    values = attention.to_v(x)
    if getattr(attention, "to_gate_logits", None) is not None:
        b, t, _ = values.shape
        gates = 2.0 * torch.sigmoid(attention.to_gate_logits(x))
        values = (values.view(b, t, attention.heads, -1) * gates.unsqueeze(-1)).view(b, t, -1)
    return attention.to_out(values)


@contextlib.contextmanager
def module_returns(module, output_of):
    handle = module.register_forward_hook(lambda m, args, kwargs, out: output_of(m, args[0] if args else kwargs["x"],
                                                                                  out), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def video_self_attention_returns_values(block):
    return module_returns(block.attn1, lambda m, x, out: identity_attention_output(m, x))


def video_sublayer_adds_nothing(sublayer: str):
    def perturb(block):
        module = block.attn1.to_out if sublayer == "attention" else block.ff
        return module_returns(module, lambda m, x, out: torch.zeros_like(out))

    return perturb


def video_queries_blurred(blur_sigma: float, override_flag: dict):
    """SEG (Hong 2024, arXiv:2408.00760): inside the video self-attention, each frame's queries are
    Gaussian-blurred over its 8x8 token grid (the pack's core ``smooth_queries``, checked against SEG-SDXL in
    tests/core); the pass's attention override blurs while ``override_flag["on"]``."""

    @contextlib.contextmanager
    def perturb(block):
        def enter(*_):
            override_flag["on"] = True

        def leave(*_):
            override_flag["on"] = False

        handles = [block.attn1.register_forward_pre_hook(enter), block.attn1.register_forward_hook(leave)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            override_flag["on"] = False

    return perturb


def video_only(block_index: int, perturb: Callable | None, override: Callable | None = None) -> Callable:
    """A pass (references.perturbed_pass_reference) in which block ``block_index`` returns the video of the host's
    block run inside ``perturb(block)`` (None: the block skipped, its input video) and the audio of the host's
    block run as it is; both runs on copies of the inputs, which the block updates in place."""

    @contextlib.contextmanager
    def perturbed(diffusion_model, model_options):
        import comfy.model_patcher

        block = diffusion_model.transformer_blocks[block_index]

        def reference_block(args, extra):
            original = extra["original_block"]
            video_in, audio_in = args["img"]
            audio = original({**args, "img": (video_in.clone(), audio_in.clone())})["img"][1]
            if perturb is None:
                return {"img": (video_in, audio)}
            with perturb(block):
                video = original({**args, "img": (video_in.clone(), audio_in.clone())})["img"][0]
            return {"img": (video, audio)}

        # A copy: set_model_options_patch_replace writes into the dict it is given (the sampler's, here).
        options = comfy.model_patcher.set_model_options_patch_replace(
            dict(model_options), reference_block, "dit", "double_block", block_index)
        if override is not None:
            options["transformer_options"] = {**options["transformer_options"],
                                              "optimized_attention_override": override}
        yield options

    return perturbed


def seg_reference(block_index: int, blur_sigma: float) -> Callable:
    flag = {"on": False}

    def override(func, q, k, v, *args, **kwargs):
        if flag["on"]:  # the video self-attention: q (B, L, heads·D), the L video tokens frame by frame
            q = smooth_queries(q, VIDEO_GRID, blur_sigma, image_token_start=0, frames=FRAMES)
        return func(q, k, v, *args, **kwargs)

    return video_only(block_index, video_queries_blurred(blur_sigma, flag), override)


def chained(*passes: Callable) -> Callable:
    """Several blocks' references in one pass."""

    @contextlib.contextmanager
    def perturbed(diffusion_model, model_options):
        with contextlib.ExitStack() as stack:
            for each in passes:
                model_options = stack.enter_context(each(diffusion_model, model_options))
            yield model_options

    return perturbed


IDENTITY_CASES = [
    pytest.param(family, layers, node_id, batch, id=f"{family}-{layers.replace(', ', '+')}-{node_id}-batch{batch}")
    for family in LTX2 for layers, batch in (("1", 1), ("0, 1", 1), ("1", 2))
    for node_id in ("GuidersPAG", "GuidersSLG-attention_scores")
]


@pytest.mark.parametrize(("family", "layers", "node_id", "batch"), with_config_marks(IDENTITY_CASES, 0))
def test_identity_self_attention_on_the_video_matches_a_reference_from_the_definition(
    tiny_model, plain_of, family: str, layers: str, node_id: str, batch: int
) -> None:
    """Catches the audio self-attention perturbed instead of (or with) the video's, the perturbed block's audio
    left carrying the video's perturbation, the wrong block or chunk, a latent batch of two mis-routed, and
    (``0, 1``: the branch's inputs to block 1 differ from the cond's, so its audio is recomputed) a stale copy."""
    model = tiny_model(family)
    if node_id == "GuidersPAG":
        ours = node("GuidersPAG", model=model, scale=3.0, layers=layers, start_percent=0.0, end_percent=1.0)
    else:
        ours = node("GuidersSLG", model=model, scale=3.0, layers=layers, mode="attention_scores",
                    start_percent=0.0, end_percent=1.0, rescale=0.0)
    blocks = [int(b) for b in layers.split(",")]
    reference = perturbed_pass_reference(
        model, chained(*(video_only(b, video_self_attention_returns_values) for b in blocks)), 3.0)

    assert_parity(run(ours, family, batch=batch), run(reference, family, batch=batch), plain_of(family, batch))


@pytest.mark.parametrize("blur_sigma", [2.0, 99999.0])
@PER_CONFIG
def test_seg_blurs_the_video_queries_on_each_frame_as_a_reference_from_the_definition(
    tiny_model, plain_of, family: str, blur_sigma: float
) -> None:
    """Catches the grid taken from the packed latent (no grid: the node fails) or from the wrong frames/sides,
    and the audio self-attention's queries blurred instead."""
    model = tiny_model(family)
    ours = node("GuidersSEG", model=model, scale=3.0, blur_sigma=blur_sigma, layers="1", start_percent=0.0,
                end_percent=1.0)
    reference = perturbed_pass_reference(model, seg_reference(1, blur_sigma), 3.0)

    assert_parity(run(ours, family), run(reference, family), plain_of(family))


@pytest.mark.parametrize("mode", ["block", "attention", "feedforward"])
@PER_CONFIG
def test_slg_modes_act_on_the_video_stream_as_a_reference_from_the_definition(tiny_model, plain_of, family, mode):
    """Catches the audio skipped with the video (ComfyUI's SkipLayerGuidanceDiT does: another definition), the
    audio's own sublayers zeroed, and the skipped chunk's audio taken from its input instead of the block."""
    model = tiny_model(family)
    ours = node("GuidersSLG", model=model, scale=3.0, layers="1", mode=mode, start_percent=0.0, end_percent=1.0,
                rescale=0.0)
    reference = perturbed_pass_reference(model, video_only(1, None if mode == "block" else
                                                           video_sublayer_adds_nothing(mode)), 3.0)

    assert_parity(run(ours, family), run(reference, family), plain_of(family))


# ---------------------------------------------------------------------------------------------------------
# The audio leaving the perturbed block


@pytest.mark.parametrize("node_id", ["GuidersPAG", "GuidersSEG", "GuidersSLG"])
@PER_CONFIG
def test_the_audio_leaving_the_perturbed_block_is_the_unperturbed_blocks(tiny_model, family: str, node_id) -> None:
    """What block 2 receives, per chunk: the perturbed branch's audio equals the cond's (the branch's inputs to
    block 1 are the cond's, so the unperturbed block 1 gives both the same audio) and its video does not.
    Catches the video's perturbation reaching the audio inside block 1 (its video-to-audio cross-attention)."""
    model = tiny_model(family)
    inputs = {"PAG": {}, "SEG": {"blur_sigma": 10.0}, "SLG": {"mode": "block", "rescale": 0.0}}[node_id[7:]]
    ours = node(node_id, model=model, scale=3.0, layers="1", start_percent=0.0, end_percent=1.0, **inputs)
    seen = []

    def record(module, args, kwargs):
        video, audio = args[0]
        seen.append((kwargs["transformer_options"]["cond_or_uncond"], video.clone(), audio.clone()))

    handle = model.model.diffusion_model.transformer_blocks[2].register_forward_pre_hook(record, with_kwargs=True)
    try:
        run(ours, family)
    finally:
        handle.remove()

    assert len(seen) == STEPS
    for tags, video, audio in seen:
        videos, audios = dict(zip(tags, video.chunk(len(tags)), strict=True)), dict(zip(tags, audio.chunk(len(tags)),
                                                                                      strict=True))
        branch = max(tags)
        assert branch >= 2 and torch.equal(audios[branch], audios[COND])
        assert not torch.allclose(videos[branch], videos[COND])


# ---------------------------------------------------------------------------------------------------------
# Forward costs


@pytest.mark.parametrize("inputs", [{"node_id": "GuidersPAG"}, {"node_id": "GuidersSLG", "mode": "block"}],
                         ids=["pag", "slg-block"])
@PER_CONFIG
def test_the_perturbed_branch_rides_in_the_one_forward_per_step(tiny_model, plain_of, family: str, inputs) -> None:
    extra = {key: value for key, value in inputs.items() if key != "node_id"}
    patched = node(inputs["node_id"], model=tiny_model(family), scale=3.0, layers="1", start_percent=0.0,
                   end_percent=1.0, **extra)

    with ForwardCounter(patched) as counter:
        out = run(patched, family)

    assert counter.per_step() == [[3]] * STEPS
    for call in counter.calls:
        indices = sorted(call.cond_or_uncond)
        assert indices[:2] == [COND, UNCOND] and indices[2] >= 2, call.cond_or_uncond
    assert relative_error(out, plain_of(family)) > MIN_EFFECT
