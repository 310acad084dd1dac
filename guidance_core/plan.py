"""The composition of guidance terms: which branches a step needs, and how their predictions combine.

Every method in this pack is a sum of terms over a few model evaluations ("branches") of one step:

    guided = cond + Σ_k  ( rule_k(pred[positive_k], pred[negative_k], scale_k(step)) − pred[positive_k] )

then the post transforms in order. CFG is the term (cond, uncond) whose rule is ``u + w(c − u)``, so its
contribution is ``(w − 1)(c − u)``; PAG, SEG, SLG add ``s(c − perturbed)``; APG, CFG-Zero* and T-Norm replace
the CFG term's rule. A term whose scale is at its neutral value, or whose window excludes the step, needs no
branch; a branch no term needs is not evaluated.

Predictions are denoised x0 (what ComfyUI hands its hooks). A term or transform that works on noise
predictions declares ``space="noise"`` and sees ``x − x0`` (σ·ε for EPS models, σ·v for flow models).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

from .rules import cfg

COND = "cond"
UNCOND = "uncond"
CFG_TERM = "cfg"
SPACES = ("x0", "noise", "velocity")
# "velocity" is (x − x0)/σ: the flow velocity ε − x0 on flow models (x = (1 − σ)x0 + σε), ε on EPS and v models
# (x = x0 + σε). For rules and post transforms whose papers work on it with magnitudes or across steps (SMC-CFG,
# momentum guidance), where σ·v (the noise space) would not do.
PRE_SPACES = ("x0", "noise")


@dataclass(frozen=True)
class StepContext:
    """Where sampling is: the step index in the run's schedule, the run's number of steps, the current σ,
    and the sampler's own cfg scale (used by the CFG term unless a schedule drives it). ``stream_sizes``: where
    the sampler packed several latents into one (LTX-2's video and audio, flattened one after the other along
    the last dimension), each one's size per sample, in order; () for one latent."""

    step: int
    num_steps: int
    sigma: float
    cond_scale: float = 1.0
    stream_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Branch:
    """One model evaluation a term can ask for: the conditioning it runs on (``source``) and an optional
    perturbation of the model (opaque to the core: the host adapter knows how to apply it). Outside its
    ``window`` (a σ window, or None for always) the perturbation is off and the branch equals its source."""

    name: str
    source: str = COND
    perturbation: Any = None
    window: Any = None
    # A conditioning of its own (Perp-Neg's empty prompt), opaque to the core: the host runs the branch on it
    # instead of on ``source``'s.
    conditioning: Any = None

    def perturbed_at(self, sigma: float) -> bool:
        return self.perturbation is not None and (self.window is None or self.window.contains(sigma))


