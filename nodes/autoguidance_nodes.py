"""Autoguidance: the guidance term against a weaker model of the same family.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..guidance_core.plan import (
    COND,
    Branch,
    perturbation_term,
)
from . import host
from .common import CATEGORY, model_input, public_id, scale_schedule, schedule_input, window_inputs
from .inputs import check_inputs


def weak_model_branch(key: str):
    """Autoguidance's branch: the weak model's prediction for the same input and condition."""

    def evaluate(call: host.LateCall):
        weak = call.extra_models[key]
        # The weak model's own options, with the run's sigmas so its step-dependent patches see the run.
        options = dict(weak.model_options)
        transformer_options = dict(options.get("transformer_options", {}))
        transformer_options["sample_sigmas"] = call.model_options.get("transformer_options", {}).get("sample_sigmas")
        options["transformer_options"] = transformer_options
        (weak_x0,) = call.run_model(weak.model, [call.conds[COND]], call.x, options)
        return weak_x0

    return host.LateBranch(evaluate, label="autoguidance")


class GuidersAutoguidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersAutoguidance",
            display_name="Autoguidance (Guiders)",
            category=CATEGORY,
            description="Autoguidance (Karras et al., NeurIPS 2024, arXiv:2406.02507): adds s·(cond − weak), "
                        "where weak is a smaller or less-trained model of the same family run on the same "
                        "input and prompt. One extra forward per step, on the weak model.",
            inputs=[
                model_input(),
                io.Model.Input("weak_model", tooltip="The 'bad version' of the model: same family and latent "
                                                     "space, fewer parameters or fewer training steps."),
                io.Float.Input("scale", default=2.0, min=0.0, max=100.0, step=0.01,
                               tooltip="s (the paper's w − 1). 1-3 is typical."),
                *window_inputs(),
                schedule_input("autoguidance scale"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, weak_model, scale, start_percent, end_percent, schedule=None) -> io.NodeOutput:
        check_inputs(cls, scale=scale, start_percent=start_percent, end_percent=end_percent)
        family, weak_family = host.model_family(model), host.model_family(weak_model)
        if family != weak_family:
            raise host.GuidanceError(f"{public_id(cls)}: weak_model is a {weak_family} model but model is "
                                        f"{family}; both must be the same family.")
        ours, theirs = host.input_signature(model), host.input_signature(weak_model)
        differences = "; ".join(f"{key} {theirs.get(key)} instead of {ours.get(key)}"
                                for key in dict.fromkeys([*ours, *theirs]) if ours.get(key) != theirs.get(key))
        if differences:  # e.g. an SD1.5 weak model for an SDXL model: same UNet family, other inputs
            raise host.GuidanceError(f"{public_id(cls)}: weak_model takes other inputs than model ({differences}); "
                                     "the weak model must be a smaller or less-trained version of the same model "
                                     "type (e.g. an SDXL model for SDXL), run on the same latent and prompt.")
        window = host.percent_window(start_percent, end_percent)
        key = f"weak{id(weak_model)}"

        def update(stack):
            name = stack.unique_name("autoguidance")
            term = perturbation_term(name, name, scale_schedule(scale, schedule), window)
            return stack.with_term(term, Branch(name, source=COND, perturbation=weak_model_branch(key)))

        return io.NodeOutput(host.add_guidance(model, public_id(cls), update, extra_models=[(key, weak_model)]))


NODES = [GuidersAutoguidance]

