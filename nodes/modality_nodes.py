"""LTX-2 modality guidance and separate video/audio CFG (ComfyUI's LTXVModalityGuidance and LTXVDualCFGGuider in one
model patch, Lightricks' LTX-2 multimodal guider): ``(s − 1)(cond − isolated)``, the isolated branch the cond with
every block's audio↔video cross-attention cut, joined to the one batched forward; and ``u + w(c − u)`` with
video_cfg on the video and audio_cfg on the audio. The math is ``guidance_core.modality``.
"""

from __future__ import annotations

from functools import partial

from comfy_api.latest import io

from ..guidance_core.modality import modality_contribution, per_stream_cfg
from ..guidance_core.plan import COND, Branch, CFGRule, Term
from . import host
from .common import (
    CATEGORY,
    branch_mode_input,
    family_names,
    model_input,
    scale_schedule,
    schedule_input,
    window_inputs,
    with_branch_mode,
    with_cfg_rule,
)
from .host import families
from .host.layers import model_layers
from .inputs import check_inputs, public_id

MODALITY_FAMILIES = families.families_supporting(families.MODALITY)


def _dual_cfg(video_cfg: float, audio_cfg: float, positive, negative, scale, state=None, step=None):
    """The CFG rule: the sampler's cfg (``scale``) is replaced by the two modality scales."""
    return per_stream_cfg(positive, negative, (video_cfg, audio_cfg), step.stream_sizes)


class GuidersModalityGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersModalityGuidance",
            display_name="LTX-2 Modality Guidance + video/audio CFG (Guiders)",
            category=CATEGORY,
            description="LTX-2 audio-video guidance (ComfyUI's LTXVModalityGuidance + LTXVDualCFGGuider, Lightricks' "
                        "multimodal guider): adds (s − 1)·(cond − isolated), the isolated branch the cond with every "
                        "block's audio-to-video and video-to-audio cross-attention cut (better lip-sync and A/V "
                        "coherence), batched with cond and uncond in one forward; and CFG with its own scale on "
                        "the video (video_cfg) and on the audio (audio_cfg), which replace the sampler's cfg. "
                        "Families: " + family_names(MODALITY_FAMILIES) + ".",
            inputs=[
                model_input(),
                io.Float.Input("scale", default=3.0, min=1.0, max=100.0, step=0.01,
                               tooltip="s, the modality scale: adds (s − 1)(cond − isolated). 3.0 in Lightricks' "
                                       "LTX-2 params, diffusers' LTX-2 pipeline and ComfyUI's "
                                       "LTXVModalityGuidance; 1 = off (no extra branch)."),
                io.Float.Input("video_cfg", default=3.0, min=0.0, max=100.0, step=0.01,
                               tooltip="CFG scale on the video latent (replaces the sampler's cfg). 3.0 in "
                                       "ComfyUI's LTXVDualCFGGuider and diffusers' LTX-2 defaults."),
                io.Float.Input("audio_cfg", default=7.0, min=0.0, max=100.0, step=0.01,
                               tooltip="CFG scale on the audio latent. 7.0 in ComfyUI's LTXVDualCFGGuider and "
                                       "diffusers' LTX-2 defaults."),
                *window_inputs(),
                schedule_input("modality scale s"),
                branch_mode_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, video_cfg, audio_cfg, start_percent, end_percent, schedule=None,
                branch_mode="batched"):
        node = public_id(cls)
        check_inputs(cls, scale=scale, video_cfg=video_cfg, audio_cfg=audio_cfg, start_percent=start_percent,
                     end_percent=end_percent, branch_mode=branch_mode)
        host.require_family(model, node, MODALITY_FAMILIES)
        every_block = tuple(model_layers(model))
        isolation = host.SublayerSkip(every_block, families.CROSS_MODAL, "audio-video isolation", all_streams=True)
        window = host.percent_window(start_percent, end_percent)
        rule = CFGRule(node, partial(_dual_cfg, float(video_cfg), float(audio_cfg)), neutral_scale=None,
                       takes_step=True)

        def update(stack):
            name = stack.unique_name("modality")
            term = Term(name, COND, name, rule=None, schedule=scale_schedule(scale, schedule), window=window,
                        neutral_scale=1.0, contribution=modality_contribution)
            stack = with_cfg_rule(stack.with_term(term, Branch(name, source=COND, perturbation=isolation)), rule)
            return with_branch_mode(stack, branch_mode)

        return io.NodeOutput(host.add_guidance(model, node, update))


NODES = [GuidersModalityGuidance]
