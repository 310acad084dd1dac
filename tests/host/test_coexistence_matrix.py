"""Every Guiders node × every guidance-related MODEL node of ComfyUI 0.8.0, in both orders, through real KSampler
runs: the result is finite and both methods apply, or the run raises an error naming both nodes. No silent drop.

"Both apply" is checked by value against each one alone: the chain must differ clearly (MIN_EFFECT) from our
node alone and from theirs alone; a node that drops the other leaves a result equal to one of them. A built-in
that has no effect alone at these settings (a step cache that skips nothing, context windows on a short
latent) must leave our result unchanged (parity with ours alone). The pairs expected to be refused are
listed in REFUSED, each with its reason; the README's "Known limits" says the same. The guiders of
nodes_custom_sampler.py, SelfAttentionGuidance's shadowing key, EasyCache's skipped steps and
SkipLayerGuidanceDiTSimple's two-cond batch function have their own value tests in test_coexistence.py.
Catches (each shown by a one-line break): SAG's late branch keeping the uncond's uuid (GuidersSAG × EasyCache
/ LazyCache); an observer's output not left to another node's patch (GuidersSAG × SelfAttentionGuidance); a
zero-init step with no forward while another node's post-CFG hook reads what it records (GuidersCFGZeroStar ×
SelfAttentionGuidance); a per-call block patch of another node shadowed by ours on a transformer key
(GuidersSAG × PerturbedAttentionGuidance); NAG guiding another node's own call of the cond kind, PerpNeg's
empty prompt (GuidersNAG × PerpNeg: it must leave NAG alone unchanged); and any new silent drop anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from support import MIN_EFFECT, PARITY_RTOL, node, relative_error, sample_family
from tiny_models import make_conditioning

STEPS = 3
BOTH = ("sd15", "sd3")
# A dropped method leaves the chain equal to the other method alone up to batching round-off (measured
# ≤ 1e-6, mostly exactly 0); two methods that both apply but interact so that one adds little (Mahiro after
# CFG-Zero*, TCFG under APG's orthogonal projection) were measured at 1.7e-4 and above.
DROPPED_BELOW = 1e-5


@dataclass(frozen=True)
class Patch:
    node_id: str
    inputs: dict = field(default_factory=dict)
    families: tuple[str, ...] = BOTH
    build: Callable | None = None  # (model, family, weak) -> model, for inputs that are not literals

    def apply(self, model, family: str, weak_model_of) -> object:
        if self.build is not None:
            return self.build(model, family, weak_model_of)
        return node(self.node_id, model=model, **self.inputs)


def _scheduled_cfg(model, family, weak):
    return node("GuidersScheduledCFG", model=model,
                schedule=node("GuidersScheduleLinear", start_value=8.0, end_value=2.0))


def _autoguidance(model, family, weak):
    return node("GuidersAutoguidance", model=model, weak_model=weak(family), scale=2.0)


def _perp_neg(model, family, weak):
    return node("PerpNeg", model=model, empty_conditioning=make_conditioning(family, seed=1)[1], neg_scale=1.0)


OURS = [
    Patch("GuidersScheduledCFG", build=_scheduled_cfg),
    Patch("GuidersCFGNormalize", {"mode": "base_norm"}),
    Patch("GuidersRescaleCFG", {"multiplier": 0.7}),
    Patch("GuidersCFGZeroStar", {"zero_init_steps": 1}),
    Patch("GuidersAPG", {"eta": 0.0, "norm_threshold": 5.0, "momentum": -0.5}),
    Patch("GuidersPAG", {"scale": 3.0}),
    Patch("GuidersSEG", {"scale": 3.0, "blur_sigma": 10.0}),
    Patch("GuidersSAG", {"scale": 0.5, "blur_sigma": 2.0}, ("sd15",)),
    Patch("GuidersSLG", {"scale": 3.0, "layers": "1", "start_percent": 0.0, "end_percent": 1.0}, ("sd3",)),
    Patch("GuidersAutoguidance", build=_autoguidance),
]


def _nag(model, family, weak):
    return node("GuidersNAG", model=model, negative=make_conditioning(family, seed=11)[0], scale=4.0, alpha=0.5)


OURS += [Patch("GuidersNAG", families=("sd15",), build=_nag)]  # NAG: cross-attention families only
WINDOW = {"start_percent": 0.0, "end_percent": 1.0}
CACHE = {"reuse_threshold": 0.5, "start_percent": 0.0, "end_percent": 1.0, "verbose": False}
THEIRS = [
    Patch("PerturbedAttentionGuidance", {"scale": 3.0}, ("sd15",)),
    Patch("SelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 2.0}, ("sd15",)),
    Patch("SkipLayerGuidanceDiT", {"double_layers": "0", "single_layers": "", "scale": 3.0, "rescaling_scale": 0.0,
                                   **WINDOW}, ("sd3",)),
    Patch("SkipLayerGuidanceDiTSimple", {"double_layers": "0", "single_layers": "", **WINDOW}, ("sd3",)),
    Patch("SkipLayerGuidanceSD3", {"layers": "0", "scale": 3.0, **WINDOW}, ("sd3",)),
    Patch("APG", {"eta": 0.0, "norm_threshold": 5.0, "momentum": -0.5}),
    Patch("CFGZeroStar"),
    Patch("CFGNorm", {"strength": 1.0}),
    Patch("TCFG"),
    Patch("Mahiro"),
    Patch("FreeU", {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}, ("sd15",)),
    Patch("FreeU_V2", {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}, ("sd15",)),
    Patch("FreSca", {"scale_low": 1.0, "scale_high": 1.25, "freq_cutoff": 2}),
    Patch("PerpNeg", build=_perp_neg),
    Patch("RescaleCFG", {"multiplier": 0.7}),
    # Their cfg runs from min_cfg to the sampler's cfg over the latent batch (SVD's frames): on a batch of
    # one it is min_cfg, so 2 here (1 would be no CFG at all).
    Patch("VideoLinearCFGGuidance", {"min_cfg": 2.0}),
    Patch("VideoTriangleCFGGuidance", {"min_cfg": 2.0}),
    Patch("EasyCache", CACHE),
    Patch("LazyCache", CACHE),
    Patch("ContextWindowsManual", {"context_length": 16, "context_overlap": 4, "context_schedule": "standard_static"}),
]

# (ours, theirs) -> why the pair cannot compose; the run must raise an error naming both.
CFG_FORMULA_NODES = ("PerpNeg", "RescaleCFG", "VideoLinearCFGGuidance", "VideoTriangleCFGGuidance")
REFUSED = {
    (ours, theirs): "both compute the CFG combination: our CFG rule and their sampler_cfg_function"
    for ours in ("GuidersCFGZeroStar", "GuidersAPG") for theirs in CFG_FORMULA_NODES
}

# (ours, theirs) -> why theirs legitimately ignores what ours changes; the chain must equal theirs alone.
SCALE_UNUSED = {
    ("GuidersScheduledCFG", theirs): "their cfg runs from min_cfg to the sampler's cfg over the latent batch (SVD's "
    "frames), so on a batch of one latent it is min_cfg whatever cfg our schedule gives, as with KSampler's cfg"
    for theirs in ("VideoLinearCFGGuidance", "VideoTriangleCFGGuidance")
}
CACHES = ("EasyCache", "LazyCache")

CASES = [
    pytest.param(ours, theirs, order, family, id=f"{ours.node_id}-{theirs.node_id}-{order}-{family}")
    for ours in OURS for theirs in THEIRS for order in ("theirs_first", "ours_first")
    for family in BOTH if family in ours.families and family in theirs.families
]


@pytest.fixture(autouse=True)
def _pack(guiders_pack):
    return guiders_pack


def sample_counting_forwards(model, family: str) -> tuple[torch.Tensor, int]:
    """The sampled latent and how many forwards of the diffusion model really ran (a step cache answers some
    steps without one)."""
    forwards = []
    first_module = next(iter(model.model.diffusion_model.children()))
    hook = first_module.register_forward_hook(lambda *_: forwards.append(1))
    try:
        return sample_family(model, family, steps=STEPS), len(forwards)
    finally:
        hook.remove()


@pytest.fixture(scope="module")
def alone(tiny_model, weak_model_of) -> Callable:
    results: dict = {}

    def get(patch: Patch | None, family: str) -> tuple[torch.Tensor, int]:
        key = (patch.node_id if patch else None, family)
        if key not in results:
            model = tiny_model(family)
            results[key] = sample_counting_forwards(patch.apply(model, family, weak_model_of) if patch else model,
                                                    family)
        return results[key]

    return get


def test_every_pair_is_tested_or_cannot_share_a_family() -> None:
    assert len(CASES) > 2 * len(OURS) * len(THEIRS) // 2


@pytest.mark.parametrize(("ours", "theirs", "order", "family"), CASES)
def test_both_apply_or_an_error_names_both(tiny_model, weak_model_of, alone, ours: Patch, theirs: Patch, order: str,
                                           family: str) -> None:
    model = tiny_model(family)
    if order == "theirs_first":
        chain = ours.apply(theirs.apply(model, family, weak_model_of), family, weak_model_of)
    else:
        chain = theirs.apply(ours.apply(model, family, weak_model_of), family, weak_model_of)

    if (ours.node_id, theirs.node_id) in REFUSED:
        with pytest.raises(Exception) as error:
            sample_family(chain, family, steps=STEPS)
        assert ours.node_id in str(error.value) and theirs.node_id in str(error.value), str(error.value)
        return

    both, forwards = sample_counting_forwards(chain, family)
    (ours_alone, ours_forwards), (theirs_alone, _), (plain, _) = (alone(p, family) for p in (ours, theirs, None))
    assert torch.isfinite(both).all(), "NaN or inf in the result"
    assert relative_error(ours_alone, plain) > MIN_EFFECT, f"{ours.node_id} alone has no effect: the test is vacuous"
    if (ours.node_id, theirs.node_id) in SCALE_UNUSED:
        assert relative_error(both, theirs_alone) < PARITY_RTOL
        return
    cache_skipped_nothing = theirs.node_id in CACHES and forwards == ours_forwards
    if cache_skipped_nothing or relative_error(theirs_alone, plain) < DROPPED_BELOW:
        # Theirs does nothing in this run (a cache that skipped no step, context windows longer than the
        # latent): it must leave ours exactly as it is alone.
        assert relative_error(both, ours_alone) < PARITY_RTOL, f"{theirs.node_id} (no effect alone) changed ours"
        return
    assert relative_error(both, ours_alone) > DROPPED_BELOW, f"{theirs.node_id} was dropped"
    assert relative_error(both, theirs_alone) > DROPPED_BELOW, f"{ours.node_id} was dropped"
