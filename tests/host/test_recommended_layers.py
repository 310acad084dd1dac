"""What "auto" names, family by family, at the real models' depths, and what it names on a shallower model; the
tooltips that say so, with their sources.

The published settings (each checked in its source, cited in nodes/host/families.py):
- SD3 / SD3.5: PAG and SEG block 13, diffusers' StableDiffusion3PAGPipeline example
  (src/diffusers/pipelines/pag/pipeline_pag_sd_3.py: ``pag_applied_layers=["blocks.13"]`` on SD3 Medium; its
  constructor's default is ``"blocks.1"``); SLG 7, 8, 9 (Stability AI's SD3.5 reference).
- Wan 2.1: block 2, STGuidance (github.com/junhahyung/STGuidance) Wan2.1/pipeline.py
  ``skip_guidance_block_idxs=[2]``; HunyuanVideo: double block 2, STGuidance HunyuanVideo/inference.py
  ``stg_applied_layers_idx=[2]`` (diffusers' ``transformer_blocks``, the double-stream blocks).
- LTX-Video 2B (28 blocks): 19, Lightricks' LTX-Video configs/ltxv-2b-0.9.6-dev.yaml ``skip_block_list: [19]``
  (also 0.9, 0.9.1, 0.9.5) and STGuidance LTXVideo/inference.py; 13B (48 blocks): 28, configs/ltxv-13b-0.9.8-dev.yaml
  (as 0.9.7-dev) ``first_pass.skip_block_list`` [28] from σ 0.985 on (the earliest intervals skip
  [11, 25, 35, 39] and [22, 35, 39]; the second pass [27]; ComfyUI-LTXVideo's STGGuiderAdvanced defaults to 29).
- LTX-2 (48 blocks): 29 (tests/host/test_family_ltx2.py).
A model without the recommended block (the tiny test models, a distilled or smaller variant) takes the middle of
its own stack: all of a published choice or none of it.
"""

from __future__ import annotations

import sys

import pytest
from tiny_models import make_ltxv

PAG, SEG, SLG = "pag", "seg", "slg"
EVERY_METHOD = (PAG, SEG, SLG)


@pytest.fixture(scope="module")
def host(guiders_pack):
    return sys.modules[guiders_pack["GuidersPAG"].__module__.rsplit(".", 1)[0] + ".host"]


def stack(double: int, single: int = 0) -> list:
    """The layers of a DiT with ``double`` main (joint/double) blocks and ``single`` single blocks, in the order
    layers.model_layers lists them."""
    from_host = sys.modules[next(name for name in sys.modules if name.endswith(".host.layers"))]
    return ([from_host.Layer("double", i) for i in range(double)]
            + [from_host.Layer("single", i) for i in range(single)])


REAL_DEPTHS = [
    # family, model, double blocks, single blocks, method, expected
    *[("sd3", "SD3 Medium", 24, 0, m, e) for m, e in ((PAG, ["13"]), (SEG, ["13"]), (SLG, ["7", "8", "9"]))],
    *[("sd3", "SD3.5 Large", 38, 0, m, e) for m, e in ((PAG, ["13"]), (SEG, ["13"]), (SLG, ["7", "8", "9"]))],
    *[("wan", name, depth, 0, m, ["2"]) for name, depth in (("Wan 2.1 1.3B", 30), ("Wan 2.1 14B", 40))
      for m in EVERY_METHOD],
    *[("hunyuan_video", "HunyuanVideo", 20, 40, m, ["double.2"]) for m in EVERY_METHOD],
    *[("ltxv", "LTX-Video 2B", 28, 0, m, ["19"]) for m in EVERY_METHOD],
    *[("ltxv", "LTX-Video 13B", 48, 0, m, ["28"]) for m in EVERY_METHOD],
    *[("ltxav", "LTX-2", 48, 0, m, ["29"]) for m in EVERY_METHOD],
]


@pytest.mark.parametrize(("family", "model", "double", "single", "method", "expected"), REAL_DEPTHS,
                         ids=[f"{c[1]}-{c[4]}" for c in REAL_DEPTHS])
def test_auto_names_the_published_layers_at_the_real_depth(host, family, model, double, single, method, expected):
    """Catches a record whose choice drifted from its source (SD3's constructor default blocks.1 instead of the
    example's blocks.13; Wan's former block 9; HunyuanVideo's former middle block) or a per-size choice for
    the wrong size."""
    assert host.layers.auto_layers(family, method, stack(double, single)) == expected


