"""Attention perturbations: PAG's identity attention, SEG's smoothed queries, SAG's mask and blur.

References: diffusers' PAG score-skip mode for identity attention; for SEG (no working package: the
diffusers guider is broken, see the reference page, section 7) the SEG-SDXL definition re-written
below from that page as a full 2-D depthwise convolution; for SAG, ComfyUI's own ``nodes_sag``
functions when a ComfyUI checkout is importable, plus an independent 2-D-kernel re-implementation.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from guidance_core.perturb import (
    attention_probabilities,
    gaussian_blur_2d,
    identity_attention,
    sag_attention_mask,
    sag_blur,
    sag_grid_hw,
    seg_kernel_size,
    smooth_queries,
)

LOOSE = {torch.float16: 2e-2, torch.bfloat16: 6e-2}  # atol/rtol vs float32 for N(0, 1) data


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=generator)


# --- independent references -------------------------------------------------------------------------


def reference_kernel_size(sigma: float) -> int:
    return math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2


def reference_gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    x = torch.linspace(-(size - 1) / 2, (size - 1) / 2, size, dtype=torch.float64)
    density = torch.exp(-(x**2) / (2 * sigma**2))
    return density / density.sum()


def reference_seg_blur(grid: torch.Tensor, sigma: float) -> torch.Tensor:
    """SEG-SDXL's blur as the reference page describes it: one full 2-D kernel, depthwise conv2d, reflect pad.

    The reference clips the kernel to ``side - (side mod 2 - 1)`` of its square grid; on a non-square
    grid each axis is clipped to its own side. Computed in float64.
    """
    _, channels, height, width = grid.shape
    size = reference_kernel_size(sigma)
    size_h = min(size, height - (height % 2 - 1))
    size_w = min(size, width - (width % 2 - 1))
    kernel_2d = torch.outer(reference_gaussian_1d(size_h, sigma), reference_gaussian_1d(size_w, sigma))
    weight = kernel_2d.expand(channels, 1, size_h, size_w)
    padded = F.pad(grid.double(), (size_w // 2, size_w // 2, size_h // 2, size_h // 2), mode="reflect")
    return F.conv2d(padded, weight, groups=channels)


def reference_seg_queries(
    query: torch.Tensor, height: int, width: int, sigma: float, infinite: bool = False
) -> torch.Tensor:
    """SEG-SDXL's processor on (B, heads, H*W, D) queries: to (B, heads*D, H, W), blur or mean, and back."""
    batch, heads, tokens, head_dim = query.shape
    grid = query.double().permute(0, 1, 3, 2).reshape(batch, heads * head_dim, height, width)
    if infinite:
        grid = grid.mean(dim=(-2, -1), keepdim=True).expand_as(grid)
    else:
        grid = reference_seg_blur(grid, sigma)
    return grid.reshape(batch, heads, head_dim, tokens).permute(0, 1, 3, 2)


def assert_matches_reference(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """float32 result vs a float64 reference: tight."""
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-6)


