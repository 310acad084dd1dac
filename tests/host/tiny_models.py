"""Tiny random-weight SD1.5, SDXL, SD3, Flux, Wan 2.1, LTXV and HunyuanVideo models built in code with ComfyUI's
own classes (no downloads), and medium SD1.5 and SD3 ones for the benchmarks.

Each model is the real architecture (comfy.supported_models config -> BaseModel -> ModelPatcher), only
narrow and shallow, so a 4-step run on an 8x8 latent (the video models: 3 frames of 8x8) takes a fraction
of a second on the CPU. Weights are drawn from a seeded generator: the same seed gives the same model, and outputs are
finite and depend on the conditioning, so guidance changes results measurably.

The builders import comfy themselves after harness.prepare_host_imports(), so they work outside pytest
too (benchmarks): the CPU is forced before comfy.model_management is first imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from harness import prepare_host_imports

# Image families: tests parametrized over FAMILIES expect (B, C, H, W) latents and image noise schedules.
FAMILIES = ("sd15", "sd3", "flux")
VIDEO_FAMILIES = ("wan", "ltxv", "hunyuan_video")  # (B, C, T, H, W) latents


@dataclass(frozen=True)
class FamilySpec:
    """What a family's conditioning and latent look like (the shapes its text encoders and VAE would give)."""

    latent_channels: int
    context_dim: int
    context_tokens: int
    pooled_dim: int | None  # pooled text embedding fed to the model as ``y`` (SD3, Flux)
    flux_guidance: float | None  # Flux's distilled-guidance input, set by FluxGuidance in real workflows
    latent_frames: int | None = None  # video families: T of the (B, C, T, H, W) latent
    padded_text_tokens: int | None = None  # LTXV: its T5 pads the prompt and passes an ``attention_mask``
    llama_layers: int | None = None  # HiDream: Llama hidden states of this many layers (``conditioning_llama3``)


SPECS = {
    "sd15": FamilySpec(latent_channels=4, context_dim=64, context_tokens=77, pooled_dim=None, flux_guidance=None),
    "sd15_medium": FamilySpec(
        latent_channels=4, context_dim=768, context_tokens=77, pooled_dim=None, flux_guidance=None
    ),
    # SDXL: its ADM input (``y``) is the pooled text (1280) and six 256-d size embeddings, as in the real model.
    "sdxl": FamilySpec(latent_channels=4, context_dim=64, context_tokens=77, pooled_dim=1280, flux_guidance=None),
    "sdxl_medium": FamilySpec(latent_channels=4, context_dim=64, context_tokens=77, pooled_dim=1280,
                              flux_guidance=None),
    "sd3": FamilySpec(latent_channels=16, context_dim=32, context_tokens=16, pooled_dim=16, flux_guidance=None),
    "sd3_medium": FamilySpec(latent_channels=16, context_dim=32, context_tokens=16, pooled_dim=16, flux_guidance=None),
    "flux": FamilySpec(latent_channels=16, context_dim=32, context_tokens=16, pooled_dim=16, flux_guidance=3.5),
}

# Three latent frames: a 9-frame video for Wan 2.1's and HunyuanVideo's VAEs ((length - 1) // 4 + 1), a
# 17-frame one for LTXV's ((length - 1) // 8 + 1). Not in SPECS: tests that build their own video model check
# ``family in SPECS`` to pick 4-D image latents. HunyuanVideo takes a pooled CLIP embedding (``y``) and, as
# a guidance-distilled model, a guidance value (ComfyUI's default 6.0 when none is given).
VIDEO_SPECS = {
    "wan": FamilySpec(latent_channels=16, context_dim=32, context_tokens=16, pooled_dim=None,
                      flux_guidance=None, latent_frames=3),
    "ltxv": FamilySpec(latent_channels=128, context_dim=32, context_tokens=16, pooled_dim=None,
                       flux_guidance=None, latent_frames=3, padded_text_tokens=4),
    "hunyuan_video": FamilySpec(latent_channels=16, context_dim=32, context_tokens=16, pooled_dim=16,
                                flux_guidance=6.0, latent_frames=3),
}
# Families of tests/host/test_family_blockpatch.py (not in FAMILIES / VIDEO_FAMILIES: the shared matrices
# list them through node_table.BLOCKPATCH). AuraFlow: SDXL's 4-channel latent, an 8-token T5 prompt of
# width 32. Mochi: 12 channels, 3 frames, its T5 pads the prompt and passes an ``attention_mask`` (the
# model attends to the unpadded ``num_tokens`` only).
SPECS["auraflow"] = FamilySpec(latent_channels=4, context_dim=32, context_tokens=16, pooled_dim=None,
                               flux_guidance=None)
VIDEO_SPECS["mochi"] = FamilySpec(latent_channels=12, context_dim=32, context_tokens=16, pooled_dim=None,
                                  flux_guidance=None, latent_frames=3, padded_text_tokens=4)

# Autoguidance's "bad version" of a tiny model: the same architecture with other random weights.
WEAK_MODEL_SEED = 7

# The families without a block patch in their forward (the pack hooks their modules): PixArt-Σ and HiDream
# (image latents), Cosmos Predict 2 (video latents, its Wan 2.1 VAE's 16 channels).
HOOKLESS_FAMILIES = ("pixart", "hidream", "omnigen2", "cosmos_predict2", "cosmos")
SPECS["pixart"] = FamilySpec(latent_channels=4, context_dim=32, context_tokens=16, pooled_dim=None, flux_guidance=None)
# HiDream: the T5 embedding as context, the pooled CLIP embeddings (``y``), the Llama 3 layers' hidden states.
SPECS["hidream"] = FamilySpec(latent_channels=16, context_dim=32, context_tokens=8, pooled_dim=16, flux_guidance=None,
                              llama_layers=4)
# OmniGen 2: its Qwen2.5-VL embedding and an all-ones attention mask (the model takes the prompt's token count
# from it, ``num_tokens``).
SPECS["omnigen2"] = FamilySpec(latent_channels=16, context_dim=32, context_tokens=12, pooled_dim=None,
                               flux_guidance=None, padded_text_tokens=0)
VIDEO_SPECS["cosmos_predict2"] = FamilySpec(latent_channels=16, context_dim=32, context_tokens=16, pooled_dim=None,
                                            flux_guidance=None, latent_frames=3)
VIDEO_SPECS["cosmos"] = FamilySpec(latent_channels=16, context_dim=32, context_tokens=16, pooled_dim=None,
                                   flux_guidance=None, latent_frames=3)

# The Flux-code families (tests/host/test_family_flux2.py). Flux.2: 128-channel latents (patch 1), context
# padded by ComfyUI to 512 tokens, no pooled input (its vector_in is absent; the pooled_output only satisfies
# Flux's encode_adm and is ignored), the dev model takes a guidance value, Klein none. Chroma: Flux's 16-channel
# latents, the pooled_output likewise ignored, guidance fed to its approximator (ComfyUI's default 0). Chroma
# Radiance: 3-channel pixels. LongCat-Image (ComfyUI 0.33.0): no pooled input, no guidance.
SPECS.update({
    "flux2": FamilySpec(latent_channels=128, context_dim=32, context_tokens=16, pooled_dim=16, flux_guidance=4.0),
    "flux2_klein": FamilySpec(latent_channels=128, context_dim=32, context_tokens=16, pooled_dim=16,
                              flux_guidance=None),
    "chroma": FamilySpec(latent_channels=16, context_dim=32, context_tokens=16, pooled_dim=16, flux_guidance=None),
    "chroma_radiance": FamilySpec(latent_channels=3, context_dim=32, context_tokens=16, pooled_dim=16,
                                  flux_guidance=None),
    "longcat_image": FamilySpec(latent_channels=16, context_dim=32, context_tokens=16, pooled_dim=None,
                                flux_guidance=None),
})
FLUX_CODE_FAMILIES = ("flux2", "flux2_klein", "chroma", "chroma_radiance", "longcat_image")

# Latent side (in latent pixels) for quick tests and for the medium benchmark models.
TINY_LATENT_SIZE = 8
MEDIUM_LATENT_SIZE = 32


