"""Bad inputs fail when the node runs (or when ComfyUI validates the prompt), with a message that says what
was wrong and what the valid choices are, never later inside a sampler and never silently.

Host behaviour these tests depend on (ComfyUI 0.8.0, execution.py): an exception raised by a node's
``execute`` propagates out of ``_async_map_node_over_list`` (the executor reports it for that node); a V3
node's ``validate_inputs`` runs in ``execution.validate_inputs`` before anything executes, and a string it
returns becomes a ``custom_validation_failed`` error whose ``details`` carry that string. V3 node classes
run as a locked clone of the class (its ``__name__`` is not the node id).
"""

from __future__ import annotations

import asyncio
import re

import pytest
from harness import run_node

# The layers of the tiny models (tests/host/tiny_models.py): the SD1.5 UNet has spatial transformers in
# input blocks 1 and 3 (channel_mult [1, 2], one res block per level), the middle block and all four output
# blocks; SD3 has 2 joint blocks; Flux 2 double and 2 single blocks.
LAYERS = {
    "sd15": ["input.1", "input.3", "middle", "output.0", "output.1", "output.2", "output.3"],
    "sd3": ["double.0", "double.1"],
    "flux": ["double.0", "double.1", "single.0", "single.1"],
}
UNET_NAME = "UNet (SD1.5, SD2, SDXL)"
DIT_NAMES = ("SD3/SD3.5 (MMDiT)", "Flux", "Wan")


@pytest.fixture(autouse=True)
def _pack(guiders_pack):
    return guiders_pack


@pytest.mark.parametrize(
    ("node_id", "family", "bad_layer", "inputs"),
    [
        pytest.param("GuidersPAG", "sd15", "input.99", {}, id="PAG-sd15-input.99"),
        pytest.param("GuidersPAG", "sd15", "banana", {}, id="PAG-sd15-banana"),
        pytest.param("GuidersSEG", "sd15", "output.9", {}, id="SEG-sd15-output.9"),
        pytest.param("GuidersPAG", "sd3", "banana", {}, id="PAG-sd3-banana"),
        pytest.param("GuidersSEG", "sd3", "single.0", {}, id="SEG-sd3-single.0"),
        pytest.param("GuidersSLG", "sd3", "7", {}, id="SLG-sd3-7"),
        pytest.param("GuidersSLG", "flux", "double.99", {}, id="SLG-flux-double.99"),
        pytest.param("GuidersSLG", "flux", "single.5", {"mode": "attention_scores"}, id="SLG-flux-single.5"),
        pytest.param("GuidersPAG", "flux", "double.99", {}, id="PAG-flux-double.99"),
    ],
)
def test_an_unknown_layer_lists_the_models_layers(tiny_model, node_id, family, bad_layer, inputs) -> None:
    model = tiny_model(family)

    with pytest.raises(ValueError) as raised:
        run_node(node_id, model=model, layers=f"{LAYERS[family][0]}, {bad_layer}", **inputs)

    message = str(raised.value)
    assert repr(bad_layer) in message, message
    for layer in LAYERS[family]:
        assert re.search(rf"(?<![\w.]){re.escape(layer)}(?![\w.])", message), f"{layer} not listed: {message}"


def test_a_transformer_index_out_of_range_says_how_many_the_block_has(sd15_model) -> None:
    with pytest.raises(ValueError, match=r"'input\.1\.3'.*1 transformers"):
        run_node("GuidersPAG", model=sd15_model, layers="input.1.3")


def validate(node_id: str, inputs: dict) -> tuple[bool, list]:
    """ComfyUI's own prompt validation of one node with literal inputs: (valid, errors)."""
    import execution

    prompt = {"1": {"class_type": node_id, "inputs": inputs}}
    valid, errors, _node = asyncio.run(execution.validate_inputs("test-prompt", prompt, "1", {}))
    return valid, errors


def test_custom_schedule_with_a_bad_token_fails_validation_naming_it() -> None:
    valid, errors = validate("GuidersScheduleCustom", {"values": "7, x, 3"})

    assert valid is False
    assert [e["type"] for e in errors] == ["custom_validation_failed"]
    assert "'x'" in errors[0]["details"] and "values" in errors[0]["details"], errors[0]["details"]


def test_custom_schedule_with_good_values_passes_validation() -> None:
    # The negative test above means nothing if validation rejected every input.
    valid, errors = validate("GuidersScheduleCustom", {"values": "7.5, 6\n4 3"})

    assert valid is True, errors


@pytest.mark.parametrize(
    ("node_id", "family", "supported"),
    [
        pytest.param("GuidersSAG", "flux", (UNET_NAME,), id="SAG-flux"),
        pytest.param("GuidersSAG", "sd3", (UNET_NAME,), id="SAG-sd3"),
        pytest.param("GuidersSLG", "sd15", DIT_NAMES, id="SLG-sd15"),
    ],
)
def test_an_unsupported_family_is_refused_naming_the_supported_ones(tiny_model, node_id, family, supported) -> None:
    with pytest.raises(ValueError) as raised:
        run_node(node_id, model=tiny_model(family))

    message = str(raised.value)
    assert "not supported" in message, message
    for name in supported:
        assert name in message, f"{name!r} missing from: {message}"


