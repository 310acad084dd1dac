"""Perturbations of attention, as pure functions on tensors: the "weaker model" half of PAG, SEG and SAG.

- PAG replaces the self-attention map by the identity (``identity_attention``).
- SEG blurs the self-attention queries over the 2-D token grid, frame by frame (``smooth_queries``).
- SAG reads which tokens draw the most attention (``attention_probabilities``, ``sag_attention_mask``)
  and blurs the predicted clean image there (``sag_blur``) before running the model again.

Token tensors carry tokens on axis -2: ``(B, L, C)`` as ComfyUI's attention patches see them, or
``(B, heads, L, D)``. Images are ``(B, C, H, W)``. Blurs run in float32 and return the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "identity_all_attention",
    "identity_image_attention",
    "record_attention",
    "smoothed_energy_attention",
    "attention_probabilities",
    "gaussian_blur_2d",
    "identity_attention",
    "sag_attention_mask",
    "sag_blur",
    "sag_grid_hw",
    "seg_kernel_size",
    "smooth_queries",
]


def identity_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Self-attention with its attention map replaced by the identity: the output is ``v``.

    PAG (Ahn et al., ECCV 2024, arXiv:2403.17377): ``softmax(Q K^T / sqrt(d))`` becomes ``I``, so each
    token attends only to itself and ``I @ V = V``. Only meaningful for self-attention, where the
    queries and values have the same tokens.
    """
    if q.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"identity attention needs as many query tokens as value tokens (self-attention); "
            f"got {q.shape[-2]} query tokens and {v.shape[-2]} value tokens "
            f"(q {tuple(q.shape)}, v {tuple(v.shape)})"
        )
    return v


def _require_sigma(sigma: float) -> None:
    is_number = isinstance(sigma, (int, float)) and not isinstance(sigma, bool)
    if not is_number or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"blur sigma must be a finite number >= 0, got {sigma!r}")


def seg_kernel_size(sigma: float) -> int:
    """SEG's odd kernel size for a blur of width ``sigma``: ``ceil(6 sigma) + 1 - (ceil(6 sigma) mod 2)``."""
    _require_sigma(sigma)
    six_sigma = math.ceil(6 * sigma)
    return six_sigma + 1 - six_sigma % 2


