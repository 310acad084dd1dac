"""The pack on the families whose forward offers no block patch: tiny random-weight PixArt-Σ, HiDream,
OmniGen 2, Cosmos Predict 2 and Cosmos Predict 1 models (tiny_models.make_pixart / make_hidream /
make_omnigen2 / make_cosmos_predict2 / make_cosmos) sampled by a real KSampler. The pack hooks their
modules (nodes/host/module_hooks.py) for one forward at a time.

1. The tiny models: the family's own noise schedule, one forward of cond + uncond per step, finite,
   deterministic results that depend on the prompt.
2. Every node that declares the family gives a finite result clearly different from plain CFG (the effect
   matrix, node_table.effect_params).
3. Values against references written here from each method's definition, each perturbing the model in its
   own way (never through the pack's hooks), applied as an extra cond pass after CFG as ComfyUI's
   PerturbedAttentionGuidance applies PAG on UNets:
   - PAG / SLG attention_scores (Ahn et al. 2024, identity self-attention): PixArt and the Cosmos models, a
     forward hook on the block's self-attention module returning its output projection of V (V from the
     module's own projections, computed here); HiDream's joint attention (image tokens first, text after)
     and OmniGen 2's (text and reference images first, the image last), an attention override active only
     inside the block's attention module that gives the image rows V and leaves the text rows as they are
     (attention_scores: every row V).
   - SEG (Hong 2024): the image queries blurred on each frame's token grid (the core's ``smooth_queries``,
     checked against SEG-SDXL in tests/core); for PixArt, whose attention no override sees, the module's
     attention recomputed here from its own q, k, v with the blurred queries.
   - SLG ``block``: the host has no skip for these families, so the reference replaces the block module's
     ``forward`` by the identity on its inputs (the streams it returns) for the perturbed pass.
   - SLG ``attention`` / ``feedforward``: the sublayer modules return zeros for the perturbed pass.
4. Costs: the perturbed branch rides in the cond/uncond forward (one call of 3 per step).
5. Hooks never outlive a forward: none on any module after sampling, nor after a forward that raised.

Host behaviour these tests depend on (ComfyUI 0.8.0, comfy/ldm/...):
- ``pixart/pixartms.py``: ``PixArtMS.forward_orig`` calls ``block(x, y, t0, y_lens, (H, W))`` for each of
  ``blocks``; ``PixArtMSBlock`` runs ``attn`` (AttentionKVCompress: ``proj(attention(q_norm(q), k_norm(k),
  v))`` with q, k, v from one ``qkv`` Linear, its attention called WITHOUT transformer_options, so no
  override sees it), ``cross_attn``, ``mlp``. Its position embedding needs a latent side > 32.
- ``hidream/model.py``: ``double_stream_blocks[i]`` / ``single_stream_blocks[i]`` are called with keyword
  arguments (image_tokens, text_tokens, ..., transformer_options); ``block.attn1`` builds the joint
  sequence image tokens first, then text (single blocks: one stream, image first), and calls
  ``optimized_attention`` with (B, L, heads·D) tensors and the forward's transformer_options; double blocks
  return (image, text). No ``dit`` patch, no block_index.
- ``omnigen/omnigen2.py``: ``layers[i](hidden_states, mask, rope, temb, transformer_options=...)`` on one
  stream [text; reference images; image]; ``attn`` (grouped-query: k, v repeated to the query heads; 0.33.0
  passes the fewer k/v heads with ``enable_gqa=True`` instead) calls
  ``optimized_attention_masked`` (= optimized_attention) with (B, heads, L, D), skip_reshape and the options;
  its output and ``feed_forward``'s pass through an RMSNorm before the gated residual (zero stays zero).
  The forward needs ``num_tokens``, from the conditioning's attention_mask.
- ``cosmos/predict2.py``: ``MiniTrainDIT`` calls ``block(x, t_emb, crossattn_emb, **block_kwargs)``; each
  ``Block`` runs ``self_attn`` (``output_proj(attention(q, k, v_norm(v)))``, (B, heads, S, D) with
  skip_reshape and the transformer_options), ``cross_attn``, ``mlp``. No ``dit`` patch, no block_index
  (0.33.0 sets block_index, still no patch).
- ``cosmos/model.py`` + ``blocks.py``: ``GeneralDIT`` keeps its blocks in a ModuleDict (``block0``...) and calls
  each with x as (T, H, W, B, D) (``block_x_format`` THWBD) after ``x += extra_pos_emb``; a block
  ("FA-CA-MLP") runs ``blocks.0.block`` (VideoAttn: self-attention, ``to_out`` of the attention of
  ``to_q``/``to_k``/``to_v`` = Linear then a per-head norm, on (S, B, D) sequences, through
  ``optimized_attention`` with (B, heads, S, D) and the options), ``blocks.1`` (cross), ``blocks.2.block`` (MLP).
- ``supported_models.py``: PixArtSigma (EPS, sqrt-linear betas), HiDream (flow, shift 3),
  CosmosT2IPredict2 (EDM-style flow, σ 0.002..80), CosmosT2V (EDM, σ_data 0.5).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from harness import ForwardCounter, sample, scheduler_sigmas
from node_table import HOOKLESS, EffectCase, effect_params
from references import attention_override_during_pass, inside_module, modules_return, perturbed_pass_reference
from support import CFG, MIN_EFFECT, STEPS, assert_effect, assert_parity, node, relative_error
from tiny_models import HOOKLESS_FAMILIES, family_spec, make_conditioning, make_latent

from guidance_core.perturb import smooth_queries

COND, UNCOND = 0, 1


@dataclass(frozen=True)
class HooklessFamily:
    """What the tests need to know of a family, from the host's code (not from the pack)."""

    name: str  # as the pack's error messages name it
    diffusion_model: str
    sampling: str  # a class in the model_sampling's MRO
    latent_hw: tuple[int, int]
    grid: tuple[int, int]  # image token grid of one frame (patch 2)
    block_list: str
    self_attention: str  # the self-attention module inside a block
    text_in_self_attention: bool
    single_blocks: str | None = None


