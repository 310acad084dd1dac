"""What the pack knows about each model family ComfyUI ships: one record per family, the only place it lives.

A record says which diffusion-model classes it covers (by module and class name, never a bare class name:
AuraFlow's ``comfy.ldm.aura.mmdit.MMDiT`` is not SD3's ``comfy.ldm.modules.diffusionmodules.mmdit.MMDiT``),
its block lists, where the text tokens sit in its self-attention, which modules are a block's sublayers,
which hooks ComfyUI offers for it, and the recommended layers per method with the source of each. Node
modules derive the families a method supports from these records (``families_supporting``). Adding a family
is one record here plus its tiny test model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Where the text tokens sit in a DiT block's self-attention sequence: before the image tokens (SD3, Flux joint
# attention), after them (HunyuanVideo: ``flipped_img_txt``), or not in it at all (Wan, LTXV: the text is
# only attended to by a separate cross-attention).
TEXT_BEFORE_IMAGE, TEXT_AFTER_IMAGE, NO_TEXT = "before", "after", "none"

# The hooks ComfyUI offers inside a family's forward, which the pack's mechanisms rely on.
ATTN1_REPLACE = "attn1 replace patch"  # UNet transformer blocks: patches_replace["attn1"][(block, index, t)]
DIT_BLOCK_REPLACE = "dit block replace patch"  # patches_replace["dit"][("double_block", i)]
ATTENTION_OVERRIDE = "optimized_attention_override"  # transformer_options: every attention call goes through it
BLOCK_INDEX = "block_index in transformer_options"

# Methods, as node modules name them when they ask which families support them.
PAG, SEG, SLG, SAG = "pag", "seg", "slg", "sag"


@dataclass(frozen=True)
class Recommended:
    """A method's default layers on a family ("auto"), and where they come from."""

    layers: tuple[str, ...]
    source: str
    # The smallest number of main (double) blocks this choice is for: a family whose sizes differ in depth
    # (LTX-Video 2B: 28 blocks, 13B: 48) lists one Recommended per size in ``recommended_by_size``.
    min_blocks: int = 0
    size: str = ""  # the model size it is for, as the source names it ("2B", "13B"), for the tooltip


@dataclass(frozen=True)
class ModelFamily:
    key: str
    display_name: str
    classes: tuple[str, ...]  # "module:ClassName" of the diffusion model (the first match in its MRO decides)
    methods: frozenset[str]
    block_lists: dict[str, str] = field(default_factory=dict)  # layer kind ("double"/"single") -> attribute
    text_position: str = NO_TEXT
    sublayers: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)  # kind -> sublayer -> modules
    hooks: tuple[str, ...] = ()
    recommended: dict[str, Recommended] = field(default_factory=dict)  # method -> layers
    # method -> one Recommended per model size (by ``min_blocks``); where present it replaces ``recommended``.
    recommended_by_size: dict[str, tuple[Recommended, ...]] = field(default_factory=dict)
    # How a block's self-attention sequence counts its text tokens, beyond the ``txt`` it is handed:
    # the diffusion model's attribute whose tokens are prepended to the text (AuraFlow's ``register_tokens``:
    # its single blocks get ``cat(registers, text, image)`` and no ``txt``), if any.
    register_tokens: str = ""
    mechanism: str = ""  # how the pack perturbs this family, where it is not simply the hooks listed

    def recommended_for(self, method: str, blocks: int) -> Recommended | None:
        """The recommended layers for ``method`` on a model of this family with ``blocks`` main blocks: the
        per-size choice with the largest ``min_blocks`` the model reaches, else the one ``recommended``."""
        sizes = [r for r in self.recommended_by_size.get(method, ()) if r.min_blocks <= blocks]
        if sizes:
            return max(sizes, key=lambda r: r.min_blocks)
        return self.recommended.get(method)

    @property
    def is_unet(self) -> bool:
        return not self.block_lists


_MIDDLE = "the middle of the stack (no published value for this family)"

_LTXV_SIZES = (
    Recommended(("19",), "STGuidance (Hyung et al. 2024), LTXVideo/inference.py: block 19 on LTX-Video 2B",
                min_blocks=0, size="2B"),
    Recommended(("28",), "Lightricks' LTX-Video configs/ltxv-13b-0.9.7-dev.yaml: skip_block_list [28] for most "
                         "of the first pass on 13B", min_blocks=48, size="13B"),
)

FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        "unet", "UNet (SD1.5, SD2, SDXL)", ("comfy.ldm.modules.diffusionmodules.openaimodel:UNetModel",),
        frozenset({PAG, SEG, SAG}), hooks=(ATTN1_REPLACE,),
        recommended={PAG: Recommended(("middle",), "PAG paper (Ahn et al. 2024) and ComfyUI's "
                                                   "PerturbedAttentionGuidance: the middle block"),
                     SEG: Recommended(("middle",), "SEG paper (Hong 2024): the middle block")},
    ),
    ModelFamily(
        "sd3", "SD3/SD3.5 (MMDiT)",
        ("comfy.ldm.modules.diffusionmodules.mmdit:OpenAISignatureMMDITWrapper",
         "comfy.ldm.modules.diffusionmodules.mmdit:MMDiT"),
        frozenset({PAG, SEG, SLG}), block_lists={"double": "joint_blocks"}, text_position=TEXT_BEFORE_IMAGE,
        sublayers={"double": {"attention": ("context_block.attn.proj", "x_block.attn.proj", "x_block.attn2.proj"),
                              "feedforward": ("context_block.mlp", "x_block.mlp")}},
        hooks=(DIT_BLOCK_REPLACE, ATTENTION_OVERRIDE, BLOCK_INDEX),
        recommended={PAG: Recommended(("1",), "diffusers' StableDiffusion3PAGPipeline: pag_applied_layers blocks.1"),
                     SEG: Recommended(("1",), "as PAG (diffusers' SD3 PAG: blocks.1)"),
                     SLG: Recommended(("7", "8", "9"), "Stability AI's SD3.5 reference: skip_layer_guidance 7, 8, 9")},
    ),
    ModelFamily(
        "flux", "Flux", ("comfy.ldm.flux.model:Flux",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "double_blocks", "single": "single_blocks"}, text_position=TEXT_BEFORE_IMAGE,
        # Single blocks fuse attention and MLP in one projection: they cannot skip just one of them.
        sublayers={"double": {"attention": ("img_attn.proj", "txt_attn.proj"), "feedforward": ("img_mlp", "txt_mlp")}},
        hooks=(DIT_BLOCK_REPLACE, ATTENTION_OVERRIDE, BLOCK_INDEX),
        recommended={PAG: Recommended(("double.9",), "the middle double block (no published value)"),
                     SEG: Recommended(("double.9",), "the middle double block (no published value)"),
                     SLG: Recommended(("double.7", "double.8", "double.9", "single.7", "single.8", "single.9"),
                                      "ComfyUI's SkipLayerGuidanceDiT defaults: double and single 7, 8, 9")},
    ),
    ModelFamily(
        "wan", "Wan", ("comfy.ldm.wan.model:WanModel",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "blocks"},
        sublayers={"double": {"attention": ("self_attn.o",), "feedforward": ("ffn",)}},
        hooks=(DIT_BLOCK_REPLACE, ATTENTION_OVERRIDE, BLOCK_INDEX),
        recommended={PAG: Recommended((), _MIDDLE), SEG: Recommended((), _MIDDLE),
                     SLG: Recommended(("9",), "ComfyUI's SkipLayerGuidanceDiT example for Wan: block 9")},
    ),
    # LTX-2 (LTXAVModel, a subclass of LTXVModel with audio blocks) is its own family, not supported yet.
    ModelFamily("ltxav", "LTX-2 (audio-video)", ("comfy.ldm.lightricks.av_model:LTXAVModel",), frozenset()),
    ModelFamily(
        "ltxv", "LTXV (LTX-Video)", ("comfy.ldm.lightricks.model:LTXVModel",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "transformer_blocks"},
        sublayers={"double": {"attention": ("attn1.to_out",), "feedforward": ("ff",)}},
        hooks=(DIT_BLOCK_REPLACE, ATTENTION_OVERRIDE),  # its blocks set no block_index
        recommended={PAG: Recommended(("19",), "LTX-Video's STG: block 19 (2B)"),
                     SEG: Recommended(("19",), "as STG (LTX-Video: block 19)"),
                     SLG: Recommended(("19",), "LTX-Video's STG: block 19 (2B)")},
        # 2B (0.9.x) has 28 blocks, 13B (0.9.7+) 48: the STG block differs by size.
        recommended_by_size={method: _LTXV_SIZES for method in (PAG, SEG, SLG)},
    ),
    ModelFamily(
        "hunyuan_video", "HunyuanVideo", ("comfy.ldm.hunyuan_video.model:HunyuanVideo",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "double_blocks", "single": "single_blocks"}, text_position=TEXT_AFTER_IMAGE,
        sublayers={"double": {"attention": ("img_attn.proj", "txt_attn.proj"), "feedforward": ("img_mlp", "txt_mlp")}},
        hooks=(DIT_BLOCK_REPLACE, ATTENTION_OVERRIDE, BLOCK_INDEX),
        recommended={PAG: Recommended((), _MIDDLE), SEG: Recommended((), _MIDDLE), SLG: Recommended((), _MIDDLE)},
    ),
)

