"""What the pack knows about each model family ComfyUI ships: one record per family, the only place it lives.

A record says which diffusion-model classes it covers (by module and class name, never a bare class name:
AuraFlow's ``comfy.ldm.aura.mmdit.MMDiT`` is not SD3's ``comfy.ldm.modules.diffusionmodules.mmdit.MMDiT``),
its block lists, where the text tokens sit in its self-attention, which modules are a block's sublayers,
which hooks ComfyUI offers for it, and the recommended layers per method with the source of each. Node
modules derive the families a method supports from these records (``families_supporting``). Adding a family
is one record here plus its tiny test model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any

# Where the text tokens sit in a DiT block's self-attention sequence: before the image tokens (SD3, Flux joint
# attention), after them (HunyuanVideo: ``flipped_img_txt``), or not in it at all (Wan, LTXV: the text is
# only attended to by a separate cross-attention).
TEXT_BEFORE_IMAGE, TEXT_AFTER_IMAGE, NO_TEXT = "before", "after", "none"

# The hooks ComfyUI offers inside a family's forward, which the pack's mechanisms rely on.
ATTN1_REPLACE = "attn1 replace patch"  # UNet transformer blocks: patches_replace["attn1"][(block, index, t)]
DIT_BLOCK_REPLACE = "dit block replace patch"  # patches_replace["dit"][("double_block", i)]
ATTENTION_OVERRIDE = "optimized_attention_override"  # transformer_options: every attention call goes through it
BLOCK_INDEX = "block_index in transformer_options"
# No working dit block replace patch in the family's forward: PyTorch hooks on the perturbed layer's modules (the
# block, its self-attention, its sublayers), registered by an APPLY_MODEL wrapper for one forward and always
# removed (nodes/host/module_hooks.py; where the modules sit: its ``SITES``, else the whole block). With
# ATTENTION_OVERRIDE too, attention perturbations go through the override while the attention module runs;
# without it, they are recomputed from the module's own q, k, v projections. One mechanism: the two names
# records use for it (hooks on whole blocks, hooks on a layer's modules) are the same constant.
FORWARD_HOOKS = "forward hooks on a layer's modules, for one forward"
BLOCK_FORWARD_HOOKS = MODULE_FORWARD_HOOKS = FORWARD_HOOKS

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
    # The DiT's patch (frames, height, width) where the image tokens' grid is taken from the latent, not guessed
    # from the sequence length (padding or reference-image tokens make the length ambiguous).
    patch_size: tuple[int, int, int] | None = None
    # "module:ClassName" of the ComfyUI model (comfy.model_base) as well, for a family whose diffusion-model class
    # another record lists too (Flux.2 and LongCat-Image run comfy.ldm.flux.model.Flux): such a record wins over
    # the one without base classes when the model's class is one of them (``family_of_model``).
    base_classes: tuple[str, ...] = ()
    # method -> one Recommended per model size (by ``min_blocks``); where present it replaces ``recommended``.
    recommended_by_size: dict[str, tuple[Recommended, ...]] = field(default_factory=dict)
    # How a block's self-attention sequence counts its text tokens, beyond the ``txt`` it is handed:
    # the diffusion model's attribute whose tokens are prepended to the text (AuraFlow's ``register_tokens``:
    # its single blocks get ``cat(registers, text, image)`` and no ``txt``), if any.
    register_tokens: str = ""
    mechanism: str = ""  # how the pack perturbs this family, where it is not simply the hooks listed
    # The diffusion model's attribute (a module) that, when set, puts reference-image tokens BEFORE the image's in
    # the blocks' sequence (Wan Fun 1.1's ``ref_conv``): the image grid starts after them.
    reference_tokens_before: str = ""
    # "module:ClassName" of the blocks that are layers inside each level of a ``block_lists`` attribute that is a
    # list of levels, each a list of mixed blocks (Stable Cascade: the AttnBlocks among ResBlocks and
    # TimestepBlocks): layer "kind.L.i" is the i-th such block of level L. Empty: each attribute lists the layers.
    level_layers: str = ""
    # The streams a block's ``img`` holds where it is a tuple (LTX-2: ``(video, audio)``), first the one the
    # perturbations act on; every other stream leaves a perturbed block as the unperturbed block gives it.
    block_streams: tuple[str, ...] = ()

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
    Recommended(("19",), "Lightricks' LTX-Video configs/ltxv-2b-0.9.6-dev.yaml (also 0.9, 0.9.1, 0.9.5): "
                         "skip_block_list [19]; STGuidance LTXVideo/inference.py: stg_applied_layers_idx [19]",
                min_blocks=0, size="2B"),
    Recommended(("28",), "Lightricks' LTX-Video configs/ltxv-13b-0.9.8-dev.yaml (as 0.9.7-dev): first_pass "
                         "skip_block_list [28] from sigma 0.985 on", min_blocks=48, size="13B"),
)

# STGuidance (Hyung et al. 2024, github.com/junhahyung/STGuidance) skips block 2 on both: Wan2.1/pipeline.py
# ``skip_guidance_block_idxs=[2]`` (Wan 2.1 14B), HunyuanVideo/inference.py ``stg_applied_layers_idx=[2]``
# (diffusers' ``transformer_blocks``: the double-stream blocks).
_STG_WAN = {method: Recommended(("2",), "STGuidance Wan2.1/pipeline.py: skip_guidance_block_idxs [2]")
            for method in (PAG, SEG, SLG)}
_STG_HUNYUAN = {method: Recommended(("double.2",), "STGuidance HunyuanVideo/inference.py: stg_applied_layers_idx "
                                                   "[2] (double-stream blocks)")
                for method in (PAG, SEG, SLG)}

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
        # diffusers' StableDiffusion3PAGPipeline defaults to blocks.1, but its own documented example on SD3
        # Medium (24 joint blocks) uses blocks.13: the example is the published setting.
        recommended={PAG: Recommended(("13",), "diffusers' StableDiffusion3PAGPipeline example "
                                               "(pipeline_pag_sd_3.py): pag_applied_layers ['blocks.13']"),
                     SEG: Recommended(("13",), "as PAG (diffusers' SD3 PAG example: blocks.13)"),
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
        recommended=_STG_WAN,
    ),
    # LTX-2 (LTXAVModel, a subclass of LTXVModel with audio blocks) is its own family: its record is below.
    ModelFamily(
        "ltxv", "LTXV (LTX-Video)", ("comfy.ldm.lightricks.model:LTXVModel",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "transformer_blocks"},
        sublayers={"double": {"attention": ("attn1.to_out",), "feedforward": ("ff",)}},
        hooks=(DIT_BLOCK_REPLACE, ATTENTION_OVERRIDE),  # its blocks set no block_index
        # 2B (0.9.x) has 28 blocks, 13B (0.9.7+) 48: the STG block differs by size.
        recommended_by_size={method: _LTXV_SIZES for method in (PAG, SEG, SLG)},
    ),
    ModelFamily(
        "hunyuan_video", "HunyuanVideo", ("comfy.ldm.hunyuan_video.model:HunyuanVideo",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "double_blocks", "single": "single_blocks"}, text_position=TEXT_AFTER_IMAGE,
        sublayers={"double": {"attention": ("img_attn.proj", "txt_attn.proj"), "feedforward": ("img_mlp", "txt_mlp")}},
        hooks=(DIT_BLOCK_REPLACE, ATTENTION_OVERRIDE, BLOCK_INDEX),
        recommended=_STG_HUNYUAN,
    ),
    # Qwen-Image and Qwen-Image Edit (comfy/ldm/qwen_image/model.py): one stack of MMDiT blocks whose joint
    # attention runs on [text tokens, image tokens, reference-image tokens] (Edit appends its reference latents'
    # tokens after the image's). Only the generated image's tokens are perturbed: the text and the reference
    # image are conditioning, left as they are (as for Flux Kontext). The dit block patch ("img", "txt") works;
    # the image grid comes from the latent and the 2x2 patch (process_img), never from the sequence length,
    # which reference images of any size make ambiguous.
    ModelFamily(
        "qwen_image", "Qwen-Image (and Edit)", ("comfy.ldm.qwen_image.model:QwenImageTransformer2DModel",),
        frozenset({PAG, SEG, SLG}), block_lists={"double": "transformer_blocks"}, text_position=TEXT_BEFORE_IMAGE,
        sublayers={"double": {"attention": ("attn.to_out.0", "attn.to_add_out"),
                              "feedforward": ("img_mlp", "txt_mlp")}},
        hooks=(DIT_BLOCK_REPLACE, ATTENTION_OVERRIDE, BLOCK_INDEX),
        recommended={PAG: Recommended((), _MIDDLE), SEG: Recommended((), _MIDDLE), SLG: Recommended((), _MIDDLE)},
        patch_size=(1, 2, 2),
    ),
    # Lumina Image 2.0 and Z-Image (comfy/ldm/lumina/model.py NextDiT; supported_models.ZImage is a NextDiT
    # config): a context refiner (caption only) and a noise refiner (image only) run first and are not layers
    # here; the main ``layers`` run on [caption tokens, image tokens] (Z-Image pads both to a multiple of 32,
    # its Omni variant puts reference images and their captions before the image): the image is the sequence's
    # last part, everything before it is left as it is. No dit block patch in 0.8.0 or 0.33.0: forward hooks on
    # the perturbed main blocks, for one forward (module_hooks.py), and the attention override.
    ModelFamily(
        "lumina2", "Lumina 2 / Z-Image (NextDiT)", ("comfy.ldm.lumina.model:NextDiT",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "layers"}, text_position=TEXT_BEFORE_IMAGE,
        sublayers={"double": {"attention": ("attention",), "feedforward": ("feed_forward",)}},
        hooks=(BLOCK_FORWARD_HOOKS, ATTENTION_OVERRIDE, BLOCK_INDEX),
        recommended={PAG: Recommended((), _MIDDLE), SEG: Recommended((), _MIDDLE), SLG: Recommended((), _MIDDLE)},
        patch_size=(1, 2, 2),
    ),
    # Kandinsky 5 video and image (comfy/ldm/kandinsky5/model.py): text blocks first (text only, not layers
    # here), then visual blocks: self-attention on the video tokens (the text is not in it), cross-attention to
    # the text, feed-forward. Its dit block patch calls the block with keywords it does not take (0.8.0 and
    # 0.33.0; module_hooks.kandinsky5_block_patch_works): forward hooks on the perturbed visual blocks, for one
    # forward, and the attention override.
    ModelFamily(
        "kandinsky5", "Kandinsky 5", ("comfy.ldm.kandinsky5.model:Kandinsky5",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "visual_transformer_blocks"},
        sublayers={"double": {"attention": ("self_attention",), "feedforward": ("feed_forward",)}},
        hooks=(BLOCK_FORWARD_HOOKS, ATTENTION_OVERRIDE, BLOCK_INDEX),
        recommended={PAG: Recommended((), _MIDDLE), SEG: Recommended((), _MIDDLE), SLG: Recommended((), _MIDDLE)},
        patch_size=(1, 2, 2),
    ),
)

# The families whose forward offers neither a dit block patch nor block_index in ComfyUI 0.8.0: module hooks.
FAMILIES += (
    ModelFamily(
        # comfy/ldm/pixart: self-attention (AttentionKVCompress) calls optimized_attention without the options,
        # so the override never sees it: attention perturbations are recomputed in a hook on the module.
        "pixart", "PixArt α/Σ", ("comfy.ldm.pixart.pixartms:PixArtMS",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "blocks"},
        sublayers={"double": {"attention": ("attn",), "feedforward": ("mlp",)}},
        hooks=(MODULE_FORWARD_HOOKS,),
        recommended={PAG: Recommended(("1",), "diffusers' PixArtSigmaPAGPipeline: pag_applied_layers blocks.1"),
                     SEG: Recommended(("1",), "as PAG (diffusers' PixArt-Σ PAG: blocks.1)"),
                     SLG: Recommended((), _MIDDLE)},
    ),
    ModelFamily(
        # comfy/ldm/hidream/model.py: joint attention of the image tokens then the text tokens (double blocks: two
        # streams; single blocks: one, the text appended), through optimized_attention with the options.
        "hidream", "HiDream", ("comfy.ldm.hidream.model:HiDreamImageTransformer2DModel",),
        frozenset({PAG, SEG, SLG}),
        block_lists={"double": "double_stream_blocks", "single": "single_stream_blocks"},
        text_position=TEXT_AFTER_IMAGE,
        sublayers={"double": {"attention": ("block.attn1",), "feedforward": ("block.ff_i", "block.ff_t")},
                   "single": {"attention": ("block.attn1",), "feedforward": ("block.ff_i",)}},
        hooks=(MODULE_FORWARD_HOOKS, ATTENTION_OVERRIDE),
        recommended={PAG: Recommended((), _MIDDLE), SEG: Recommended((), _MIDDLE), SLG: Recommended((), _MIDDLE)},
    ),
    ModelFamily(
        # comfy/ldm/cosmos/predict2.py (MiniTrainDIT): self-attention on the video tokens, cross-attention to the
        # text, MLP; attention through optimized_attention with the options.
        "cosmos_predict2", "Cosmos Predict 2", ("comfy.ldm.cosmos.predict2:MiniTrainDIT",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "blocks"},
        sublayers={"double": {"attention": ("self_attn",), "feedforward": ("mlp",)}},
        hooks=(MODULE_FORWARD_HOOKS, ATTENTION_OVERRIDE),
        recommended={PAG: Recommended((), _MIDDLE), SEG: Recommended((), _MIDDLE), SLG: Recommended((), _MIDDLE)},
    ),
    ModelFamily(
        # comfy/ldm/omnigen/omnigen2.py: one stream, the text first, then the reference images, then the image
        # (the image tokens last; reference images count as text here and are left alone); attention through
        # optimized_attention_masked (= optimized_attention) with the options. Its refiner layers are not exposed.
        "omnigen2", "OmniGen 2", ("comfy.ldm.omnigen.omnigen2:OmniGen2Transformer2DModel",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "layers"}, text_position=TEXT_BEFORE_IMAGE,
        sublayers={"double": {"attention": ("attn",), "feedforward": ("feed_forward",)}},
        hooks=(MODULE_FORWARD_HOOKS, ATTENTION_OVERRIDE),
        recommended={PAG: Recommended((), _MIDDLE), SEG: Recommended((), _MIDDLE), SLG: Recommended((), _MIDDLE)},
    ),
    ModelFamily(
        # comfy/ldm/cosmos/model.py (GeneralDIT, Cosmos Predict 1): blocks in a ModuleDict, each "FA-CA-MLP"
        # (self-attention, cross-attention, MLP) on (T, H, W, B, D) tensors; attention through
        # optimized_attention with the options.
        "cosmos", "Cosmos Predict 1", ("comfy.ldm.cosmos.model:GeneralDIT",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "blocks"},
        sublayers={"double": {"attention": ("blocks.0.block",), "feedforward": ("blocks.2.block",)}},
        hooks=(MODULE_FORWARD_HOOKS, ATTENTION_OVERRIDE),
        recommended={PAG: Recommended((), _MIDDLE), SEG: Recommended((), _MIDDLE), SLG: Recommended((), _MIDDLE)},
    ),
)

# Stable Cascade stage C (comfy/ldm/cascade/stage_c.py StageC): a UNet-like stack of levels, each a list of mixed
# blocks ('CTA': ResBlock, TimestepBlock, AttnBlock), down_blocks then up_blocks (up_blocks[0] the deepest level;
# stage C's levels keep one resolution, switch_level False). Its layers are the AttnBlocks, "down.L.i" / "up.L.i":
# the i-th AttnBlock of down_blocks[L] / up_blocks[L] (``level_layers``). An AttnBlock attends from the image
# tokens to [image tokens; text tokens] (Attention2D with self_attn: kv = cat(x, kv_mapper(clip))): PAG's
# identity map gives each image query its own image token's value (the text keys weight 0), SEG blurs the image
# queries and attends to every key, SLG skips the AttnBlock (x + attention(...) -> x; attention is its only
# sublayer, so there are no sublayer modes). Its attention calls optimized_attention with the options, but its
# queries and keys differ in length, which the override takes for cross-attention: the perturbed chunks' rows
# are recomputed from the module's own to_q / to_k / to_v and out_proj (module_hooks.SITES), in forward hooks
# for one forward (the forward has no block patch).
FAMILIES += (
    ModelFamily(
        "stable_cascade_c", "Stable Cascade (stage C)", ("comfy.ldm.cascade.stage_c:StageC",),
        frozenset({PAG, SEG, SLG}), block_lists={"down": "down_blocks", "up": "up_blocks"},
        level_layers="comfy.ldm.cascade.common:AttnBlock", hooks=(FORWARD_HOOKS,),
        recommended={method: Recommended((), "the middle AttnBlock of the stack, in forward order (no published "
                                             "value): the first of the deepest up level on stage C")
                     for method in (PAG, SEG, SLG)},
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

# NAG (Normalized Attention Guidance, arXiv:2505.21179): where the text enters each family by cross-attention,
# and how the negative context becomes what those modules attend to. Read in the host's modules and in the
# authors' ComfyUI-NAG @ef8a641 (sd/attention.py: every CrossAttention named attn2, before to_out;
# wan/model.py: every block's cross_attn, its text attention, before self.o, the negative through the model's
# own text_embedding). Joint-attention families (text in the same sequence) are not covered by these records.
NAG = "nag"


@dataclass(frozen=True)
class NagSite:
    """A family's text cross-attention for NAG.

    ``attribute``, ``modules``: the name and "module:ClassName" of every cross-attention module NAG acts in,
    each with the index of the ``optimized_attention`` call inside its forward that attends to the text
    (Wan's I2V module attends to the CLIP image tokens first). ``keys``, ``key_norm``, ``values``: the module's
    projections of a context into
    keys and values (``key_norm`` "" = none). ``context_embedding``: the diffusion model's module the context
    goes through before the blocks ("" = the context is attended to as the text encoder gave it). ``source``:
    where this was read."""

    attribute: str  # the module's name in its parent block (UNet attn1 is a CrossAttention too: only attn2 is)
    modules: dict[str, int]
    keys: str
    values: str
    key_norm: str = ""
    context_embedding: str = ""
    # The diffusion model's method that turns a conditioning's ``attention_mask`` (1 = token, 0 = padding) into
    # the bias its cross-attention adds ("" = the family takes no text mask): the negative's own mask goes
    # through it, as the positive's does in the model's forward.
    attention_mask: str = ""
    # A module whose attention call gets no transformer_options (no override sees it): NAG works at the input
    # of its output projection ``output`` (a forward pre-hook; the host's Z⁺ is that input), with the queries
    # recomputed by ``queries`` from the module's own input and ``heads`` read from the module ("" = the
    # override path). ``keys_values``: one fused projection whose last dimension is the keys then the values
    # (used instead of ``keys``/``values``). ``projections``, ``attention``: instead of those, the module's own
    # method (x, context) -> (q, k, v) in its attention layout and its attention op on them (Cosmos: per-head
    # norms, heads split).
    output: str = ""
    queries: str = ""
    heads: str = ""
    keys_values: str = ""
    projections: str = ""
    attention: str = ""
    # (diffusion_model, negative, the negative conditioning's dict, the call's timestep per positive row) -> the
    # context as the model makes it from a conditioning before its blocks (None: the encoder's output, or
    # ``context_embedding`` of it; Anima: its LLM adapter; Kandinsky 5: its text blocks, which depend on t).
    prepare_negative: Any = None
    # (module, the positive rows' input, the negative context) -> Z⁻ at the output projection's input, for a
    # module whose attention is a module-level function (instead of ``projections``/``attention``).
    negative_attention: Any = None
    # The diffusion model's module the text encoder's output goes into first, for the width check ("" =
    # ``context_embedding``, or the cross-attention's keys).
    text_input: str = ""
    # Entries the negative conditioning must carry for ``prepare_negative`` (the node refuses one without them).
    required_extras: tuple[str, ...] = ()
    source: str = ""


NAG_SITES: dict[str, NagSite] = {
    "unet": NagSite("attn2", {"comfy.ldm.modules.attention:CrossAttention": 0}, keys="to_k", values="to_v",
                    source="comfy/ldm/modules/attention.py BasicTransformerBlock.attn2 (CrossAttention.forward: "
                           "to_k(context), to_v(context), optimized_attention, to_out); ComfyUI-NAG sd/attention.py"),
    "wan": NagSite("cross_attn", {"comfy.ldm.wan.model:WanT2VCrossAttention": 0,
                                  "comfy.ldm.wan.model:WanI2VCrossAttention": 1},
                   keys="k", key_norm="norm_k", values="v", context_embedding="text_embedding",
                   source="comfy/ldm/wan/model.py WanT2VCrossAttention / WanI2VCrossAttention.forward (norm_k(k(c)), "
                          "v(c), before self.o), WanModel.forward_orig (context = text_embedding(context)); "
                          "ComfyUI-NAG wan/model.py"),
    "ltxv": NagSite("attn2", {"comfy.ldm.lightricks.model:CrossAttention": 0}, keys="to_k", key_norm="k_norm",
                    values="to_v", context_embedding="caption_projection", attention_mask="_prepare_attention_mask",
                    source="comfy/ldm/lightricks/model.py BasicTransformerBlock.attn2 (CrossAttention.forward: "
                           "k_norm(to_k(c)), to_v(c), attention with the text mask, to_out), "
                           "LTXVModel._prepare_context (caption_projection) and _prepare_attention_mask; "
                           "KJNodes LTX2_NAG patches attn2 too"),
}
# PixArt α/Σ: every block's cross_attn attends to the T5 text through y_embedder (CaptionEmbedder.forward at
# inference is y_proj(caption)); its attention call passes no transformer_options, so NAG works at proj's input.
NAG_SITES["pixart"] = NagSite(
    "cross_attn", {"comfy.ldm.pixart.blocks:MultiHeadCrossAttention": 0}, keys="", values="",
    keys_values="kv_linear", context_embedding="y_embedder.y_proj", output="proj", queries="q_linear",
    heads="num_heads",
    source="comfy/ldm/pixart/blocks.py MultiHeadCrossAttention.forward (q_linear(x); kv_linear(cond) viewed as "
           "(2, heads, head_dim): keys then values; optimized_attention without options; proj), "
           "PixArtMS.forward_orig (y = y_embedder(y); no text mask reaches it from PixArtMS.forward)")
# Cosmos Predict 2 (MiniTrainDIT): every block's cross_attn (the same Attention class as self_attn) attends to
# the text as the encoder gave it; its call is heads-split (skip_reshape): NAG at output_proj's input, Z⁻ from the
# module's own compute_qkv (q_norm, k_norm per head; no rope in cross-attention) and attn_op.
NAG_SITES["cosmos_predict2"] = NagSite(
    "cross_attn", {"comfy.ldm.cosmos.predict2:Attention": 0}, keys="k_proj", values="v_proj", output="output_proj",
    projections="compute_qkv", attention="attn_op",
    source="comfy/ldm/cosmos/predict2.py Attention.compute_qkv / compute_attention (attn_op, then output_proj), "
           "Block.forward (cross_attn(x, crossattn_emb)), MiniTrainDIT._forward (crossattn_emb = context)")

FAMILIES = tuple(replace(family, methods=family.methods | {NAG}) if family.key in NAG_SITES else family
                 for family in FAMILIES)
# The Wan variants ComfyUI builds from WanModel (issue #11; tests/host/test_family_wan_variants.py): I2V and
# Fun / Fun-Control (WanModel), CameraWanModel, VaceWanModel, HumoWanModel, WanModel_S2V, AnimateWanModel, Wan 2.2
# 5B (WanModel, 48-channel latent) and A14B (two WanModels), and on ComfyUI 0.33.0 WanDancerModel and FlowRVS
# (WanModel under the image-to-image flow) all reach the "wan" record through their MRO: every
# forward_orig calls the dit block patch for each main block with block_index set, and the blocks' self_attn
# is WanSelfAttention. "Layer i" is main block ``blocks[i]`` on every variant: VACE's vace_blocks (whose
# hints are added to x after some main blocks), S2V's audio injectors and Animate's face blocks run between
# main blocks on the whole batch and are not layers. The image grid comes from the latent and the (1, 2, 2)
# patch, never from the sequence length: reference tokens share the sequence, after the video (HuMo, S2V:
# reference latent and motion frames) or before it (Fun 1.1's ``ref_conv`` image), and are left as they are.
FAMILIES = tuple(
    dataclasses.replace(family, patch_size=(1, 2, 2), reference_tokens_before="ref_conv") if family.key == "wan"
    else family for family in FAMILIES)

# Wan variants of ComfyUI 0.33.0 the pack refuses for now (issue #11), each its own record so family_of_class
# finds it before the "wan" record its MRO also reaches:
# - CausalWanModel (comfy/ldm/wan/ar_model.py, WAN21_CausalAR): the ar_video sampler runs it through
#   forward_block, which calls its blocks directly (no dit block patch, no block_index) with KV caches sized for
#   the latent batch: a perturbed branch would silently do nothing or break the caches.
# - WanAnimate2Model (model_animate2.py): its self-attention makes one attention call per frame against the pose
#   branch's keys (WanAnimate2SelfAttention.forward_gen), so "the block's first attention call" is not the
#   video's self-attention, and its pose branch runs the same blocks first.
# - SCAILWanModel and SCAIL2WanModel (model.py): the reference latent's frames are concatenated BEFORE the video
#   along time and the pose tokens after it; the block patch sees neither count, so the video's token grid
#   cannot be placed.
FAMILIES += (
    ModelFamily("wan_causal_ar", "Wan 2.1 causal (autoregressive)", ("comfy.ldm.wan.ar_model:CausalWanModel",),
                frozenset()),
    ModelFamily("wan_animate2", "Wan Animate 2", ("comfy.ldm.wan.model_animate2:WanAnimate2Model",), frozenset()),
    ModelFamily("wan_scail", "Wan SCAIL", ("comfy.ldm.wan.model:SCAILWanModel",), frozenset()),
)

# HunyuanDiT 1.0-1.2 (comfy/ldm/hydit/models.py HunYuanDiT, supported_models.HunyuanDiT and HunyuanDiT1): one list
# of ``blocks``, each self-attention on the image tokens alone (``attn1``), cross-attention to the CLIP+mT5 text
# (``attn2``), MLP; blocks past the middle first mix in a long skip from an earlier block (``skip_linear``).
# Layer i is ``blocks[i]`` in forward order; skipping it passes its input on (the skip it would have mixed in is
# dropped; the skip it would have given a later block is its input), as ComfyUI's SkipLayerGuidanceDiT does with
# the forward's ``dit`` patch. That patch gets no transformer_options (no way to tell the batch chunks apart),
# and ``attn1`` calls optimized_attention without them (no override sees it): forward hooks, the attention
# recomputed from the module's own Wqkv, q/k norms, RoPE and out_proj (module_hooks.SITES).
FAMILIES += (
    ModelFamily(
        "hunyuan_dit", "HunyuanDiT", ("comfy.ldm.hydit.models:HunYuanDiT",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "blocks"},
        sublayers={"double": {"attention": ("attn1",), "feedforward": ("mlp",)}},
        hooks=(FORWARD_HOOKS,),
        recommended={PAG: Recommended(("1",), "diffusers' HunyuanDiTPAGPipeline: pag_applied_layers blocks.1"),
                     SEG: Recommended(("1",), "as PAG (diffusers' HunyuanDiT PAG: blocks.1)"),
                     SLG: Recommended((), _MIDDLE)},
    ),
)

# LTX-2 (comfy/ldm/lightricks/av_model.py LTXAVModel, ComfyUI 0.8.0 and 0.33.0): 48 BasicAVTransformerBlocks, each
# called through the dit block patch with ``img = (video tokens, audio tokens)``. A block runs the video's
# self-attention (``attn1``, its first attention call), its text cross-attention, then the audio's own two, then
# audio-to-video and video-to-audio cross-attention, then both feed-forwards. Only the video stream is perturbed:
# the text (cross-attention only) and the audio stream leave a perturbed block as the unperturbed block gives
# them (dit_blocks.py), so the perturbation of the video is all that differs in that block. The token grid is
# the video latent's (patch 1), not the packed latent the sampler holds. LTX-2.3 and LTX 2.5 run the same class,
# told apart only by their checkpoints' config (cross-attention AdaLN, gated attention, no FFN bias), which
# ComfyUI does not name as a version: one record, with LTX-2.0's STG block (LTX-2.3 uses 28, see the source).
_LTX_2_STG = ("ComfyUI's LTXVSpatioTemporalGuidance (comfy_extras/nodes_lt.py) blocks default 29; Lightricks' "
              "LTX-2 ltx-pipelines utils/constants.py: LTX_2_PARAMS stg_blocks [29] (LTX_2_3_PARAMS: [28])")
FAMILIES += (
    ModelFamily(
        "ltxav", "LTX-2 (audio-video)", ("comfy.ldm.lightricks.av_model:LTXAVModel",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "transformer_blocks"},
        sublayers={"double": {"attention": ("attn1.to_out",), "feedforward": ("ff",)}},  # the video's own
        hooks=(DIT_BLOCK_REPLACE, ATTENTION_OVERRIDE),  # its blocks set no block_index
        recommended={method: Recommended(("29",), _LTX_2_STG) for method in (PAG, SEG, SLG)},
        block_streams=("video", "audio"),
    ),
)

# Families ComfyUI added after 0.8.0 (issue #11; each: its record here, a tiny model, tests/host/test_family_new33.py,
# which runs on hosts that have the family and skips elsewhere). A record names its classes by "module:Class"
# strings, so on a host without the module (0.8.0) it matches no model and nothing is imported.
FAMILIES += (
    # Anima (comfy/ldm/anima/model.py): a Cosmos Predict 2 MiniTrainDIT (the text first adapted by an LLM adapter,
    # not a layer here), so the same blocks: self-attention on the image tokens, cross-attention to the text,
    # MLP, attention through optimized_attention with the options; the forward calls each block with x first and
    # the options as a keyword, sets block_index, and has no dit block patch: forward hooks on the blocks.
    ModelFamily(
        "anima", "Anima", ("comfy.ldm.anima.model:Anima",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "blocks"},
        sublayers={"double": {"attention": ("self_attn",), "feedforward": ("mlp",)}},
        hooks=(BLOCK_FORWARD_HOOKS, ATTENTION_OVERRIDE, BLOCK_INDEX),
        recommended=_MIDDLE_OF_STACK, patch_size=(1, 2, 2),
    ),
    # Krea 2 (comfy/ldm/krea2/model.py SingleStreamDiT): one stream [text, image, reference images] through
    # ``blocks``; attention (grouped-query, k and v repeated to the query heads before the call) through
    # optimized_attention_masked with the options; the only patches are attn1/attn1_output patches (no dit block
    # patch): forward hooks on the blocks. The image is taken as the stream's last tokens (module_hooks.image_grid),
    # right when no reference latents are given (Krea 2 edit appends them after the image: see the README).
    ModelFamily(
        "krea2", "Krea 2", ("comfy.ldm.krea2.model:SingleStreamDiT",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "blocks"}, text_position=TEXT_BEFORE_IMAGE,
        sublayers={"double": {"attention": ("attn",), "feedforward": ("mlp",)}},
        hooks=(BLOCK_FORWARD_HOOKS, ATTENTION_OVERRIDE, BLOCK_INDEX),
        recommended=_MIDDLE_OF_STACK, patch_size=(1, 2, 2),
    ),
    # Ernie Image (comfy/ldm/ernie/model.py): one stream [image, text] through ``layers``; the forward passes no
    # transformer_options to its blocks nor to optimized_attention and runs no DIFFUSION_MODEL wrapper, so neither
    # the override nor block hooks can reach it: module hooks (an APPLY_MODEL wrapper) skip its blocks and
    # sublayers. Attention perturbations (PAG, SEG, SLG attention_scores) are refused: recomputing its attention
    # needs the rotary embedding the block hands its attention module, which a module hook's recomputation does
    # not receive.
    ModelFamily(
        "ernie", "Ernie Image", ("comfy.ldm.ernie.model:ErnieImageModel",), frozenset({SLG}),
        block_lists={"double": "layers"}, text_position=TEXT_AFTER_IMAGE,
        sublayers={"double": {"attention": ("self_attention",), "feedforward": ("mlp",)}},
        hooks=(MODULE_FORWARD_HOOKS,), recommended={SLG: Recommended((), _MIDDLE)},
        mechanism="module hooks for block and sublayer skips; no attention perturbation (the override never sees "
                  "its attention, and a recomputation lacks its rotary embedding)",
    ),
    # Microsoft Lens (comfy/ldm/lens/model.py): dual-stream MMDiT, joint attention on [image, text] (the image
    # first), through optimized_attention with the options; the forward offers dit block replace patches
    # ("double_block", i) with img/txt/vec/pe/attn_mask and sets block_type/block_index.
    ModelFamily(
        "lens", "Lens", ("comfy.ldm.lens.model:LensTransformer2DModel",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "transformer_blocks"}, text_position=TEXT_AFTER_IMAGE,
        sublayers={"double": {"attention": ("attn.to_out.0", "attn.to_add_out"),
                              "feedforward": ("img_mlp", "txt_mlp")}},
        hooks=(DIT_BLOCK_REPLACE, ATTENTION_OVERRIDE, BLOCK_INDEX), recommended=_MIDDLE_OF_STACK,
    ),
    # Ideogram 4 (comfy/ldm/ideogram4/model.py): one stream [text, image] through ``layers`` (an image-only
    # stream when the context is None); attention through optimized_attention_masked with the options; no dit
    # block patch and no block_index: forward hooks on the blocks. One token per latent pixel.
    ModelFamily(
        "ideogram4", "Ideogram 4", ("comfy.ldm.ideogram4.model:Ideogram4Transformer2DModel",),
        frozenset({PAG, SEG, SLG}), block_lists={"double": "layers"}, text_position=TEXT_BEFORE_IMAGE,
        sublayers={"double": {"attention": ("attention",), "feedforward": ("feed_forward",)}},
        hooks=(BLOCK_FORWARD_HOOKS, ATTENTION_OVERRIDE), recommended=_MIDDLE_OF_STACK, patch_size=(1, 1, 1),
    ),
    # CogVideoX (comfy/ldm/cogvideo/model.py): joint attention on [text, video] computed inline in each block
    # (no attention module), through optimized_attention with the options; the blocks are called with keywords
    # only and return (video, text); no dit block patch: module hooks (the block itself marked for the override).
    ModelFamily(
        "cogvideox", "CogVideoX", ("comfy.ldm.cogvideo.model:CogVideoXTransformer3DModel",),
        frozenset({PAG, SEG, SLG}), block_lists={"double": "blocks"}, text_position=TEXT_BEFORE_IMAGE,
        sublayers={"double": {"attention": ("attn_out",), "feedforward": ("ff_out",)}},
        hooks=(MODULE_FORWARD_HOOKS, ATTENTION_OVERRIDE), recommended=_MIDDLE_OF_STACK,
    ),
    # MageFlow (comfy/ldm/mage_flow/model.py): Qwen-Image's blocks (joint attention on [text, image, reference
    # images], the dit block patch, block_type/block_index) on patch-1 tokens (one per latent pixel of Flux.2's
    # 128-channel latent): the image grid comes from the latent and that patch, never from the sequence length.
    ModelFamily(
        "mage_flow", "MageFlow", ("comfy.ldm.mage_flow.model:MageFlowTransformer2DModel",),
        frozenset({PAG, SEG, SLG}), block_lists={"double": "transformer_blocks"}, text_position=TEXT_BEFORE_IMAGE,
        sublayers={"double": {"attention": ("attn.to_out.0", "attn.to_add_out"),
                              "feedforward": ("img_mlp", "txt_mlp")}},
        hooks=(DIT_BLOCK_REPLACE, ATTENTION_OVERRIDE, BLOCK_INDEX), recommended=_MIDDLE_OF_STACK,
        patch_size=(1, 1, 1),
    ),
    # JoyImage (comfy/ldm/joyimage/model.py): dual-stream blocks, joint attention on [image, reference images,
    # text] through optimized_attention with the options; the dit block patch ("double_block", i) with
    # img/txt/vec/pe and block_type/block_index. The image tokens come first: the grid starts at token 0.
    ModelFamily(
        "joyimage", "JoyImage", ("comfy.ldm.joyimage.model:JoyImageTransformer3DModel",),
        frozenset({PAG, SEG, SLG}), block_lists={"double": "double_blocks"}, text_position=TEXT_AFTER_IMAGE,
        sublayers={"double": {"attention": ("attn.img_attn_proj", "attn.txt_attn_proj"),
                              "feedforward": ("img_mlp", "txt_mlp")}},
        hooks=(DIT_BLOCK_REPLACE, ATTENTION_OVERRIDE, BLOCK_INDEX), recommended=_MIDDLE_OF_STACK,
    ),
)

# Anima on NAG: a Cosmos Predict 2 MiniTrainDIT, so the same cross_attn site; its prompt reaches the blocks
# through the LLM adapter, applied at conditioning time (comfy/model_base.py Anima.extra_conds, inference mode:
# diffusion_model.preprocess_text_embeds(cross_attn, t5xxl_ids[None], t5xxl_weights[None, :, None]), padded to 512
# tokens) or in the forward (comfy/ldm/anima/model.py Anima.forward); the negative goes the same way.
def _anima_negative(diffusion_model, negative, extras: dict, timestep=None):
    ids = extras.get("t5xxl_ids")
    if ids is None:
        return negative  # the forward leaves such a context as it is (preprocess_text_embeds without ids)
    weights = extras.get("t5xxl_weights")
    if weights is not None:
        weights = weights.unsqueeze(0).unsqueeze(-1).to(negative)
    return diffusion_model.preprocess_text_embeds(negative, ids.unsqueeze(0).to(negative.device),
                                                  t5xxl_weights=weights)


NAG_SITES["anima"] = replace(
    NAG_SITES["cosmos_predict2"], prepare_negative=_anima_negative,
    source=NAG_SITES["cosmos_predict2"].source + "; comfy/ldm/anima/model.py Anima.preprocess_text_embeds, "
                                                 "comfy/model_base.py Anima.extra_conds")
FAMILIES = tuple(replace(family, methods=family.methods | {NAG}) if family.key == "anima" else family
                 for family in FAMILIES)


# Kandinsky 5 on NAG: its visual blocks' cross_attention attends to the text as the text blocks left it; the
# image tokens are never in the text's attention, so NAG's cross-attention form applies (the issue listed it as
# joint). The prompt's path (comfy/ldm/kandinsky5/model.py Kandinsky5.forward_orig): text_embeddings(context),
# then every text_transformer_block with time_embed = time_embeddings(t) + pooled_text_embeddings(y), y the
# prompt's pooled output (model_base.Kandinsky5.encode_adm), and rope_encode_1d over its length; the negative
# takes the same path with its own pooled output and the call's t.
def _kandinsky5_negative(diffusion_model, negative, extras: dict, timestep):
    pooled = extras["pooled_output"]  # NagSite.required_extras: the node checked it is there
    rows = timestep.shape[0]
    context = diffusion_model.text_embeddings(negative[:1].expand(rows, -1, -1))
    time_embed = (diffusion_model.time_embeddings(timestep, negative.dtype)
                  + diffusion_model.pooled_text_embeddings(pooled[:1].to(negative).expand(rows, -1)))
    freqs = diffusion_model.rope_encode_1d(context.shape[1], device=negative.device, dtype=negative.dtype)
    for block in diffusion_model.text_transformer_blocks:
        context = block(context, time_embed, freqs)
    return context


def _kandinsky5_attention(module, x, context):
    import comfy.ldm.kandinsky5.model as kandinsky5

    q, k, v = module.get_qkv(x, context)
    return kandinsky5.attention(module.query_norm(q), module.key_norm(k), v, module.num_heads)


NAG_SITES["kandinsky5"] = NagSite(
    "cross_attention", {"comfy.ldm.kandinsky5.model:CrossAttention": 0}, keys="to_key", values="to_value",
    output="out_layer", prepare_negative=_kandinsky5_negative, negative_attention=_kandinsky5_attention,
    text_input="text_embeddings", required_extras=("pooled_output",),
    source="comfy/ldm/kandinsky5/model.py CrossAttention.forward (get_qkv, query_norm/key_norm per head, "
           "attention, out_layer), TransformerDecoderBlock.forward, Kandinsky5.forward_orig (the text path)")
FAMILIES = tuple(replace(family, methods=family.methods | {NAG}) if family.key == "kandinsky5" else family
                 for family in FAMILIES)


# HunyuanDiT on NAG: every block's attn2 attends to [CLIP text; mT5 text through mlp_t5], their padding tokens
# replaced by the learned text_embedding_padding (comfy/ldm/hydit/models.py HunYuanDiT.forward, the masks from
# model_base.HunyuanDiT.extra_conds: attention_mask, conditioning_mt5xl, attention_mask_mt5xl); the negative
# goes the same way. attn2 calls optimized_attention without the options: NAG at out_proj's input, Z⁻ as
# CrossAttention.forward computes it (q_norm, rope on q only, k_norm, fused kv_proj).
def _hunyuan_dit_negative(diffusion_model, negative, extras: dict, timestep=None):
    import comfy.ops
    import torch

    dm, clip = diffusion_model, negative.clone()
    t5 = extras["conditioning_mt5xl"].to(negative)
    clip_mask = extras["attention_mask"].to(negative.device).bool()
    t5_mask = extras["attention_mask_mt5xl"].to(negative.device).bool()
    t5 = dm.mlp_t5(t5.view(-1, t5.shape[-1])).view(t5.shape[0], t5.shape[1], -1)
    padding = comfy.ops.cast_to_input(dm.text_embedding_padding, clip)
    clip[:, -dm.text_len:] = clip[:, -dm.text_len:].where(clip_mask[:, -dm.text_len:].unsqueeze(2),
                                                           padding[:dm.text_len])
    t5[:, -dm.text_len_t5:] = t5[:, -dm.text_len_t5:].where(t5_mask[:, -dm.text_len_t5:].unsqueeze(2),
                                                             padding[dm.text_len:])
    return torch.cat((clip, t5), dim=1)


def _hunyuan_dit_attention(module, x, context, freqs_cis_img=None):
    from comfy.ldm.hydit.attn_layers import apply_rotary_emb
    from comfy.ldm.modules.attention import optimized_attention

    b, heads, head_dim = x.shape[0], module.num_heads, module.head_dim
    q = module.q_norm(module.q_proj(x).view(b, x.shape[1], heads, head_dim))
    k, v = module.kv_proj(context).view(b, context.shape[1], 2, heads, head_dim).unbind(dim=2)
    k = module.k_norm(k)
    if freqs_cis_img is not None:
        q = apply_rotary_emb(q, None, freqs_cis_img)[0]
    return optimized_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), heads, skip_reshape=True,
                               attn_precision=module.attn_precision)


NAG_SITES["hunyuan_dit"] = NagSite(
    "attn2", {"comfy.ldm.hydit.attn_layers:CrossAttention": 0}, keys="", values="", keys_values="kv_proj",
    output="out_proj", prepare_negative=_hunyuan_dit_negative, negative_attention=_hunyuan_dit_attention,
    required_extras=("attention_mask", "conditioning_mt5xl", "attention_mask_mt5xl"),
    source="comfy/ldm/hydit/attn_layers.py CrossAttention.forward, comfy/ldm/hydit/models.py HunYuanDiT.forward "
           "(the text states), HunYuanDiTBlock.forward (attn2(norm3(x), text_states, freq_cis_img))")
FAMILIES = tuple(replace(family, methods=family.methods | {NAG}) if family.key == "hunyuan_dit" else family
                 for family in FAMILIES)

# PLADIS (issue #12; nodes/host/pladis.py): NAG's text cross-attention sites whose attention call goes through
# optimized_attention with the options (no ``output`` hook): UNet, Wan, LTXV. The sparse map needs the call's q,
# k, v before the heads are merged, which the output-projection sites (PixArt, Cosmos Predict 2, Anima,
# Kandinsky 5, HunyuanDiT) do not give the override.
PLADIS = "pladis"
FAMILIES = tuple(replace(family, methods=family.methods | {PLADIS})
                 if family.key in NAG_SITES and not NAG_SITES[family.key].output else family for family in FAMILIES)

# LTX-2 modality guidance (issue #12; nodes/modality_nodes.py): the isolated branch zeroes the outputs of every
# block's audio-to-video and video-to-audio cross-attention (comfy/ldm/lightricks/av_model.py
# BasicAVTransformerBlock.forward adds them as ``vx.addcmul_(a2v_out, gate)``, ``ax.addcmul_(v2a_out, gate)``, so a
# zero output is the host's own ``a2v_cross_attn``/``v2a_cross_attn`` = False, but per batch chunk); unlike the
# other sublayers it acts on both streams (dit_blocks: ``SublayerSkip.all_streams``).
MODALITY = "modality"
CROSS_MODAL = "cross_modal"
FAMILIES = tuple(replace(family, methods=family.methods | {MODALITY}, sublayers={
    kind: {**subs, CROSS_MODAL: ("audio_to_video_attn", "video_to_audio_attn")}
    for kind, subs in family.sublayers.items()}) if family.key == "ltxav" else family for family in FAMILIES)

# SWG (issue #12; nodes/host/swg.py): the model run on crops of the latent. UNets take any latent size (their
# upsamplers follow the skip connections' shapes: comfy/ldm/modules/diffusionmodules/openaimodel.py Upsample with
# output_shape); DiTs with patch and position embeddings tied to the latent's size are not offered yet.
SWG = "swg"
FAMILIES = tuple(replace(family, methods=family.methods | {SWG}) if family.key == "unet" else family
                 for family in FAMILIES)

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
    """The tooltip's "auto" sentence for ``method``, from the records: each family's layers, the source of each
    published choice (a family without one takes the middle block), and the fallback for a model that lacks
    the recommended block (``ModelFamily.recommended_for``; layers.parse_layers applies it)."""
    parts = []
    for family in FAMILIES:
        sizes = family.recommended_by_size.get(method)
        if sizes:
            each = [f"{_layers_text(r)} ({r.size or f'{r.min_blocks}+ blocks'})" for r in sizes]
            sources = "; ".join(f"{r.size}: {r.source}" if r.size else r.source for r in sizes)
            parts.append(f"{family.display_name}: {', '.join(each)} [{sources}]")
            continue
        recommended = family.recommended.get(method)
        if recommended is not None:
            published = f" [{recommended.source}]" if recommended.layers else ""
            parts.append(f"{family.display_name}: {_layers_text(recommended)}{published}")
    return "; ".join(parts) + ". " + MISSING_BLOCK_FALLBACK


# What "auto" does on a model without the recommended block (a smaller or distilled model of the family).
MISSING_BLOCK_FALLBACK = "A model without the recommended block (a shallower one) takes the middle of its stack"


def _layers_text(recommended: Recommended) -> str:
    return ", ".join(recommended.layers) if recommended.layers else "the middle block"

