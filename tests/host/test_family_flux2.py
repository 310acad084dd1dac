"""The pack on the families that run ComfyUI's Flux blocks outside Flux.1: tiny random-weight Flux.2 (dev and
Klein), Chroma, Chroma Radiance and, on hosts that have it, LongCat-Image (tiny_models.make_flux2 / make_chroma /
make_chroma_radiance / make_longcat_image; 8x8 latents) sampled by a real KSampler.

1. The tiny models: the family's own record (Flux.2 and LongCat-Image share Flux.1's diffusion-model class and
   are told apart by their comfy.model_base class), its real noise schedule, one forward of cond + uncond per step.
2. The Flux.2 crash is gone: every batched method (PAG, SEG, SLG block / attention / feedforward /
   attention_scores) at cfg 5, so three chunks per forward, runs as one forward of 3 per step; the block arguments
   that carry the batch (Flux.2's global modulations and Chroma's, dataclasses inside ``vec``) are found and
   reduced with the rows of img and txt.
3. Identity self-attention (PAG, SLG ``attention_scores``) against a reference written here from the PAG paper's
   definition: in the chosen block's joint attention the image tokens' rows return their V and the text tokens'
   rows are unchanged (PAG), or every row returns its V (attention_scores); applied post-CFG as ComfyUI's
   PerturbedAttentionGuidance does on UNets.
4. SLG ``block`` against ComfyUI's SkipLayerGuidanceDiT (the dit block replace patch), double and single blocks;
   ``attention`` / ``feedforward`` against forward hooks that zero the sublayer modules' outputs.
5. SEG against the SEG paper's query blur written in the tests (test_node_values.blur_queries: a Gaussian with
   reflect padding over the image tokens' grid), image tokens after the text.
6. Every node that declares these families gives a finite result clearly different from plain CFG.

Host behaviour these tests depend on (ComfyUI 0.8.0 and 0.33.0):
- ``comfy/ldm/flux/model.py`` (Flux, Flux.2, LongCat-Image) and ``comfy/ldm/chroma/model.py`` (Chroma, and Chroma
  Radiance, which subclasses it and only changes the input patches and the NeRF decoder after the blocks) call
  ``patches_replace["dit"][("double_block", i)]`` with ``{img, txt, vec, pe, attn_mask, transformer_options}`` and
  ``("single_block", i)`` with ``{img, vec, pe, attn_mask, transformer_options}``, and set
  ``transformer_options["block_type"]`` / ``["block_index"]`` before each block.
- With ``global_modulation`` (Flux.2) the double blocks' ``vec`` is ``((img_mod1, img_mod2), (txt_mod1,
  txt_mod2))`` and the single blocks' one ``ModulationOut``, computed once per forward; Chroma passes per-block
  ``ChromaModulationOut`` slices of its approximator's output the same way. Each is a dataclass of (B, 1, D)
  tensors (shift, scale, gate).
- ``comfy/ldm/flux/layers.py``: the joint attention is ``cat(txt, img)`` in double blocks and in single blocks
  (the forward concatenates txt before img), q, k, v passed as (B, heads, L, D) to ``attention`` and so to
  ``optimized_attention_override``; ``img_attn.proj`` / ``txt_attn.proj`` and ``img_mlp`` / ``txt_mlp`` are the
  double blocks' attention and feed-forward sublayers.
- ``comfy/model_base.py`` Flux2.extra_conds pads the text to 512 tokens (zeros before the prompt).
- ``comfy.supported_models.LongCatImage`` exists in 0.33.0, not in 0.8.0: its tests skip there.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from harness import ForwardCounter, assert_window_is_partial, sample, scheduler_sigmas
from node_table import FLUX_CODE, EffectCase, effect_params
from references import attention_override_during_pass, joint_attention_rows_return_values, perturbed_pass_reference
from support import CFG, MIN_EFFECT, STEPS, assert_effect, assert_parity, node, pack_module, relative_error
from test_node_values import blur_queries
from test_slg_sublayers import sublayer_off_reference
from tiny_models import make_conditioning, make_latent

COND, UNCOND = 0, 1  # calc_cond_batch's indices of the positive and negative conds


@dataclass(frozen=True)
class FluxCodeFamily:
    """What the tests need to know of a family, from the host's code (not from the pack)."""

    name: str  # as the pack's error messages name it
    record: str  # the pack's family key
    diffusion_model: str  # "module:Class"
    base_model: str  # comfy.model_base class name
    shift: float  # ModelSamplingFlux shift
    text_tokens: int  # in the joint attention, before the image tokens
    grid: tuple[int, int]  # image token grid of the 8x8 test latent
    double_blocks: int
    single_blocks: int


