"""The node contract: public ids, and every node documented where a ComfyUI user looks (display name,
category under sampling/guiders, description, a tooltip on every input)."""

from __future__ import annotations

import pytest

NODE_IDS = [
    "GuidersScheduleConstant", "GuidersScheduleLinear", "GuidersScheduleCosine", "GuidersScheduleCustom",
    "GuidersScheduledCFG", "GuidersCFGNormalize", "GuidersRescaleCFG", "GuidersCFGZeroStar", "GuidersAPG",
    "GuidersPAG", "GuidersSEG", "GuidersSAG", "GuidersSLG", "GuidersAutoguidance", "GuidersGuider",
]


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
