"""Sliding Window Guidance (Kaiser et al. 2024, arXiv:2411.10257; masked SWG, BMVC 2025): g·M·(cond − crops), the
negative the model on overlapping crops of the latent, stitched back. The math is ``guidance_core.swg``; the
crops' call ``nodes/host/swg.py``.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..guidance_core.plan import COND, Branch, perturbation_term
from . import host
from .common import CATEGORY, family_names, model_input, scale_schedule, schedule_input, window_inputs
from .host import families
from .host.swg import CropSetup, crops_branch
from .inputs import check_inputs, public_id

SWG_FAMILIES = families.families_supporting(families.SWG)


class GuidersSWG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidersSWG",
            display_name="Sliding Window Guidance (Guiders)",
            category=CATEGORY,
            description="SWG (Kaiser et al. 2024, arXiv:2411.10257; masked SWG, BMVC 2025): adds g·M·(cond − "
                        "crops), the negative the model itself on an n × n grid of overlapping crops of the latent "
                        "(same prompt, same σ), put back and averaged where they overlap; M: the pixels two or more "
                        "crops cover. The crops run in one extra call per step (smaller latent). Families: "
                        + family_names(SWG_FAMILIES) + ".",
            inputs=[
                model_input(),
                io.Float.Input("scale", default=1.0, min=0.0, max=100.0, step=0.01,
                               tooltip="g: adds g·M·(cond − crops). The authors' scripts: 0.2-1.1 next to CFG on "
                                       "EDM2/DiT; SD1.5/SDXL: no published value, start at 0.5-2. 0 = off."),
                io.Int.Input("crop_size", default=0, min=0, max=1024,
                             tooltip="Crop side in latent pixels (image pixels / 8). 0 = 5/8 of the shorter side, "
                                     "the paper's 40 of 64 (SD1.5 at 512: 40; SDXL at 1024: 80)."),
                io.Int.Input("grid", default=2, min=1, max=5,
                             tooltip="n: n × n crops, evenly spread (stride (side − crop)/(n − 1)). The paper's "
                                     "default 2 (4 corner crops); 3 or 5 cost more calls' worth of pixels."),
                io.Boolean.Input("masked", default=True,
                                 tooltip="On: masked SWG, guidance only where two or more crops overlap (the "
                                         "BMVC 2025 default). Off: wherever a crop covers."),
                *window_inputs(),
                schedule_input("SWG scale g"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, crop_size, grid, masked, start_percent, end_percent, schedule=None):
        node = public_id(cls)
        check_inputs(cls, scale=scale, crop_size=crop_size, grid=grid, masked=masked, start_percent=start_percent,
                     end_percent=end_percent)
        host.require_family(model, node, SWG_FAMILIES)
        window = host.percent_window(start_percent, end_percent)
        crops = crops_branch(CropSetup(int(crop_size), int(grid), bool(masked), node))

        def update(stack):
            name = stack.unique_name("swg")
            return stack.with_term(perturbation_term(name, name, scale_schedule(scale, schedule), window),
                                   Branch(name, source=COND, perturbation=crops))

        return io.NodeOutput(host.add_guidance(model, node, update))


NODES = [GuidersSWG]
