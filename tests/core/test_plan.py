"""The plan: which branches a step needs, and how a stack of terms combines their predictions.

Expected values are the methods' formulas written out by hand here, never the plan's own output."""

import math
from dataclasses import replace

import pytest
import torch

from guidance_core import rules
from guidance_core.plan import (
    COND,
    UNCOND,
    Branch,
    CFGRule,
    GuidanceStack,
    PostTransform,
    StepContext,
    Term,
    perturbation_term,
    stateless_rule,
)
from guidance_core.schedules import Constant, Linear, SigmaWindow


def preds_for(*names, shape=(2, 4, 6, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name in names}


def ctx(step=0, num_steps=10, sigma=5.0, cond_scale=7.0):
    return StepContext(step, num_steps, sigma, cond_scale)


def pag_stack(stack, name="pag", scale=3.0, window=None):
    return stack.with_term(perturbation_term(name, name, Constant(scale), window), Branch(name, perturbation="pag"))


def test_default_stack_is_plain_cfg_at_the_sampler_scale():
    preds = preds_for(COND, UNCOND)
    x = torch.randn_like(preds[COND])
    guided = GuidanceStack().combine(preds, x, ctx(cond_scale=6.5))
    expected = preds[UNCOND] + 6.5 * (preds[COND] - preds[UNCOND])
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-5)


def test_cfg_pag_seg_rescale_equal_the_formulas_by_hand():
    stack = GuidanceStack()
    stack = pag_stack(stack, "pag", 3.0)
    stack = pag_stack(stack, "seg", 2.0)
    stack = stack.with_post(PostTransform("rescale", lambda g, p: rules.rescale(g, p[COND], 0.7), space="noise"))
    preds = preds_for(COND, UNCOND, "pag", "seg")
    x = torch.randn_like(preds[COND])
    guided = stack.combine(preds, x, ctx(cond_scale=5.0))

    c, u, p, s = preds[COND], preds[UNCOND], preds["pag"], preds["seg"]
    by_hand = u + 5.0 * (c - u) + 3.0 * (c - p) + 2.0 * (c - s)  # x0 space
    noise_guided, noise_cond = x - by_hand, x - c
    std_ratio = noise_cond.std(dim=(1, 2, 3), keepdim=True) / noise_guided.std(dim=(1, 2, 3), keepdim=True)
    noise_rescaled = 0.7 * noise_guided * std_ratio + 0.3 * noise_guided
    torch.testing.assert_close(guided, x - noise_rescaled, rtol=1e-4, atol=1e-4)
    assert (guided - by_hand).abs().max() > 1e-2  # the rescale did something


def test_needed_branches_are_the_minimum():
    stack = pag_stack(GuidanceStack(), "pag", 3.0, SigmaWindow(4.0, 1.0))
    assert stack.needed_branches(ctx(sigma=3.0, cond_scale=7.0)) == [COND, UNCOND, "pag"]
    assert stack.needed_branches(ctx(sigma=5.0, cond_scale=7.0)) == [COND, UNCOND]  # outside the window
    assert stack.needed_branches(ctx(sigma=3.0, cond_scale=1.0)) == [COND, "pag"]  # cfg 1: no uncond
    assert stack.needed_branches(ctx(sigma=0.5, cond_scale=1.0)) == [COND]  # below sigma_end
    zero_scale = pag_stack(GuidanceStack(), "pag", 0.0)
    assert zero_scale.needed_branches(ctx(cond_scale=1.0)) == [COND]


def test_inactive_terms_do_not_contribute():
    stack = pag_stack(GuidanceStack(), "pag", 3.0, SigmaWindow(4.0, 1.0))
    preds = preds_for(COND, UNCOND, "pag")
    x = torch.randn_like(preds[COND])
    outside = stack.combine(preds, x, ctx(sigma=5.0, cond_scale=4.0))
    torch.testing.assert_close(outside, preds[UNCOND] + 4.0 * (preds[COND] - preds[UNCOND]))
    only_cond = stack.combine({COND: preds[COND]}, x, ctx(sigma=5.0, cond_scale=1.0))
    torch.testing.assert_close(only_cond, preds[COND])


