"""SWG's crops branch: after the main forward, the model on the n × n crops of the latent, all crops of the step in
ONE extra call (crop-major rows: the conditioning, repeated by the host to the call's batch, matches row for
row), each crop at the step's σ and with the cond's conditioning, then stitched back (``guidance_core.swg``).

The crops cannot join the main forward: their latent is smaller than the step's, and one call takes one shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.samplers

from ...guidance_core.plan import COND
from ...guidance_core.swg import crop_windows, crops_of, masked_crops_prediction, stitch_crops
from .marks import GuidanceError
from .perturbations import LateBranch, LateCall


@dataclass(frozen=True)
class CropSetup:
    crop: int  # side in latent pixels; 0: 5/8 of the shorter side (the paper's 40 of 64)
    grid: int  # n: n × n crops
    masked: bool
    node: str = "GuidersSWG"

    def crop_for(self, height: int, width: int) -> int:
        crop = self.crop or max(1, (5 * min(height, width)) // 8)
        if crop > min(height, width):
            raise GuidanceError(f"{self.node}: crop_size {crop} is larger than this latent ({height} × {width} "
                                f"latent pixels); choose at most {min(height, width)}, or 0 for 5/8 of the side.")
        return crop


def crops_branch(setup: CropSetup) -> LateBranch:
    def evaluate(call: LateCall):
        x, cond = call.x, call.preds[COND]
        if x.ndim != 4:
            raise GuidanceError(f"{setup.node}: the latent has {x.ndim} dimensions; SWG crops image latents (B, C, H, "
                                "W) only.")
        height, width = x.shape[-2:]
        crop = setup.crop_for(height, width)
        windows = crop_windows(height, width, crop, setup.grid)
        sigma = call.sigma.repeat(len(windows))
        (crop_preds,) = comfy.samplers.calc_cond_batch(call.model, [call.conds[COND]], crops_of(x, windows, crop),
                                                       sigma, call.model_options)
        stitched, coverage = stitch_crops(crop_preds, windows, crop, x.shape)
        return masked_crops_prediction(cond, stitched, coverage, setup.masked)

    return LateBranch(evaluate, label="SWG crops")
