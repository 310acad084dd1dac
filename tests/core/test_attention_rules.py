"""The attention rules on a token grid (guidance_core/perturb.py, guidance_core/tokens.py), checked with a plain
``attend`` and references written here from the papers' definitions, no host.

Breaks each test catches are named in its docstring."""

import math

import pytest
import torch

from guidance_core.perturb import identity_all_attention, identity_image_attention, smoothed_energy_attention
from guidance_core.tokens import TokenGrid


def softmax_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def returns_queries(q, k, v):
    """An ``attend`` that returns its queries, so a test sees exactly what the rule attended with."""
    return q.clone()


def qkv(tokens, seed=0, batch=2, heads=2, dim=4):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, tokens, dim, generator=g) for _ in range(3))


def reference_blur_axis(x: torch.Tensor, sigma: float, axis: int) -> torch.Tensor:
    """A 1-D Gaussian blur along ``axis`` written out: weights exp(-d²/2σ²) at offsets −r..r with
    r = (kernel − 1)/2, kernel = ceil(6σ) + 1 made odd and no longer than the side, normalised; the
    input mirrored at the borders without repeating the edge (reflect)."""
    side = x.shape[axis]
    kernel = math.ceil(6 * sigma)
    kernel = kernel + 1 - kernel % 2
    kernel = min(kernel, side if side % 2 else side + 1)
    radius = (kernel - 1) // 2
    weights = [math.exp(-(d * d) / (2 * sigma * sigma)) for d in range(-radius, radius + 1)]
    total = sum(weights)
    moved = x.movedim(axis, 0)
    out = torch.zeros_like(moved)
    for i in range(side):
        for offset, weight in zip(range(-radius, radius + 1), weights, strict=True):
            j = i + offset
            j = -j if j < 0 else (2 * (side - 1) - j if j >= side else j)
            out[i] += weight / total * moved[j]
    return out.movedim(0, axis)


@pytest.mark.parametrize(("height", "width"), [(5, 9), (9, 5)])
def test_seg_blurs_the_image_queries_along_the_grids_own_height_and_width(height, width):
    """Fails if the grid's height and width are swapped (blur along the wrong axes): the non-square grids here
    give a different result under the swap (checked below). Also fails if text tokens are blurred."""
    text = 3
    q, k, v = qkv(text + height * width)
    grid = TokenGrid(text, height, width)
    sigma = 0.8
    out = smoothed_energy_attention(q, k, v, grid, returns_queries, blur_sigma=sigma)

    image = q[..., text:, :].unflatten(-2, (height, width))  # (B, heads, H, W, D)
    expected = reference_blur_axis(reference_blur_axis(image, sigma, axis=2), sigma, axis=3).flatten(2, 3)
    torch.testing.assert_close(out[..., text:, :], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[..., :text, :], q[..., :text, :])

    swapped = smoothed_energy_attention(q, k, v, TokenGrid(text, width, height), returns_queries, blur_sigma=sigma)
    assert (swapped[..., text:, :] - expected).abs().max() > 1e-2, "the test cannot tell the axes apart"


def test_seg_blurs_each_video_frame_on_its_own():
    """Fails if frames are blurred as one tall grid (a frame's edge rows would mix with the next frame's)."""
    frames, height, width = 3, 5, 5
    q, k, v = qkv(frames * height * width, seed=1)
    out = smoothed_energy_attention(q, k, v, TokenGrid(0, height, width, frames), returns_queries, blur_sigma=0.8)
    per_frame = q.unflatten(-2, (frames, height, width))
    expected = reference_blur_axis(reference_blur_axis(per_frame, 0.8, axis=3), 0.8, axis=4).flatten(2, 4)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("text_first", [True, False])
def test_pag_makes_only_the_image_rows_of_joint_attention_the_identity(text_first):
    """PAG on joint attention: image rows return their own V, text rows keep softmax attention over every token.
    Fails if the text rows are perturbed too, or if the image rows are taken at the wrong place (text before
    vs after the image tokens)."""
    text, height, width = 4, 3, 5
    q, k, v = qkv(text + height * width, seed=2)
    grid = TokenGrid(text if text_first else 0, height, width)
    out = identity_image_attention(q, k, v, grid, softmax_attention)

    image_rows = grid.image_slice
    text_rows = slice(0, text) if text_first else slice(height * width, None)
    torch.testing.assert_close(out[..., image_rows, :], v[..., image_rows, :])
    torch.testing.assert_close(out[..., text_rows, :], softmax_attention(q, k, v)[..., text_rows, :])


def test_pag_on_pure_self_attention_and_slg_attention_scores_return_v():
    q, k, v = qkv(15, seed=3)
    torch.testing.assert_close(identity_image_attention(q, k, v, TokenGrid(0, 3, 5), softmax_attention), v)
    torch.testing.assert_close(identity_all_attention(q, k, v, None, softmax_attention), v)


def test_identity_gives_keys_after_the_queries_own_tokens_weight_zero():
    """Stable Cascade's AttnBlock: 15 image queries attend to [15 image tokens; 4 text tokens]. The identity
    map returns each query its own token's value (the text's values never reach the output), as a softmax
    whose text scores are -inf and whose image scores are a very sharp diagonal does."""
    q, k, v = qkv(19, seed=4)
    q = q[..., :15, :]
    sharp = torch.full((15, 19), -1e9)
    sharp[range(15), range(15)] = 0.0
    expected = torch.matmul(torch.softmax(sharp, dim=-1), v)
    torch.testing.assert_close(identity_image_attention(q, k, v, TokenGrid(0, 3, 5), softmax_attention), expected)
    torch.testing.assert_close(identity_all_attention(q, k, v, None, softmax_attention), expected)


def test_a_missing_grid_is_an_error_naming_the_method():
    q, k, v = qkv(15)
    with pytest.raises(ValueError, match="PAG: could not find the image tokens"):
        identity_image_attention(q, k, v, None, softmax_attention)
    with pytest.raises(ValueError, match="SEG: could not find the image tokens"):
        smoothed_energy_attention(q, k, v, None, softmax_attention, blur_sigma=1.0)
