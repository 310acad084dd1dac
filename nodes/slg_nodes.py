"""Skip Layer Guidance / STG: the perturbed branch skips DiT blocks, their attention or MLP sublayers, or
turns their attention into the identity.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..guidance_core import perturb, rules
from ..guidance_core.plan import (
    COND,
    PostTransform,
)
from . import host
from .common import (
    BLOCK_FAMILIES,
    CATEGORY,
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

SLG_MODES = ["block", "attention", "feedforward", "attention_scores"]


class GuidersSLG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersSLG",
            display_name="Skip Layer Guidance / STG (Guiders)",
            category=CATEGORY,
            description="SLG (Stability AI, SD3.5) and STG (Hyung et al. 2024, arXiv:2411.18664): adds "
                        "s·(cond − perturbed), where the perturbed branch skips whole DiT blocks (block) or "
                        "turns their attention into the identity (attention_scores). Families: "
                        + family_names(BLOCK_FAMILIES) + ".",
            inputs=[
                model_input(),
                io.Float.Input("scale", default=3.0, min=0.0, max=100.0, step=0.01,
                               tooltip="s. SD3.5: 2.5-3 (reference: 2.5 on Medium); Flux 1-3; video DiTs (STG: Wan, "
                                       "LTXV, HunyuanVideo) ≤ 2."),
                io.String.Input("layers", default="auto",
                                tooltip="Blocks to skip. 'auto': " + families.recommended_summary(families.SLG)
                                        + ". Or '7, 8, 9', 'double.1', 'single.2'."),
                io.Combo.Input("mode", options=SLG_MODES, default="block",
                               tooltip="block: the block returns its inputs (SLG, STG-R). attention: the block's "
                                       "self/joint attention adds nothing (its residual passes through). "
                                       "feedforward: the block's MLP adds nothing. attention_scores: the block's "
                                       "attention returns V (STG-A, PAG-like). attention and feedforward are for "
                                       "SD3 joint blocks, Flux and HunyuanVideo double blocks, Wan and LTXV "
                                       "blocks."),
                *window_inputs(0.01, 0.2),
                io.Float.Input("rescale", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="STG's rescale: mixes in result·std(cond)/std(result) (whole tensor), only "
                                       "while SLG is active. 0 = off; STG uses 0.7."),
                schedule_input("SLG scale"),
                branch_mode_input(),
                target_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, layers, mode, start_percent, end_percent, rescale, schedule=None,
                branch_mode="batched", target="new branch"):
        check_inputs(cls, scale=scale, layers=layers, mode=mode, start_percent=start_percent,
                     end_percent=end_percent, rescale=rescale, branch_mode=branch_mode, target=target)
        host.require_family(model, public_id(cls), BLOCK_FAMILIES)
        chosen = host.parse_layers(layers, model, f"{public_id(cls)}: layers", families.SLG)
        if mode == "block":
            perturbation = host.BlockSkip(chosen, "SLG")
        elif mode == "attention_scores":
            # An attention perturbation: only where the family's attention can be perturbed (as PAG's).
            host.require_family(model, f"{public_id(cls)} mode 'attention_scores'", PAG_FAMILIES)
            perturbation = host.AttentionPerturbation(chosen, perturb.identity_all_attention, "SLG attention_scores")
        elif mode in ("attention", "feedforward"):
            diffusion_model = model.get_model_object("diffusion_model")
            for layer in chosen:  # fails now, naming the layer, rather than at the first step
                host.sublayer_modules(diffusion_model, host.model_family(model), layer, mode)
            perturbation = host.SublayerSkip(chosen, mode, f"SLG {mode}")
        else:
            raise host.GuidanceError(f"{public_id(cls)}: mode {mode!r} is not one of {', '.join(SLG_MODES)}.")
        def with_rescale(stack, slg_name):  # STG's rescale, only on the steps where this SLG term is active
            return stack.with_post(PostTransform(
                "slg_rescale", lambda guided, preds: rules.whole_tensor_rescale(guided, preds[COND], rescale),
                space="x0", while_term_active=slg_name))

        patched = perturbation_node(model, public_id(cls), "slg", perturbation, scale, schedule, start_percent,
                                    end_percent, branch_mode, target=target,
                                    with_term_added=with_rescale if rescale > 0 else None)
        return io.NodeOutput(patched)


NODES = [GuidersSLG]

