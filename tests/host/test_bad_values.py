"""Issue #10 item 6: a bad value that ComfyUI's own validation lets through stops at the node that was given
it, with a message naming the node and the input, instead of reaching the math (NaN latents) or silently
turning a term off. Whole prompts through the real validator and executor (tests/host/prompts.py).

Every test here fails on the code before the fix (commit afd43b9, run with these files copied in): most
cases ran to the end with NaN latents, or (SLG's rescale: NaN is not > 0) a finite latent with the term
silently off; SEG's NaN blur_sigma failed inside the sampler, not at the node; a NaN schedule value or
window failed in guidance_core with a message naming neither the node nor its input (``Constant.value``);
``1e300`` in a custom schedule passed validation; ``layers = ",,,"`` ran PAG as plain CFG with an extra chunk.
"""

from __future__ import annotations

import re

import pytest
from prompts import INF, NAN, SAMPLER, TESTED, new_executor, node_prompt, run


@pytest.fixture(scope="module")
def executor(registry):
    return new_executor()


def assert_refused_at_the_node(outcome, node_id: str, input_name: str) -> None:
    assert not outcome.succeeded, f"{node_id}.{input_name}: the prompt ran to the end"
    if outcome.invalid is not None:  # ComfyUI's validation (or the node's validate_inputs) refused it
        assert re.search(rf"\b{re.escape(input_name)}\b", outcome.error_text), outcome.error_text
        return
    assert outcome.failed_node == TESTED, f"failed at node {outcome.failed_node}, not the Guiders node: " \
                                          f"{outcome.message}"
    assert node_id in outcome.message and re.search(rf"\b{re.escape(input_name)}\b", outcome.message), \
        outcome.message
    assert SAMPLER not in outcome.executed  # nothing was sampled with it


# The inputs the issue names, each as a JSON body to /prompt can send it (a literal NaN; ComfyUI's max check
# stops a literal inf, so inf arrives through a link, as a math node wired into the widget would send it).
ISSUE_CASES = [
    ("GuidersRescaleCFG", "multiplier", NAN, False),
    ("GuidersAPG", "eta", NAN, False),
    ("GuidersAPG", "momentum", NAN, False),
    ("GuidersAPG", "norm_threshold", NAN, False),
    ("GuidersAPG", "norm_threshold", INF, True),
    ("GuidersSLG", "rescale", NAN, False),
    ("GuidersGuider", "cfg", NAN, False),
    ("GuidersGuider", "cfg", INF, True),
    ("GuidersPAG", "scale", NAN, False),
    ("GuidersPAG", "scale", INF, True),
    ("GuidersSEG", "scale", NAN, False),
    ("GuidersSEG", "blur_sigma", NAN, False),
    ("GuidersSAG", "scale", NAN, False),
    ("GuidersSAG", "blur_sigma", NAN, False),
    ("GuidersSLG", "scale", NAN, False),
    ("GuidersAutoguidance", "scale", NAN, False),
    ("GuidersScheduleConstant", "value", NAN, False),
    ("GuidersScheduleCosine", "k_decay", NAN, False),
    ("GuidersPAG", "start_percent", NAN, False),
]


@pytest.mark.parametrize(("node_id", "input_name", "value", "linked"), [
    pytest.param(*case, id=f"{case[0]}-{case[1]}-{case[2]}{'-linked' if case[3] else ''}") for case in ISSUE_CASES])
def test_a_nan_or_inf_widget_value_is_refused_at_the_node(registry, executor, recorded, node_id, input_name, value,
                                                          linked) -> None:
    # Catches the check of this input removed from the node's check_inputs call (shown on a copy for
    # GuidersRescaleCFG.multiplier: the prompt then ran and gave a NaN latent).
    prompt = node_prompt(node_id, registry[node_id], {input_name: value},
                         linked=frozenset({input_name}) if linked else frozenset())
    assert_refused_at_the_node(run(executor, prompt, recorded), node_id, input_name)


@pytest.mark.parametrize("values", ["7.5, 1e300, 3", "-1e300", "7, 101"])
def test_a_custom_schedule_beyond_the_value_range_is_refused_before_anything_runs(registry, executor, recorded,
                                                                                  values: str) -> None:
    # Catches the range check dropped from GuidersScheduleCustom.custom_values: 1e300 is finite, so it
    # passed, and as a CFG scale it overflowed the sampled latent to NaN.
    outcome = run(executor, node_prompt("GuidersScheduleCustom", registry["GuidersScheduleCustom"],
                                        {"values": values}), recorded)
    assert outcome.invalid is not None, "ComfyUI's validation (the node's validate_inputs) let it through"
    assert "values" in outcome.error_text and "from -100 to 100" in outcome.error_text, outcome.error_text


@pytest.mark.parametrize(("node_id", "layers"), [("GuidersPAG", ",,,"), ("GuidersSEG", " , \n,"),
                                                 ("GuidersSLG", ",")])
def test_a_layers_text_that_names_no_layer_is_refused_with_the_choices(registry, executor, recorded, node_id,
                                                                       layers: str) -> None:
    # Catches parse_layers returning an empty selection (the node then ran as plain CFG plus a wasted chunk).
    outcome = run(executor, node_prompt(node_id, registry[node_id], {"layers": layers}), recorded)
    assert_refused_at_the_node(outcome, node_id, "layers")
    choices = "middle" if node_id != "GuidersSLG" else "double.0, double.1"
    assert "names no layer" in outcome.message and choices in outcome.message, outcome.message


def test_the_good_prompts_run(registry, executor, recorded) -> None:
    # The refusals above mean nothing if these prompts could not run at all.
    for node_id in sorted({case[0] for case in ISSUE_CASES} | {"GuidersScheduleCustom"}):
        outcome = run(executor, node_prompt(node_id, registry[node_id]), recorded)
        assert outcome.succeeded, f"{node_id}: {outcome.error_text}"


def test_a_linked_custom_schedule_text_runs(registry, executor, recorded) -> None:
    # ComfyUI validates a linked input before its source has run, handing validate_inputs None: refusing that
    # would refuse every custom schedule fed from a text node. Catches validate_inputs checking None.
    outcome = run(executor, node_prompt("GuidersScheduleCustom", registry["GuidersScheduleCustom"],
                                        {"values": "7, 5, 3"}, linked=frozenset({"values"})), recorded)
    assert outcome.succeeded, outcome.error_text
