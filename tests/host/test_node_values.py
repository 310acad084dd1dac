"""Value-level tests of GuidersAutoguidance, GuidersRescaleCFG and GuidersSEG against references written here
from each method's paper, through ComfyUI's real sampling (KSampler) on tiny random-weight models.

Each test was checked against a deliberate one-line break of the node (applied, run, seen to fail, reverted);
its docstring names the break and the error measured under it. The standard is test_node_parity's
``assert_parity``: ours equals the reference to 1e-4 of max|reference|, and the reference is > 1e-2 away from
plain CFG so a node that did nothing could not pass.
"""

from __future__ import annotations

import contextlib
import math

import comfy.model_patcher
import comfy.samplers
import pytest
import torch
from comfy.ldm.modules.attention import optimized_attention
from references import perturbed_pass_reference
from support import CFG, MIN_EFFECT, assert_parity, node, relative_error, sample_family


def run(model, family: str, h: int = 16, w: int = 16, cfg: float = CFG):
    return sample_family(model, family, cfg=cfg, h=h, w=w)


@pytest.fixture(autouse=True)
def _pack(guiders_pack):
    return guiders_pack


# ---------------------------------------------------------------------------------------------------------
# Autoguidance (Karras et al. 2024, arXiv:2406.02507)


def autoguidance_reference(model, weak_model, scale: float):
    """Karras et al. 2024 Eq. 1 added to CFG: ``guided = CFG + s·(D_1(x) − D_0(x))``, D_1 the model's cond
    x0 prediction and D_0 the weak model's cond prediction on the same input, prompt and sigma."""

    def post_cfg(args):
        options = dict(weak_model.model_options)
        options["transformer_options"] = dict(options.get("transformer_options", {}))
        (weak_x0,) = comfy.samplers.calc_cond_batch(
            weak_model.model, [args["cond"]], args["input"], args["sigma"], options)
        return args["denoised"] + scale * (args["cond_denoised"] - weak_x0)

    reference = model.clone()
    reference.set_model_sampler_post_cfg_function(post_cfg)
    return reference


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_autoguidance_adds_scaled_cond_minus_weak_to_cfg(tiny_model, weak_model_of, family: str) -> None:
    """Fails if the term's sign is flipped (``_scale_schedule(-scale, schedule)`` in GuidersAutoguidance, i.e.
    cond − s·(cond − weak)): measured error 1.3 (sd15), 1.0 (sd3). Unbroken: 8.0e-7 (sd15), 4.2e-7 (sd3);
    reference effect vs plain CFG 1.2 (sd15), 0.70 (sd3)."""
    model, weak = tiny_model(family), weak_model_of(family)
    ours = node("GuidersAutoguidance", model=model, weak_model=weak, scale=2.0, start_percent=0.0, end_percent=1.0)
    reference = autoguidance_reference(model, weak, scale=2.0)

    weak.pre_run()  # the weak model current while the reference runs it, as ComfyUI's sampling does its models
    try:
        reference_out = run(reference, family)
    finally:
        weak.cleanup()
    assert_parity(run(ours, family), reference_out, run(model, family))


# ---------------------------------------------------------------------------------------------------------
# Rescaled CFG (Lin et al. 2023, arXiv:2305.08891, Alg. 2), in noise space


def rescale_cfg_reference(model, multiplier: float):
    """Alg. 2 on the noise predictions ComfyUI hands sampler_cfg_function (``cond``/``uncond`` = x − x0):
    CFG, then per-sample std rescale to the cond's, mixed by φ. Returns x − x0_guided."""

    def cfg_function(args):
        cond, uncond, w = args["cond"].double(), args["uncond"].double(), args["cond_scale"]
        noise_cfg = uncond + w * (cond - uncond)
        dims = tuple(range(1, cond.ndim))
        std_cond = cond.std(dim=dims, keepdim=True)
        std_cfg = noise_cfg.std(dim=dims, keepdim=True)
        rescaled = noise_cfg * (std_cond / std_cfg)
        return (multiplier * rescaled + (1 - multiplier) * noise_cfg).to(args["cond"].dtype)

    reference = model.clone()
    reference.set_model_sampler_cfg_function(cfg_function)
    return reference


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_rescale_cfg_rescales_the_noise_prediction(tiny_model, family: str) -> None:
    """Fails if the node rescales in x0 space (``space="x0"`` in GuidersRescaleCFG): measured error
    2.0e-1 (sd15, EPS), 3.2e-1 (sd3, flow). Unbroken: 3.4e-7 (sd15), 5.5e-7 (sd3); reference effect vs plain
    CFG 0.23 (sd15), 0.51 (sd3)."""
    model = tiny_model(family)
    ours = node("GuidersRescaleCFG", model=model, multiplier=0.7)
    reference = rescale_cfg_reference(model, multiplier=0.7)

    assert_parity(run(ours, family), run(reference, family), run(model, family))


