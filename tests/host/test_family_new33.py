"""The pack on families ComfyUI added after 0.8.0, on hosts that have them (ComfyUI 0.33.0): tiny random-weight
Anima, Krea 2, Ernie Image, Lens, Ideogram 4, CogVideoX, MageFlow, JoyImage, Boogu-Image, PixelDiT and HiDream O1
models (tiny_models.make_anima / make_krea2 / make_ernie / ... / make_pixeldit / make_hidream_o1) sampled by a real
KSampler. On a host without the family's comfy.supported_models class (ComfyUI 0.8.0) every test of it skips,
naming the missing class.

1. The tiny models: the family's own record, one forward of cond + uncond per step, finite, deterministic and
   prompt-dependent results.
2. Every node that declares the family gives a finite result clearly different from plain CFG (the effect
   matrix, node_table.NEW_IN_033).
3. Values against references written here, each perturbing the model in its own way (never through the
   pack's hooks), applied as an extra cond pass after CFG as ComfyUI's PerturbedAttentionGuidance applies PAG
   on UNets:
   - PAG (Ahn et al. 2024, identity self-attention): an attention override active only while the chosen
     block's self-attention runs gives the image tokens' rows their V and leaves the text rows of joint
     attention as they are; SLG attention_scores: every row V.
   - SEG (Hong 2024): the image queries blurred on the token grid (the core's ``smooth_queries``, checked
     against SEG-SDXL in tests/core), the text queries untouched.
   - SLG ``block``: Lens and MageFlow against ComfyUI's SkipLayerGuidanceDiT (their forwards have the dit
     patch the built-in uses); the others have no host skip, so the block's ``forward`` is replaced by the
     identity on the streams it returns. ``attention`` / ``feedforward``: the sublayer modules return zeros.
4. Costs: the perturbed branch rides in the cond/uncond forward (one call of 3 per step).
5. SAG refuses them, naming the families it supports.

Host behaviour these tests depend on (ComfyUI 0.33.0, comfy/ldm/...):
- ``anima/model.py``: Anima subclasses Cosmos Predict 2's MiniTrainDIT (``cosmos/predict2.py``): blocks called
  ``block(x, t_emb, crossattn_emb, transformer_options=...)``; ``self_attn`` calls optimized_attention with
  (B, heads, S, D), skip_reshape and the options; no dit patch.
- ``krea2/model.py``: ``blocks[i](combined, tvec, freqs, None, transformer_options=...)`` on [text; image];
  ``attn`` repeats k, v to the query heads and calls optimized_attention_masked with (B, heads, L, D),
  skip_reshape and the options; only attn1 / attn1_output patches.
- ``ernie/model.py``: ``layers[i](hidden_states, rotary_pos_emb, temb)`` on [image; text], no options anywhere,
  no DIFFUSION_MODEL wrapper; ``self_attention(x, attention_mask=None, image_rotary_emb=...)`` calls the module's
  global optimized_attention on (B, L, heads·D) without the options (its references replace that function).
- ``lens/model.py``: dit patch ("double_block", i) with img, txt, vec, pe, attn_mask; ``attn`` joint attention
  on [image; text] with (B, heads, L, D), skip_reshape and the options; the block returns (txt, img).
- ``ideogram4/model.py``: ``layers[i](h, attn_mask, freqs_cis, adaln_input, transformer_options=...)`` on
  [text; image]; ``attention`` calls optimized_attention_masked with (B, heads, L, D), skip_reshape, options.
- ``cogvideo/model.py``: ``blocks[i](hidden_states=, encoder_hidden_states=, temb=, image_rotary_emb=,
  transformer_options=)`` returns (video, text); the joint attention on [text; video] is inline in the block:
  optimized_attention with (B, L, heads·D) and the options.
- ``mage_flow/model.py``: Qwen-Image's blocks (``qwen_image/model.py``) with the dit patch ("double_block", i);
  joint attention on [text; image] (one token per latent pixel), (B, heads, L, D) with skip_reshape and the
  options; the block returns (txt, img).
- ``boogu/model.py``: ``double_stream_layers[i](img, instruct, rope, img_rope, temb, ...)`` by position, returns
  (img, instruct); ``img_instruct_attn`` (joint, [instruction; image]) then ``img_self_attn`` (OmniGen 2's
  Attention on the image tokens), both optimized_attention_masked with (B, heads, L, D), skip_reshape, options.
- ``pixeldit/model.py``: ``patch_blocks[i](x, y, c, pos_img, pos_txt, None, transformer_options=)`` returns (x, y);
  ``attn`` joint attention on [text; image], optimized_attention with skip_reshape, skip_output_reshape, options.
- ``hidream_o1/model.py``: ``language_model.layers[i](x=, attention_mask=None, freqs_cis=, optimized_attention=,
  past_key_value=)`` returns (x, K/V); the two-pass attention gives the prompt's causal rows to SDPA and the rest's
  queries, against every key, to optimized_attention with the forward's options; the prompt's K/V are cached
  across steps and runs unless a dit patch is set.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from harness import ForwardCounter, run_node, sample, scheduler_sigmas
from node_table import NEW_IN_033, EffectCase, effect_params
from references import (
    attention_override_during_pass,
    host_function_during_pass,
    inside_module,
    modules_return,
    perturbed_pass_reference,
)
from support import CFG, MIN_EFFECT, STEPS, assert_effect, assert_parity, node, pack_module, relative_error
from tiny_models import NEW_IN_033_FAMILIES, family_spec, host_lacks, make_conditioning, make_latent

from guidance_core.perturb import smooth_queries

assert set(NEW_IN_033) == set(NEW_IN_033_FAMILIES)


@dataclass(frozen=True)
class NewFamily:
    """What the tests need to know of a family, read from the host's code (not from the pack)."""

    name: str  # as the pack's messages name it
    diffusion_model: str  # "module:Class"
    blocks: str
    self_attention: str  # the module, inside a block, while whose forward the block's self-attention runs
    grid: tuple[int, int]  # image token grid of one frame of the 8x8 test latent
    text_first: bool | None  # None: no text in the self-attention sequence
    streams: tuple[str, ...] = ("x",)  # what the block returns, by argument name (keywords: CogVideoX)
    attention: bool = True  # attention perturbations supported
    host_slg: bool = False  # ComfyUI's SkipLayerGuidanceDiT works on it (a dit block patch in its forward)
    sublayers: dict = None
    # "module:function" of the attention its self-attention module calls without the options (no override reaches
    # it): the references replace that function while the module runs. "": through optimized_attention_override.
    attention_function: str = ""
    # The forward caches the prompt's K/V across steps unless a dit patch is set (HiDream O1): the references' perturbed
    # pass sets a host dit patch entry no layer uses, and its layers return (x, K/V cache).
    prompt_cache: bool = False


