"""guidance_core.swg: the authors' crop grid (edm2/sample_edm2.py swg_guidance: stride (side − k)//(n − 1)), the
stitching average and the M-SWG mask. Breaks caught: stride //n (the origins check), the coverage not divided
(the constant-field check), the mask at coverage > 0 (the mask check)."""

from __future__ import annotations

import torch

from guidance_core.swg import crop_origins, crop_windows, crops_of, masked_crops_prediction, stitch_crops


def test_the_authors_grid():
    assert crop_origins(64, 40, 2) == [0, 24]
    assert crop_origins(64, 40, 3) == [0, 12, 24]
    assert crop_origins(64, 40, 1) == [0]
    assert crop_windows(16, 20, 12, 2) == [(0, 0), (0, 8), (4, 0), (4, 8)]


def test_stitching_a_constant_field_gives_it_back_and_the_mask_is_the_overlap():
    x = torch.randn(2, 3, 16, 16)
    windows = crop_windows(16, 16, 12, 2)
    crops = crops_of(x, windows, 12)
    assert crops.shape == (8, 3, 12, 12) and torch.equal(crops[2:4], x[..., 0:12, 4:16])
    stitched, coverage = stitch_crops(crops, windows, 12, x.shape)
    assert torch.allclose(stitched, x)  # every crop is x itself there: the average is x
    assert coverage[0, 0, 8, 8] == 4 and coverage[0, 0, 0, 0] == 1 and coverage[0, 0, 0, 8] == 2
    cond = torch.zeros_like(x)
    masked = masked_crops_prediction(cond, stitched, coverage)
    assert torch.equal(masked[..., 0, 0], cond[..., 0, 0]) and torch.equal(masked[..., 8, 8], x[..., 8, 8])
    assert torch.equal(masked_crops_prediction(cond, stitched, coverage, masked=False), stitched)
