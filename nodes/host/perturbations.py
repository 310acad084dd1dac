"""What a branch changes in the model, as data the host plumbing applies to that branch's batch chunk only:
attention perturbations, block skips, sublayer skips, and late branches (SAG, autoguidance).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ...guidance_core.plan import UNCOND, GuidanceStack
from . import families
from .layers import Layer, level_layer_blocks
from .marks import GuidanceError


@dataclass(frozen=True)
class AttentionPerturbation:
    """Changes the self-attention of the image tokens in ``layers``. ``perturb(q, k, v, grid, attend)``
    gets q, k, v as (B, heads, L, D) and the normal attention ``attend(q, k, v)``, and returns the
    attention output as (B, heads, L, D)."""

    layers: tuple[Layer, ...]
    perturb: Callable[..., torch.Tensor]
    label: str = "attention"
    records: bool = False  # an observer: perturb returns (output, record), kept in the step's scratch


@dataclass(frozen=True)
class BlockSkip:
    """Skips whole DiT blocks: the block returns its inputs (SLG/STG ``block`` mode)."""

    layers: tuple[Layer, ...]
    label: str = "block skip"


@dataclass(frozen=True)
class SublayerSkip:
    """Skips one kind of sublayer inside DiT blocks: its residual contribution becomes zero, so the stream
    passes it unchanged (``x + gate·f(x)`` → ``x``). ``sublayer`` is ``attention`` (self/joint attention,
    not cross-attention) or ``feedforward``."""

    layers: tuple[Layer, ...]
    sublayer: str
    label: str = "sublayer skip"
    # The skip acts on every stream of a block with several (LTX-2's audio-video cross-attention feeds both):
    # dit_blocks then keeps the block's own output of every stream, not the unperturbed block's.
    all_streams: bool = False


def sublayer_modules(diffusion_model, family: str, layer: Layer, sublayer: str) -> list[torch.nn.Module]:
    """The modules of ``layer`` whose outputs are its ``sublayer`` contributions; an error if there are none."""
    record = families.FAMILY_BY_KEY.get(family)
    names = record.sublayers.get(layer.kind, {}).get(sublayer, ()) if record is not None else ()
    if names:
        block = block_module(diffusion_model, record, layer)
        modules = [block.get_submodule(name) for name in names if _has_submodule(block, name)]
        if modules:
            return modules
    raise GuidanceError(f"mode '{sublayer}' cannot skip part of block {layer} of this model "
                        f"({type(diffusion_model).__name__}); use mode 'block' there.")


def block_module(diffusion_model, record: families.ModelFamily, layer: Layer) -> torch.nn.Module:
    """The layer's block: ``index`` in the record's block list of its kind (Cosmos 1 keeps its blocks in a
    ModuleDict, in forward order), or, where the list holds levels (``record.level_layers``), the ``sub``-th
    layer block of level ``index``."""
    blocks = operator.attrgetter(record.block_lists[layer.kind])(diffusion_model)  # a dotted path (HiDream O1)
    if record.level_layers:
        return level_layer_blocks(record, blocks[layer.index])[layer.sub]
    return list(blocks.values())[layer.index] if isinstance(blocks, torch.nn.ModuleDict) else blocks[layer.index]


def _has_submodule(module: torch.nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


@dataclass(frozen=True)
class LateBranch:
    """A branch computed after the main forward from its results (SAG) or by another model
    (autoguidance): ``evaluate(call)`` gets a ``LateCall`` and returns the branch's x0 prediction,
    expressed relative to the step's input x."""

    evaluate: Callable[[LateCall], torch.Tensor]
    observe: AttentionPerturbation | None = None  # records during the main forward (SAG's attention map)
    observe_branch: str = UNCOND
    label: str = "late"


@dataclass
class LateCall:
    """What a late branch can use: the step's predictions so far, its input, the conds, and a way to
    run a model on other inputs."""

    preds: dict[str, torch.Tensor]
    x: torch.Tensor
    sigma: torch.Tensor
    conds: dict[str, Any]
    model: Any
    model_options: dict
    scratch: dict
    run_model: Callable[..., torch.Tensor]
    extra_models: dict


def _perturbations(stack: GuidanceStack):
    for branch in stack.branches:
        p = branch.perturbation
        if isinstance(p, LateBranch):
            if p.observe is not None:
                yield p.observe
        elif p is not None:
            yield p


def patched_layers(stack: GuidanceStack) -> list[Layer]:
    layers = []
    for p in _perturbations(stack):
        layers.extend(p.layers)
    return list(dict.fromkeys(layers))



@dataclass(frozen=True)
class TokenShuffle:
    """TPG: the hidden states entering each block of ``layers`` have their image tokens shuffled, one fresh
    permutation per block call (``condition_free.token_permutation`` of ``seed``, the step and the block), the
    same for every row of the branch; the block's output stays shuffled (the authors' pipeline_sdxl_tpg.py).
    UNet: the input of each BasicTransformerBlock (nodes/host/token_shuffle.py); DiT: the ``dit`` block patch
    shuffles the image stream it is handed."""

    layers: tuple[Layer, ...]
    seed: int = 0
    label: str = "TPG"

    def permutation(self, count: int, step: int, layer: Layer, device) -> torch.Tensor:
        from ...guidance_core.condition_free import token_permutation

        return token_permutation(count, self.seed, step, layer.kind, layer.index, layer.sub, device=device)


@dataclass(frozen=True)
class TimeEmbeddingNoise:
    """TSG: the branch's time-step embedding (the output of its family record's ``time_embedding`` module)
    gets Gaussian noise, ``condition_free.noised_time_embedding``, fresh per step from ``seed``
    (nodes/host/time_embedding.py). It acts before every block: no layers, so no shared prefix with the cond."""

    noise_scale: float
    seed: int = 0
    label: str = "TSG"
    layers: tuple[Layer, ...] = ()