FAMILIES = {
    "anima": NewFamily("Anima", "comfy.ldm.anima.model:Anima", "blocks", "self_attn", (4, 4), None,
                       sublayers={"attention": ["self_attn"], "feedforward": ["mlp"]}),
    "krea2": NewFamily("Krea 2", "comfy.ldm.krea2.model:SingleStreamDiT", "blocks", "attn", (4, 4), True,
                       sublayers={"attention": ["attn"], "feedforward": ["mlp"]}),
    "ernie": NewFamily("Ernie Image", "comfy.ldm.ernie.model:ErnieImageModel", "layers", "self_attention", (8, 8),
                       False, sublayers={"attention": ["self_attention"], "feedforward": ["mlp"]},
                       attention_function="comfy.ldm.ernie.model:optimized_attention"),
    "lens": NewFamily("Lens", "comfy.ldm.lens.model:LensTransformer2DModel", "transformer_blocks", "attn", (8, 8),
                      False, streams=("encoder_hidden_states", "hidden_states"), host_slg=True,
                      sublayers={"attention": ["attn.to_out.0", "attn.to_add_out"],
                                 "feedforward": ["img_mlp", "txt_mlp"]}),
    "ideogram4": NewFamily("Ideogram 4", "comfy.ldm.ideogram4.model:Ideogram4Transformer2DModel", "layers",
                           "attention", (8, 8), True,
                           sublayers={"attention": ["attention"], "feedforward": ["feed_forward"]}),
    "cogvideox": NewFamily("CogVideoX", "comfy.ldm.cogvideo.model:CogVideoXTransformer3DModel", "blocks", "",
                           (4, 4), True, streams=("hidden_states", "encoder_hidden_states"),
                           sublayers={"attention": ["attn_out"], "feedforward": ["ff_out"]}),
    "mage_flow": NewFamily("MageFlow", "comfy.ldm.mage_flow.model:MageFlowTransformer2DModel", "transformer_blocks",
                           "attn", (8, 8), True, streams=("encoder_hidden_states", "hidden_states"), host_slg=True,
                           sublayers={"attention": ["attn.to_out.0", "attn.to_add_out"],
                                      "feedforward": ["img_mlp", "txt_mlp"]}),
    "joyimage": NewFamily("JoyImage", "comfy.ldm.joyimage.model:JoyImageTransformer3DModel", "double_blocks", "attn",
                          (4, 4), False, streams=("hidden_states", "encoder_hidden_states"), host_slg=True,
                          sublayers={"attention": ["attn.img_attn_proj", "attn.txt_attn_proj"],
                                     "feedforward": ["img_mlp", "txt_mlp"]}),
    # Boogu-Image: layer "1" is double_stream_layers[1], perturbed on its image self-attention (image tokens only).
    "boogu": NewFamily("Boogu-Image", "comfy.ldm.boogu.model:BooguTransformer2DModel", "double_stream_layers",
                       "img_self_attn", (4, 4), True, streams=("img_hidden_states", "instruct_hidden_states"),
                       sublayers={"attention": ["img_instruct_attn", "img_self_attn"],
                                  "feedforward": ["img_feed_forward", "instruct_feed_forward"]}),
    # PixelDiT: joint attention on [text; image patches] in its patch blocks, which return (image, text).
    "pixeldit": NewFamily("PixelDiT", "comfy.ldm.pixeldit.model:PixDiT_T2I", "patch_blocks", "attn", (4, 4), True,
                          streams=("x", "y"), sublayers={"attention": ["attn"], "feedforward": ["mlp_x", "mlp_y"]}),
    # HiDream O1: [prompt; image]; its attention's override-visible call has the generated rows' queries only.
    "hidream_o1": NewFamily("HiDream O1", "comfy.ldm.hidream_o1.model:HiDreamO1Transformer", "language_model.layers",
                            "self_attn", (4, 4), True, sublayers={"attention": ["self_attn"], "feedforward": ["mlp"]},
                            prompt_cache=True),
}
PER_FAMILY = pytest.mark.parametrize("family", NEW_IN_033_FAMILIES)
ATTENTION_FAMILIES = [f for f in NEW_IN_033_FAMILIES if FAMILIES[f].attention]


