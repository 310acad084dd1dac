"""The accumulation-dtype policy (guidance_core/numerics.py) on a device without float64, simulated on the CPU.

``float32_device`` makes the policy's device check answer "no float64" for every device, as it does for MPS;
``no_float64()`` makes every torch call that produces a float64 tensor (``.double()``, ``.to(torch.float64)``,
``dtype=torch.float64``, ...) raise, as the MPS backend does. Every rule of rules.py must then give finite
results equal to the float64 path (the default policy on the CPU, the independent reference here) to float32
rounding, on ordinary inputs, on subnormal ones (the numerics note in rules.py), on all-zero inputs and on
``cond == uncond``.

Breaks these tests catch (each tried on a copy of the worktree):
- one ``.double()`` put back in rules.py (``_unit_norm`` taking ``torch.linalg.vector_norm(unit.double())``):
  test_every_rule_runs_without_float64 fails with "float64 on a device without it";
- ``has_no_float64`` answering False for "mps": test_devices_without_float64_accumulate_in_float32 fails;
- the peak rescaling taken out of ``unit_and_peak`` (``return x, torch.ones_like(peak)``): the subnormal cases
  give inf/NaN under the float32 policy and test_every_rule_runs_without_float64 fails;
- ``_gaussian_kernel_1d`` creating its offsets without ``device=``: test_core_functions_create_on_their_inputs_device
  fails (the kernel is on the CPU, the grid on meta).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode

from guidance_core import numerics, perturb
from guidance_core.plan import COND, UNCOND, GuidanceStack, StepContext
from guidance_core.rules import (
    MomentumBuffer,
    apg,
    base_norm,
    cfg,
    cfg_zero_star,
    full_norm,
    rescale,
    t_norm,
    whole_tensor_rescale,
)

# Of max|float64 result|: float32 accumulation over a few thousand elements, measured below 1e-6.
FLOAT32_RTOL = 1e-5
SHAPES = [(3, 4, 8, 8), (2, 16, 2, 6, 10)]


class _NoFloat64(TorchFunctionMode):
    """Every torch call that returns a float64 tensor, or is asked for dtype float64, raises."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(a is torch.float64 for a in args) or kwargs.get("dtype") is torch.float64:
            raise RuntimeError(f"float64 on a device without it: {func}")
        result = func(*args, **kwargs)
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in outputs):
            raise RuntimeError(f"float64 on a device without it: {func} returned float64")
        return result


class _OffDevice(TorchFunctionMode):
    """Records every torch call whose tensor result is not on ``device`` (meta accepts CPU operands in some ops,
    such as conv2d, so a CPU kernel would not fail by itself)."""

    def __init__(self, device: str):
        super().__init__()
        self.device, self.calls = device, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        self.calls += [f"{func} on {t.device}" for t in outputs
                       if isinstance(t, torch.Tensor) and t.device.type != self.device]
        return result


@contextlib.contextmanager
def no_float64():
    with _NoFloat64():
        yield


@pytest.fixture
def float32_device(monkeypatch):
    """The policy sees every device as one without float64 (as MPS)."""
    monkeypatch.setattr(numerics, "has_no_float64", lambda device: True)


def test_devices_without_float64_accumulate_in_float32():
    assert numerics.has_no_float64(torch.device("mps"))
    assert numerics.has_no_float64(torch.device("privateuseone"))  # DirectML
    for device in ("cpu", "cuda", "xpu", "meta"):
        assert not numerics.has_no_float64(torch.device(device))
    assert numerics.accumulation_dtype(torch.zeros(2)) == torch.float64
    assert numerics.accumulation_dtype(torch.zeros(2, device="meta", dtype=torch.float16)) == torch.float64


def test_the_float32_policy_is_what_the_rules_see(float32_device):
    # The fixture must reach the rules' call of the policy, or every test below compares float64 with itself.
    assert numerics.accumulation_dtype(torch.zeros(2)) == torch.float32
    with no_float64(), pytest.raises(RuntimeError, match="float64"):
        torch.zeros(2).double()


def _cases(shape):
    """(name, inputs) pairs: (cond, uncond) of ordinary, subnormal, zero and equal predictions."""
    generator = torch.Generator().manual_seed(sum(shape))
    cond, uncond = (torch.randn(shape, generator=generator) for _ in range(2))
    tiny = 1e-39  # below float32's smallest normal (1.2e-38): every value is subnormal
    return [
        ("ordinary", cond, uncond),
        ("subnormal", cond * tiny, uncond * tiny),
        ("subnormal cond, normal uncond", cond * tiny, uncond),
        ("all zero", torch.zeros(shape), torch.zeros(shape)),
        ("cond == uncond", cond, cond.clone()),
    ]


def _apg_with_momentum(cond, uncond):
    buffer = MomentumBuffer(-0.5)
    first = apg(cond, uncond, 5.0, eta=0.3, norm_threshold=2.0, momentum_buffer=buffer)
    return apg(first, uncond, 5.0, eta=0.3, norm_threshold=2.0, momentum_buffer=buffer)  # the buffer's 2nd step


