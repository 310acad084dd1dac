"""PLADIS inside every forward: the plumbing that puts ``guidance_core.pladis`` in the text cross-attention of a
family, with no extra branch and no extra model call.

The sites are NAG's (``families.NAG_SITES``: the module class and the index of its text attention call, found
by ``nag.nag_modules``), on the families whose text attention goes through ``optimized_attention`` with the
options (UNet, Wan and its variants, LTXV, LTX-2's video ``attn2``: a site without ``output``).
Per diffusion-model call, while the step is inside the
window and λ ≠ 0, an ``APPLY_MODEL`` wrapper registers forward hooks on those modules (marking which one runs)
and puts an ``optimized_attention_override`` in the call's transformer_options, wrapping whatever was there;
both are removed when the call returns or raises. In the marked module's text attention call the override
computes the host's dense output Z (softmax), the sparse output α-entmax(QKᵀ/√d)·V from the same q, k, v and
mask, and returns ``Z + λ(Z_sparse − Z)`` for every row (cond and uncond alike, as the paper: it changes the
model, not a branch).

With GuidersNAG on the same model, PLADIS is the attention function NAG's Z⁺ and Z⁻ are computed with, in either
node order (``_make_override``).

Read, not copied: pamparamm's sd-perturbed-attention ``pladis_nodes.py`` (UNet attn2 replace on input and
output blocks, every row); the paper's Algorithm 1 (every cross-attention). Here ``auto`` is every
cross-attention, as the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...guidance_core.pladis import pladis_combine, sparse_attention
from . import families
from .layers import Layer
from .marks import GuidanceError, attention_override_installed, is_repeated_attention_call
from .nag import nag_modules
from .windows import PercentWindow, scale_at_sigma

PLADIS_KEY = "comfyui_guiders_pladis"  # model_options["transformer_options"][PLADIS_KEY] -> PladisSetup
PLADIS_WRAPPER_KEY = "comfyui_guiders_pladis"


def pladis_families() -> tuple[str, ...]:
    """The families whose text cross-attention call the override sees: NAG's sites without an output hook."""
    return tuple(key for key, site in families.NAG_SITES.items() if not site.output)


@dataclass(frozen=True)
class PladisSetup:
    """What a PLADIS-patched model carries: λ (or a schedule of it), α, the percent window, the family, the
    chosen layers (None: every cross-attention)."""

    scale: float
    alpha: float
    window: PercentWindow | None
    family: str
    schedule: Any = None
    layers: tuple[Layer, ...] | None = None
    node: str = "GuidersPLADIS"

    def __copy__(self):  # ModelPatcher.clone() deep-copies model_options: the setup is immutable
        return self

    def __deepcopy__(self, memo):
        return self

    def scale_at(self, sigma: float, sample_sigmas) -> float:
        return scale_at_sigma(self.scale, self.schedule, sigma, sample_sigmas)


def install_pladis(patched, setup: PladisSetup) -> None:
    """Puts ``setup`` and the wrapper on ``patched`` (a clone); a second PLADIS on the same model is an error."""
    import comfy.patcher_extension

    transformer_options = patched.model_options.setdefault("transformer_options", {})
    if transformer_options.get(PLADIS_KEY) is not None:
        raise GuidanceError(f"{setup.node}: the model already has PLADIS from an earlier {setup.node} in the "
                            "chain; use one.")
    transformer_options[PLADIS_KEY] = setup
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PLADIS_WRAPPER_KEY,
                                 pladis_apply_model_wrapper)


@dataclass
class _ForwardState:
    """One diffusion-model call's PLADIS: which module is running and how many attention calls it made."""

    scale: float
    alpha: float
    module: torch.nn.Module | None = None
    text_call: int = 0
    calls: int = 0
    used: int = 0  # text attention calls changed in this forward (tests read it)


