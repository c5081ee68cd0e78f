"""smoothsal.slides on real slides (OpenSlide reads, no mocks): opening, µm/px, reading pixels."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TCGA, RecordingReader
from skimage.transform import downscale_local_mean

from smoothsal import grid, slides, tiling


def test_mpp_comes_from_metadata(cmu):
    assert [s.mpp for s in cmu] == [pytest.approx(0.499), pytest.approx(0.499)]
    assert (
        slides.mpp_from_properties({"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "40000"}) == 0.25
    )
    assert slides.mpp_from_properties({"tiff.ResolutionUnit": "inch", "tiff.XResolution": "101600"}) == 0.25
    assert slides.mpp_from_properties({"tiff.ResolutionUnit": "none", "tiff.XResolution": "5"}) is None


def test_slide_without_mpp_needs_an_override(slides_dir):
    path = slides_dir / TCGA
    with pytest.raises(ValueError) as err:
        slides.open_slide(path)
    message = str(err.value)
    assert str(path) in message and "no µm/px" in message and "--mpp" in message and "\n" not in message
    with slides.open_slide(path, mpp=0.25) as slide:
        assert slide.mpp == 0.25 and slide.slide_id == "TCGA-CR-7395-01A-01-TS1"


def test_default_tiff_resolution_is_not_taken_as_mpp(slides_dir):
    with pytest.raises(ValueError, match=r"boxes\.tiff.*no usable µm/px.*352.*--mpp"):
        slides.open_slide(slides_dir / "boxes.tiff")


def test_unreadable_slide_is_one_line_error_naming_the_file(slides_dir):
    with pytest.raises(ValueError) as err:
        slides.open_slide(slides_dir / "broken.svs")
    assert str(slides_dir / "broken.svs") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope.svs"):
        slides.open_slide(slides_dir / "nope.svs")


def test_best_level_is_the_coarsest_fine_enough():
    downsamples = (1.0, 4.000119, 16.0008, 32.003)
    assert slides.best_level(downsamples, 1.0) == 0
    assert slides.best_level(downsamples, 3.9) == 0
    assert slides.best_level(downsamples, 4.0) == 1  # a hair coarser than asked still counts
    assert slides.best_level(downsamples, 20.0) == 2
    assert slides.best_level(downsamples, 0.5) == 0
    assert slides.best_level(downsamples, 1000.0) == 3


def test_single_level_slide_reads_level_zero_in_bounded_blocks(cmu):
    spy = RecordingReader(cmu[0].reader)
    low = slides.read_low_res(slides.Slide(cmu[0].path, spy, cmu[0].mpp, "x"), mpp=8.0)
    assert low.level == 0 and low.downsample == 16 and low.image.shape == (186, 139, 3)
    assert len(spy.reads) == 4 and all(max(size) <= slides.MASK_BLOCK for _, size in spy.reads)
    whole = slides.read_rgb(cmu[0].reader, 0, 0, 0, cmu[0].dimensions)  # one read: fine for this small slide
    expected = np.round(downscale_local_mean(whole, (16, 16, 1), cval=255)).astype(np.uint8)
    np.testing.assert_array_equal(low.image, expected)


@pytest.mark.parametrize("target_mpp, tiff_level", [(0.5, 0), (1.0, 1)])
def test_tiles_from_svs_and_pyramid_tiff_are_close(cmu, cmu_tissue, target_mpp, tiff_level):
    settings = grid.TileGridSettings(target_mpp=target_mpp)
    a, b = (tiling.plan_tiles(s, t, settings) for s, t in zip(cmu, cmu_tissue))
    assert (a.level.iloc[0], b.level.iloc[0]) == (
        0,
        tiff_level,
    )  # the pyramid has a level at 1.0 µm/px
    both = a.merge(b, on=["x", "y"], suffixes=("", "_tiff"))
    assert len(both) >= 10
    diffs, neighbour_diffs = [], []
    for row in both.head(12).itertuples():
        tile_a = slides.read_tile(cmu[0].reader, row.x, row.y, row.w, row.level, row.tile_size) / 255.0
        tile_b = slides.read_tile(cmu[1].reader, row.x, row.y, row.w, row.level_tiff, row.tile_size) / 255.0
        shifted = (
            slides.read_tile(cmu[1].reader, row.x + row.w // 2, row.y, row.w, row.level_tiff, row.tile_size)
            / 255.0
        )
        assert tile_a.shape == tile_b.shape == (row.tile_size, row.tile_size, 3)
        diffs.append(np.abs(tile_a - tile_b).mean())
        neighbour_diffs.append(np.abs(tile_a - shifted).mean())
    assert max(diffs) < 0.05  # JPEG re-encoding (+ one resize at 1 µm/px)
    assert np.mean(diffs) < 0.5 * np.mean(neighbour_diffs)  # and the tolerance does tell tiles apart
