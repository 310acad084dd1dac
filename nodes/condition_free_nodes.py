"""Guidance without a trained unconditional: TPG (shuffled tokens), TSG (a noised time-step embedding) and ICG
(an input-independent condition). The math is in guidance_core/condition_free.py.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..guidance_core import condition_free
from ..guidance_core.plan import UNCOND, ConditioningTransform
from . import host
from .common import (
    CATEGORY,
    TPG_FAMILIES,
    TSG_FAMILIES,
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
        family = host.model_family(model)
        if family not in TPG_FAMILIES:
            raise host.GuidanceError(
                f"{node}: this model's architecture ({families.display_name(family)}) is not supported: its forward "
                "offers no block replace patch whose input tokens the pack can shuffle for one branch (the pack "
                f"reaches it by forward hooks only, or not at all). {node} supports {family_names(TPG_FAMILIES)}.")
        chosen = host.parse_layers(layers, model, f"{node}: layers", families.TPG)
        shuffle = host.TokenShuffle(chosen, seed)
        return io.NodeOutput(perturbation_node(model, node, "tpg", shuffle, scale, schedule, start_percent,
                                                end_percent, branch_mode))


class GuidersTSG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersTSG",
            display_name="Time-Step Guidance (Guiders)",
            category=CATEGORY,
            description="TSG (Sadat et al., ICLR 2025, arXiv:2407.02687 §4): adds s·(cond − perturbed), where the "
                        "perturbed branch is the cond branch with Gaussian noise on its time-step embedding "
                        "(t_emb + noise_scale·std(t_emb)·n, fresh per step, seeded). Needs no prompt, so it also "
                        "guides at cfg 1. Batched with cond and uncond in one forward. Families: "
                        + family_names(TSG_FAMILIES) + ".",
            inputs=[
                model_input(),
                io.Float.Input("scale", default=2.0, min=0.0, max=100.0, step=0.01,
                               tooltip="s. No published value checked here (the authors' code is not public): "
                                       "start at 1-3 on SD1.5/SDXL with cfg, 2-5 at cfg 1; DiTs (SD3, Flux, Wan) 1-2."),
                io.Float.Input("noise_scale", default=1.0, min=0.0, max=20.0, step=0.01,
                               tooltip="The noise on the time-step embedding, in units of the embedding's own std: "
                                       "0 = no perturbation (the term vanishes); 0.5-2 is a usual range."),
                *window_inputs(),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, optional=True,
                             tooltip="Seed of the embedding noise (the same seed gives the same images)."),
                schedule_input("TSG scale"),
                branch_mode_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, noise_scale, start_percent, end_percent, seed=0, schedule=None,
                branch_mode="batched"):
        node = public_id(cls)
        check_inputs(cls, scale=scale, noise_scale=noise_scale, start_percent=start_percent, end_percent=end_percent,
                     seed=seed, branch_mode=branch_mode)
        family = host.model_family(model)
        if family not in TSG_FAMILIES:
            raise host.GuidanceError(
                f"{node}: this model's architecture ({families.display_name(family)}) is not supported: its family "
                "record names no time-step embedding module the pack can noise for one branch. "
                f"{node} supports {family_names(TSG_FAMILIES)}.")
        noise = host.TimeEmbeddingNoise(noise_scale, seed)
        return io.NodeOutput(perturbation_node(model, node, "tsg", noise, scale, schedule, start_percent,
                                                end_percent, branch_mode))


ICG_MODES = {"per step": False, "fixed": True}


class GuidersICG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersICG",
            display_name="Independent Condition Guidance (Guiders)",
            category=CATEGORY,
            description="ICG (Sadat et al., ICLR 2025, arXiv:2407.02687 §3): CFG whose negative is the model at a "
                        "condition independent of the input, a Gaussian text embedding of the negative prompt's "
                        "shape and scale (std(y)·n, seeded), instead of the trained unconditional. Replaces the "
                        "negative: no extra branch, the sampler's cfg is the scale (cfg 1 = off). Every family.",
            inputs=[
                model_input(),
                io.Combo.Input("mode", options=list(ICG_MODES), default="per step",
                               tooltip="per step: a new random condition at every step (v0xie's reading of the "
                                       "paper); fixed: one random condition for the whole run."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the random condition (the same seed gives the same images)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, mode, seed):
        node = public_id(cls)
        check_inputs(cls, mode=mode, seed=seed)

        def random_condition(embedding, t, state, ctx):
            return condition_free.independent_condition(embedding, state.draw(embedding, ctx.step))

        def update(stack):
            name = stack.unique_name("icg")
            return stack.with_conditioning(ConditioningTransform(
                name, random_condition, sources=(UNCOND,),
                make_state=lambda: condition_free.IndependentConditionState(seed, ICG_MODES[mode])))

        return io.NodeOutput(host.add_guidance(model, node, update))


NODES = [GuidersTPG, GuidersTSG, GuidersICG]
