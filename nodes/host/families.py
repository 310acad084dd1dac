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

# Forward hooks installed by a DIFFUSION_MODEL wrapper, inside the diffusion model's own forward (its options are a
# copy of the sampler's, and the attention sees only that copy: HiDream O1's two-pass attention closes over it).
INNER_FORWARD_HOOKS = "forward hooks installed inside the diffusion model's forward (DIFFUSION_MODEL wrapper)"
# While a forward perturbs, a dit patch entry no block looks up: the forward's prompt K/V cache is off (HiDream O1
# caches only when no dit patch is set), so no perturbed branch's prefix keys and values are kept for later steps.
PROMPT_CACHE_OFF = "a dit patch entry while perturbing: the forward's prompt K/V cache off"

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
    # Why a record with no methods is refused, for the nodes' error message ("" = no reason given).
    refused_because: str = ""
    # The diffusion model's attribute holding its (frames, height, width) patch, for a family whose checkpoints set
    # it (JoyImage: model_detection reads it from img_in): used as ``patch_size`` is, where that is None.
    patch_size_attribute: str = ""
    # The model input (an extra cond, by name) whose length is the number of tokens before the image in the
    # blocks' sequence (HiDream O1: ``input_ids``, the prompt and its timestep token).
    prompt_tokens_input: str = ""
    # The diffusion model's module whose output is the time-step embedding every block reads (TSG noises it).
    time_embedding: str = ""

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
    # patch): forward hooks on the blocks. The image ends where Krea 2 edit's reference tokens begin (the host
    # records their counts as ``reference_image_num_tokens``; module_hooks.image_grid): the references are left alone.
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
    # sublayers, and attention perturbations recompute the perturbed chunks' rows of ``self_attention`` from its
    # own to_q/to_k/to_v, per-head RMS norms and the rotary embedding the block hands it as a keyword
    # (module_hooks._ernie_qkv), then its to_out. Patch 1 (model_detection sets no patch_size): one image token per
    # latent pixel, the image first.
    ModelFamily(
        "ernie", "Ernie Image", ("comfy.ldm.ernie.model:ErnieImageModel",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "layers"}, text_position=TEXT_AFTER_IMAGE,
        sublayers={"double": {"attention": ("self_attention",), "feedforward": ("mlp",)}},
        hooks=(MODULE_FORWARD_HOOKS,), recommended=_MIDDLE_OF_STACK, patch_size=(1, 1, 1),
        mechanism="module hooks; attention perturbations recomputed from its attention module's own projections, "
                  "norms and rotary embedding (the override never sees its attention)",
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

# Boogu-Image (ComfyUI 0.33.0, comfy/ldm/boogu/model.py BooguTransformer2DModel, an OmniGen 2 derivative): refiners
# (not layers here), then ``double_stream_layers``, then ``single_stream_layers`` (OmniGen 2's blocks on [text;
# reference images; image]). A double block has two attentions: ``img_instruct_attn``, a joint attention over
# [instruction; reference images; image] with per-stream projections (the image stream's only path to the text in
# that block), then ``img_self_attn``, OmniGen 2's Attention over the [reference images; image] tokens alone. PAG
# and SEG act on ``img_self_attn``: it is the image tokens' self-attention the papers perturb (UNet attn1), while
# an identity map on the joint attention's image rows would also cut the block's text conditioning, which PAG
# leaves to cross-attention. In single blocks (one attention) the joint attention's image rows, as OmniGen 2. The
# image is the last tokens of both sequences (the reference images before it are left alone). Attention through
# optimized_attention_masked with the options; no dit block patch, no block_index: forward hooks. SLG
# ``attention`` zeroes both attentions of a double block.
FAMILIES += (
    ModelFamily(
        "boogu", "Boogu-Image", ("comfy.ldm.boogu.model:BooguTransformer2DModel",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "double_stream_layers", "single": "single_stream_layers"},
        text_position=TEXT_BEFORE_IMAGE,
        sublayers={"double": {"attention": ("img_instruct_attn", "img_self_attn"),
                              "feedforward": ("img_feed_forward", "instruct_feed_forward")},
                   "single": {"attention": ("attn",), "feedforward": ("feed_forward",)}},
        hooks=(FORWARD_HOOKS, ATTENTION_OVERRIDE), recommended=_MIDDLE_OF_STACK, patch_size=(1, 2, 2),
    ),
)


# PixelDiT (ComfyUI 0.33.0, comfy/ldm/pixeldit/model.py PixDiT_T2I; PiD's PidNet in pid.py subclasses it): a
# pixel-space DiT whose ``patch_blocks`` (MMDiT blocks: joint attention on [text; image patches] with per-stream
# qkv and projections, through optimized_attention with the options, heads-split in and out) make the patch-token
# conditioning; the ``pixel_blocks`` after them attend within each patch's pixels and are not layers here. The
# blocks are called by position and return (image, text); no dit block patch, no block_index: forward hooks on
# the blocks, the joint attention marked for the override. The image grid: the model's patch (16 in the release)
# on the pixel latent, beside the text tokens the block's ``y`` holds.
FAMILIES += (
    ModelFamily(
        "pixeldit", "PixelDiT", ("comfy.ldm.pixeldit.model:PixDiT_T2I",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "patch_blocks"}, text_position=TEXT_BEFORE_IMAGE,
        sublayers={"double": {"attention": ("attn",), "feedforward": ("mlp_x", "mlp_y")}},
        hooks=(FORWARD_HOOKS, ATTENTION_OVERRIDE), recommended=_MIDDLE_OF_STACK,
    ),
)


# HiDream O1 (ComfyUI 0.33.0, comfy/ldm/hidream_o1/model.py HiDreamO1Transformer): a Qwen3-VL decoder
# (``language_model.layers``, comfy/text_encoders/llama.py) on [prompt tokens ending with the timestep token;
# image patches of 32x32 pixels; reference patches]. Its two-pass attention (hidream_o1/attention.py) computes the
# prompt's causal rows with SDPA directly and hands optimized_attention (with the options) the other rows' queries
# against every key: the override places those queries at their positions (ActiveBlock.queries_are_last_rows), the
# image grid starting after the ``input_ids`` tokens (the reference patches after it are left alone). Its dit block
# patch hands the layer ``x`` (not the ``img`` the pack's block patch reads), and its layers get no options (the
# forward's own dict, a copy of the sampler's, reaches the attention): forward hooks installed by a DIFFUSION_MODEL
# wrapper. Without a dit patch the forward caches the prompt's keys and values across steps and runs, keyed on the
# prompt alone: while a forward perturbs, a dit patch entry no layer uses turns that cache off. SLG
# ``attention_scores`` makes every row of the generated part (timestep token, image, references) its value; the
# prompt's causal rows, which never reach the override, keep their attention (the prompt is conditioning).
FAMILIES += (
    ModelFamily(
        "hidream_o1", "HiDream O1", ("comfy.ldm.hidream_o1.model:HiDreamO1Transformer",), frozenset({PAG, SEG, SLG}),
        block_lists={"double": "language_model.layers"}, text_position=TEXT_BEFORE_IMAGE,
        sublayers={"double": {"attention": ("self_attn",), "feedforward": ("mlp",)}},
        hooks=(FORWARD_HOOKS, INNER_FORWARD_HOOKS, ATTENTION_OVERRIDE, PROMPT_CACHE_OFF, BLOCK_INDEX),
        recommended=_MIDDLE_OF_STACK, patch_size=(1, 32, 32), prompt_tokens_input="input_ids",
    ),
)


# JoyImage-Edit appends its reference latents' tokens after the image's, before the text ([image; references;
# text], comfy/ldm/joyimage/model.py forward_orig): the image grid comes from the latent and the model's own patch
# (its ``patch_size``, from the checkpoint), never from the sequence length, which a larger reference makes fit
# another grid (a 16x16 reference beside an 8x8 image was taken as one 8x8 grid of image and reference tokens).
FAMILIES = tuple(replace(family, patch_size_attribute="patch_size") if family.key == "joyimage" else family
                 for family in FAMILIES)


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

# TPG (token perturbation guidance): the image tokens entering a block are shuffled. UNets: a forward pre-hook on
# each BasicTransformerBlock of the layer (nodes/host/token_shuffle.py); DiTs: the ``dit`` block patch shuffles
# the image stream it is handed (dit_blocks.py), so every family whose forward offers that patch. The families
# with forward hooks only are not done (their block sites lay their streams out each their own way).
TPG = "tpg"
_TPG_UNET = Recommended(
    ("input.7", "input.8"), "TPG authors' pipeline_sdxl_tpg.py: tpg_applied_layers_index d6-d23, on SDXL the "
                            "down path's last transformer blocks (input_blocks 7 and 8 less block 7's first two)")
FAMILIES = tuple(
    replace(family, methods=family.methods | {TPG},
            recommended={**family.recommended, TPG: _TPG_UNET} if family.key == "unet" else family.recommended)
    if family.key == "unet" or (DIT_BLOCK_REPLACE in family.hooks and FORWARD_HOOKS not in family.hooks) else family
    for family in FAMILIES)

# TSG (time-step guidance): the module whose output is the time-step embedding, from the host's forward
# (0.8.0 and 0.33.0): openaimodel.py UNetModel._forward ``emb = self.time_embed(t_emb)``; mmdit.py MMDiT.forward
# ``c = self.t_embedder(t)``; flux/model.py forward_orig ``vec = self.time_in(...)``; wan/model.py forward_orig
# ``e = self.time_embedding(...)``. HunyuanVideo's time_in also embeds the guiding frame index in the same
# forward, with another batch: not done. Chroma has no time embedding module (its distilled guidance layer
# makes every modulation at once): not done.
TSG = "tsg"
_TIME_EMBEDDINGS = {"unet": "time_embed", "sd3": "t_embedder", "flux": "time_in", "wan": "time_embedding",
                    "flux2": "time_in", "longcat_image": "time_in"}  # Flux.2 and LongCat-Image run Flux's forward
FAMILIES = tuple(replace(family, methods=family.methods | {TSG}, time_embedding=_TIME_EMBEDDINGS[family.key])
                 if family.key in _TIME_EMBEDDINGS else family for family in FAMILIES)

# NAG on joint attention (issue #12): where the text shares the attention sequence with the image, the negative's
# text tokens are a stream of their own, carried through every block by the block's own text-stream modules, and
# in each block Z⁻ is the joint attention of [negative text tokens; the positive's image tokens] (the same image
# queries, keys and values as Z⁺: arXiv:2505.21179 §3, Z⁻ = Attn(Q, K⁻, V⁻)); NAG combines the image rows of Z⁺
# and Z⁻, the text rows are left alone (nodes/host/nag_joint.py has the mechanism and what was checked).
@dataclass(frozen=True)
class JointNagSite:
    """A joint-attention family's text stream for NAG.

    ``embed_text(diffusion_model, negative)``: the negative's text stream before the first block, as the forward
    makes its prompt's. ``text_rope(diffusion_model, length, rows, x)`` (x: the call's latent): the rotary
    embedding of ``length`` text tokens (None: the family ropes no text). ``apply_rope(q, k, pe)``: the
    family's rope on heads-split q, k. ``negative_modulation(block, kind, block_inputs, rows, pooled_delta)``: what the
    block's text modulation takes for the negative rows (the positive rows', with the pooled-text part the
    negative's own where the family has one). ``text_qkv(block, kind, text, modulation)``: heads-split q, k, v
    of the negative's text tokens (before rope) and what ``text_update`` needs. ``text_update(block, kind,
    text, saved, attention)``: the negative's text tokens after the block, from the text rows of its joint
    attention output. ``pooled``: the diffusion model's module the pooled text goes through ("" = none);
    ``text_input``: the module the text encoder's output goes into first (the width check)."""

    embed_text: Any
    # (kind, args, kwargs) of a block call -> {"batch", "text_length" (None: not in this block's inputs), and
    # what ``negative_modulation`` reads}
    block_inputs: Any
    text_rope: Any
    apply_rope: Any
    negative_modulation: Any
    text_qkv: Any
    text_update: Any
    text_input: str
    pooled: str = ""
    text_first: bool = True
    required_extras: tuple[str, ...] = ()
    # (the negative's text-encoder output) -> the context as the ComfyUI model makes it from a conditioning
    # (comfy/model_base.py extra_conds), None: as the encoder gave it.
    prepare_text: Any = None
    mechanism: str = ""
    source: str = ""


def _flux2_context(negative):
    """model_base.Flux2.extra_conds (0.8.0 and 0.33.0): the prompt padded with zero tokens in FRONT to 512."""
    import torch

    target = 512
    if negative.shape[1] < target:
        negative = torch.nn.functional.pad(negative, (0, 0, target - negative.shape[1], 0))
    return negative


def _flux_embed_text(dm, negative):
    if getattr(dm, "txt_norm", None) is not None:
        negative = dm.txt_norm(negative)
    return dm.txt_in(negative)


def _flux_block_inputs(kind, args, kwargs):
    """DoubleStreamBlock(img, txt, vec, pe, ...) / SingleStreamBlock(x, vec, pe, ...), as Flux.forward_orig calls
    them (keywords, x positional)."""
    named = dict(kwargs)
    if kind == "double":
        img = named.get("img", args[0] if args else None)
        txt = named.get("txt", args[1] if len(args) > 1 else None)
        return {"batch": img.shape[0], "text_length": txt.shape[1], "vec": named["vec"]}
    x = named.get("x", args[0] if args else None)
    return {"batch": x.shape[0], "vec": named["vec"]}


def _flux_text_rope(dm, length: int, rows: int, x):
    """Flux._forward's txt_ids for ``length`` tokens (zeros; a linspace on params.txt_ids_dims), through
    pe_embedder, as forward_orig does for [text; image] (the text part only)."""
    import torch

    device = x.device
    ids = torch.zeros((rows, length, len(dm.params.axes_dim)), device=device, dtype=torch.float32)
    for axis in getattr(dm.params, "txt_ids_dims", None) or ():
        ids[:, :, axis] = torch.linspace(0, length - 1, steps=length, device=device, dtype=torch.float32)
    return dm.pe_embedder(ids)


def _flux_apply_rope(q, k, pe):
    from comfy.ldm.flux.math import apply_rope

    return apply_rope(q, k, pe)


def _first_slot(mod):
    """A ModulationOut whose tensors hold one modulation per token range (Flux.2's timestep-zero reference
    images: (B, 2, D), modulation_dims) -> the first range's, which covers the text tokens."""
    import dataclasses as dc

    if mod.scale.ndim == 3 and mod.scale.shape[1] > 1:
        return dc.replace(mod, **{f: getattr(mod, f)[:, :1] for f in ("shift", "scale", "gate")})
    return mod


def _flux_negative_modulation(block, kind, inputs, rows, pooled_delta):
    """A block with its own modulation (Flux.1, LongCat) takes ``vec``: the positive rows' with vector_in's
    part replaced by the negative's pooled output (as ComfyUI-NAG flux/model.py forms the negative rows' vec).
    Global modulation (Flux.2) and Chroma hand the block its ModulationOuts: the positive rows' (no pooled text
    in them)."""
    from .shared_prefix import select_rows

    vec, batch = inputs["vec"], inputs["batch"]
    if hasattr(vec, "index_select"):
        vec = vec.index_select(0, rows)
        return vec + pooled_delta.to(vec) if pooled_delta is not None else vec
    return select_rows(vec, rows, batch)


def _flux_text_qkv(block, kind, text, modulation):
    from comfy.ldm.flux.layers import apply_mod

    heads = block.num_heads
    if kind == "double":
        first, second = block.txt_mod(modulation) if block.modulation else modulation[1]
        first, second = _first_slot(first), _first_slot(second)
        qkv = block.txt_attn.qkv(apply_mod(block.txt_norm1(text), 1 + first.scale, first.shift))
        q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k = block.txt_attn.norm(q, k, v)
        return (q, k, v), (first, second)
    mod = _first_slot(block.modulation(modulation)[0] if block.modulation else modulation)
    fused = block.linear1(apply_mod(block.pre_norm(text), 1 + mod.scale, mod.shift))
    qkv, mlp = fused.split([3 * block.hidden_size, block.mlp_hidden_dim_first], dim=-1)
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = block.norm(q, k, v)
    return (q, k, v), (mod, mlp)


def _flux_text_update(block, kind, text, saved, attention):
    """DoubleStreamBlock.forward's "txt blocks" / SingleStreamBlock.forward's linear2 and gate, on the negative's
    text tokens (comfy/ldm/flux/layers.py)."""
    import torch
    from comfy.ldm.flux.layers import apply_mod

    if kind == "double":
        first, second = saved
        text = text + apply_mod(block.txt_attn.proj(attention), first.gate)
        return text + apply_mod(block.txt_mlp(apply_mod(block.txt_norm2(text), 1 + second.scale, second.shift)),
                                second.gate)
    mod, mlp = saved
    if block.yak_mlp:
        half = block.mlp_hidden_dim_first // 2
        mlp = block.mlp_act(mlp[..., half:]) * mlp[..., :half]
    else:
        mlp = block.mlp_act(mlp)
    return text + apply_mod(block.linear2(torch.cat((attention, mlp), 2)), mod.gate)


_FLUX_JOINT_NAG = JointNagSite(
    embed_text=_flux_embed_text, block_inputs=_flux_block_inputs, text_rope=_flux_text_rope,
    apply_rope=_flux_apply_rope,
    negative_modulation=_flux_negative_modulation, text_qkv=_flux_text_qkv, text_update=_flux_text_update,
    text_input="txt_in", pooled="vector_in",
    mechanism="forward hooks on every double and single block for one forward (the negative's text stream) and "
              "the attention override (Z⁻ beside the block's joint attention, NAG on its image rows)",
    source="comfy/ldm/flux/layers.py DoubleStreamBlock.forward, SingleStreamBlock.forward; comfy/ldm/flux/model.py "
           "Flux.forward_orig (txt_norm, txt_in, vector_in, pe_embedder of [txt_ids; img_ids]); ComfyUI-NAG "
           "@ef8a641 flux/layers.py, flux/model.py")
JOINT_NAG_SITES: dict[str, JointNagSite] = {
    "flux": replace(_FLUX_JOINT_NAG, required_extras=("pooled_output",)),
    "flux2": replace(_FLUX_JOINT_NAG, prepare_text=_flux2_context,
                     source=_FLUX_JOINT_NAG.source + "; comfy/model_base.py Flux2.extra_conds (the 512-token padding)"),
}
FAMILIES = tuple(replace(family, methods=family.methods | {NAG}) if family.key in JOINT_NAG_SITES else family
                 for family in FAMILIES)


# Qwen-Image (comfy/ldm/qwen_image/model.py): one stack of joint blocks, the text first; the text tokens' rope
# positions start after the image grid's half-size (``txt_start``), so the negative's ids are built the same way.
def _qwen_embed_text(dm, negative):
    return dm.txt_in(dm.txt_norm(negative))


def _qwen_block_inputs(kind, args, kwargs):
    """QwenImageTransformerBlock(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb, ...), as
    QwenImageTransformer2DModel._forward calls it (keywords)."""
    named = dict(zip(("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "temb"), args,
                     strict=False))
    named.update(kwargs)
    temb = named["temb"]
    if named.get("timestep_zero_index") is not None:  # Edit 2511: [t; 0] rows, the text takes the first half
        temb = temb.chunk(2, dim=0)[0]
    return {"batch": named["hidden_states"].shape[0], "text_length": named["encoder_hidden_states"].shape[1],
            "temb": temb}


def _qwen_text_rope(dm, length: int, rows: int, x):
    """_forward's txt_ids (arange from txt_start, on all 3 axes) through pe_embedder, in the latent's dtype."""
    import torch

    patch = dm.patch_size
    start = round(max(((x.shape[-1] + (patch // 2)) // patch) // 2, ((x.shape[-2] + (patch // 2)) // patch) // 2))
    ids = torch.arange(start, start + length, device=x.device).reshape(1, -1, 1).repeat(rows, 1, 3)
    return dm.pe_embedder(ids).to(x.dtype).contiguous()


def _qwen_apply_rope(q, k, pe):
    from comfy.ldm.flux.math import apply_rope1

    return apply_rope1(q, pe), apply_rope1(k, pe)


def _qwen_negative_modulation(block, kind, inputs, rows, pooled_delta):
    return inputs["temb"].index_select(0, rows)  # no pooled text in Qwen-Image's temb


def _qwen_text_qkv(block, kind, text, temb):
    attention, heads = block.attn, block.attn.heads
    first, second = block.txt_mod(temb).chunk(2, dim=-1)
    modulated, gate = block._modulate(block.txt_norm1(text), first)

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    q = attention.norm_added_q(split(attention.add_q_proj(modulated)))
    k = attention.norm_added_k(split(attention.add_k_proj(modulated)))
    return (q, k, split(attention.add_v_proj(modulated))), (gate, second)


def _qwen_text_update(block, kind, text, saved, attention_output):
    """QwenImageTransformerBlock.forward's text half on the negative's tokens (to_add_out, gate, txt_mlp)."""
    import torch

    gate, second = saved
    text = text + gate * block.attn.to_add_out(attention_output)
    modulated, gate2 = block._modulate(block.txt_norm2(text), second)
    return torch.addcmul(text, gate2, block.txt_mlp(modulated))


JOINT_NAG_SITES["qwen_image"] = JointNagSite(
    embed_text=_qwen_embed_text, block_inputs=_qwen_block_inputs, text_rope=_qwen_text_rope,
    apply_rope=_qwen_apply_rope, negative_modulation=_qwen_negative_modulation, text_qkv=_qwen_text_qkv,
    text_update=_qwen_text_update, text_input="txt_in",
    mechanism=_FLUX_JOINT_NAG.mechanism.replace("every double and single block", "every transformer block"),
    source="comfy/ldm/qwen_image/model.py Attention.forward, QwenImageTransformerBlock.forward, "
           "QwenImageTransformer2DModel._forward (txt_norm, txt_in, txt_ids from txt_start, pe_embedder)")
FAMILIES = tuple(replace(family, methods=family.methods | {NAG}) if family.key in JOINT_NAG_SITES else family
                 for family in FAMILIES)


# SD3 / SD3.5 (comfy/ldm/modules/diffusionmodules/mmdit.py): joint blocks of a context_block (the text stream) and
# an x_block, no rope, the attention called heads merged (B, L, H·D); the last block's context_block is pre_only
# (q, k, v of the text, no text output). The modulation c = t_embedder(t) + y_embedder(pooled): the negative's
# text stream takes the positive rows' c with y_embedder of the negative's pooled output, as Flux.1's vec.
def _sd3_embed_text(dm, negative):
    """MMDiT.forward (context_processor, context_embedder) and forward_core_with_concat (register tokens first)."""
    import torch

    if dm.context_processor is not None:
        negative = dm.context_processor(negative)
    text = dm.context_embedder(negative)
    if dm.register_length > 0:
        text = torch.cat((dm.register.to(text).expand(text.shape[0], -1, -1), text), 1)
    return text


def _sd3_block_inputs(kind, args, kwargs):
    """JointBlock(context, x, c=..., use_checkpoint=..., transformer_options=...), as forward_core_with_concat
    calls it (and its block_wrap under a dit patch)."""
    named = dict(zip(("context", "x"), args, strict=False))
    named.update(kwargs)
    return {"batch": named["x"].shape[0], "text_length": named["context"].shape[1], "c": named["c"]}


def _sd3_negative_modulation(block, kind, inputs, rows, pooled_delta):
    c = inputs["c"].index_select(0, rows)
    return c + pooled_delta.to(c) if pooled_delta is not None else c


def _sd3_text_qkv(block, kind, text, c):
    """DismantledBlock.pre_attention of the context_block (adaLN, norm1, qkv, ln_q/ln_k): q, k, v heads merged."""
    qkv, intermediates = block.context_block.pre_attention(text, c)
    return tuple(qkv), intermediates


def _sd3_text_update(block, kind, text, saved, attention):
    """DismantledBlock.post_attention of the context_block (proj, gate, mlp); a pre_only block's text stream ends
    there (_block_mixing returns no context), the negative's is left as it is (no block reads it after)."""
    if block.context_block.pre_only:
        return text
    return block.context_block.post_attention(attention, *saved)


JOINT_NAG_SITES["sd3"] = JointNagSite(
    embed_text=_sd3_embed_text, block_inputs=_sd3_block_inputs, text_rope=lambda dm, length, rows, x: None,
    apply_rope=None, negative_modulation=_sd3_negative_modulation, text_qkv=_sd3_text_qkv,
    text_update=_sd3_text_update, text_input="context_embedder", pooled="y_embedder",
    required_extras=("pooled_output",),
    mechanism=_FLUX_JOINT_NAG.mechanism.replace("every double and single block", "every joint block"),
    source="comfy/ldm/modules/diffusionmodules/mmdit.py _block_mixing, DismantledBlock.pre_attention, "
           "post_attention, MMDiT.forward (context_embedder, t_embedder + y_embedder), forward_core_with_concat")
FAMILIES = tuple(replace(family, methods=family.methods | {NAG}) if family.key in JOINT_NAG_SITES else family
                 for family in FAMILIES)

# Chroma (comfy/ldm/chroma/model.py): Flux's double and single blocks without modulation layers, their
# ModulationOuts from the distilled approximator (timestep, guidance, block index: no text in them), no pooled
# input, no txt_norm, txt_ids zeros. The negative's text stream takes the positive rows' ModulationOuts, as the
# authors' chroma/model.py (ComfyUI-NAG) gives the negative's rows the positive rows' mod_vectors.
JOINT_NAG_SITES["chroma"] = replace(
    _FLUX_JOINT_NAG, pooled="",
    source="comfy/ldm/chroma/model.py Chroma.forward_orig (txt_in, get_modulations, pe_embedder of [txt_ids; "
           "img_ids]), Chroma._forward (txt_ids zeros); comfy/ldm/flux/layers.py DoubleStreamBlock.forward, "
           "SingleStreamBlock.forward (modulation=False); ComfyUI-NAG chroma/model.py")
FAMILIES = tuple(replace(family, methods=family.methods | {NAG}) if family.key in JOINT_NAG_SITES else family
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



# LTX-2 (audio-video) on NAG (issue #12): every block's video ``attn2``, the video stream's text cross-attention
# (comfy/ldm/lightricks/av_model.py BasicAVTransformerBlock.forward: attn2(rms_norm(vx), v_context, mask), the same
# lightricks CrossAttention as LTXV's; ``audio_attn2`` is another attribute and stays untouched: the authors'
# ComfyUI-NAG has no LTX-2 code, so NAG acts where the paper puts it for the video, the generated image stream;
# KJNodes' LTX2_NAG also patches audio_attn2 with a second negative, another choice). The negative is made into
# the video context as the host makes the prompt's: on 0.33.0 ``preprocess_text_embeds`` (model_base.LTXAV
# .extra_conds: the connectors, unless already processed), then ``LTXAVModel._prepare_context`` (split into the
# video and audio halves, the video half through caption_projection where it comes after the connector).
def _ltx_2_negative(diffusion_model, negative, extras: dict, timestep=None):
    dm = diffusion_model
    if hasattr(dm, "preprocess_text_embeds"):  # ComfyUI 0.33.0
        negative = dm.preprocess_text_embeds(negative, unprocessed=bool(extras.get("unprocessed_ltxav_embeds")))
    rows = negative.shape[0]
    # _prepare_context reads only the streams' widths from x (video tokens, audio tokens).
    streams = (negative.new_empty(rows, 0, dm.inner_dim), negative.new_empty(rows, 0, dm.audio_inner_dim))
    (video_context, _audio_context), _mask = dm._prepare_context(negative, rows, streams)
    return video_context


def _ltx_2_refusal(diffusion_model, context, extras: dict) -> str | None:
    """Why GuidersNAG refuses this LTX-2 model and negative (None: it does not). LTX-2.3's cross-attention AdaLN
    (0.33.0 ``cross_attention_adaln``: apply_cross_attention_adaln modulates the context per block by the call's
    prompt timestep before attn2) would need the negative modulated per block too, which is not done yet. The
    negative's width must be one the model's _prepare_context splits (caption_channels·2, or on 0.33.0 the
    processed cross_attention_dim + audio_cross_attention_dim); an unprocessed 0.33.0 embedding goes through the
    model's connectors first, whatever its width."""
    dm = diffusion_model
    if getattr(dm.transformer_blocks[0], "cross_attention_adaln", False):
        return ("this LTX-2 model has cross-attention AdaLN (the LTX-2.3 config), which modulates the text per "
                "block before its cross-attention; NAG does not carry the negative through that yet. Supported: "
                "LTX-2.0 checkpoints.")
    if extras.get("unprocessed_ltxav_embeds"):
        return None
    widths = {dm.caption_channels * 2}
    if hasattr(dm, "preprocess_text_embeds"):
        widths.add(dm.cross_attention_dim + dm.audio_cross_attention_dim)
    if context.shape[-1] not in widths:
        return (f"negative has {context.shape[-1]} features per token, this LTX-2 model's text input takes "
                f"{' or '.join(str(w) for w in sorted(widths))}: encode the negative with the text encoder loaded "
                "with this model (LTX-2's Gemma).")
    return None


NAG_SITES["ltxav"] = replace(
    NAG_SITES["ltxv"], context_embedding="", prepare_negative=_ltx_2_negative,
    source="comfy/ldm/lightricks/av_model.py BasicAVTransformerBlock.forward (attn2: the video's text "
           "cross-attention; audio_attn2 untouched), LTXAVModel._prepare_context and preprocess_text_embeds, "
           "comfy/model_base.py LTXAV.extra_conds; comfy/ldm/lightricks/model.py CrossAttention.forward")
# Checks of the negative a family needs instead of the generic width check (nodes/nag_nodes.py): the reason the
# node refuses, or None.
NAG_NEGATIVE_CHECKS = {"ltxav": _ltx_2_refusal}
FAMILIES = tuple(replace(family, methods=family.methods | {NAG}) if family.key == "ltxav" else family
                 for family in FAMILIES)
FAMILY_BY_KEY = {family.key: family for family in FAMILIES}

# PLADIS on LTX-2 (issue #12): its video text cross-attention is NAG's "ltxav" site, the LTXV CrossAttention class
# called through optimized_attention with the options (comfy/ldm/lightricks/av_model.py
# BasicAVTransformerBlock._apply_text_cross_attention: attn2 on the video; audio_attn2, the audio's text attention,
# is another attribute and stays dense, as NAG leaves it). LTX-2.3's cross-attention AdaLN modulates the module's
# inputs and its per-head gates its output, both outside the attention call PLADIS changes.
FAMILIES = tuple(replace(family, methods=family.methods | {PLADIS}) if family.key == "ltxav" else family
                 for family in FAMILIES)
FAMILY_BY_KEY = {family.key: family for family in FAMILIES}
