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
# tests/host/test_family_wan_variants.py: the Wan variants ComfyUI builds from WanModel (I2V, Fun-Control, Camera,
# VACE, HuMo, S2V, Animate, Wan 2.2 5B T2V and TI2V), all on the "wan" record, main blocks only.
WAN_VARIANTS = ("wan_i2v", "wan_fun_control", "wan_camera", "wan_vace", "wan_humo", "wan_s2v", "wan_animate",
                "wan22_5b", "wan22_ti2v")
WAN_VARIANTS_0_33 = ("wan_dancer", "wan_flow_rvs")  # ComfyUI 0.33.0 and later (skipped on 0.8.0)
UNET_AND_DITS += WAN_VARIANTS + WAN_VARIANTS_0_33
BLOCK_DITS += WAN_VARIANTS + WAN_VARIANTS_0_33
SUBLAYER_DITS += WAN_VARIANTS + WAN_VARIANTS_0_33
# tests/host/test_family_hydit_cascade.py: HunyuanDiT (image; forward hooks, attention recomputed in its module).
HYDIT = ("hunyuan_dit",)
UNET_AND_DITS, BLOCK_DITS, SUBLAYER_DITS = UNET_AND_DITS + HYDIT, BLOCK_DITS + HYDIT, SUBLAYER_DITS + HYDIT
# Stable Cascade stage C (the same file): its AttnBlocks are the layers; no sublayer modes (attention is the only one).
# Its layers are named by level ("down.1.1"), so the SLG cases on layer "1" do not apply: its own, after CHAIN_CASES.
CASCADE_FAMILIES = ("stable_cascade_c",)
UNET_AND_DITS += CASCADE_FAMILIES
# tests/host/test_family_ltx2.py: LTX-2, the audio-video model, and its LTX-2.3 checkpoint config (cross-attention
# AdaLN and gated attention: ComfyUI 0.33.0 only). Every method acts on its video stream; block and sublayer modes.
LTX2 = ("ltxav", "ltxav_2_3")
UNET_AND_DITS, BLOCK_DITS, SUBLAYER_DITS = UNET_AND_DITS + LTX2, BLOCK_DITS + LTX2, SUBLAYER_DITS + LTX2
# tests/host/test_family_new33.py: families ComfyUI added after 0.8.0 (Anima, Krea 2, Ernie Image, Lens, Ideogram 4,
# CogVideoX, MageFlow, JoyImage), run on hosts that have them and skipped elsewhere. Every method on each (Ernie
# Image's attention perturbations recomputed in its attention module).
NEW_IN_033 = ("anima", "krea2", "lens", "ideogram4", "cogvideox", "mage_flow", "joyimage", "ernie")
NEW_IN_033 += ("boogu",)  # Boogu-Image: double-stream then single-stream layers, forward hooks
NEW_IN_033 += ("pixeldit",)  # PixelDiT: its patch blocks, forward hooks
NEW_IN_033 += ("hidream_o1",)  # HiDream O1: its decoder layers, forward hooks inside its forward
NEW_IN_033_ATTENTION = NEW_IN_033
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