def reference_sag_blur(x0: torch.Tensor, mask: torch.Tensor, sigma: float, size: int = 9) -> torch.Tensor:
    """SAG's masked blur (arXiv:2210.00939) with a fixed-size 2-D Gaussian, in float64."""
    planes = x0.double().reshape(-1, 1, *x0.shape[-2:])
    kernel_2d = torch.outer(reference_gaussian_1d(size, sigma), reference_gaussian_1d(size, sigma))
    padded = F.pad(planes, (size // 2,) * 4, mode="reflect")
    blurred = F.conv2d(padded, kernel_2d[None, None]).reshape(x0.shape)
    return blurred * mask.double() + x0.double() * (1 - mask.double())


# --- PAG: identity attention -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 16, 32), (3, 64, 24), (2, 4, 36, 8), (1, 8, 100, 16)])
def test_identity_attention_returns_v(shape) -> None:
    q, k, v = randn(*shape, seed=1), randn(*shape, seed=2), randn(*shape, seed=3)
    assert torch.equal(identity_attention(q, k, v), v)


def test_identity_attention_matches_diffusers_score_skip_mode() -> None:
    layer_skip = pytest.importorskip("diffusers.hooks.layer_skip", reason="diffusers (test-only reference)")
    q, k, v = randn(2, 4, 36, 8, seed=1), randn(2, 4, 36, 8, seed=2), randn(2, 4, 36, 8, seed=3)
    with layer_skip.AttentionScoreSkipFunctionMode():
        expected = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(identity_attention(q, k, v), expected)


def test_identity_attention_differs_from_real_attention() -> None:
    q, k, v = randn(2, 4, 36, 8, seed=1), randn(2, 4, 36, 8, seed=2), randn(2, 4, 36, 8, seed=3)
    real = F.scaled_dot_product_attention(q, k, v)
    assert (identity_attention(q, k, v) - real).abs().mean() > 0.3


def test_identity_attention_rejects_cross_attention() -> None:
    q, kv = randn(2, 4, 36, 8), randn(2, 4, 77, 8)
    with pytest.raises(ValueError, match=r"36 query tokens and 77 value tokens"):
        identity_attention(q, kv, kv)


# --- SEG: kernel size and blur ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sigma", "size"),
    [(1.0, 7), (2.0, 13), (4.0, 25), (0.5, 3), (0.3, 3), (0.9, 7), (10.0, 61), (100.0, 601)],
)
def test_seg_kernel_size(sigma, size) -> None:
    # ceil(6 sigma) + 1 - (ceil(6 sigma) mod 2), worked by hand: e.g. 0.3 -> ceil(1.8) = 2 -> 3.
    assert seg_kernel_size(sigma) == size


@pytest.mark.parametrize("sigma", [-1.0, math.nan, math.inf])
def test_seg_kernel_size_rejects_bad_sigma(sigma) -> None:
    with pytest.raises(ValueError, match="sigma"):
        seg_kernel_size(sigma)


SQUARE_GRIDS = [(1, 3, 8, 8), (2, 5, 7, 7), (1, 4, 32, 32), (3, 2, 16, 16), (1, 2, 5, 5)]
NON_SQUARE_GRIDS = [(1, 3, 6, 10), (2, 4, 5, 12), (1, 2, 1, 9), (2, 3, 2, 3), (1, 2, 32, 16)]


@pytest.mark.parametrize("grid_shape", SQUARE_GRIDS + NON_SQUARE_GRIDS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.0, 4.0, 100.0])
def test_gaussian_blur_2d_matches_the_2d_kernel_reference(grid_shape, sigma) -> None:
    grid = randn(*grid_shape, seed=4)
    ours = gaussian_blur_2d(grid, sigma)
    assert ours.dtype == torch.float32 and ours.shape == grid.shape
    assert_matches_reference(ours, reference_seg_blur(grid, sigma))


def test_gaussian_blur_2d_actually_blurs() -> None:
    grid = randn(2, 3, 16, 16, seed=5)
    blurred = gaussian_blur_2d(grid, 1.0)
    assert (blurred - grid).abs().mean() > 0.3
    assert blurred.std() < 0.6 * grid.std()  # white noise loses most of its variance


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gaussian_blur_2d_low_precision(dtype) -> None:
    grid = randn(2, 4, 12, 12, seed=6)
    low = gaussian_blur_2d(grid.to(dtype), 2.0)
    assert low.dtype == dtype and torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), gaussian_blur_2d(grid, 2.0), rtol=LOOSE[dtype], atol=LOOSE[dtype])


# --- SEG: smoothed queries --------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("side", [5, 8, 16])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 4.0, 100.0])
def test_smooth_queries_matches_seg_reference_heads_layout(batch, side, sigma) -> None:
    q = randn(batch, 2, side * side, 4, seed=7)
    expected = reference_seg_queries(q, side, side, sigma)
    assert_matches_reference(smooth_queries(q, (side, side), sigma), expected)


@pytest.mark.parametrize("batch", [1, 3])
def test_smooth_queries_matches_seg_reference_tokens_channels_layout(batch) -> None:
    # ComfyUI's attn1 patches see (B, L, heads*D): the same channels, no head axis.
    heads, head_dim, side, sigma = 4, 8, 8, 2.0
    q_tokens = randn(batch, side * side, heads * head_dim, seed=8)
    q_heads = q_tokens.reshape(batch, side * side, heads, head_dim).transpose(1, 2)
    expected = reference_seg_queries(q_heads, side, side, sigma)
    expected = expected.transpose(1, 2).reshape(batch, side * side, heads * head_dim)
    assert_matches_reference(smooth_queries(q_tokens, (side, side), sigma), expected)


