"""The accumulation-dtype policy: in which dtype the rules' reductions (norms, standard deviations, dot
products) and the rescaled results run, chosen from the tensor's device in this one place.

- float64 where the device has it (CPU, CUDA, ROCm, XPU, meta, ...): the reductions are per-sample sums over
  one latent, a few thousand to a few million elements per step, so their cost is nothing next to a forward
  even where float64 runs at a fraction of the float32 rate (consumer GPUs).
- float32 where the device has no float64 at all: Apple's MPS ("Cannot convert a MPS Tensor to float64
  dtype") and DirectML (``privateuseone``, "The GPU device does not support Double (Float64)
  operations!"). A float64 upcast there is an error, not a slowdown.

Half-precision inputs are always widened: float16/bfloat16 sums of a latent lose digits. The float32 path
uses the same guards as the float64 one, and both compute every norm and std ratio on inputs divided by
their largest magnitude (``unit_and_peak``): such a ratio is scale-invariant, so a tensor of subnormal values
no longer gives a subnormal denominator whose quotient overflows to inf (the numerics note in ``rules``),
and the two paths agree to float32 rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DEVICE_TYPES_WITHOUT_FLOAT64", "accumulation_dtype", "has_no_float64", "unit_and_peak"]

# torch device types whose backends cannot compute in float64 (DirectML's torch device type is
# ``privateuseone``; another out-of-tree backend under that name loses only precision it has no use for).
DEVICE_TYPES_WITHOUT_FLOAT64 = frozenset({"mps", "privateuseone"})


def has_no_float64(device: torch.device) -> bool:
    """Whether tensors on ``device`` cannot be float64."""
    return torch.device(device).type in DEVICE_TYPES_WITHOUT_FLOAT64


def accumulation_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype the rules accumulate ``tensor``'s reductions in: float64, or float32 on a device without
    float64 (see the module docstring)."""
    return torch.float32 if has_no_float64(tensor.device) else torch.float64


def unit_and_peak(x: Tensor, per_sample: bool = True) -> tuple[Tensor, Tensor]:
    """``x`` as ``unit * peak``: ``peak`` is max|x| per sample (shaped ``(B, 1, ...)``) or of the whole
    tensor (a 0-d tensor), 1 where ``x`` is all zero, and ``unit``'s largest magnitude is 1 (or it is 0).

    A norm or std of ``unit`` lies in [max/√N, √N] whatever the scale of ``x``, so ratios of them neither
    overflow nor underflow; the peaks carry the scale and are applied to the result last.
    """
    if per_sample:
        peak = x.abs().reshape(x.shape[0], -1).amax(dim=1).reshape(x.shape[0], *([1] * (x.ndim - 1)))
    else:
        peak = x.abs().amax()
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    return x / peak, peak