# Issue #13: the CFG rules and corrections of nodes/cfg_rule_nodes.py (tests/host/test_rule_parity.py).
RULES = "test_rule_parity.py::"
NODE_TABLE += (
    NodeRow("GuidersTCFG", ("sd15", "flux"), "ComfyUI TCFG; diffusers TangentialClassifierFreeGuidance",
            (RULES + "test_tcfg_matches_builtin_tcfg", RULES + "test_tcfg_matches_diffusers_tangential_cfg",
             RULES + "test_tcfg_with_pag_and_a_cfg_schedule_is_damped_uncond_then_scheduled_cfg_plus_pag",
             RULES + "test_tcfg_then_mambo_g_is_mambo_g_on_the_damped_uncond"),
            effect_cases=(EffectCase("TCFG", lambda m, w: node("GuidersTCFG", model=m), IMAGE + VIDEO),)),
    NodeRow("GuidersMAMBOG", ("sd15", "flux"), "diffusers MagnitudeAwareGuidance",
            (RULES + "test_mambo_g_matches_diffusers_magnitude_aware_guidance",
             RULES + "test_mambo_g_with_pag_and_its_schedule_is_the_rule_at_the_scheduled_scale_plus_pag",
             RULES + "test_a_second_cfg_rule_raises_naming_both"),
            effect_cases=(EffectCase("MAMBOG", lambda m, w: node("GuidersMAMBOG", model=m, alpha=2.0),
                                     IMAGE + VIDEO),)),
    NodeRow("GuidersFreSca", ("sd15", "flux"), "ComfyUI FreSca",
            (RULES + "test_fresca_matches_builtin_fresca",
             RULES + "test_fresca_with_pag_and_its_schedule_is_the_rule_at_the_scheduled_scale_plus_pag",
             RULES + "test_fresca_then_rescale_cfg_rescales_the_fresca_result"),
            effect_cases=(EffectCase("FreSca", lambda m, w: node("GuidersFreSca", model=m, scale_low=0.8,
                                                                 scale_high=1.5, freq_cutoff=3), IMAGE + VIDEO),)),
    NodeRow("GuidersMahiro", ("sd15", "flux"), "ComfyUI Mahiro",
            (RULES + "test_mahiro_matches_builtin_mahiro",
             RULES + "test_mahiro_with_pag_and_its_schedule_is_the_rule_at_the_scheduled_scale_plus_pag",
             RULES + "test_mahiro_then_cfg_renorm_renorms_the_mahiro_result"),
            effect_cases=(EffectCase("Mahiro", lambda m, w: node("GuidersMahiro", model=m), IMAGE + VIDEO),)),
    NodeRow("GuidersCFGRenorm", ("sd15", "flux"), "ComfyUI CFGNorm (and its pre_cfg mode on 0.33.0); ComfyUI "
            "RenormCFG (Lumina 2)",
            (RULES + "test_cfg_renorm_cfg_norm_matches_builtin_cfg_norm",
             RULES + "test_cfg_renorm_pre_cfg_matches_builtin_cfg_norm_pre_cfg",
             RULES + "test_cfg_renorm_lumina_matches_builtin_renorm_cfg",
             RULES + "test_cfg_renorm_after_pag_and_a_cfg_schedule_renorms_the_whole_result",
             RULES + "test_cfg_renorm_strength_schedule_gives_each_step_its_strength",
             RULES + "test_mahiro_then_cfg_renorm_renorms_the_mahiro_result"),
            effect_cases=tuple(EffectCase(f"CFGRenorm-{mode}", lambda m, w, mode=mode: node(
                "GuidersCFGRenorm", model=m, mode=mode, strength=1.0), IMAGE + VIDEO)
                for mode in ("cfg_norm", "cfg_norm_pre_cfg", "lumina_renorm"))),
    NodeRow("GuidersDynamicThresholding", ("sd15", "flux"), "diffusers DDPMScheduler._threshold_sample; "
            "sd-dynamic-thresholding's mimic scale written in the test",
            (RULES + "test_dynamic_thresholding_imagen_matches_diffusers_threshold_sample",
             RULES + "test_dynamic_thresholding_mimic_matches_sd_dynamic_thresholding",
             RULES + "test_fdg_then_dynamic_thresholding_thresholds_the_fdg_result",
             RULES + "test_apg_mix_then_dynamic_thresholding_thresholds_the_apg_mix_result"),
            effect_cases=(
                EffectCase("DynamicThresholding-imagen", lambda m, w: node(
                    "GuidersDynamicThresholding", model=m, mode="imagen", percentile=0.9, max_value=1.5,
                    mimic_scale=7.0, strength=1.0), IMAGE + VIDEO),
                EffectCase("DynamicThresholding-mimic", lambda m, w: node(
                    "GuidersDynamicThresholding", model=m, mode="mimic_scale", percentile=1.0, max_value=1.0,
                    mimic_scale=2.0, strength=1.0), IMAGE + VIDEO),
            )),
    NodeRow("GuidersFDG", ("sd15", "flux"), "diffusers FrequencyDecoupledGuidance (power-of-two latent); plain CFG "
            "for equal scales on 12x20",
            (RULES + "test_fdg_matches_diffusers_frequency_decoupled_guidance",
             RULES + "test_fdg_keeps_a_non_power_of_two_latent_and_equal_scales_give_plain_cfg",
             RULES + "test_fdg_with_pag_is_fdg_plus_pag",
             RULES + "test_fdg_then_dynamic_thresholding_thresholds_the_fdg_result"),
            effect_cases=(EffectCase("FDG", lambda m, w: node("GuidersFDG", model=m, scales="10, 5",
                                                              parallel_weights="0.5"), IMAGE + VIDEO),)),
    NodeRow("GuidersAPGMix", ("sd15", "flux"), "diffusers AdaptiveProjectedMixGuidance",
            (RULES + "test_apg_mix_matches_diffusers_adaptive_projected_mix_guidance",
             RULES + "test_apg_mix_with_pag_and_its_schedule_is_the_rule_at_the_scheduled_scale_plus_pag",
             RULES + "test_apg_mix_then_dynamic_thresholding_thresholds_the_apg_mix_result"),
            effect_cases=(EffectCase("APGMix", lambda m, w: node("GuidersAPGMix", model=m, apg_scale=6.0,
                                                                 apg_start_step=0, eta=0.0, norm_threshold=10.0,
                                                                 momentum=-0.5), IMAGE + VIDEO),)),
)