# ---------------------------------------------------------------------------------------------------------
# SEG (Hong 2024, arXiv:2408.00760) on a UNet with a non-square latent


def blur_matrix(side: int, sigma: float) -> torch.Tensor:
    """The (side, side) matrix of a 1-D Gaussian blur with reflect padding: row i holds the weights of the
    taps i − r .. i + r, reflected into [0, side). Kernel: ceil(6σ) + 1, made odd, no longer than the side
    (odd side) or side + 1 (even side), so the reflection stays within one bounce."""
    size = math.ceil(6 * sigma) + 1
    if size % 2 == 0:
        size += 1
    size = min(size, side if side % 2 else side + 1)
    radius = size // 2
    weights = [math.exp(-(offset * offset) / (2 * sigma * sigma)) for offset in range(-radius, radius + 1)]
    total = sum(weights)
    matrix = torch.zeros(side, side, dtype=torch.float64)
    for i in range(side):
        for offset, weight in zip(range(-radius, radius + 1), weights, strict=True):
            j = i + offset
            j = -j if j < 0 else (2 * (side - 1) - j if j >= side else j)
            matrix[i, j] += weight / total
    return matrix


def blur_queries(q: torch.Tensor, h: int, w: int, sigma: float) -> torch.Tensor:
    """q (B, h·w, C), row-major tokens, blurred over the (h, w) grid: B_h · Q · B_wᵀ per channel."""
    b, tokens, channels = q.shape
    assert tokens == h * w, (tokens, h, w)
    grid = q.double().reshape(b, h, w, channels)
    blurred = torch.einsum("ih,bhwc,jw->bijc", blur_matrix(h, sigma), grid, blur_matrix(w, sigma))
    return blurred.reshape(b, tokens, channels).to(q.dtype)


def seg_middle_block_pass(grid_hw: tuple[int, int], sigma: float, calls: list):
    """The perturbed pass: the UNet middle block's self-attention runs on queries blurred over the token grid
    (an attn1 replace patch on ("middle", 0), as the built-in PAG node sets its own)."""

    def smoothed_attention(q, k, v, extra_options, mask=None):
        calls.append(q.shape)
        return optimized_attention(blur_queries(q, *grid_hw, sigma), k, v, extra_options["n_heads"])

    @contextlib.contextmanager
    def perturbed(diffusion_model, model_options):
        yield comfy.model_patcher.set_model_options_patch_replace(
            dict(model_options), smoothed_attention, "attn1", "middle", 0)

    return perturbed


@pytest.mark.parametrize(("h", "w"), [(16, 24), (24, 16)])
@pytest.mark.parametrize("blur_sigma", [2.0, 3.0])
def test_seg_on_a_non_square_unet_latent_blurs_queries_over_the_token_grid(
    tiny_model, h: int, w: int, blur_sigma: float
) -> None:
    """Fails if the token grid's height and width are swapped (``TokenGrid(start, w, h, frames)`` in
    nodes/host/routing.grid_for, or ``(grid.width, grid.height)`` in smoothed_energy_attention; both breaks gave
    the same numbers): measured error 2.9e-2 / 2.4e-2 (σ 2, 16x24 / 24x16), 1.8e-2 / 2.1e-2 (σ 3). Unbroken:
    1.3e-6 .. 2.0e-6; reference effect vs plain CFG 0.12 .. 0.13. The reference on the transposed grid is
    checked to differ from the reference too, so the test keeps discriminating the two."""
    model = tiny_model("sd15")
    # The tiny SD1.5 UNet downsamples once before its middle block: a (h/2, w/2) token grid there.
    grid_hw = (h // 2, w // 2)
    calls: list = []
    ours = node("GuidersSEG", model=model, scale=3.0, blur_sigma=blur_sigma, layers="middle",
                start_percent=0.0, end_percent=1.0)
    reference = perturbed_pass_reference(model, seg_middle_block_pass(grid_hw, blur_sigma, calls), scale=3.0)

    transposed = perturbed_pass_reference(model, seg_middle_block_pass(grid_hw[::-1], blur_sigma, []), scale=3.0)

    reference_out = run(reference, "sd15", h=h, w=w)
    assert calls and all(shape[1] == grid_hw[0] * grid_hw[1] for shape in calls), calls
    transposed_effect = relative_error(run(transposed, "sd15", h=h, w=w), reference_out)
    assert transposed_effect > MIN_EFFECT, f"the grid's orientation barely matters ({transposed_effect:.2e})"
    assert_parity(run(ours, "sd15", h=h, w=w), reference_out, run(model, "sd15", h=h, w=w))
