"""The token grid of an attention call: where the image tokens sit in its sequence.

Joint attention (SD3, Flux, HunyuanVideo) puts text tokens before or after the image tokens; video DiTs
lay the image tokens out frame by frame, each frame a row-major height × width grid. Attention rules
(``perturb``) need this to touch only the image tokens and to blur along the right axes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenGrid:
    """Where the image tokens sit in an attention call's sequence: ``start`` .. ``start + frames·h·w``,
    frame by frame in row-major order; tokens outside (text tokens of joint attention) are not image
    tokens. ``frames`` is 1 for images."""

    start: int
    height: int
    width: int
    frames: int = 1

    @property
    def image_slice(self) -> slice:
        return slice(self.start, self.start + self.frames * self.height * self.width)