@pytest.mark.parametrize(
    ("node_id", "family"),
    [pytest.param("GuidersSAG", "flux", id="SAG"), pytest.param("GuidersSLG", "sd15", id="SLG")],
)
def test_error_messages_name_the_node_by_its_id(tiny_model, node_id, family) -> None:
    # ComfyUI runs a V3 node as a locked clone of its class, whose __name__ is "<class name>Clone": a message
    # built from cls.__name__ would name a node the user never saw.
    with pytest.raises(ValueError) as raised:
        run_node(node_id, model=tiny_model(family))

    assert re.search(rf"\b{node_id}\b", str(raised.value)), str(raised.value)


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_seg_blur_sigma_zero_is_refused(tiny_model, family: str) -> None:
    with pytest.raises(ValueError, match="blur_sigma"):
        run_node("GuidersSEG", model=tiny_model(family), blur_sigma=0.0)


@pytest.mark.parametrize(
    ("node_id", "family", "inputs"),
    [
        pytest.param("GuidersPAG", "sd15", {}, id="PAG"),
        pytest.param("GuidersSEG", "sd15", {}, id="SEG"),
        pytest.param("GuidersSAG", "sd15", {}, id="SAG"),
        pytest.param("GuidersSLG", "sd3", {"layers": "1"}, id="SLG"),
        pytest.param("GuidersAutoguidance", "sd15", {"weak": True}, id="Autoguidance"),
    ],
)
def test_start_percent_after_end_percent_is_refused(tiny_model, node_id, family, inputs) -> None:
    model = tiny_model(family)
    inputs = dict(inputs)
    if inputs.pop("weak", False):
        inputs["weak_model"] = model
    with pytest.raises(ValueError, match=r"start_percent \(0\.6\).*end_percent \(0\.2\)"):
        run_node(node_id, model=model, start_percent=0.6, end_percent=0.2, **inputs)


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_every_listed_layer_name_reads_back_as_the_same_layer(tiny_model, family: str) -> None:
    # Catches a printed name that does not parse back to itself: the middle block printed as 'middle.0', which
    # typed back meant transformer 0 of the middle block only (1 of 10 on SDXL).
    model = tiny_model(family)
    with pytest.raises(ValueError) as raised:
        run_node("GuidersPAG", model=model, layers="banana")
    listing = str(raised.value).split("Its layers are: ")[1].split(" (or")[0].split(", ")
    assert listing == LAYERS[family]
    for name in listing:
        (patched,) = run_node("GuidersPAG", model=model, layers=name)
        replace_patches = patched.model_options["transformer_options"]["patches_replace"]
        keys = set(replace_patches.get("attn1", {})) | set(replace_patches.get("dit", {}))
        kind, _, index = name.partition(".")
        expected = ("middle", 0) if name == "middle" else (
            (f"{kind}_block", int(index)) if family != "sd15" else (kind, int(index)))
        assert expected in keys, f"{name!r} patched {keys}"


@pytest.mark.parametrize("node_id", ["GuidersSAG"])
def test_auraflow_is_refused_cleanly_and_never_taken_for_sd3(tiny_model, node_id: str) -> None:
    # AuraFlow's diffusion model is comfy.ldm.aura.mmdit.MMDiT, a class named like SD3's: matched by name, it was
    # taken for SD3 and failed with an AttributeError (no joint_blocks). Catches a family match by bare class name.
    # (PAG, SEG and SLG support AuraFlow through its own record: tests/host/test_family_blockpatch.py.)
    refusal = rf"{node_id}: this model's architecture \(AuraFlow\) is not supported"
    with pytest.raises(ValueError, match=refusal) as raised:
        run_node(node_id, model=tiny_model("auraflow"))
    assert "SD3" not in str(raised.value).split("is not supported")[0]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(("GuidersCFGZeroStar", {"zero_init_steps": 1}), ("GuidersAPG", {"eta": 0.0, "norm_threshold": 0.0,
                                                                                    "momentum": 0.0}),
                     id="CFGZeroStar-then-APG"),
        pytest.param(("GuidersAPG", {"eta": 0.0, "norm_threshold": 0.0, "momentum": 0.0}),
                     ("GuidersCFGNormalize", {"mode": "t_norm"}), id="APG-then-t_norm"),
        pytest.param(("GuidersCFGNormalize", {"mode": "full_norm"}), ("GuidersCFGZeroStar", {"zero_init_steps": 0}),
                     id="full_norm-then-CFGZeroStar"),
    ],
)
def test_two_cfg_rule_nodes_in_a_chain_raise_naming_both(sd15_model, first, second) -> None:
    # Catches the silent drop: the second rule node used to replace the first's rule and keep its leftovers
    # (CFG-Zero* then APG gave APG with CFG-Zero*'s zero init).
    (model,) = run_node(first[0], model=sd15_model, **first[1])
    with pytest.raises(ValueError) as raised:
        run_node(second[0], model=model, **second[1])
    assert first[0] in str(raised.value) and second[0] in str(raised.value), str(raised.value)


def test_a_second_cfg_schedule_in_a_chain_is_refused(sd15_model) -> None:
    (schedule,) = run_node("GuidersScheduleLinear", start_value=8.0, end_value=2.0)
    (model,) = run_node("GuidersScheduledCFG", model=sd15_model, schedule=schedule)
    with pytest.raises(ValueError, match="GuidersScheduledCFG: the CFG scale is already driven by a schedule"):
        run_node("GuidersScheduledCFG", model=model, schedule=schedule)


def test_post_transforms_still_stack_with_a_cfg_rule(sd15_model) -> None:
    (model,) = run_node("GuidersAPG", model=sd15_model, eta=0.0, norm_threshold=0.0, momentum=0.0)
    (model,) = run_node("GuidersRescaleCFG", model=model, multiplier=0.7)
    run_node("GuidersCFGNormalize", model=model, mode="base_norm")
