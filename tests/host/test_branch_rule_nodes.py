"""The CFG rules that change which branches a step evaluates (GuidersCFGInterval, GuidersAdaptiveCutoff,
GuidersPerpNeg), through ComfyUI's real sampling on tiny SD1.5 and SD3 (a DiT) models, against references:
a plain model clone whose ``sampler_cfg_function`` applies the paper's definition, written here (interval,
adaptive guidance), or ComfyUI's PerpNeg / PerpNegGuider (Perp-Neg's whole-batch option, by value); and the
forwards they cost, counted with harness.ForwardCounter.

Host behaviour these tests depend on (ComfyUI 0.8.0 and 0.33.0, comfy/samplers.py and comfy_extras):
- ``sampler_cfg_function`` gets ``cond``/``uncond`` as noise predictions (x − x0) and ``cond_denoised`` /
  ``uncond_denoised`` as x0, ``sigma`` and ``model_options`` (with the run's ``sample_sigmas``);
- PerpNeg (nodes_perpneg.py) converts its empty prompt once, encodes it per step with ``encode_model_conds``
  as a negative prompt and evaluates it in a second calc_cond_batch call; its ``perp_neg`` takes one dot
  product and one norm over the whole batch, on x0; PerturbedAttentionGuidance adds s·(cond − perturbed) in a
  post-CFG hook, on x0;
- KSampler's normal schedule for the tiny SD1.5 (4 steps) is σ = 14.6, 2.92, 0.93, 0.029 and for the tiny SD3
  (flow, shift 3) t = 1.0, 0.858, 0.602, 0.009: the paper's interval (0.28, 5.42] (t ∈ (0.219, 0.844] on the
  flow model) holds the middle steps, not the first or last, on SD1.5, and only the third on SD3.

Breaks each test was shown to catch on a scratch copy: the interval window ignored (CFG everywhere) or the
flow conversion left out (σ bounds used as t) fails the interval parity; the uncond still evaluated outside the
interval or after the cut-off fails the forward counts; the cut-off state kept between runs (new_run_state
not called) fails the run-to-run test; the cut-off at the detecting step instead of the next fails the
adaptive parity; Perp-Neg's empty branch replaced by the uncond, or per_sample ignored, fails the PerpNeg
parities; the PAG term dropped from the stack, or the schedule ignored, fails the stacking tests.
"""

from __future__ import annotations

import comfy.model_sampling
import comfy.sampler_helpers
import comfy.samplers
import pytest
import torch
from harness import ForwardCounter, cfg_guider, run_node, sample, sample_custom_advanced, scheduler_sigmas
from support import CFG, STEPS, assert_parity, node
from support import sample_family as run
from tiny_models import make_conditioning, make_latent

DIT = "sd3"
FAMILIES = pytest.mark.parametrize("family", ["sd15", DIT])


@pytest.fixture(autouse=True)
def _pack(guiders_pack):
    return guiders_pack


def with_cfg_function(model, cfg_function):
    reference = model.clone()
    reference.set_model_sampler_cfg_function(cfg_function)
    return reference


def step_index(args: dict) -> tuple[int, int]:
    sample_sigmas = args["model_options"]["transformer_options"]["sample_sigmas"].float().cpu()
    sigma = float(args["sigma"].flatten()[0])
    return int(torch.argmin((sample_sigmas - sigma).abs())), len(sample_sigmas) - 1


def is_flow(model) -> bool:
    return isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)


def counted_run(model, family: str, cfg: float = CFG, batch: int = 1) -> tuple[torch.Tensor, ForwardCounter]:
    positive, negative = make_conditioning(family, seed=1)
    latent = make_latent(family, batch=batch, seed=2)
    with ForwardCounter(model) as counter:
        out = sample(model, positive, negative, latent, cfg=cfg, steps=STEPS, seed=3)
    return out, counter


def chunks_per_step(counter: ForwardCounter) -> list[list[tuple[int, ...]]]:
    """Per step, the branches (cond_or_uncond) of each forward call."""
    steps: list[list[tuple[int, ...]]] = [[] for _ in range(STEPS)]
    for call in counter.calls:
        steps[call.step].append(tuple(sorted(call.cond_or_uncond)))
    return steps


# ---------------------------------------------------------------------------------------------------------
# GuidersCFGInterval


