"""Every node of the node table on a device without float64, and what its run creates and reads, without the
hardware: a full KSampler run (SamplerCustomAdvanced for GuidersGuider; the schedule nodes through
GuidersScheduledCFG) on the tiny SD1.5 UNet and the tiny Flux DiT, recorded by ``device_audit.PackAudit``.

- float32 policy: the pack's accumulation policy answers "no float64" (as on MPS) and every float64 call made by
  the pack's own code raises (ComfyUI's own calls may use float64 and are left alone). The result is finite and
  equals the run under the normal (float64) policy to FLOAT32_RTOL; for the nodes whose rules accumulate, the
  policy must have been consulted, so the two runs really took different paths.
- devices: every tensor the pack creates from nothing gets ``device=`` the sampled latent's device, no call of
  the pack moves a tensor elsewhere or returns one elsewhere.
- host reads: the pack reads tensors back to the host only where a scalar decision needs it
  (ALLOWED_HOST_READS, each with its reason).

Breaks these tests catch (each tried on a copy of the worktree):
- ``.double()`` put back in rules.py's per-sample ``_unit_norm``: test_every_node_samples_without_float64 fails
  for CFGNormalize base_norm and full_norm, APG and PAG+SEG+APG on both families ("float64 on a device
  without it"); in the whole-tensor norm it fails CFGNormalize t_norm (per_image off);
- ``chunk_rows`` in nodes/host/routing.py creating its ``arange`` without ``device=``:
  test_the_pack_creates_tensors_on_the_latents_device fails for every node with a shared prefix (PAG, SEG,
  SLG, the guider with PAG; not PAG-sequential, which has none);
- a ``float()`` of a tensor in plan.combine's loop (``scale = float(torch.tensor(term.scale_at(ctx)))``):
  test_the_pack_reads_tensors_back_only_for_its_scalar_decisions fails for every node.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from device_audit import PackAudit
from harness import sample, sample_custom_advanced, scheduler_sigmas
from node_table import NODE_IDS
from support import CFG, STEPS, node, relative_error
from tiny_models import make_conditioning, make_latent, make_ltxav_latent

FAMILIES = ("sd15", "flux")
# Of max|float64-policy result|, after 4 sampling steps; measured at most 1.3e-6.
FLOAT32_RTOL = 1e-5

# (file, function) of the pack where a tensor is read back to the host, and why each needs a scalar.
ALLOWED_HOST_READS = {
    # σ and the run's sigmas: the step index, the σ windows and the schedules choose which branches the step
    # evaluates (the batch's composition), as ComfyUI's own per-step σ reads do.
    ("nodes/host/step.py", "_step_context"),
    # Which batch chunks are equal decides which rows the shared prefix computes: one read per call.
    ("nodes/host/routing.py", "equal_chunks"),
    # NAG: σ (and the run's sigmas, for a schedule) decide whether this call is inside NAG's window and its φ,
    # one read per forward, as step.py's.
    ("nodes/host/nag.py", "nag_apply_model_wrapper"),
    ("nodes/host/nag.py", "scale_at"),
    # Adaptive guidance: whether every sample has passed the cut-off decides whether the uncond is evaluated
    # at all this step (the batch's composition), one read per step.
    ("guidance_core/branch_rules.py", "finished"),
    # CADS: this step's diffusion time t (from σ) decides the annealing γ(t), one read per step.
    ("nodes/host/step.py", "_transformed_conditionings"),
}
# PLADIS: σ (and the run's sigmas, for a schedule) decide whether this call is inside its window and its λ, one
# read per forward, as NAG's.
ALLOWED_HOST_READS |= {("nodes/host/pladis.py", "pladis_apply_model_wrapper"), ("nodes/host/pladis.py", "scale_at")}


@dataclass(frozen=True)
class Case:
    """``build(model, family, weak_model_of)`` gives the patched model (a GUIDER when ``guider``).
    ``accumulates``: its rules reduce in the accumulation dtype, so the float32 policy changes its path."""

    name: str
    node_ids: tuple[str, ...]
    build: Callable
    families: tuple[str, ...] = FAMILIES
    cfg: float = CFG
    accumulates: bool = False
    guider: bool = False


def _scheduled(schedule_id: str, **inputs):
    return lambda m, f, w: node("GuidersScheduledCFG", model=m, schedule=node(schedule_id, **inputs))


def _guider(model, family, weak):
    positive, negative = make_conditioning(family, seed=1)
    patched = node("GuidersPAG", model=model, scale=2.0)  # so that the guider's run goes through the pack's step
    return node("GuidersGuider", model=patched, positive=positive, negative=negative, cfg=CFG,
                schedule=node("GuidersScheduleLinear", start_value=6.0, end_value=3.0))


def _stack(model, family, weak):
    model = node("GuidersPAG", model=model, scale=2.0)
    model = node("GuidersSEG", model=model, scale=2.0, blur_sigma=10.0)
    return node("GuidersAPG", model=model, eta=0.3, norm_threshold=5.0, momentum=-0.5)


def _slg(mode: str, rescale: float = 0.0):
    return lambda m, f, w: node("GuidersSLG", model=m, scale=3.0, layers="1", mode=mode, rescale=rescale,
                                start_percent=0.0, end_percent=1.0)


CASES = [
    Case("ScheduleConstant", ("GuidersScheduleConstant", "GuidersScheduledCFG"),
         _scheduled("GuidersScheduleConstant")),
    Case("ScheduleLinear", ("GuidersScheduleLinear",), _scheduled("GuidersScheduleLinear", start_value=8.0,
                                                                     end_value=2.0)),
    Case("ScheduleCosine", ("GuidersScheduleCosine",), _scheduled("GuidersScheduleCosine")),
    Case("ScheduleCustom", ("GuidersScheduleCustom",), _scheduled("GuidersScheduleCustom", values="7, 5, 1, 3")),
    Case("CFGNormalize-base_norm", ("GuidersCFGNormalize",),
         lambda m, f, w: node("GuidersCFGNormalize", model=m, mode="base_norm"), accumulates=True),
    Case("CFGNormalize-t_norm", ("GuidersCFGNormalize",),
         lambda m, f, w: node("GuidersCFGNormalize", model=m, mode="t_norm", per_image=False), cfg=0.3,
         accumulates=True),
    Case("CFGNormalize-full_norm", ("GuidersCFGNormalize",),
         lambda m, f, w: node("GuidersCFGNormalize", model=m, mode="full_norm"), cfg=0.3, accumulates=True),
    Case("RescaleCFG", ("GuidersRescaleCFG",), lambda m, f, w: node("GuidersRescaleCFG", model=m, multiplier=0.7),
         accumulates=True),
    Case("CFGZeroStar", ("GuidersCFGZeroStar",), lambda m, f, w: node("GuidersCFGZeroStar", model=m)),
    Case("APG", ("GuidersAPG",), lambda m, f, w: node("GuidersAPG", model=m, eta=0.3, norm_threshold=5.0,
                                                      momentum=-0.5), accumulates=True),
    Case("PAG", ("GuidersPAG",), lambda m, f, w: node("GuidersPAG", model=m, scale=3.0)),
    Case("PAG-sequential", ("GuidersPAG",),
         lambda m, f, w: node("GuidersPAG", model=m, scale=3.0, branch_mode="sequential")),
    Case("SEG", ("GuidersSEG",), lambda m, f, w: node("GuidersSEG", model=m, scale=3.0, blur_sigma=10.0)),
    Case("SAG", ("GuidersSAG",), lambda m, f, w: node("GuidersSAG", model=m, scale=0.5), families=("sd15",)),
    Case("SLG-block-rescale", ("GuidersSLG",), _slg("block", rescale=0.7), families=("flux",), accumulates=True),
    Case("SLG-attention", ("GuidersSLG",), _slg("attention"), families=("flux",)),
    Case("SLG-feedforward", ("GuidersSLG",), _slg("feedforward"), families=("flux",)),
    Case("SLG-attention_scores", ("GuidersSLG",), _slg("attention_scores"), families=("flux",)),
    Case("Autoguidance", ("GuidersAutoguidance",),
         lambda m, f, w: node("GuidersAutoguidance", model=m, weak_model=w(f), scale=2.0)),
    Case("Guider", ("GuidersGuider",), _guider, guider=True),
    Case("PAG+SEG+APG", (), _stack, accumulates=True),
    # NAG's negative: the family's own other prompt (the CFG negative's draw), so its width matches.
    Case("NAG", ("GuidersNAG",), lambda m, f, w: node("GuidersNAG", model=m, negative=make_conditioning(f, seed=1)[1],
                                                      scale=4.0), families=("sd15",)),
]
# Issue #13's CFG rules and corrections (nodes/cfg_rule_nodes.py).
CASES += [
    Case("TCFG", ("GuidersTCFG",), lambda m, f, w: node("GuidersTCFG", model=m), accumulates=True),
    Case("MAMBOG", ("GuidersMAMBOG",), lambda m, f, w: node("GuidersMAMBOG", model=m, alpha=2.0), accumulates=True),
    Case("FreSca", ("GuidersFreSca",), lambda m, f, w: node("GuidersFreSca", model=m, scale_low=0.8, scale_high=1.5,
                                                            freq_cutoff=3)),
    Case("Mahiro", ("GuidersMahiro",), lambda m, f, w: node("GuidersMahiro", model=m), accumulates=True),
    Case("CFGRenorm", ("GuidersCFGRenorm",), lambda m, f, w: node("GuidersCFGRenorm", model=m, mode="lumina_renorm",
                                                                  strength=0.8), accumulates=True),
    Case("DynamicThresholding", ("GuidersDynamicThresholding",), lambda m, f, w: node(
        "GuidersDynamicThresholding", model=m, mode="mimic_scale", percentile=0.95, max_value=1.0, mimic_scale=2.0,
        strength=1.0), accumulates=True),
    Case("FDG", ("GuidersFDG",), lambda m, f, w: node("GuidersFDG", model=m, scales="10, 5", parallel_weights="0.5"),
         accumulates=True),
    Case("APGMix", ("GuidersAPGMix",), lambda m, f, w: node("GuidersAPGMix", model=m, apg_scale=6.0, apg_start_step=0,
                                                            eta=0.3, norm_threshold=10.0, momentum=-0.5),
         accumulates=True),
]
# Issue #13's rules that change which branches run, remember the trajectory, or noise the conditioning
# (nodes/branch_rule_nodes.py). Perp-Neg's empty prompt: another draw of the family's own prompt width.
CASES += [
    Case("CFGInterval", ("GuidersCFGInterval",), lambda m, f, w: node("GuidersCFGInterval", model=m, mode="sigma",
                                                                      sigma_high=5.42, sigma_low=0.28)),
    Case("AdaptiveCutoff", ("GuidersAdaptiveCutoff",), lambda m, f, w: node("GuidersAdaptiveCutoff", model=m,
                                                                            threshold=0.5), accumulates=True),
    Case("PerpNeg", ("GuidersPerpNeg",), lambda m, f, w: node(
        "GuidersPerpNeg", model=m, empty_conditioning=make_conditioning(f, seed=5)[0], neg_scale=1.0),
        accumulates=True),
    Case("MomentumGuidance", ("GuidersMomentumGuidance",), lambda m, f, w: node("GuidersMomentumGuidance", model=m),
         accumulates=True),
    Case("SMCCFG", ("GuidersSMCCFG",), lambda m, f, w: node("GuidersSMCCFG", model=m), accumulates=True),
    Case("CADS", ("GuidersCADS",), lambda m, f, w: node("GuidersCADS", model=m, noise_scale=0.5), accumulates=True),
]
# Guidance without a trained unconditional (nodes/condition_free_nodes.py).
CASES += [
    Case("TPG", ("GuidersTPG",), lambda m, f, w: node("GuidersTPG", model=m, scale=3.0)),
    Case("TSG", ("GuidersTSG",), lambda m, f, w: node("GuidersTSG", model=m, scale=3.0, noise_scale=1.0)),
    Case("ICG", ("GuidersICG",), lambda m, f, w: node("GuidersICG", model=m, mode="per step", seed=0)),
]

# Issue #12's attention-level nodes.
CASES += [
    Case("PLADIS", ("GuidersPLADIS",), lambda m, f, w: node("GuidersPLADIS", model=m), families=("sd15",)),
    Case("ModalityGuidance", ("GuidersModalityGuidance",), lambda m, f, w: node("GuidersModalityGuidance", model=m),
         families=("ltxav",)),
    Case("SWG", ("GuidersSWG",), lambda m, f, w: node("GuidersSWG", model=m, crop_size=12), families=("sd15",)),
]
PARAMS = [pytest.param(case, family, id=f"{case.name}-{family}") for case in CASES for family in case.families]


@dataclass
class AuditedRun:
    normal: torch.Tensor
    float32: torch.Tensor
    policy_calls: int
    audit: PackAudit


@pytest.fixture(scope="module")
def audited(guiders_pack, tiny_model, weak_model_of) -> Callable[[Case, str], AuditedRun]:
    """Each (case, family) sampled twice, once: under the normal policy, and under the float32 policy with
    float64 forbidden in the pack's code and every pack call recorded."""
    # The pack as ComfyUI loaded it: its own module objects, not the guidance_core the core tests import.
    policy_modules = [m for name, m in sys.modules.items()
                      if name.endswith("guidance_core.numerics") and name != "guidance_core.numerics"]
    assert policy_modules, "the pack's guidance_core.numerics is not loaded"
    runs: dict[tuple[str, str], AuditedRun] = {}

    def get(case: Case, family: str) -> AuditedRun:
        if (case.name, family) not in runs:
            model = tiny_model(family)
            patched = case.build(model, family, weak_model_of)
            normal = _sample(patched, model, family, case)
            calls = []
            with pytest.MonkeyPatch.context() as patch:
                for module in policy_modules:
                    patch.setattr(module, "has_no_float64", lambda device: calls.append(device) or True)
                with PackAudit(model.load_device, forbid_float64=True) as audit:
                    float32 = _sample(patched, model, family, case)
            runs[(case.name, family)] = AuditedRun(normal, float32, len(calls), audit)
        return runs[(case.name, family)]

    return get