FAMILIES = {
    # PixArt's sin-cos position embedding divides by round(side / 64): a latent side above 32.
    "pixart": HooklessFamily("PixArt α/Σ", "PixArtMS", "ModelSamplingDiscrete", (32, 40), (16, 20), "blocks", "attn",
                             False),
    "hidream": HooklessFamily("HiDream", "HiDreamImageTransformer2DModel", "ModelSamplingDiscreteFlow", (8, 8), (4, 4),
                              "double_stream_blocks", "block.attn1", True, "single_stream_blocks"),
    "omnigen2": HooklessFamily("OmniGen 2", "OmniGen2Transformer2DModel", "ModelSamplingDiscreteFlow", (8, 8), (4, 4),
                               "layers", "attn", True),
    "cosmos_predict2": HooklessFamily("Cosmos Predict 2", "MiniTrainDIT", "ModelSamplingCosmosRFlow", (8, 8), (4, 4),
                                      "blocks", "self_attn", False),
    "cosmos": HooklessFamily("Cosmos Predict 1", "GeneralDIT", "ModelSamplingContinuousEDM", (8, 8), (4, 4), "blocks",
                             "blocks.0.block", False),
}
PER_FAMILY = pytest.mark.parametrize("family", HOOKLESS_FAMILIES)


def run(model, family: str, cfg: float = CFG, batch: int = 1) -> torch.Tensor:
    positive, negative = make_conditioning(family, seed=1)
    h, w = FAMILIES[family].latent_hw
    latent = make_latent(family, batch=batch, h=h, w=w, seed=2)
    return sample(model, positive, negative, latent, cfg=cfg, steps=STEPS, seed=3)


def all_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.model.diffusion_model.modules())


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


def block_of(dm, family: str, kind: str, index: int):
    facts = FAMILIES[family]
    blocks = getattr(dm, facts.single_blocks if kind == "single" else facts.block_list)
    return blocks[f"block{index}"] if family == "cosmos" else blocks[index]  # Cosmos 1: a ModuleDict