def test_scheduled_cfg_uses_the_schedule_and_skips_uncond_at_one():
    stack = GuidanceStack().with_cfg(schedule=Linear(7.0, 1.0))
    assert stack.needed_branches(ctx(step=0, num_steps=4)) == [COND, UNCOND]
    assert stack.needed_branches(ctx(step=3, num_steps=4)) == [COND]
    preds = preds_for(COND, UNCOND)
    x = torch.randn_like(preds[COND])
    guided = stack.combine(preds, x, ctx(step=1, num_steps=4, cond_scale=99.0))
    torch.testing.assert_close(guided, preds[UNCOND] + 5.0 * (preds[COND] - preds[UNCOND]), rtol=1e-5, atol=1e-5)


def test_noise_space_rule_sees_x_minus_x0():
    seen = {}

    def record(pos, neg, scale):
        seen["pos"], seen["neg"] = pos, neg
        return rules.cfg(pos, neg, scale)

    stack = GuidanceStack().with_cfg_rule(CFGRule("test", stateless_rule(record), space="noise"))
    preds = preds_for(COND, UNCOND)
    x = torch.randn_like(preds[COND])
    guided = stack.combine(preds, x, ctx(cond_scale=3.0))
    torch.testing.assert_close(seen["pos"], x - preds[COND])
    torch.testing.assert_close(seen["neg"], x - preds[UNCOND])
    # CFG is affine, so the noise-space result equals the x0-space one
    torch.testing.assert_close(guided, preds[UNCOND] + 3.0 * (preds[COND] - preds[UNCOND]), rtol=1e-5, atol=1e-5)