def _nag(model, weak):
    """GuidersNAG with a seeded negative as wide as the model's text input (its cross-attention keys' input, or
    Wan's text_embedding)."""
    import torch

    dm = model.get_model_object("diffusion_model")
    if hasattr(dm, "text_embedding"):  # Wan
        first = dm.text_embedding[0]
    elif getattr(dm, "caption_projection", None) is not None:  # LTXV
        first = dm.caption_projection.linear_1
    elif hasattr(dm, "joint_blocks"):  # SD3 (joint attention): its context_embedder
        first = dm.context_embedder
    elif hasattr(dm, "y_embedder"):  # PixArt
        first = dm.y_embedder.y_proj.fc1
    elif type(dm).__name__ in ("MiniTrainDIT", "Anima"):  # Cosmos Predict 2, Anima
        first = dm.blocks[0].cross_attn.k_proj
    elif hasattr(dm, "text_transformer_blocks"):  # Kandinsky 5: its text blocks need the pooled output too
        first = dm.text_embeddings.in_layer
    elif hasattr(dm, "mlp_t5"):  # HunyuanDiT: the CLIP part is the context; the mT5 part and masks are extras
        first = dm.blocks[0].attn2.kv_proj
    elif hasattr(dm, "txt_in"):  # Flux, Flux.2, Qwen-Image (joint attention): the text stream's input
        first = dm.txt_in
    else:  # UNet
        first = next(m.to_k for name, m in dm.named_modules() if name.endswith(".attn2"))
    generator = torch.Generator().manual_seed(11)
    context = torch.randn(1, 12, first.in_features, generator=generator)
    extras = {}
    if hasattr(dm, "text_transformer_blocks"):
        extras["pooled_output"] = torch.randn(1, dm.pooled_text_embeddings.in_layer.in_features, generator=generator)
    if getattr(dm, "vector_in", None) is not None:  # Flux.1: the negative's pooled CLIP vector
        extras["pooled_output"] = torch.randn(1, dm.vector_in.in_layer.in_features, generator=generator)
    if hasattr(dm, "joint_blocks"):  # SD3: the negative's pooled vector (y_embedder)
        extras["pooled_output"] = torch.randn(1, dm.y_embedder.mlp[0].in_features, generator=generator)
    if hasattr(dm, "mlp_t5"):
        mask = torch.ones(1, 12, dtype=torch.long)
        mask[:, -2:] = 0
        t5 = torch.randn(1, 12, dm.mlp_t5[0].in_features, generator=generator)
        extras.update(attention_mask=mask, conditioning_mt5xl=t5, attention_mask_mt5xl=mask.clone())
    return node("GuidersNAG", model=model, negative=[[context, extras]], scale=4.0, alpha=0.5)


NAG_EFFECT_FAMILIES = ("sd15", "wan", "ltxv", "pixart", "cosmos_predict2", "anima", "kandinsky5", "kandinsky5_image",
                       "hunyuan_dit", "flux", "flux2", "qwen_image", "sd3", "chroma")