def parse(layers: str) -> tuple[str, int]:
    return ("single", int(layers.split(".")[1])) if layers.startswith("single") else ("double", int(layers))


# ---------------------------------------------------------------------------------------------------------
# The tiny models


@PER_FAMILY
def test_tiny_model_keeps_the_real_noise_schedule_and_is_one_call_of_two_per_step(tiny_model, family) -> None:
    model = tiny_model(family)
    expected = FAMILIES[family]
    sampling = model.get_model_object("model_sampling")
    sigmas = scheduler_sigmas(model, steps=STEPS)
    with ForwardCounter(model) as counter:
        out = run(model, family)
    again = run(model, family)
    cond_only = run(model, family, cfg=1.0)

    assert type(model.model.diffusion_model).__name__ == expected.diffusion_model
    assert expected.sampling in [cls.__name__ for cls in type(sampling).__mro__]
    assert sigmas[-1].item() == 0.0 and (sigmas[1:] < sigmas[:-1]).all()
    assert torch.isfinite(out).all() and out.std() > 0.1
    assert counter.per_step() == [[2]] * STEPS
    assert torch.equal(out, again)
    assert relative_error(out, cond_only) > MIN_EFFECT, "cfg 5 and cfg 1 give (nearly) the same latent"


def test_the_hookless_families_are_declared_where_this_file_tests_them(guiders_pack) -> None:
    import sys

    module = sys.modules[guiders_pack["GuidersPAG"].__module__.rsplit(".", 1)[0] + ".common"]
    for family in HOOKLESS_FAMILIES:
        assert family in module.PAG_FAMILIES and family in module.BLOCK_FAMILIES
        assert family in module.ATTENTION_FAMILIES
        assert family not in module.SAG_FAMILIES


# ---------------------------------------------------------------------------------------------------------
# Every node that declares these families changes the result


@pytest.mark.parametrize(("case", "family"), effect_params(HOOKLESS))
def test_node_changes_the_result_on_hookless_families_and_stays_finite(
    tiny_model, weak_model_of, family: str, case: EffectCase
) -> None:
    model = tiny_model(family)
    patched = case.build(model, weak_model_of(family))

    assert_effect(run(patched, family, cfg=case.cfg), run(model, family, cfg=case.cfg))
    assert all_hooks(model) == 0, "a hook outlived sampling"


# ---------------------------------------------------------------------------------------------------------
# Identity self-attention against references written from the definition


def pixart_values(attn, x):
    """V of AttentionKVCompress, from its one qkv Linear: (B, N, 3·C) → the third C."""
    b, n, c = x.shape
    return attn.qkv(x).reshape(b, n, 3, c)[:, :, 2]


def cosmos_values(attn, x):
    """V of Cosmos Predict 2's Attention: v_norm over heads of v_proj(x), back to (B, S, heads·D)."""
    v = attn.v_proj(x).unflatten(-1, (attn.n_heads, attn.head_dim))
    return attn.v_norm(v).flatten(-2)


def cosmos1_attention_of_values(video_attn, x):
    """Cosmos 1's VideoAttn with the identity map: ``to_out`` of V, V = to_v's Linear then its per-head norm, on
    the (T·H·W, B, D) sequence of the (T, H, W, B, D) input, reshaped back."""
    attn = video_attn.attn
    t, h, w, b, d = x.shape
    v = attn.to_v[0](x.reshape(t * h * w, b, d)).unflatten(-1, (attn.heads, attn.dim_head))
    return attn.to_out(attn.to_v[1](v).flatten(-2)).reshape(t, h, w, b, -1)