@pytest.fixture(autouse=True)
def _pack(guiders_pack):
    return guiders_pack


@pytest.fixture
def model_of(tiny_model) -> Callable:
    def get(family: str):
        reason = host_lacks(family)
        if reason is not None:
            pytest.skip(reason)
        return tiny_model(family)

    return get


def run(model, family: str, cfg: float = CFG) -> torch.Tensor:
    getattr(model.model.diffusion_model, "clear_kv_cache", lambda: None)()  # HiDream O1: no K/V of an earlier run
    positive, negative = make_conditioning(family, seed=1)
    return sample(model, positive, negative, make_latent(family, seed=2), cfg=cfg, steps=STEPS, seed=3)


@pytest.fixture(scope="module")
def plain_of(tiny_model) -> Callable:
    results: dict[str, torch.Tensor] = {}

    def get(family: str) -> torch.Tensor:
        if family not in results:
            results[family] = run(tiny_model(family), family)
        return results[family]

    return get


def all_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.model.diffusion_model.modules())


def block_of(dm, family: str, index: int):
    return operator.attrgetter(FAMILIES[family].blocks)(dm)[index]




def image_rows(family: str, length: int) -> slice:
    """The image tokens' rows of the block's self-attention sequence of ``length`` tokens (text and image only)."""
    facts = FAMILIES[family]
    frames = family_spec(family).latent_frames or 1
    image = frames * facts.grid[0] * facts.grid[1]
    if facts.text_first is None:
        assert length == image
        return slice(0, length)
    return slice(length - image, length) if facts.text_first else slice(0, image)


# ---------------------------------------------------------------------------------------------------------
# The tiny models


@PER_FAMILY
def test_tiny_model_is_its_family_one_call_of_two_per_step_finite_and_deterministic(
    guiders_pack, model_of, family: str
) -> None:
    model = model_of(family)
    dm = model.model.diffusion_model
    sigmas = scheduler_sigmas(model, steps=STEPS)
    with ForwardCounter(model) as counter:
        out = run(model, family)

    assert f"{type(dm).__module__}:{type(dm).__qualname__}" == FAMILIES[family].diffusion_model
    assert pack_module(guiders_pack, "host.layers").model_family(model) == family
    assert (sigmas[1:] < sigmas[:-1]).all() and sigmas[-1].item() == 0.0
    assert out.shape == make_latent(family).shape
    assert torch.isfinite(out).all() and out.std() > 0.1
    assert counter.per_step() == [[2]] * STEPS
    assert torch.equal(out, run(model, family)), "the same model, prompt and seed gave another result"
    assert relative_error(out, run(model, family, cfg=1.0)) > MIN_EFFECT, "cfg 5 and cfg 1 give the same latent"


def test_the_new_families_are_declared_where_this_file_tests_them(guiders_pack) -> None:
    common = pack_module(guiders_pack, "common")
    for family, facts in FAMILIES.items():
        assert family in common.BLOCK_FAMILIES and family not in common.SAG_FAMILIES
        assert (family in common.PAG_FAMILIES) == facts.attention == (family in common.ATTENTION_FAMILIES)