def test_cfg_zero_star_in_the_stack_matches_its_velocity_formula_and_zero_init():
    rule = stateless_rule(rules.cfg_zero_star)
    stack = GuidanceStack().with_cfg_rule(CFGRule("test", rule, space="noise", zero_init_steps=2))
    preds = preds_for(COND, UNCOND)
    x = torch.randn_like(preds[COND])
    assert stack.needed_branches(ctx(step=1)) == []
    torch.testing.assert_close(stack.combine(preds, x, ctx(step=1)), x)  # zero noise: x0 = x
    guided = stack.combine(preds, x, ctx(step=2, cond_scale=4.0))
    vc, vu = x - preds[COND], x - preds[UNCOND]
    alpha = (vc * vu).sum(dim=(1, 2, 3), keepdim=True) / (vu.pow(2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
    expected_noise = alpha * vu + 4.0 * (vc - alpha * vu)
    torch.testing.assert_close(guided, x - expected_noise, rtol=1e-4, atol=1e-4)


def test_stateful_rule_gets_fresh_state_per_run():
    calls = []

    def rule(pos, neg, scale, state):
        state.append(1)
        calls.append(len(state))
        return rules.cfg(pos, neg, scale)

    stack = GuidanceStack().with_cfg_rule(CFGRule("test", rule, make_state=list))
    preds = preds_for(COND, UNCOND)
    x = torch.randn_like(preds[COND])
    for _run in range(2):
        state = stack.new_run_state()
        for step in range(3):
            stack.combine(preds, x, ctx(step=step), state)
    assert calls == [1, 2, 3, 1, 2, 3]


def test_post_transform_only_while_its_term_is_active_and_with_its_branches():
    marker = PostTransform("double", lambda g, p: 2 * g, space="x0", while_term_active="pag")
    stack = pag_stack(GuidanceStack(), "pag", 1.0, SigmaWindow(4.0, 1.0)).with_post(marker)
    preds = preds_for(COND, UNCOND, "pag")
    x = torch.randn_like(preds[COND])
    inside = stack.combine(preds, x, ctx(sigma=3.0, cond_scale=2.0))
    outside = stack.combine(preds, x, ctx(sigma=5.0, cond_scale=2.0))
    c, u, p = preds[COND], preds[UNCOND], preds["pag"]
    torch.testing.assert_close(inside, 2 * (u + 2.0 * (c - u) + (c - p)))
    torch.testing.assert_close(outside, u + 2.0 * (c - u))
    needs_uncond = GuidanceStack().with_post(PostTransform("x", lambda g, p: 3 * g, space="x0", requires=(UNCOND,)))
    torch.testing.assert_close(needs_uncond.combine({COND: c}, x, ctx(cond_scale=1.0)), c)


def test_another_cfg_result_stands_in_for_the_cfg_term():
    stack = pag_stack(GuidanceStack(), "pag", 2.0)
    preds = preds_for(COND, UNCOND, "pag")
    x = torch.randn_like(preds[COND])
    other = torch.randn_like(x)
    guided = stack.combine(preds, x, ctx(cond_scale=5.0), cfg_result=other)
    torch.testing.assert_close(guided, other + 2.0 * (preds[COND] - preds["pag"]))


def test_perturbing_the_negative_branch_via_positive_uncond():
    term = replace(perturbation_term("sag", "sag", Constant(0.5)), positive=UNCOND)
    stack = GuidanceStack().with_term(term, Branch("sag", source=UNCOND))
    preds = preds_for(COND, UNCOND, "sag")
    x = torch.randn_like(preds[COND])
    guided = stack.combine(preds, x, ctx(cond_scale=3.0))
    c, u, s = preds[COND], preds[UNCOND], preds["sag"]
    torch.testing.assert_close(guided, u + 3.0 * (c - u) + 0.5 * (u - s), rtol=1e-5, atol=1e-5)
    assert stack.needed_branches(ctx(cond_scale=1.0)) == [COND, UNCOND, "sag"]


def test_unique_names_and_errors():
    stack = pag_stack(GuidanceStack(), "pag")
    assert stack.unique_name("pag") == "pag#2"
    assert stack.unique_name("seg") == "seg"
    with pytest.raises(ValueError, match="already"):
        pag_stack(stack, "pag")
    with pytest.raises(KeyError, match="unknown branch"):
        stack.branch("nope")
    with pytest.raises(ValueError, match="space"):
        Term("t", COND, UNCOND, stateless_rule(rules.cfg), space="eps")


def test_term_neutral_scale_none_is_always_active():
    t_norm = CFGRule("test", stateless_rule(rules.t_norm), space="noise", neutral_scale=None)
    stack = GuidanceStack().with_cfg_rule(t_norm)
    assert stack.needed_branches(ctx(cond_scale=1.0)) == [COND, UNCOND]
    assert math.isclose(stack.cfg_term.scale_at(ctx(cond_scale=0.25)), 0.25)


def test_perturbing_the_negative_branch_replaces_the_uncond_and_needs_no_extra_branch():
    branch = Branch("slg", source=UNCOND, perturbation="skip", window=SigmaWindow(4.0, 1.0))
    stack = GuidanceStack().with_branch(branch).with_cfg(negative="slg")
    assert stack.needed_branches(ctx(cond_scale=5.0)) == [COND, "slg"]
    assert branch.perturbed_at(3.0) and not branch.perturbed_at(5.0)
    preds = preds_for(COND, "slg")
    x = torch.randn_like(preds[COND])
    guided = stack.combine(preds, x, ctx(cond_scale=5.0))
    torch.testing.assert_close(guided, preds["slg"] + 5.0 * (preds[COND] - preds["slg"]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already"):
        stack.with_branch(branch)


# --- CFG rules as whole values, and pre transforms --------------------------------------------------------

def _cfg_zero_star_rule(owner="CFGZeroStar"):
    return CFGRule(owner, stateless_rule(rules.cfg_zero_star), space="noise", zero_init_steps=2)


def test_a_second_cfg_rule_is_refused_naming_both_nodes_instead_of_silently_replacing_the_first():
    # Catches the old with_cfg field replacement: CFG-Zero* then APG silently gave APG with CFG-Zero*'s zero init.
    from guidance_core.plan import CFGRuleConflict

    stack = GuidanceStack().with_cfg_rule(_cfg_zero_star_rule())
    with pytest.raises(CFGRuleConflict, match=r"APG.*CFGZeroStar|CFGZeroStar.*APG"):
        stack.with_cfg_rule(CFGRule("APG", stateless_rule(rules.cfg)))


def test_a_cfg_rule_replaces_every_field_of_the_default_rule_at_once():
    stack = GuidanceStack().with_cfg_rule(_cfg_zero_star_rule())
    term = stack.cfg_term
    assert (term.space, term.zero_init_steps, term.rule_owner) == ("noise", 2, "CFGZeroStar")
    assert stack.zero_init(ctx(step=1)) and not stack.zero_init(ctx(step=2))


def test_with_cfg_cannot_change_the_rule_piecemeal():
    with pytest.raises(ValueError, match="with_cfg_rule"):
        GuidanceStack().with_cfg(rule=stateless_rule(rules.cfg), space="noise")


def test_a_schedule_composes_with_a_cfg_rule():
    stack = GuidanceStack().with_cfg_rule(_cfg_zero_star_rule()).with_cfg(schedule=Constant(3.0))
    preds = preds_for(COND, UNCOND)
    x = torch.randn_like(preds[COND])
    noise = {k: x - v for k, v in preds.items()}
    expected = x - rules.cfg_zero_star(noise[COND], noise[UNCOND], 3.0)
    torch.testing.assert_close(stack.combine(preds, x, ctx(step=5)), expected)


def test_pre_transforms_run_in_order_before_the_rule_in_their_own_space():
    # Expected: the transforms written out by hand, then CFG. Catches: pre transforms ignored, applied after
    # the rule, applied in x0 space when they declare noise space, or run in the wrong order.
    from guidance_core.plan import PreTransform

    halve_uncond_noise = PreTransform("halve", lambda p: {UNCOND: 0.5 * p[UNCOND]}, space="noise")
    shift_cond = PreTransform("shift", lambda p: {COND: p[COND] + 1.0}, space="x0")
    stack = GuidanceStack().with_pre(halve_uncond_noise).with_pre(shift_cond)
    preds = preds_for(COND, UNCOND)
    x = torch.randn_like(preds[COND])
    uncond = x - 0.5 * (x - preds[UNCOND])
    cond = preds[COND] + 1.0
    expected = uncond + 7.0 * (cond - uncond)
    torch.testing.assert_close(stack.combine(preds, x, ctx()), expected)
    swapped = GuidanceStack().with_pre(shift_cond).with_pre(halve_uncond_noise)
    torch.testing.assert_close(swapped.combine(preds, x, ctx()), expected)  # they touch different branches


def test_a_pre_transform_whose_branch_was_not_evaluated_is_skipped():
    from guidance_core.plan import PreTransform

    stack = GuidanceStack().with_pre(PreTransform("needs_uncond", lambda p: {COND: 0 * p[COND]}))
    preds = preds_for(COND, UNCOND)
    x = torch.randn_like(preds[COND])
    torch.testing.assert_close(stack.combine({COND: preds[COND]}, x, ctx(cond_scale=1.0)), preds[COND])


def test_a_perturbation_term_contributes_s_times_cond_minus_perturbed_directly():
    # Catches a sign flip or a wrong branch in the perturbation term's contribution: expected written out.
    preds = preds_for(COND, UNCOND, "pag")
    x = torch.randn_like(preds[COND])
    stack = pag_stack(GuidanceStack(), scale=2.5)
    expected = preds[UNCOND] + 7.0 * (preds[COND] - preds[UNCOND]) + 2.5 * (preds[COND] - preds["pag"])
    torch.testing.assert_close(stack.combine(preds, x, ctx()), expected)
    assert stack.terms[-1].contribution is not None


def test_with_windows_resolves_every_term_and_branch_window_and_leaves_none_alone() -> None:
    # The host resolves percent windows per run through with_windows. Catches: a branch's window (or a term's)
    # left unresolved, or a missing window replaced by one.
    stack = GuidanceStack().with_term(perturbation_term("pag", "pag", Constant(3.0), "percent window"),
                                      Branch("pag", perturbation="pag", window="percent window"))
    resolved = stack.with_windows(lambda window: SigmaWindow(4.0, 1.0) if window == "percent window" else window)

    assert [b.window for b in resolved.branches] == [SigmaWindow(4.0, 1.0)]
    assert [t.window for t in resolved.terms if t.name == "pag"] == [SigmaWindow(4.0, 1.0)]
    assert resolved.cfg_term.window is None
    assert [t.name for t in resolved.terms] == [t.name for t in stack.terms]