def identity_reference(family: str, layers: str, image_rows_only: bool) -> Callable:
    kind, index = parse(layers)
    facts = FAMILIES[family]

    def attention_of(dm):
        return block_of(dm, family, kind, index).get_submodule(facts.self_attention)

    if family == "pixart":
        return modules_return(lambda dm: [attention_of(dm)], lambda m, x, out: m.proj(pixart_values(m, x)))
    if family == "cosmos_predict2":
        return modules_return(lambda dm: [attention_of(dm)], lambda m, x, out: m.output_proj(cosmos_values(m, x)))
    if family == "cosmos":
        return modules_return(lambda dm: [attention_of(dm)], lambda m, x, out: cosmos1_attention_of_values(m, x))
    # Joint attention. HiDream: image tokens first, (B, L, heads·D) in and out. OmniGen 2: the image tokens
    # last, (B, heads, L, D) in with skip_reshape, (B, L, heads·D) out.
    image_tokens = facts.grid[0] * facts.grid[1]
    inside = {"module": False}

    def override(func, q, k, v, *args, **kwargs):
        out = func(q, k, v, *args, **kwargs)
        if not inside["module"]:
            return out
        if kwargs.get("skip_reshape"):
            if v.shape[1] < q.shape[1]:  # grouped-query attention (0.33.0 OmniGen 2): head h reads group h // g
                v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
            values = v.transpose(1, 2).flatten(2)
        else:
            values = v
        length = values.shape[1]
        image = slice(0, image_tokens) if family == "hidream" else slice(length - image_tokens, length)
        rows = image if image_rows_only else slice(None)
        out = out.clone()
        out[:, rows] = values[:, rows]
        return out

    return inside_module(attention_of, inside, attention_override_during_pass(override))


IDENTITY_CASES = [
    pytest.param(family, layers, node_id, id=f"{family}-{layers}-{node_id}")
    for family in HOOKLESS_FAMILIES
    for layers in (["1", "single.1"] if FAMILIES[family].single_blocks else ["1"])
    for node_id in ("GuidersPAG", "GuidersSLG-attention_scores")
]


@pytest.mark.parametrize(("family", "layers", "node_id"), IDENTITY_CASES)
def test_identity_self_attention_matches_a_reference_from_the_definition(
    tiny_model, plain_of, family: str, layers: str, node_id: str
) -> None:
    """Breaks it was shown to catch (on a scratch copy): HiDream's text taken to sit before the image tokens
    (the identity on the wrong rows), OmniGen 2's image tokens taken as the first rows of its stream instead
    of the last (``module_hooks._omnigen2_text`` returning 0: PAG fails, SLG attention_scores rightly does not,
    it perturbs every row), the hooks on block 0 instead of the chosen block, the chunks' perturbations
    reversed (the wrong chunk perturbed), PixArt's recomputed output without its ``proj``."""
    model = tiny_model(family)
    if node_id == "GuidersPAG":
        ours = node("GuidersPAG", model=model, scale=3.0, layers=layers, start_percent=0.0, end_percent=1.0)
    else:
        ours = node("GuidersSLG", model=model, scale=3.0, layers=layers, mode="attention_scores",
                    start_percent=0.0, end_percent=1.0, rescale=0.0)
    reference = perturbed_pass_reference(model, identity_reference(family, layers, node_id == "GuidersPAG"), 3.0)

    with ForwardCounter(model) as counter:
        result = run(ours, family)

    assert counter.per_step() == [[3]] * STEPS, "the perturbed branch should ride in the cond/uncond forward"
    assert_parity(result, run(reference, family), plain_of(family))


# ---------------------------------------------------------------------------------------------------------
# SEG against a blur reference on the family's token grid


