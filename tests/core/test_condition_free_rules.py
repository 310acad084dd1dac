"""guidance_core.condition_free (TPG, TSG, ICG) against the papers' definitions written here.

Breaks shown to fail (each tried): the permutation's seed ignoring the step key, the shuffled tokens written
from position 0 instead of ``start`` (over the text tokens), TSG's noise not scaled by the embedding's std,
ICG keeping the embedding's content (y + std·n), the perturbation term's sign flipped.
"""

from __future__ import annotations

import torch

from guidance_core.condition_free import (
    guided_prediction,
    independent_condition,
    noised_time_embedding,
    shuffle_tokens,
    token_permutation,
)


def test_token_permutation_is_a_seeded_permutation_fresh_per_key() -> None:
    first = token_permutation(64, 3, 0, "input", 7, 2)
    assert torch.equal(first.sort().values, torch.arange(64))
    assert torch.equal(first, token_permutation(64, 3, 0, "input", 7, 2))  # reproducible
    assert not torch.equal(first, token_permutation(64, 3, 1, "input", 7, 2))  # another step
    assert not torch.equal(first, token_permutation(64, 3, 0, "input", 7, 3))  # another block
    assert not torch.equal(first, token_permutation(64, 4, 0, "input", 7, 2))  # another seed


def test_shuffle_tokens_is_a_permutation_matrix_on_the_image_tokens() -> None:
    """TPG's x ↦ P x on the token axis (arXiv:2506.10036 §3): token start + i takes token start + p[i]; the
    tokens before ``start`` (a joint sequence's text) stay; norms and the image tokens' mean are kept."""
    hidden = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(0))
    permutation = token_permutation(7, 0, 1)
    out = shuffle_tokens(hidden, permutation, start=3)
    expected = hidden.clone()
    for i in range(7):
        expected[:, 3 + i] = hidden[:, 3 + int(permutation[i])]
    assert torch.equal(out, expected)
    assert torch.equal(out[:, :3], hidden[:, :3])
    assert torch.allclose(out.norm(dim=-1).sort(dim=1).values, hidden.norm(dim=-1).sort(dim=1).values)
    assert torch.allclose(out[:, 3:].mean(dim=1), hidden[:, 3:].mean(dim=1), atol=1e-6)


def test_noised_time_embedding_adds_noise_relative_to_its_spread() -> None:
    """t̃_emb = t_emb + s·std(t_emb)·n, the std per sample (arXiv:2407.02687 §4)."""
    embedding = torch.randn(3, 16, generator=torch.Generator().manual_seed(1)) * torch.tensor([[1.0], [5.0], [0.1]])
    noise = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    out = noised_time_embedding(embedding, noise, 0.5)
    for i in range(3):
        expected = embedding[i].double() + 0.5 * embedding[i].double().std() * noise[i].double()
        assert torch.allclose(out[i].double(), expected, atol=1e-6)
    assert torch.equal(noised_time_embedding(embedding, noise, 0.0), embedding)


def test_independent_condition_is_gaussian_at_the_embedding_scale_and_independent_of_it() -> None:
    """ICG's ŷ (arXiv:2407.02687 §3): std(y)·n, n ~ N(0, I) of y's shape; nothing of y but its scale."""
    y = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(3)) * 4.0 + 1.0
    noise = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(4))
    out = independent_condition(y, noise)
    assert torch.allclose(out.double(), y.double().std() * noise.double(), atol=1e-5)
    other = independent_condition(torch.randn_like(y) * float(y.std()), noise)
    assert torch.allclose(out, other, rtol=2e-2)  # another y of the same scale: the same ŷ


def test_guided_prediction_is_cfg_plus_the_perturbation_term() -> None:
    """D_u + w(D_c − D_u) + s(D_c − D_p); without an uncond, D_c + s(D_c − D_p) (TPG, TSG)."""
    cond, uncond, perturbed = torch.tensor([1.0]), torch.tensor([0.25]), torch.tensor([0.5])
    assert torch.allclose(guided_prediction(cond, uncond, perturbed, 5.0, 3.0), torch.tensor([0.25 + 5 * 0.75 + 1.5]))
    assert torch.allclose(guided_prediction(cond, None, perturbed, 5.0, 3.0), torch.tensor([1.0 + 1.5]))
