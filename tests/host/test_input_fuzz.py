"""Issue #10's fuzz test: every number and text input of every node in tests/host/node_table.py, given bad
values through ComfyUI's real validator and executor (whole prompts, tests/host/prompts.py), ends in an error
that names the input, at that node, before anything is sampled; and a batch of bad prompts leaves nothing
behind: the good prompt run after them, by the same executor in the same process, samples exactly
(torch.equal) the latent a fresh Python process sampled (prompts.sample_good_prompts_in_a_fresh_process: a
ComfyUI just started, its latents handed over in a safetensors file).

Bad numbers are sent through a link from a stand-in source with no range (a primitive or math node wired into
the widget), which ComfyUI does not range-check, so every one of them (NaN, ±inf, beyond the widget's min or
max, huge) must be caught by the node itself; texts are sent as typed or through a link. Hypothesis draws
the values, derandomized (the same examples every run) and without a database (nothing written to disk).

Shown to fail on copies of the fixed tree: with ``scale`` dropped from GuidersPAG's check_inputs call, or
``multiplier`` from GuidersRescaleCFG's (their examples then ran to NaN latents); with the empty-selection
check removed from parse_layers (PAG, SEG and SLG then sampled with ``layers = ","``); with the range check
of custom schedule values removed (``0.0, 101.0`` then ran); and with GuidersRescaleCFG changing its input
model in place before refusing a bad multiplier (the good prompt after the bad ones then differed from the
fresh run: the check that a bad prompt leaves nothing behind).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from node_table import NODE_IDS
from prompts import (
    SAMPLER,
    TESTED,
    new_executor,
    node_prompt,
    run,
    sample_good_prompts_in_a_fresh_process,
    widget_specs,
)

EXAMPLES = 20  # per input: about 40 inputs, so the file stays near a minute on a busy 2-core machine
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def shared_executor(registry):
    """One executor for the whole file, as the server has one: every bad prompt runs through it."""
    return new_executor()


@pytest.fixture(scope="module")
def fresh_latents(registry, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Each node's good prompt (its widget defaults), sampled in a fresh Python process (a ComfyUI just
    started) before any bad prompt ran here."""
    out_file = tmp_path_factory.mktemp("fresh") / "latents.safetensors"
    latents = sample_good_prompts_in_a_fresh_process(list(NODE_IDS), out_file)
    for node_id, latent in latents.items():
        assert torch.isfinite(latent).all(), f"{node_id}: the fresh process sampled a non-finite latent"
    return latents


def fuzzed_inputs(class_def: type) -> dict[str, tuple[str, dict]]:
    """``{name: (widget type, options)}`` of every number and text input of a node."""
    return {name: spec for name, spec in widget_specs(class_def).items() if spec[0] in ("FLOAT", "INT", "STRING")}


def _floats_outside(lo: float, hi: float):
    finite = {"allow_nan": False, "allow_infinity": False}
    return st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300]),
                     st.floats(max_value=lo, **finite).filter(lambda value: value < lo),
                     st.floats(min_value=hi, **finite).filter(lambda value: value > hi))


def _ints_outside(lo: int, hi: int):
    return st.one_of(st.integers(max_value=lo - 1), st.integers(min_value=hi + 1), st.just(10**30))


SEPARATORS = st.text(alphabet=", \t\n").map(lambda text: text + ",")  # blank alone is a valid "auto"


def _bad_layers():
    # No layer of any family starts with "x", and a bare number beyond the tiny models' blocks is unknown.
    return st.one_of(SEPARATORS, st.text().map(lambda text: "x" + text), st.integers(min_value=40).map(str),
                     st.just("middle, banana"), st.just("input.1.9"))


def _bad_schedule_values():
    bad_number = st.one_of(st.sampled_from(["nan", "inf", "-inf", "1e309", "1e300"]),
                           st.floats(min_value=100.0, exclude_min=True, allow_infinity=False).map(repr),
                           st.floats(max_value=-100.0, exclude_max=True, allow_infinity=False).map(repr),
                           st.text().map(lambda text: "a" + text))
    good_number = st.floats(min_value=-100.0, max_value=100.0).map(repr)
    return st.one_of(st.text(alphabet=", \t\n"), st.builds(lambda good, bad: f"{good}, {bad}", good_number, bad_number))


def bad_values(name: str, kind: str, info: dict):
    if kind == "FLOAT":
        return _floats_outside(info["min"], info["max"])
    if kind == "INT":
        return _ints_outside(info["min"], info["max"])
    return _bad_layers() if name == "layers" else _bad_schedule_values()


def names_input(text: str, name: str) -> bool:
    # "scale" must not be found inside "rescale", nor "values" in "value": the input's own name, whole.
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", text) is not None


def test_every_number_and_text_input_is_fuzzed(registry) -> None:
    # The fuzz below is only as complete as its list: the inputs the issue names are on it.
    fuzzed = {(node_id, name) for node_id in NODE_IDS for name in fuzzed_inputs(registry[node_id])}
    for expected in [("GuidersRescaleCFG", "multiplier"), ("GuidersAPG", "momentum"), ("GuidersSLG", "rescale"),
                     ("GuidersGuider", "cfg"), ("GuidersSEG", "blur_sigma"), ("GuidersPAG", "layers"),
                     ("GuidersScheduleCustom", "values"), ("GuidersCFGZeroStar", "zero_init_steps"),
                     ("GuidersScheduleCosine", "k_decay"), ("GuidersAutoguidance", "end_percent")]:
        assert expected in fuzzed, expected


def fuzz_input(executor, recorded: dict, node_id: str, class_def: type, name: str, kind: str, info: dict) -> int:
    """Run EXAMPLES bad values of one input; each must be refused naming it. Returns how many ran."""
    seen = []

    @FUZZ_SETTINGS
    @given(value=bad_values(name, kind, info), linked=st.booleans() if kind == "STRING" else st.just(True))
    def refused(value, linked) -> None:
        prompt = node_prompt(node_id, class_def, {name: value}, linked=frozenset({name}) if linked else frozenset())
        outcome = run(executor, prompt, recorded)
        seen.append(value)
        assert not outcome.succeeded, f"{node_id}.{name} = {value!r} ran to the end"
        assert names_input(outcome.error_text, name), f"{node_id}.{name} = {value!r}: {outcome.error_text}"
        if outcome.invalid is None:  # not refused by validation: by the node itself, before sampling
            assert outcome.failed_node == TESTED, f"{node_id}.{name} = {value!r} failed at {outcome.failed_node}"
            assert node_id in outcome.message and SAMPLER not in outcome.executed, outcome.message

    refused()
    return len(seen)


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_bad_values_are_refused_naming_the_input_and_leave_nothing_behind(
        registry, shared_executor, fresh_latents, recorded, node_id: str) -> None:
    class_def = registry[node_id]
    fresh = fresh_latents[node_id]
    for name, (kind, info) in fuzzed_inputs(class_def).items():
        ran = fuzz_input(shared_executor, recorded, node_id, class_def, name, kind, info)
        assert ran >= EXAMPLES // 2, f"{node_id}.{name}: only {ran} examples ran"

    after = run(shared_executor, node_prompt(node_id, class_def), recorded)
    assert after.latent is not None, after.error_text
    assert SAMPLER in after.executed, "the good prompt came from the cache: the comparison would prove nothing"
    assert torch.equal(after.latent, fresh), f"{node_id}: the latent after bad prompts differs from a fresh run"