def pladis_apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None,
                               transformer_options={}, **kwargs):  # noqa: B006 (the host's signature)
    setup: PladisSetup | None = transformer_options.get(PLADIS_KEY)
    sigmas = transformer_options.get("sigmas")
    if setup is None or sigmas is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    base_model = executor.class_obj
    sigma = float(sigmas.flatten()[0])
    scale = setup.scale_at(sigma, transformer_options.get("sample_sigmas"))
    in_window = setup.window is None or setup.window.sigma_window(base_model.model_sampling).contains(sigma)
    if scale == 0 or not in_window:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    if setup.family == "unet" and (transformer_options.get("patches_replace") or {}).get("attn2"):
        raise GuidanceError(f"{setup.node}: another node replaces the UNet's cross-attention (an attn2 replace "
                            "patch, as IPAdapter-style nodes set), so the host skips the module PLADIS acts in. "
                            f"Remove that node or {setup.node}.")
    modules = nag_modules(base_model.diffusion_model, setup.family, setup.layers)
    if not modules:
        raise GuidanceError(f"{setup.node}: found no text cross-attention module of the expected classes in "
                            f"{type(base_model.diffusion_model).__name__}; this ComfyUI version's model code differs "
                            "from the one PLADIS was written for.")
    state = _ForwardState(scale, setup.alpha)
    handles = []
    for module, text_call in modules:
        def enter(mod, args, text_call=text_call):
            state.module, state.text_call, state.calls = mod, text_call, 0

        def leave(mod, args, output):
            state.module = None

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    override = _make_override(state, transformer_options.get("optimized_attention_override"))
    try:
        with attention_override_installed(transformer_options, override):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


# optimized_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False)
_AFTER_HEADS = ("mask", "attn_precision", "skip_reshape", "skip_output_reshape")


def _make_override(state: _ForwardState, previous):
    """PLADIS changes the attention function of the marked module's text call, whoever else overrides it: when
    an override installed earlier (``previous``, e.g. NAG's) wraps that call, it is handed the PLADIS attention
    as its ``func``, so every attention it computes there (NAG's Z⁺ and Z⁻) is PLADIS's; when an override
    installed later wraps this one and calls the site again (NAG's Z⁻, marked ``repeated_attention_call``), the
    repeat is the same text call, changed the same way."""
    def pladis_attention_override(func, *args, **kwargs):
        call = (lambda *a, **kw: previous(func, *a, **kw)) if previous is not None else func
        if state.module is None:
            return call(*args, **kwargs)
        if is_repeated_attention_call():
            index = state.calls - 1
        else:
            index = state.calls
            state.calls += 1
        if index != state.text_call:
            return call(*args, **kwargs)

        def pladis_function(*a, **kw):
            return _with_sparse(state, func(*a, **kw), a, kw)

        if previous is None:
            return pladis_function(*args, **kwargs)
        used = state.used
        result = previous(pladis_function, *args, **kwargs)
        if state.used == used:  # ``previous`` ignores func (a backend replacement): PLADIS around its result
            result = _with_sparse(state, result, args, kwargs)
        return result

    return pladis_attention_override


def _with_sparse(state: _ForwardState, dense, args, kwargs):
    """Z + λ(Z_sparse − Z): Z the dense attention of the call ``args``/``kwargs``, Z_sparse α-entmax(QKᵀ/√d +
    mask)·V of the same q, k, v and mask (PLADIS Eq. 7 applied to the map, which is linear in it)."""
    q, k, v, heads = args[:4] if len(args) >= 4 else (*args[:3], kwargs["heads"])
    named = {**dict(zip(_AFTER_HEADS, args[4:], strict=False)), **kwargs}
    sparse = sparse_attention(*_to_heads(q, k, v, heads, named.get("skip_reshape", False)), state.alpha,
                              _score_bias(named.get("mask"), q.shape[0]))
    if not named.get("skip_output_reshape", False):
        b, _heads, length, dim = sparse.shape
        sparse = sparse.transpose(1, 2).reshape(b, length, heads * dim)
    state.used += 1
    return pladis_combine(dense, sparse.to(dense.dtype), state.scale)


def _to_heads(q, k, v, heads: int, skip_reshape: bool):
    """q, k, v as (B, heads, L, D): the host's layout (B, L, heads·D) split, or already split (skip_reshape)."""
    if skip_reshape:
        return q, k, v

    def split(t):
        b, length, width = t.shape
        return t.view(b, length, heads, width // heads).transpose(1, 2)

    return split(q), split(k), split(v)


def _score_bias(mask, batch: int):
    """The host attention's mask as an additive bias on (B, heads, Lq, Lk) scores, as attention_pytorch reads it
    (2-D: one for all rows; 3-D: per row; boolean: True attends). Large negatives are clamped so that the sparse
    maps' sorting arithmetic stays finite; such entries still get no mass."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, -1e9)
    mask = mask.float().clamp_min(-1e9)
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    return mask