@pytest.mark.parametrize(("height", "width"), [(6, 10), (4, 12), (9, 5), (3, 16)])
@pytest.mark.parametrize("sigma", [1.0, 3.0, 100.0])
def test_smooth_queries_non_square_grid(height, width, sigma) -> None:
    q = randn(2, 3, height * width, 4, seed=9)
    expected = reference_seg_queries(q, height, width, sigma)
    assert_matches_reference(smooth_queries(q, (height, width), sigma), expected)


def test_smooth_queries_leaves_text_tokens_untouched() -> None:
    # Joint attention (SD3/Flux): text tokens before the image grid, here some after it too.
    text_before, text_after, height, width = 7, 3, 6, 8
    q = randn(2, 3, text_before + height * width + text_after, 4, seed=10)
    smoothed = smooth_queries(q, (height, width), 1.5, image_token_start=text_before)
    image_end = text_before + height * width
    assert torch.equal(smoothed[..., :text_before, :], q[..., :text_before, :])
    assert torch.equal(smoothed[..., image_end:, :], q[..., image_end:, :])
    expected_image = reference_seg_queries(q[..., text_before:image_end, :], height, width, 1.5)
    assert_matches_reference(smoothed[..., text_before:image_end, :], expected_image)


@pytest.mark.parametrize("sigma", [1.0, 3.0, 1e7])
def test_smooth_queries_blurs_each_video_frame_on_its_own(sigma) -> None:
    # Video: frames of H x W tokens one after the other, here after text tokens and before more text.
    text_before, text_after, frames, height, width = 4, 2, 3, 5, 6
    frame = height * width
    q = randn(2, 3, text_before + frames * frame + text_after, 4, seed=21)
    smoothed = smooth_queries(q, (height, width), sigma, image_token_start=text_before, frames=frames)
    image_end = text_before + frames * frame
    assert torch.equal(smoothed[..., :text_before, :], q[..., :text_before, :])
    assert torch.equal(smoothed[..., image_end:, :], q[..., image_end:, :])
    for f in range(frames):
        rows = slice(text_before + f * frame, text_before + (f + 1) * frame)
        expected = reference_seg_queries(q[..., rows, :], height, width, sigma, infinite=sigma >= 9999)
        assert_matches_reference(smoothed[..., rows, :], expected)


def test_smooth_queries_does_not_mix_video_frames() -> None:
    # A frame's blurred queries depend on that frame only, even at the infinite blur.
    frames, side = 3, 4
    q = randn(1, 2, frames * side * side, 4, seed=22)
    changed = q.clone()
    changed[..., : side * side, :] += 5.0  # only the first frame
    for sigma in (2.0, 1e7):
        a = smooth_queries(q, (side, side), sigma, frames=frames)
        b = smooth_queries(changed, (side, side), sigma, frames=frames)
        assert torch.equal(a[..., side * side:, :], b[..., side * side:, :])
        assert (a[..., : side * side, :] - b[..., : side * side, :]).abs().min() > 1.0


@pytest.mark.parametrize("sigma", [9999.0, 1e7])
def test_smooth_queries_infinite_sigma_is_the_grid_mean(sigma) -> None:
    text_tokens, side = 5, 8
    q = randn(3, 2, text_tokens + side * side, 4, seed=11)
    smoothed = smooth_queries(q, (side, side), sigma, image_token_start=text_tokens)
    expected = reference_seg_queries(q[..., text_tokens:, :], side, side, sigma, infinite=True)
    assert_matches_reference(smoothed[..., text_tokens:, :], expected)
    assert torch.equal(smoothed[..., :text_tokens, :], q[..., :text_tokens, :])


def test_smooth_queries_below_the_infinite_threshold_is_still_a_blur() -> None:
    q = randn(1, 2, 64, 4, seed=12)
    nearly_flat = smooth_queries(q, (8, 8), 9998.0)
    mean = q.mean(dim=-2, keepdim=True)
    assert (nearly_flat - mean).abs().max() > 1e-3
    assert_matches_reference(nearly_flat, reference_seg_queries(q, 8, 8, 9998.0))


def test_smooth_queries_changes_the_image_queries() -> None:
    q = randn(2, 4, 64, 8, seed=13)
    smoothed = smooth_queries(q, (8, 8), 1.0)
    assert (smoothed - q).abs().mean() > 0.3


