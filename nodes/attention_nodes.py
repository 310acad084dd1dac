"""Attention-perturbation guidance: PAG (identity self-attention on the image tokens) and SEG (blurred
queries), on UNets and DiTs. The attention rules themselves are in guidance_core/perturb.py.
"""

from __future__ import annotations

from functools import partial

from comfy_api.latest import io

from ..guidance_core import perturb
from . import host
from .common import (
    ATTENTION_FAMILIES,
    CATEGORY,
    LAYERS_TOOLTIP,
    PAG_FAMILIES,
    branch_mode_input,
    family_names,
    model_input,
    perturbation_node,
    public_id,
    schedule_input,
    target_input,
    window_inputs,
)
from .host import families
from .inputs import check_inputs


class GuidersPAG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersPAG",
            display_name="Perturbed-Attention Guidance (Guiders)",
            category=CATEGORY,
            description="PAG (Ahn et al., ECCV 2024, arXiv:2403.17377): adds s·(cond − perturbed), where the "
                        "perturbed branch replaces the image tokens' self-attention map by the identity (text tokens "
                        "untouched). Batched with cond and uncond in one forward. Families: "
                        + family_names(PAG_FAMILIES) + ".",
            inputs=[
                model_input(),
                io.Float.Input("scale", default=3.0, min=0.0, max=100.0, step=0.01,
                               tooltip="s. SD1.5/SDXL: 2-5 (paper: 3 with cfg, 5 alone); SD3/Flux: 1-3; video "
                                       "DiTs (Wan, LTXV, HunyuanVideo): ≤ 2, as STG's identity-attention mode."),
                io.String.Input("layers", default="auto", tooltip=LAYERS_TOOLTIP),
                *window_inputs(),
                schedule_input("PAG scale"),
                branch_mode_input(),
                target_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, layers, start_percent, end_percent, schedule=None, branch_mode="batched",
                target="new branch"):
        check_inputs(cls, scale=scale, layers=layers, start_percent=start_percent, end_percent=end_percent,
                     branch_mode=branch_mode, target=target)
        host.require_family(model, public_id(cls), PAG_FAMILIES)
        chosen = host.parse_layers(layers, model, f"{public_id(cls)}: layers", families.PAG)
        perturbation = host.AttentionPerturbation(chosen, perturb.identity_image_attention, "PAG")
        return io.NodeOutput(perturbation_node(model, public_id(cls), "pag", perturbation, scale, schedule,
                                                start_percent, end_percent, branch_mode, target=target))


class GuidersSEG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersSEG",
            display_name="Smoothed Energy Guidance (Guiders)",
            category=CATEGORY,
            description="SEG (Hong, NeurIPS 2024, arXiv:2408.00760): adds s·(cond − perturbed), where the "
                        "perturbed branch Gaussian-blurs the image tokens' attention queries over the token grid "
                        "(non-square grids and text tokens handled; video frame by frame). Families: "
                        + family_names(ATTENTION_FAMILIES) + ".",
            inputs=[
                model_input(),
                io.Float.Input("scale", default=3.0, min=0.0, max=100.0, step=0.01,
                               tooltip="s. The paper uses 3 on SDXL; SD1.5 2-4; SD3/Flux 1-3; video DiTs (Wan, "
                                       "LTXV, HunyuanVideo): no published value, start at 1-2."),
                io.Float.Input("blur_sigma", default=10.0, min=0.1, max=99999.0, step=0.1,
                               tooltip="σ of the query blur, in tokens. Larger = stronger. ≥ 9999 means infinite "
                                       "(every query becomes the mean query); the paper's examples use 10-100."),
                io.String.Input("layers", default="auto", tooltip=LAYERS_TOOLTIP),
                *window_inputs(),
                schedule_input("SEG scale"),
                branch_mode_input(),
                target_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, blur_sigma, layers, start_percent, end_percent, schedule=None,
                branch_mode="batched", target="new branch"):
        check_inputs(cls, scale=scale, blur_sigma=blur_sigma, layers=layers, start_percent=start_percent,
                     end_percent=end_percent, branch_mode=branch_mode, target=target)
        host.require_family(model, public_id(cls), ATTENTION_FAMILIES)
        chosen = host.parse_layers(layers, model, f"{public_id(cls)}: layers", families.SEG)
        seg = partial(perturb.smoothed_energy_attention, blur_sigma=blur_sigma)
        return io.NodeOutput(perturbation_node(
            model, public_id(cls), "seg", host.AttentionPerturbation(chosen, seg, "SEG"),
            scale, schedule, start_percent, end_percent, branch_mode, target=target))


NODES = [GuidersPAG, GuidersSEG]

