"""The keys this pack uses in ComfyUI's model_options, the user-facing error type, and how the pack marks its
own functions (so a slot it filled is told from one another node filled, and what ours wraps).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

SETUP_KEY = "comfyui_guiders"  # model_options["transformer_options"][SETUP_KEY] -> GuidanceSetup


STEP_KEY = "comfyui_guiders_step"  # per forward: ForwardRouting


ACTIVE_LAYER_KEY = "comfyui_guiders_layer"  # set inside a patched DiT block for the attention override


TEXT_TOKENS_KEY = "comfyui_guiders_text_tokens"  # per forward, for DiTs whose blocks don't carry the text


# Per forward, where the model is handed several latents (ComfyUI's packed latents, unpacked by
# comfy.utils.unpack_latents before the diffusion model: LTX-2's video and audio): the first one's shape, the
# latent whose token grid the perturbations use.
IMAGE_LATENT_SHAPE_KEY = "comfyui_guiders_image_latent_shape"


WRAPPER_KEY = "comfyui_guiders"


class GuidanceError(ValueError):
    """A user-facing error: names the input, what was wrong and the valid choices."""


def mark_ours(fn, wraps: Callable | None = None):
    fn.__comfyui_guiders__ = True
    fn.__comfyui_guiders_wraps__ = wraps  # another node's function ours calls, if any
    return fn


def is_ours(fn) -> bool:
    return getattr(fn, "__comfyui_guiders__", False)


def is_ours_alone(fn) -> bool:
    return is_ours(fn) and fn.__comfyui_guiders_wraps__ is None



# An attention override that calls the attention of one site a second time (NAG's Z⁻: the same text
# cross-attention with the negative's keys and values) marks that call as a repeat, so an override inside it that
# counts a module's attention calls to find the text call (PLADIS) sees the same call index again instead of the
# next one, and changes the attention function of Z⁻ as it did Z⁺'s.
_repeated_attention_call: contextvars.ContextVar[bool] = contextvars.ContextVar("comfyui_guiders_repeated_attention",
                                                                                default=False)


@contextlib.contextmanager
def repeated_attention_call():
    token = _repeated_attention_call.set(True)
    try:
        yield
    finally:
        _repeated_attention_call.reset(token)


def is_repeated_attention_call() -> bool:
    return _repeated_attention_call.get()


@contextlib.contextmanager
def attention_override_installed(transformer_options: dict, override: Callable):
    """``override`` as this forward's ``optimized_attention_override`` (wrapping whatever was there: the caller
    built it around ``previous``), and the previous one back afterwards, also when the forward raises."""
    previous = transformer_options.get("optimized_attention_override")
    transformer_options["optimized_attention_override"] = override
    try:
        yield
    finally:
        if previous is None:
            transformer_options.pop("optimized_attention_override", None)
        else:
            transformer_options["optimized_attention_override"] = previous
