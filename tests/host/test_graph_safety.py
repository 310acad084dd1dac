"""The pack inside real graphs: it never changes its input MODEL, runs the same twice, composes with ComfyUI's
own guidance nodes before and after it (a later node that takes one of its slots is composed, not obeyed),
and works with KSamplerAdvanced, CFG++ samplers and multi-evaluation samplers.

Host behaviour these tests depend on (ComfyUI 0.8.0):
- ModelPatcher.clone() copies model_options (one level of transformer_options dicts), wrappers and
  callbacks; CFGGuider.inner_sample puts ``sample_sigmas`` into a copy of the options, not the patcher's;
- ``sampler_cfg_function`` is one slot (RescaleCFG sets it with set_model_sampler_cfg_function, the last
  writer wins); ``sampler_post_cfg_function`` is a list run after the cfg function, in order
  (PerturbedAttentionGuidance adds ``s·(cond_x0 − pag_x0)`` to the denoised there);
- KSamplerAdvanced passes the sliced schedule sigmas[start:end + 1]; the CFG++ samplers (``euler_cfg_pp``)
  read ``uncond_denoised`` through a post-CFG hook they append; heun evaluates the model twice per step
  (at sigma_i and sigma_{i+1}) except on the last step.
"""

from __future__ import annotations

import pytest
import torch
from harness import ForwardCounter, run_node, scheduler_sigmas
from support import CFG, STEPS, assert_effect, assert_parity, node
from support import sample_family as run
from test_node_parity import diffusers_apg_model
from tiny_models import make_conditioning, make_latent


def run_advanced(model, family: str, sampler: str = "euler", steps: int = 8, start: int = 2, end: int = 6,
                 leftover_noise: bool = False, cfg: float = CFG) -> torch.Tensor:
    positive, negative = make_conditioning(family, seed=1)
    latent = make_latent(family, h=16, w=16, seed=2)
    (out,) = run_node("KSamplerAdvanced", model=model, add_noise="enable", noise_seed=3, steps=steps, cfg=cfg,
                      sampler_name=sampler, scheduler="normal", positive=positive, negative=negative,
                      latent_image={"samples": latent}, start_at_step=start, end_at_step=end,
                      return_with_leftover_noise="enable" if leftover_noise else "disable")
    return out["samples"]


@pytest.fixture(autouse=True)
def _pack(guiders_pack):
    return guiders_pack


@pytest.fixture(scope="module")
def weak_sd15(weak_model_of):
    return weak_model_of("sd15")


# ---------------------------------------------------------------------------------------------------------
# The input MODEL is never modified; the same graph gives the same result


def _structure(value):
    """Containers walked, every other object by identity: any added, removed or replaced entry shows."""
    if isinstance(value, dict):
        return {key: _structure(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_structure(item) for item in value)
    return ("object", id(value), type(value).__name__)


def patcher_state(model) -> dict:
    return {name: _structure(getattr(model, name)) for name in
            ("model_options", "wrappers", "callbacks", "additional_models", "object_patches", "patches",
             "injections", "attachments")}


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.model.diffusion_model.state_dict().items()}


def _sd15_stack(model, weak):
    model = node("GuidersPAG", model=model, scale=2.0)
    model = node("GuidersSAG", model=model, scale=0.5, blur_sigma=2.0)
    model = node("GuidersSEG", model=model, scale=2.0, blur_sigma=10.0, start_percent=0.2, end_percent=0.8)
    model = node("GuidersAPG", model=model, eta=0.0, norm_threshold=2.0, momentum=-0.5)
    model = node("GuidersRescaleCFG", model=model, multiplier=0.7)
    # Last: a node after Autoguidance fails (test_nodes_can_follow_autoguidance), which is not what this tests.
    return node("GuidersAutoguidance", model=model, weak_model=weak, scale=1.5)


