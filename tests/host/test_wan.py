"""The pack on a video DiT: a tiny random-weight Wan 2.1 text-to-video model (tiny_models.make_wan: 3 blocks,
hidden 64, 2 heads, a (1, 16, 3, 8, 8) latent) sampled by a real KSampler.

1. The tiny model itself: the real Wan noise schedule (flow, shift 8), one forward of cond + uncond per
   step, finite and deterministic results that depend on the prompt.
2. Every node that declares Wan support (PAG_FAMILIES / BLOCK_FAMILIES / the CFG rules in
   nodes/guidance_nodes.py) gives a finite result clearly different from plain CFG at the same cfg.
3. Parity with ComfyUI's own nodes where they exist for Wan: SkipLayerGuidanceDiT (SLG ``block``, an extra
   cond pass) and SkipLayerGuidanceDiTSimple (SLG on the negative branch). Identity self-attention (PAG,
   SLG ``attention_scores``) against a reference written here from the PAG paper's definition with the
   host's own hooks, applied post-CFG as ComfyUI's PerturbedAttentionGuidance does on UNets.
4. Forward costs: the extra branches ride in the cond/uncond forward (PAG + cfg: one call of 3 per step).
5. The nodes that do not support Wan (SEG, SAG) refuse it and name what they support.

Host behaviour these tests depend on (ComfyUI 0.8.0):
- ``comfy/ldm/wan/model.py``: WanModel.forward_orig calls ``patches_replace["dit"][("double_block", i)]``
  with ``{img, txt, vec, pe, transformer_options}`` and sets ``transformer_options["block_index"]``; each
  block runs self-attention on the image tokens (q, k, v as (B, L, heads·D)) then cross-attention to the
  text tokens, both through ``optimized_attention`` and so through ``optimized_attention_override``;
- ``comfy/model_base.py``: WAN21.extra_conds feeds the conditioning tensor as ``c_crossattn``; no pooled
  output; ``comfy/supported_models.py``: WAN21_T2V is a flow model with shift 8;
- ``ModelSamplingDiscreteFlow.percent_to_sigma(p)`` is the shifted ``1 − p``; SkipLayerGuidanceDiT and
  SkipLayerGuidanceDiTSimple are active for sigma_end <= σ <= sigma_start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import comfy.samplers
import pytest
import torch
from harness import ForwardCounter, assert_window_is_partial, run_node, sample, scheduler_sigmas
from tiny_models import VIDEO_SPECS, make_conditioning, make_latent, make_model

FAMILY = "wan"
STEPS = 4
CFG = 5.0
MIN_EFFECT = 1e-2  # max|guided − plain| / max|plain|
PARITY_RTOL = 1e-4  # of max|reference|
WEAK_MODEL_SEED = 7  # autoguidance's "bad version": the same architecture with other random weights
COND, UNCOND = 0, 1  # calc_cond_batch's indices of the positive and negative conds
TEXT_TOKENS = VIDEO_SPECS[FAMILY].context_tokens


def node(node_id: str, **inputs):
    """The first output of a node run through ComfyUI's executor."""
    return run_node(node_id, **inputs)[0]


def run(model, cfg: float = CFG, batch: int = 1, positive_seed: int = 1) -> torch.Tensor:
    positive, negative = make_conditioning(FAMILY, seed=positive_seed)
    latent = make_latent(FAMILY, batch=batch, seed=2)
    return sample(model, positive, negative, latent, cfg=cfg, steps=STEPS, seed=3)


def run_counted(model, cfg: float = CFG) -> tuple[torch.Tensor, ForwardCounter]:
    with ForwardCounter(model) as counter:
        out = run(model, cfg=cfg)
    return out, counter


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float((result - reference).abs().max() / reference.abs().max())


def assert_guided(guided: torch.Tensor, plain: torch.Tensor) -> None:
    assert guided.shape == plain.shape
    assert torch.isfinite(guided).all(), "the guided result has NaN or inf"
    effect = relative_error(guided, plain)
    assert effect > MIN_EFFECT, f"the node barely changed the result: max|Δ|/max|plain| = {effect:.2e}"


def assert_parity(result: torch.Tensor, reference: torch.Tensor, plain: torch.Tensor) -> None:
    """``result`` matches ``reference`` (PARITY_RTOL of max|reference|); the reference is far from plain."""
    assert torch.isfinite(reference).all() and torch.isfinite(result).all()
    effect = relative_error(reference, plain)
    assert effect > MIN_EFFECT, f"the reference barely differs from plain CFG ({effect:.2e}): a vacuous test"
    error = relative_error(result, reference)
    assert error < PARITY_RTOL, f"max|ours − reference| / max|reference| = {error:.2e} (effect {effect:.2e})"


