"""The harness itself, against the real host: tiny models sample sanely, both sampler paths agree, and the
ForwardCounter sees the forwards ComfyUI 0.8.0 makes.

Host behaviour these tests depend on (comfy/samplers.py):
- sampling_function runs cond and uncond of the same shapes as ONE apply_model call (calc_cond_batch
  concatenates them), and skips uncond entirely when cfg == 1 (the cfg1 optimisation);
- KSampler and SamplerCustomAdvanced + CFGGuider both end in CFGGuider.sample with the same noise and sigmas;
- PerturbedAttentionGuidance makes a second calc_cond_batch call for cond alone in its post-CFG hook.
"""

from __future__ import annotations

import pytest
import torch
from harness import (
    REPO_ROOT,
    ForwardCounter,
    cfg_guider,
    run_node,
    sample,
    sample_custom_advanced,
    scheduler_sigmas,
)
from tiny_models import FAMILIES, MEDIUM_LATENT_SIZE, make_conditioning, make_latent

STEPS = 4


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def model(family: str, tiny_model):
    return tiny_model(family)


def test_tiny_models_keep_the_real_noise_schedule(family: str, model) -> None:
    # Random weights go into the network only; model_sampling's buffers ARE the schedule.
    expected_sigma_max = {"sd15": 14.6146, "sd3": 1.0, "flux": 1.0}[family]
    sigmas = scheduler_sigmas(model, steps=STEPS)

    assert sigmas[0].item() == pytest.approx(expected_sigma_max, rel=1e-4)
    assert sigmas[-1].item() == 0.0
    assert (sigmas[1:] < sigmas[:-1]).all(), f"the schedule is not strictly decreasing: {sigmas}"


def test_ksampler_gives_a_finite_latent_of_the_input_shape_that_moved(family: str, model) -> None:
    positive, negative = make_conditioning(family, seed=1)
    latent = make_latent(family, batch=2, seed=2)

    out = sample(model, positive, negative, latent, cfg=5.0, steps=STEPS, seed=3)

    assert out.shape == latent.shape
    assert torch.isfinite(out).all()
    assert (out - latent).abs().mean() > 0.1, "sampling left the latent (nearly) unchanged"
    assert out.std() > 0.1, "the model collapsed its output to a constant"


def test_ksampler_is_deterministic_and_follows_the_seed(family: str, model) -> None:
    positive, negative = make_conditioning(family, seed=1)
    latent = make_latent(family, seed=2)

    first = sample(model, positive, negative, latent, cfg=5.0, steps=STEPS, seed=7)
    again = sample(model, positive, negative, latent, cfg=5.0, steps=STEPS, seed=7)
    other_seed = sample(model, positive, negative, latent, cfg=5.0, steps=STEPS, seed=8)

    assert torch.equal(first, again)
    assert (first - other_seed).abs().mean() > 0.01


def test_guidance_scale_changes_the_result(family: str, model) -> None:
    # Guards every later guidance test: if cond and uncond predictions were equal, no guidance could show.
    positive, negative = make_conditioning(family, seed=1)
    latent = make_latent(family, seed=2)

    cfg_5 = sample(model, positive, negative, latent, cfg=5.0, steps=STEPS, seed=3)
    cfg_1 = sample(model, positive, negative, latent, cfg=1.0, steps=STEPS, seed=3)

    assert (cfg_5 - cfg_1).abs().mean() > 0.05 * cfg_1.abs().mean()


def test_ksampler_equals_sampler_custom_advanced_with_cfg_guider(family: str, model) -> None:
    positive, negative = make_conditioning(family, seed=1)
    latent = make_latent(family, seed=2)

    ksampler_out = sample(model, positive, negative, latent, cfg=5.0, steps=STEPS, seed=3)
    guider = cfg_guider(model, positive, negative, cfg=5.0)
    sigmas = scheduler_sigmas(model, steps=STEPS, scheduler="normal")
    custom_out = sample_custom_advanced(guider, latent, "euler", sigmas, seed=3)

    torch.testing.assert_close(custom_out, ksampler_out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("cfg", "batch_per_step", "branches"), [(5.0, 2, {0, 1}), (1.0, 1, {0})])
def test_forward_counter_sees_one_batched_forward_per_step(
    family: str, model, cfg: float, batch_per_step: int, branches: set[int]
) -> None:
    positive, negative = make_conditioning(family, seed=1)
    latent = make_latent(family, seed=2)

    with ForwardCounter(model) as counter:
        sample(model, positive, negative, latent, cfg=cfg, steps=STEPS, seed=3)

    assert counter.per_step() == [[batch_per_step]] * STEPS
    assert [call.step for call in counter.calls] == list(range(STEPS))
    assert all(set(call.cond_or_uncond) == branches for call in counter.calls)
    assert "forward" not in vars(model.model.diffusion_model), "the counter must unwrap forward on exit"


def test_perturbed_attention_guidance_adds_a_cond_only_forward(sd15_model) -> None:
    positive, negative = make_conditioning("sd15", seed=1)
    latent = make_latent("sd15", seed=2)
    (pag_model,) = run_node("PerturbedAttentionGuidance", model=sd15_model, scale=3.0)

    with ForwardCounter(sd15_model) as counter:
        pag_out = sample(pag_model, positive, negative, latent, cfg=5.0, steps=STEPS, seed=3)
    plain_out = sample(sd15_model, positive, negative, latent, cfg=5.0, steps=STEPS, seed=3)

    assert counter.per_step() == [[2, 1]] * STEPS
    assert [call.cond_or_uncond for call in counter.calls[1::2]] == [(0,)] * STEPS
    assert (pag_out - plain_out).abs().mean() > 0.01, "the PAG patch had no effect"


def test_run_node_validates_inputs_as_the_frontend_and_executor_would(sd15_model) -> None:
    with pytest.raises(TypeError, match="no input"):
        run_node("PerturbedAttentionGuidance", model=sd15_model, scael=3.0)
    with pytest.raises(ValueError, match="above its max"):
        run_node("PerturbedAttentionGuidance", model=sd15_model, scale=1000.0)
    with pytest.raises(ValueError, match="not one of"):
        run_node("KSamplerSelect", sampler_name="no_such_sampler")
    (defaulted,) = run_node("PerturbedAttentionGuidance", model=sd15_model)  # scale takes its default
    assert defaulted is not sd15_model and defaulted.model is sd15_model.model


def test_medium_sd15_samples_a_32x32_latent(tiny_model) -> None:
    model = tiny_model("sd15_medium")
    positive, negative = make_conditioning("sd15_medium", seed=1)
    latent = make_latent("sd15_medium", h=MEDIUM_LATENT_SIZE, w=MEDIUM_LATENT_SIZE, seed=2)

    out = sample(model, positive, negative, latent, cfg=5.0, steps=1, seed=3)  # one forward: ~0.8 s

    assert out.shape == (1, 4, MEDIUM_LATENT_SIZE, MEDIUM_LATENT_SIZE)
    assert torch.isfinite(out).all()


def test_the_pack_loads_as_a_custom_node_folder(guiders_pack: dict[str, type], comfy_host) -> None:
    # guiders_pack raises (never skips) when nodes.load_custom_node fails; here: what it registered.
    assert guiders_pack, "the pack declares no node"
    for node_id, node_cls in guiders_pack.items():
        assert comfy_host.nodes.NODE_CLASS_MAPPINGS[node_id] is node_cls
        assert node_cls.RELATIVE_PYTHON_MODULE == f"custom_nodes.{REPO_ROOT.name}"