@dataclass(frozen=True)
class Term:
    """One guidance term.

    ``rule(positive, negative, scale, state)`` returns the rule's guided prediction (CFG rules); the term
    contributes that minus ``positive``, unless it gives its ``contribution`` directly (perturbation terms).
    ``schedule(step, num_steps)`` gives the scale; ``None`` means the sampler's cfg. ``neutral_scale`` is a
    scale at which the term changes nothing (so its branches are not needed); ``None`` if there is none.
    ``make_state`` builds the rule's per-run state (APG's momentum). ``zero_init_steps``: the first k steps
    return zero noise without any forward (CFG-Zero*).
    """

    name: str
    positive: str
    negative: str
    rule: Callable[..., torch.Tensor] | None  # None for a term that gives its ``contribution`` directly
    schedule: Callable[[int, int], float] | None = None
    window: Any = None
    space: str = "x0"
    neutral_scale: float | None = 0.0
    make_state: Callable[[], Any] | None = None
    zero_init_steps: int = 0
    rule_owner: str | None = None  # the node that set this term's rule (a CFGRule); None: the default rule
    # ``contribution(positive, negative, scale)``: what the term adds to the guided prediction, given directly
    # (perturbation terms: s·(a − b)) instead of through a rule's guided prediction.
    contribution: Callable[..., torch.Tensor] | None = None
    # The rule also reads where sampling is: ``rule(positive, negative, scale, state, step=StepContext)``
    # (APG-Mix switches from CFG to APG after a step; its momentum runs on σ-normalised predictions).
    rule_takes_step: bool = False
    # ``stopped(state)``: True once the term is off for the rest of the run (adaptive guidance's cut-off), read
    # from its run state before each step; then its branches are not evaluated.
    stopped: Callable[[Any], bool] | None = None
    # Further branches the rule reads (Perp-Neg's empty prompt), passed after the state:
    # ``rule(positive, negative, scale, state, *reads)``.
    reads: tuple[str, ...] = ()

    def __post_init__(self):
        if self.space not in SPACES:
            raise ValueError(f"Term {self.name!r}: space {self.space!r} is not one of {SPACES}")
        if (self.rule is None) == (self.contribution is None):
            raise ValueError(f"Term {self.name!r}: give exactly one of rule and contribution")

    def scale_at(self, ctx: StepContext) -> float:
        if self.schedule is None:
            return float(ctx.cond_scale)
        return float(self.schedule(ctx.step, ctx.num_steps))

    def is_active(self, ctx: StepContext, state: Any = None) -> bool:
        if self.window is not None and not self.window.contains(ctx.sigma):
            return False
        if self.stopped is not None and state is not None and self.stopped(state):
            return False
        scale = self.scale_at(ctx)
        return self.neutral_scale is None or not math.isclose(scale, self.neutral_scale, abs_tol=1e-9)


@dataclass(frozen=True)
class CFGRule:
    """How the CFG term combines cond and uncond, as one whole value: the rule (as ``Term.rule``), the
    prediction space it works in, the scale at which it changes nothing (None: none, so the uncond is always
    needed), its per-run state, and the zero-init steps it asks for. ``owner`` names the node that set it.
    Setting a rule replaces all of these at once, so nothing of a previous rule is left behind."""

    owner: str
    rule: Callable[..., torch.Tensor]
    space: str = "x0"
    neutral_scale: float | None = 1.0
    make_state: Callable[[], Any] | None = None
    zero_init_steps: int = 0
    takes_step: bool = False  # as Term.rule_takes_step
    stopped: Callable[[Any], bool] | None = None  # as Term.stopped
    reads: tuple[str, ...] = ()  # as Term.reads


class CFGRuleConflict(ValueError):
    """Two nodes each set the CFG rule: neither can silently win."""


@dataclass(frozen=True)
class PreTransform:
    """A transform of branch predictions before any term sees them (TCFG-like methods):
    ``fn(preds) -> {name: new prediction}`` in ``space``, for the branches it returns; applied only when every
    branch it ``requires`` was evaluated this step. Pre transforms run in the order they were added, so they
    stack with each other and with any CFG rule."""

    name: str
    fn: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]
    space: str = "x0"
    requires: tuple[str, ...] = (COND, UNCOND)


@dataclass(frozen=True)
class PostTransform:
    """A transform of the whole guided prediction, ``fn(guided, preds) -> guided`` in ``space``; applied
    only when every branch it ``requires`` was evaluated this step."""

    name: str
    fn: Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]
    space: str = "noise"
    requires: tuple[str, ...] = (COND,)
    while_term_active: str | None = None  # apply only on steps where this term is active (SLG's rescale)
    takes_step: bool = False  # ``fn(guided, preds, step=StepContext)``: a strength scheduled over the steps
    # Per-run state (momentum guidance's running average): then ``fn(guided, preds, state, ctx)``.
    make_state: Callable[[], Any] | None = None

    @property
    def state_key(self) -> str:
        return f"post:{self.name}"


@dataclass(frozen=True)
class ConditioningTransform:
    """A change of the conditioning embedding some branches run on, before the forward (CADS):
    ``fn(embedding, t, state, ctx) -> embedding`` with t the diffusion time in [0, 1] (1 = pure noise), for the
    branches whose source is in ``sources`` (a perturbed copy of the cond sees the same change as the cond)."""

    name: str
    fn: Callable[..., torch.Tensor]
    sources: tuple[str, ...] = (COND,)
    make_state: Callable[[], Any] | None = None

    @property
    def state_key(self) -> str:
        return f"conditioning:{self.name}"