@pytest.fixture(autouse=True)
def _pack(guiders_pack):
    return guiders_pack


@pytest.fixture(scope="module")
def wan_model(tiny_model):
    return tiny_model(FAMILY)


@pytest.fixture(scope="module")
def weak_wan_model(comfy_host):
    return make_model(FAMILY, seed=WEAK_MODEL_SEED)


@pytest.fixture(scope="module")
def plain(wan_model) -> torch.Tensor:
    return run(wan_model)


# ---------------------------------------------------------------------------------------------------------
# The tiny Wan model


def test_tiny_wan_keeps_the_real_shifted_flow_schedule(wan_model) -> None:
    # Random weights go into the network only; model_sampling is Wan's flow schedule with shift 8:
    # σ(t) = shift·t / (1 + (shift − 1)·t) (SD3 paper, Eq. 23), so 50 % of the way σ = 4 / 4.5.
    sampling = wan_model.get_model_object("model_sampling")
    sigmas = scheduler_sigmas(wan_model, steps=STEPS)

    assert type(wan_model.model.diffusion_model).__name__ == "WanModel"
    assert sigmas[0].item() == pytest.approx(1.0, rel=1e-5)
    assert sigmas[-1].item() == 0.0
    assert (sigmas[1:] < sigmas[:-1]).all(), f"the schedule is not strictly decreasing: {sigmas}"
    assert float(sampling.percent_to_sigma(0.5)) == pytest.approx(8 * 0.5 / (1 + 7 * 0.5), rel=1e-5)


def test_ksampler_on_tiny_wan_is_one_call_of_two_per_step_finite_and_deterministic(wan_model) -> None:
    out, counter = run_counted(wan_model)
    again = run(wan_model)
    cond_only = run(wan_model, cfg=1.0)
    latent = make_latent(FAMILY, seed=2)

    assert out.shape == latent.shape == (1, 16, 3, 8, 8)
    assert torch.isfinite(out).all()
    assert (out - latent).abs().mean() > 0.1, "sampling left the latent (nearly) unchanged"
    assert out.std() > 0.1, "the model collapsed its output to a constant"
    assert counter.per_step() == [[2]] * STEPS, "cond and uncond should run as one forward of batch 2"
    assert all(set(call.cond_or_uncond) == {COND, UNCOND} for call in counter.calls)
    assert torch.equal(out, again), "the same model, prompt and seed gave another result"
    # The prompt matters, so guidance has something to amplify.
    assert relative_error(out, cond_only) > MIN_EFFECT, "cfg 5 and cfg 1 give (nearly) the same latent"


def test_a_latent_batch_of_two_samples_each_video(wan_model) -> None:
    out = run(wan_model, batch=2)

    assert out.shape == (2, 16, 3, 8, 8)
    assert torch.isfinite(out).all()
    assert relative_error(out[0], out[1]) > MIN_EFFECT, "two noise draws gave the same video"


# ---------------------------------------------------------------------------------------------------------
# Every node that declares Wan support changes the result


@dataclass(frozen=True)
class Case:
    """A node to apply: ``build(model, weak_model)`` gives the patched model; compared at sampler ``cfg``."""

    name: str
    build: Callable
    cfg: float = CFG


def _scheduled_cfg(model, weak):
    return node("GuidersScheduledCFG", model=model,
                schedule=node("GuidersScheduleLinear", start_value=8.0, end_value=2.0))


def _slg(mode: str, target: str = "new branch"):
    def build(model, weak):
        return node("GuidersSLG", model=model, scale=3.0, layers="1", mode=mode, start_percent=0.0,
                    end_percent=1.0, target=target)

    return build


CASES = [
    Case("PAG", lambda m, w: node("GuidersPAG", model=m, scale=3.0)),
    Case("SLG-block", _slg("block")),
    Case("SLG-attention_scores", _slg("attention_scores")),
    Case("SLG-block-negative_branch", _slg("block", target="negative branch")),
    Case("ScheduledCFG", _scheduled_cfg),
    Case("CFGNormalize-base_norm", lambda m, w: node("GuidersCFGNormalize", model=m, mode="base_norm")),
    # t_norm's scale multiplies a direction normalised to the uncond's norm: cf_guidance uses 0.25 → 0.05.
    Case("CFGNormalize-t_norm", lambda m, w: node("GuidersCFGNormalize", model=m, mode="t_norm"), cfg=0.3),
    Case("CFGNormalize-full_norm", lambda m, w: node("GuidersCFGNormalize", model=m, mode="full_norm"),
         cfg=0.3),
    Case("RescaleCFG", lambda m, w: node("GuidersRescaleCFG", model=m, multiplier=0.7)),
    Case("CFGZeroStar-zero_init_1", lambda m, w: node("GuidersCFGZeroStar", model=m, zero_init_steps=1)),
    Case("CFGZeroStar-zero_init_0", lambda m, w: node("GuidersCFGZeroStar", model=m, zero_init_steps=0)),
    Case("APG", lambda m, w: node("GuidersAPG", model=m, eta=0.0, norm_threshold=5.0, momentum=-0.5)),
    Case("Autoguidance", lambda m, w: node("GuidersAutoguidance", model=m, weak_model=w, scale=2.0)),
]


