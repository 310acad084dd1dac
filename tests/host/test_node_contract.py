"""The node contract: public ids, and every node documented where a ComfyUI user looks (display name,
category under sampling/guiders, description, a tooltip on every input), and a value-level test against an
independent reference for every node (tests/host/node_table.py names them)."""

from __future__ import annotations

from pathlib import Path

import pytest
from node_table import NODE_IDS, NODE_TABLE


def test_the_pack_registers_exactly_the_public_node_ids(guiders_pack) -> None:
    assert sorted(guiders_pack) == sorted(NODE_IDS)


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_every_node_and_input_is_documented(guiders_pack, node_id: str) -> None:
    schema = guiders_pack[node_id].define_schema()
    assert schema.node_id == node_id
    assert schema.display_name and schema.display_name != node_id
    assert schema.category.startswith("sampling/guiders")
    assert len(schema.description) > 20
    undocumented = [i.id for i in schema.inputs if not (i.tooltip or "").strip()]
    assert undocumented == [], f"{node_id}: inputs without a tooltip: {undocumented}"


@pytest.mark.parametrize("row", NODE_TABLE, ids=NODE_IDS)
def test_every_node_has_a_value_level_test_that_exists(row) -> None:
    assert row.value_tests, f"{row.node_id} has no value-level test against an independent reference"
    for test in row.value_tests:
        file_name, function = test.split("::")
        source = (Path(__file__).parent / file_name).read_text()
        assert f"def {function}(" in source, f"{row.node_id}: {test} does not exist"


@pytest.mark.parametrize("row", NODE_TABLE, ids=NODE_IDS)
def test_every_model_patching_node_has_an_effect_case(guiders_pack, row) -> None:
    # A node that returns a patched MODEL runs on the families it supports through its effect cases
    # (test_node_families, test_video_dits); a new node without one would be tested nowhere on a family.
    outputs = [output.io_type for output in guiders_pack[row.node_id].define_schema().outputs]
    if "MODEL" in outputs:
        assert row.effect_cases, f"{row.node_id} patches a model but has no effect case in node_table.py"
