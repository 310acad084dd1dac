"""Shared fixtures for the core tests: latent shapes, dtypes and seeded random predictions.

Use the fixtures, not imports from this file:

    def test_something(shape, rand_pair):
        cond, uncond = rand_pair(shape, torch.float32, seed=0)
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

# Image latents (B, C, H, W) and video latents (B, C, T, H, W), batch 1 and 3; the last one has
# unequal, non-power-of-two sizes so a wrong reduction dim or a transposed view cannot go unnoticed.
SHAPES = [(1, 4, 8, 8), (3, 4, 8, 8), (1, 4, 3, 8, 8), (3, 16, 2, 6, 10)]
LOW_PRECISION_DTYPES = [torch.bfloat16, torch.float16]
DTYPES = [torch.float32, *LOW_PRECISION_DTYPES]


def _shape_id(shape: tuple[int, ...]) -> str:
    return "x".join(str(size) for size in shape)


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.fixture(params=SHAPES, ids=_shape_id)
def shape(request: pytest.FixtureRequest) -> tuple[int, ...]:
    """A latent shape: 4-D image or 5-D video, batch 1 or 3."""
    return request.param


@pytest.fixture(params=DTYPES, ids=_dtype_id)
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """float32, bfloat16 or float16."""
    return request.param


@pytest.fixture(params=LOW_PRECISION_DTYPES, ids=_dtype_id)
def low_precision_dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """bfloat16 or float16: the dtypes whose results are compared loosely against float32."""
    return request.param


def make_rand_tensor(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """A standard-normal tensor, drawn in float32 from its own generator and then cast to ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)


def make_rand_pair(
    shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``(cond, uncond)`` pair that looks like two predictions of the same step.

    Both share a common component (real cond/uncond predictions are strongly correlated) plus their own
    noise and a per-channel offset, so projections, norms and stds are all non-trivial. Drawn in float32
    and cast, so the same seed gives the same values (up to rounding) in every dtype.
    """
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(shape, generator=generator)
    cond_noise = torch.randn(shape, generator=generator)
    uncond_noise = torch.randn(shape, generator=generator)
    channel_offset_shape = (shape[0], shape[1], *([1] * (len(shape) - 2)))
    cond_offset = 0.3 * torch.randn(channel_offset_shape, generator=generator)
    cond = shared + 0.4 * cond_noise + cond_offset
    uncond = shared + 0.4 * uncond_noise
    return cond.to(dtype), uncond.to(dtype)


@pytest.fixture
def rand_tensor() -> Callable[..., torch.Tensor]:
    """``rand_tensor(shape, dtype=torch.float32, seed=0)`` -> a seeded standard-normal tensor."""
    return make_rand_tensor


@pytest.fixture
def rand_pair() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``rand_pair(shape, dtype=torch.float32, seed=0)`` -> a seeded, correlated ``(cond, uncond)`` pair."""
    return make_rand_pair