# ---------------------------------------------------------------------------------------------------------
# Every node that declares these families changes the result


@pytest.mark.parametrize(("case", "family"), effect_params(NEW_IN_033))
def test_node_changes_the_result_on_new_families_and_stays_finite(
    model_of, weak_model_of, family: str, case: EffectCase
) -> None:
    model = model_of(family)
    patched = case.build(model, weak_model_of(family))

    assert_effect(run(patched, family, cfg=case.cfg), run(model, family, cfg=case.cfg))
    assert all_hooks(model) == 0, "a hook outlived sampling"


# ---------------------------------------------------------------------------------------------------------
# Identity self-attention (PAG, SLG attention_scores) against the definition


def _values_as_output(q, v, kwargs) -> torch.Tensor:
    """V in the layout optimized_attention returns, (B, L, heads·D): from (B, heads, L, D) with skip_reshape
    (k, v already repeated to the query heads by Krea 2's attention), else as passed."""
    if kwargs.get("skip_reshape"):
        assert v.shape[1] == q.shape[1]
        return v.transpose(1, 2).flatten(2)
    return v


def without_prompt_cache(family: str, model_options: dict) -> dict:
    """``model_options`` with, for a family whose forward caches the prompt's K/V unless a dit patch is set (HiDream O1:
    ``can_cache = not blocks_replace``), a dit patch entry no layer looks up: the perturbed pass keeps no K/V."""
    if not FAMILIES[family].prompt_cache:
        return model_options
    options = dict(model_options)
    transformer_options = dict(options.get("transformer_options", {}))
    replace = dict(transformer_options.get("patches_replace", {}))
    replace["dit"] = {**replace.get("dit", {}), ("reference: no prompt cache",): lambda args, extra: None}
    transformer_options["patches_replace"] = replace
    options["transformer_options"] = transformer_options
    return options


def attention_route(family: str, override: Callable) -> Callable:
    """The way ``override(func, q, k, v, ...)`` reaches the family's attention calls in a reference pass: the
    host function its attention module calls (Ernie Image's optimized_attention, called without the options),
    else the model's optimized_attention_override."""
    where = FAMILIES[family].attention_function
    return host_function_during_pass(where, override) if where else attention_override_during_pass(override)


def identity_reference(family: str, index: int, image_only: bool) -> Callable:
    """While block ``index``'s self-attention module runs, the attention output's image rows (``image_only``)
    or all rows are V; the text rows of joint attention keep their normal attention."""
    inside = {"module": False}

    def override(func, q, k, v, *args, **kwargs):
        out = func(q, k, v, *args, **kwargs)
        if not inside["module"]:
            return out
        out = out.clone()
        if kwargs.get("skip_output_reshape"):  # (B, heads, L, D) out, as q, k, v came (PixelDiT, HiDream O1)
            # HiDream O1 hands the sequence's last rows' queries alone: row i of the output is key position
            # i + (keys - queries).
            prefix = v.shape[2] - out.shape[2]
            rows = image_rows(family, out.shape[2]) if image_only else slice(None, out.shape[2])
            out[:, :, rows] = v[:, :, prefix:][:, :, rows]
            return out
        values = _values_as_output(q, v, kwargs)
        rows = image_rows(family, values.shape[1]) if image_only else slice(None)
        out[:, rows] = values[:, rows]
        return out

    def attention_of(dm):
        return block_of(dm, family, index).get_submodule(FAMILIES[family].self_attention)

    return inside_module(attention_of, inside, attention_route(family, override))


IDENTITY_CASES = [pytest.param(family, node_id, id=f"{family}-{node_id}") for family in ATTENTION_FAMILIES
                  for node_id in ("GuidersPAG", "GuidersSLG-attention_scores")]


