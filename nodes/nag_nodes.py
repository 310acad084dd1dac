"""Normalized Attention Guidance (Chen et al. 2025, arXiv:2505.21179): a negative prompt that acts inside the cond
forward, in every attention layer where the text enters, so it works at cfg 1 (distilled and few-step models)
with no extra model call. The math is ``guidance_core.nag.nag_combine``; the plumbing ``nodes/host/nag.py``.
"""

from __future__ import annotations

from comfy_api.latest import io

from . import host
from .common import CATEGORY, family_names, model_input, schedule_input, window_inputs
from .host import families
from .host.nag import NagSetup, attribute_path, install_nag, nag_modules
from .inputs import check_inputs, public_id

NAG_FAMILIES = families.families_supporting(families.NAG)

SCALE_TOOLTIP = ("φ, the paper's scale: Z̃ = Z⁺ + φ(Z⁺ − Z⁻). ComfyUI-NAG's nag_scale is φ + 1 (its 5 is φ 4). "
                 "From the authors' workflows, as φ: SD1.5 at cfg 7: 4; SDXL DMD2 at cfg 1: 2 (SDXL at 20+ steps: "
                 "5 or more); Wan 2.1 at cfg 8: 5, Wan CausVid/lightx2v at cfg 1: 10; LTXV: no "
                 "published value (KJNodes' LTX-2 NAG default nag_scale 11 ≙ φ 10). 0 = off.")
TAU_TOOLTIP = ("τ: the guided attention output's L1 norm, per token, is capped at τ times the positive's. 2.5 in the "
               "authors' workflows (Wan CausVid: 3.5); lower for image-reference tasks and many-step high-cfg runs, "
               "higher for few-step models.")
ALPHA_TOOLTIP = ("α: how much of the guided output is blended into the positive one (α·Ẑ + (1 − α)·Z⁺). 0.25 in the "
                 "authors' workflows; SD1.5 0.38, SDXL DMD2 0.5, Wan CausVid 0.5; 0.125 if SDXL quality degrades.")
LAYERS_TOOLTIP = ("Which attention layers: 'auto' = every layer where the text enters (as the paper). Or a "
                  "list: UNet 'input.4', 'middle', 'output.1', 'input.4.1' (block, index, transformer); Wan, LTXV, "
                  "PixArt, Cosmos Predict 2, Anima, Kandinsky 5, HunyuanDiT '0, 1, 2' (blocks; Kandinsky 5: its "
                  "visual blocks); Flux, Flux.2, Chroma 'double.3', 'single.10'; Qwen-Image, SD3 '0, 1, 2' "
                  "(on these the negative's text tokens still run through every block).")
WINDOW_NOTE = ("The authors turn NAG off for the last steps on flow models (nag_sigma_end 0.75, about end_percent "
               "0.25 on Flux/SD3.5-Turbo) and below σ 4 on SD1.5/SDXL.")