NODE_TABLE += (
    NodeRow("GuidersNAG", ("sd15", "sdxl", "wan", "ltxv", "pixart", "cosmos_predict2", "anima", "kandinsky5",
                           "hunyuan_dit", "flux", "flux2", "qwen_image", "sd3", "chroma"),
            "Chen et al. 2025 (arXiv:2505.21179) §3 written in the test, in the host's own cross-attention modules "
            "and, on the joint-attention families, in the host's blocks written out with the negative's text stream",
            ("test_nag.py::test_nag_matches_the_paper_through_sampling",
             "test_nag.py::test_nag_window_is_respected",
             "test_nag.py::test_nag_layers_choose_the_cross_attentions",
             "test_nag.py::test_nag_on_anima_embeds_the_negative_through_its_llm_adapter",
             "test_nag.py::test_nag_on_kandinsky5_carries_the_negative_through_its_text_blocks",
             "test_nag.py::test_nag_on_hunyuan_dit_guides_attn2_with_the_models_text_states",
             "test_nag_joint.py::test_joint_nag_matches_the_paper_through_sampling",
             "test_nag_joint.py::test_joint_nag_window_is_respected"),
            effect_cases=(EffectCase("NAG", _nag, NAG_EFFECT_FAMILIES + WAN_VARIANTS + WAN_VARIANTS_0_33),
                          EffectCase("NAG-cfg1", _nag, NAG_EFFECT_FAMILIES, cfg=1.0))),
)



def _stack(model, weak):
    model = node("GuidersPAG", model=model, scale=2.0)
    model = node("GuidersSEG", model=model, scale=2.0, blur_sigma=10.0)
    model = node("GuidersAPG", model=model, eta=0.0, norm_threshold=5.0, momentum=-0.5)
    return node("GuidersRescaleCFG", model=model, multiplier=0.7)


CHAIN_CASES = (EffectCase("PAG+SEG+APG+Rescale", _stack, IMAGE + HOOKLESS),)  # several nodes in one chain
# The SLG cases of Stable Cascade stage C, on a layer it has (the DiT cases name layer "1").
CHAIN_CASES += (EffectCase("SLG-block-down.1.1", _slg("block", layers="down.1.1"), CASCADE_FAMILIES),
                EffectCase("SLG-attention_scores-up.0.0", _slg("attention_scores", layers="up.0.0"), CASCADE_FAMILIES))



def effect_params(families: tuple[str, ...]) -> list:
    """pytest params ``(case, family)`` for every effect case (rows, then chains) on each of ``families``."""
    import pytest

    cases = [case for row in NODE_TABLE for case in row.effect_cases] + list(CHAIN_CASES)
    return [pytest.param(case, family, id=f"{case.name}-{family}")
            for case in cases for family in case.families if family in families]


# CFG rules that change which branches a step evaluates (tests/host/test_branch_rule_nodes.py).
def _empty_conditioning_for(model) -> list:
    """A third conditioning of the image family's shapes, standing in for Perp-Neg's empty prompt."""
    from tiny_models import make_conditioning

    family = {"BaseModel": "sd15", "SD3": "sd3", "Flux": "flux"}[type(model.model).__name__]  # comfy.model_base
    return make_conditioning(family, seed=5)[0]