@pytest.mark.parametrize(("family", "node_id"), IDENTITY_CASES)
def test_identity_self_attention_matches_a_reference_from_the_definition(
    model_of, plain_of, family: str, node_id: str
) -> None:
    """Breaks caught (each tried on the worktree, then reverted): the text rows perturbed too (Lens' record with
    TEXT_BEFORE_IMAGE, Krea 2's with NO_TEXT, Ideogram 4's and MageFlow's patch (1, 2, 2) instead of one token
    per latent pixel, CogVideoX's site counting 0 text tokens, Ernie Image's with TEXT_BEFORE_IMAGE or
    module_hooks.image_grid putting its image after the text), Ernie Image's recomputed q and k without the
    rotary embedding (PAG: its text rows' attention changes), Boogu's double blocks marked on their joint
    attention ``img_instruct_attn`` instead of ``img_self_attn``, PixelDiT's site counting 0 text tokens, HiDream
    O1's site without ``queries_are_last_rows`` (the override took its call for cross-attention) or its grid one
    token early, the wrong block (block hooks and module hooks on
    index + 1), the wrong chunk perturbed (routing's chunk perturbations reversed)."""
    model = model_of(family)
    if node_id == "GuidersPAG":
        ours = node("GuidersPAG", model=model, scale=3.0, layers="1", start_percent=0.0, end_percent=1.0)
    else:
        ours = node("GuidersSLG", model=model, scale=3.0, layers="1", mode="attention_scores", start_percent=0.0,
                    end_percent=1.0, rescale=0.0)
    reference = perturbed_pass_reference(model, identity_reference(family, 1, node_id == "GuidersPAG"), 3.0)

    with ForwardCounter(model) as counter:
        result = run(ours, family)

    assert counter.per_step() == [[3]] * STEPS, "the perturbed branch should ride in the cond/uncond forward"
    assert_parity(result, run(reference, family), plain_of(family))
    assert all_hooks(model) == 0, "a hook outlived sampling"


# ---------------------------------------------------------------------------------------------------------
# SEG against a blur reference on the token grid


def queries_blurred(family: str, index: int, blur_sigma: float) -> Callable:
    facts = FAMILIES[family]
    frames = family_spec(family).latent_frames or 1
    inside = {"module": False}

    def override(func, q, k, v, *args, **kwargs):  # q: (B, heads, L, D) with skip_reshape, else (B, L, heads·D)
        if inside["module"]:
            start = image_rows(family, q.shape[-2]).start
            q = smooth_queries(q, facts.grid, blur_sigma, image_token_start=start, frames=frames)
        return func(q, k, v, *args, **kwargs)

    def attention_of(dm):
        return block_of(dm, family, index).get_submodule(facts.self_attention)

    return inside_module(attention_of, inside, attention_route(family, override))


@pytest.mark.parametrize("blur_sigma", [2.0, 99999.0])
@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
def test_seg_blurs_the_image_queries_on_the_token_grid_as_a_reference(
    model_of, plain_of, family: str, blur_sigma: float
) -> None:
    """Breaks caught: the text queries blurred instead of the image's (Lens' record with TEXT_BEFORE_IMAGE,
    Krea 2's with NO_TEXT, Ideogram 4's patch (1, 2, 2), Ernie Image's with TEXT_BEFORE_IMAGE), Boogu's joint
    attention blurred instead of its image self-attention, PixelDiT's site counting 0 text tokens, HiDream O1's
    queries left unplaced or its grid one token early, Ernie Image's
    recomputed q and k without the rotary embedding, CogVideoX's frames not counted (routing.grid_for with
    one frame: only the first frame blurred), the wrong block, the chunks' perturbations reversed."""
    model = model_of(family)
    ours = node("GuidersSEG", model=model, scale=3.0, blur_sigma=blur_sigma, layers="1", start_percent=0.0,
                end_percent=1.0)
    reference = perturbed_pass_reference(model, queries_blurred(family, 1, blur_sigma), 3.0)

    with ForwardCounter(model) as counter:
        result = run(ours, family)

    assert counter.per_step() == [[3]] * STEPS
    assert_parity(result, run(reference, family), plain_of(family))


# ---------------------------------------------------------------------------------------------------------
# SLG: block skip (ComfyUI's SkipLayerGuidanceDiT where it works, else the identity block) and sublayer skips


@contextlib.contextmanager
def _forward_replaced(module, forward):
    module.forward = forward  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        del module.forward


def block_skipped(family: str, index: int) -> Callable:
    """Block ``index``'s forward replaced by the identity on the streams it returns."""
    streams = FAMILIES[family].streams

    @contextlib.contextmanager
    def perturbed(dm, model_options):
        block = block_of(dm, family, index)
        signature = inspect.signature(block.forward)

        def identity(*args, **kwargs):
            if streams == ("x",):
                x = args[0] if args else kwargs["x"]
                return (x, None) if FAMILIES[family].prompt_cache else x  # HiDream O1: (x, K/V cache)
            bound = signature.bind(*args, **kwargs).arguments  # keywords (Lens, CogVideoX) or positions (Boogu)
            return tuple(bound[name] for name in streams)

        with _forward_replaced(block, identity):
            yield without_prompt_cache(family, model_options)

    return perturbed