def fill_deterministic(module: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter and floating buffer of ``module`` with seeded normal values.

    comfy.ops layers skip weight init, and MMDiT's ``pos_embed`` buffer is allocated with torch.empty, so
    without this the model computes with whatever memory held (NaNs at random). Matrices and kernels get
    std 1/sqrt(fan_in) so activations keep unit scale through the layers; biases get std 0.02; vectors
    that are not biases (norm scales) get 1 + N(0, 0.1) so norms neither vanish nor flip sign.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = dict(module.named_parameters())
    tensors.update((name, buf) for name, buf in module.named_buffers() if buf.is_floating_point())
    with torch.no_grad():
        for name in sorted(tensors):  # sorted: the draw order must not depend on module construction order
            tensor = tensors[name]
            values = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            if tensor.ndim >= 2:
                values = values / math.sqrt(tensor[0].numel())
            elif name.endswith("bias"):
                values = values * 0.02
            else:
                values = 1.0 + values * 0.1
            tensor.copy_(values.to(tensor.dtype))


def _supported_models():
    prepare_host_imports()
    import comfy.supported_models

    return comfy.supported_models


# The weights' dtype of every model built here: float32 for the tests; the GPU benchmark sets float16 or bfloat16
# (``--dtype``) before it builds its models.
INFERENCE_DTYPE = torch.float32


def _to_patcher(model_config, seed: int):
    import comfy.model_management
    import comfy.model_patcher

    model_config.set_inference_dtype(INFERENCE_DTYPE, None)
    model = model_config.get_model({})
    # Only the network: model.model_sampling's buffers are the noise schedule, computed from the config.
    fill_deterministic(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def make_sd15(medium: bool = False, seed: int = 0):
    """An SD1.5 UNet (EPS, 2 levels, spatial transformers at every level and in the middle block).

    Tiny: model_channels 32, context_dim 64 (~1 M parameters). ``medium=True``: model_channels 128,
    context_dim 768 as real SD1.5 (~17 M parameters), for benchmarks on a 32x32 latent.
    """
    unet_config = {
        "model_channels": 128 if medium else 32,
        "context_dim": SPECS["sd15_medium" if medium else "sd15"].context_dim,
        "num_res_blocks": [1, 1],
        "channel_mult": [1, 2],
        "transformer_depth": [1, 1],
        "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1],
        "in_channels": 4,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "use_linear_in_transformer": False,
        "adm_in_channels": None,
        "image_size": 32,
        "use_checkpoint": False,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }
    return _to_patcher(_supported_models().SD15(unet_config), seed)


def make_sdxl(seed: int = 0, medium: bool = False):
    """An SDXL UNet (EPS, conditioned on the pooled text and sizes through its ADM input): 2 levels, no
    attention at the first level as in SDXL, linear projections in its transformers, context_dim 64.
    ``medium=True``: model_channels 128 and 2 transformers per attention block, for the GPU benchmark's
    128x128 latents."""
    spec = SPECS["sdxl"]
    channels, depth = (128, 2) if medium else (32, 1)
    unet_config = {
        "model_channels": channels, "num_res_blocks": [1, 1], "channel_mult": [1, 2], "num_head_channels": 16,
        "transformer_depth": [0, depth], "transformer_depth_middle": depth,
        "transformer_depth_output": [0, 0, depth, depth],
        "context_dim": spec.context_dim, "adm_in_channels": spec.pooled_dim + 6 * 256,
        "num_classes": "sequential", "in_channels": 4, "out_channels": 4, "use_spatial_transformer": True,
        "use_linear_in_transformer": True, "legacy": False, "image_size": 32, "use_checkpoint": False,
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    return _to_patcher(_supported_models().SDXL(unet_config), seed)


def make_sd3(medium: bool = False, seed: int = 0):
    """An SD3 MMDiT (flow, shift 3), patch 2, a Linear context embedder.

    Tiny: depth 2 (hidden 128, 2 heads), 2 blocks. ``medium=True``: 24 joint blocks as SD3 Medium, at the
    same width (ComfyUI's ``depth`` sets the width, hidden = 64 * depth with heads of 64, and ``num_blocks``
    the number of blocks): ~14 M parameters, a forward of batch 3 on a 32x32 latent in ~0.4 s on one CPU
    thread, for benchmarks. SD3 Medium's own width (depth 24, hidden 1536) took ~14 s per such forward, and
    depth 12 (hidden 768, 12 blocks) ~2 s.
    """
    spec = SPECS["sd3_medium" if medium else "sd3"]
    depth = 2
    pos_embed_max_size = 32  # latent sides up to 64 fit the position table
    unet_config = {
        "in_channels": spec.latent_channels,
        "out_channels": spec.latent_channels,
        "patch_size": 2,
        "depth": depth,
        "input_size": None,
        "adm_in_channels": spec.pooled_dim,
        "context_embedder_config": {
            "target": "torch.nn.Linear",
            "params": {"in_features": spec.context_dim, "out_features": 64 * depth},  # MMDiT hidden = 64 * depth
        },
        "num_patches": pos_embed_max_size * pos_embed_max_size,
        "pos_embed_max_size": pos_embed_max_size,
        "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": [],
    }
    if medium:
        unet_config["num_blocks"] = 24  # MMDiT's default is depth blocks
    return _to_patcher(_supported_models().SD3(unet_config), seed)


def make_flux(seed: int = 0):
    """A Flux-dev DiT (flow, guidance-distilled input): 2 double + 2 single blocks, hidden 64, 4 heads."""
    spec = SPECS["flux"]
    unet_config = {
        "image_model": "flux",
        "in_channels": spec.latent_channels,
        "out_channels": spec.latent_channels,
        "vec_in_dim": spec.pooled_dim,
        "context_in_dim": spec.context_dim,
        "hidden_size": 64,
        "mlp_ratio": 4.0,
        "num_heads": 4,
        "depth": 2,
        "depth_single_blocks": 2,
        "axes_dim": [4, 6, 6],  # sums to the head dim 64 / 4
        "theta": 10000,
        "patch_size": 2,
        "qkv_bias": True,
        "guidance_embed": True,
        "txt_ids_dims": [],
        "yak_mlp": False,
        "txt_norm": False,
    }
    return _to_patcher(_supported_models().Flux(unet_config), seed)


def make_wan(seed: int = 0):
    """A Wan 2.1 text-to-video DiT (flow, shift 8): 3 blocks, hidden 64, 2 heads, 3-D patches (1, 2, 2).

    The head dim 32 splits into rope axes of 12 (frames), 10 and 10 (height, width), all even as the rope
    needs (WanModel: d - 4·(d // 6), 2·(d // 6), 2·(d // 6)). Conditioning is the text embedding alone
    (WAN21.extra_conds: ``c_crossattn``); ``text_len`` is not used by the forward.
    """
    spec = VIDEO_SPECS["wan"]
    unet_config = {
        "image_model": "wan2.1",
        "model_type": "t2v",
        "patch_size": (1, 2, 2),
        "text_len": spec.context_tokens,
        "in_dim": spec.latent_channels,
        "out_dim": spec.latent_channels,
        "dim": 64,
        "ffn_dim": 128,
        "freq_dim": 256,
        "text_dim": spec.context_dim,
        "num_heads": 2,
        "num_layers": 3,
        "window_size": (-1, -1),
        "qk_norm": True,
        "cross_attn_norm": True,  # as model_detection sets it for every Wan 2.1 checkpoint
        "eps": 1e-6,
    }
    return _to_patcher(_supported_models().WAN21_T2V(unet_config), seed)


def make_ltxv(seed: int = 0, num_layers: int = 3):
    """An LTX-Video DiT (flow, shift 2.37): 3 blocks, 2 heads of 32, patch 1 (one token per latent pixel).

    Each block: self-attention on the video tokens, cross-attention to the projected T5 embedding
    (``caption_channels`` → the inner dim 64), then a feed-forward; blocks update their input in place.
    ``num_layers=28`` gives LTX-Video 2B's depth (its blocks 0-27), still narrow.
    """
    spec = VIDEO_SPECS["ltxv"]
    unet_config = {
        "image_model": "ltxv",
        "in_channels": spec.latent_channels,
        "num_attention_heads": 2,
        "attention_head_dim": 32,
        "cross_attention_dim": 64,  # the inner dim: the context is projected to it before the blocks
        "caption_channels": spec.context_dim,
        "num_layers": num_layers,
    }
    return _to_patcher(_supported_models().LTXV(unet_config), seed)


def make_hunyuan_video(seed: int = 0):
    """A HunyuanVideo DiT (flow, shift 7, guidance-distilled): 2 double + 2 single blocks, hidden 64, 2 heads,
    3-D patches (1, 2, 2). Flux's block design, with the joint attention's image tokens FIRST and the text
    tokens after them (``flipped_img_txt``); text goes through the token refiner first."""
    spec = VIDEO_SPECS["hunyuan_video"]
    unet_config = {
        "image_model": "hunyuan_video",
        "in_channels": spec.latent_channels,
        "out_channels": spec.latent_channels,
        "patch_size": [1, 2, 2],
        "vec_in_dim": spec.pooled_dim,
        "context_in_dim": spec.context_dim,
        "hidden_size": 64,
        "mlp_ratio": 4.0,
        "num_heads": 2,
        "depth": 2,
        "depth_single_blocks": 2,
        "axes_dim": [8, 12, 12],  # sums to the head dim 64 / 2
        "theta": 256,
        "qkv_bias": True,
        "guidance_embed": True,
        "byt5": False,
        "meanflow": False,
        "use_cond_type_embedding": False,
        "vision_in_dim": None,
        "meanflow_sum": False,
    }
    return _to_patcher(_supported_models().HunyuanVideo(unet_config), seed)


def make_pixart(seed: int = 0):
    """A PixArt-Σ DiT (``supported_models.PixArtSigma``: EPS, sqrt-linear betas, no micro-conditions): 3 blocks,
    hidden 64, 2 heads, patch 2. Each block: self-attention (AttentionKVCompress, no KV compression),
    cross-attention to the projected T5 embedding, MLP, all adaLN-single modulated."""
    spec = SPECS["pixart"]
    unet_config = {"image_model": "pixart_sigma", "input_size": 16, "patch_size": 2,
                   "in_channels": spec.latent_channels,
                   "hidden_size": 64, "depth": 3, "num_heads": 2, "caption_channels": spec.context_dim,
                   "model_max_length": spec.context_tokens, "pe_interpolation": 1, "micro_condition": False}
    return _to_patcher(_supported_models().PixArtSigma(unet_config), seed)


def make_hidream(seed: int = 0):
    """A HiDream-I1 DiT (flow, shift 3): 2 double-stream + 2 single-stream blocks, 2 heads of 32, patch 2, the
    image FFN a mixture of 4 experts (2 active) as in HiDream. Each block's joint attention takes the image
    tokens first and the text after them; block i also attends to Llama layer ``llama_layers[i]``."""
    spec = SPECS["hidream"]
    unet_config = {"image_model": "hidream", "patch_size": 2, "in_channels": spec.latent_channels,
                   "out_channels": spec.latent_channels, "num_layers": 2, "num_single_layers": 2,
                   "attention_head_dim": 32, "num_attention_heads": 2, "caption_channels": [spec.context_dim] * 2,
                   "text_emb_dim": spec.pooled_dim, "num_routed_experts": 4, "num_activated_experts": 2,
                   "axes_dims_rope": [8, 12, 12], "max_resolution": [16, 16], "llama_layers": [0, 1, 2, 3]}
    return _to_patcher(_supported_models().HiDream(unet_config), seed)


def make_cosmos_predict2(seed: int = 0):
    """A Cosmos Predict 2 text-to-image/video DiT (``MiniTrainDIT``, EDM-style flow, σ 0.002..80): 3 blocks,
    hidden 64, 2 heads, patch (1, 2, 2), adaLN-LoRA as the released models. Each block: self-attention on the
    video tokens, cross-attention to the T5 embedding, MLP."""
    spec = VIDEO_SPECS["cosmos_predict2"]
    unet_config = {"image_model": "cosmos_predict2", "max_img_h": 240, "max_img_w": 240, "max_frames": 128,
                   "in_channels": spec.latent_channels, "out_channels": spec.latent_channels, "patch_spatial": 2,
                   "patch_temporal": 1, "concat_padding_mask": True, "model_channels": 64, "num_blocks": 3,
                   "num_heads": 2, "crossattn_emb_channels": spec.context_dim, "pos_emb_cls": "rope3d",
                   "pos_emb_learnable": True, "pos_emb_interpolation": "crop", "min_fps": 1, "max_fps": 30,
                   "use_adaln_lora": True, "adaln_lora_dim": 16, "extra_per_block_abs_pos_emb": False,
                   "rope_h_extrapolation_ratio": 4.0, "rope_w_extrapolation_ratio": 4.0,
                   "rope_t_extrapolation_ratio": 1.0, "extra_h_extrapolation_ratio": 1.0,
                   "extra_w_extrapolation_ratio": 1.0, "extra_t_extrapolation_ratio": 1.0,
                   "rope_enable_fps_modulation": False}
    return _to_patcher(_supported_models().CosmosT2IPredict2(unet_config), seed)


def make_omnigen2(seed: int = 0):
    """An OmniGen 2 DiT (flow, shift 2.6): 3 layers (and one refiner layer per stream), hidden 64, 2 query heads
    sharing 1 key/value head (grouped-query attention as the release), patch 2. One stream: text, reference
    images, image."""
    spec = SPECS["omnigen2"]
    unet_config = {"image_model": "omnigen2", "axes_dim_rope": [8, 12, 12], "axes_lens": [64, 64, 64],
                   "ffn_dim_multiplier": None, "hidden_size": 64, "in_channels": spec.latent_channels,
                   "multiple_of": 16, "norm_eps": 1e-5, "num_attention_heads": 2, "num_kv_heads": 1, "num_layers": 3,
                   "num_refiner_layers": 1, "out_channels": None, "patch_size": 2, "text_feat_dim": spec.context_dim,
                   "timestep_scale": 1000.0}
    return _to_patcher(_supported_models().Omnigen2(unet_config), seed)


def make_cosmos(seed: int = 0):
    """A Cosmos Predict 1 text-to-video DiT (``GeneralDIT``, EDM, σ 0.002..80, σ_data 0.5): 3 blocks "FA-CA-MLP"
    on (T, H, W, B, D) tensors as the released 7B/14B (model_detection's settings), hidden 64, 2 heads,
    patch (1, 2, 2), adaLN-LoRA, learnable per-block position embeddings."""
    spec = VIDEO_SPECS["cosmos"]
    unet_config = {"image_model": "cosmos", "max_img_h": 240, "max_img_w": 240, "max_frames": 128,
                   "in_channels": spec.latent_channels, "out_channels": spec.latent_channels, "patch_spatial": 2,
                   "patch_temporal": 1, "model_channels": 64, "block_config": "FA-CA-MLP",
                   "concat_padding_mask": True, "pos_emb_cls": "rope3d", "pos_emb_learnable": False,
                   "pos_emb_interpolation": "crop", "block_x_format": "THWBD", "affline_emb_norm": True,
                   "use_adaln_lora": True, "adaln_lora_dim": 16, "num_blocks": 3, "num_heads": 2,
                   "crossattn_emb_channels": spec.context_dim, "extra_per_block_abs_pos_emb": True,
                   "rope_h_extrapolation_ratio": 1.0, "rope_w_extrapolation_ratio": 1.0,
                   "rope_t_extrapolation_ratio": 2.0, "extra_per_block_abs_pos_emb_type": "learnable"}
    return _to_patcher(_supported_models().CosmosT2V(unet_config), seed)


def make_stable_cascade_c(seed: int = 0):
    """A Stable Cascade stage C (flow, shift 2): 2 levels of hidden 32 (2 heads), c_cond 32, the CLIP text and
    pooled widths 32; down level 0 has one ResBlock-TimestepBlock-AttnBlock group, down level 1 two, and the up
    levels mirror them (so its layers are down.0.0, down.1.0, down.1.1, up.0.0, up.0.1, up.1.0); one block
    repeat each way, no resolution switch between levels, as the released stage C."""
    unet_config = {"stable_cascade_stage": "c", "c_in": 16, "c_out": 16, "c_hidden": [32, 32], "nhead": [2, 2],
                   "blocks": [[1, 2], [2, 1]], "block_repeat": [[1, 1], [1, 1]], "c_cond": 32, "c_r": 16,
                   "c_clip_text": 32, "c_clip_text_pooled": 32}
    patcher = _to_patcher(_supported_models().Stable_Cascade_C(unet_config), seed)
    # With random weights the 16 text keys of an AttnBlock hardly compete with its 96 image keys: the prompt
    # moves the result by 7% (cfg 5 vs 1) and the CFG rules by less than MIN_EFFECT. Scaling the text's key
    # and value mapping gives the prompt a trained model's weight (73%).
    with torch.no_grad():
        for level in [*patcher.model.diffusion_model.down_blocks, *patcher.model.diffusion_model.up_blocks]:
            for block in level:
                if hasattr(block, "kv_mapper"):
                    block.kv_mapper[1].weight.mul_(4.0)
    return patcher


def make_auraflow(seed: int = 0):
    """An AuraFlow MMDiT (``comfy.ldm.aura.mmdit.MMDiT``, a class named like SD3's; flow, shift 1.73): 2 double
    and 2 single layers, hidden 64, 2 heads, patch 2, 8 register tokens before the text. Its own family
    record (never taken for SD3)."""
    unet_config = {"in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 64, "n_layers": 4,
                   "n_double_layers": 2, "n_heads": 2, "global_conddim": 64, "cond_seq_dim": 32, "max_seq": 16 * 16}
    return _to_patcher(_supported_models().AuraFlow(unet_config), seed)


def make_flux2(seed: int = 0, klein: bool = False):
    """A Flux.2 DiT (``supported_models.Flux2``: flux-type flow, shift 2.02) with the config model_detection gives
    every Flux.2 checkpoint (global modulation: one set of modulations for all double and all single blocks;
    SiLU-gated MLPs; no biases; patch 1 on 128 channels; 4 rope axes, the text's on axis 3), narrow: 2 double + 2
    single blocks, hidden 64, 4 heads. ``klein=True``: Flux.2 Klein, which has no guidance embedding, with 3
    double + 2 single blocks (Klein 4B's stack, 5 + 20, is another shape than dev's 8 + 48; with 2 + 3 blocks
    the random model's prompt moved the result so little that RescaleCFG's effect fell under MIN_EFFECT)."""
    spec = SPECS["flux2_klein" if klein else "flux2"]
    unet_config = {
        "image_model": "flux2",
        "in_channels": spec.latent_channels,
        "out_channels": spec.latent_channels,
        "vec_in_dim": None,
        "context_in_dim": spec.context_dim,
        "hidden_size": 64,
        "mlp_ratio": 3.0,
        "num_heads": 4,
        "depth": 3 if klein else 2,
        "depth_single_blocks": 2,
        "axes_dim": [4, 4, 4, 4],  # sums to the head dim 64 / 4
        "theta": 2000,
        "patch_size": 1,
        "qkv_bias": False,
        "guidance_embed": not klein,
        "txt_ids_dims": [3],
        "global_modulation": True,
        "mlp_silu_act": True,
        "ops_bias": False,
        "default_ref_method": "index",
        "ref_index_scale": 10.0,
        "yak_mlp": False,
        "txt_norm": False,
    }
    return _to_patcher(_supported_models().Flux2(unet_config), seed)


def _host_params(params_class, config: dict) -> dict:
    """``config`` less the entries the host's params dataclass does not take (ComfyUI 0.33.0's Chroma Radiance
    adds ``use_sequential_txt_ids``, which 0.8.0's lacks)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(params_class)}
    return {key: value for key, value in config.items() if key in names or key == "image_model"}


def make_chroma(seed: int = 0):
    """A Chroma DiT (``supported_models.Chroma``: flux-type flow): Flux's blocks without modulation layers, fed
    by the distilled approximator (2 layers, hidden 32) from timestep and guidance; 2 double + 2 single blocks,
    hidden 64, 4 heads, patch 2 on 16 channels (in_channels is the patchified 64)."""
    import comfy.ldm.chroma.model

    unet_config = {
        "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": SPECS["chroma"].context_dim,
        "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 4, "depth": 2, "depth_single_blocks": 2,
        "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True,
        "in_dim": 64, "out_dim": 64, "hidden_dim": 32, "n_layers": 2, "txt_ids_dims": [], "vec_in_dim": None,
    }
    return _to_patcher(_supported_models().Chroma(_host_params(comfy.ldm.chroma.model.ChromaParams, unet_config)),
                       seed)


def make_chroma_radiance(seed: int = 0):
    """A Chroma Radiance DiT (pixel space, 3 channels): Chroma's transformer (2 double + 2 single blocks, hidden
    64) on 2x2-pixel patches (a real one uses 16x16), decoded per patch by 2 NeRF blocks (hidden 16)."""
    import comfy.ldm.chroma_radiance.model

    unet_config = {
        "image_model": "chroma_radiance", "in_channels": 3, "out_channels": 3,
        "context_in_dim": SPECS["chroma_radiance"].context_dim, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 4,
        "depth": 2, "depth_single_blocks": 2, "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2,
        "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 32, "n_layers": 2, "txt_ids_dims": [],
        "vec_in_dim": None, "nerf_hidden_size": 16, "nerf_mlp_ratio": 4, "nerf_depth": 2, "nerf_max_freqs": 8,
        "nerf_tile_size": 0, "nerf_final_head_type": "conv", "nerf_embedder_dtype": torch.float32, "use_x0": False,
        "use_sequential_txt_ids": False,
    }
    params = _host_params(comfy.ldm.chroma_radiance.model.ChromaRadianceParams, unet_config)
    return _to_patcher(_supported_models().ChromaRadiance(params), seed)


def make_longcat_image(seed: int = 0):
    """A LongCat-Image DiT (``supported_models.LongCatImage``, ComfyUI 0.33.0 and later; flux-type flow): Flux's
    model class without guidance embedding or pooled input, text positions on rope axes 1 and 2; 2 double + 2
    single blocks, hidden 64, 4 heads, patch 2. An AttributeError on a host without LongCat-Image."""
    spec = SPECS["longcat_image"]
    unet_config = {
        "image_model": "flux", "in_channels": spec.latent_channels, "out_channels": spec.latent_channels,
        "vec_in_dim": None, "context_in_dim": spec.context_dim, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 4,
        "depth": 2, "depth_single_blocks": 2, "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2,
        "qkv_bias": True, "guidance_embed": False, "txt_ids_dims": [1, 2], "yak_mlp": False, "txt_norm": False,
    }
    return _to_patcher(_supported_models().LongCatImage(unet_config), seed)


def make_mochi(seed: int = 0):
    """A Genmo Mochi DiT (``AsymmDiTJoint``; flow, shift 6): 3 asymmetric joint blocks, video stream hidden 64
    in 2 heads of 32, text stream hidden 32, patch 2 (3 frames of 4x4 tokens on the test latent), T5 width 32.
    ComfyUI's block asserts the video MLP's width is 1536·8 (the real model: hidden 3072, ratio 4): ratio
    192 keeps that width at hidden 64. The last block does not update the text, as in the real model."""
    spec = VIDEO_SPECS["mochi"]
    unet_config = {
        "image_model": "mochi_preview", "depth": 3, "patch_size": 2, "num_heads": 2, "hidden_size_x": 64,
        "hidden_size_y": 32, "mlp_ratio_x": 12288 / 64, "mlp_ratio_y": 4.0, "learn_sigma": False,
        "in_channels": spec.latent_channels, "qk_norm": True, "qkv_bias": False, "out_bias": True,
        "attn_drop": 0.0, "patch_embed_bias": True, "posenc_preserve_area": True, "timestep_mlp_bias": True,
        "attend_to_padding": False, "timestep_scale": 1000.0, "use_t5": True, "t5_feat_dim": spec.context_dim,
        "t5_token_length": spec.context_tokens, "rope_theta": 10000.0,
    }
    return _to_patcher(_supported_models().GenmoMochi(unet_config), seed)


def make_model(family: str, seed: int = 0):
    """A model by family name: "sd15", "sd15_medium", "sdxl", "sdxl_medium", "sd3", "sd3_medium", "flux", "wan", "ltxv",
    "hunyuan_video", "auraflow", "mochi"."""
    builders = {
        "sd15": lambda: make_sd15(seed=seed),
        "sd15_medium": lambda: make_sd15(medium=True, seed=seed),
        "sdxl": lambda: make_sdxl(seed=seed),
        "sdxl_medium": lambda: make_sdxl(seed=seed, medium=True),
        "sd3": lambda: make_sd3(seed=seed),
        "sd3_medium": lambda: make_sd3(medium=True, seed=seed),
        "flux": lambda: make_flux(seed=seed),
        "wan": lambda: make_wan(seed=seed),
        "ltxv": lambda: make_ltxv(seed=seed),
        "hunyuan_video": lambda: make_hunyuan_video(seed=seed),
        "auraflow": lambda: make_auraflow(seed=seed),
        **{family: (lambda build=build: build(seed=seed)) for family, build in JOINT_BUILDERS.items()},
        "pixart": lambda: make_pixart(seed=seed),
        "hidream": lambda: make_hidream(seed=seed),
        "cosmos_predict2": lambda: make_cosmos_predict2(seed=seed),
        "cosmos": lambda: make_cosmos(seed=seed),
        "omnigen2": lambda: make_omnigen2(seed=seed),
        "stable_cascade_c": lambda: make_stable_cascade_c(seed=seed),
        "flux2": lambda: make_flux2(seed=seed),
        "flux2_klein": lambda: make_flux2(seed=seed, klein=True),
        "chroma": lambda: make_chroma(seed=seed),
        "chroma_radiance": lambda: make_chroma_radiance(seed=seed),
        "longcat_image": lambda: make_longcat_image(seed=seed),
        "mochi": lambda: make_mochi(seed=seed),
        **{variant: (lambda variant=variant: make_wan_variant(variant, seed=seed))
           for variant in WAN_VARIANTS + WAN_VARIANTS_0_33},
        # Wan 2.2 A14B's two experts: WanModels of the 2.1 layout (model_detection gives them WAN21_T2V).
        "wan22_high_noise": lambda: make_wan(seed=seed + 21),
        "wan22_low_noise": lambda: make_wan(seed=seed + 11),
        "ltxav": lambda: make_ltxav(seed=seed),
        "ltxav_2_3": lambda: make_ltxav(seed=seed, ltx_2_3=True),
        **{family: (lambda build=build: build(seed=seed)) for family, build in NEW_IN_033_BUILDERS.items()},
    }
    return builders[family]()


def make_controlnet(model, seed: int = 5):
    """A ControlNet (ComfyUI's cldm architecture) for a tiny UNet ``model``, random weights, 3-channel hint
    image: its residuals change the UNet's result a lot, which is all the tests need."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management
    import comfy.ops

    config = dict(model.model.model_config.unet_config)
    config.pop("out_channels")
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32,
                  device=torch.device("cpu"))
    control_model = comfy.cldm.cldm.ControlNet(**config)
    fill_deterministic(control_model, seed)
    return comfy.controlnet.ControlNet(control_model, load_device=comfy.model_management.get_torch_device(),
                                       manual_cast_dtype=None)


def family_spec(family: str) -> FamilySpec:
    """The spec of an image (SPECS) or video (VIDEO_SPECS) family."""
    return SPECS[family] if family in SPECS else VIDEO_SPECS[family]


def _one_conditioning(spec: FamilySpec, batch: int, generator: torch.Generator) -> list:
    context = torch.randn(batch, spec.context_tokens, spec.context_dim, generator=generator)
    extras: dict = {}
    if spec.pooled_dim is not None:
        extras["pooled_output"] = torch.randn(batch, spec.pooled_dim, generator=generator)
    if spec.flux_guidance is not None:
        extras["guidance"] = spec.flux_guidance
    if spec.padded_text_tokens is not None:  # 1 for the prompt's tokens, 0 for the padding after them
        mask = torch.ones(batch, spec.context_tokens, dtype=torch.long)
        mask[:, spec.context_tokens - spec.padded_text_tokens:] = 0
        extras["attention_mask"] = mask
    if spec.llama_layers is not None:  # (B, layers, tokens, channels), as HiDream's Llama encoder stacks them
        extras["conditioning_llama3"] = torch.randn(batch, spec.llama_layers, spec.context_tokens, spec.context_dim,
                                                    generator=generator)
    return [[context, extras]]


def make_conditioning(family: str, batch: int = 1, seed: int = 0) -> tuple[list, list]:
    """(positive, negative) in ComfyUI's CONDITIONING format for ``family``: ``[[context, extras]]``.

    SD1.5: context (B, 77, context_dim) and no extras. SDXL: the same and ``pooled_output`` (B, 1280). SD3:
    context (B, 16, 32) and ``pooled_output`` (B, 16). Flux: the same plus ``guidance`` 3.5 on both, so
    cfg > 1 also runs. Wan: context (B, 16, 32) only (its umT5 embedding). LTXV: context and its T5's
    ``attention_mask`` (the last 4 tokens padding). HunyuanVideo: context, ``pooled_output`` and
    ``guidance`` 6.0. The two differ (own draws).
    """
    if family in CONDITIONING_BUILDERS:
        return CONDITIONING_BUILDERS[family](batch, seed)
    spec = family_spec(family)
    generator = torch.Generator().manual_seed(seed)
    positive = _one_conditioning(spec, batch, generator)
    negative = _one_conditioning(spec, batch, generator)
    return positive, negative


# Families whose conditioning is not a text embedding (HiDream O1: token ids), by family: (batch, seed) -> (pos, neg).
CONDITIONING_BUILDERS: dict = {}
# Families whose latent side differs from TINY_LATENT_SIZE (HiDream O1: pixels, in 32x32 patches).
LATENT_SIDES: dict = {}


def make_latent(
    family: str, batch: int = 1, h: int = TINY_LATENT_SIZE, w: int = TINY_LATENT_SIZE, seed: int = 0
) -> torch.Tensor:
    """A seeded (B, C, h, w) latent with the family's channel count (SD1.5 4; SD3 and Flux 16); for a video
    family (Wan: 16 channels) a (B, C, T, h, w) latent with its ``latent_frames``."""
    spec = family_spec(family)
    generator = torch.Generator().manual_seed(seed)
    frames = () if spec.latent_frames is None else (spec.latent_frames,)
    if family in LATENT_SIDES and (h, w) == (TINY_LATENT_SIZE, TINY_LATENT_SIZE):
        h = w = LATENT_SIDES[family]
    return torch.randn(batch, spec.latent_channels, *frames, h, w, generator=generator)


# ---------------------------------------------------------------------------------------------------------
# The joint group: Qwen-Image, Lumina 2 / Z-Image (NextDiT), Kandinsky 5 (tests/host/test_family_joint.py)

# Qwen-Image's latent (Wan 2.1's format) is 5-D with one frame, as ComfyUI gives its empty image latents for
# that format; Kandinsky 5 video takes 3 frames, Kandinsky 5 image a 4-D latent. Lumina 2 / Z-Image: 4-D.
JOINT_IMAGE_FAMILIES = ("lumina2", "z_image", "kandinsky5_image")
JOINT_VIDEO_FAMILIES = ("qwen_image", "kandinsky5")
JOINT_FAMILIES = ("qwen_image", "lumina2", "z_image", "kandinsky5", "kandinsky5_image")

SPECS.update({
    "lumina2": FamilySpec(latent_channels=16, context_dim=32, context_tokens=16, pooled_dim=None, flux_guidance=None),
    "z_image": FamilySpec(latent_channels=16, context_dim=32, context_tokens=16, pooled_dim=None, flux_guidance=None),
    "kandinsky5_image": FamilySpec(latent_channels=16, context_dim=32, context_tokens=16, pooled_dim=16,
                                   flux_guidance=None),
})
VIDEO_SPECS.update({
    "qwen_image": FamilySpec(latent_channels=16, context_dim=32, context_tokens=16, pooled_dim=None,
                             flux_guidance=None, latent_frames=1),
    "kandinsky5": FamilySpec(latent_channels=16, context_dim=32, context_tokens=16, pooled_dim=16,
                             flux_guidance=None, latent_frames=3),
})


def make_qwen_image(seed: int = 0, default_ref_method: str = "index"):
    """A Qwen-Image MMDiT (flux-type flow, shift 1.15): 3 joint blocks, 2 heads of 32, patch 2.

    Each block runs one joint attention on [text tokens, image tokens, reference-image tokens] (the text
    first; Qwen-Image Edit appends its reference latents' tokens after the image's), then separate image and
    text MLPs. ``default_ref_method="index_timestep_zero"`` is Qwen-Image Edit 2511's (model_detection: the
    ``__index_timestep_zero__`` buffer): its reference tokens get their own timestep-0 modulation."""
    spec = VIDEO_SPECS["qwen_image"]
    unet_config = {
        "image_model": "qwen_image",
        "patch_size": 2,
        "in_channels": spec.latent_channels * 4,
        "out_channels": spec.latent_channels,
        "num_layers": 3,
        "attention_head_dim": 32,
        "num_attention_heads": 2,
        "joint_attention_dim": spec.context_dim,
        "axes_dims_rope": (8, 12, 12),  # sums to the head dim
        "default_ref_method": default_ref_method,
    }
    return _to_patcher(_supported_models().QwenImage(unet_config), seed)


def make_lumina2(seed: int = 0):
    """A Lumina Image 2.0 NextDiT (flow, shift 6): 1 context-refiner and 1 noise-refiner block, then 3 main
    blocks on the joint [caption tokens, image tokens] sequence; 4 query heads sharing 2 key/value heads
    (grouped-query attention, as Lumina 2's 24/8), head dim 16, patch 2."""
    spec = SPECS["lumina2"]
    unet_config = {
        "image_model": "lumina2", "patch_size": 2, "in_channels": spec.latent_channels, "dim": 64, "n_layers": 3,
        "n_refiner_layers": 1, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 16, "ffn_dim_multiplier": 4.0,
        "qk_norm": True, "cap_feat_dim": spec.context_dim, "axes_dims": [4, 6, 6], "axes_lens": [300, 512, 512],
        "rope_theta": 10000.0,
    }
    return _to_patcher(_supported_models().Lumina2(unet_config), seed)


def make_z_image(seed: int = 0):
    """A Z-Image NextDiT (flow, shift 3; ``supported_models.ZImage``, the class Lumina 2 uses): Z-Image's
    modulation, time scale and token padding (caption and image tokens each padded to a multiple of 32, as
    model_detection sets when the checkpoint has pad tokens). 1+1 refiner blocks, 3 main blocks, dim 256 (the
    smallest its modulation allows: the timestep embedding is 256 wide), 4 heads of 64."""
    spec = SPECS["z_image"]
    unet_config = {
        "image_model": "lumina2", "patch_size": 2, "in_channels": spec.latent_channels, "dim": 256, "n_layers": 3,
        "n_refiner_layers": 1, "n_heads": 4, "n_kv_heads": 4, "multiple_of": 16, "ffn_dim_multiplier": 8.0 / 3.0,
        "qk_norm": True, "cap_feat_dim": spec.context_dim, "axes_dims": [16, 24, 24], "axes_lens": [1536, 512, 512],
        "rope_theta": 256.0, "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32,
    }
    return _to_patcher(_supported_models().ZImage(unet_config), seed)


def _kandinsky5_config(spec: FamilySpec, visual_embed_dim: int) -> dict:
    return {
        "image_model": "kandinsky5", "in_visual_dim": spec.latent_channels, "out_visual_dim": spec.latent_channels,
        "in_text_dim": spec.context_dim, "in_text_dim2": spec.pooled_dim, "time_dim": 32, "model_dim": 64,
        "ff_dim": 128, "visual_embed_dim": visual_embed_dim, "patch_size": (1, 2, 2), "num_text_blocks": 1,
        "num_visual_blocks": 3, "axes_dims": (8, 12, 12),  # sums to the head dim 32: 2 heads
    }


def _sharpen_kandinsky5_self_attention(patcher, factor: float = 3.0):
    """Random weights give Kandinsky 5's RMS-normed queries and keys logits of about ±1: a nearly uniform
    attention map that blurring the queries (SEG) hardly changes. Scaling the norms' gains makes the map as
    peaked as a trained model's, so the attention methods have something to change."""
    with torch.no_grad():
        for block in patcher.model.diffusion_model.visual_transformer_blocks:
            block.self_attention.query_norm.weight.mul_(factor)
            block.self_attention.key_norm.weight.mul_(factor)
    return patcher


def make_kandinsky5(seed: int = 0):
    """A Kandinsky 5 video DiT (flow, shift 10): 1 text block, then 3 visual blocks (self-attention on the
    video tokens, cross-attention to the text, feed-forward), model dim 64, 2 heads, patches (1, 2, 2). Its
    input is the latent plus the image-to-video concat (a zero image and the mask channel): 33 channels."""
    spec = VIDEO_SPECS["kandinsky5"]
    config = _kandinsky5_config(spec, visual_embed_dim=(2 * spec.latent_channels + 1) * 4)
    return _sharpen_kandinsky5_self_attention(_to_patcher(_supported_models().Kandinsky5(config), seed))


def make_kandinsky5_image(seed: int = 0):
    """A Kandinsky 5 image DiT (flow, shift 3; ``supported_models.Kandinsky5Image``): the video model's class
    on a 4-D latent (one frame, no concat), rope scale 1 as model_detection sets for it."""
    spec = SPECS["kandinsky5_image"]
    config = _kandinsky5_config(spec, visual_embed_dim=spec.latent_channels * 4)
    config["rope_scale_factor"] = (1.0, 1.0, 1.0)
    return _sharpen_kandinsky5_self_attention(_to_patcher(_supported_models().Kandinsky5Image(config), seed))


JOINT_BUILDERS = {
    "qwen_image": make_qwen_image,
    "lumina2": make_lumina2,
    "z_image": make_z_image,
    "kandinsky5": make_kandinsky5,
    "kandinsky5_image": make_kandinsky5_image,
}


# ---------------------------------------------------------------------------------------------------------
# Wan 2.1 image-to-video (GuidersNAG's I2V cross-attention, tests/host/test_nag.py)

WAN_I2V_CLIP_TOKENS = 257  # CLIP-H penultimate tokens, as Wan's img_emb (MLPProj(1280, dim)) takes them


def make_wan_i2v(seed: int = 0):
    """make_wan's tiny Wan 2.1 as image-to-video: ``WanI2VCrossAttention`` in every block (the CLIP image tokens,
    then the text), ``img_emb`` for the CLIP features, 36 input channels (16 latent + 4 mask + 16 image; the
    host's concat_cond fills zeros without a start image)."""
    spec = VIDEO_SPECS["wan"]
    unet_config = {
        "image_model": "wan2.1", "model_type": "i2v", "patch_size": (1, 2, 2), "text_len": spec.context_tokens,
        "in_dim": 36, "out_dim": spec.latent_channels, "dim": 64, "ffn_dim": 128, "freq_dim": 256,
        "text_dim": spec.context_dim, "num_heads": 2, "num_layers": 3, "window_size": (-1, -1), "qk_norm": True,
        "cross_attn_norm": True, "eps": 1e-6,
    }
    return _to_patcher(_supported_models().WAN21_I2V(unet_config), seed)


def wan_i2v_conditioning(seed: int = 0) -> list:
    """A Wan I2V prompt: make_conditioning("wan")'s text with a seeded ``clip_vision_output`` (an object with
    ``penultimate_hidden_states`` (1, 257, 1280), the one attribute WAN21.extra_conds reads)."""
    from types import SimpleNamespace

    positive = make_conditioning("wan", seed=seed)[0]
    generator = torch.Generator().manual_seed(seed + 100)
    clip = SimpleNamespace(penultimate_hidden_states=torch.randn(1, WAN_I2V_CLIP_TOKENS, 1280, generator=generator))
    return [[positive[0][0], {**positive[0][1], "clip_vision_output": clip}]]

# The Wan variants ComfyUI builds from WanModel (tests/host/test_family_wan_variants.py). Each is its
# supported_models config class with the tiny Wan 2.1's width (hidden 64, 2 heads, patch (1, 2, 2)), and its
# conditioning carries what that config's model_base.extra_conds needs (make_wan_variant_conditioning).

WAN_VARIANTS = ("wan_i2v", "wan_fun_control", "wan_camera", "wan_vace", "wan_humo", "wan_s2v", "wan_animate",
                "wan22_5b", "wan22_ti2v")
# The variants of ComfyUI 0.33.0 only: WanDancer (WAN22_WanDancer, music-driven I2V), FlowRVS (WAN21_FlowRVS).
WAN_VARIANTS_0_33 = ("wan_dancer", "wan_flow_rvs")
VIDEO_SPECS.update({variant: VIDEO_SPECS["wan"]
                    for variant in WAN_VARIANTS + WAN_VARIANTS_0_33 + ("wan22_high_noise", "wan22_low_noise")})
VIDEO_SPECS["wan22_5b"] = VIDEO_SPECS["wan22_ti2v"] = FamilySpec(
    latent_channels=48, context_dim=32, context_tokens=16, pooled_dim=None, flux_guidance=None, latent_frames=3)
# CLIP vision tokens of the tiny I2V conditioning (the real ViT-H gives 257 of width 1280; the width is fixed
# by WanModel's img_emb, the count is not).
WAN_CLIP_VISION_TOKENS = 4


def _wan_config(**overrides) -> dict:
    spec = VIDEO_SPECS["wan"]
    config = {
        "image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": spec.context_tokens,
        "in_dim": spec.latent_channels, "out_dim": spec.latent_channels, "dim": 64, "ffn_dim": 128, "freq_dim": 256,
        "text_dim": spec.context_dim, "num_heads": 2, "num_layers": 3, "window_size": (-1, -1), "qk_norm": True,
        "cross_attn_norm": True, "eps": 1e-6,
    }
    config.update(overrides)
    return config


def make_wan_variant(variant: str, seed: int = 0):
    """A tiny model of a Wan variant, from the config class ComfyUI detects for it (comfy/model_detection.py):

    - wan_i2v: WAN21_I2V (model_type i2v: img_emb for the CLIP vision features, 36 input channels: the noise, a
      4-channel mask and the start image's latent).
    - wan_fun_control: WAN21_FunControl2V (48 channels: noise + the control video and start image latents) with
      ``in_dim_ref_conv`` (Fun 1.1): the reference image's tokens come BEFORE the video's in every block.
    - wan_camera: WAN21_Camera (CameraWanModel; its control adapter adds the camera embedding to the patches).
    - wan_vace: WAN21_Vace (VaceWanModel, 4 main blocks and 2 vace blocks whose hints are added after main
      blocks 0 and 2).
    - wan_humo: WAN21_HuMo (HumoWanModel, the 1.7B layout: 16 channels, reference tokens after the video, an
      audio cross-attention in every block fed from the block's closure).
    - wan_s2v: WAN22_S2V (WanModel_S2V: reference tokens after the video, audio injected after blocks 0 and 2).
    - wan_animate: WAN22_Animate (AnimateWanModel, 5 main blocks: a face block after block 0; pose latents
      added to the patches).
    - wan22_5b / wan22_ti2v: WAN22_T2V (the 5B's 48-channel latent; TI2V runs it with a noise mask, per-frame
      timesteps).
    """
    supported = _supported_models()
    builders = {
        "wan_i2v": lambda: supported.WAN21_I2V(_wan_config(model_type="i2v", in_dim=36)),
        "wan_fun_control": lambda: supported.WAN21_FunControl2V(
            _wan_config(model_type="i2v", in_dim=48, in_dim_ref_conv=16)),
        "wan_camera": lambda: supported.WAN21_Camera(_wan_config(model_type="camera", in_dim=32)),
        "wan_vace": lambda: supported.WAN21_Vace(
            _wan_config(model_type="vace", num_layers=4, vace_layers=2, vace_in_dim=96)),
        "wan_humo": lambda: supported.WAN21_HuMo(_wan_config(model_type="humo")),
        "wan_s2v": lambda: supported.WAN22_S2V(
            _wan_config(model_type="s2v", audio_dim=32, num_audio_token=4, audio_inject_layers=[0, 2])),
        "wan_animate": lambda: supported.WAN22_Animate(_wan_config(model_type="animate", in_dim=36, num_layers=5)),
        "wan22_5b": lambda: supported.WAN22_T2V(_wan_config(in_dim=48, out_dim=48)),
        "wan22_ti2v": lambda: supported.WAN22_T2V(_wan_config(in_dim=48, out_dim=48)),
        # ComfyUI 0.33.0 and later (an AttributeError on 0.8.0).
        "wan_dancer": lambda: supported.WAN22_WanDancer(
            _wan_config(model_type="wandancer", in_dim=36, audio_inject_layers=[0, 2])),
        # FlowRVS: WanModel's T2V forward under the image-to-image flow (ModelType.IMG_TO_IMG_FLOW).
        "wan_flow_rvs": lambda: supported.WAN21_FlowRVS(_wan_config(model_type="flow_rvs")),
    }
    patcher = _to_patcher(builders[variant](), seed)
    if variant == "wan_animate":
        # Its random weights give a nearly uniform attention map in the middle block ("auto"), which SEG's blur
        # hardly changes (max|Δ| 0.99 % of the result): sharpened as Kandinsky 5's, a trained model's map is peaked.
        with torch.no_grad():
            for block in patcher.model.diffusion_model.blocks:
                block.self_attn.norm_q.weight.mul_(2.0)
                block.self_attn.norm_k.weight.mul_(2.0)
    return patcher


def make_wan_variant_conditioning(variant: str, seed: int = 0) -> tuple[list, list]:
    """(positive, negative) for a Wan variant: the text embedding plus what ComfyUI's node for it sets on both
    (WanImageToVideo: concat_latent_image, concat_mask, clip_vision_output; WanFunControlToVideo: the 32-channel
    concat latent, and reference_latents for Fun 1.1; WanCameraImageToVideo: camera_conditions; WanVaceToVideo:
    vace_frames, vace_mask, vace_strength; WanHuMoImageToVideo: audio_embed and reference_latents;
    WanSoundImageToVideo: audio_embed and reference_latents; WanAnimateToVideo: pose_video_latent,
    clip_vision_output and the concat latent). Random tensors of the shapes those nodes give."""
    import comfy.clip_vision

    base = variant if variant in VIDEO_SPECS else "wan"
    positive, negative = make_conditioning(base, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    frames, side = VIDEO_SPECS["wan"].latent_frames, TINY_LATENT_SIZE

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    extras: dict = {}
    if variant in ("wan_i2v", "wan_animate", "wan_dancer"):
        mask = torch.ones(1, 1, frames, side, side)
        mask[:, :, 0] = 0.0  # the start frame is given, the rest generated
        extras.update(concat_latent_image=randn(1, 16, frames, side, side), concat_mask=mask)
    if variant in ("wan_i2v", "wan_animate", "wan_camera", "wan_dancer"):
        clip = comfy.clip_vision.Output()
        clip.penultimate_hidden_states = randn(1, WAN_CLIP_VISION_TOKENS, 1280)
        extras["clip_vision_output"] = clip
    if variant == "wan_fun_control":
        extras.update(concat_latent_image=randn(1, 32, frames, side, side),
                      reference_latents=[randn(1, 16, 1, side, side)])
    if variant == "wan_camera":
        # WanCamAdapter pixel-unshuffles by 8, then patches by 2: the conditions are 8x the latent's side.
        extras.update(concat_latent_image=randn(1, 16, frames, side, side),
                      camera_conditions=randn(1, 24, frames, side * 8, side * 8))
    if variant == "wan_vace":
        extras.update(vace_frames=[randn(1, 32, frames, side, side)], vace_mask=[torch.rand(1, 64, frames, side, side,
                                                                                             generator=generator)],
                      vace_strength=[1.0])
    if variant == "wan_humo":  # audio: (B, frames, window 8, 5 whisper layers, 1280)
        extras.update(audio_embed=randn(1, frames, 8, 5, 1280), reference_latents=[randn(1, 16, 1, side, side)])
    if variant == "wan_s2v":  # audio: (B, 25 wav2vec layers, audio_dim, 4 per latent frame)
        extras.update(audio_embed=randn(1, 25, 32, frames * 4), reference_latents=[randn(1, 16, 1, side, side)],
                      reference_motion=randn(1, 16, 19, side, side))  # the motion frames FramePackMotioner packs
    if variant == "wan_dancer":  # WanDancerToVideo: the music features, 35 per video frame (9 frames)
        extras["audio_embed"] = randn(1, 9, 35)
    if variant == "wan_animate":
        extras["pose_video_latent"] = randn(1, 16, frames, side, side)
    for conditioning in (positive, negative):
        conditioning[0][1].update(extras)
    return positive, negative


def make_wan_variant_latent(variant: str, seed: int = 0) -> dict:
    """The latent dict KSampler gets: Wan 2.2 TI2V's carries the noise mask Wan22ImageToVideoLatent sets (0 on
    the start frame, which is given, 1 on the frames to generate)."""
    base = variant if variant in VIDEO_SPECS else "wan"
    latent = {"samples": make_latent(base, seed=seed)}
    if variant == "wan22_ti2v":
        mask = torch.ones(1, 1, VIDEO_SPECS[base].latent_frames, TINY_LATENT_SIZE, TINY_LATENT_SIZE)
        mask[:, :, 0] = 0.0
        latent["noise_mask"] = mask
    return latent


# ---------------------------------------------------------------------------------------------------------
# HunyuanDiT and Stable Cascade stage C (tests/host/test_family_hydit_cascade.py)

# HunyuanDiT: SDXL's 4-channel latent; its two text encoders' outputs as the model takes them (model_base.
# HunyuanDiT.extra_conds): the CLIP (Bert) embedding as the context with its ``attention_mask``, the mT5 one as
# ``conditioning_mt5xl`` with ``attention_mask_mt5xl``. The masks' last 2 tokens are padding (replaced by the
# model's learned ``text_embedding_padding``).
SPECS["hunyuan_dit"] = FamilySpec(latent_channels=4, context_dim=32, context_tokens=8, pooled_dim=None,
                                  flux_guidance=None)
HYDIT_PADDING_TOKENS = 2


def make_hunyuan_dit(seed: int = 0):
    """A HunyuanDiT (``supported_models.HunyuanDiT``: V-prediction, linear betas 0.00085..0.018): 6 blocks,
    hidden 64, 2 heads of 32, patch 2, q/k norms, both text widths 32 (8 tokens each), no size or style
    conditions (HunyuanDiT 1.0's are ``HunyuanDiT1``). Blocks 4 and 5 mix in the long skips of blocks 1 and 0
    (``skip=layer > depth // 2``); the depth is even, as the forward's skip list needs."""
    spec = SPECS["hunyuan_dit"]
    unet_config = {"image_model": "hydit", "input_size": 16, "patch_size": 2, "in_channels": spec.latent_channels,
                   "hidden_size": 64, "depth": 6, "num_heads": 2, "mlp_ratio": 4.0,
                   "text_states_dim": spec.context_dim, "text_states_dim_t5": spec.context_dim,
                   "text_len": spec.context_tokens, "text_len_t5": spec.context_tokens, "qk_norm": True,
                   "size_cond": False, "use_style_cond": False, "learn_sigma": True}
    return _to_patcher(_supported_models().HunyuanDiT(unet_config), seed)


def make_hunyuan_dit_conditioning(batch: int = 1, seed: int = 0) -> tuple[list, list]:
    """(positive, negative) for HunyuanDiT: ``[[clip_context, {attention_mask, conditioning_mt5xl,
    attention_mask_mt5xl}]]``, the two prompts' own draws."""
    spec = SPECS["hunyuan_dit"]
    generator = torch.Generator().manual_seed(seed)

    def one():
        mask = torch.ones(batch, spec.context_tokens, dtype=torch.long)
        mask[:, spec.context_tokens - HYDIT_PADDING_TOKENS:] = 0
        context = torch.randn(batch, spec.context_tokens, spec.context_dim, generator=generator)
        t5 = torch.randn(batch, spec.context_tokens, spec.context_dim, generator=generator)
        return [[context, {"attention_mask": mask, "conditioning_mt5xl": t5, "attention_mask_mt5xl": mask.clone()}]]

    return one(), one()


JOINT_BUILDERS["hunyuan_dit"] = make_hunyuan_dit  # make_model's table of the later families

# Stable Cascade stage C: its prior latent's 16 channels; the CLIP-G text embedding as the context and its pooled
# embedding (``pooled_output``, required by model_base.StableCascade_C); no image prompt (zeros, the host's default).
SPECS["stable_cascade_c"] = FamilySpec(latent_channels=16, context_dim=32, context_tokens=8, pooled_dim=32,
                                       flux_guidance=None)


# ---------------------------------------------------------------------------------------------------------
# LTX-2, the audio-video model (tests/host/test_family_ltx2.py)

# The text embedding LTX-2 takes (``c_crossattn``): the video's and the audio's halves side by side, each
# ``caption_channels`` wide (av_model.LTXAVModel._prepare_context splits it; ComfyUI 0.33.0's
# preprocess_text_embeds passes a context of caption_channels·2 through as already processed). The latent is a
# NestedTensor (video, audio) as LTXVConcatAVLatent makes it: video (B, 128, 3, 8, 8), audio (B, 8, 5, 16)
# (8 channels × 16 frequency bins, ``audio_in_channels`` 128 once patchified).
VIDEO_SPECS["ltxav"] = FamilySpec(latent_channels=128, context_dim=64, context_tokens=16, pooled_dim=None,
                                  flux_guidance=None, latent_frames=3)
VIDEO_SPECS["ltxav_2_3"] = VIDEO_SPECS["ltxav"]
LTXAV_AUDIO_SHAPE = (8, 5, 16)  # (channels, latent audio frames, frequency bins) of one audio latent


def make_ltxav(seed: int = 0, num_layers: int = 3, ltx_2_3: bool = False):
    """An LTX-2 audio-video DiT (``supported_models.LTXAV``, flow, shift 2.37): ``num_layers`` blocks, each
    with video self-attention (2 heads of 32), video cross-attention to the text, audio self- and
    cross-attention (2 heads of 16), audio-to-video and video-to-audio cross-attention, and both feed-forwards;
    patch 1. ``num_layers=48`` is LTX-2's depth. ``ltx_2_3``: the LTX-2.3 checkpoint config ComfyUI 0.33.0 reads
    from its metadata (cross-attention AdaLN, per-head gated attention); ComfyUI 0.8.0 has neither. 0.33.0's
    text connectors (1-D transformers run on the unprocessed Gemma embedding) are shrunk too; the test
    conditioning is already processed, so they do not run."""
    spec = VIDEO_SPECS["ltxav"]
    unet_config = {
        "image_model": "ltxav", "in_channels": spec.latent_channels, "audio_in_channels": 128,
        "num_attention_heads": 2, "attention_head_dim": 32, "cross_attention_dim": 64,
        "audio_num_attention_heads": 2, "audio_attention_head_dim": 16, "audio_cross_attention_dim": 32,
        "caption_channels": spec.context_dim // 2, "num_layers": num_layers,
        "connector_attention_head_dim": 16, "connector_num_attention_heads": 2, "connector_num_layers": 1,
    }
    if ltx_2_3:
        unet_config.update(cross_attention_adaln=True, apply_gated_attention=True)
    return _to_patcher(_supported_models().LTXAV(unet_config), seed)


def make_ltxav_latent(batch: int = 1, seed: int = 0):
    """The seeded (video, audio) NestedTensor latent of the tiny LTX-2 (ComfyUI's LTXVConcatAVLatent output)."""
    import comfy.nested_tensor

    spec = VIDEO_SPECS["ltxav"]
    generator = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, spec.latent_channels, spec.latent_frames, TINY_LATENT_SIZE, TINY_LATENT_SIZE,
                        generator=generator)
    audio = torch.randn(batch, *LTXAV_AUDIO_SHAPE, generator=generator)
    return comfy.nested_tensor.NestedTensor((video, audio))


# ---------------------------------------------------------------------------------------------------------
# Families ComfyUI added after 0.8.0 (tests/host/test_family_new33.py; each builder needs a host that has the
# family's comfy.supported_models class, ComfyUI 0.33.0 here). Anima: Cosmos Predict 2's MiniTrainDIT on the
# Wan 2.1 latent (5-D, one frame). Krea 2: Wan 2.1's 16 channels, 5-D with one frame as ComfyUI gives that
# format's image latents, the text as 2 stacked encoder layers of 16 (32 features). Ernie Image, Lens, Ideogram 4:
# Flux.2's 128-channel latent (one token per latent pixel). Lens' text: 4 encoder layers of 8 (32 features).
# CogVideoX: 16 channels, 3 frames.
NEW_IN_033_FAMILIES = ("anima", "krea2", "ernie", "lens", "ideogram4", "cogvideox", "mage_flow", "joyimage")
# Their comfy.supported_models classes:
NEW_IN_033_CLASSES = {"anima": "Anima", "krea2": "Krea2", "ernie": "ErnieImage", "lens": "Lens",
                      "ideogram4": "Ideogram4", "cogvideox": "CogVideoX_T2V", "mage_flow": "MageFlow",
                      "joyimage": "JoyImage"}
SPECS.update({
    "ernie": FamilySpec(latent_channels=128, context_dim=32, context_tokens=16, pooled_dim=None, flux_guidance=None),
    "lens": FamilySpec(latent_channels=128, context_dim=32, context_tokens=16, pooled_dim=None, flux_guidance=None),
    "ideogram4": FamilySpec(latent_channels=128, context_dim=32, context_tokens=16, pooled_dim=None,
                            flux_guidance=None),
    "mage_flow": FamilySpec(latent_channels=128, context_dim=32, context_tokens=16, pooled_dim=None,
                            flux_guidance=None),
})
VIDEO_SPECS.update({
    "krea2": FamilySpec(latent_channels=16, context_dim=32, context_tokens=16, pooled_dim=None, flux_guidance=None,
                        latent_frames=1),
    "anima": FamilySpec(latent_channels=16, context_dim=32, context_tokens=16, pooled_dim=None, flux_guidance=None,
                        latent_frames=1),
    "cogvideox": FamilySpec(latent_channels=16, context_dim=32, context_tokens=16, pooled_dim=None,
                            flux_guidance=None, latent_frames=3),
    "joyimage": FamilySpec(latent_channels=16, context_dim=32, context_tokens=16, pooled_dim=None,
                           flux_guidance=None, latent_frames=1),
})


def _patcher_after(model_config, seed: int, adjust) -> object:
    """As ``_to_patcher``, with ``adjust(diffusion_model)`` run before the weights are drawn."""
    import comfy.model_management
    import comfy.model_patcher

    model_config.set_inference_dtype(INFERENCE_DTYPE, None)
    model = model_config.get_model({})
    adjust(model.diffusion_model)
    fill_deterministic(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def make_anima(seed: int = 0):
    """An Anima DiT (``supported_models.Anima``: flow, shift 3; ``comfy.ldm.anima.model.Anima``, a MiniTrainDIT):
    Cosmos Predict 2's tiny config (3 blocks, hidden 64, 2 heads, patch (1, 2, 2)). Its LLM adapter (only run
    when the conditioning carries ``t5xxl_ids``, which these tests do not give) is built at the host's fixed
    1024-wide size; it is replaced by the host's own LLMAdapter at width 32 so the model stays tiny."""
    import comfy.ldm.anima.model as anima
    import comfy.ops

    spec = VIDEO_SPECS["anima"]
    unet_config = {"image_model": "anima", "max_img_h": 240, "max_img_w": 240, "max_frames": 128,
                   "in_channels": spec.latent_channels, "out_channels": spec.latent_channels, "patch_spatial": 2,
                   "patch_temporal": 1, "concat_padding_mask": True, "model_channels": 64, "num_blocks": 3,
                   "num_heads": 2, "crossattn_emb_channels": spec.context_dim, "pos_emb_cls": "rope3d",
                   "pos_emb_learnable": True, "pos_emb_interpolation": "crop", "min_fps": 1, "max_fps": 30,
                   "use_adaln_lora": True, "adaln_lora_dim": 16, "extra_per_block_abs_pos_emb": False,
                   "rope_h_extrapolation_ratio": 4.0, "rope_w_extrapolation_ratio": 4.0,
                   "rope_t_extrapolation_ratio": 1.0, "extra_h_extrapolation_ratio": 1.0,
                   "extra_w_extrapolation_ratio": 1.0, "extra_t_extrapolation_ratio": 1.0,
                   "rope_enable_fps_modulation": False}

    def small_adapter(dm):
        dm.llm_adapter = anima.LLMAdapter(source_dim=spec.context_dim, target_dim=32, model_dim=32, num_layers=1,
                                          num_heads=2, operations=comfy.ops.disable_weight_init)

    return _patcher_after(_supported_models().Anima(unet_config), seed, small_adapter)


def make_krea2(seed: int = 0):
    """A Krea 2 single-stream DiT (``supported_models.Krea2``: flux-type flow, shift 1.15): 3 blocks of hidden 64,
    2 query heads sharing 1 key/value head (grouped-query attention, as the release's 48/12), patch 2; the text
    fusion adapter on 2 encoder layers of 16."""
    unet_config = {"image_model": "krea2", "features": 64, "tdim": 32, "txtdim": 16, "heads": 2, "kvheads": 1,
                   "multiplier": 2, "layers": 3, "patch": 2, "channels": 16, "txtlayers": 2, "txtheads": 2,
                   "txtkvheads": 2}
    return _to_patcher(_supported_models().Krea2(unet_config), seed)


def make_ernie(seed: int = 0):
    """An Ernie Image DiT (``supported_models.ErnieImage``: flow, multiplier 1000, shift 3): 3 blocks of hidden 64,
    2 heads, patch 1 on the 128-channel latent, the image tokens then the text tokens in one sequence."""
    unet_config = {"image_model": "ernie", "hidden_size": 64, "num_attention_heads": 2, "num_layers": 3,
                   "ffn_hidden_size": 128, "in_channels": 128, "out_channels": 128, "patch_size": 1,
                   "text_in_dim": SPECS["ernie"].context_dim, "rope_axes_dim": (8, 12, 12)}
    patcher = _to_patcher(_supported_models().ErnieImage(unet_config), seed)
    with torch.no_grad():  # peaked attention maps, as for Lens (BaseNorm moved the result 8e-3 without)
        for layer in patcher.model.diffusion_model.layers:
            layer.self_attention.norm_q.weight.mul_(2.0)
            layer.self_attention.norm_k.weight.mul_(2.0)
    return patcher


def make_lens(seed: int = 0):
    """A Microsoft Lens dual-stream MMDiT (``supported_models.Lens``: flux-type flow, shift 1.829): 3 blocks, 2
    heads of 32, joint attention on [image tokens, text tokens] (one per latent pixel of the 128-channel latent),
    the text from 4 encoder layers of 8."""
    unet_config = {"image_model": "lens", "patch_size": 2, "in_channels": 128, "out_channels": 32, "num_layers": 3,
                   "attention_head_dim": 32, "num_attention_heads": 2, "enc_hidden_dim": 8,
                   "axes_dims_rope": (8, 12, 12)}
    patcher = _to_patcher(_supported_models().Lens(unet_config), seed)
    # Random weights give its RMS-normed queries and keys a nearly uniform attention map, on which the prompt
    # hardly matters (RescaleCFG moved the result 5e-3): gains of 2, as a trained model's peaked maps.
    with torch.no_grad():
        for block in patcher.model.diffusion_model.transformer_blocks:
            for norm in (block.attn.norm_q, block.attn.norm_k, block.attn.norm_added_q, block.attn.norm_added_k):
                norm.weight.mul_(2.0)
    return patcher


def make_ideogram4(seed: int = 0):
    """An Ideogram 4 single-stream DiT (``supported_models.Ideogram4``: flow, shift 1): 3 layers, 2 heads of 32,
    [text tokens, image tokens] with interleaved MRoPE (sections 6, 5, 5 of the 16 frequencies), one token per
    latent pixel of the 128-channel latent."""
    unet_config = {"image_model": "ideogram4", "in_channels": 128, "num_layers": 3, "num_attention_heads": 2,
                   "attention_head_dim": 32, "intermediate_size": 128, "adaln_dim": 32,
                   "llm_features_dim": SPECS["ideogram4"].context_dim, "mrope_section": [6, 5, 5]}
    model_config = _supported_models().Ideogram4(unet_config)
    model_config.unet_config.update(unet_config)  # its unet_extra_config (the release's sizes) overrode these
    return _to_patcher(model_config, seed)


def make_cogvideox(seed: int = 0):
    """A CogVideoX 1.0 text-to-video DiT (``supported_models.CogVideoX_T2V``: v-prediction DDPM, zero terminal
    SNR): 3 blocks, 2 heads of 32, patch 2 (per frame), rotary positions (no position-embedding buffer), joint
    attention on [text tokens, video tokens]."""
    spec = VIDEO_SPECS["cogvideox"]
    unet_config = {"image_model": "cogvideox", "num_attention_heads": 2, "attention_head_dim": 32,
                   "in_channels": spec.latent_channels, "out_channels": spec.latent_channels, "time_embed_dim": 32,
                   "text_embed_dim": spec.context_dim, "num_layers": 3, "patch_size": 2,
                   "max_text_seq_length": spec.context_tokens, "use_rotary_positional_embeddings": True}
    patcher = _to_patcher(_supported_models().CogVideoX_T2V(unet_config), seed)
    # As Lens: random LayerNormed queries and keys attend almost uniformly and the prompt barely matters (the CFG
    # rules moved the result < 1e-3); gains of 4 make the maps peaked.
    with torch.no_grad():
        for block in patcher.model.diffusion_model.blocks:
            block.norm_q.weight.mul_(4.0)
            block.norm_k.weight.mul_(4.0)
    return patcher


def make_mage_flow(seed: int = 0):
    """A MageFlow DiT (``supported_models.MageFlow``: flow, shift 6): Qwen-Image's joint blocks (3, 2 heads of
    32) on one token per latent pixel of the 128-channel latent, the text first."""
    unet_config = {"image_model": "mage_flow", "in_channels": 128, "out_channels": 128, "num_layers": 3,
                   "attention_head_dim": 32, "num_attention_heads": 2,
                   "joint_attention_dim": SPECS["mage_flow"].context_dim, "axes_dims_rope": (8, 12, 12)}
    patcher = _to_patcher(_supported_models().MageFlow(unet_config), seed)
    with torch.no_grad():  # peaked attention maps, as for Lens (RescaleCFG moved the result 6e-3 without)
        for block in patcher.model.diffusion_model.transformer_blocks:
            for norm in (block.attn.norm_q, block.attn.norm_k, block.attn.norm_added_q, block.attn.norm_added_k):
                norm.weight.mul_(2.0)
    return patcher


def make_joyimage(seed: int = 0):
    """A JoyImage DiT (``supported_models.JoyImage``: flow, multiplier 1000, shift 1.5): 3 dual-stream blocks of
    hidden 64, 2 heads, patches (1, 2, 2) on the Wan 2.1 latent (5-D, one frame), the image tokens first in the
    joint attention."""
    unet_config = {"image_model": "joyimage", "patch_size": [1, 2, 2], "in_channels": 16, "hidden_size": 64,
                   "num_attention_heads": 2, "text_dim": VIDEO_SPECS["joyimage"].context_dim, "num_layers": 3,
                   "rope_dim_list": [8, 12, 12], "theta": 10000}
    model_config = _supported_models().JoyImage(unet_config)
    model_config.unet_config.update(unet_config)  # its unet_extra_config (the release's rope split) overrode these
    return _to_patcher(model_config, seed)


NEW_IN_033_BUILDERS = {"anima": make_anima, "krea2": make_krea2, "ernie": make_ernie, "lens": make_lens,
                       "ideogram4": make_ideogram4, "cogvideox": make_cogvideox, "mage_flow": make_mage_flow,
                       "joyimage": make_joyimage}


def host_lacks(family: str) -> str | None:
    """Why this host cannot build a family added after ComfyUI 0.8.0 (its comfy.supported_models class is
    missing), or None."""
    name = NEW_IN_033_CLASSES[family]
    return None if hasattr(_supported_models(), name) else f"this ComfyUI has no comfy.supported_models.{name}"


# A medium Wan 2.1 DiT for benchmarks/bench_guidance.py's NAG part (not used by the tests): 8 blocks, hidden 256
# (4 heads of 64), a text of 128 tokens of 64 features (Wan pads its umT5 prompt to 512 tokens of 4096), 3 frames.
VIDEO_SPECS["wan_medium"] = FamilySpec(latent_channels=16, context_dim=64, context_tokens=128, pooled_dim=None,
                                       flux_guidance=None, latent_frames=3)


def make_wan_medium(seed: int = 0):
    """Wan 2.1 text-to-video (WAN21_T2V, flow, shift 8) at benchmark size: VIDEO_SPECS["wan_medium"]."""
    spec = VIDEO_SPECS["wan_medium"]
    unet_config = {
        "image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": spec.context_tokens,
        "in_dim": spec.latent_channels, "out_dim": spec.latent_channels, "dim": 256, "ffn_dim": 1024,
        "freq_dim": 256, "text_dim": spec.context_dim, "num_heads": 4, "num_layers": 8, "window_size": (-1, -1),
        "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
    }
    return _to_patcher(_supported_models().WAN21_T2V(unet_config), seed)


# Boogu-Image (ComfyUI 0.33.0): OmniGen 2's conditioning (a text embedding and an all-ones attention mask, which
# gives its ``num_tokens``) on Flux's 16-channel latent.
NEW_IN_033_FAMILIES += ("boogu",)
NEW_IN_033_CLASSES["boogu"] = "Boogu"
SPECS["boogu"] = FamilySpec(latent_channels=16, context_dim=32, context_tokens=12, pooled_dim=None,
                            flux_guidance=None, padded_text_tokens=0)


def make_boogu(seed: int = 0):
    """A Boogu-Image DiT (``supported_models.Boogu``: flow, shift 3.16): one refiner layer per stream, 2 double-stream
    and 2 single-stream layers of hidden 64, 2 heads (no grouped-query attention), patch 2."""
    unet_config = {"image_model": "boogu", "patch_size": 2, "in_channels": 16, "hidden_size": 64, "num_layers": 2,
                   "num_double_stream_layers": 2, "num_refiner_layers": 1, "num_attention_heads": 2,
                   "num_kv_heads": 2, "multiple_of": 16, "axes_dim_rope": (8, 12, 12), "axes_lens": (64, 64, 64),
                   "instruction_feat_dim": SPECS["boogu"].context_dim}
    return _to_patcher(_supported_models().Boogu(unet_config), seed)


NEW_IN_033_BUILDERS["boogu"] = make_boogu


# PixelDiT (ComfyUI 0.33.0): pixel space (3 channels), a Gemma-2 embedding as the text.
NEW_IN_033_FAMILIES += ("pixeldit",)
NEW_IN_033_CLASSES["pixeldit"] = "PixelDiTT2I"
SPECS["pixeldit"] = FamilySpec(latent_channels=3, context_dim=32, context_tokens=16, pooled_dim=None,
                               flux_guidance=None)


def make_pixeldit(seed: int = 0):
    """A PixelDiT text-to-image DiT (``supported_models.PixelDiTT2I``: flow, shift 4): 3 MMDiT patch blocks of hidden
    64, 2 heads, patch 2 (the release: 16; an 8x8 test image gives a 4x4 token grid), one pixel block."""
    unet_config = {"image_model": "pixeldit_t2i", "in_channels": 3, "num_groups": 2, "hidden_size": 64,
                   "pixel_hidden_size": 8, "pixel_attn_hidden_size": 32, "pixel_num_groups": 2, "patch_depth": 3,
                   "pixel_depth": 1, "patch_size": 2, "txt_embed_dim": SPECS["pixeldit"].context_dim,
                   "txt_max_length": SPECS["pixeldit"].context_tokens}
    patcher = _to_patcher(_supported_models().PixelDiTT2I(unet_config), seed)
    with torch.no_grad():  # peaked attention maps, as for Lens (RescaleCFG moved the result 9e-3 without)
        for block in patcher.model.diffusion_model.patch_blocks:
            for norm in (block.attn.q_norm_x, block.attn.k_norm_x, block.attn.q_norm_y, block.attn.k_norm_y):
                norm.weight.mul_(2.0)
    return patcher


NEW_IN_033_BUILDERS["pixeldit"] = make_pixeldit


# HiDream O1 (ComfyUI 0.33.0): pixel space (3 channels, 32x32 patches: a 128x128 image is a 4x4 token grid); its
# text encoder is a tokenizer, the conditioning carries the prompt's token ids (``text_input_ids``) in the chat
# template HiDreamO1Tokenizer writes, ending with the timestep token.
NEW_IN_033_FAMILIES += ("hidream_o1",)
NEW_IN_033_CLASSES["hidream_o1"] = "HiDreamO1"
SPECS["hidream_o1"] = FamilySpec(latent_channels=3, context_dim=1, context_tokens=14, pooled_dim=None,
                                 flux_guidance=None)
LATENT_SIDES["hidream_o1"] = 128


def _hidream_o1_conditioning(batch: int, seed: int) -> tuple[list, list]:
    import comfy.text_encoders.hidream_o1 as template

    generator = torch.Generator().manual_seed(seed)

    def prompt():
        words = torch.randint(1000, 100000, (4,), generator=generator).tolist()
        ids = torch.tensor([[template.IM_START_ID, template.USER_ID, template.NEWLINE_ID, *words, template.IM_END_ID,
                             template.NEWLINE_ID, template.IM_START_ID, template.ASSISTANT_ID, template.NEWLINE_ID,
                             template.BOI_TOKEN_ID, template.TMS_TOKEN_ID]] * batch)
        return [[ids.unsqueeze(-1).float(), {"text_input_ids": ids}]]  # the TE's surrogate context, as it gives

    return prompt(), prompt()


CONDITIONING_BUILDERS["hidream_o1"] = _hidream_o1_conditioning


def make_hidream_o1(seed: int = 0):
    """A HiDream O1 transformer (``supported_models.HiDreamO1``: flow, shift 3): 3 Qwen3-VL decoder layers of hidden
    64, 2 heads of 32 (interleaved MRoPE sections 6, 5, 5), the full vocabulary (its special tokens' ids are
    Qwen's), a one-block vision tower (unused without reference images)."""
    unet_config = {"image_model": "hidream_o1",
                   "text_config_overrides": {"vocab_size": 151936, "hidden_size": 64, "intermediate_size": 128,
                                             "num_hidden_layers": 3, "num_attention_heads": 2,
                                             "num_key_value_heads": 2, "head_dim": 32, "rope_dims": [6, 5, 5]},
                   "vision_config_overrides": {"hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "depth": 1,
                                               "num_position_embeddings": 16}}
    return _to_patcher(_supported_models().HiDreamO1(unet_config), seed)


NEW_IN_033_BUILDERS["hidream_o1"] = make_hidream_o1
