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
    # "module:ClassName" of the ComfyUI model (comfy.model_base) as well, for a family whose diffusion-model class
    # another record lists too (Flux.2 and LongCat-Image run comfy.ldm.flux.model.Flux): such a record wins over
    # the one without base classes when the model's class is one of them (``family_of_model``).
    base_classes: tuple[str, ...] = ()

    @property
    def is_unet(self) -> bool:
        return not self.block_lists


_MIDDLE = "the middle of the stack (no published value for this family)"

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
    ),
    ModelFamily(
        "hunyuan_video", "HunyuanVideo", ("comfy.ldm.hunyuan_video.model:HunyuanVideo",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "double_blocks", "single": "single_blocks"}, text_position=TEXT_AFTER_IMAGE,
        sublayers={"double": {"attention": ("img_attn.proj", "txt_attn.proj"), "feedforward": ("img_mlp", "txt_mlp")}},
        hooks=(DIT_BLOCK_REPLACE, ATTENTION_OVERRIDE, BLOCK_INDEX),
        recommended={PAG: Recommended((), _MIDDLE), SEG: Recommended((), _MIDDLE), SLG: Recommended((), _MIDDLE)},
    ),
)

# Flux.2, Chroma, Chroma Radiance and LongCat-Image run ComfyUI's Flux blocks (comfy/ldm/flux/layers.py
# DoubleStreamBlock, SingleStreamBlock): joint attention with the text tokens first, the same sublayer modules,
# and the forward's dit block replace patches with block_type/block_index set before each block. What differs is
# what reaches the blocks as ``vec``: Flux.2's modulations are computed once for all blocks (global modulation)
# and Chroma's by its distilled approximator, both as ModulationOut dataclasses whose tensors carry the batch
# (shared_prefix.select_rows takes their rows too).
_FLUX_SUBLAYERS = {"double": {"attention": ("img_attn.proj", "txt_attn.proj"), "feedforward": ("img_mlp", "txt_mlp")}}
_FLUX_BLOCKS = {"double": "double_blocks", "single": "single_blocks"}
_FLUX_HOOKS = (DIT_BLOCK_REPLACE, ATTENTION_OVERRIDE, BLOCK_INDEX)
_MIDDLE_OF_STACK = {method: Recommended((), _MIDDLE) for method in (PAG, SEG, SLG)}
# Flux.2's sizes differ in both stacks, so no one block name is the middle of each: "auto" takes the middle of
# the model's own stack (double and single blocks in order).
_FLUX_2_MIDDLE = {method: Recommended((), "the middle of the model's own stack (no published value): dev "
                                          "(8 double + 48 single blocks) single.20, Klein 4B (5 + 20) single.7, "
                                          "Klein 9B (8 + 24) single.8")
                  for method in (PAG, SEG, SLG)}
# Chroma keeps Flux.1's 19 double and 38 single blocks: Flux's choices, for the same reasons.
_AS_FLUX_1 = {PAG: Recommended(("double.9",), "the middle double block of 19, as for Flux (no published value)"),
              SEG: Recommended(("double.9",), "the middle double block of 19, as for Flux (no published value)"),
              SLG: Recommended(("double.7", "double.8", "double.9", "single.7", "single.8", "single.9"),
                               "ComfyUI's SkipLayerGuidanceDiT defaults: double and single 7, 8, 9")}

FAMILIES = FAMILIES + (
    # Flux.2 dev (8 double + 48 single blocks) and Flux.2 Klein (4B: 5 + 20, 9B: 8 + 24) are one architecture:
    # comfy/model_detection.py gives every checkpoint with ``double_stream_modulation_img`` the "flux2" config
    # (global modulation, SiLU-gated MLPs, patch 1, 4 rope axes); Klein only lacks the guidance embedding. No
    # published layer choice: "auto" takes the middle of each model's own stack (dev single.20, Klein 4B
    # single.7, Klein 9B single.8), which Flux.1's double.9 would not be (Flux.2 dev has double blocks 0-7).
    ModelFamily(
        "flux2", "Flux.2 (dev, Klein)", ("comfy.ldm.flux.model:Flux",), frozenset({PAG, SEG, SLG}),
        block_lists=_FLUX_BLOCKS, text_position=TEXT_BEFORE_IMAGE, sublayers=_FLUX_SUBLAYERS, hooks=_FLUX_HOOKS,
        recommended=_FLUX_2_MIDDLE, base_classes=("comfy.model_base:Flux2",),
    ),
    # LongCat-Image (ComfyUI 0.33.0: comfy.model_base.LongCatImage): Flux.1's blocks without guidance or pooled
    # input, 10 double + 20 single blocks; no published layer choice, so the middle of the stack (single.5).
    ModelFamily(
        "longcat_image", "LongCat-Image", ("comfy.ldm.flux.model:Flux",), frozenset({PAG, SEG, SLG}),
        block_lists=_FLUX_BLOCKS, text_position=TEXT_BEFORE_IMAGE, sublayers=_FLUX_SUBLAYERS, hooks=_FLUX_HOOKS,
        recommended=_MIDDLE_OF_STACK, base_classes=("comfy.model_base:LongCatImage",),
    ),
    # Chroma (comfy/ldm/chroma/model.py): its own model class around Flux's blocks, without per-block modulation
    # layers (modulation=False): the approximator's vectors are handed to each block as ``vec``.
    ModelFamily(
        "chroma", "Chroma", ("comfy.ldm.chroma.model:Chroma",), frozenset({PAG, SEG, SLG}),
        block_lists=_FLUX_BLOCKS, text_position=TEXT_BEFORE_IMAGE, sublayers=_FLUX_SUBLAYERS, hooks=_FLUX_HOOKS,
        recommended=_AS_FLUX_1,
    ),
    # Chroma Radiance (comfy/ldm/chroma_radiance/model.py, a subclass of Chroma): pixel space, patches embedded by a
    # convolution and decoded by NeRF blocks after the transformer; the transformer blocks are Chroma's.
    ModelFamily(
        "chroma_radiance", "Chroma Radiance", ("comfy.ldm.chroma_radiance.model:ChromaRadiance",),
        frozenset({PAG, SEG, SLG}), block_lists=_FLUX_BLOCKS, text_position=TEXT_BEFORE_IMAGE,
        sublayers=_FLUX_SUBLAYERS, hooks=_FLUX_HOOKS, recommended=_AS_FLUX_1,
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


def family_of_model(base_model, diffusion_model) -> ModelFamily | None:
    """The record of a ComfyUI model (``base_model``, a comfy.model_base class) running ``diffusion_model``: as
    ``family_of_class``, where among the records listing the same diffusion-model class one whose
    ``base_classes`` name a class of ``base_model`` wins over one without base classes."""
    base_names = {f"{base.__module__}:{base.__qualname__}" for base in type(base_model).__mro__}
    for cls in type(diffusion_model).__mro__:
        name = f"{cls.__module__}:{cls.__qualname__}"
        listing = sorted((f for f in FAMILIES if name in f.classes), key=lambda f: not f.base_classes)
        for family in listing:
            if not family.base_classes or base_names.intersection(family.base_classes):
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
        recommended = family.recommended.get(method)
        if recommended is not None:
            layers = ", ".join(recommended.layers) if recommended.layers else "the middle block"
            parts.append(f"{family.display_name}: {layers}")
    return "; ".join(parts)