def interval_reference(model, sigma_high: float, sigma_low: float, schedule=None):
    """Kynkäänniemi et al. 2024: u + w(c − u) for σ in (σ_lo, σ_hi], c elsewhere; σ the noise-to-signal
    ratio, which on a flow model (x = (1 − t)x0 + tε) is t / (1 − t)."""
    flow = is_flow(model)

    def interval_cfg(args):
        sigma = float(args["sigma"].flatten()[0])
        noise_to_signal = sigma / (1.0 - sigma) if flow and sigma < 1.0 else (float("inf") if flow else sigma)
        scale = args["cond_scale"] if schedule is None else schedule(*step_index(args))
        cond, uncond = args["cond"], args["uncond"]
        return uncond + scale * (cond - uncond) if sigma_low < noise_to_signal <= sigma_high else cond

    return with_cfg_function(model, interval_cfg)


@FAMILIES
def test_cfg_interval_matches_the_paper_in_sigma(tiny_model, family: str) -> None:
    model = tiny_model(family)
    ours = node("GuidersCFGInterval", model=model, mode="sigma", sigma_high=5.42, sigma_low=0.28)

    assert_parity(run(ours, family), run(interval_reference(model, 5.42, 0.28), family), run(model, family))


@FAMILIES
def test_cfg_interval_in_percent_matches_comfyui_percent_windows(tiny_model, family: str) -> None:
    model = tiny_model(family)
    sampling = model.get_model_object("model_sampling")
    high, low = float(sampling.percent_to_sigma(0.2)), float(sampling.percent_to_sigma(0.8))
    ours = node("GuidersCFGInterval", model=model, mode="percent", sigma_high=5.42, sigma_low=0.28,
                start_percent=0.2, end_percent=0.8)

    def percent_cfg(args):  # ComfyUI's windows include both ends: percent_to_sigma(end) ≤ σ ≤ percent_to_sigma(start)
        sigma = float(args["sigma"].flatten()[0])
        cond, uncond = args["cond"], args["uncond"]
        return uncond + args["cond_scale"] * (cond - uncond) if low <= sigma <= high else cond

    assert_parity(run(ours, family), run(with_cfg_function(model, percent_cfg), family), run(model, family))


@FAMILIES
def test_cfg_interval_evaluates_no_uncond_outside_the_interval(tiny_model, family: str) -> None:
    model = tiny_model(family)
    ours = node("GuidersCFGInterval", model=model, mode="sigma", sigma_high=5.42, sigma_low=0.28)
    _, plain = counted_run(model, family)
    _, counter = counted_run(ours, family)

    inside = {"sd15": [False, True, True, False], DIT: [False, False, True, False]}[family]
    assert chunks_per_step(plain) == [[(0, 1)]] * STEPS
    assert chunks_per_step(counter) == [[(0, 1)] if i else [(0,)] for i in inside]
    assert [call.batch_size for call in counter.calls] == [2 if i else 1 for i in inside]


@FAMILIES
def test_cfg_interval_with_a_schedule_and_pag_equals_the_documented_composition(tiny_model, family: str) -> None:
    """The composition: guided = cond + [inside: (w_k − 1)(cond − uncond)] + s·(cond − perturbed), with w_k the
    schedule's value at step k. Reference: ComfyUI's PerturbedAttentionGuidance (s·(cond − perturbed) after
    CFG) on the interval reference (SD1.5; on SD3, GuidersPAG's own value is tested in test_node_parity, so
    the reference there is GuidersPAG alone with the interval reference's CFG)."""
    model = tiny_model(family)
    schedule = node("GuidersScheduleLinear", start_value=8.0, end_value=2.0)
    ours = node("GuidersPAG", model=model, scale=3.0, layers="middle" if family == "sd15" else "auto")
    ours = node("GuidersCFGInterval", model=ours, mode="sigma", sigma_high=5.42, sigma_low=0.28, schedule=schedule)
    if family == "sd15":
        reference = node("PerturbedAttentionGuidance", model=interval_reference(model, 5.42, 0.28, schedule),
                         scale=3.0)
    else:
        reference = interval_reference(node("GuidersPAG", model=model, scale=3.0), 5.42, 0.28, schedule)
    plain_pag = node("GuidersPAG", model=model, scale=3.0, layers="middle" if family == "sd15" else "auto")

    assert_parity(run(ours, family), run(reference, family), run(plain_pag, family))


