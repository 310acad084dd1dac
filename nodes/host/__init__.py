"""The ComfyUI plumbing, one module per job; this is the small public face the node modules import.

- ``families``: one record per model family (classes, block lists, text position, sublayers, hooks,
  recommended layers with their sources).
- ``layers``: layer names and parsing; ``perturbations``: what a branch changes.
- ``install``: ``add_guidance`` (clone, hooks once, slots claimed); ``step``: the step driver.
- ``routing``: perturbations to batch chunks; ``attention``: UNet attn1 patch and DiT attention override;
  ``dit_blocks``: block and sublayer skip; ``shared_prefix``: the module that knows the host's forward loop.
"""

from . import families
from .install import add_guidance
from .layers import Layer, input_signature, model_family, parse_layers, require_family
from .marks import GuidanceError
from .perturbations import (
    AttentionPerturbation,
    BlockSkip,
    LateBranch,
    LateCall,
    SublayerSkip,
    TimeEmbeddingNoise,
    TokenShuffle,
    sublayer_modules,
)
from .step import get_setup
from .windows import percent_window

__all__ = [
    "AttentionPerturbation",
    "BlockSkip",
    "GuidanceError",
    "LateBranch",
    "LateCall",
    "Layer",
    "SublayerSkip",
    "TimeEmbeddingNoise",
    "TokenShuffle",
    "add_guidance",
    "families",
    "get_setup",
    "input_signature",
    "model_family",
    "parse_layers",
    "percent_window",
    "require_family",
    "sublayer_modules",
]