def test_smooth_queries_blurs_the_attention_logits_the_same_way() -> None:
    # Hong 2024 (SEG): the blur is linear along the query axis, so blurring Q blurs Q K^T.
    side, sigma = 8, 1.5
    q, k = randn(1, 1, side * side, 16, seed=14), randn(1, 1, side * side, 16, seed=15)
    logits_of_smoothed = smooth_queries(q, (side, side), sigma) @ k.transpose(-1, -2)
    logits = q @ k.transpose(-1, -2)  # (..., queries, keys): queries as tokens, keys as channels
    smoothed_logits = smooth_queries(logits, (side, side), sigma)
    torch.testing.assert_close(logits_of_smoothed, smoothed_logits, rtol=1e-4, atol=1e-4)


def test_smooth_queries_sigma_zero_is_the_identity() -> None:
    q = randn(2, 2, 36, 4, seed=16)
    torch.testing.assert_close(smooth_queries(q, (6, 6), 0.0), q, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sigma", [1.0, 9999.0])
def test_smooth_queries_low_precision(dtype, sigma) -> None:
    q = randn(2, 3, 70, 8, seed=17)
    low = smooth_queries(q.to(dtype), (8, 8), sigma, image_token_start=6)
    assert low.dtype == dtype and torch.isfinite(low).all()
    expected = smooth_queries(q, (8, 8), sigma, image_token_start=6)
    torch.testing.assert_close(low.float(), expected, rtol=LOOSE[dtype], atol=LOOSE[dtype])


@pytest.mark.parametrize(
    ("grid_hw", "start", "words"),
    [((9, 9), 0, ["9x9", "81 tokens", "64 tokens"]), ((8, 8), 1, ["8x8", "token 1", "64 tokens"])],
)
def test_smooth_queries_rejects_a_grid_that_does_not_fit(grid_hw, start, words) -> None:
    with pytest.raises(ValueError) as error:
        smooth_queries(randn(1, 2, 64, 4), grid_hw, 1.0, image_token_start=start)
    for word in words:
        assert word in str(error.value)


# --- SAG: attention probabilities, mask, blur -------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "heads", "tokens", "head_dim"), [(1, 1, 16, 8), (3, 4, 36, 16), (2, 8, 12, 5)]
)
def test_attention_probabilities_is_scaled_softmax(batch, heads, tokens, head_dim) -> None:
    q, k = randn(batch, heads, tokens, head_dim, seed=18), randn(batch, heads, 2 * tokens, head_dim, seed=19)
    expected = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
    probs = attention_probabilities(q, k)
    assert probs.dtype == torch.float32 and probs.shape == (batch, heads, tokens, 2 * tokens)
    torch.testing.assert_close(probs.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(batch, heads, tokens))


def test_attention_probabilities_tokens_channels_layout() -> None:
    batch, heads, tokens, head_dim = 2, 4, 20, 8
    q, k = randn(batch, tokens, heads * head_dim, seed=20), randn(batch, tokens, heads * head_dim, seed=21)
    split = lambda t: t.reshape(batch, tokens, heads, head_dim).transpose(1, 2)  # noqa: E731
    expected = attention_probabilities(split(q), split(k))
    torch.testing.assert_close(attention_probabilities(q, k, heads=heads), expected)
    half = attention_probabilities(q.half(), k.half(), heads=heads)
    assert half.dtype == torch.float32
    with pytest.raises(ValueError, match="heads"):
        attention_probabilities(q, k, heads=3)
    with pytest.raises(ValueError, match=r"\(B, heads, L, D\)"):
        attention_probabilities(q, k)


def hand_made_attention() -> torch.Tensor:
    """Two heads over a 2x2 grid whose head-mean receives [1.5, 1.0, 0.5, 1.0] per key (dyadic: exact).

    Head 1 alone gives key 1 a total of 1.25, so thresholding a single head (or the max over heads)
    would wrongly select key 1; summing over the key axis instead gives 1.0 everywhere (nothing selected).
    """
    mean = torch.tensor(
        [[0.5, 0.25, 0.0, 0.25], [0.25, 0.25, 0.25, 0.25], [0.5, 0.25, 0.0, 0.25], [0.25, 0.25, 0.25, 0.25]]
    )
    spread = torch.tensor(
        [[0.0, 0.0, 0.0, 0.0], [0.125, -0.125, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.125, -0.125, 0.0, 0.0]]
    )
    return torch.stack([mean + spread, mean - spread])[None]  # (1, heads=2, 4, 4)


