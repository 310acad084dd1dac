"""PLADIS (Kim & Sim, ICCV 2025, arXiv:2503.07677): the text cross-attention's softmax map extrapolated toward a
sparse α-entmax map, inside every forward: no extra branch, no extra model call. The math is
``guidance_core.pladis``; the plumbing ``nodes/host/pladis.py``.
"""

from __future__ import annotations

from comfy_api.latest import io

from . import host
from .common import CATEGORY, family_names, model_input, schedule_input, window_inputs
from .host import families
from .host.pladis import PladisSetup, install_pladis
from .inputs import check_inputs, public_id

PLADIS_FAMILIES = families.families_supporting(families.PLADIS)

SCALE_TOOLTIP = ("λ, the paper's scale: A = A_softmax + λ(A_sparse − A_softmax) in every chosen text "
                 "cross-attention. The authors' README: 'we generally fix it to 1.5 and 2.0' (SD1.5, SDXL); "
                 "pamparamm's PLADIS node: 2.0. Wan, LTXV: no published value, start at 1-2. 0 = off.")
ALPHA_TOOLTIP = ("α of the sparse map α-entmax: 1.5 = entmax1.5 (the paper's default), 2 = sparsemax (sparser). "
                 "Between: α-entmax by bisection; 1 = softmax (no effect).")
LAYERS_TOOLTIP = ("Which text cross-attention layers: 'auto' = every one (as the paper; pamparamm's node uses the "
                  "UNet's input and output blocks only: 'input.1, input.2, ..., output.11'). Or a list: UNet "
                  "'input.4', 'middle', 'output.1', 'input.4.1' (block, index, transformer); Wan, LTXV '0, 1, 2' "
                  "(blocks).")


class GuidersPLADIS(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersPLADIS",
            display_name="PLADIS sparse cross-attention (Guiders)",
            category=CATEGORY,
            description="PLADIS (Kim & Sim, ICCV 2025, arXiv:2503.07677): in the text cross-attention, the "
                        "softmax attention map is extrapolated toward a sparse α-entmax map, A_softmax + "
                        "λ(A_sparse − A_softmax), on every row (cond and uncond). It changes the model, not a "
                        "branch: no extra model call, and it works at cfg 1. Families: "
                        + family_names(PLADIS_FAMILIES) + " (the other families' cross-attention is computed "
                        "where the node cannot see its attention map).",
            inputs=[
                model_input(),
                io.Float.Input("scale", default=2.0, min=0.0, max=10.0, step=0.01, tooltip=SCALE_TOOLTIP),
                io.Float.Input("alpha", default=1.5, min=1.0, max=2.0, step=0.01, tooltip=ALPHA_TOOLTIP),
                io.String.Input("layers", default="auto", tooltip=LAYERS_TOOLTIP),
                *window_inputs(),
                schedule_input("PLADIS scale λ"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, alpha, layers, start_percent, end_percent, schedule=None):
        node = public_id(cls)
        check_inputs(cls, scale=scale, alpha=alpha, layers=layers, start_percent=start_percent,
                     end_percent=end_percent)
        family = host.require_family(model, node, PLADIS_FAMILIES)
        chosen = None
        if layers.strip().lower() not in ("", "auto"):
            chosen = host.parse_layers(layers, model, f"{node}: layers", families.NAG)
        patched = model.clone()
        install_pladis(patched, PladisSetup(float(scale), float(alpha), host.percent_window(start_percent, end_percent),
                                            family, schedule, chosen, node))
        return io.NodeOutput(patched)


NODES = [GuidersPLADIS]
