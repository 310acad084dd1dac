"""What every guidance node shares: the category, the families each method supports (from the family
records), the common inputs (model, window, schedule, branch mode, target), and the recipe of a
perturbation node (a term s·(cond − perturbed) on a new branch, or the CFG's negative branch perturbed).
"""

from __future__ import annotations

from dataclasses import replace

from comfy_api.latest import io

from ..guidance_core.plan import (
    COND,
    UNCOND,
    Branch,
    CFGRule,
    CFGRuleConflict,
    perturbation_term,
)
from ..guidance_core.schedules import Constant
from . import host
from .host import families
from .inputs import public_id
from .schedule_nodes import Schedule

CATEGORY = "sampling/guiders"


# The families each method supports, from the family records (nodes/host/families.py).
PAG_FAMILIES = families.families_supporting(families.PAG)


ATTENTION_FAMILIES = families.families_supporting(families.SEG)  # SEG: a token grid per frame


BLOCK_FAMILIES = families.families_supporting(families.SLG)


SAG_FAMILIES = families.families_supporting(families.SAG)


TPG_FAMILIES = families.families_supporting(families.TPG)


TSG_FAMILIES = families.families_supporting(families.TSG)


def family_names(keys: tuple[str, ...]) -> str:
    """The families' display names, for a node's description (from the records, so it never drifts)."""
    return ", ".join(families.display_name(key) for key in keys)


LAYERS_TOOLTIP = ("Where to perturb. 'auto' = recommended for the model: " + families.recommended_summary(families.PAG)
                  + ". Or a list: UNet 'middle', 'input.4', 'output.1', 'input.4.1' (block, index, transformer); DiT "
                  "'7, 8, 9' (joint/double/main blocks), 'double.1', 'single.2' (Flux, HunyuanVideo). An unknown "
                  "layer lists the layers the model has.")


def model_input() -> io.Model.Input:
    return io.Model.Input("model", tooltip="The model to guide; a patched copy is returned, the input is unchanged.")


def window_inputs(start: float = 0.0, end: float = 1.0) -> list[io.Input]:
    return [
        io.Float.Input("start_percent", default=start, min=0.0, max=1.0, step=0.001,
                       tooltip="Sampling progress where the term turns on (0 = first step), as in ComfyUI's own "
                               "nodes: active for sigma_end ≤ σ ≤ sigma_start."),
        io.Float.Input("end_percent", default=end, min=0.0, max=1.0, step=0.001,
                       tooltip="Sampling progress where the term turns off (1 = last step). Outside the window the "
                               "term's branch is not evaluated at all."),
    ]


def schedule_input(what: str) -> io.Input:
    return Schedule.Input("schedule", optional=True,
                          tooltip=f"Optional: drives the {what} per step (overrides the scale widget).")


def branch_mode_input() -> io.Input:
    return io.Combo.Input("branch_mode", options=["batched", "sequential"], default="batched", optional=True,
                          tooltip="batched: every branch of the step in one forward call (fastest). sequential: one "
                                  "call per branch, same result, less memory.")


def scale_schedule(scale: float, schedule):
    return schedule if schedule is not None else Constant(scale)


def with_branch_mode(stack, branch_mode):
    return replace(stack, sequential=True) if branch_mode == "sequential" else stack


def with_cfg_rule(stack, rule: CFGRule):
    """The stack with ``rule`` as its CFG rule; a rule another node set earlier is an error naming both."""
    try:
        return stack.with_cfg_rule(rule)
    except CFGRuleConflict as conflict:
        raise host.GuidanceError(str(conflict)) from None


def with_cfg_schedule(stack, cls, schedule):
    """The stack with the CFG scale driven by ``schedule``; a second schedule would silently replace the
    first, so that is an error."""
    if stack.cfg_term.schedule is not None:
        raise host.GuidanceError(f"{public_id(cls)}: the CFG scale is already driven by a schedule from an earlier "
                                    "GuidersScheduledCFG or GuidersGuider in the chain; connect only one CFG schedule.")
    return stack.with_cfg(schedule=schedule)


def target_input() -> io.Input:
    return io.Combo.Input("target", options=["new branch", "negative branch"], default="new branch", optional=True,
                          tooltip="new branch: adds s·(cond − perturbed) with an extra branch in the batch. "
                                  "negative branch: no extra branch; the CFG's negative prediction is computed "
                                  "with the perturbation instead (scale unused; needs cfg > 1), as ComfyUI's "
                                  "SkipLayerGuidanceDiTSimple.")


def perturbation_node(model, node, prefix, perturbation, scale, schedule, start_percent, end_percent, branch_mode,
                       source=COND, positive=COND, target="new branch", with_term_added=None):
    """The recipe of a perturbation node: a term s·(positive − perturbed) on a new branch, or (target
    "negative branch") the CFG's negative prediction computed with the perturbation. ``with_term_added(stack,
    name)``, when given, is applied in the same update right after a new term named ``name`` is added (SLG's
    rescale, which acts while that term is active)."""
    window = host.percent_window(start_percent, end_percent)

    def update(stack):
        name = stack.unique_name(prefix)
        if target == "negative branch":
            if stack.cfg_term.negative != UNCOND:
                raise host.GuidanceError(f"{node}: the negative branch is already perturbed by "
                                            f"'{stack.cfg_term.negative}'; use target 'new branch' here.")
            stack = stack.with_branch(Branch(name, source=UNCOND, perturbation=perturbation, window=window))
            stack = stack.with_cfg(negative=name)
        elif target == "new branch":
            term = perturbation_term(name, name, scale_schedule(scale, schedule), window)
            if positive != COND:
                term = replace(term, positive=positive)
            stack = stack.with_term(term, Branch(name, source=source, perturbation=perturbation))
            if with_term_added is not None:
                stack = with_term_added(stack, name)
        else:
            raise host.GuidanceError(f"{node}: target {target!r} is not one of 'new branch', 'negative branch'.")
        return with_branch_mode(stack, branch_mode)

    return host.add_guidance(model, node, update)