def _sample(patched, model, family: str, case: Case) -> torch.Tensor:
    positive, negative = make_conditioning(family, seed=1)
    # LTX-2 samples a (video, audio) NestedTensor latent.
    latent = make_ltxav_latent(seed=2) if family == "ltxav" else make_latent(family, h=16, w=16, seed=2)
    if case.guider:
        return sample_custom_advanced(patched, latent, "euler", scheduler_sigmas(model, steps=STEPS), seed=3)
    out = sample(patched, positive, negative, latent, cfg=case.cfg, steps=STEPS, seed=3)
    return torch.cat([part.flatten() for part in out.unbind()]) if family == "ltxav" else out


def test_every_node_of_the_table_is_run_here():
    covered = {node_id for case in CASES for node_id in case.node_ids}
    assert covered == set(NODE_IDS), f"no device case for {sorted(set(NODE_IDS) - covered)}"


@pytest.mark.parametrize(("case", "family"), PARAMS)
def test_every_node_samples_without_float64(audited, case: Case, family: str):
    run = audited(case, family)
    assert not run.audit.float64, run.audit.float64
    assert torch.isfinite(run.normal).all() and torch.isfinite(run.float32).all()
    if case.accumulates:
        assert run.policy_calls > 0, "the float32 policy was never consulted: both runs took the float64 path"
    error = relative_error(run.float32, run.normal)
    assert error < FLOAT32_RTOL, f"max|float32 policy − float64 policy| / max|float64 policy| = {error:.2e}"


@pytest.mark.parametrize(("case", "family"), PARAMS)
def test_the_pack_creates_tensors_on_the_latents_device(audited, case: Case, family: str):
    audit = audited(case, family).audit
    assert audit.pack_calls > 0, "no call of the pack was recorded: the audit saw nothing"
    assert not audit.factories, f"created without the latent's device: {audit.factories}"
    assert not audit.moves, f"moved off the latent's device: {audit.moves}"
    assert not audit.off_device, f"returned off the latent's device: {audit.off_device}"


@pytest.mark.parametrize(("case", "family"), PARAMS)
def test_the_pack_reads_tensors_back_only_for_its_scalar_decisions(audited, case: Case, family: str):
    reads = set(audited(case, family).audit.host_reads)
    assert reads <= ALLOWED_HOST_READS, f"host reads outside the named decisions: {sorted(reads - ALLOWED_HOST_READS)}"
    # The audit does see the pack's reads: the step driver's, or NAG's (which runs outside the step driver).
    assert reads & {("nodes/host/step.py", "_step_context"), ("nodes/host/nag.py", "nag_apply_model_wrapper"),
                    ("nodes/host/pladis.py", "pladis_apply_model_wrapper")}