@pytest.mark.parametrize("layers", ["0", "1"])
@PER_FAMILY
def test_slg_block_matches_the_host_skip_or_the_identity_block(model_of, plain_of, family: str, layers: str) -> None:
    """Lens, MageFlow: against ComfyUI's SkipLayerGuidanceDiT; the others: the block replaced by the identity. Breaks
    caught: the kept input written into the other chunk's rows (block hooks and module hooks), Boogu's double block
    streams in the wrong order (instruction, image), PixelDiT's (text, image), the wrong block
    (index + 1), the chunks' perturbations reversed."""
    model = model_of(family)
    ours = node("GuidersSLG", model=model, scale=3.0, layers=layers, mode="block", start_percent=0.0,
                end_percent=1.0, rescale=0.0)
    if FAMILIES[family].host_slg:
        reference = node("SkipLayerGuidanceDiT", model=model, double_layers=layers, single_layers="", scale=3.0,
                         start_percent=0.0, end_percent=1.0, rescaling_scale=0.0)
    else:
        reference = perturbed_pass_reference(model, block_skipped(family, int(layers)), 3.0)

    with ForwardCounter(model) as counter:
        result = run(ours, family)

    assert counter.per_step() == [[3]] * STEPS
    assert_parity(result, run(reference, family), plain_of(family))
    assert all_hooks(model) == 0, "a hook outlived sampling"


def _zeros(output):
    """The module's outputs as zeros; what is not a tensor (HiDream O1's attention returns its K/V cache or None)
    as it is."""
    def zero(t):
        return torch.zeros_like(t) if isinstance(t, torch.Tensor) else t

    return tuple(zero(t) for t in output) if isinstance(output, tuple) else zero(output)


@pytest.mark.parametrize("mode", ["attention", "feedforward"])
@PER_FAMILY
def test_sublayer_skip_matches_its_definition(model_of, plain_of, family: str, mode: str) -> None:
    """Block 1's sublayer modules (both streams' where there are two) add nothing for the perturbed branch.
    Breaks caught: only one of Lens' two attention projections zeroed (its record without attn.to_add_out), only
    Boogu's image self-attention zeroed (its joint attention left), only PixelDiT's image MLP zeroed, the
    hooks on the next block (block hooks' index + 1)."""
    model = model_of(family)
    ours = node("GuidersSLG", model=model, scale=3.0, layers="1", mode=mode, start_percent=0.0, end_percent=1.0,
                rescale=0.0)

    def modules_of(dm):
        block = block_of(dm, family, 1)
        return [block.get_submodule(name) for name in FAMILIES[family].sublayers[mode]]

    zeroed = modules_return(modules_of, lambda m, x, out: _zeros(out))

    @contextlib.contextmanager
    def perturbed(dm, model_options):
        with zeroed(dm, without_prompt_cache(family, model_options)) as options:
            yield options

    reference = perturbed_pass_reference(model, perturbed, 3.0)

    with ForwardCounter(model) as counter:
        result = run(ours, family)

    assert counter.per_step() == [[3]] * STEPS
    assert_parity(result, run(reference, family), plain_of(family))


# ---------------------------------------------------------------------------------------------------------
# Refusals


@PER_FAMILY
def test_sag_refuses_them_and_names_the_supported_families(model_of, family: str) -> None:
    with pytest.raises(ValueError) as raised:
        run_node("GuidersSAG", model=model_of(family), scale=0.5, blur_sigma=2.0)
    message = str(raised.value)
    name = FAMILIES[family].name
    assert name in message and "supports" in message and name not in message.split("supports", 1)[-1], message


# ---------------------------------------------------------------------------------------------------------
# A padded prompt: the host's block function closes over the text mask


def masked_conditioning(family: str):
    """The family's conditioning with its last 4 text tokens marked as padding (``attention_mask``), as a text
    encoder gives a prompt padded to a batch's longest."""
    positive, negative = make_conditioning(family, seed=1)
    for conditioning in (positive, negative):
        context, extras = conditioning[0]
        mask = torch.ones(context.shape[:2], dtype=torch.long)
        mask[:, -4:] = 0
        conditioning[0] = [context, {**extras, "attention_mask": mask}]
    return positive, negative


