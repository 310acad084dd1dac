"""Layers a perturbation can name (UNet transformer blocks, DiT blocks), read from widgets and printed back
the same way, and the model's family (from the records in ``families``).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from . import families
from .marks import GuidanceError


def model_family(model) -> str:
    """The model's family key (a record of host/families.py), or its diffusion model's class name when unknown."""
    diffusion_model = model.get_model_object("diffusion_model")
    family = families.family_of_model(getattr(model, "model", None), diffusion_model)
    return family.key if family is not None else type(diffusion_model).__name__


# The model-config entries that fix what a forward takes in: two models that differ in one of them cannot run
# on the same latent and conditioning (an SD1.5 UNet has no ADM input for SDXL's pooled text and sizes).
_INPUT_CONFIG_KEYS = ("in_channels", "context_dim", "adm_in_channels", "context_in_dim", "vec_in_dim", "in_dim",
                      "text_dim", "caption_channels", "cap_feat_dim", "patch_size")


def input_signature(model) -> dict:
    """What a model's forward takes in: its model class, latent format and input-fixing config entries."""
    base = model.model
    config = getattr(getattr(base, "model_config", None), "unet_config", {}) or {}
    signature = {"model class": type(base).__name__, "latent format": type(base.latent_format).__name__}
    signature.update({key: config[key] for key in _INPUT_CONFIG_KEYS if key in config})
    return signature


def require_family(model, node: str, supported: tuple[str, ...]) -> str:
    family = model_family(model)
    if family not in supported:
        names = ", ".join(families.display_name(f) for f in supported)
        record = families.FAMILY_BY_KEY.get(family)
        reason = f" ({record.refused_because})" if record is not None and record.refused_because else ""
        raise GuidanceError(f"{node}: this model's architecture ({families.display_name(family)}) is not "
                            f"supported{reason}; {node} supports {names}.")
    return family


UNET_KINDS = ("input", "middle", "output")


@dataclass(frozen=True)
class Layer:
    """A place a perturbation acts: a UNet transformer block (``input``/``middle``/``output`` + index, with
    an optional transformer index) or a DiT block (``double``/``single`` + index)."""

    kind: str
    index: int
    sub: int | None = None

    def __str__(self) -> str:
        """The name ``parse_layers`` reads back as this layer: ``middle`` (the whole middle block),
        ``middle.0.1`` (its transformer 1), ``input.4``, ``input.4.1``, ``double.7``, ``single.2``."""
        if self.kind == "middle":
            return "middle" if self.sub is None else f"middle.0.{self.sub}"
        return f"{self.kind}.{self.index}" + ("" if self.sub is None else f".{self.sub}")

    @property
    def is_dit(self) -> bool:
        """A transformer block of a DiT (double, single; Stable Cascade's down, up), not a UNet's."""
        return self.kind not in UNET_KINDS

    @property
    def patch_key(self) -> tuple[str, tuple]:
        """Where ComfyUI looks up a replace patch for this layer: ``patches_replace[name][key]``."""
        if self.is_dit:
            return "dit", (f"{self.kind}_block", self.index)
        return "attn1", (self.kind, self.index) if self.sub is None else (self.kind, self.index, self.sub)


def model_layers(model) -> list[Layer]:
    """Every layer of this model a perturbation can name."""
    family = model_family(model)
    dm = model.get_model_object("diffusion_model")
    if family == "unet":
        layers = []
        for kind, blocks in (("input", dm.input_blocks), ("middle", [dm.middle_block]), ("output", dm.output_blocks)):
            for index, block in enumerate(blocks):
                if any(type(m).__name__ == "SpatialTransformer" for m in block.modules()):
                    layers.append(Layer(kind, index))
        return layers
    record = families.FAMILY_BY_KEY.get(family)
    if record is not None and record.level_layers:
        return [Layer(kind, level, i) for kind, attribute in record.block_lists.items()
                for level, blocks in enumerate(getattr(dm, attribute))
                for i in range(len(level_layer_blocks(record, blocks)))]
    block_lists = record.block_lists if record is not None else {}
    return [Layer(kind, i) for kind, attribute in block_lists.items()
            for i in range(len(operator.attrgetter(attribute)(dm)))]  # a dotted path (HiDream O1)


def level_layer_blocks(record: families.ModelFamily, level_blocks) -> list:
    """The blocks of one level that are layers (``record.level_layers``), in forward order."""
    return [block for block in level_blocks if any(f"{cls.__module__}:{cls.__qualname__}" == record.level_layers
                                                   for cls in type(block).__mro__)]