# Families added for issue #11 (each: its record here, a tiny model, tests/host/test_family_blockpatch.py).
FAMILIES += (
    # Mochi's asymmetric joint attention: one attention over cat(video, text[:num_tokens]) with separate
    # projections per stream; the text comes AFTER the video and only its first ``num_tokens`` (the prompt's
    # unpadded tokens, from the T5 attention mask) take part (``crop_y``). The last block does not update
    # the text (no ``mlp_y``; ``proj_y`` is an identity).
    ModelFamily(
        "mochi", "Mochi", ("comfy.ldm.genmo.joint_model.asymm_models_joint:AsymmDiTJoint",),
        frozenset({PAG, SEG, SLG}), block_lists={"double": "blocks"}, text_position=TEXT_AFTER_IMAGE,
        sublayers={"double": {"attention": ("attn.proj_x", "attn.proj_y"), "feedforward": ("mlp_x", "mlp_y")}},
        hooks=(DIT_BLOCK_REPLACE, ATTENTION_OVERRIDE),  # its blocks set no block_index
        recommended={PAG: Recommended((), _MIDDLE), SEG: Recommended((), _MIDDLE), SLG: Recommended((), _MIDDLE)},
    ),
    # AuraFlow's MMDiT (comfy.ldm.aura.mmdit, NOT SD3's class of the same name): double layers with joint
    # attention over cat(text, image), the text led by 8 learned register tokens; then single layers over
    # cat(registers, text, image) that carry no ``txt``. Both kinds have separate attention and MLP sublayers.
    ModelFamily(
        "auraflow", "AuraFlow", ("comfy.ldm.aura.mmdit:MMDiT",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "double_layers", "single": "single_layers"}, text_position=TEXT_BEFORE_IMAGE,
        sublayers={"double": {"attention": ("attn.w1o", "attn.w2o"), "feedforward": ("mlpC", "mlpX")},
                   "single": {"attention": ("attn.w1o",), "feedforward": ("mlp",)}},
        hooks=(DIT_BLOCK_REPLACE, ATTENTION_OVERRIDE),  # its layers set no block_index
        register_tokens="register_tokens",
        recommended={PAG: Recommended((), _MIDDLE), SEG: Recommended((), _MIDDLE), SLG: Recommended((), _MIDDLE)},
    ),
)

FAMILY_BY_KEY = {family.key: family for family in FAMILIES}


def family_of_class(cls: type) -> ModelFamily | None:
    """The record of the first class in ``cls``'s MRO some record lists, or None for an unknown model."""
    for base in cls.__mro__:
        name = f"{base.__module__}:{base.__qualname__}"
        for family in FAMILIES:
            if name in family.classes:
                return family
    return None


def families_supporting(method: str) -> tuple[str, ...]:
    """The keys of the families a method supports, in record order."""
    return tuple(family.key for family in FAMILIES if method in family.methods)


def display_name(key: str) -> str:
    family = FAMILY_BY_KEY.get(key)
    return family.display_name if family is not None else key


def recommended_summary(method: str) -> str:
    """The tooltip's "auto" sentence for ``method``, from the records: each family's layers and source."""
    parts = []
    for family in FAMILIES:
        sizes = family.recommended_by_size.get(method)
        if sizes:
            each = [f"{_layers_text(r)} ({r.size or f'{r.min_blocks}+ blocks'})" for r in sizes]
            parts.append(f"{family.display_name}: {', '.join(each)}")
            continue
        recommended = family.recommended.get(method)
        if recommended is not None:
            parts.append(f"{family.display_name}: {_layers_text(recommended)}")
    return "; ".join(parts)


def _layers_text(recommended: Recommended) -> str:
    return ", ".join(recommended.layers) if recommended.layers else "the middle block"
