"""Guidance without a trained unconditional: TPG (shuffled tokens), TSG (a noised time-step embedding) and ICG
(an input-independent condition). The math is in guidance_core/condition_free.py.
"""

from __future__ import annotations

from comfy_api.latest import io

from . import host
from .common import (
    CATEGORY,
    TPG_FAMILIES,
    branch_mode_input,
    family_names,
    model_input,
    perturbation_node,
    public_id,
    schedule_input,
    window_inputs,
)
from .host import families
from .inputs import check_inputs

TPG_LAYERS_TOOLTIP = ("Blocks whose input tokens are shuffled. 'auto' = " + families.recommended_summary(families.TPG)
                      + ". Or a list: UNet 'input.7', 'input.7.2' (block, index, transformer); DiT '7, 8' "
                        "(joint/double/main blocks), 'double.1', 'single.2'.")


class GuidersTPG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersTPG",
            display_name="Token Perturbation Guidance (Guiders)",
            category=CATEGORY,
            description="TPG (Rajabi et al. 2025, arXiv:2506.10036): adds s·(cond − perturbed), where the perturbed "
                        "branch shuffles the image tokens entering the chosen blocks (one random permutation per "
                        "block and step, seeded), a norm-preserving perturbation that needs no text. Batched with "
                        "cond and uncond in one forward. Families: " + family_names(TPG_FAMILIES) + ".",
            inputs=[
                model_input(),
                io.Float.Input("scale", default=3.0, min=0.0, max=100.0, step=0.01,
                               tooltip="s. The authors: 3 on SDXL (with cfg off or on); SD1.5/SDXL 1-5. DiTs (SD3, "
                                       "Flux, Wan): no published value, start at 1-3."),
                io.String.Input("layers", default="auto", tooltip=TPG_LAYERS_TOOLTIP),
                *window_inputs(),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, optional=True,
                             tooltip="Seed of the token permutations (the same seed gives the same images)."),
                schedule_input("TPG scale"),
                branch_mode_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, layers, start_percent, end_percent, seed=0, schedule=None,
                branch_mode="batched"):
        node = public_id(cls)
        check_inputs(cls, scale=scale, layers=layers, start_percent=start_percent, end_percent=end_percent,
                     seed=seed, branch_mode=branch_mode)
        host.require_family(model, node, TPG_FAMILIES)
        chosen = host.parse_layers(layers, model, f"{node}: layers", families.TPG)
        shuffle = host.TokenShuffle(chosen, seed)
        return io.NodeOutput(perturbation_node(model, node, "tpg", shuffle, scale, schedule, start_percent,
                                                end_percent, branch_mode))


NODES = [GuidersTPG]