def _sd3_stack(model, weak):
    model = node("GuidersSLG", model=model, scale=3.0, layers="1", mode="block", start_percent=0.0, end_percent=0.6,
                 rescale=0.7)
    model = node("GuidersSEG", model=model, scale=2.0, blur_sigma=99999.0)
    model = node("GuidersScheduledCFG", model=model, schedule=node("GuidersScheduleLinear", start_value=6.0,
                                                                    end_value=1.0))
    return node("GuidersCFGZeroStar", model=model, zero_init_steps=1)


STACKS = [pytest.param("sd15", _sd15_stack, id="sd15-PAG-SAG-SEG-APG-Rescale-Autoguidance"),
          pytest.param("sd3", _sd3_stack, id="sd3-SLG-SEG-ScheduledCFG-CFGZeroStar")]


@pytest.mark.parametrize(("family", "build"), STACKS)
def test_the_input_model_is_never_modified(tiny_model, weak_sd15, family: str, build) -> None:
    model = tiny_model(family)
    weak = weak_sd15 if family == "sd15" else None
    state_before, weak_state_before = patcher_state(model), patcher_state(weak_sd15)
    weights_before = weights(model)
    plain_before = run(model, family)

    patched = build(model, weak)
    assert patcher_state(model) == state_before, "building the patched model changed the input model"
    guided = run(patched, family)
    plain_after = run(model, family)

    assert_effect(guided, plain_before, "the stack had no effect")
    assert torch.equal(plain_after, plain_before), "sampling the input model gives another result after a patched run"
    assert patcher_state(model) == state_before, "a patched run changed the input model's patcher"
    assert patcher_state(weak_sd15) == weak_state_before, "a patched run changed the weak model's patcher"
    for name, tensor in weights(model).items():
        assert torch.equal(tensor, weights_before[name]), f"weight {name} changed"


@pytest.mark.parametrize(("family", "build"), STACKS)
def test_the_same_graph_twice_gives_the_same_result(tiny_model, weak_sd15, family: str, build) -> None:
    model = tiny_model(family)
    weak = weak_sd15 if family == "sd15" else None
    patched = build(model, weak)

    first = run(patched, family)
    same_model_again = run(patched, family)
    rebuilt = run(build(model, weak), family)

    assert torch.isfinite(first).all()
    assert torch.equal(same_model_again, first), "per-run state (APG momentum, ...) leaked into the next run"
    assert torch.equal(rebuilt, first)


@pytest.mark.parametrize("next_node", ["GuidersAPG", "RescaleCFG", "PerturbedAttentionGuidance"])
def test_nodes_can_follow_autoguidance(sd15_model, weak_sd15, next_node: str) -> None:
    # ModelPatcher.clone() deep-copies model_options, and every MODEL node clones its input: whatever the pack
    # keeps in model_options must survive a deepcopy (a ModelPatcher does not).
    guided = node("GuidersAutoguidance", model=sd15_model, weak_model=weak_sd15, scale=1.5)

    try:
        chained = node(next_node, model=guided)
    except Exception as error:  # noqa: BLE001 (reported without its traceback: see below)
        # Formatting this copy.deepcopy traceback crashes pytest's reporter on Python 3.11.7 (SystemError in
        # ast.parse: an INTERNALERROR that ends the whole session), so the failure is reported as a message.
        pytest.fail(f"{next_node} after GuidersAutoguidance raised {type(error).__name__}: {error}", pytrace=False)

    assert_effect(run(chained, "sd15"), run(sd15_model, "sd15"), "the chain had no effect")


# ---------------------------------------------------------------------------------------------------------
# Built-in guidance nodes before and after ours