def queries_blurred(family: str, layers: str, blur_sigma: float) -> Callable:
    kind, index = parse(layers)
    facts = FAMILIES[family]
    frames = family_spec(family).latent_frames or 1

    def blurred(q):  # the image tokens come first, except in OmniGen 2's stream (last)
        start = q.shape[-2] - frames * facts.grid[0] * facts.grid[1] if family == "omnigen2" else 0
        return smooth_queries(q, facts.grid, blur_sigma, image_token_start=start, frames=frames)

    def attention_of(dm):
        return block_of(dm, family, kind, index).get_submodule(facts.self_attention)

    if family == "pixart":  # no override sees its attention: recomputed here from its own projections
        def seg_attention(m, x, out):
            b, n, c = x.shape
            q, k, v = m.qkv(x).reshape(b, n, 3, c).unbind(2)
            q, k = m.q_norm(q), m.k_norm(k)
            q, k, v = (t.reshape(b, n, m.num_heads, -1).transpose(1, 2) for t in (q, k, v))
            attended = torch.nn.functional.scaled_dot_product_attention(blurred(q), k, v)
            return m.proj(attended.transpose(1, 2).reshape(b, n, c))

        return modules_return(lambda dm: [attention_of(dm)], seg_attention)

    inside = {"module": False}

    def override(func, q, k, v, *args, **kwargs):  # HiDream (B, L, heads·D); the others (B, heads, S, D)
        return func(blurred(q) if inside["module"] else q, k, v, *args, **kwargs)

    return inside_module(attention_of, inside, attention_override_during_pass(override))


SEG_CASES = [pytest.param(family, layers, id=f"{family}-{layers}") for family in HOOKLESS_FAMILIES
             for layers in (["1", "single.1"] if FAMILIES[family].single_blocks else ["1"])]


@pytest.mark.parametrize("blur_sigma", [2.0, 99999.0])
@pytest.mark.parametrize(("family", "layers"), SEG_CASES)
def test_seg_blurs_the_queries_on_the_token_grid_as_a_reference(
    tiny_model, plain_of, family: str, layers: str, blur_sigma: float
) -> None:
    """Breaks it was shown to catch: PixArt's 16x20 token grid taken as 20x16 (sigma 2), the chunks'
    perturbations reversed (the wrong chunk blurred), OmniGen 2's image tokens taken as the first rows of its
    stream (the text blurred instead: both sigmas)."""
    model = tiny_model(family)
    ours = node("GuidersSEG", model=model, scale=3.0, blur_sigma=blur_sigma, layers=layers, start_percent=0.0,
                end_percent=1.0)
    reference = perturbed_pass_reference(model, queries_blurred(family, layers, blur_sigma), scale=3.0)

    assert_parity(run(ours, family), run(reference, family), plain_of(family))


# ---------------------------------------------------------------------------------------------------------
# SLG: block skip and sublayer skips


@contextlib.contextmanager
def _forward_replaced(module, forward):
    module.forward = forward  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        del module.forward


def block_skipped(family: str, kind: str, index: int) -> Callable:
    """The block's forward replaced by the identity on the streams it returns (HiDream's double blocks:
    image and text tokens, by keyword as the host passes them; the others: their first input)."""

    @contextlib.contextmanager
    def perturbed(dm, model_options):
        block = block_of(dm, family, kind, index)
        if family == "hidream":
            def identity(*args, **kwargs):
                return (kwargs["image_tokens"], kwargs["text_tokens"]) if kind == "double" else kwargs["image_tokens"]
        else:
            def identity(x, *args, **kwargs):
                return x
        with _forward_replaced(block, identity):
            yield model_options

    return perturbed


BLOCK_CASES = [pytest.param(family, layers, id=f"{family}-{layers}") for family in HOOKLESS_FAMILIES
               for layers in (["0", "1", "single.1"] if FAMILIES[family].single_blocks else ["0", "1"])]


@pytest.mark.parametrize(("family", "layers"), BLOCK_CASES)
def test_slg_block_matches_the_block_replaced_by_the_identity(tiny_model, plain_of, family, layers) -> None:
    """Breaks it was shown to catch: the skipped chunk's rows taken from another chunk's input, the hooks on
    block 0 instead of the chosen block, the chunks' perturbations reversed."""
    model = tiny_model(family)
    ours = node("GuidersSLG", model=model, scale=3.0, layers=layers, mode="block", start_percent=0.0,
                end_percent=1.0, rescale=0.0)
    reference = perturbed_pass_reference(model, block_skipped(family, *parse(layers)), 3.0)

    with ForwardCounter(model) as counter:
        result = run(ours, family)

    assert counter.per_step() == [[3]] * STEPS
    assert_parity(result, run(reference, family), plain_of(family))