def test_wan_is_declared_where_this_file_tests_it(guiders_pack) -> None:
    # If the pack drops Wan from a method (or adds it to SEG), this file must change with it.
    import sys

    module = sys.modules[guiders_pack["GuidersPAG"].__module__]
    assert FAMILY in module.PAG_FAMILIES and FAMILY in module.BLOCK_FAMILIES and FAMILY in module.ALL_FAMILIES
    assert FAMILY not in module.ATTENTION_FAMILIES


@pytest.mark.parametrize("case", [pytest.param(case, id=case.name) for case in CASES])
def test_node_changes_the_result_on_wan_and_stays_finite(wan_model, weak_wan_model, case: Case) -> None:
    patched = case.build(wan_model, weak_wan_model)

    assert_guided(run(patched, cfg=case.cfg), run(wan_model, cfg=case.cfg))


# ---------------------------------------------------------------------------------------------------------
# Parity with ComfyUI's own nodes and with a reference written from the method's definition

SLG_WINDOWS = [pytest.param(0.0, 1.0, id="always"), pytest.param(0.2, 0.6, id="window-0.2-0.6")]


@pytest.mark.parametrize(("start", "end"), SLG_WINDOWS)
def test_slg_block_matches_skip_layer_guidance_dit_on_wan(wan_model, plain, start: float, end: float) -> None:
    assert_window_is_partial(wan_model, start, end, STEPS)
    ours = node("GuidersSLG", model=wan_model, scale=3.0, layers="1", mode="block", start_percent=start,
                end_percent=end, rescale=0.0)
    builtin = node("SkipLayerGuidanceDiT", model=wan_model, double_layers="1", single_layers="", scale=3.0,
                   start_percent=start, end_percent=end, rescaling_scale=0.0)

    assert_parity(run(ours), run(builtin), plain)


def test_slg_on_the_negative_branch_matches_skip_layer_guidance_dit_simple(wan_model, plain) -> None:
    ours = node("GuidersSLG", model=wan_model, scale=3.0, layers="1", mode="block", start_percent=0.0,
                end_percent=1.0, rescale=0.0, target="negative branch")
    builtin = node("SkipLayerGuidanceDiTSimple", model=wan_model, double_layers="1", single_layers="",
                   start_percent=0.0, end_percent=1.0)

    assert_parity(run(ours), run(builtin), plain)


def perturbed_pass_reference(model, attention_override, scale: float):
    """An extra cond pass run alone with ``attention_override``, added after CFG as
    ``denoised + s·(cond − perturbed)`` (as ComfyUI's PerturbedAttentionGuidance does on UNets)."""

    def post_cfg(args):
        model_options = dict(args["model_options"])
        transformer_options = dict(model_options.get("transformer_options", {}))
        transformer_options["optimized_attention_override"] = attention_override
        model_options["transformer_options"] = transformer_options
        (perturbed,) = comfy.samplers.calc_cond_batch(
            args["model"], [args["cond"]], args["input"], args["sigma"], model_options)
        return args["denoised"] + scale * (args["cond_denoised"] - perturbed)

    reference = model.clone()
    reference.set_model_sampler_post_cfg_function(post_cfg)
    return reference