# ---------------------------------------------------------------------------------------------------------
# GuidersAdaptiveCutoff

# The tiny models' cos(cond, uncond) per step of plain CFG: SD1.5 0.916, 0.9966, 0.9994, 0.9997 (so 0.99, the
# paper's value, cuts after step 1, where CFG already changes little: 4e-3); SD3 0.689, 0.699, 0.729, 0.727.
# The thresholds below cut guidance after step 0 (SD1.5) and after step 1 (SD3).
CUTOFF_THRESHOLD = {"sd15": 0.9, DIT: 0.695}
CUTOFF_STEP = {"sd15": 0, DIT: 1}


def adaptive_reference(model, threshold: float, log: list | None = None, schedule=None):
    """Castillo et al. 2023, the AG policy, per sample on the noise predictions: CFG while not truncated; a step whose
    cos(ε_c, ε_u) exceeds the threshold truncates guidance from the next step of the run on."""
    truncated: dict[int, bool] = {}

    def adaptive_cfg(args):
        step, _ = step_index(args)
        if step == 0:
            truncated.clear()  # a new run
        cond, uncond = args["cond"], args["uncond"]
        scale = args["cond_scale"] if schedule is None else schedule(*step_index(args))
        out = []
        for i in range(cond.shape[0]):
            c, u = cond[i].double().flatten(), uncond[i].double().flatten()
            if truncated.get(i):
                out.append(cond[i])
                continue
            out.append(uncond[i] + scale * (cond[i] - uncond[i]))
            if float(c @ u / (c.norm() * u.norm())) > threshold:
                truncated[i] = True
        if log is not None:
            log.append(dict(truncated))
        return torch.stack(out)

    return with_cfg_function(model, adaptive_cfg)


@FAMILIES
def test_adaptive_cutoff_matches_the_paper(tiny_model, family: str) -> None:
    model = tiny_model(family)
    threshold = CUTOFF_THRESHOLD[family]
    ours = node("GuidersAdaptiveCutoff", model=model, threshold=threshold)
    log: list = []
    reference_out = run(adaptive_reference(model, threshold, log), family)

    assert [bool(entry.get(0)) for entry in log] == [k >= CUTOFF_STEP[family] for k in range(STEPS)]
    assert_parity(run(ours, family), reference_out, run(model, family))


@FAMILIES
def test_adaptive_cutoff_stops_evaluating_the_uncond(tiny_model, family: str) -> None:
    ours = node("GuidersAdaptiveCutoff", model=tiny_model(family), threshold=CUTOFF_THRESHOLD[family])
    _, counter = counted_run(ours, family)

    assert chunks_per_step(counter) == [[(0, 1)] if k <= CUTOFF_STEP[family] else [(0,)] for k in range(STEPS)]


def test_adaptive_cutoff_state_never_leaks_between_runs(sd15_model) -> None:
    """A run that cut guidance off does not start the next run cut off: the second run of the same patched
    model evaluates the uncond again on its first steps and gives the first run's result; a run on another
    latent in between changes neither."""
    ours = node("GuidersAdaptiveCutoff", model=sd15_model, threshold=CUTOFF_THRESHOLD["sd15"])
    first, first_counter = counted_run(ours, "sd15")
    positive, negative = make_conditioning("sd15", seed=1)
    other_latent = make_latent("sd15", seed=7)
    sample(ours, positive, negative, other_latent, cfg=CFG, steps=STEPS, seed=4)
    second, second_counter = counted_run(ours, "sd15")

    assert chunks_per_step(second_counter) == chunks_per_step(first_counter) == [[(0, 1)]] + [[(0,)]] * 3
    assert torch.equal(first, second)


def test_adaptive_cutoff_is_per_image_in_a_batch(sd15_model) -> None:
    """Each image of a batch gets what it would get alone (the reference is per sample), and the uncond runs
    until every image has stopped. At threshold 0.92 the batch of 3's cosines (step 0: 0.909, 0.929, 0.905;
    step 1: 0.996, 0.994, 0.997) stop image 1 after step 0 and the others after step 1."""
    ours = node("GuidersAdaptiveCutoff", model=sd15_model, threshold=0.92)
    positive, negative = make_conditioning("sd15", seed=1)
    latent = make_latent("sd15", batch=3, seed=2)
    log: list = []
    reference = adaptive_reference(sd15_model, 0.92, log)

    with ForwardCounter(sd15_model) as counter:
        got = sample(ours, positive, negative, latent, cfg=CFG, steps=STEPS, seed=3)
    want = sample(reference, positive, negative, latent, cfg=CFG, steps=STEPS, seed=3)
    plain = sample(sd15_model, positive, negative, latent, cfg=CFG, steps=STEPS, seed=3)
    assert log[0] == {1: True} and log[1] == {0: True, 1: True, 2: True}, log
    assert_parity(got, want, plain)
    assert chunks_per_step(counter) == [[(0, 1)], [(0, 1)], [(0,)], [(0,)]]