# The modules whose outputs are a sublayer's residual contribution, read from the host's block code.
SUBLAYERS = {
    "pixart": {"attention": ["attn"], "feedforward": ["mlp"]},
    "hidream": {"attention": ["block.attn1"], "feedforward": ["block.ff_i", "block.ff_t"]},
    "omnigen2": {"attention": ["attn"], "feedforward": ["feed_forward"]},
    "cosmos_predict2": {"attention": ["self_attn"], "feedforward": ["mlp"]},
    "cosmos": {"attention": ["blocks.0.block"], "feedforward": ["blocks.2.block"]},
}


def _zeros(output):
    return tuple(torch.zeros_like(t) for t in output) if isinstance(output, tuple) else torch.zeros_like(output)


@pytest.mark.parametrize("mode", ["attention", "feedforward"])
@PER_FAMILY
def test_sublayer_skip_matches_its_definition(tiny_model, plain_of, family: str, mode: str) -> None:
    """Breaks it was shown to catch: only the image part of HiDream's joint attention output zeroed (not the
    text part), the chunks' perturbations reversed (the wrong chunk's rows zeroed)."""
    model = tiny_model(family)
    ours = node("GuidersSLG", model=model, scale=3.0, layers="1", mode=mode, start_percent=0.0, end_percent=1.0,
                rescale=0.0)

    def modules_of(dm):
        block = block_of(dm, family, "double", 1)
        return [block.get_submodule(name) for name in SUBLAYERS[family][mode]]

    reference = perturbed_pass_reference(model, modules_return(modules_of, lambda m, x, out: _zeros(out)), 3.0)

    assert_parity(run(ours, family), run(reference, family), plain_of(family))


# ---------------------------------------------------------------------------------------------------------
# The hooks live for one forward


@PER_FAMILY
def test_no_hook_outlives_sampling_or_a_forward_that_raised(tiny_model, family: str) -> None:
    """A forward that raises inside the perturbed block (the final layer's pre-hook here, after every
    block ran) must leave no hook of the pack on any module. Break it was shown to catch: the handles
    removed after the forward but not in a ``finally``."""
    model = tiny_model(family)
    patched = node("GuidersPAG", model=model, scale=3.0, layers="1")
    patched = node("GuidersSLG", model=patched, scale=3.0, layers="0", mode="feedforward", start_percent=0.0,
                   end_percent=1.0, rescale=0.0)
    dm = model.model.diffusion_model
    seen: list[int] = []

    def raise_after_the_blocks(module, args):
        seen.append(all_hooks(model) - 1)  # the pack's hooks alive right now (less this one)
        raise RuntimeError("a forward that raised")

    run(patched, family)
    assert all_hooks(model) == 0, "a hook outlived sampling"

    final = dm.norm_out if family == "omnigen2" else dm.final_layer  # the output layer, after every block
    handle = final.register_forward_pre_hook(raise_after_the_blocks)
    try:
        with pytest.raises(RuntimeError, match="a forward that raised"):
            run(patched, family)
    finally:
        handle.remove()

    assert seen and seen[0] > 0, "the pack's hooks were not alive during the forward: the test is vacuous"
    assert all_hooks(model) == 0, "a hook outlived a forward that raised"
    assert torch.isfinite(run(patched, family)).all()  # and the next run is unaffected


# ---------------------------------------------------------------------------------------------------------
# SAG refuses them


@PER_FAMILY
def test_sag_refuses_and_names_the_supported_families(tiny_model, family: str) -> None:
    from harness import run_node

    with pytest.raises(ValueError) as raised:
        run_node("GuidersSAG", model=tiny_model(family), scale=0.5, blur_sigma=2.0)
    message = str(raised.value)
    name = FAMILIES[family].name
    assert name in message and "supports" in message, message
    assert name not in message.split("supports", 1)[-1], message
