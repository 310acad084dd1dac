"""TSG's mechanism: the time-step embedding of the TSG chunk's rows, noised, for one forward.

The family record's ``time_embedding`` names the diffusion model's module whose output is the time-step
embedding (UNet ``time_embed``, SD3 ``t_embedder``, Flux ``time_in``, Wan ``time_embedding``); a forward
hook on it, registered by an APPLY_MODEL wrapper for one forward and always removed, adds the noise to the
rows of the chunks a TimeEmbeddingNoise acts on. Everything the embedding feeds (the blocks' modulations,
the UNet's ResBlocks) then sees the perturbed time, as the paper's negative branch does.
"""

from __future__ import annotations

from ...guidance_core.condition_free import keyed_normal, noised_time_embedding
from . import families
from .marks import STEP_KEY
from .perturbations import TimeEmbeddingNoise


def _noise_rows(transformer_options: dict):
    routing = transformer_options.get(STEP_KEY)
    tags = transformer_options.get("cond_or_uncond") or []

    def hook(module, inputs, output):
        if routing is None or not tags or output.shape[0] % len(tags):
            return None
        chunks = [[p for p in routing.by_index.get(tag, []) if isinstance(p, TimeEmbeddingNoise)] for tag in tags]
        if not any(chunks):
            return None
        size, out = output.shape[0] // len(tags), output.clone()
        for j, chunk in enumerate(chunks):
            for noise in chunk:
                rows = out[j * size:(j + 1) * size]
                draw = keyed_normal(rows.shape, noise.seed, routing.step, tags[j], device=rows.device)
                out[j * size:(j + 1) * size] = noised_time_embedding(rows, draw, noise.noise_scale)
        return out

    return hook


def make_time_embedding_wrapper(family: str):
    """The APPLY_MODEL wrapper of a ``family`` model with a TSG branch."""
    attribute = families.FAMILY_BY_KEY[family].time_embedding

    def time_embedding_wrapper(executor, *args, **kwargs):
        transformer_options = kwargs.get("transformer_options", args[5] if len(args) > 5 else {}) or {}
        module = executor.class_obj.diffusion_model.get_submodule(attribute)
        handle = module.register_forward_hook(_noise_rows(transformer_options))
        try:
            return executor(*args, **kwargs)
        finally:
            handle.remove()

    return time_embedding_wrapper


def has_time_embedding_noise(setup) -> bool:
    return setup is not None and any(isinstance(b.perturbation, TimeEmbeddingNoise) for b in setup.stack.branches)



