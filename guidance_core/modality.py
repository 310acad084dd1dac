"""LTX-2 audio-video guidance: CFG with its own scale per modality, and modality guidance against the prediction
with the audio↔video cross-attention cut. x0 space (the denoised predictions), as Lightricks' ``GuiderParameters``
and diffusers' ``LTX2Guidance`` combine them (both convert velocity to x0 first); ComfyUI's LTXVDualCFGGuider
works on x − x0, where the same linear combination gives the same result.

    pred = c + (w_m − 1)(c − u) + (s − 1)(c − c_isolated)      per modality m (video w 3, audio w 7; s 3)
"""

from __future__ import annotations

import torch


def per_stream_cfg(cond: torch.Tensor, uncond: torch.Tensor, scales: tuple[float, ...],
                   stream_sizes: tuple[int, ...]) -> torch.Tensor:
    """``u + w_i(c − u)`` on each packed stream i: the sampler's latent holds the streams flattened one after the
    other on its last dimension (``stream_sizes`` per sample; ComfyUI's Guider_LTXAVDualCFG splits at the video's
    size the same way). Without packed streams (``()``) the first scale applies to everything, as the host falls
    back to video_cfg."""
    if not stream_sizes:
        return uncond + scales[0] * (cond - uncond)
    weights = torch.cat([torch.full((size,), float(scale), device=cond.device, dtype=cond.dtype)
                         for size, scale in zip(stream_sizes, scales, strict=True)])
    return uncond + weights * (cond - uncond)


def modality_contribution(cond: torch.Tensor, isolated: torch.Tensor, scale: float) -> torch.Tensor:
    """``(s − 1)(c − c_isolated)``: modality guidance (LTX-2; ComfyUI's LTXVModalityGuidance, diffusers'
    LTX2Guidance ``modality_scale``), the cond pushed away from its prediction with the audio-to-video and
    video-to-audio cross-attention switched off. s = 1 is off."""
    return (scale - 1.0) * (cond - isolated)
