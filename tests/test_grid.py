"""The tile grid on real and synthetic slides: the same grid from any pyramid, its options, alignment."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from smoothsal import grid, slides, tiling, tissue


def test_svs_and_pyramid_tiff_give_the_same_grid(cmu, cmu_tissue):
    everything = grid.TileGridSettings(min_tissue=0.0)
    a, b = (tiling.plan_tiles(s, t, everything) for s, t in zip(cmu, cmu_tissue))
    assert len(a) == (2220 // 224) * (2967 // 224)
    pd.testing.assert_frame_equal(
        a[["col", "row", "x", "y", "w", "h", "level"]],
        b[["col", "row", "x", "y", "w", "h", "level"]],
    )
    assert np.abs(a.tissue_fraction - b.tissue_fraction).mean() < 0.03
    tissue_a, tissue_b = (
        set(zip(*tiling.plan_tiles(s, t)[["x", "y"]].to_numpy().T)) for s, t in zip(cmu, cmu_tissue)
    )
    assert len(tissue_a & tissue_b) >= 0.95 * max(len(tissue_a), len(tissue_b)) > 30


def test_grid_options(cmu, cmu_tissue):
    slide, found = cmu[1], cmu_tissue[1]
    full = tiling.plan_tiles(slide, found, grid.TileGridSettings(min_tissue=0.0))
    half = tiling.plan_tiles(slide, found, grid.TileGridSettings(min_tissue=0.0, stride=112))
    assert len(half) == ((2220 - 224) // 112 + 1) * ((2967 - 224) // 112 + 1) and set(half.w) == {224}
    roi = tiling.plan_tiles(slide, found, grid.TileGridSettings(min_tissue=0.0, roi=(100, 200, 500, 700)))
    assert roi.x.min() == 100 and roi.y.min() == 200 and len(roi) == 2 * 3
    assert ((roi.x + roi.w) <= 600).all() and ((roi.y + roi.h) <= 900).all()
    sample = [tiling.plan_tiles(slide, found, grid.TileGridSettings(max_tiles=10, seed=s)) for s in (1, 1, 2)]
    assert len(sample[0]) == 10 and sample[0].equals(sample[1]) and not sample[0].equals(sample[2])
    assert sample[0].tissue_fraction.min() >= 0.5
    by_level = tiling.plan_tiles(slide, found, grid.TileGridSettings(level=2, min_tissue=0.0))
    assert set(by_level.level) == {2} and set(by_level.w) == {round(224 * slide.downsamples[2])}
    assert by_level.mpp.iloc[0] == pytest.approx(0.499 * 4, rel=0.01)
    assert len(full) == 117


def test_tiny_slide_yields_no_tiles(slides_dir):
    with slides.open_slide(slides_dir / "small.svs") as slide:
        found = tissue.find_tissue(slide)
        table = tiling.label_tiles(tiling.plan_tiles(slide, found), None)
        assert len(table) == 0 and {"x", "y", "w", "slide_path", "label", "fraction_1"} <= set(table.columns)
        with pytest.raises(ValueError, match=r"small\.svs.*larger than the slide.*--tile-size"):
            grid.check_tile_fits(slide, grid.TileGridSettings())
        small_tiles = tiling.tile_slide(slide, grid.TileGridSettings(tile_size=8, min_tissue=0.0))
        assert len(small_tiles.table) == 4


def test_tiles_on_whole_downsample_levels_are_pixel_aligned(synthetic_slide):
    """At a level with a whole-number downsample, tile positions are multiples of it, so OpenSlide copies
    level pixels instead of resampling them (which is slower and blurs)."""
    settings = grid.TileGridSettings(target_mpp=1.1, min_tissue=0.0, roi=(101, 51, 1500, 1500))
    with slides.open_slide(synthetic_slide) as slide:
        geo = grid.tile_geometry(slide, settings)
        assert (geo.level, geo.align, geo.size0, geo.stride0) == (1, 2, 493, 492)
        table = tiling.plan_tiles(slide, tissue.find_tissue(slide), settings)
        assert (
            (table.x % 2 == 0).all()
            and (table.y % 2 == 0).all()
            and (table.x.min(), table.y.min()) == (102, 52)
        )
        level1 = tifffile.imread(synthetic_slide, key=1)
        x, y, n = int(table.x.iloc[0]), int(table.y.iloc[0]), slides.read_size(493, 2.0)
        stored = level1[y // 2 : y // 2 + n, x // 2 : x // 2 + n]
        np.testing.assert_array_equal(slides.read_rgb(slide.reader, x, y, 1, (n, n)), stored)
        off_grid = slides.read_rgb(slide.reader, x + 1, y + 1, 1, (n, n)).astype(int)
        assert (
            np.abs(off_grid - stored).mean() > 1
            and np.abs(off_grid - level1[y // 2 + 1 :, x // 2 + 1 :][:n, :n]).mean() > 1
        )