@FAMILIES
def test_adaptive_cutoff_with_a_schedule_and_pag_equals_the_documented_composition(tiny_model, family: str) -> None:
    """guided = cond + [until the cut-off: (w_k − 1)(cond − uncond)] + s·(cond − perturbed); the PAG term keeps
    running after the cut-off. References as in the interval's stacking test."""
    model = tiny_model(family)
    schedule = node("GuidersScheduleLinear", start_value=8.0, end_value=2.0)
    layers = "middle" if family == "sd15" else "auto"
    threshold = CUTOFF_THRESHOLD[family]
    ours = node("GuidersPAG", model=model, scale=3.0, layers=layers)
    ours = node("GuidersAdaptiveCutoff", model=ours, threshold=threshold, schedule=schedule)
    if family == "sd15":
        reference = node("PerturbedAttentionGuidance", model=adaptive_reference(model, threshold, schedule=schedule),
                         scale=3.0)
    else:
        reference = adaptive_reference(node("GuidersPAG", model=model, scale=3.0), threshold, schedule=schedule)
    plain_pag = node("GuidersPAG", model=model, scale=3.0, layers=layers)

    assert_parity(run(ours, family), run(reference, family), run(plain_pag, family))


# ---------------------------------------------------------------------------------------------------------
# GuidersPerpNeg


def empty_conditioning(family: str) -> list:
    """A stand-in for the empty prompt: a third conditioning of the family's shapes (own draw)."""
    return make_conditioning(family, seed=5)[0]


def perp_neg_reference(model, empty: list, neg_scale: float, schedule=None):
    """Armandpour et al. 2023, per image, on x0: the empty prompt evaluated as ComfyUI's PerpNeg does
    (converted once, encoded per step as a negative prompt, its own calc_cond_batch call)."""
    converted = comfy.sampler_helpers.convert_cond(empty)

    def perp_neg_cfg(args):
        x, sigma, inner = args["input"], args["sigma"], args["model"]
        encoded = comfy.samplers.encode_model_conds(inner.extra_conds, converted, x, x.device, "negative")
        (empty_x0,) = comfy.samplers.calc_cond_batch(inner, [encoded], x, sigma, args["model_options"])
        scale = args["cond_scale"] if schedule is None else schedule(*step_index(args))
        out = []
        for c, u, e in zip(args["cond_denoised"].double(), args["uncond_denoised"].double(), empty_x0.double(),
                           strict=True):
            positive, negative = c - e, u - e
            perpendicular = negative - (negative * positive).sum() / (positive * positive).sum() * positive
            out.append(e + scale * (positive - neg_scale * perpendicular))
        return x - torch.stack(out).to(x.dtype)

    return with_cfg_function(model, perp_neg_cfg)


def run_batch(model, family: str, batch: int) -> torch.Tensor:
    positive, negative = make_conditioning(family, seed=1)
    return sample(model, positive, negative, make_latent(family, batch=batch, seed=2), cfg=CFG, steps=STEPS, seed=3)


@FAMILIES
def test_perp_neg_whole_batch_equals_comfyui_perp_neg(tiny_model, family: str) -> None:
    # A batch of 2: the whole-batch projection mixes the images, as ComfyUI's does.
    model, empty = tiny_model(family), empty_conditioning(family)
    ours = node("GuidersPerpNeg", model=model, empty_conditioning=empty, neg_scale=1.5,
                projection="whole batch (ComfyUI PerpNeg)")
    builtin = node("PerpNeg", model=model, empty_conditioning=empty, neg_scale=1.5)

    assert_parity(run_batch(ours, family, 2), run_batch(builtin, family, 2), run_batch(model, family, 2))