class GuidersNAG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        start, end = window_inputs()
        end.tooltip = end.tooltip + " " + WINDOW_NOTE
        return io.Schema(
            node_id="GuidersNAG",
            display_name="Normalized Attention Guidance (Guiders)",
            category=CATEGORY,
            description="NAG (Chen et al. 2025, arXiv:2505.21179): in every attention where the text enters "
                        "(cross-attention; on Flux, Flux.2, Chroma, Qwen-Image and SD3 the image rows of every "
                        "block's joint attention, the negative's text tokens carried through the blocks beside the "
                        "prompt's), "
                        "the output for the prompt is pushed away from the output for the negative below, its norm "
                        "capped (τ) and blended (α). Runs inside the cond forward: no extra model call, and it works "
                        "at cfg 1 (the uncond is still skipped there); with cfg > 1 the uncond is left as it is. "
                        "Families: " + family_names(NAG_FAMILIES) + ".",
            inputs=[
                model_input(),
                io.Conditioning.Input("negative", tooltip="The prompt NAG pushes away from, encoded by the model's own "
                                      "text encoder (CLIPTextEncode with the model's CLIP). Independent of the "
                                      "sampler's negative; only its first entry is used."),
                io.Float.Input("scale", default=5.0, min=0.0, max=100.0, step=0.01, tooltip=SCALE_TOOLTIP),
                io.Float.Input("tau", default=2.5, min=1.0, max=100.0, step=0.01, tooltip=TAU_TOOLTIP),
                io.Float.Input("alpha", default=0.25, min=0.0, max=1.0, step=0.01, tooltip=ALPHA_TOOLTIP),
                io.String.Input("layers", default="auto", tooltip=LAYERS_TOOLTIP),
                start,
                end,
                schedule_input("NAG scale φ"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, negative, scale, tau, alpha, layers, start_percent, end_percent, schedule=None):
        node = public_id(cls)
        check_inputs(cls, scale=scale, tau=tau, alpha=alpha, layers=layers, start_percent=start_percent,
                     end_percent=end_percent)
        refuse_joint_attention(node, model)
        family = host.require_family(model, node, NAG_FAMILIES)
        chosen = None
        if layers.strip().lower() not in ("", "auto"):
            chosen = host.parse_layers(layers, model, f"{node}: layers", families.NAG)
        context = negative_context(node, negative)
        extras = negative[0][1] if len(negative[0]) > 1 and isinstance(negative[0][1], dict) else {}
        family_check = families.NAG_NEGATIVE_CHECKS.get(family)
        if family_check is None:
            check_context_width(node, model, family, context)
        elif (reason := family_check(model.get_model_object("diffusion_model"), context, extras)) is not None:
            raise host.GuidanceError(f"{node}: {reason}")
        site = families.JOINT_NAG_SITES.get(family) or families.NAG_SITES[family]
        missing = [key for key in site.required_extras if extras.get(key) is None]
        if missing:
            raise host.GuidanceError(f"{node}: negative has no {', '.join(missing)}, which "
                                     f"{families.display_name(family)} embeds its prompt with; encode the negative "
                                     "with this model's own text encoder (CLIPTextEncode with its CLIP).")
        mask = extras.get("attention_mask")
        if family in families.JOINT_NAG_SITES and mask is not None and not bool(mask.bool().all()):
            raise host.GuidanceError(f"{node}: negative has padding tokens (an attention_mask with zeros); NAG on "
                                     f"{families.display_name(family)}'s joint attention attends to every token of "
                                     "the negative, so encode it without padding.")
        window = host.percent_window(start_percent, end_percent)
        patched = model.clone()
        install_nag(patched, NagSetup(context, float(scale), float(tau), float(alpha), window, family, schedule,
                                      chosen, node, mask, extras))
        return io.NodeOutput(patched)


def refuse_joint_attention(node: str, model) -> None:
    """Joint-attention families without a joint NAG site (SD3, HunyuanVideo, Lumina 2, HiDream, ...) are refused
    with the reason: there the negative's text tokens must run through the model's own text stream block after
    block (nodes/host/nag_joint.py does it for the families in families.JOINT_NAG_SITES)."""
    record = families.FAMILY_BY_KEY.get(host.model_family(model))
    if record is not None and families.NAG not in record.methods and record.text_position != families.NO_TEXT:
        raise host.GuidanceError(
            f"{node}: {record.display_name} has joint attention (the text is part of the attention sequence), "
            "where NAG needs the negative prompt's text tokens carried through the model's text stream in every "
            "block; that is not implemented yet. " + f"{node} supports {family_names(NAG_FAMILIES)}.")


def negative_context(node: str, negative):
    """The negative's text-encoder output (B, tokens, features), from the first entry of the CONDITIONING."""
    import torch

    if not isinstance(negative, list) or not negative or not isinstance(negative[0], (list, tuple)) \
            or not isinstance(negative[0][0], torch.Tensor) or negative[0][0].ndim != 3:
        raise host.GuidanceError(f"{node}: negative must be a CONDITIONING from a text encoder node (CLIPTextEncode), "
                                 "with a (batch, tokens, features) tensor in its first entry.")
    context = negative[0][0]
    if not torch.isfinite(context).all():
        raise host.GuidanceError(f"{node}: negative holds NaN or infinite values; encode the negative prompt again.")
    return context


def check_context_width(node: str, model, family: str, context) -> None:
    """The negative must come from the model's own text encoder: its feature count must be what the model's
    cross-attention (or the text embedding before it) takes."""
    diffusion_model = model.get_model_object("diffusion_model")
    if family in families.JOINT_NAG_SITES:
        first_name = families.JOINT_NAG_SITES[family].text_input
        first = attribute_path(diffusion_model, first_name)
        expected = next((m.in_features for m in first.modules() if hasattr(m, "in_features")), None)
        if expected is not None and context.shape[-1] != expected:
            raise host.GuidanceError(f"{node}: negative has {context.shape[-1]} features per token, this "
                                     f"{families.display_name(family)} model's text input takes {expected}: encode "
                                     "the negative with the text encoder loaded with this model.")
        return
    site = families.NAG_SITES[family]
    first_name = site.text_input or site.context_embedding
    first = attribute_path(diffusion_model, first_name) if first_name else None
    if first is None:
        found = nag_modules(diffusion_model, family)
        if not found:
            raise host.GuidanceError(f"{node}: this {families.display_name(family)} model has no text cross-attention "
                                     "for NAG to act in.")
        first = getattr(found[0][0], site.keys or site.keys_values)
    expected = next((m.in_features for m in first.modules() if hasattr(m, "in_features")), None)
    if expected is not None and context.shape[-1] != expected:
        raise host.GuidanceError(f"{node}: negative has {context.shape[-1]} features per token, this "
                                 f"{families.display_name(family)} model's text input takes {expected}: encode the "
                                 "negative with the text encoder loaded with this model.")


NODES = [GuidersNAG]