NODE_TABLE += (
    NodeRow("GuidersCFGInterval", ("sd15", "sd3"), "Kynkäänniemi et al. 2024 written in the test "
            "(σ as noise-to-signal ratio, t/(1 − t) on flow models); ComfyUI's percent windows",
            ("test_branch_rule_nodes.py::test_cfg_interval_matches_the_paper_in_sigma",
             "test_branch_rule_nodes.py::test_cfg_interval_in_percent_matches_comfyui_percent_windows",
             "test_branch_rule_nodes.py::test_cfg_interval_with_a_schedule_and_pag_equals_the_documented_composition"),
            effect_cases=(EffectCase("CFGInterval", lambda m, w: node("GuidersCFGInterval", model=m, mode="sigma",
                                                                      sigma_high=5.42, sigma_low=0.28), IMAGE),)),
    NodeRow("GuidersAdaptiveCutoff", ("sd15", "sd3"), "Castillo et al. 2023 (the AG policy) written in the test, "
            "per sample",
            ("test_branch_rule_nodes.py::test_adaptive_cutoff_matches_the_paper",
             "test_branch_rule_nodes.py::test_adaptive_cutoff_is_per_image_in_a_batch",
             "test_branch_rule_nodes.py::test_adaptive_cutoff_with_a_schedule_and_pag_equals_the_documented_composition"),
            # 0.5: below the tiny DiTs' cos(cond, uncond) (about 0.7), so guidance is cut after the first step.
            effect_cases=(EffectCase("AdaptiveCutoff", lambda m, w: node("GuidersAdaptiveCutoff", model=m,
                                                                         threshold=0.5), IMAGE),)),
    NodeRow("GuidersPerpNeg", ("sd15", "sd3"), "ComfyUI PerpNeg / PerpNegGuider (whole batch); Armandpour et al. "
            "2023 written in the test (per image)",
            ("test_branch_rule_nodes.py::test_perp_neg_whole_batch_equals_comfyui_perp_neg",
             "test_branch_rule_nodes.py::test_perp_neg_whole_batch_equals_perp_neg_guider",
             "test_branch_rule_nodes.py::test_perp_neg_per_image_matches_the_paper_and_differs_from_the_whole_batch",
             "test_branch_rule_nodes.py::test_perp_neg_with_a_schedule_and_pag_equals_the_documented_composition"),
            effect_cases=(EffectCase("PerpNeg", lambda m, w: node("GuidersPerpNeg", model=m, neg_scale=1.0,
                                                                  empty_conditioning=_empty_conditioning_for(m)),
                                     IMAGE),)),
)

# Rules that remember the run's trajectory (tests/host/test_trajectory_rule_nodes.py).
NODE_TABLE += (
    NodeRow("GuidersMomentumGuidance", ("sd15", "sd3"), "Liao et al. 2026 Alg. 1 written in the test (velocity and "
            "x0 spaces)",
            ("test_trajectory_rule_nodes.py::test_momentum_guidance_matches_the_paper",
             "test_trajectory_rule_nodes.py::test_momentum_guidance_with_a_schedule_and_pag_equals_the_documented_composition"),
            effect_cases=(EffectCase("MomentumGuidance", lambda m, w: node("GuidersMomentumGuidance", model=m,
                                                                           momentum=2.0, ema=0.6), IMAGE),)),
    NodeRow("GuidersSMCCFG", ("sd15", "sd3"), "Wang et al. 2026 §3.4 written in the test (velocity and x0 spaces)",
            ("test_trajectory_rule_nodes.py::test_smc_cfg_matches_the_paper",
             "test_trajectory_rule_nodes.py::test_smc_cfg_with_a_schedule_and_pag_equals_the_documented_composition"),
            effect_cases=(EffectCase("SMCCFG", lambda m, w: node("GuidersSMCCFG", model=m, sliding_lambda=6.0, k=1.0),
                                     IMAGE),)),
)

# Noise on the conditioning (tests/host/test_condition_annealing_nodes.py).
NODE_TABLE += (
    NodeRow("GuidersCADS", ("sd15", "sd3"), "Sadat et al. 2024 §3 written in the test (a model wrapper noising "
            "the same draws)",
            ("test_condition_annealing_nodes.py::test_cads_matches_the_paper",
             "test_condition_annealing_nodes.py::test_cads_with_a_schedule_and_pag_equals_the_documented_composition"),
            effect_cases=(EffectCase("CADS", lambda m, w: node("GuidersCADS", model=m, noise_scale=0.5, tau1=0.3,
                                                               tau2=0.95, psi=1.0), IMAGE),)),
)