def stateless_rule(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Adapts ``fn(positive, negative, scale)`` to the rule signature, which also passes the run state."""

    def rule(positive, negative, scale, state=None):
        return fn(positive, negative, scale)

    rule.__name__ = getattr(fn, "__name__", "rule")
    return rule


def default_cfg_term() -> Term:
    """Plain CFG at the sampler's scale: ``u + w(c − u)``; w = 1 needs no uncond branch."""
    return Term(CFG_TERM, COND, UNCOND, stateless_rule(cfg), neutral_scale=1.0)


def perturbation_term(name: str, branch: str, schedule, window=None) -> Term:
    """``s·(cond − perturbed)``, the term of PAG, SEG, SLG/STG and autoguidance (Ahn et al. 2024, Eq. 9)."""
    return Term(name, COND, branch, rule=None, schedule=schedule, window=window,
                contribution=perturbation_contribution)


def perturbation_contribution(positive, perturbed, scale):
    """``s·(positive − perturbed)``: the guidance a perturbed (weaker) prediction gives, added to the result."""
    return scale * (positive - perturbed)


@dataclass(frozen=True)
class GuidanceStack:
    """An immutable stack of terms, their branches and the post transforms. Nodes build a new stack from
    the one on their input model; nothing in it changes during sampling."""

    terms: tuple[Term, ...] = ()
    branches: tuple[Branch, ...] = ()
    post: tuple[PostTransform, ...] = ()
    sequential: bool = False
    pre: tuple[PreTransform, ...] = ()
    conditioning: tuple[ConditioningTransform, ...] = ()  # applied by the host to the branches' conditionings

    # -- building -----------------------------------------------------------------------------------
    @property
    def cfg_term(self) -> Term:
        for term in self.terms:
            if term.name == CFG_TERM:
                return term
        return default_cfg_term()

    def with_cfg(self, **changes) -> GuidanceStack:
        """The stack with its CFG term's schedule, window or negative branch changed; the other terms stay.
        The rule is changed only as a whole value, with ``with_cfg_rule``."""
        rule_fields = {"rule", "space", "neutral_scale", "make_state", "zero_init_steps", "rule_owner",
                       "rule_takes_step", "stopped", "reads"} & set(changes)
        if rule_fields:
            raise ValueError(f"with_cfg cannot change {sorted(rule_fields)}: set a CFGRule with with_cfg_rule")
        return self._with_cfg_term(replace(self.cfg_term, **changes))

    def with_cfg_rule(self, rule: CFGRule) -> GuidanceStack:
        """The stack with the CFG term's rule set to ``rule`` (every field of the old rule replaced). A rule
        set earlier by another node is never silently dropped: that is a ``CFGRuleConflict`` naming both."""
        current = self.cfg_term
        if current.rule_owner is not None:
            raise CFGRuleConflict(
                f"{rule.owner} sets the CFG rule, but {current.rule_owner} earlier in the chain already set one; "
                f"two CFG rules do not compose. Keep one of {current.rule_owner} and {rule.owner} (post "
                "transforms such as rescale or base_norm, schedules and guidance terms stack with either).")
        return self._with_cfg_term(replace(
            current, rule=rule.rule, space=rule.space, neutral_scale=rule.neutral_scale, make_state=rule.make_state,
            zero_init_steps=rule.zero_init_steps, rule_owner=rule.owner, rule_takes_step=rule.takes_step,
            stopped=rule.stopped, reads=rule.reads))

    def with_windows(self, resolve: Callable[[Any], Any]) -> GuidanceStack:
        """The stack with every term's and branch's window replaced by ``resolve(window)`` (windows that are
        None stay None). The host uses it once per run to turn windows given in percent of the schedule
        into σ windows with the model sampling that run actually uses."""
        def resolved(window):
            return None if window is None else resolve(window)

        return replace(self, terms=tuple(replace(t, window=resolved(t.window)) for t in self.terms),
                       branches=tuple(replace(b, window=resolved(b.window)) for b in self.branches))

    def _with_cfg_term(self, cfg_term: Term) -> GuidanceStack:
        others = tuple(t for t in self.terms if t.name != CFG_TERM)
        return replace(self, terms=(cfg_term,) + others)

    def with_pre(self, transform: PreTransform) -> GuidanceStack:
        if transform.space not in PRE_SPACES:
            raise ValueError(f"PreTransform {transform.name!r}: space {transform.space!r} is not one of {PRE_SPACES}")
        return replace(self, pre=self.pre + (transform,))

    def with_term(self, term: Term, *branches: Branch) -> GuidanceStack:
        """The stack with ``term`` appended and its new branches added (name them with ``unique_name``)."""
        if any(t.name == term.name for t in self.terms):
            raise ValueError(f"a term named {term.name!r} is already in the stack")
        known = {b.name for b in self.branches}
        new_branches = tuple(b for b in branches if b.name not in known)
        return replace(self, terms=self.terms + (term,), branches=self.branches + new_branches)

    def with_branch(self, branch: Branch) -> GuidanceStack:
        """The stack with one more branch (for a term changed with ``with_cfg(negative=...)``)."""
        if any(b.name == branch.name for b in self.branches) or branch.name in (COND, UNCOND):
            raise ValueError(f"a branch named {branch.name!r} is already in the stack")
        return replace(self, branches=self.branches + (branch,))

    def with_conditioning(self, transform: ConditioningTransform) -> GuidanceStack:
        return replace(self, conditioning=self.conditioning + (transform,))

    def with_post(self, transform: PostTransform) -> GuidanceStack:
        return replace(self, post=self.post + (transform,))

    def unique_name(self, prefix: str) -> str:
        """A name for a new term and its branch (``pag``, ``pag#2``, ...) not yet used in this stack."""
        taken = {t.name for t in self.terms} | {b.name for b in self.branches} | {COND, UNCOND, CFG_TERM}
        name, n = prefix, 2
        while name in taken:
            name, n = f"{prefix}#{n}", n + 1
        return name

    def branch(self, name: str) -> Branch:
        if name in (COND, UNCOND):
            return Branch(name, source=name)
        for b in self.branches:
            if b.name == name:
                return b
        raise KeyError(f"unknown branch {name!r}; this stack has {[COND, UNCOND] + [b.name for b in self.branches]}")

    # -- per step -----------------------------------------------------------------------------------
    def all_terms(self) -> tuple[Term, ...]:
        return self.terms if any(t.name == CFG_TERM for t in self.terms) else (default_cfg_term(),) + self.terms

    def active_terms(self, ctx: StepContext, run_state: Mapping | None = None) -> list[Term]:
        """The terms on at this step; ``run_state`` (from ``new_run_state``) lets a stopped term be off."""
        run_state = run_state or {}
        return [t for t in self.all_terms() if t.is_active(ctx, run_state.get(t.name))]

    def zero_init(self, ctx: StepContext) -> bool:
        """True on a step where a term asks for zero noise (CFG-Zero*'s first steps): no forward at all."""
        return any(ctx.step < t.zero_init_steps for t in self.all_terms())

    def needed_branches(self, ctx: StepContext, run_state: Mapping | None = None) -> list[str]:
        """The branches this step evaluates, in a stable order: cond, uncond, then the stack's branches.
        Empty on a zero-init step. ``run_state``: the run's state, for terms that stop during a run."""
        if self.zero_init(ctx):
            return []
        needed = {COND}
        for term in self.active_terms(ctx, run_state):
            needed.update((term.positive, term.negative, *term.reads))
        order = [COND, UNCOND] + [b.name for b in self.branches]
        return [name for name in order if name in needed]

    def new_run_state(self) -> dict[str, Any]:
        """Fresh per-run state for every stateful term and post transform (nothing is kept between runs)."""
        state = {t.name: t.make_state() for t in self.all_terms() if t.make_state is not None}
        state.update({p.state_key: p.make_state() for p in self.post if p.make_state is not None})
        state.update({c.state_key: c.make_state() for c in self.conditioning if c.make_state is not None})
        return state

    def pre_transformed(self, preds: Mapping[str, torch.Tensor], x: torch.Tensor) -> Mapping[str, torch.Tensor]:
        """``preds`` after every pre transform whose required branches are there, in order (x0 predictions)."""
        for transform in self.pre:
            if not all(name in preds for name in transform.requires):
                continue
            if transform.space == "x0":
                changed = transform.fn(preds)
            else:
                changed = {k: x - v for k, v in transform.fn({k: x - v for k, v in preds.items()}).items()}
            preds = {**preds, **changed}
        return preds

    def combine(
        self,
        preds: Mapping[str, torch.Tensor],
        x: torch.Tensor,
        ctx: StepContext,
        run_state: Mapping | None = None,
        cfg_result: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The guided x0 from the branches' x0 predictions (``preds`` holds at least what
        ``needed_branches`` asked for). ``x`` is the noisy input, used to move to noise space.
        ``cfg_result``, when given, is another formula's CFG result (x0) standing in for the CFG term."""
        if self.zero_init(ctx):
            return x.clone()
        run_state = run_state or {}
        preds = self.pre_transformed(preds, x)
        noise_preds: dict[str, torch.Tensor] = {}

        def in_space(name: str, space: str) -> torch.Tensor:
            if space == "x0":
                return preds[name]
            if name not in noise_preds:
                noise_preds[name] = x - preds[name]
            return noise_preds[name] if space == "noise" else noise_preds[name] / ctx.sigma

        guided = preds[COND]
        active = self.active_terms(ctx, run_state)  # once per step: schedules are evaluated here and nowhere else
        for term in active:
            if cfg_result is not None and term.name == CFG_TERM:
                guided = guided + (cfg_result - preds[COND])
                continue
            positive = in_space(term.positive, term.space)
            negative = in_space(term.negative, term.space)
            scale = term.scale_at(ctx)
            if term.contribution is not None:
                contribution = term.contribution(positive, negative, scale)
            else:  # a rule gives a guided prediction: its contribution is what it adds to the positive
                step = {"step": ctx} if term.rule_takes_step else {}
                reads = [in_space(name, term.space) for name in term.reads]
                contribution = term.rule(positive, negative, scale, run_state.get(term.name), *reads, **step) - positive
            guided = guided + _to_x0_difference(contribution, term.space, ctx.sigma)

        active_names = {t.name for t in active}
        for transform in self.post:
            if not all(name in preds for name in transform.requires):
                continue
            if transform.while_term_active is not None and transform.while_term_active not in active_names:
                continue
            if transform.make_state is not None:
                fn = partial(_call_with_state, transform.fn, state=run_state.get(transform.state_key), ctx=ctx)
            elif transform.takes_step:
                fn = partial(transform.fn, step=ctx)
            else:
                fn = transform.fn
            if transform.space == "x0":
                guided = fn(guided, {k: preds[k] for k in preds})
            elif transform.space == "velocity":
                velocity = fn((x - guided) / ctx.sigma, {k: in_space(k, "velocity") for k in preds})
                guided = x - ctx.sigma * velocity
            else:
                noise = fn(x - guided, {k: in_space(k, "noise") for k in preds})
                guided = x - noise
        return guided


def _to_x0_difference(difference: torch.Tensor, space: str, sigma: float) -> torch.Tensor:
    """A difference of predictions in ``space`` as the difference of x0 it makes: x0 = x − noise = x − σ·velocity."""
    if space == "x0":
        return difference
    return -difference if space == "noise" else -sigma * difference


def _call_with_state(fn, guided, preds, state, ctx):
    return fn(guided, preds, state, ctx)