FAMILIES = {
    # Patch 1 on 128 channels: 8x8 tokens; the text padded to 512 tokens by Flux2.extra_conds.
    "flux2": FluxCodeFamily("Flux.2", "flux2", "comfy.ldm.flux.model:Flux", "Flux2", 2.02, 512, (8, 8), 2, 2),
    "flux2_klein": FluxCodeFamily("Flux.2", "flux2", "comfy.ldm.flux.model:Flux", "Flux2", 2.02, 512, (8, 8), 3, 2),
    # Patch 2: 4x4 tokens.
    "chroma": FluxCodeFamily("Chroma", "chroma", "comfy.ldm.chroma.model:Chroma", "Chroma", 1.15, 16, (4, 4), 2, 2),
    "chroma_radiance": FluxCodeFamily("Chroma Radiance", "chroma_radiance",
                                      "comfy.ldm.chroma_radiance.model:ChromaRadiance", "ChromaRadiance", 1.15, 16,
                                      (4, 4), 2, 2),
    "longcat_image": FluxCodeFamily("LongCat-Image", "longcat_image", "comfy.ldm.flux.model:Flux", "LongCatImage",
                                    1.15, 16, (4, 4), 2, 2),
}
assert tuple(FAMILIES) == FLUX_CODE


def host_lacks(family: str) -> str | None:
    """Why the host cannot build ``family`` (a missing supported_models class), or None."""
    import comfy.model_base

    name = FAMILIES[family].base_model
    return None if hasattr(comfy.model_base, name) else f"this ComfyUI has no {name} model (comfy.model_base.{name})"


@pytest.fixture
def model_of(tiny_model) -> Callable:
    def get(family: str):
        reason = host_lacks(family)
        if reason is not None:
            pytest.skip(reason)
        return tiny_model(family)

    return get


PER_FAMILY = pytest.mark.parametrize("family", FLUX_CODE)


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


def image_rows(family: str) -> slice:
    facts = FAMILIES[family]
    return slice(facts.text_tokens, facts.text_tokens + facts.grid[0] * facts.grid[1])


# ---------------------------------------------------------------------------------------------------------
# The tiny models




@PER_FAMILY
def test_tiny_model_is_its_family_with_the_real_noise_schedule(guiders_pack, model_of, family: str) -> None:
    """Fails if Flux.2 or LongCat-Image is taken for Flux.1 (family_of_model ignoring ``base_classes``, or the
    records' order deciding): both run comfy.ldm.flux.model.Flux."""
    model = model_of(family)
    facts = FAMILIES[family]
    diffusion_model = model.model.diffusion_model

    assert f"{type(diffusion_model).__module__}:{type(diffusion_model).__qualname__}" == facts.diffusion_model
    assert type(model.model).__name__ == facts.base_model
    assert (len(diffusion_model.double_blocks), len(diffusion_model.single_blocks)) == (facts.double_blocks,
                                                                                         facts.single_blocks)
    assert pack_module(guiders_pack, "host.layers").model_family(model) == facts.record
    sampling = model.get_model_object("model_sampling")
    assert "ModelSamplingFlux" in [cls.__name__ for cls in type(sampling).__mro__]
    assert float(sampling.shift) == pytest.approx(facts.shift)
    sigmas = scheduler_sigmas(model, steps=STEPS)
    assert (sigmas[1:] < sigmas[:-1]).all() and sigmas[-1].item() == 0.0


def test_flux_1_stays_flux(guiders_pack, tiny_model) -> None:
    assert pack_module(guiders_pack, "host.layers").model_family(tiny_model("flux")) == "flux"


@PER_FAMILY
def test_ksampler_is_one_call_of_two_per_step_finite_deterministic_and_prompt_dependent(model_of, family) -> None:
    model = model_of(family)
    with ForwardCounter(model) as counter:
        out = run(model, family)

    assert out.shape == make_latent(family).shape
    assert torch.isfinite(out).all() and out.std() > 0.1
    assert counter.per_step() == [[2]] * STEPS
    assert torch.equal(out, run(model, family)), "the same model, prompt and seed gave another result"
    assert relative_error(out, run(model, family, cfg=1.0)) > MIN_EFFECT, "cfg 5 and cfg 1 give the same latent"


def test_the_flux_code_families_are_declared_where_this_file_tests_them(guiders_pack) -> None:
    common = pack_module(guiders_pack, "common")
    for family in {facts.record for facts in FAMILIES.values()}:
        assert family in common.PAG_FAMILIES and family in common.ATTENTION_FAMILIES
        assert family in common.BLOCK_FAMILIES and family not in common.SAG_FAMILIES