def test_sag_attention_mask_keeps_keys_above_average_attention() -> None:
    attention = hand_made_attention()
    assert torch.equal(attention.sum(-1), torch.ones(1, 2, 4))  # a valid attention map
    mask = sag_attention_mask(attention, (2, 2), (4, 4))
    expected = torch.zeros(1, 1, 4, 4)
    expected[..., :2, :2] = 1.0  # key 0 (top-left cell), nearest-upsampled by 2
    assert mask.dtype == torch.float32
    assert torch.equal(mask, expected)  # key 1 and key 3 receive exactly 1.0: not selected (strict >)


def test_sag_attention_mask_is_per_sample() -> None:
    first = hand_made_attention()
    order = torch.tensor([3, 1, 2, 0])  # swap keys 0 and 3 in the second sample
    second = first[..., order]
    mask = sag_attention_mask(torch.cat([first, second]), (2, 2), (6, 6))
    assert mask.shape == (2, 1, 6, 6)
    assert mask[0, 0, :3, :3].eq(1).all() and mask[0].sum() == 9
    assert mask[1, 0, 3:, 3:].eq(1).all() and mask[1].sum() == 9


def test_sag_attention_mask_non_square_grid_is_row_major() -> None:
    tokens = 6  # a 2x3 grid
    attention = torch.full((1, 3, tokens, tokens), 0.1)
    attention[..., 4] = 0.5  # every query looks at key 4 = row 1, column 1
    mask = sag_attention_mask(attention, (2, 3), (4, 9))
    expected = torch.zeros(1, 1, 4, 9)
    expected[..., 2:4, 3:6] = 1.0
    assert torch.equal(mask, expected)


def test_sag_attention_mask_rejects_a_wrong_grid() -> None:
    with pytest.raises(ValueError, match=r"6 tokens .* 4 keys"):
        sag_attention_mask(hand_made_attention(), (2, 3), (4, 6))


@pytest.mark.parametrize(
    ("tokens", "latent_hw", "grid_hw"),
    [
        (64, (64, 64), (8, 8)),
        (96, (64, 96), (8, 12)),
        (96, (96, 64), (12, 8)),
        (15, (40, 24), (5, 3)),
        (4, (13, 9), (2, 2)),
    ],
)
def test_sag_grid_hw_follows_the_latent_aspect(tokens, latent_hw, grid_hw) -> None:
    assert sag_grid_hw(tokens, latent_hw) == grid_hw


@pytest.mark.parametrize(("tokens", "latent_hw"), [(1, (8, 8)), (2, (8, 16)), (7, (64, 64)), (3, (100, 4))])
def test_sag_grid_hw_always_factors_the_tokens(tokens, latent_hw) -> None:
    height, width = sag_grid_hw(tokens, latent_hw)
    assert height * width == tokens and height >= 1 and width >= 1


