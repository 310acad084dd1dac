"""What each guidance node costs in forwards of the diffusion model: calls per sampling step, their batch
sizes and the branches (``cond_or_uncond``) in each call, counted with harness.ForwardCounter on a real
ComfyUI sampling run (batch-1 latents, 4 steps, euler, SD1.5 unless a test says otherwise).

The contract (nodes/host/step.py): every branch a step needs runs in ONE calc_cond_batch call, so a
method that adds a branch costs one more chunk in that call, not one more call; a branch no active term
needs is not evaluated; CFG-Zero*'s zero-init steps make no call at all; only branches that need another
model or the step's own result (autoguidance, SAG) make a call of their own.

Host behaviour these tests depend on (ComfyUI 0.8.0, comfy/samplers.py):
- calc_cond_batch concatenates conds of the same shape into one apply_model call whose
  ``transformer_options["cond_or_uncond"]`` holds one index per chunk (0 cond, 1 uncond, 2+ extra conds),
  each chunk the whole latent batch;
- sampling_function drops the uncond when cfg == 1 unless ``disable_cfg1_optimization`` is set;
- PerturbedAttentionGuidance and SelfAttentionGuidance make a second calc_cond_batch call in their
  post-CFG hook (cond alone for PAG, the degraded uncond for SAG);
- percent windows are ``sigma_end <= σ <= sigma_start`` with ``model_sampling.percent_to_sigma`` bounds
  (SkipLayerGuidanceDiT), and CFGGuider.inner_sample puts the run's sigmas in ``sample_sigmas``.
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch
from harness import (
    ForwardCall,
    ForwardCounter,
    cfg_guider,
    run_node,
    sample,
    sample_custom_advanced,
    scheduler_sigmas,
)
from tiny_models import make_conditioning, make_latent

STEPS = 4
CFG = 5.0
COND, UNCOND = 0, 1  # calc_cond_batch's indices of the positive and negative conds


def run_counted(model, family: str, cfg: float = CFG, batch: int = 1, counted: tuple = ()) -> tuple:
    """Sample ``model`` with KSampler for STEPS steps and count forwards: returns (latent, counter of
    ``model``, one counter per model in ``counted``). A counter wraps the diffusion model its clones share,
    so the patched clone's forwards are counted on the base model."""
    positive, negative = make_conditioning(family, batch=batch, seed=1)
    latent = make_latent(family, batch=batch, seed=2)
    with ExitStack() as stack:
        counters = [stack.enter_context(ForwardCounter(m)) for m in (model, *counted)]
        out = sample(model, positive, negative, latent, cfg=cfg, steps=STEPS, seed=3)
    return (out, *counters)


def calls_by_step(counter: ForwardCounter, sigmas: torch.Tensor | None = None) -> list[list[ForwardCall]]:
    """The counter's calls grouped by sampling step (an empty list for a step without any forward).

    A call outside the run's ``sample_sigmas`` (``step`` None: a model whose options the sampler did not
    set up, such as autoguidance's weak model) is placed by its sigma in ``sigmas``.
    """
    steps = []
    for call in counter.calls:
        step = call.step
        if step is None:
            assert sigmas is not None and call.sigma is not None, f"cannot place {call} in a step"
            step = int(torch.argmin((sigmas.float() - call.sigma).abs()))
        steps.append(step)
    assert steps == sorted(steps), f"forwards ran out of step order: {steps}"
    num_steps = (len(sigmas) - 1) if sigmas is not None else STEPS
    grouped: list[list[ForwardCall]] = [[] for _ in range(num_steps)]
    for step, call in zip(steps, counter.calls, strict=True):
        grouped[step].append(call)
    return grouped


def batches_by_step(counter: ForwardCounter, sigmas: torch.Tensor | None = None) -> list[list[int]]:
    return [[call.batch_size for call in calls] for calls in calls_by_step(counter, sigmas)]


def branch_sets(counter: ForwardCounter) -> list[set[int]]:
    return [set(call.cond_or_uncond) for call in counter.calls]


def assert_one_call_per_step(counter: ForwardCounter, batch: int, branches: int) -> None:
    """Every step: exactly one forward, of ``batch`` latents, holding cond, uncond and the extra branches
    (indices 2 and up) — ``branches`` chunks in all."""
    assert batches_by_step(counter) == [[batch]] * STEPS
    for call in counter.calls:
        indices = sorted(call.cond_or_uncond)
        assert len(indices) == branches, f"expected {branches} chunks, got cond_or_uncond={call.cond_or_uncond}"
        assert indices[:2] == [COND, UNCOND] and all(i >= 2 for i in indices[2:]), call.cond_or_uncond
        assert len(set(indices)) == branches, f"a branch ran twice in one call: {call.cond_or_uncond}"


