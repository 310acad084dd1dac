"""The table of nodes: one row per public node id, with the families it is tested on and the value-level tests
that check it against an independent reference (a built-in node, diffusers, cf_guidance, or a reference
written from the method's definition). test_node_contract is parametrized from it: a new node is one row, and
a node without a named value-level test, or a row naming a test that does not exist, fails the suite.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE = ("sd15", "sd3", "flux")
VIDEO = ("wan", "ltxv", "hunyuan_video")


@dataclass(frozen=True)
class NodeRow:
    node_id: str
    families: tuple[str, ...]  # the tiny families its value tests run on
    reference: str  # what the value tests compare it with
    value_tests: tuple[str, ...]  # "test_file.py::test_function"


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
            ("test_node_parity.py::test_scheduled_cfg_uses_cf_guidance_cosine_value_at_every_step",)),
    NodeRow("GuidersCFGNormalize", ("sd15",), "cf_guidance BaseNorm/TNorm/FullNorm transforms",
            ("test_node_parity.py::test_cfg_normalize_matches_cf_guidance_transforms",)),
    NodeRow("GuidersRescaleCFG", ("sd15",), "Lin et al. 2023 Alg. 2 in noise space, written in the test",
            ("test_node_values.py::test_rescale_cfg_rescales_the_noise_prediction",)),
    NodeRow("GuidersCFGZeroStar", IMAGE, "diffusers ClassifierFreeZeroStarGuidance",
            ("test_node_parity.py::test_cfg_zero_star_matches_diffusers",)),
    NodeRow("GuidersAPG", IMAGE, "diffusers AdaptiveProjectedGuidance",
            ("test_node_parity.py::test_apg_matches_diffusers",)),
    NodeRow("GuidersPAG", IMAGE + VIDEO, "ComfyUI PerturbedAttentionGuidance; on DiTs the identity map on the "
            "image rows, written in the test",
            ("test_node_parity.py::test_pag_matches_builtin_perturbed_attention_guidance",
             "test_node_parity.py::test_identity_attention_on_flux_joint_attention_matches_a_reference_from_the_definition",
             "test_video_dits.py::test_identity_self_attention_matches_a_reference_from_the_definition")),
    NodeRow("GuidersSEG", ("sd15",) + VIDEO, "the query blur written in the test (own Gaussian), per frame on video",
            ("test_node_values.py::test_seg_on_a_non_square_unet_latent_blurs_queries_over_the_token_grid",
             "test_video_dits.py::test_seg_blurs_each_frame_as_a_reference_from_the_definition")),
    NodeRow("GuidersSAG", ("sd15", "sdxl"), "ComfyUI SelfAttentionGuidance",
            ("test_node_parity.py::test_sag_matches_builtin_self_attention_guidance",)),
    NodeRow("GuidersSLG", ("sd3", "flux") + VIDEO, "ComfyUI SkipLayerGuidanceSD3 / SkipLayerGuidanceDiT(Simple); "
            "sublayer skips written in the test",
            ("test_node_parity.py::test_slg_block_matches_skip_layer_guidance_sd3",
             "test_node_parity.py::test_slg_block_matches_skip_layer_guidance_dit_on_flux",
             "test_node_parity.py::test_slg_rescale_matches_builtin_rescaling_scale",
             "test_video_dits.py::test_slg_block_matches_skip_layer_guidance_dit",
             "test_slg_sublayers.py::test_sublayer_skip_matches_its_definition")),
    NodeRow("GuidersAutoguidance", ("sd15",), "Karras et al. 2024: CFG + s·(cond − weak), written in the test",
            ("test_node_values.py::test_autoguidance_adds_scaled_cond_minus_weak_to_cfg",)),
    NodeRow("GuidersGuider", ("sd15",), "KSampler with the same model and cfg (ComfyUI's CFGGuider)",
            ("test_node_parity.py::test_guiders_guider_with_sampler_custom_advanced_equals_ksampler",
             "test_node_parity.py::test_guiders_guider_schedule_equals_scheduled_cfg_with_ksampler")),
)

NODE_IDS = [row.node_id for row in NODE_TABLE]