def latent_mask(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    mask_shape = (shape[0], 1, *([1] * (len(shape) - 4)), *shape[-2:])
    return (randn(*mask_shape, seed=seed) > 0).float()


def test_sag_blur_matches_the_2d_kernel_reference(shape) -> None:
    x0 = randn(*shape, seed=22)
    mask = latent_mask(shape, seed=23)
    for sigma in (0.5, 1.0, 2.0, 5.0):
        ours = sag_blur(x0, mask, sigma)
        assert ours.shape == x0.shape and ours.dtype == torch.float32
        assert_matches_reference(ours, reference_sag_blur(x0, mask, sigma))


def test_sag_blur_only_inside_the_mask(shape) -> None:
    x0 = randn(*shape, seed=24)
    mask = latent_mask(shape, seed=25)
    degraded = sag_blur(x0, mask, 2.0)
    fully_blurred = sag_blur(x0, torch.ones_like(mask), 2.0)
    outside, inside = (mask == 0).expand_as(x0), (mask == 1).expand_as(x0)
    assert torch.equal(degraded[outside], x0[outside])
    assert torch.equal(degraded[inside], fully_blurred[inside])
    assert (degraded[inside] - x0[inside]).abs().mean() > 0.3  # the blur is not a no-op
    assert torch.equal(sag_blur(x0, torch.zeros_like(mask), 2.0), x0)


def test_sag_blur_low_precision(shape, low_precision_dtype) -> None:
    x0 = randn(*shape, seed=26)
    mask = latent_mask(shape, seed=27)
    low = sag_blur(x0.to(low_precision_dtype), mask, 1.0)
    assert low.dtype == low_precision_dtype and torch.isfinite(low).all()
    tolerance = LOOSE[low_precision_dtype]
    torch.testing.assert_close(low.float(), sag_blur(x0, mask, 1.0), rtol=tolerance, atol=tolerance)


def test_sag_blur_sigma_zero_leaves_x0_unchanged() -> None:
    x0 = randn(2, 4, 8, 8, seed=28)
    assert torch.equal(sag_blur(x0, torch.ones(2, 1, 8, 8), 0.0), x0)


@pytest.mark.parametrize("side", [1, 4])
def test_sag_blur_rejects_latents_too_small_for_the_kernel(side) -> None:
    with pytest.raises(ValueError, match=r"> 4"):
        sag_blur(randn(1, 4, side, 8), torch.ones(1, 1, side, 8), 1.0)


# --- SAG parity with ComfyUI's built-in node --------------------------------------------------------


@pytest.fixture(scope="module")
def comfy_nodes_sag():
    """ComfyUI's ``comfy_extras.nodes_sag``, imported on the CPU without a server (or skip)."""
    root = Path(os.environ.get("COMFYUI_PATH") or "~/ComfyUI").expanduser().resolve()
    if not (root / "comfy_extras" / "nodes_sag.py").is_file():
        pytest.skip(f"no ComfyUI checkout at {root} (set COMFYUI_PATH); SAG host parity not checked")
    # Front of sys.path, as ComfyUI itself runs (and as tests/host does): its nodes.py must win
    # over this repository's nodes/ package in the same process.
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # before comfy.model_management is first imported
        import comfy_extras.nodes_sag as nodes_sag
    except Exception as error:  # noqa: BLE001 - any import failure means "cannot check here"
        pytest.skip(f"ComfyUI's nodes_sag is not importable without a running server here: {error!r}")
    return nodes_sag


@pytest.mark.parametrize(
    ("batch", "latent_hw", "mid_grid"),
    [
        (1, (64, 64), (8, 8)),
        (2, (64, 96), (8, 12)),
        (3, (40, 24), (5, 3)),
        (1, (13, 9), (2, 2)),
        (2, (30, 20), (6, 4)),
    ],
)
@pytest.mark.parametrize("blur_sigma", [0.5, 2.0, 5.0])
def test_sag_matches_comfyui_create_blur_map(comfy_nodes_sag, batch, latent_hw, mid_grid, blur_sigma) -> None:
    heads, head_dim = 3, 8
    tokens = mid_grid[0] * mid_grid[1]
    # Scaled so the attention is peaked and the mask is neither empty nor full.
    q = randn(batch, tokens, heads * head_dim, seed=29, scale=2.0)
    k = randn(batch, tokens, heads * head_dim, seed=30, scale=2.0)
    v = randn(batch, tokens, heads * head_dim, seed=31)
    x0 = randn(batch, 4, *latent_hw, seed=32)

    attention_with_scores = comfy_nodes_sag.attention_basic_with_sim
    _, comfy_scores = attention_with_scores(q, k, v, heads=heads, attn_precision=torch.float32)
    probs = attention_probabilities(q, k, heads=heads)
    comfy_probs = comfy_scores.reshape(batch, heads, tokens, tokens)
    torch.testing.assert_close(probs, comfy_probs, rtol=1e-5, atol=1e-7)

    expected = comfy_nodes_sag.create_blur_map(x0, comfy_scores, sigma=blur_sigma, threshold=1.0)
    grid_hw = sag_grid_hw(tokens, latent_hw)
    assert grid_hw == mid_grid
    mask = sag_attention_mask(probs, grid_hw, latent_hw)
    assert 0.1 < mask.mean() < 0.9, "degenerate test data: the mask should be partial"
    ours = sag_blur(x0, mask, blur_sigma)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - x0).abs().max() > 0.5  # the comparison is not between two copies of x0


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (3, 4, 8, 8), (2, 16, 6, 10)])  # ComfyUI's SAG is 4-D only
def test_sag_blur_matches_comfyui_gaussian_blur_2d(comfy_nodes_sag, shape) -> None:
    x0 = randn(*shape, seed=33)
    for sigma in (0.5, 2.0, 5.0):
        expected = comfy_nodes_sag.gaussian_blur_2d(x0, kernel_size=9, sigma=sigma)
        ours = sag_blur(x0, torch.ones(shape[0], 1, *shape[-2:]), sigma)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