@FAMILIES
def test_perp_neg_per_image_matches_the_paper_and_differs_from_the_whole_batch(tiny_model, family: str) -> None:
    model, empty = tiny_model(family), empty_conditioning(family)
    ours = node("GuidersPerpNeg", model=model, empty_conditioning=empty, neg_scale=1.5)
    builtin = node("PerpNeg", model=model, empty_conditioning=empty, neg_scale=1.5)
    per_image = run_batch(ours, family, 2)

    assert_parity(per_image, run_batch(perp_neg_reference(model, empty, 1.5), family, 2), run_batch(model, family, 2))
    whole_batch = run_batch(builtin, family, 2)
    assert float((per_image - whole_batch).abs().max() / whole_batch.abs().max()) > 1e-3
    # One image alone: the two projections are the same.
    assert_parity(run_batch(ours, family, 1), run_batch(builtin, family, 1), run_batch(model, family, 1))


def test_perp_neg_whole_batch_equals_perp_neg_guider(sd15_model) -> None:
    empty = empty_conditioning("sd15")
    positive, negative = make_conditioning("sd15", seed=1)
    latent = make_latent("sd15", batch=2, seed=2)
    sigmas = scheduler_sigmas(sd15_model, steps=STEPS)
    ours = node("GuidersPerpNeg", model=sd15_model, empty_conditioning=empty, neg_scale=1.5,
                projection="whole batch (ComfyUI PerpNeg)")
    (guider,) = run_node("PerpNegGuider", model=sd15_model, positive=positive, negative=negative,
                         empty_conditioning=empty, cfg=CFG, neg_scale=1.5)

    got = sample_custom_advanced(cfg_guider(ours, positive, negative, CFG), latent, "euler", sigmas, seed=3)
    want = sample_custom_advanced(guider, latent, "euler", sigmas, seed=3)
    plain = sample_custom_advanced(cfg_guider(sd15_model, positive, negative, CFG), latent, "euler", sigmas, seed=3)
    assert_parity(got, want, plain)


@FAMILIES
def test_perp_neg_runs_the_empty_prompt_in_the_one_batched_forward(tiny_model, family: str) -> None:
    model, empty = tiny_model(family), empty_conditioning(family)
    ours = node("GuidersPerpNeg", model=model, empty_conditioning=empty, neg_scale=1.0)
    builtin = node("PerpNeg", model=model, empty_conditioning=empty, neg_scale=1.0)
    _, counter = counted_run(ours, family)
    _, builtin_counter = counted_run(builtin, family)

    assert chunks_per_step(counter) == [[(0, 1, 2)]] * STEPS
    assert [call.batch_size for call in counter.calls] == [3] * STEPS
    assert len(builtin_counter.calls) == 2 * STEPS  # ComfyUI's: cond and uncond, then the empty prompt


@FAMILIES
def test_perp_neg_with_a_schedule_and_pag_equals_the_documented_composition(tiny_model, family: str) -> None:
    """guided = PerpNeg(cond, uncond, empty; w_k) + s·(cond − perturbed), with w_k the schedule's value."""
    model, empty = tiny_model(family), empty_conditioning(family)
    schedule = node("GuidersScheduleLinear", start_value=8.0, end_value=2.0)
    layers = "middle" if family == "sd15" else "auto"
    ours = node("GuidersPAG", model=model, scale=3.0, layers=layers)
    ours = node("GuidersPerpNeg", model=ours, empty_conditioning=empty, neg_scale=1.5, schedule=schedule)
    if family == "sd15":
        reference = node("PerturbedAttentionGuidance", model=perp_neg_reference(model, empty, 1.5, schedule),
                         scale=3.0)
    else:
        reference = perp_neg_reference(node("GuidersPAG", model=model, scale=3.0), empty, 1.5, schedule)
    plain_pag = node("GuidersPAG", model=model, scale=3.0, layers=layers)

    assert_parity(run(ours, family), run(reference, family), run(plain_pag, family))


def test_perp_neg_then_another_cfg_rule_is_an_error_naming_both(sd15_model) -> None:
    ours = node("GuidersPerpNeg", model=sd15_model, empty_conditioning=empty_conditioning("sd15"), neg_scale=1.0)
    with pytest.raises(Exception, match="GuidersAdaptiveCutoff.*GuidersPerpNeg"):
        node("GuidersAdaptiveCutoff", model=ours, threshold=0.99)
