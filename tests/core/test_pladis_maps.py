"""guidance_core.pladis: the sparse maps against their definitions, and PLADIS Eq. 7's linearity.

α-entmax(z) is the p on the simplex with p_i = [(α − 1)z_i − τ]_+^{1/(α−1)} for one τ (Peters et al. 2019,
Eq. 9): checked by solving τ back from the output's largest entry. Breaks caught: sparsemax's threshold off (``- 1``
→ ``- 1.1``) or entmax1.5's taken with ``+ sqrt``: the definition check and the bisection comparison fail.
"""

from __future__ import annotations

import pytest
import torch

from guidance_core.pladis import entmax, entmax_bisect, pladis_combine, sparse_attention


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.25, 1.8])
def test_entmax_is_the_definitions_thresholded_power(alpha):
    z = torch.randn(5, 3, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 4
    p = entmax(z, alpha)
    assert torch.allclose(p.sum(-1), torch.ones(5, 3, dtype=torch.float64), atol=1e-9)
    top = z.argmax(-1, keepdim=True)
    tau = (alpha - 1) * z.gather(-1, top) - p.gather(-1, top) ** (alpha - 1)
    expected = ((alpha - 1) * z - tau).clamp_min(0) ** (1 / (alpha - 1))
    assert torch.allclose(p, expected, atol=1e-7)
    assert (p == 0).any(), "no zero weight: not sparse"


def test_exact_maps_equal_the_bisection_and_follow_dim():
    z = torch.randn(4, 9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for alpha in (1.5, 2.0):
        assert torch.allclose(entmax(z, alpha), entmax_bisect(z, alpha), atol=1e-10)
        assert torch.allclose(entmax(z, alpha, dim=1), entmax(z.transpose(1, 2), alpha).transpose(1, 2))
    assert torch.allclose(entmax(z, 1.0), z.softmax(-1))


def test_pladis_at_alpha_1_is_the_dense_attention_and_lambda_0_the_model():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=g) for _ in range(3))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(sparse_attention(q, k, v, 1.0), dense, atol=1e-5)
    sparse = sparse_attention(q, k, v, 1.5)
    assert torch.equal(pladis_combine(dense, sparse, 0.0), dense)
    assert torch.allclose(pladis_combine(dense, sparse, 2.0), 2 * sparse - dense, atol=1e-6)