def test_builtin_post_cfg_node_after_ours_still_applies(sd15_model) -> None:
    apg = dict(eta=0.0, norm_threshold=2.0, momentum=-0.5)
    ours_then_builtin = node("PerturbedAttentionGuidance",
                             model=node("GuidersAPG", model=sd15_model, **apg), scale=3.0)
    reference = node("PerturbedAttentionGuidance",
                     model=diffusers_apg_model(sd15_model, apg["eta"], apg["norm_threshold"], apg["momentum"], CFG),
                     scale=3.0)

    result = run(ours_then_builtin, "sd15")
    assert_effect(result, run(node("GuidersAPG", model=sd15_model, **apg), "sd15"), "the built-in PAG was dropped")
    assert_effect(result, run(node("PerturbedAttentionGuidance", model=sd15_model, scale=3.0), "sd15"),
                   "our APG was dropped")
    # APG as diffusers computes it, then the built-in PAG's post-CFG term: exactly what the chain should give.
    assert_parity(result, run(reference, "sd15"), run(sd15_model, "sd15"))


def test_a_later_node_overwriting_our_cfg_function_is_composed_too(sd15_model) -> None:
    # RescaleCFG after GuidersPAG overwrites the sampler_cfg_function slot; for the run our function takes the
    # slot back and wraps RescaleCFG's, so the chain equals RescaleCFG followed by the built-in PAG.
    later = node("RescaleCFG", model=node("GuidersPAG", model=sd15_model, scale=3.0, layers="middle"),
                 multiplier=0.7)
    reference = node("PerturbedAttentionGuidance", model=node("RescaleCFG", model=sd15_model, multiplier=0.7),
                     scale=3.0)

    result = run(later, "sd15")
    assert_effect(result, run(node("GuidersPAG", model=sd15_model, scale=3.0, layers="middle"), "sd15"),
                   "RescaleCFG was dropped")
    assert_parity(result, run(reference, "sd15"), run(sd15_model, "sd15"))


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_a_builtin_cfg_function_before_ours_is_composed(tiny_model, family: str) -> None:
    # RescaleCFG's formula stands in for our CFG term and our PAG term is added to it: the same as the built-in
    # PerturbedAttentionGuidance (post-CFG) after RescaleCFG.
    model = tiny_model(family)
    rescaled = node("RescaleCFG", model=model, multiplier=0.7)
    if family == "sd15":
        reference = node("PerturbedAttentionGuidance", model=rescaled, scale=3.0)
        ours = node("GuidersPAG", model=rescaled, scale=3.0, layers="middle")
        ours_alone = node("GuidersPAG", model=model, scale=3.0, layers="middle")
    else:
        reference = node("SkipLayerGuidanceSD3", model=rescaled, layers="1", scale=3.0, start_percent=0.0,
                         end_percent=1.0)
        ours = node("GuidersSLG", model=rescaled, scale=3.0, layers="1", start_percent=0.0, end_percent=1.0)
        ours_alone = node("GuidersSLG", model=model, scale=3.0, layers="1", start_percent=0.0, end_percent=1.0)

    result = run(ours, family)
    assert_effect(result, run(rescaled, family), "our term was dropped")
    assert_effect(result, run(ours_alone, family), "RescaleCFG was dropped")
    assert_parity(result, run(reference, family), run(model, family))


# ---------------------------------------------------------------------------------------------------------
# Other samplers


def test_ksampler_advanced_partial_run_matches_builtin_pag(sd15_model) -> None:
    ours = node("GuidersPAG", model=sd15_model, scale=3.0, layers="middle")
    builtin = node("PerturbedAttentionGuidance", model=sd15_model, scale=3.0)

    assert_parity(run_advanced(ours, "sd15"), run_advanced(builtin, "sd15"), run_advanced(sd15_model, "sd15"))