def _gaussian_kernel_1d(kernel_size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """Normalised samples of ``exp(-x^2 / 2 sigma^2)`` at the integer offsets of an odd kernel (float32)."""
    half_width = (kernel_size - 1) / 2
    offsets = torch.linspace(-half_width, half_width, kernel_size, dtype=torch.float32, device=device)
    if sigma == 0:
        # The sigma -> 0 limit is a delta; the formula itself would give 0/0.
        return (offsets == 0).to(torch.float32)
    density = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return density / density.sum()


def _separable_blur(grid: torch.Tensor, kernel_h: torch.Tensor, kernel_w: torch.Tensor) -> torch.Tensor:
    """Depthwise 2-D convolution of (N, C, H, W) with the outer product of two 1-D kernels, reflect-padded."""
    n, c, h, w = grid.shape
    planes = grid.reshape(n * c, 1, h, w)
    pad_h, pad_w = kernel_h.numel() // 2, kernel_w.numel() // 2
    padded = F.pad(planes, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    blurred = F.conv2d(padded, kernel_h.view(1, 1, -1, 1))
    blurred = F.conv2d(blurred, kernel_w.view(1, 1, 1, -1))
    return blurred.reshape(n, c, h, w)


def _clip_kernel_to_side(kernel_size: int, side: int) -> int:
    # SEG's reference keeps the kernel no longer than the side (odd side) or side + 1 (even side),
    # so that the reflect padding (half the kernel) stays smaller than the side.
    return min(kernel_size, side - (side % 2 - 1))


def gaussian_blur_2d(grid: torch.Tensor, sigma: float) -> torch.Tensor:
    """SEG's Gaussian blur of every channel of a (N, C, H, W) grid (Hong, arXiv:2408.00760).

    Kernel size ``seg_kernel_size(sigma)``, clipped per axis to that axis' length as the reference
    clips it for its square grid; separable, reflect padding, computed in float32.
    """
    if grid.ndim != 4:
        raise ValueError(f"gaussian_blur_2d takes a (N, C, H, W) grid, got shape {tuple(grid.shape)}")
    kernel_size = seg_kernel_size(sigma)
    height, width = grid.shape[-2:]
    kernel_h = _gaussian_kernel_1d(_clip_kernel_to_side(kernel_size, height), sigma, grid.device)
    kernel_w = _gaussian_kernel_1d(_clip_kernel_to_side(kernel_size, width), sigma, grid.device)
    return _separable_blur(grid.float(), kernel_h, kernel_w).to(grid.dtype)


def smooth_queries(
    q: torch.Tensor,
    grid_hw: tuple[int, int],
    sigma: float,
    image_token_start: int = 0,
    infinite_sigma: float = 9999.0,
    frames: int = 1,
) -> torch.Tensor:
    """SEG's perturbation: Gaussian-blur the self-attention queries over the image's token grid.

    Hong, *Smoothed Energy Guidance*, NeurIPS 2024, arXiv:2408.00760: blurring the queries
    along the token grid blurs the attention logits ``Q K^T`` by the same kernel, which lowers the
    curvature of the attention energy. Tokens ``[image_token_start, image_token_start + frames*H*W)``
    on axis -2 of ``q`` (``(..., L, C)``) are ``frames`` row-major H x W grids, one after the other (a
    video's frames); each frame is blurred on its own, in space only, as the paper blurs an image. Other
    tokens (text tokens in joint attention) pass through unchanged. At ``sigma >= infinite_sigma`` the
    blur is its limit: every image query becomes its frame's mean (per leading index and channel).
    SEG-SDXL tests ``sigma > 9999``, so the two thresholds disagree only at sigma exactly 9999.
    """
    height, width = grid_hw
    if height < 1 or width < 1 or frames < 1:
        raise ValueError(f"grid_hw must be two positive sizes (H, W) and frames ≥ 1, got {grid_hw!r}, {frames}")
    if q.ndim < 2:
        raise ValueError(f"q must be shaped (..., tokens, channels), got shape {tuple(q.shape)}")
    num_tokens = q.shape[-2]
    frame_tokens = height * width
    image_token_end = image_token_start + frames * frame_tokens
    if image_token_start < 0 or image_token_end > num_tokens:
        raise ValueError(
            f"{frames} frame(s) of an {height}x{width} grid ({frames * frame_tokens} tokens) starting at token "
            f"{image_token_start} do not fit in q's {num_tokens} tokens (q shape {tuple(q.shape)})"
        )
    image_queries = q[..., image_token_start:image_token_end, :].float()
    per_frame = image_queries.unflatten(-2, (frames, frame_tokens))  # (..., frames, H*W, C)
    if sigma >= infinite_sigma:
        smoothed = per_frame.mean(dim=-2, keepdim=True).expand_as(per_frame)
    else:
        channels = q.shape[-1]
        grid = per_frame.reshape(-1, frame_tokens, channels).transpose(1, 2)
        grid = grid.reshape(-1, channels, height, width)
        blurred = gaussian_blur_2d(grid, sigma)
        smoothed = blurred.reshape(-1, channels, frame_tokens).transpose(1, 2).reshape(per_frame.shape)
    smoothed = smoothed.flatten(-3, -2)
    return torch.cat(
        [q[..., :image_token_start, :], smoothed.to(q.dtype), q[..., image_token_end:, :]], dim=-2
    )


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int | None = None) -> torch.Tensor:
    """The attention map ``softmax(Q K^T / sqrt(d))``, shaped (B, heads, Lq, Lk), in float32.

    Takes (B, heads, L, D) tensors, or (B, L, heads*D) with ``heads`` given (ComfyUI's attn1 layout).
    """
    if heads is not None:
        if q.ndim != 3 or k.ndim != 3 or q.shape[-1] % heads or k.shape[-1] % heads:
            raise ValueError(
                f"with heads={heads}, q and k must be (B, L, heads*D) with the channels divisible by heads; "
                f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        q = q.reshape(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)
        k = k.reshape(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)
    elif q.ndim != 4 or k.ndim != 4:
        raise ValueError(
            f"q and k must be (B, heads, L, D), or (B, L, heads*D) with heads given; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    head_dim = q.shape[-1]
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * head_dim**-0.5
    return logits.softmax(dim=-1)


def sag_grid_hw(num_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a UNet's token grid with ``num_tokens`` tokens for a latent of ``latent_hw``.

    Searches the divisors of ``num_tokens`` nearest to the height the latent's aspect ratio implies,
    in the order ComfyUI's ``SelfAttentionGuidance`` searches them, so both pick the same grid. Where
    ComfyUI's search gives up (no divisor within ``sqrt(num_tokens) / 2`` of the guess), this one goes on.
    """
    latent_h, latent_w = latent_hw
    if num_tokens < 1 or latent_h < 1 or latent_w < 1:
        raise ValueError(f"need num_tokens >= 1 and a positive latent size; got {num_tokens}, {latent_hw!r}")
    guess = round(math.sqrt(latent_h / latent_w * num_tokens))
    for distance in range(num_tokens + guess):
        for height in (guess + distance, max(1, guess - distance)):
            if num_tokens % height == 0:
                return height, num_tokens // height
    raise AssertionError("unreachable: 1 divides every num_tokens")


def sag_attention_mask(
    attn_probs: torch.Tensor,
    grid_hw: tuple[int, int],
    latent_hw: tuple[int, int],
    threshold: float = 1.0,
) -> torch.Tensor:
    """SAG's mask of the salient tokens, upsampled to the latent: (B, 1, H, W) of 0.0 / 1.0.

    Hong, Lee, Jang, Kim, *Improving Sample Quality of Diffusion Models Using Self-Attention
    Guidance*, ICCV 2023, arXiv:2210.00939: average the map over heads, sum over the
    queries to get the attention each key receives, and keep the keys above ``threshold``. Each
    row of the map sums to 1, so the default 1.0 means "more than the average key". The grid is
    row-major (h, w) and upsampled by nearest neighbour.
    """
    if attn_probs.ndim != 4:
        raise ValueError(f"attn_probs must be (B, heads, Lq, Lk), got shape {tuple(attn_probs.shape)}")
    batch, _, _, num_keys = attn_probs.shape
    grid_h, grid_w = grid_hw
    if grid_h * grid_w != num_keys:
        raise ValueError(
            f"grid_hw {grid_hw!r} holds {grid_h * grid_w} tokens but the attention map has {num_keys} keys"
        )
    attention_received = attn_probs.float().mean(dim=1).sum(dim=1)
    salient = (attention_received > threshold).to(torch.float32).reshape(batch, 1, grid_h, grid_w)
    return F.interpolate(salient, size=tuple(latent_hw), mode="nearest")


def sag_blur(x0: torch.Tensor, mask: torch.Tensor, blur_sigma: float, kernel_size: int = 9) -> torch.Tensor:
    """SAG's degraded image: ``blur(x0) * mask + x0 * (1 - mask)`` (arXiv:2210.00939).

    ``x0`` is the predicted clean latent (B, C, H, W); the blur acts on its last two axes with a
    fixed ``kernel_size`` (9, as in ComfyUI's ``SelfAttentionGuidance`` and the diffusers pipeline)
    and the given sigma, reflect-padded. ``mask`` broadcasts to ``x0``. ``blur_sigma = 0`` leaves
    ``x0`` unchanged (the blur's limit; ComfyUI's node gives NaN there).
    """
    _require_sigma(blur_sigma)
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
    if x0.ndim < 3:
        raise ValueError(f"x0 must be (B, C, H, W), got shape {tuple(x0.shape)}")
    height, width = x0.shape[-2:]
    if min(height, width) <= kernel_size // 2:
        raise ValueError(
            f"SAG's {kernel_size}-tap blur needs both latent sides > {kernel_size // 2} (reflect padding); "
            f"got {height}x{width}. ComfyUI skips SAG for latents this small."
        )
    kernel = _gaussian_kernel_1d(kernel_size, blur_sigma, x0.device)
    x0_float = x0.float()
    blurred = _separable_blur(x0_float.reshape(-1, 1, height, width), kernel, kernel).reshape(x0.shape)
    mask = mask.float()
    return (blurred * mask + x0_float * (1 - mask)).to(x0.dtype)


# --- attention rules on an attention call's token grid ------------------------------------------------
# Each takes q, k, v as (B, heads, L, D), the call's TokenGrid (or None when the image tokens could not be
# found) and ``attend(q, k, v)``, the host's normal attention, and returns the attention output.

def _require_grid(grid, method: str, tokens: int):
    if grid is None:
        raise ValueError(f"{method}: could not find the image tokens among the {tokens} tokens of this "
                         "attention call; choose another layer.")


def _own_tokens(q, k, v):
    """k, v cut to the queries' own tokens. A self-attention whose keys are the queries' tokens followed by
    others (Stable Cascade's AttnBlock attends from its image tokens to [image tokens; text tokens]) has as
    identity map the one that gives those other keys weight 0: each query attends to its own token only."""
    return k[..., : q.shape[-2], :], v[..., : q.shape[-2], :]


def identity_image_attention(q, k, v, grid, attend):
    """PAG's perturbation on the image tokens (Ahn et al. 2024, arXiv:2403.17377, Eq. 9-10: the perturbed
    self-attention map is I, so the output is V): the image rows of the output are their own V; text tokens
    of joint attention keep their normal attention (their rows of the map are untouched). Keys after the
    queries' own tokens weigh 0 (``_own_tokens``)."""
    _require_grid(grid, "PAG", q.shape[-2])
    if grid.start == 0 and grid.image_slice.stop == q.shape[-2]:
        return identity_attention(q, *_own_tokens(q, k, v))
    out = attend(q, k, v).clone()
    out[..., grid.image_slice, :] = v[..., grid.image_slice, :]
    return out


def smoothed_energy_attention(q, k, v, grid, attend, blur_sigma: float):
    """SEG's perturbation (Hong 2024, arXiv:2408.00760, §3.3: blurring the queries blurs the attention
    energy): the image tokens' queries are Gaussian-blurred over the grid's height × width (each video frame
    on its own), then attended as usual."""
    _require_grid(grid, "SEG", q.shape[-2])
    smoothed = smooth_queries(q, (grid.height, grid.width), blur_sigma, image_token_start=grid.start,
                              frames=grid.frames)
    return attend(smoothed, k, v)


def identity_all_attention(q, k, v, grid, attend):
    """SLG's ``attention_scores`` mode (diffusers' skip_attention_scores): attention returns V (of the queries'
    own tokens, ``_own_tokens``)."""
    return identity_attention(q, *_own_tokens(q, k, v))


def record_attention(q, k, v, grid, attend):
    """SAG's observer: the normal attention output, and the attention map it came from."""
    probabilities = attention_probabilities(q, k)
    return torch.matmul(probabilities.to(v.dtype), v), probabilities