@pytest.mark.parametrize("method", ["PAG", "SLG-block"])
def test_mageflow_with_a_padded_prompt_matches_its_reference(model_of, method: str) -> None:
    """MageFlow's (and Qwen-Image's) dit patch hands the block img/txt/vec/pe, while the block function closes
    over the text mask, (B, L): the shared prefix and the skipped chunks must not run it on fewer rows. Before
    the fix (shared_prefix.closure_holds_batch) both raised "expanded size of the tensor (2) must match the
    existing size (3)" (shown again with the check disabled); and the override must keep the mask the block
    passes by position to optimized_attention_masked (without it PAG was 3e-1 off the reference)."""
    family = "mage_flow"
    model = model_of(family)
    positive, negative = masked_conditioning(family)
    latent = make_latent(family, seed=2)

    def run_masked(m):
        return sample(m, positive, negative, latent, cfg=CFG, steps=STEPS, seed=3)

    if method == "PAG":
        ours = node("GuidersPAG", model=model, scale=3.0, layers="1", start_percent=0.0, end_percent=1.0)
        reference = perturbed_pass_reference(model, identity_reference(family, 1, True), 3.0)
    else:
        ours = node("GuidersSLG", model=model, scale=3.0, layers="1", mode="block", start_percent=0.0,
                    end_percent=1.0, rescale=0.0)
        reference = node("SkipLayerGuidanceDiT", model=model, double_layers="1", single_layers="", scale=3.0,
                         start_percent=0.0, end_percent=1.0, rescaling_scale=0.0)
    with ForwardCounter(model) as counter:
        result = run_masked(ours)

    assert counter.per_step() == [[3]] * STEPS
    assert_parity(result, run_masked(reference), run_masked(model))


# ---------------------------------------------------------------------------------------------------------
# JoyImage-Edit: reference latents' tokens appended after the generated image's


def with_reference_latent(family: str, side: int):
    """The family's conditioning with one reference latent of ``side`` x ``side`` on both prompts (JoyImage-Edit's
    ``reference_latents``: the model appends its tokens after the image's, before the text)."""
    positive, negative = make_conditioning(family, seed=1)
    spec = family_spec(family)
    frames = () if spec.latent_frames is None else (spec.latent_frames,)
    reference = torch.randn(1, spec.latent_channels, *frames, side, side, generator=torch.Generator().manual_seed(9))
    for conditioning in (positive, negative):
        context, extras = conditioning[0]
        conditioning[0] = [context, {**extras, "reference_latents": [reference]}]
    return positive, negative


@pytest.mark.parametrize("side", [8, 16])
@pytest.mark.parametrize("node_id", ["GuidersPAG", "GuidersSEG"])
def test_joyimage_edit_perturbs_only_the_generated_images_tokens(model_of, node_id: str, side: int) -> None:
    """[image; reference image; text] in JoyImage-Edit's joint attention: PAG's identity rows and SEG's blurred
    queries are the generated image's only (its grid from the latent), the reference's and the text's untouched.
    A 16x16 reference (4x the image's tokens) makes the sequence length fit other grids. Breaks caught: the grid
    guessed from the sequence length (routing.grid_for, before the record's patch_size_attribute: 1e-2 and 3e-2
    off with the 16x16 reference, taken with the image as one 8x8 grid), the grid placed after the reference."""
    family = "joyimage"
    model = model_of(family)
    positive, negative = with_reference_latent(family, side)
    latent = make_latent(family, seed=2)

    def run_edit(m):
        return sample(m, positive, negative, latent, cfg=CFG, steps=STEPS, seed=3)

    if node_id == "GuidersPAG":
        ours = node("GuidersPAG", model=model, scale=3.0, layers="1", start_percent=0.0, end_percent=1.0)
        reference = perturbed_pass_reference(model, identity_reference(family, 1, True), 3.0)
    else:
        ours = node("GuidersSEG", model=model, scale=3.0, blur_sigma=2.0, layers="1", start_percent=0.0,
                    end_percent=1.0)
        reference = perturbed_pass_reference(model, queries_blurred(family, 1, 2.0), 3.0)
    with ForwardCounter(model) as counter:
        result = run_edit(ours)

    assert counter.per_step() == [[3]] * STEPS
    assert_parity(result, run_edit(reference), run_edit(model))


