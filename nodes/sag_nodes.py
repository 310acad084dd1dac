"""Self-Attention Guidance: a late branch that blurs the uncond where its attention is salient and runs the
uncond again on that input.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..guidance_core import perturb
from ..guidance_core.plan import (
    UNCOND,
)
from . import host
from .common import CATEGORY, SAG_FAMILIES, model_input, perturbation_node, public_id, schedule_input, window_inputs
from .inputs import check_inputs


def sag_branch(observer: host.AttentionPerturbation, blur_sigma: float):
    """SAG's degraded branch (Hong et al., ICCV 2023, Eq. 11-12): blur the uncond x0 where its attention is
    salient, re-noise it with the uncond's own noise, and run the uncond on that input. Returned relative
    to the step's input, so the term s·(uncond − branch) is s·(degraded − model(degraded input))."""

    def evaluate(call: host.LateCall):
        uncond_x0, x = call.preds[UNCOND], call.x
        attention = call.scratch.get(observer)
        if attention is None or min(x.shape[-2:]) <= 4:  # too small for the blur's padding, as ComfyUI's SAG
            return uncond_x0
        latent_hw = tuple(x.shape[-2:])
        mask = perturb.sag_attention_mask(attention, perturb.sag_grid_hw(attention.shape[-1], latent_hw), latent_hw)
        degraded = perturb.sag_blur(uncond_x0, mask, blur_sigma)
        degraded_input = degraded + x - uncond_x0
        (sag_x0,) = call.run_model(call.model, [call.conds[UNCOND]], degraded_input)
        return sag_x0 + (x - degraded_input)

    return host.LateBranch(evaluate, observe=observer, observe_branch=UNCOND, label="SAG")


class GuidersSAG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersSAG",
            display_name="Self-Attention Guidance (Guiders)",
            category=CATEGORY,
            description="SAG (Hong et al., ICCV 2023, arXiv:2210.00939): blurs the uncond prediction where the "
                        "middle block's self-attention is salient, runs the uncond again on it, and adds "
                        "s·(blurred − prediction). UNet models (SD1.5, SDXL); one extra forward per step.",
            inputs=[
                model_input(),
                io.Float.Input("scale", default=0.5, min=-2.0, max=5.0, step=0.01,
                               tooltip="s. SD1.5: 0.5-0.8 (diffusers default 0.75); SDXL 0.3-0.6."),
                io.Float.Input("blur_sigma", default=2.0, min=0.1, max=10.0, step=0.1,
                               tooltip="σ of the 9-tap blur of the salient regions (ComfyUI's default 2)."),
                *window_inputs(),
                schedule_input("SAG scale"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, blur_sigma, start_percent, end_percent, schedule=None) -> io.NodeOutput:
        check_inputs(cls, scale=scale, blur_sigma=blur_sigma, start_percent=start_percent, end_percent=end_percent)
        host.require_family(model, public_id(cls), SAG_FAMILIES)
        observer = host.AttentionPerturbation((host.Layer("middle", 0, 0),), perturb.record_attention, "SAG",
                                                 records=True)
        return io.NodeOutput(perturbation_node(
            model, public_id(cls), "sag", sag_branch(observer, blur_sigma), scale, schedule,
            start_percent, end_percent, "batched", source=UNCOND, positive=UNCOND))


NODES = [GuidersSAG]