# Guidance without a trained unconditional: TPG, TSG, ICG (tests/host/test_condition_free.py).
NODE_TABLE += (
    NodeRow("GuidersTPG", ("sd15", "flux", "wan"), "Rajabi et al. 2025 §3 written in the test (pre-hooks on the "
            "host's blocks shuffling their input tokens)",
            ("test_condition_free.py::test_tpg_matches_token_shuffle_reference",
             "test_condition_free.py::test_tpg_window_is_respected",
             "test_condition_free.py::test_tpg_rides_in_the_one_batched_forward",
             "test_condition_free.py::test_schedule_drives_the_scale_per_step"),
            effect_cases=(EffectCase("TPG", lambda m, w: node("GuidersTPG", model=m, scale=3.0), IMAGE + VIDEO),)),
    NodeRow("GuidersTSG", ("sd15", "sd3", "flux", "wan"), "Sadat et al. 2025 §4 written in the test (a forward "
            "hook noising the host's time-step embedding module in a cond pass)",
            ("test_condition_free.py::test_tsg_matches_time_noised_reference",
             "test_condition_free.py::test_tsg_window_and_forward_counts",
             "test_condition_free.py::test_tsg_with_pag_shares_no_prefix_with_the_cond",
             "test_condition_free.py::test_schedule_drives_the_scale_per_step"),
            effect_cases=(EffectCase("TSG", lambda m, w: node("GuidersTSG", model=m, scale=3.0, noise_scale=2.0),
                                     IMAGE + ("wan",)),)),
    NodeRow("GuidersICG", ("sd15", "flux"), "Sadat et al. 2025 §3 written in the test (a model wrapper giving the "
            "uncond std(y)·n)",
            ("test_condition_free.py::test_icg_matches_independent_condition_reference",),
            effect_cases=(EffectCase("ICG", lambda m, w: node("GuidersICG", model=m, mode="per step", seed=0),
                                     IMAGE + VIDEO),)),
)

# Issue #12's attention-level methods.
NODE_TABLE += (
    NodeRow("GuidersPLADIS", ("sd15", "sdxl", "wan", "ltxv", "wan_i2v", *LTX2),
            "Kim & Sim 2025 (arXiv:2503.07677) Eq. 7 written in the test (α-entmax by bisection), in the host's own "
            "cross-attention modules",
            ("test_pladis.py::test_pladis_matches_the_paper_through_sampling",
             "test_pladis.py::test_pladis_window_is_respected",
             "test_pladis.py::test_pladis_layers_choose_the_cross_attentions",
             "test_pladis.py::test_pladis_and_nag_compose_as_one_attention_function",
             "test_pladis.py::test_pladis_on_ltx_2_changes_the_video_text_attention_only",
             "test_pladis.py::test_pladis_on_wan_i2v_changes_the_text_attention_only"),
            effect_cases=(EffectCase("PLADIS", lambda m, w: node("GuidersPLADIS", model=m),
                                     ("sd15", "wan", "ltxv", *LTX2, *WAN_VARIANTS, *WAN_VARIANTS_0_33)),
                          EffectCase("PLADIS-cfg1", lambda m, w: node("GuidersPLADIS", model=m), ("sd15",),
                                     cfg=1.0))),
    NodeRow("GuidersModalityGuidance", LTX2,
            "the definitions written in the test with the host's a2v/v2a_cross_attn switches; ComfyUI 0.33.0's "
            "LTXVModalityGuidance + LTXVDualCFGGuider",
            ("test_modality.py::test_modality_guidance_matches_the_definitions_through_sampling",
             "test_modality.py::test_modality_guidance_equals_the_hosts_ltxv_nodes",
             "test_modality.py::test_modality_window_is_respected",
             "test_modality.py::test_modality_schedule_drives_s_per_step"),
            effect_cases=(EffectCase("ModalityGuidance", lambda m, w: node("GuidersModalityGuidance", model=m),
                                     LTX2),)),
    NodeRow("GuidersSWG", ("sd15", "sdxl"),
            "Kaiser et al. 2024 (arXiv:2411.10257) and masked SWG (BMVC 2025) written in the test: one call per crop "
            "on the authors' grid, stitched, cfg + g·M·(cond − crops)",
            ("test_swg.py::test_swg_matches_the_paper_through_sampling",
             "test_swg.py::test_swg_window_is_respected",
             "test_swg.py::test_swg_schedule_drives_the_scale_per_step"),
            effect_cases=(EffectCase("SWG", lambda m, w: node("GuidersSWG", model=m, crop_size=0, scale=2.0),
                                     ("sd15",)),)),
)

# Every row above, in table order (rows are appended by several blocks of this file).
NODE_IDS = [row.node_id for row in NODE_TABLE]