def assert_changed(guided: torch.Tensor, plain: torch.Tensor, what: str) -> None:
    """Guards a count test against a patch that costs a forward and does nothing."""
    assert (guided - plain).abs().mean() > 1e-2 * plain.abs().mean(), f"{what} had no effect on the result"


@pytest.fixture(scope="module")
def plain_sd15(sd15_model) -> torch.Tensor:
    out, _ = run_counted(sd15_model, "sd15")
    return out


# ---------------------------------------------------------------------------------------------------------
# Baselines: ComfyUI alone


@pytest.mark.parametrize(("cfg", "batch", "branches"), [(5.0, 2, {COND, UNCOND}), (1.0, 1, {COND})])
def test_plain_cfg_is_one_call_per_step(sd15_model, cfg: float, batch: int, branches: set[int]) -> None:
    _, counter = run_counted(sd15_model, "sd15", cfg=cfg)

    assert batches_by_step(counter) == [[batch]] * STEPS
    assert branch_sets(counter) == [branches] * STEPS


def test_builtin_pag_costs_a_second_call_per_step(guiders_pack, sd15_model) -> None:
    # The contrast for GuidersPAG: ComfyUI's PAG runs its perturbed cond in a call of its own.
    (pag_model,) = run_node("PerturbedAttentionGuidance", model=sd15_model, scale=3.0)

    _, counter = run_counted(pag_model, "sd15")

    assert batches_by_step(counter) == [[2, 1]] * STEPS
    assert branch_sets(counter) == [{COND, UNCOND}, {COND}] * STEPS


# ---------------------------------------------------------------------------------------------------------
# Perturbed branches batched with cond and uncond


def test_guiders_pag_is_one_call_of_three_per_step(guiders_pack, sd15_model, plain_sd15) -> None:
    (pag_model,) = run_node("GuidersPAG", model=sd15_model, scale=3.0)

    out, counter = run_counted(pag_model, "sd15")

    assert_one_call_per_step(counter, batch=3, branches=3)
    assert_changed(out, plain_sd15, "GuidersPAG")


def test_guiders_pag_on_a_latent_batch_of_two_is_one_call_of_six(guiders_pack, sd15_model) -> None:
    # Each chunk holds the whole latent batch: 3 branches x 2 latents.
    (pag_model,) = run_node("GuidersPAG", model=sd15_model, scale=3.0)

    _, counter = run_counted(pag_model, "sd15", batch=2)

    assert_one_call_per_step(counter, batch=6, branches=3)


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_pag_and_seg_share_one_call_of_four(guiders_pack, tiny_model, family: str) -> None:
    # PAG and SEG act on attention, on UNets and DiTs alike: each adds one chunk to the same call.
    model = tiny_model(family)
    (pag_model,) = run_node("GuidersPAG", model=model, scale=3.0)
    (pag_seg_model,) = run_node("GuidersSEG", model=pag_model, scale=3.0)

    out, counter = run_counted(pag_seg_model, family)
    plain, _ = run_counted(model, family)

    assert_one_call_per_step(counter, batch=4, branches=4)
    assert_changed(out, plain, f"GuidersPAG + GuidersSEG on {family}")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_guiders_pag_on_a_dit_is_one_call_of_three(guiders_pack, tiny_model, family: str) -> None:
    model = tiny_model(family)
    (pag_model,) = run_node("GuidersPAG", model=model, scale=3.0)

    out, counter = run_counted(pag_model, family)
    plain, _ = run_counted(model, family)

    assert_one_call_per_step(counter, batch=3, branches=3)
    assert_changed(out, plain, f"GuidersPAG on {family}")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_guiders_slg_is_one_call_of_three(guiders_pack, tiny_model, family: str) -> None:
    # The whole run inside the window (the node's default window covers only the first steps).
    model = tiny_model(family)
    (slg_model,) = run_node("GuidersSLG", model=model, scale=3.0, start_percent=0.0, end_percent=1.0)

    out, counter = run_counted(slg_model, family)
    plain, _ = run_counted(model, family)

    assert_one_call_per_step(counter, batch=3, branches=3)
    assert_changed(out, plain, "GuidersSLG")


def test_guiders_slg_at_scale_zero_adds_no_branch(guiders_pack, sd3_model) -> None:
    (slg_model,) = run_node("GuidersSLG", model=sd3_model, scale=0.0, start_percent=0.0, end_percent=1.0)

    _, counter = run_counted(slg_model, "sd3")

    assert batches_by_step(counter) == [[2]] * STEPS
    assert branch_sets(counter) == [{COND, UNCOND}] * STEPS