@PER_FAMILY
def test_auto_layers_are_the_middle_of_the_stack_or_flux_1s_choice(guiders_pack, model_of, family: str) -> None:
    """Flux.2 and LongCat-Image have no published layers: "auto" is the middle of the model's own stack, never
    Flux.1's double.9 (Flux.2 dev has double blocks 0-7). Chroma keeps Flux.1's 19 + 38 blocks and its choice,
    so the tiny Chroma (2 + 2 blocks) falls back to the middle as well."""
    model = model_of(family)
    layers = pack_module(guiders_pack, "host.layers")
    available = layers.model_layers(model)
    for method in ("pag", "seg", "slg"):
        chosen = layers.parse_layers("auto", model, "layers", method)
        assert [str(layer) for layer in chosen] == [str(available[len(available) // 2])], (method, chosen)


# ---------------------------------------------------------------------------------------------------------
# The Flux.2 crash: the batch inside the block arguments


def batched_leaves(value, batch: int, path: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in ``value`` whose first dimension is ``batch``, by its path (dict keys, tuple positions,
    dataclass fields): written here, independent of the pack's walk."""
    if isinstance(value, torch.Tensor):
        return {path: value} if value.ndim and value.shape[0] == batch else {}
    found: dict[str, torch.Tensor] = {}
    if isinstance(value, dict):
        items = [(str(key), item) for key, item in value.items() if key != "transformer_options"]
    elif isinstance(value, (tuple, list)):
        items = [(str(i), item) for i, item in enumerate(value)]
    elif dataclasses.is_dataclass(value):
        items = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    else:
        items = []
    for key, item in items:
        found.update(batched_leaves(item, batch, f"{path}.{key}" if path else key))
    return found


@contextlib.contextmanager
def recording_block_args(model, keys: list[tuple[str, int]]):
    """A clone of ``model`` whose dit patches on ``keys`` record the args of each call and run the block."""
    recorded: dict[tuple[str, int], list[dict]] = {key: [] for key in keys}
    recorder = model.clone()
    for key in keys:
        def record(args, extra, key=key):
            recorded[key].append(args)
            return extra["original_block"](args)

        recorder.set_model_patch_replace(record, "dit", *key)
    yield recorder, recorded


@pytest.mark.parametrize("family", ["flux2", "chroma"])
def test_the_modulations_in_vec_carry_the_batch_and_the_shared_prefix_takes_their_rows(
    guiders_pack, model_of, family: str
) -> None:
    """Which block arguments carry the batch, from the host's forward: img, txt, pe's batch only if pe has one,
    and every shift/scale/gate of the modulation dataclasses in ``vec``. ``select_rows`` must take the same rows
    of each. Fails without the dataclass case in shared_prefix (select_rows left vec at the full batch: the
    crash ``size of tensor a (3) must match b (2)`` in flux/layers.py apply_mod)."""
    model = model_of(family)
    shared_prefix = pack_module(guiders_pack, "host.shared_prefix")
    positive, negative = make_conditioning(family, seed=1)
    with recording_block_args(model, [("double_block", 0), ("single_block", 0)]) as (recorder, recorded):
        sample(recorder, positive, negative, make_latent(family, seed=2), cfg=CFG, steps=1, seed=3)
    rows = torch.tensor([0])
    for key, calls in recorded.items():
        args = calls[0]
        batch = args["img"].shape[0]
        assert batch == 2
        leaves = batched_leaves(args, batch)
        modulations = [path for path in leaves if path.startswith("vec")]
        expected = 12 if key[0] == "double_block" else 3  # 2 streams x 2 ModulationOut x 3; 1 x 3
        assert len(modulations) == expected, (key, sorted(leaves))
        reduced = batched_leaves(shared_prefix.select_rows(dict(args), rows, batch), 1)
        assert set(reduced) == set(leaves), (key, sorted(set(leaves) - set(reduced)))
        for path, tensor in leaves.items():
            assert torch.equal(reduced[path], tensor[:1]), path


BATCHED_METHODS = {
    "PAG": lambda m: node("GuidersPAG", model=m, scale=3.0, layers="single.1", start_percent=0.0, end_percent=1.0),
    "SEG": lambda m: node("GuidersSEG", model=m, scale=3.0, blur_sigma=2.0, layers="single.1", start_percent=0.0,
                          end_percent=1.0),
    **{f"SLG-{mode}": (lambda m, mode=mode, layers=layers: node("GuidersSLG", model=m, scale=3.0, layers=layers,
                                                                 mode=mode, start_percent=0.0, end_percent=1.0))
       for mode, layers in (("block", "single.1"), ("attention", "double.1"), ("feedforward", "double.1"),
                            ("attention_scores", "single.1"))},
}


@pytest.mark.parametrize("method", list(BATCHED_METHODS))
@pytest.mark.parametrize("family", ["flux2", "flux2_klein"])
def test_every_batched_method_runs_on_flux2_as_one_call_of_three_per_step(model_of, plain_of, family, method):
    """The regression test of the Flux.2 crash: cfg 5 and a perturbed branch give three chunks, and the blocks
    before the perturbed one (the shared prefix) or around a skipped one compute fewer. Before the fix every
    method raised RuntimeError in apply_mod."""
    model = model_of(family)
    with ForwardCounter(model) as counter:
        out = run(BATCHED_METHODS[method](model), family)

    assert counter.per_step() == [[3]] * STEPS
    assert all(sorted(call.cond_or_uncond)[:2] == [COND, UNCOND] for call in counter.calls)
    assert_effect(out, plain_of(family), method)


# ---------------------------------------------------------------------------------------------------------
# Identity self-attention (PAG, SLG attention_scores) against the definition

IDENTITY_CASES = [
    pytest.param(family, layers, node_id, id=f"{family}-{layers}-{node_id}")
    for family in FLUX_CODE
    for layers in ("double.1", "single.1")
    for node_id in ("GuidersPAG", "GuidersSLG-attention_scores")
]


@pytest.mark.parametrize(("family", "layers", "node_id"), IDENTITY_CASES)
def test_identity_self_attention_matches_a_reference_from_the_definition(
    model_of, plain_of, family: str, layers: str, node_id: str
) -> None:
    """PAG: the image tokens' rows of the chosen block's joint attention return their V, the text rows (before
    them: 512 padded tokens on Flux.2) are unchanged; attention_scores: every row. Breaks caught: the text rows
    perturbed too (text_position NO_TEXT, or the text count of the wrong stream), the wrong block (index + 1),
    the wrong chunk perturbed (the uncond's)."""
    model = model_of(family)
    if node_id == "GuidersPAG":
        ours = node("GuidersPAG", model=model, scale=3.0, layers=layers, start_percent=0.0, end_percent=1.0)
        rows = image_rows(family)
    else:
        ours = node("GuidersSLG", model=model, scale=3.0, layers=layers, mode="attention_scores",
                    start_percent=0.0, end_percent=1.0, rescale=0.0)
        rows = slice(None)
    block_type, index = layers.split(".")
    reference = perturbed_pass_reference(model, joint_attention_rows_return_values(block_type, int(index), rows), 3.0)

    with ForwardCounter(model) as counter:
        result = run(ours, family)
    assert counter.per_step() == [[3]] * STEPS, "the perturbed branch should ride in the cond/uncond forward"
    assert_parity(result, run(reference, family), plain_of(family))


# ---------------------------------------------------------------------------------------------------------
# SLG against ComfyUI's SkipLayerGuidanceDiT and the sublayer definition

SLG_WINDOWS = [pytest.param(0.0, 1.0, id="always"), pytest.param(0.2, 0.6, id="window-0.2-0.6")]
SLG_BLOCKS = [pytest.param("double.1", "1", "", id="double1"), pytest.param("single.1", "", "1", id="single1")]


@pytest.mark.parametrize(("start", "end"), SLG_WINDOWS)
@pytest.mark.parametrize(("layers", "double_layers", "single_layers"), SLG_BLOCKS)
@PER_FAMILY
def test_slg_block_matches_skip_layer_guidance_dit(
    model_of, plain_of, family: str, layers: str, double_layers: str, single_layers: str, start: float, end: float
) -> None:
    """Breaks caught: the wrong chunk skipped (the uncond's), the wrong block, the skipped chunk computed."""
    model = model_of(family)
    assert_window_is_partial(model, start, end, STEPS)
    ours = node("GuidersSLG", model=model, scale=3.0, layers=layers, mode="block", start_percent=start,
                end_percent=end, rescale=0.0)
    builtin = node("SkipLayerGuidanceDiT", model=model, double_layers=double_layers, single_layers=single_layers,
                   scale=3.0, start_percent=start, end_percent=end, rescaling_scale=0.0)

    assert_parity(run(ours, family), run(builtin, family), plain_of(family))


@PER_FAMILY
def test_slg_on_the_negative_branch_matches_skip_layer_guidance_dit_simple(model_of, plain_of, family) -> None:
    model = model_of(family)
    ours = node("GuidersSLG", model=model, scale=3.0, layers="double.1", mode="block", start_percent=0.0,
                end_percent=1.0, rescale=0.0, target="negative branch")
    builtin = node("SkipLayerGuidanceDiTSimple", model=model, double_layers="1", single_layers="",
                   start_percent=0.0, end_percent=1.0)

    assert_parity(run(ours, family), run(builtin, family), plain_of(family))


SUBLAYERS = {"attention": ["img_attn.proj", "txt_attn.proj"], "feedforward": ["img_mlp", "txt_mlp"]}


@pytest.mark.parametrize("mode", list(SUBLAYERS))
@PER_FAMILY
def test_sublayer_skip_matches_its_definition(model_of, plain_of, family: str, mode: str) -> None:
    """Double block 1's attention (both streams' output projections) or feed-forward (both MLPs) adds nothing
    for the perturbed branch: forward hooks zero those modules' outputs in the reference pass."""
    model = model_of(family)
    block = model.model.diffusion_model.double_blocks[1]
    ours = node("GuidersSLG", model=model, scale=3.0, layers="double.1", mode=mode, start_percent=0.0,
                end_percent=1.0, rescale=0.0)
    with ForwardCounter(model) as counter:
        result = run(ours, family)

    assert counter.per_step() == [[3]] * STEPS
    assert_parity(result, run(sublayer_off_reference(model, block, SUBLAYERS[mode], 3.0), family), plain_of(family))
    assert not block.get_submodule(SUBLAYERS[mode][0])._forward_hooks, "hooks must not outlive the call"


# ---------------------------------------------------------------------------------------------------------
# SEG against the query blur written in the tests


def joint_queries_blurred(family: str, block_type: str, block_index: int, blur_sigma: float) -> Callable:
    """SEG (Hong 2024, arXiv:2408.00760) in a Flux-style joint attention: in the block the host marks, the image
    tokens' queries (after the text) are blurred over their (h, w) grid (a Gaussian with reflect padding, or
    their mean at σ = 99999, the paper's infinite blur); keys, values and the text queries are unchanged."""
    rows, (h, w) = image_rows(family), FAMILIES[family].grid

    def blurred(q_image):  # (B, heads, h·w, D)
        b, heads, tokens, dim = q_image.shape
        if blur_sigma >= 9999:
            return q_image.mean(dim=2, keepdim=True).expand_as(q_image)
        return blur_queries(q_image.reshape(b * heads, tokens, dim), h, w, blur_sigma).reshape(q_image.shape)

    def override(func, q, k, v, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        if options.get("block_type") == block_type and options.get("block_index") == block_index:
            q = q.clone()
            q[:, :, rows] = blurred(q[:, :, rows])
        return func(q, k, v, *args, **kwargs)

    return attention_override_during_pass(override)


@pytest.mark.parametrize("blur_sigma", [1.0, 99999.0])
@pytest.mark.parametrize("layers", ["double.1", "single.1"])
@PER_FAMILY
def test_seg_blurs_the_image_queries_as_a_reference_from_the_definition(
    model_of, plain_of, family: str, layers: str, blur_sigma: float
) -> None:
    """Breaks caught: the text queries blurred with the image ones (the grid placed at token 0), the wrong
    block, no blur at all."""
    model = model_of(family)
    ours = node("GuidersSEG", model=model, scale=3.0, blur_sigma=blur_sigma, layers=layers, start_percent=0.0,
                end_percent=1.0)
    block_type, index = layers.split(".")
    reference = perturbed_pass_reference(model, joint_queries_blurred(family, block_type, int(index), blur_sigma), 3.0)

    assert_parity(run(ours, family), run(reference, family), plain_of(family))


# ---------------------------------------------------------------------------------------------------------
# Every node that declares these families changes the result


@pytest.mark.parametrize(("case", "family"), effect_params(FLUX_CODE))
def test_node_changes_the_result_on_flux_code_models_and_stays_finite(
    model_of, weak_model_of, family: str, case: EffectCase
) -> None:
    model = model_of(family)
    patched = case.build(model, weak_model_of(family))

    assert_effect(run(patched, family, cfg=case.cfg), run(model, family, cfg=case.cfg))


@PER_FAMILY
def test_sag_refuses_them_and_names_the_supported_families(model_of, family: str) -> None:
    from harness import run_node

    with pytest.raises(ValueError) as raised:
        run_node("GuidersSAG", model=model_of(family), scale=0.5, blur_sigma=2.0)
    message = str(raised.value)
    name = FAMILIES[family].name
    assert name in message and "supports" in message and "UNet" in message.split("supports", 1)[-1], message