@pytest.mark.parametrize("side", [8, 16])
@pytest.mark.parametrize("node_id", ["GuidersPAG", "GuidersSEG"])
def test_krea2_edit_perturbs_only_the_generated_images_tokens(model_of, node_id: str, side: int) -> None:
    """Krea 2 edit's stream is [text; image; reference images] (``reference_latents`` with the "index" method, as
    ComfyUI's reference-latent nodes set it): PAG's identity rows and SEG's blurred queries are the image's only,
    the reference's and the text's untouched. Break caught: the image taken as the stream's last tokens (before
    module_hooks.image_grid's ``trailing_tokens``: the reference's tokens were perturbed instead)."""
    family = "krea2"
    model = model_of(family)
    positive, negative = with_reference_latent(family, side)
    for conditioning in (positive, negative):
        conditioning[0][1]["reference_latents_method"] = "index"
    latent = make_latent(family, seed=2)
    text_tokens = family_spec(family).context_tokens
    image = FAMILIES[family].grid[0] * FAMILIES[family].grid[1]

    def image_first_after_text(length):  # the text, then the image; the reference's tokens after it
        return slice(text_tokens, text_tokens + image)

    def run_edit(m):
        return sample(m, positive, negative, latent, cfg=CFG, steps=STEPS, seed=3)

    with _image_rows_as(image_first_after_text):
        if node_id == "GuidersPAG":
            ours = node("GuidersPAG", model=model, scale=3.0, layers="1", start_percent=0.0, end_percent=1.0)
            reference = perturbed_pass_reference(model, identity_reference(family, 1, True), 3.0)
        else:
            ours = node("GuidersSEG", model=model, scale=3.0, blur_sigma=2.0, layers="1", start_percent=0.0,
                        end_percent=1.0)
            reference = perturbed_pass_reference(model, queries_blurred(family, 1, 2.0), 3.0)
        with ForwardCounter(model) as counter:
            result = run_edit(ours)
        expected = run_edit(reference)

    assert counter.per_step() == [[3]] * STEPS
    assert_parity(result, expected, run_edit(model))


@contextlib.contextmanager
def _image_rows_as(rows_of):
    """``image_rows`` answering ``rows_of(length)`` for every family while the block runs (a sequence with
    reference-image tokens, which image_rows' text-and-image layout does not know)."""
    global image_rows
    kept = image_rows
    image_rows = lambda family, length: rows_of(length)  # noqa: E731
    try:
        yield
    finally:
        image_rows = kept


@pytest.mark.parametrize("node_id", ["GuidersPAG", "GuidersSEG"])
def test_boogu_single_blocks_perturb_the_image_rows_of_their_joint_attention(model_of, plain_of, node_id: str) -> None:
    """Boogu-Image's single-stream layers are OmniGen 2's blocks on [text; image]: layer "single.1" perturbs the
    image rows (the last tokens) of ``single_stream_layers[1].attn``. Break caught: the single blocks' site on the
    text rows (the record with TEXT_AFTER_IMAGE: the grid at the start of the stream)."""
    family = "boogu"
    model = model_of(family)
    image = FAMILIES[family].grid[0] * FAMILIES[family].grid[1]
    inside = {"module": False}

    def override(func, q, k, v, *args, **kwargs):
        if not inside["module"]:
            return func(q, k, v, *args, **kwargs)
        rows = slice(q.shape[2] - image, q.shape[2])  # (B, heads, L, D) with skip_reshape
        if node_id == "GuidersSEG":
            q = smooth_queries(q, FAMILIES[family].grid, 2.0, image_token_start=rows.start)
            return func(q, k, v, *args, **kwargs)
        out = func(q, k, v, *args, **kwargs).clone()  # (B, L, heads·D)
        out[:, rows] = v.transpose(1, 2).flatten(2)[:, rows]
        return out

    perturbed = inside_module(lambda dm: dm.single_stream_layers[1].attn, inside,
                              attention_override_during_pass(override))
    extra = {"blur_sigma": 2.0} if node_id == "GuidersSEG" else {}
    ours = node(node_id, model=model, scale=3.0, layers="single.1", start_percent=0.0, end_percent=1.0, **extra)
    with ForwardCounter(model) as counter:
        result = run(ours, family)

    assert counter.per_step() == [[3]] * STEPS
    assert_parity(result, run(perturbed_pass_reference(model, perturbed, 3.0), family), plain_of(family))


def test_hidream_o1_keeps_no_perturbed_prompt_cache_between_runs(model_of) -> None:
    """HiDream O1's forward caches the prompt's K/V across steps and runs, keyed on the prompt alone, unless a dit
    patch is set; a skipped layer changes the perturbed branch's prompt rows. A run skipping layer 0, then one
    skipping layer 1 on the same model, must give what the second gives alone. Break caught: the record without
    PROMPT_CACHE_OFF (the second run took the first run's perturbed K/V: off by far more than the tolerance)."""
    family = "hidream_o1"
    model = model_of(family)

    def slg(layers):
        return node("GuidersSLG", model=model, scale=3.0, layers=layers, mode="block", start_percent=0.0,
                    end_percent=1.0, rescale=0.0)

    positive, negative = make_conditioning(family, seed=1)
    latent = make_latent(family, seed=2)

    def sample_keeping_the_cache(m):
        return sample(m, positive, negative, latent, cfg=CFG, steps=STEPS, seed=3)

    run(slg("0"), family)  # run() clears the cache first; this one leaves what it cached
    after_another = sample_keeping_the_cache(slg("1"))
    alone = run(slg("1"), family)

    assert relative_error(after_another, alone) < 1e-5