def test_guiders_pag_window_runs_its_branch_only_inside_the_window(guiders_pack, sd15_model) -> None:
    start_percent, end_percent = 0.5, 1.0
    (pag_model,) = run_node("GuidersPAG", model=sd15_model, scale=3.0, start_percent=start_percent,
                            end_percent=end_percent)
    model_sampling = sd15_model.get_model_object("model_sampling")
    sigma_start = float(model_sampling.percent_to_sigma(start_percent))
    sigma_end = float(model_sampling.percent_to_sigma(end_percent))
    step_sigmas = [float(s) for s in scheduler_sigmas(sd15_model, steps=STEPS)[:-1]]
    for sigma in step_sigmas:  # no step on a window edge, where the inclusive/exclusive choice would decide
        assert min(abs(sigma - sigma_start), abs(sigma - sigma_end)) > 1e-3 * sigma_start, step_sigmas
    inside = [sigma_end <= sigma <= sigma_start for sigma in step_sigmas]
    assert any(inside) and not all(inside), f"the window should split this run: {step_sigmas}, {sigma_start}"

    _, counter = run_counted(pag_model, "sd15")

    assert batches_by_step(counter) == [[3] if active else [2] for active in inside]
    for calls, active in zip(calls_by_step(counter), inside, strict=True):
        assert len(set(calls[0].cond_or_uncond)) == (3 if active else 2), calls


def test_guiders_pag_at_cfg_one_runs_cond_and_perturbed_only(guiders_pack, sd15_model) -> None:
    # PAG without CFG: the uncond is needed by no term, so it is not evaluated.
    (pag_model,) = run_node("GuidersPAG", model=sd15_model, scale=3.0)

    out, counter = run_counted(pag_model, "sd15", cfg=1.0)
    plain_cfg1, _ = run_counted(sd15_model, "sd15", cfg=1.0)

    assert batches_by_step(counter) == [[2]] * STEPS
    for call in counter.calls:
        assert COND in call.cond_or_uncond and UNCOND not in call.cond_or_uncond, call.cond_or_uncond
        assert len(set(call.cond_or_uncond)) == 2, call.cond_or_uncond
    assert_changed(out, plain_cfg1, "GuidersPAG at cfg 1")


def test_sequential_branch_mode_runs_one_call_per_branch_with_the_batched_result(
    guiders_pack, sd15_model, plain_sd15
) -> None:
    (batched_model,) = run_node("GuidersPAG", model=sd15_model, scale=3.0, branch_mode="batched")
    (sequential_model,) = run_node("GuidersPAG", model=sd15_model, scale=3.0, branch_mode="sequential")

    batched_out, _ = run_counted(batched_model, "sd15")
    sequential_out, counter = run_counted(sequential_model, "sd15")

    assert batches_by_step(counter) == [[1, 1, 1]] * STEPS
    for calls in calls_by_step(counter):
        indices = [call.cond_or_uncond for call in calls]
        assert all(len(i) == 1 for i in indices) and len({i[0] for i in indices}) == 3, indices
        assert {COND, UNCOND} <= {i[0] for i in indices}, indices
    # Same math, other batch sizes: only float32 rounding differs (measured ~3e-6 of the norm). Compared as
    # norms, since elementwise rtol is meaningless on the latent's near-zero entries.
    relative_difference = (sequential_out - batched_out).norm() / batched_out.norm()
    assert relative_difference < 1e-5, f"sequential differs from batched by {relative_difference:.2e} (relative)"
    assert_changed(sequential_out, plain_sd15, "sequential GuidersPAG")


def test_guiders_pag_through_sampler_custom_advanced_is_one_call_of_three(guiders_pack, sd15_model) -> None:
    # The other sampling path: the built-in CFGGuider on the patched model, sampled by SamplerCustomAdvanced.
    (pag_model,) = run_node("GuidersPAG", model=sd15_model, scale=3.0)
    positive, negative = make_conditioning("sd15", seed=1)
    guider = cfg_guider(pag_model, positive, negative, cfg=CFG)
    sigmas = scheduler_sigmas(sd15_model, steps=STEPS)

    with ForwardCounter(sd15_model) as counter:
        sample_custom_advanced(guider, make_latent("sd15", seed=2), "euler", sigmas, seed=3)

    assert_one_call_per_step(counter, batch=3, branches=3)


# ---------------------------------------------------------------------------------------------------------
# Steps that need fewer branches