def unet_transformer_count(model, layer: Layer) -> int:
    dm = model.get_model_object("diffusion_model")
    block = {"input": dm.input_blocks, "output": dm.output_blocks}.get(layer.kind, [dm.middle_block])[
        0 if layer.kind == "middle" else layer.index
    ]
    return sum(len(m.transformer_blocks) for m in block.modules() if type(m).__name__ == "SpatialTransformer")


def parse_layers(text: str, model, input_name: str, method: str) -> tuple[Layer, ...]:
    """Layers from a widget: ``auto`` (the family record's recommended layers for ``method`` at the model's
    size, ``ModelFamily.recommended_for``), or a comma
    list. UNet: ``middle``,
    ``input.4``, ``output.1``, ``input.4.1`` (block, index, transformer). DiT: ``7, 8, 9`` (main / joint /
    double blocks), ``double.1``, ``single.2``. Unknown or out-of-range layers list what this model has."""
    family = model_family(model)
    available = model_layers(model)
    record = families.FAMILY_BY_KEY.get(family)
    by_level = record is not None and bool(record.level_layers)  # "kind.L.i": the index of a level's layer
    if not available:
        raise GuidanceError(f"{input_name}: this model's architecture ({family}) has no layers this pack can patch.")
    text = text.strip() or "auto"
    if text.lower() == "auto":
        text = ", ".join(auto_layers(family, method, available))
    layers = []
    for token in [t for t in re.split(r"[,\s]+", text) if t]:
        layer = _parse_one(token, family)
        base = Layer(layer.kind, layer.index) if layer is not None and not by_level else layer
        if base is None or base not in available:
            listing = ", ".join(str(a) for a in available)
            raise GuidanceError(f"{input_name}: unknown layer {token!r} for this {families.display_name(family)} "
                                f"model. Its layers are: {listing} (or 'auto').")
        count = unet_transformer_count(model, base) if layer.sub is not None and not by_level else 0
        if layer.sub is not None and not by_level and not 0 <= layer.sub < count:
            raise GuidanceError(f"{input_name}: {token!r}: block {base} has {count} transformers (0..{count - 1}).")
        layers.append(layer)
    if not layers:  # only separators: perturbing nothing would run plain CFG plus a wasted branch
        raise GuidanceError(f"{input_name}: {text!r} names no layer. Name one or more of: "
                            f"{', '.join(str(a) for a in available)} (or 'auto').")
    return tuple(dict.fromkeys(layers))


def auto_layers(family: str, method: str, available: list[Layer]) -> list[str]:
    """What "auto" names on a model of ``family`` whose layers are ``available``: the record's recommended layers
    for ``method`` at the model's size (its main, double, blocks: ``ModelFamily.recommended_for``), all of them
    or none. A model without one of them (a shallower one: families.MISSING_BLOCK_FALLBACK), or a family
    without a published choice, takes its middle layer, as the PAG and SEG papers do."""
    record = families.FAMILY_BY_KEY.get(family)
    main_blocks = sum(1 for layer in available if layer.kind == "double")
    recommended = record.recommended_for(method, main_blocks) if record is not None else None
    chosen = list(recommended.layers) if recommended else []
    if not chosen or any(_parse_one(token, family) not in available for token in chosen):
        chosen = [str(available[len(available) // 2])] if family != "unet" else ["middle"]
    return chosen


def _parse_one(token: str, family: str) -> Layer | None:
    token = token.strip().lower()
    if family == "unet":
        m = re.fullmatch(r"(input|middle|output)(?:\.(\d+))?(?:\.(\d+))?", token)
        if not m:
            return None
        kind = m.group(1)
        index = 0 if kind == "middle" else (int(m.group(2)) if m.group(2) else None)
        if index is None:
            return None
        sub = m.group(3) if kind != "middle" else (m.group(3) or (m.group(2) if m.group(2) else None))
        return Layer(kind, index, int(sub) if sub is not None else None)
    record = families.FAMILY_BY_KEY.get(family)
    if record is not None and record.level_layers:  # Stable Cascade: "down.1.3", the 4th layer of down level 1
        m = re.fullmatch(r"([a-z]+)\.(\d+)\.(\d+)", token)
        return Layer(m.group(1), int(m.group(2)), int(m.group(3))) if m and m.group(1) in record.block_lists else None
    m = re.fullmatch(r"(?:(double|single|joint|block)\.)?(\d+)", token)
    if not m:
        return None
    kind = "single" if m.group(1) == "single" else "double"
    return Layer(kind, int(m.group(2)))

