"""The pack on HunyuanDiT: a tiny random-weight model (tiny_models.make_hunyuan_dit, ComfyUI's own
``supported_models.HunyuanDiT`` shrunk to 6 blocks) sampled by a real KSampler. The pack hooks its modules
for one forward at a time (nodes/host/module_hooks.py, the ``hunyuan_dit`` site).

1. The tiny model: its real noise schedule (V-prediction, linear betas), one forward of cond + uncond per
   step, finite, deterministic results that depend on the prompt.
2. Every node that declares the family gives a finite result clearly different from plain CFG (the effect
   matrix, node_table.effect_params(HYDIT)).
3. Values against references applied as an extra cond pass after CFG (references.perturbed_pass_reference):
   - PAG / SLG attention_scores (Ahn et al. 2024, identity self-attention): ``attn1`` is self-attention on
     the image tokens alone (the text only enters through ``attn2``), so every row of its map is the
     identity: a hook on the block's ``attn1`` returns ``(out_proj(V),)``, V the third part of its own
     ``Wqkv`` projection, computed here.
   - SEG (Hong 2024): ``attn1`` recomputed here from its own q, k, v (the host's q/k norms and RoPE) with
     the queries blurred on the 4 x 6 token grid (a non-square latent, so a transposed grid fails).
   - SLG ``block``: ComfyUI's SkipLayerGuidanceDiT, whose ``dit`` patch the forward does call (it returns
     the block's input). "Layer i" is ``blocks[i]`` in forward order, counted as the forward counts them:
     on a skip block (4, 5: ``layer > depth // 2``) skipping it also drops the long skip it would mix in.
   - SLG ``attention`` / ``feedforward``: ``attn1`` / ``mlp`` return zeros for the perturbed pass.
4. Costs: the perturbed branch rides in the cond/uncond forward (one call of 3 per step).
5. Hooks never outlive a forward, also one that raised.

Host behaviour these tests depend on (comfy/ldm/hydit/models.py and attn_layers.py, the same in ComfyUI 0.8.0
and 0.33.0):
- ``HunYuanDiT.forward`` calls ``block(x, c, text_states, freqs_cis_img, skip)`` for each of ``blocks``, or
  ``patches_replace["dit"][("double_block", layer)]`` with ``{img, txt, vec, pe, skip}`` and NO
  transformer_options (test_the_hosts_block_patch_gets_no_transformer_options), so a patch cannot tell the
  batch chunks apart; blocks ``layer < depth // 2 - 1`` push their output on a skip list, blocks
  ``layer > depth // 2`` pop one and mix it in (``skip_linear``) before their self-attention.
- ``HunYuanDiTBlock._forward``: ``x + attn1(norm1(x) + shift, freqs_cis_img)[0]``, then ``attn2`` (cross to the
  text), then ``x + mlp(norm2(x))``.
- ``Attention.forward``: ``Wqkv`` → (3, B, heads, N, D), ``q_norm`` / ``k_norm``, ``apply_rotary_emb``, then
  ``optimized_attention(q, k, v, heads, skip_reshape=True)`` WITHOUT transformer_options (no override sees
  it), ``out_proj``; it returns a tuple ``(out,)``.
- ``model_base.HunyuanDiT``: V-prediction; the conditioning's ``attention_mask``, ``conditioning_mt5xl``,
  ``attention_mask_mt5xl`` are required inputs of the forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
from harness import ForwardCounter, run_node, sample, scheduler_sigmas
from node_table import CASCADE_FAMILIES, HYDIT, EffectCase, effect_params
from references import modules_return, perturbed_pass_reference
from support import CFG, MIN_EFFECT, STEPS, assert_effect, assert_parity, node, relative_error
from tiny_models import make_conditioning, make_hunyuan_dit_conditioning, make_latent

from guidance_core.perturb import smooth_queries

FAMILY = "hunyuan_dit"
LATENT_HW = (8, 12)  # 2x2 patches: a 4 x 6 token grid
GRID = (4, 6)
SCALE = 3.0


def run(model, cfg: float = CFG, positive=None, negative=None) -> torch.Tensor:
    default_positive, default_negative = make_hunyuan_dit_conditioning(seed=1)
    latent = make_latent(FAMILY, h=LATENT_HW[0], w=LATENT_HW[1], seed=2)
    return sample(model, positive or default_positive, negative or default_negative, latent, cfg=cfg, steps=STEPS,
                  seed=3)


def all_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.model.diffusion_model.modules())


@pytest.fixture(autouse=True)
def _pack(guiders_pack):
    return guiders_pack


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model(FAMILY)


@pytest.fixture(scope="module")
def plain(model) -> torch.Tensor:
    return run(model)


def attn1_of(dm, index: int):
    return dm.blocks[index].attn1


def module_recomputed(module_of: Callable, output_of: Callable) -> Callable:
    """While the pass runs, the module ``module_of(diffusion_model)`` returns ``output_of(module, *inputs)``
    (references.modules_return hands over the first input only; these attentions need all of theirs)."""

    @contextlib.contextmanager
    def perturbed(dm, model_options):
        handle = module_of(dm).register_forward_hook(lambda module, args, output: output_of(module, *args))
        try:
            yield model_options
        finally:
            handle.remove()

    return perturbed


# ---------------------------------------------------------------------------------------------------------
# The tiny model and the host facts


def test_tiny_model_keeps_the_real_noise_schedule_and_is_one_call_of_two_per_step(model) -> None:
    import comfy.model_sampling

    sampling = model.get_model_object("model_sampling")
    sigmas = scheduler_sigmas(model, steps=STEPS)
    with ForwardCounter(model) as counter:
        out = run(model)
    other_prompt, _ = make_hunyuan_dit_conditioning(seed=9)

    assert type(model.model.diffusion_model).__name__ == "HunYuanDiT"
    assert isinstance(sampling, comfy.model_sampling.V_PREDICTION)
    assert isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete)
    assert sigmas[-1].item() == 0.0 and (sigmas[1:] < sigmas[:-1]).all()
    assert torch.isfinite(out).all() and out.std() > 0.1
    assert counter.per_step() == [[2]] * STEPS
    assert torch.equal(out, run(model))
    assert relative_error(out, run(model, cfg=1.0)) > MIN_EFFECT, "cfg 5 and cfg 1 give (nearly) the same latent"
    assert relative_error(out, run(model, positive=other_prompt)) > MIN_EFFECT, "the prompt does not matter"


def test_the_hosts_block_patch_gets_no_transformer_options(model) -> None:
    """Why HunyuanDiT runs on forward hooks: the ``dit`` patch the forward calls is handed the block's
    tensors only, so it cannot know which batch chunk is which branch. When a ComfyUI passes the options,
    this test fails: then the record can use the dit block patch."""
    seen: list[set] = []
    recording = model.clone()

    def record(args, extra):
        seen.append(set(args))
        return extra["original_block"](args)

    recording.set_model_patch_replace(record, "dit", "double_block", 1)
    run(recording)
    assert seen and all(keys == {"img", "txt", "vec", "pe", "skip"} for keys in seen), seen


def test_the_family_is_declared_for_pag_seg_slg_and_not_sag(guiders_pack) -> None:
    import sys

    module = sys.modules[guiders_pack["GuidersPAG"].__module__.rsplit(".", 1)[0] + ".common"]
    assert FAMILY in module.PAG_FAMILIES and FAMILY in module.BLOCK_FAMILIES and FAMILY in module.ATTENTION_FAMILIES
    assert FAMILY not in module.SAG_FAMILIES


# ---------------------------------------------------------------------------------------------------------
# Every node that declares the family changes the result


@pytest.mark.parametrize(("case", "family"), effect_params(HYDIT))
def test_node_changes_the_result_and_stays_finite(tiny_model, weak_model_of, family: str, case: EffectCase) -> None:
    model = tiny_model(family)
    patched = case.build(model, weak_model_of(family))

    assert_effect(run(patched, cfg=case.cfg), run(model, cfg=case.cfg))
    assert all_hooks(model) == 0, "a hook outlived sampling"


# ---------------------------------------------------------------------------------------------------------
# Identity self-attention against a reference from the definition


def attn1_of_values(attn, x):
    """``attn1`` with the identity map: ``(out_proj(V),)``, V the third C of its ``Wqkv`` output."""
    b, n, c = x.shape
    values = attn.Wqkv(x).reshape(b, n, 3, c)[:, :, 2]
    return (attn.out_proj(values),)


@pytest.mark.parametrize("index", [1, 4])
@pytest.mark.parametrize("node_id", ["GuidersPAG", "GuidersSLG-attention_scores"])
def test_identity_self_attention_matches_a_reference_from_the_definition(model, plain, node_id, index) -> None:
    """Block 1 (diffusers' HunyuanDiT PAG default) and block 4 (one that mixes in a long skip). Breaks it
    was shown to catch (on a scratch copy): the recomputed output without ``out_proj``, the hooks on block 0
    instead of the chosen block, the chunks' perturbations reversed (the uncond chunk perturbed)."""
    if node_id == "GuidersPAG":
        ours = node("GuidersPAG", model=model, scale=SCALE, layers=str(index), start_percent=0.0, end_percent=1.0)
    else:
        ours = node("GuidersSLG", model=model, scale=SCALE, layers=str(index), mode="attention_scores",
                    start_percent=0.0, end_percent=1.0, rescale=0.0)
    reference = perturbed_pass_reference(
        model, modules_return(lambda dm: [attn1_of(dm, index)], lambda m, x, out: attn1_of_values(m, x)), SCALE)

    with ForwardCounter(model) as counter:
        result = run(ours)

    assert counter.per_step() == [[3]] * STEPS, "the perturbed branch should ride in the cond/uncond forward"
    assert_parity(result, run(reference), plain)


# ---------------------------------------------------------------------------------------------------------
# SEG against a blur reference on the token grid


def attn1_with_blurred_queries(blur_sigma: float) -> Callable:
    """``attn1`` recomputed from its own projections, norms and RoPE (the host's ``apply_rotary_emb``) with
    the queries Gaussian-blurred over the 4 x 6 image token grid (SEG, Hong 2024, §3.3), then ``out_proj``."""
    from comfy.ldm.hydit.attn_layers import apply_rotary_emb

    def seg_attention(attn, x, freqs_cis_img):
        b, n, c = x.shape
        q, k, v = attn.Wqkv(x).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary_emb(attn.q_norm(q), attn.k_norm(k), freqs_cis_img, head_first=True)
        blurred = smooth_queries(q, GRID, blur_sigma, image_token_start=0, frames=1)
        attended = torch.nn.functional.scaled_dot_product_attention(blurred, k, v)
        return (attn.out_proj(attended.transpose(1, 2).reshape(b, n, c)),)

    return seg_attention


@pytest.mark.parametrize("blur_sigma", [2.0, 99999.0])
def test_seg_blurs_the_queries_on_the_token_grid_as_a_reference(model, plain, blur_sigma: float) -> None:
    """Breaks it was shown to catch: the 4 x 6 token grid taken as 6 x 4 (sigma 2), RoPE left out of the
    recomputed queries, the chunks' perturbations reversed."""
    ours = node("GuidersSEG", model=model, scale=SCALE, blur_sigma=blur_sigma, layers="1", start_percent=0.0,
                end_percent=1.0)
    perturbed = module_recomputed(lambda dm: attn1_of(dm, 1), attn1_with_blurred_queries(blur_sigma))

    assert_parity(run(ours), run(perturbed_pass_reference(model, perturbed, SCALE)), plain)


# ---------------------------------------------------------------------------------------------------------
# SLG: block skip (ComfyUI's SkipLayerGuidanceDiT) and sublayer skips


@pytest.mark.parametrize(("index", "start", "end"), [(1, 0.0, 1.0), (4, 0.0, 1.0), (0, 0.3, 0.8)])
def test_slg_block_matches_skip_layer_guidance_dit(model, plain, index: int, start: float, end: float) -> None:
    """ComfyUI's SkipLayerGuidanceDiT replaces ``blocks[i]`` by its input through the forward's ``dit`` patch:
    ours, through forward hooks, gives the same. Block 4 mixes in block 1's long skip (dropped when skipped);
    block 0's output is itself a long skip for block 5. Breaks it was shown to catch: the hooks on block 0
    instead of the chosen block, the chunks' perturbations reversed."""
    ours = node("GuidersSLG", model=model, scale=SCALE, layers=str(index), mode="block", start_percent=start,
                end_percent=end, rescale=0.0)
    builtin = node("SkipLayerGuidanceDiT", model=model, double_layers=str(index), single_layers="", scale=SCALE,
                   start_percent=start, end_percent=end, rescaling_scale=0.0)

    with ForwardCounter(model) as counter:
        result = run(ours)

    assert all(len(group) == 1 and group[0] in (2, 3) for group in counter.per_step()), counter.per_step()
    assert_parity(result, run(builtin), plain)


def _zeros(output):
    return tuple(torch.zeros_like(t) for t in output) if isinstance(output, tuple) else torch.zeros_like(output)


@pytest.mark.parametrize(("mode", "module"), [("attention", "attn1"), ("feedforward", "mlp")])
def test_sublayer_skip_matches_its_definition(model, plain, mode: str, module: str) -> None:
    """Breaks it was shown to catch: the cross-attention ``attn2`` zeroed instead of ``attn1``, the chunks'
    perturbations reversed (the wrong chunk's rows zeroed)."""
    ours = node("GuidersSLG", model=model, scale=SCALE, layers="1", mode=mode, start_percent=0.0, end_percent=1.0,
                rescale=0.0)
    reference = perturbed_pass_reference(
        model, modules_return(lambda dm: [dm.blocks[1].get_submodule(module)], lambda m, x, out: _zeros(out)), SCALE)

    assert_parity(run(ours), run(reference), plain)


# ---------------------------------------------------------------------------------------------------------
# The hooks live for one forward


def test_no_hook_outlives_sampling_or_a_forward_that_raised(model) -> None:
    """A forward that raises after every block ran (in the final layer's pre-hook) leaves no hook of the
    pack on any module. Break it was shown to catch: the handles removed after the forward but not in a
    ``finally``."""
    patched = node("GuidersPAG", model=model, scale=SCALE, layers="1")
    patched = node("GuidersSLG", model=patched, scale=SCALE, layers="0", mode="feedforward", start_percent=0.0,
                   end_percent=1.0, rescale=0.0)
    seen: list[int] = []

    def raise_after_the_blocks(module, args):
        seen.append(all_hooks(model) - 1)  # the pack's hooks alive right now (less this one)
        raise RuntimeError("a forward that raised")

    run(patched)
    assert all_hooks(model) == 0, "a hook outlived sampling"
    handle = model.model.diffusion_model.final_layer.register_forward_pre_hook(raise_after_the_blocks)
    try:
        with pytest.raises(RuntimeError, match="a forward that raised"):
            run(patched)
    finally:
        handle.remove()

    assert seen and seen[0] > 0, "the pack's hooks were not alive during the forward: the test is vacuous"
    assert all_hooks(model) == 0, "a hook outlived a forward that raised"


def test_sag_refuses_it_and_names_the_supported_families(model) -> None:
    with pytest.raises(ValueError) as raised:
        run_node("GuidersSAG", model=model, scale=0.5, blur_sigma=2.0)
    message = str(raised.value)
    assert "HunyuanDiT" in message and "supports" in message, message
    assert "HunyuanDiT" not in message.split("supports", 1)[-1], message


# =========================================================================================================
# Stable Cascade stage C
#
# Host behaviour (comfy/ldm/cascade/stage_c.py and common.py, the same in ComfyUI 0.8.0 and 0.33.0):
# - ``StageC._down_encode`` / ``_up_decode`` run each level's blocks in order; an AttnBlock is called as
#   ``block(x, clip, transformer_options=...)`` and returns ``x + attention(norm(x), kv_mapper(clip), self_attn)``.
# - ``Attention2D.forward`` flattens x to (B, H·W, C) tokens and, with ``self_attn``, passes k = v =
#   cat(x, kv) to ``OptimizedAttention``: ``out_proj(optimized_attention(to_q(q), to_k(k), to_v(v), heads,
#   transformer_options=...))``, (B, L, heads·D) in and out; H·W queries, H·W + text keys.
# - stage C's levels keep one resolution (``switch_level`` False): every AttnBlock sees the latent's H x W grid.
# - ``model_base.StableCascade_C``: StableCascadeSampling (cosine schedule, shift 2); ``pooled_output`` is
#   required, ``clip_img`` zeros by default.
# The pack's layer "down.L.i" / "up.L.i" is the i-th AttnBlock of ``down_blocks[L]`` / ``up_blocks[L]``.

CASCADE = "stable_cascade_c"
CASCADE_HW = (8, 12)  # a non-square grid: a transposed blur fails


def run_cascade(model, cfg: float = CFG, positive=None) -> torch.Tensor:
    default_positive, negative = make_conditioning(CASCADE, seed=1)
    latent = make_latent(CASCADE, h=CASCADE_HW[0], w=CASCADE_HW[1], seed=2)
    return sample(model, positive or default_positive, negative, latent, cfg=cfg, steps=STEPS, seed=3)


@pytest.fixture(scope="module")
def cascade(tiny_model):
    return tiny_model(CASCADE)


@pytest.fixture(scope="module")
def cascade_plain(cascade) -> torch.Tensor:
    return run_cascade(cascade)


def attn_block(dm, layer: str):
    """The host's AttnBlock a layer name means: the i-th AttnBlock of the level, counted here."""
    import comfy.ldm.cascade.common as cascade_common

    kind, level, i = layer.split(".")
    blocks = getattr(dm, f"{kind}_blocks")[int(level)]
    return [b for b in blocks if isinstance(b, cascade_common.AttnBlock)][int(i)]


CASCADE_LAYERS = ["down.0.0", "down.1.1", "up.0.1", "up.1.0"]


def test_cascade_tiny_model_is_the_real_stage_c_and_one_call_of_two_per_step(cascade) -> None:
    import comfy.model_sampling

    with ForwardCounter(cascade) as counter:
        out = run_cascade(cascade)
    other_prompt, _ = make_conditioning(CASCADE, seed=9)

    assert type(cascade.model.diffusion_model).__name__ == "StageC"
    sampling = cascade.get_model_object("model_sampling")
    assert isinstance(sampling, comfy.model_sampling.StableCascadeSampling) and sampling.shift == 2.0
    assert torch.isfinite(out).all() and out.std() > 0.1
    assert counter.per_step() == [[2]] * STEPS
    assert torch.equal(out, run_cascade(cascade))
    assert relative_error(out, run_cascade(cascade, cfg=1.0)) > MIN_EFFECT
    assert relative_error(out, run_cascade(cascade, positive=other_prompt)) > MIN_EFFECT


def test_cascade_layers_are_named_by_level_and_attn_block(cascade) -> None:
    """Every AttnBlock is a layer, by level and position; an unknown name lists them all."""
    with pytest.raises(ValueError) as raised:
        node("GuidersPAG", model=cascade, scale=SCALE, layers="down.0.1")
    message = str(raised.value)
    assert "down.0.0, down.1.0, down.1.1, up.0.0, up.0.1, up.1.0" in message, message


@pytest.mark.parametrize(("case", "family"), effect_params(CASCADE_FAMILIES))
def test_node_changes_the_result_on_cascade_and_stays_finite(tiny_model, weak_model_of, family: str,
                                                             case: EffectCase) -> None:
    model = tiny_model(family)
    patched = case.build(model, weak_model_of(family))

    assert_effect(run_cascade(patched, cfg=case.cfg), run_cascade(model, cfg=case.cfg))
    assert all_hooks(model) == 0, "a hook outlived sampling"


def own_values(attention, x, kv, *_rest, **_options):
    """PAG's identity map on an AttnBlock: each image query attends to its own image token only (the text keys
    weight 0), so the attention returns ``out_proj(to_v(x))``."""
    return attention.out_proj(attention.to_v(x))


@pytest.mark.parametrize("layer", CASCADE_LAYERS)
@pytest.mark.parametrize("node_id", ["GuidersPAG", "GuidersSLG-attention_scores"])
def test_cascade_identity_attention_matches_a_reference_from_the_definition(cascade, cascade_plain, node_id,
                                                                            layer) -> None:
    """Breaks it was shown to catch (on a scratch copy): the text tokens' values taken for the image rows (the
    identity over the last keys), the hooks on the level's first AttnBlock instead of the named one, the chunks'
    perturbations reversed."""
    if node_id == "GuidersPAG":
        ours = node("GuidersPAG", model=cascade, scale=SCALE, layers=layer, start_percent=0.0, end_percent=1.0)
    else:
        ours = node("GuidersSLG", model=cascade, scale=SCALE, layers=layer, mode="attention_scores",
                    start_percent=0.0, end_percent=1.0, rescale=0.0)
    perturbed = module_recomputed(lambda dm: attn_block(dm, layer).attention.attn, own_values)

    with ForwardCounter(cascade) as counter:
        result = run_cascade(ours)

    assert counter.per_step() == [[3]] * STEPS, "the perturbed branch should ride in the cond/uncond forward"
    assert_parity(result, run_cascade(perturbed_pass_reference(cascade, perturbed, SCALE)), cascade_plain)


@pytest.mark.parametrize("blur_sigma", [2.0, 99999.0])
@pytest.mark.parametrize("layer", ["down.1.1", "up.0.0"])
def test_cascade_seg_blurs_the_image_queries_on_the_token_grid(cascade, cascade_plain, layer, blur_sigma) -> None:
    """SEG on an AttnBlock: the image tokens' queries blurred over the 8 x 12 grid, attending to every key
    (image and text). Breaks it was shown to catch: the grid taken as 12 x 8 (sigma 2), the chunks'
    perturbations reversed."""
    ours = node("GuidersSEG", model=cascade, scale=SCALE, blur_sigma=blur_sigma, layers=layer, start_percent=0.0,
                end_percent=1.0)

    def seg_attention(attention, x, kv, *_rest, **_options):
        def heads(t):
            return t.reshape(t.shape[0], t.shape[1], attention.heads, -1).transpose(1, 2)

        q, k, v = heads(attention.to_q(x)), heads(attention.to_k(kv)), heads(attention.to_v(kv))
        blurred = smooth_queries(q, CASCADE_HW, blur_sigma, image_token_start=0, frames=1)
        attended = torch.nn.functional.scaled_dot_product_attention(blurred, k, v)
        return attention.out_proj(attended.transpose(1, 2).flatten(2))

    perturbed = module_recomputed(lambda dm: attn_block(dm, layer).attention.attn, seg_attention)
    assert_parity(run_cascade(ours), run_cascade(perturbed_pass_reference(cascade, perturbed, SCALE)), cascade_plain)


@pytest.mark.parametrize("layer", CASCADE_LAYERS)
def test_cascade_slg_block_matches_the_attn_block_replaced_by_the_identity(cascade, cascade_plain, layer) -> None:
    """Breaks it was shown to catch: the hooks on the level's first AttnBlock instead of the named one, the
    chunks' perturbations reversed."""
    ours = node("GuidersSLG", model=cascade, scale=SCALE, layers=layer, mode="block", start_percent=0.0,
                end_percent=1.0, rescale=0.0)

    @contextlib.contextmanager
    def perturbed(dm, model_options):
        block = attn_block(dm, layer)
        block.forward = lambda x, *args, **kwargs: x  # an instance attribute shadows the class's forward
        try:
            yield model_options
        finally:
            del block.forward

    with ForwardCounter(cascade) as counter:
        result = run_cascade(ours)

    assert counter.per_step() == [[3]] * STEPS
    assert_parity(result, run_cascade(perturbed_pass_reference(cascade, perturbed, SCALE)), cascade_plain)


@pytest.mark.parametrize("mode", ["attention", "feedforward"])
def test_cascade_sublayer_modes_are_refused_pointing_to_block(cascade, mode: str) -> None:
    """An AttnBlock's only sublayer is its attention (skipping it is mode 'block'); it has no feed-forward."""
    with pytest.raises(ValueError, match=f"mode '{mode}' cannot skip part of block down.1.0.*use mode 'block'"):
        run_cascade(node("GuidersSLG", model=cascade, scale=SCALE, layers="down.1.0", mode=mode, start_percent=0.0,
                         end_percent=1.0, rescale=0.0))
    assert all_hooks(cascade) == 0


def test_cascade_sag_is_refused_naming_the_supported_families(cascade) -> None:
    with pytest.raises(ValueError) as raised:
        run_node("GuidersSAG", model=cascade, scale=0.5, blur_sigma=2.0)
    message = str(raised.value)
    assert "Stable Cascade (stage C)" in message and "supports" in message, message
    assert "Stable Cascade" not in message.split("supports", 1)[-1], message