def identity_self_attention_reference(model, block_index: int, scale: float):
    """PAG (Ahn et al. 2024, arXiv:2403.17377, Eq. 9-10) on Wan, written from the definition: the
    self-attention map of block ``block_index`` is the identity, so self-attention returns V. Wan's
    self-attention is the call whose keys are the image tokens, not the TEXT_TOKENS text tokens (the test
    latent has 3·4·4 = 48 image tokens)."""

    def attention_override(func, q, k, v, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        if options.get("block_index") == block_index and k.shape[1] != TEXT_TOKENS:
            assert not kwargs.get("skip_reshape") and v.ndim == 3, "Wan passes (B, L, heads·D) q, k, v"
            return v  # per head: identity attention map @ V_head = V_head
        return func(q, k, v, *args, **kwargs)

    return perturbed_pass_reference(model, attention_override, scale)


@pytest.mark.parametrize("node_id", ["GuidersPAG", "GuidersSLG-attention_scores"])
def test_identity_self_attention_on_wan_matches_a_reference_from_the_definition(
    wan_model, plain, node_id: str
) -> None:
    if node_id == "GuidersPAG":
        ours = node("GuidersPAG", model=wan_model, scale=3.0, layers="1", start_percent=0.0, end_percent=1.0)
    else:
        ours = node("GuidersSLG", model=wan_model, scale=3.0, layers="1", mode="attention_scores",
                    start_percent=0.0, end_percent=1.0, rescale=0.0)

    reference = identity_self_attention_reference(wan_model, block_index=1, scale=3.0)

    assert_parity(run(ours), run(reference), plain)


def test_pag_leaves_cross_attention_alone_when_text_and_image_token_counts_coincide(wan_model) -> None:
    # 48 text tokens = 48 image tokens: token counts cannot tell Wan's self- and cross-attention apart. The
    # reference perturbs only the block's self-attention, which Wan runs first in every block.
    generator = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 48, 32, generator=generator), {}]]
    negative = [[torch.randn(1, 48, 32, generator=generator), {}]]
    latent = make_latent("wan", seed=2)
    calls_seen: dict[int, int] = {}

    def self_attention_only(func, q, k, v, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        if options.get("block_index") == 1:
            seen = calls_seen.get(id(options), 0)
            calls_seen[id(options)] = seen + 1
            if seen % 2 == 0:
                return v
        return func(q, k, v, *args, **kwargs)

    reference_model = perturbed_pass_reference(wan_model, self_attention_only, 3.0)
    ours = node("GuidersPAG", model=wan_model, scale=3.0, layers="1", start_percent=0.0, end_percent=1.0)
    plain_result = sample(wan_model, positive, negative, latent, cfg=CFG, seed=3)
    reference = sample(reference_model, positive, negative, latent, cfg=CFG, seed=3)
    assert_parity(sample(ours, positive, negative, latent, cfg=CFG, seed=3), reference, plain_result)


# ---------------------------------------------------------------------------------------------------------
# Forward costs


def test_guiders_pag_with_cfg_is_one_call_of_three_per_step_on_wan(wan_model, plain) -> None:
    pag_model = node("GuidersPAG", model=wan_model, scale=3.0)

    out, counter = run_counted(pag_model)

    assert counter.per_step() == [[3]] * STEPS
    for call in counter.calls:
        indices = sorted(call.cond_or_uncond)
        assert indices[:2] == [COND, UNCOND] and indices[2] >= 2, call.cond_or_uncond
    assert relative_error(out, plain) > MIN_EFFECT


def test_guiders_slg_block_is_one_call_of_three_per_step_on_wan(wan_model, plain) -> None:
    slg_model = node("GuidersSLG", model=wan_model, scale=3.0, layers="1", mode="block", start_percent=0.0,
                     end_percent=1.0)

    out, counter = run_counted(slg_model)

    assert counter.per_step() == [[3]] * STEPS
    assert relative_error(out, plain) > MIN_EFFECT


def test_slg_on_the_negative_branch_adds_no_forward_on_wan(wan_model, plain) -> None:
    # SkipLayerGuidanceDiTSimple runs cond and the skipped uncond as two calls; the pack keeps one call of 2:
    # the cond and the perturbed uncond (an extra-branch index), the plain uncond is not evaluated.
    slg_model = node("GuidersSLG", model=wan_model, scale=3.0, layers="1", mode="block", start_percent=0.0,
                     end_percent=1.0, target="negative branch")

    out, counter = run_counted(slg_model)

    assert counter.per_step() == [[2]] * STEPS
    for call in counter.calls:
        indices = sorted(call.cond_or_uncond)
        assert indices[0] == COND and indices[1] >= 2, call.cond_or_uncond
    assert relative_error(out, plain) > MIN_EFFECT


# ---------------------------------------------------------------------------------------------------------
# Nodes without Wan support refuse it


@pytest.mark.parametrize(("node_id", "inputs", "supported"), [
    pytest.param("GuidersSEG", {"scale": 3.0, "blur_sigma": 10.0}, ("UNet", "SD3", "Flux"), id="SEG"),
    pytest.param("GuidersSAG", {"scale": 0.5, "blur_sigma": 2.0}, ("UNet",), id="SAG"),
])
def test_nodes_without_wan_support_refuse_it_and_name_the_supported_families(
    wan_model, node_id: str, inputs: dict, supported: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError) as raised:
        run_node(node_id, model=wan_model, **inputs)

    # The node's own name in the message is checked by test_node_errors.py; here: the families.
    message = str(raised.value)
    assert "Wan" in message and "supports" in message, message
    supports_part = message.split("supports", 1)[-1]
    assert all(name in supports_part for name in supported), message
    assert "Wan" not in supports_part, f"the message lists Wan as supported: {message}"