RULES = {
    "cfg": lambda c, u: cfg(c, u, 5.0),
    "rescale (guided = cfg)": lambda c, u: rescale(cfg(c, u, 5.0), c, 0.7),
    "rescale (the note's case: guided 1e-6 of cond)": lambda c, u: rescale(cfg(c, u, 5.0) * 1e-6, c, 0.7),
    "whole_tensor_rescale": lambda c, u: whole_tensor_rescale(cfg(c, u, 5.0), c, 0.7),
    "cfg_zero_star": lambda c, u: cfg_zero_star(c, u, 5.0),
    "cfg_zero_star optimize cond": lambda c, u: cfg_zero_star(c, u, 5.0, optimize="cond"),
    "apg": lambda c, u: apg(c, u, 5.0, eta=0.3),
    "apg threshold + momentum": _apg_with_momentum,
    "base_norm": lambda c, u: base_norm(cfg(c, u, 5.0), u),
    "base_norm whole tensor": lambda c, u: base_norm(cfg(c, u, 5.0), u, per_sample=False),
    "base_norm of a tiny guided": lambda c, u: base_norm(cfg(c, u, 5.0) * 1e-6, u),
    "t_norm": lambda c, u: t_norm(c, u, 0.25),
    "t_norm whole tensor": lambda c, u: t_norm(c, u, 0.25, per_sample=False),
    "full_norm": lambda c, u: full_norm(c, u, 0.25),
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rule", list(RULES))
def test_every_rule_runs_without_float64(rule, shape, monkeypatch):
    fn = RULES[rule]
    for case, cond, uncond in _cases(shape):
        reference = fn(cond, uncond)  # the float64 path (the CPU has float64)
        with monkeypatch.context() as patched:
            patched.setattr(numerics, "has_no_float64", lambda device: True)
            with no_float64():
                result = fn(cond, uncond)
        where = f"{rule}, {case}"
        assert result.dtype == cond.dtype and result.shape == cond.shape, where
        assert torch.isfinite(reference).all(), f"{where}: the float64 path itself is not finite"
        assert torch.isfinite(result).all(), f"{where}: NaN or inf under the float32 policy"
        peak = reference.abs().max()
        if peak == 0:
            assert torch.equal(result, reference), where
            continue
        error = float((result - reference).abs().max() / peak)
        assert error < FLOAT32_RTOL, f"{where}: max|float32 − float64| / max|float64| = {error:.2e}"


def test_the_subnormal_cases_are_not_vacuous():
    # The subnormal case must be one where the ratios, taken directly in float32, are not finite (the squares
    # of subnormals underflow, so ||g|| is 0), and where the rules still give nonzero results.
    _name, cond, uncond = _cases(SHAPES[0])[1]
    assert 0 < cond.abs().max() < torch.finfo(torch.float32).tiny
    guided = cfg(cond, uncond, 5.0)
    assert not torch.isfinite(torch.ones(()).norm() / guided.norm())
    assert base_norm(guided, torch.ones_like(guided)).abs().max() > 0.01
    assert t_norm(cond, uncond, 0.25).abs().max() > 0


def test_half_precision_inputs_under_the_float32_policy(float32_device):
    cond, uncond = (t.to(torch.bfloat16) for t in _cases(SHAPES[0])[0][1:])
    with no_float64():
        for rule, fn in RULES.items():
            result = fn(cond, uncond)
            assert result.dtype == torch.bfloat16 and torch.isfinite(result).all(), rule


def test_core_functions_create_on_their_inputs_device():
    # Every tensor a core function makes for a meta input must be meta: a kernel or mask created without the
    # input's device lands on the CPU. On meta, any .item()/float()/bool() of a tensor (a host-device round trip
    # on a GPU) raises, so these calls also prove that the rules, the blurs and the combination need no sync.
    meta = dict(device="meta", dtype=torch.float16)
    cond, uncond = torch.empty(2, 4, 8, 8, **meta), torch.empty(2, 4, 8, 8, **meta)
    queries = torch.empty(2, 2, 4 + 24, 8, **meta)
    stack = GuidanceStack()
    ctx = StepContext(step=1, num_steps=4, sigma=2.0, cond_scale=5.0)
    calls = {f"rule {rule}": (lambda fn=fn: fn(cond, uncond)) for rule, fn in RULES.items()}
    calls.update({
        "gaussian_blur_2d": lambda: perturb.gaussian_blur_2d(torch.empty(2, 3, 8, 6, **meta), 2.0),
        "sag_blur": lambda: perturb.sag_blur(torch.empty(2, 4, 16, 16, **meta), torch.empty(2, 1, 16, 16, **meta), 1.0),
        "smooth_queries": lambda: perturb.smooth_queries(queries, (4, 6), 1.5, image_token_start=4),
        "sag_attention_mask": lambda: perturb.sag_attention_mask(
            perturb.attention_probabilities(queries[..., :16, :], queries[..., :16, :]), (4, 4), (8, 8)),
        "combine": lambda: stack.combine({COND: cond, UNCOND: uncond}, cond, ctx),
    })
    for name, call in calls.items():
        with _OffDevice("meta") as recorder:
            result = call()
        assert result.device.type == "meta", name
        assert not recorder.calls, f"{name} created tensors off the input's device: {recorder.calls}"
