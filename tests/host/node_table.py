"""The table of nodes: one row per public node id, with the families it is tested on, the value-level tests
that check it against an independent reference (a built-in node, diffusers, cf_guidance, or a reference
written from the method's definition), and the settings its effect test runs on every family it supports.

Three test files are parametrized from it, so a new node is one row:
- test_node_contract: the public ids, documentation, and that every named value-level test exists (a node
  without one, or a row naming a test that does not exist, fails the suite);
- test_node_families: every effect case on the image families (SD1.5, SD3, Flux);
- test_video_dits: every effect case on the video DiTs (Wan, LTXV, HunyuanVideo).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from support import CFG, node

IMAGE = ("sd15", "sd3", "flux")
VIDEO = ("wan", "ltxv", "hunyuan_video")
UNET_AND_DITS = IMAGE + VIDEO
BLOCK_DITS = ("sd3", "flux") + VIDEO  # the families with transformer blocks to skip (SLG)
SINGLE_BLOCKS = ("hunyuan_video",)  # a video DiT with single-stream blocks (Flux has them too; tested elsewhere)
# Joint-attention and hook-driven DiTs (test_family_joint.py): Qwen-Image, Lumina 2, Z-Image, Kandinsky 5 video/image.
JOINT = ("qwen_image", "lumina2", "z_image", "kandinsky5", "kandinsky5_image")
UNET_AND_DITS += JOINT
BLOCK_DITS += JOINT
# The families without a block patch in their forward (module hooks; test_family_hookless).
HOOKLESS = ("pixart", "hidream", "omnigen2", "cosmos_predict2", "cosmos")
UNET_AND_DITS += HOOKLESS
BLOCK_DITS += HOOKLESS
SINGLE_BLOCKS += ("hidream",)
SUBLAYER_DITS = VIDEO + JOINT + HOOKLESS  # SLG attention / feedforward
# The Flux-code families (test_family_flux2.py): Flux.2 dev and Klein, Chroma, Chroma Radiance, LongCat-Image
# (ComfyUI 0.33.0 only). Each has double and single blocks and every sublayer mode, so every DiT case runs on them.
FLUX_CODE = ("flux2", "flux2_klein", "chroma", "chroma_radiance", "longcat_image")
UNET_AND_DITS, BLOCK_DITS, SINGLE_BLOCKS = UNET_AND_DITS + FLUX_CODE, BLOCK_DITS + FLUX_CODE, SINGLE_BLOCKS + FLUX_CODE
SUBLAYER_DITS += FLUX_CODE
# tests/host/test_family_blockpatch.py: Mochi (video) and AuraFlow (image, with single layers).
BLOCKPATCH = ("mochi", "auraflow")
# AuraFlow's tiny model: the CFG rules and SEG on a single layer move it < MIN_EFFECT (left out, see report).
UNET_AND_DITS += ("mochi",)
BLOCK_DITS += BLOCKPATCH
SINGLE_BLOCKS += ("auraflow",)
DIT_SUBLAYERS = VIDEO + BLOCKPATCH  # the DiTs whose blocks have attention and feed-forward sublayers tested here
SUBLAYER_DITS += BLOCKPATCH
# tests/host/test_family_new33.py: families ComfyUI added after 0.8.0 (Anima, Krea 2, Ernie Image, Lens, Ideogram 4,
# CogVideoX, MageFlow, JoyImage), run on hosts that have them and skipped elsewhere. Ernie Image refuses attention
# perturbations (PAG, SEG, SLG attention_scores): it is only in the sublayer cases (SLG attention/feedforward/negative
# branch).
NEW_IN_033 = ("anima", "krea2", "lens", "ideogram4", "cogvideox", "mage_flow", "joyimage", "ernie")
NEW_IN_033_ATTENTION = ("anima", "krea2", "lens", "ideogram4", "cogvideox", "mage_flow", "joyimage")
UNET_AND_DITS += NEW_IN_033_ATTENTION
BLOCK_DITS += NEW_IN_033_ATTENTION
SUBLAYER_DITS += NEW_IN_033


@dataclass(frozen=True)
class EffectCase:
    """One setting of a node: ``build(model, weak_model)`` gives the patched model, sampled at ``cfg`` on each of
    ``families``; the result must be finite and clearly different from plain CFG at the same cfg."""

    name: str
    build: Callable
    families: tuple[str, ...]
    cfg: float = CFG


def _slg(mode: str, target: str = "new branch", layers: str = "1") -> Callable:
    def build(model, weak):
        return node("GuidersSLG", model=model, scale=3.0, layers=layers, mode=mode, start_percent=0.0,
                    end_percent=1.0, target=target)

    return build


def _scheduled_cfg(model, weak):
    return node("GuidersScheduledCFG", model=model,
                schedule=node("GuidersScheduleLinear", start_value=8.0, end_value=2.0))


def _cfg_zero_star(zero_init_steps: int) -> Callable:
    return lambda model, weak: node("GuidersCFGZeroStar", model=model, zero_init_steps=zero_init_steps)


def _cfg_normalize(mode: str) -> Callable:
    return lambda model, weak: node("GuidersCFGNormalize", model=model, mode=mode)


@dataclass(frozen=True)
class NodeRow:
    node_id: str
    families: tuple[str, ...]  # the tiny families its value tests run on
    reference: str  # what the value tests compare it with
    value_tests: tuple[str, ...]  # "test_file.py::test_function"
    effect_cases: tuple[EffectCase, ...] = field(default_factory=tuple)


NODE_TABLE = (
    NodeRow("GuidersScheduleConstant", (), "the schedule's closed form (guidance_core/schedules)",
            ("test_schedule_route.py::test_a_nodes_widget_values_give_the_curve_of_the_schedule_it_outputs",)),
    NodeRow("GuidersScheduleLinear", (), "the schedule's closed form",
            ("test_schedule_route.py::test_a_nodes_widget_values_give_the_curve_of_the_schedule_it_outputs",)),
    NodeRow("GuidersScheduleCosine", (), "cf_guidance get_cos_sched",
            ("test_schedule_route.py::test_a_nodes_widget_values_give_the_curve_of_the_schedule_it_outputs",
             "test_node_parity.py::test_scheduled_cfg_uses_cf_guidance_cosine_value_at_every_step")),
    NodeRow("GuidersScheduleCustom", (), "linear interpolation of the typed values",
            ("test_schedule_route.py::test_a_nodes_widget_values_give_the_curve_of_the_schedule_it_outputs",)),
    NodeRow("GuidersScheduledCFG", ("sd15",), "cf_guidance get_cos_sched, per step",
            ("test_node_parity.py::test_scheduled_cfg_uses_cf_guidance_cosine_value_at_every_step",),
            effect_cases=(EffectCase("ScheduledCFG", _scheduled_cfg, UNET_AND_DITS),)),
    NodeRow("GuidersCFGNormalize", ("sd15",), "cf_guidance BaseNorm/TNorm/FullNorm transforms",
            ("test_node_parity.py::test_cfg_normalize_matches_cf_guidance_transforms",),
            effect_cases=(
                EffectCase("CFGNormalize-base_norm", _cfg_normalize("base_norm"), UNET_AND_DITS),
                # t_norm's scale multiplies a direction normalised to the uncond's norm: cf_guidance uses 0.25 → 0.05.
                EffectCase("CFGNormalize-t_norm", _cfg_normalize("t_norm"), UNET_AND_DITS, cfg=0.3),
                EffectCase("CFGNormalize-full_norm", _cfg_normalize("full_norm"), UNET_AND_DITS, cfg=0.3),
            )),
    NodeRow("GuidersRescaleCFG", ("sd15",), "Lin et al. 2023 Alg. 2 in noise space, written in the test",
            ("test_node_values.py::test_rescale_cfg_rescales_the_noise_prediction",),
            effect_cases=(EffectCase("RescaleCFG", lambda m, w: node("GuidersRescaleCFG", model=m, multiplier=0.7),
                                     UNET_AND_DITS),)),
    NodeRow("GuidersCFGZeroStar", IMAGE, "diffusers ClassifierFreeZeroStarGuidance",
            ("test_node_parity.py::test_cfg_zero_star_matches_diffusers",),
            effect_cases=(
                EffectCase("CFGZeroStar-zero_init_1", _cfg_zero_star(1), UNET_AND_DITS),
                EffectCase("CFGZeroStar-zero_init_0", _cfg_zero_star(0), VIDEO + ("mochi",)),
            )),
    NodeRow("GuidersAPG", IMAGE, "diffusers AdaptiveProjectedGuidance",
            ("test_node_parity.py::test_apg_matches_diffusers",),
            effect_cases=(EffectCase("APG", lambda m, w: node("GuidersAPG", model=m, eta=0.0, norm_threshold=5.0,
                                                         momentum=-0.5), UNET_AND_DITS),)),
    NodeRow("GuidersPAG", IMAGE + VIDEO, "ComfyUI PerturbedAttentionGuidance; on DiTs the identity map on the "
            "image rows, written in the test",
            ("test_node_parity.py::test_pag_matches_builtin_perturbed_attention_guidance",
             "test_node_parity.py::test_identity_attention_on_flux_joint_attention_matches_a_reference_from_the_definition",
             "test_video_dits.py::test_identity_self_attention_matches_a_reference_from_the_definition",
             "test_family_joint.py::test_identity_attention_matches_a_reference_from_the_definition",
             "test_family_hookless.py::test_identity_self_attention_matches_a_reference_from_the_definition"),
            effect_cases=(
                EffectCase("PAG", lambda m, w: node("GuidersPAG", model=m, scale=3.0), UNET_AND_DITS),
                EffectCase("PAG-single", lambda m, w: node("GuidersPAG", model=m, scale=3.0, layers="single.1"),
                           SINGLE_BLOCKS),
            )),
    NodeRow("GuidersSEG", ("sd15",) + VIDEO, "the query blur written in the test (own Gaussian), per frame on video",
            ("test_node_values.py::test_seg_on_a_non_square_unet_latent_blurs_queries_over_the_token_grid",
             "test_video_dits.py::test_seg_blurs_each_frame_as_a_reference_from_the_definition",
             "test_family_joint.py::test_seg_blurs_the_image_token_grid_as_a_reference_from_the_definition",
             "test_family_hookless.py::test_seg_blurs_the_queries_on_the_token_grid_as_a_reference"),
            effect_cases=(
                EffectCase("SEG-sigma10", lambda m, w: node("GuidersSEG", model=m, scale=3.0, blur_sigma=10.0),
                           UNET_AND_DITS),
                EffectCase("SEG-sigma99999", lambda m, w: node("GuidersSEG", model=m, scale=3.0, blur_sigma=99999.0),
                           UNET_AND_DITS),
                EffectCase("SEG-single", lambda m, w: node("GuidersSEG", model=m, scale=3.0, blur_sigma=10.0,
                                                           layers="single.1"), ("hunyuan_video",)),
            )),
    NodeRow("GuidersSAG", ("sd15", "sdxl"), "ComfyUI SelfAttentionGuidance",
            ("test_node_parity.py::test_sag_matches_builtin_self_attention_guidance",),
            effect_cases=(EffectCase("SAG", lambda m, w: node("GuidersSAG", model=m, scale=0.5, blur_sigma=2.0),
                                     ("sd15",)),)),
    NodeRow("GuidersSLG", ("sd3", "flux") + VIDEO, "ComfyUI SkipLayerGuidanceSD3 / SkipLayerGuidanceDiT(Simple); "
            "sublayer skips written in the test",
            ("test_node_parity.py::test_slg_block_matches_skip_layer_guidance_sd3",
             "test_node_parity.py::test_slg_block_matches_skip_layer_guidance_dit_on_flux",
             "test_node_parity.py::test_slg_rescale_matches_builtin_rescaling_scale",
             "test_video_dits.py::test_slg_block_matches_skip_layer_guidance_dit",
             "test_slg_sublayers.py::test_sublayer_skip_matches_its_definition",
             "test_family_joint.py::test_slg_block_matches_skip_layer_guidance_dit",
             "test_family_joint.py::test_slg_block_matches_a_reference_from_the_definition",
             "test_family_joint.py::test_sublayer_skip_matches_its_definition",
             "test_family_hookless.py::test_slg_block_matches_the_block_replaced_by_the_identity",
             "test_family_hookless.py::test_sublayer_skip_matches_its_definition"),
            effect_cases=(
                EffectCase("SLG-block", _slg("block"), BLOCK_DITS),
                EffectCase("SLG-attention_scores", _slg("attention_scores"), BLOCK_DITS),
                EffectCase("SLG-attention", _slg("attention"), SUBLAYER_DITS),
                EffectCase("SLG-feedforward", _slg("feedforward"), SUBLAYER_DITS),
                EffectCase("SLG-block-negative_branch", _slg("block", target="negative branch"), SUBLAYER_DITS),
                EffectCase("SLG-block-single", _slg("block", layers="single.1"), SINGLE_BLOCKS),
                EffectCase("SLG-attention_scores-single", _slg("attention_scores", layers="single.1"), SINGLE_BLOCKS),
            )),
    NodeRow("GuidersAutoguidance", ("sd15",), "Karras et al. 2024: CFG + s·(cond − weak), written in the test",
            ("test_node_values.py::test_autoguidance_adds_scaled_cond_minus_weak_to_cfg",),
            effect_cases=(EffectCase("Autoguidance", lambda m, w: node("GuidersAutoguidance", model=m, weak_model=w,
                                                                           scale=2.0), UNET_AND_DITS),)),
    NodeRow("GuidersGuider", ("sd15",), "KSampler with the same model and cfg (ComfyUI's CFGGuider)",
            ("test_node_parity.py::test_guiders_guider_with_sampler_custom_advanced_equals_ksampler",
             "test_node_parity.py::test_guiders_guider_schedule_equals_scheduled_cfg_with_ksampler")),
)



def _stack(model, weak):
    model = node("GuidersPAG", model=model, scale=2.0)
    model = node("GuidersSEG", model=model, scale=2.0, blur_sigma=10.0)
    model = node("GuidersAPG", model=model, eta=0.0, norm_threshold=5.0, momentum=-0.5)
    return node("GuidersRescaleCFG", model=model, multiplier=0.7)


CHAIN_CASES = (EffectCase("PAG+SEG+APG+Rescale", _stack, IMAGE + HOOKLESS),)  # several nodes in one chain

NODE_IDS = [row.node_id for row in NODE_TABLE]


def effect_params(families: tuple[str, ...]) -> list:
    """pytest params ``(case, family)`` for every effect case (rows, then chains) on each of ``families``."""
    import pytest

    cases = [case for row in NODE_TABLE for case in row.effect_cases] + list(CHAIN_CASES)
    return [pytest.param(case, family, id=f"{case.name}-{family}")
            for case in cases for family in case.families if family in families]