def test_ksampler_advanced_partial_run_keeps_slg_window(sd3_model) -> None:
    # The window is in sigma, so it selects the same steps of a sliced schedule as the built-in's.
    window = dict(start_percent=0.3, end_percent=0.6)
    ours = node("GuidersSLG", model=sd3_model, scale=3.0, layers="1", mode="block", rescale=0.0, **window)
    builtin = node("SkipLayerGuidanceSD3", model=sd3_model, layers="1", scale=3.0, **window)
    sampling = sd3_model.get_model_object("model_sampling")
    sigma_start = float(sampling.percent_to_sigma(window["start_percent"]))
    sigma_end = float(sampling.percent_to_sigma(window["end_percent"]))
    evaluated = scheduler_sigmas(sd3_model, steps=8)[2:6].tolist()  # run_advanced's steps 2..5
    inside = [sigma_end <= s <= sigma_start for s in evaluated]
    assert any(inside) and not all(inside), f"the window should split the steps {evaluated}"

    assert_parity(run_advanced(ours, "sd3"), run_advanced(builtin, "sd3"), run_advanced(sd3_model, "sd3"))


@pytest.mark.parametrize("sampler", ["euler_cfg_pp", "euler_ancestral_cfg_pp"])
def test_cfg_pp_sampler_matches_builtin_pag(sd15_model, sampler: str) -> None:
    ours = node("GuidersPAG", model=sd15_model, scale=3.0, layers="middle")
    builtin = node("PerturbedAttentionGuidance", model=sd15_model, scale=3.0)

    cfg = 1.5  # CFG++ guidance scales are small (0..2)
    assert_parity(run(ours, "sd15", cfg=cfg, sampler=sampler), run(builtin, "sd15", cfg=cfg, sampler=sampler),
                  run(sd15_model, "sd15", cfg=cfg, sampler=sampler))


def test_cfg_pp_sampler_with_cfg_zero_star_zero_init(sd3_model) -> None:
    # A zero-init step returns zero noise (x0 = x), so the latent does not move on it, with euler as with
    # CFG++: CFG++ takes its step from the uncond x0 its post-CFG hook captured, which must be x there too.
    zero_star = node("GuidersCFGZeroStar", model=sd3_model, zero_init_steps=1)

    euler_first_step = run_advanced(zero_star, "sd3", sampler="euler", steps=4, start=0, end=1, leftover_noise=True)
    cfg_pp_first_step = run_advanced(zero_star, "sd3", sampler="euler_cfg_pp", steps=4, start=0, end=1,
                                     leftover_noise=True, cfg=1.5)
    torch.testing.assert_close(cfg_pp_first_step, euler_first_step, rtol=1e-5, atol=1e-5)

    full = run(zero_star, "sd3", cfg=1.5, sampler="euler_cfg_pp")
    assert_effect(full, run(sd3_model, "sd3", cfg=1.5, sampler="euler_cfg_pp"), "CFG-Zero* had no effect")


def test_heun_with_a_window_perturbs_exactly_the_calls_inside_it(sd3_model) -> None:
    window = dict(start_percent=0.2, end_percent=0.6)
    ours = node("GuidersSLG", model=sd3_model, scale=3.0, layers="1", mode="block", rescale=0.0, **window)
    builtin = node("SkipLayerGuidanceDiT", model=sd3_model, double_layers="1", single_layers="", scale=3.0,
                   rescaling_scale=0.0, **window)
    sampling = sd3_model.get_model_object("model_sampling")
    sigma_start = float(sampling.percent_to_sigma(window["start_percent"]))
    sigma_end = float(sampling.percent_to_sigma(window["end_percent"]))

    with ForwardCounter(sd3_model) as counter:
        result = run(ours, "sd3", sampler="heun")

    # heun, 4 steps: two evaluations per step except the last one (its next sigma is 0).
    assert len(counter.calls) == 2 * STEPS - 1
    inside = [sigma_end <= call.sigma <= sigma_start for call in counter.calls]
    assert any(inside) and not all(inside), f"the window should split the calls: {counter.calls}"
    expected_chunks = [3 if is_inside else 2 for is_inside in inside]  # cond, uncond (+ the skip-layer branch)
    assert [len(call.cond_or_uncond) for call in counter.calls] == expected_chunks
    assert_parity(result, run(builtin, "sd3", sampler="heun"), run(sd3_model, "sd3", sampler="heun"))
