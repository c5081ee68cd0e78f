"""The tissue mask on real slides and tiles: background has none, it reads only low levels."""

from __future__ import annotations

import numpy as np
from helpers import CMU_PYRAMID, RecordingReader
from PIL import Image
from skimage.color import rgb2hsv

from smoothsal import slides, tiling, tissue


def test_background_has_no_tissue(cmu, cmu_tissue, tiles_dir):
    for found in cmu_tissue:  # the blank glass left of the specimen
        xs, ys = np.meshgrid([0, 224], [224, 448, 672])
        fractions = tissue.box_fractions(
            found.mask, found.overview.downsample, xs.ravel(), ys.ravel(), 224, 224
        )
        assert fractions.max() < 0.01
    for name in ("no-tissue.png", "almost-white-1.png"):
        rgb = np.asarray(Image.open(tiles_dir / name).convert("RGB"))
        assert tissue.tissue_mask(rgb, mpp=0.5).mean() < 0.01, name
    rgb = np.asarray(Image.open(tiles_dir / "tissue-level0-4302-10273-4814-10785.png").convert("RGB"))
    assert tissue.tissue_mask(rgb, mpp=0.5).mean() > 0.5
    np.testing.assert_allclose(tissue.hsv_saturation(rgb), rgb2hsv(rgb)[..., 1], atol=1e-6)
    uniform = np.full((64, 64, 3), (240, 236, 238), np.uint8)
    assert not tissue.tissue_mask(uniform, mpp=8.0).any()


def test_tissue_mask_reads_only_low_levels(slides_dir):
    """Tiling reads nothing at level 0: the mask (and overview) come from the coarsest fine-enough level."""
    with slides.open_slide(slides_dir / CMU_PYRAMID) as slide:
        spy = RecordingReader(slide.reader)
        tiled = tiling.tile_slide(slides.Slide(slide.path, spy, slide.mpp, slide.slide_id))
        assert len(tiled.table) > 30 and spy.reads
        assert {level for level, _ in spy.reads} == {3}  # 8 µm/px mask from the ×8 level, never level 0
        assert tiled.tissue.overview.level == 3
        spy.reads.clear()
        for row in tiled.table.head(5).itertuples():
            slides.read_tile(spy, row.x, row.y, row.w, row.level, row.tile_size)
        assert spy.reads == [(0, (224, 224))] * 5  # each tile: one read at its level, its own size