@pytest.mark.parametrize("sampler_cfg", [5.0, 1.0])
def test_scheduled_cfg_skips_the_uncond_where_the_schedule_is_one(
    guiders_pack, sd15_model, sampler_cfg: float
) -> None:
    # The schedule, not the sampler's cfg, decides: also at sampler cfg 1 the steps at 7 run the uncond.
    values = [7.0, 7.0, 1.0, 1.0]
    (schedule,) = run_node("GuidersScheduleCustom", values=", ".join(str(v) for v in values))
    (scheduled_model,) = run_node("GuidersScheduledCFG", model=sd15_model, schedule=schedule)

    _, counter = run_counted(scheduled_model, "sd15", cfg=sampler_cfg)

    assert batches_by_step(counter) == [[1] if value == 1.0 else [2] for value in values]
    assert branch_sets(counter) == [{COND} if value == 1.0 else {COND, UNCOND} for value in values]


def test_guiders_guider_schedule_skips_the_uncond_where_it_is_one(guiders_pack, sd15_model) -> None:
    values = [7.0, 1.0, 7.0, 1.0]
    (schedule,) = run_node("GuidersScheduleCustom", values=", ".join(str(v) for v in values))
    positive, negative = make_conditioning("sd15", seed=1)
    (guider,) = run_node("GuidersGuider", model=sd15_model, positive=positive, negative=negative, cfg=CFG,
                         schedule=schedule)
    sigmas = scheduler_sigmas(sd15_model, steps=STEPS)

    with ForwardCounter(sd15_model) as counter:
        sample_custom_advanced(guider, make_latent("sd15", seed=2), "euler", sigmas, seed=3)

    assert batches_by_step(counter) == [[1] if value == 1.0 else [2] for value in values]


def test_cfg_zero_star_zero_init_steps_make_no_forward(guiders_pack, sd15_model) -> None:
    (zero_star_model,) = run_node("GuidersCFGZeroStar", model=sd15_model, zero_init_steps=2)

    _, counter = run_counted(zero_star_model, "sd15")

    assert batches_by_step(counter) == [[], [], [2], [2]]
    assert branch_sets(counter) == [{COND, UNCOND}] * 2


# ---------------------------------------------------------------------------------------------------------
# Branches that need a call of their own


@pytest.fixture(scope="module")
def weak_sd15(weak_model_of):
    # Same architecture, other weights: a distinct diffusion model, so its forwards are counted apart.
    return weak_model_of("sd15")


def test_autoguidance_runs_the_weak_model_in_its_own_call(guiders_pack, sd15_model, weak_sd15, plain_sd15) -> None:
    (guided_model,) = run_node("GuidersAutoguidance", model=sd15_model, weak_model=weak_sd15, scale=2.0)
    sigmas = scheduler_sigmas(sd15_model, steps=STEPS)

    out, main_counter, weak_counter = run_counted(guided_model, "sd15", counted=[weak_sd15])

    assert batches_by_step(main_counter) == [[2]] * STEPS
    assert branch_sets(main_counter) == [{COND, UNCOND}] * STEPS
    assert batches_by_step(weak_counter, sigmas) == [[1]] * STEPS
    assert_ran_at_the_step_sigmas(weak_counter, sigmas)
    assert_changed(out, plain_sd15, "GuidersAutoguidance")


def assert_ran_at_the_step_sigmas(counter: ForwardCounter, sigmas: torch.Tensor) -> None:
    """The model ran once at each of the run's step sigmas (the noise level the main model saw)."""
    ran_at = torch.tensor([call.sigma for call in counter.calls])
    torch.testing.assert_close(ran_at, sigmas[:-1].float(), rtol=1e-5, atol=0.0)


def test_guiders_sag_runs_the_degraded_uncond_after_the_main_call(guiders_pack, sd15_model, plain_sd15) -> None:
    (sag_model,) = run_node("GuidersSAG", model=sd15_model, scale=0.5)

    out, counter = run_counted(sag_model, "sd15")

    assert batches_by_step(counter) == [[2, 1]] * STEPS
    assert branch_sets(counter) == [{COND, UNCOND}, {0}] * STEPS
    assert_changed(out, plain_sd15, "GuidersSAG")


def test_builtin_sag_costs_the_same_calls(guiders_pack, sd15_model) -> None:
    (sag_model,) = run_node("SelfAttentionGuidance", model=sd15_model, scale=0.5, blur_sigma=2.0)

    _, counter = run_counted(sag_model, "sd15")

    assert batches_by_step(counter) == [[2, 1]] * STEPS
