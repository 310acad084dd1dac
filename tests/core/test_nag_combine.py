"""NAG's combination (guidance_core/nag.py) against a reference written here, token by token, from the paper's
equations (Chen et al. 2025, arXiv:2505.21179, §3), and its properties.

Breaks tried (each makes a test below fail): Z⁺ and Z⁻ swapped in the extrapolation; the τ cap dropped; the L2
norm instead of L1; the norm over the token axis instead of the features; the blend's α and 1 − α swapped.
"""

from __future__ import annotations

import pytest
import torch

from guidance_core.nag import nag_combine


def reference_nag(z_pos: torch.Tensor, z_neg: torch.Tensor, phi: float, tau: float, alpha: float) -> torch.Tensor:
    """The paper's four steps, one token at a time, in float64 (no vectorised shortcut shared with the code)."""
    out = torch.empty_like(z_pos, dtype=torch.float64)
    flat_pos = z_pos.double().reshape(-1, z_pos.shape[-1])
    flat_neg = z_neg.double().reshape(-1, z_neg.shape[-1])
    flat_out = out.view(-1, z_pos.shape[-1])
    for i in range(flat_pos.shape[0]):
        zp, zn = flat_pos[i], flat_neg[i]
        z_tilde = zp + phi * (zp - zn)
        ratio = float(sum(abs(float(a)) for a in z_tilde)) / float(sum(abs(float(a)) for a in zp))
        z_hat = z_tilde * (min(ratio, tau) / ratio)
        flat_out[i] = alpha * z_hat + (1 - alpha) * zp
    return out


def tensors(seed=0, shape=(2, 5, 12)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize(("phi", "tau", "alpha"), [(4.0, 2.5, 0.25), (1.0, 100.0, 0.5), (10.0, 1.0, 1.0),
                                                    (0.5, 1.2, 0.75)])
def test_matches_the_paper_token_by_token(phi, tau, alpha):
    """Catches: Z⁺/Z⁻ swapped, the cap dropped (τ 1 and 2.5 cases), L2 for L1, the norm over tokens, α swapped."""
    z_pos, z_neg = tensors()
    expected = reference_nag(z_pos, z_neg, phi, tau, alpha)
    got = nag_combine(z_pos, z_neg, phi, tau, alpha)
    assert torch.allclose(got.double(), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, z_pos, atol=1e-3)  # the case guides at all


def test_tau_caps_the_norm_ratio():
    """‖Ẑ‖₁/‖Z⁺‖₁ ≤ τ at every token (α = 1 shows Ẑ itself), and where the cap bites it equals τ."""
    z_pos, z_neg = tensors(1)
    tau = 1.5
    guided = nag_combine(z_pos, z_neg, 8.0, tau, 1.0)
    ratio = guided.abs().sum(-1) / z_pos.abs().sum(-1)
    assert (ratio <= tau + 1e-5).all()
    assert torch.isclose(ratio, torch.full_like(ratio, tau), atol=1e-5).any()  # the cap is reached somewhere


def test_identities():
    """φ = 0 and α = 0 leave Z⁺; Z⁻ = Z⁺ leaves Z⁺ (an empty negative equal to the positive does nothing)."""
    z_pos, z_neg = tensors(2)
    assert torch.equal(nag_combine(z_pos, z_neg, 0.0, 2.5, 0.25), z_pos)
    assert torch.equal(nag_combine(z_pos, z_neg, 5.0, 2.5, 0.0), z_pos)
    assert torch.allclose(nag_combine(z_pos, z_pos.clone(), 5.0, 2.5, 0.25), z_pos, atol=1e-6)


def test_zero_tokens_stay_finite_and_dtype_is_kept():
    z_pos, z_neg = tensors(3)
    z_pos[0, 0] = 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        out = nag_combine(z_pos.to(dtype), z_neg.to(dtype), 5.0, 2.5, 0.25)
        assert out.dtype == dtype and torch.isfinite(out).all()


def test_norm_is_per_token_over_all_heads():
    """Scaling one token's Z⁺ and Z⁻ together scales only that token's output: the ratio is per token."""
    z_pos, z_neg = tensors(4)
    base = nag_combine(z_pos, z_neg, 5.0, 2.5, 0.25)
    z_pos2, z_neg2 = z_pos.clone(), z_neg.clone()
    z_pos2[1, 3] *= 7
    z_neg2[1, 3] *= 7
    moved = nag_combine(z_pos2, z_neg2, 5.0, 2.5, 0.25)
    assert torch.allclose(moved[1, 3], 7 * base[1, 3], atol=1e-4)
    mask = torch.ones(z_pos.shape[:2], dtype=torch.bool)
    mask[1, 3] = False
    assert torch.equal(moved[mask], base[mask])