SHALLOW = [
    # family, double blocks, single blocks, method, expected: the middle of the model's stack
    ("sd3", 2, 0, PAG, ["double.1"]),  # the tiny SD3
    ("sd3", 8, 0, SLG, ["double.4"]),  # has block 7 but not 8 or 9: none of the choice, the middle
    ("wan", 2, 0, SLG, ["double.1"]),
    ("hunyuan_video", 2, 2, PAG, ["single.0"]),  # the tiny HunyuanVideo: no double block 2
    ("ltxv", 3, 0, SEG, ["double.1"]),
    ("ltxv", 18, 0, SLG, ["double.9"]),  # shallower than 2B's block 19
    ("ltxav", 3, 0, PAG, ["double.1"]),
]


@pytest.mark.parametrize(("family", "double", "single", "method", "expected"), SHALLOW,
                         ids=[f"{c[0]}-{c[1]}+{c[2]}-{c[3]}" for c in SHALLOW])
def test_a_model_without_the_recommended_block_takes_the_middle_of_its_stack(host, family, double, single, method,
                                                                             expected):
    """Catches keeping the part of a choice that exists (SD3's 7 alone on 8 blocks) and an "auto" that names a
    block the model lacks (the node would then fail on its own default)."""
    assert host.layers.auto_layers(family, method, stack(double, single)) == expected


def test_auto_on_real_models_resolves_through_the_nodes_layer_parser(host, tiny_model) -> None:
    # The integration: parse_layers("auto") on ComfyUI models, of SD3 Medium's and LTX-Video 2B's depth and tiny.
    cases = [(tiny_model("sd3_medium"), PAG, ["double.13"]), (tiny_model("sd3_medium"), SLG,
                                                              ["double.7", "double.8", "double.9"]),
             (tiny_model("sd3"), PAG, ["double.1"]), (make_ltxv(num_layers=28), SLG, ["double.19"]),
             (tiny_model("wan"), PAG, ["double.2"]), (tiny_model("hunyuan_video"), SLG, ["single.0"])]
    for model, method, expected in cases:
        assert [str(layer) for layer in host.parse_layers("auto", model, "layers", method)] == expected


SOURCES = {
    PAG: ["SD3/SD3.5 (MMDiT): 13 [diffusers' StableDiffusion3PAGPipeline example (pipeline_pag_sd_3.py): "
          "pag_applied_layers ['blocks.13']]",
          "Wan: 2 [STGuidance Wan2.1/pipeline.py: skip_guidance_block_idxs [2]]",
          "HunyuanVideo: double.2 [STGuidance HunyuanVideo/inference.py: stg_applied_layers_idx [2]",
          "LTXV (LTX-Video): 19 (2B), 28 (13B) [2B: Lightricks' LTX-Video configs/ltxv-2b-0.9.6-dev.yaml",
          "13B: Lightricks' LTX-Video configs/ltxv-13b-0.9.8-dev.yaml",
          "LTX-2 (audio-video): 29 [ComfyUI's LTXVSpatioTemporalGuidance"],
    SLG: ["SD3/SD3.5 (MMDiT): 7, 8, 9 [Stability AI's SD3.5 reference",
          "Wan: 2 [STGuidance", "HunyuanVideo: double.2 [STGuidance", "LTXV (LTX-Video): 19 (2B), 28 (13B) [2B:"],
}


@pytest.mark.parametrize("method", [PAG, SLG])
def test_the_tooltips_name_each_choice_its_source_and_the_fallback(host, guiders_pack, method) -> None:
    """Catches a tooltip that lists layers without where they come from, or hides the shallow-model fallback."""
    summary = host.families.recommended_summary(method)
    for expected in SOURCES[method]:
        assert expected in summary, (expected, summary)
    assert summary.endswith(host.families.MISSING_BLOCK_FALLBACK)
    assert "Flux.2 (dev, Klein): the middle block" in summary  # no published value: no source claimed
    node_id = "GuidersPAG" if method == PAG else "GuidersSLG"
    tooltip = guiders_pack[node_id].INPUT_TYPES()["required"]["layers"][1]["tooltip"]
    assert summary in tooltip
