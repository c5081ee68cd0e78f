"""Demo data (`smoothsal demo-data`, smoothsal.demo) at reduced size: OpenSlide reads it with its µm/px,
the same seed gives the same bytes, tumour nuclei differ as designed, tiles take labels from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
from helpers import DEMO_SIZE as SIZE
from helpers import DEMO_SLIDES as SLIDES
from helpers import demo_data, spec
from skimage.measure import points_in_poly

from smoothsal import demo
from smoothsal.annotations import read_annotations
from smoothsal.tiles import read_tile_table
from smoothsal.tissue import hsv_saturation


def test_files_and_openslide_mpp(demo_dir: Path) -> None:
    for name in SLIDES:
        slide, annotation, nuclei = demo.slide_paths(demo_dir, spec(name))
        assert slide.is_file() and annotation.is_file() and nuclei.is_file()
        with openslide.OpenSlide(slide) as reader:
            assert reader.properties["openslide.vendor"] == "generic-tiff"
            assert float(reader.properties["openslide.mpp-x"]) == pytest.approx(demo.MPP)
            assert float(reader.properties["openslide.mpp-y"]) == pytest.approx(demo.MPP)
            assert reader.dimensions == (SIZE, SIZE)
            assert reader.level_count >= 2 and reader.level_downsamples[1] == pytest.approx(2.0)
            # lossless: level 0 as OpenSlide reads it is the rendered image
            rgb = demo.render_slide(spec(name), SIZE)[0]
            region = np.asarray(reader.read_region((300, 200), 0, (256, 128)).convert("RGB"))
            np.testing.assert_array_equal(region, rgb[200:328, 300:556])
    assert not list(demo_dir.rglob("*.partial-*"))


def test_same_seed_same_bytes_other_seed_other_slide(cli, demo_dir: Path, tmp_path: Path) -> None:
    """Also side by side (--processes 2): the same files as one after the other."""
    for name, seed, processes in (("a", "0", "1"), ("b", "0", "2"), ("c", "1", "2")):
        demo_data(cli, tmp_path / name, "--size", "512", "--slides", "tumor_001", "digi_003", "--seed", seed,
                  "--processes", processes)  # fmt: skip
    for slide in ("tumor_001", "digi_003"):
        for a, b, c in zip(*(demo.slide_paths(tmp_path / d, spec(slide)) for d in "abc"), strict=True):
            assert a.read_bytes() == b.read_bytes()
            assert a.read_bytes() != c.read_bytes()


def test_tumour_nuclei_are_larger_darker_denser(demo_dir: Path) -> None:
    rgb, nuclei, layout = demo.render_slide(spec("tumor_001"), SIZE)
    slide = demo.slide_paths(demo_dir, spec("tumor_001"))[0]
    np.testing.assert_array_equal(nuclei, demo.read_nuclei_mask(slide))
    yx = np.mgrid[0:SIZE, 0:SIZE].reshape(2, -1).T[:, ::-1] + 0.5
    tissue = points_in_poly(yx, layout.tissue).reshape(SIZE, SIZE)
    tumour = np.zeros_like(tissue)
    for t in layout.tumours:
        tumour |= points_in_poly(yx, t).reshape(SIZE, SIZE)
    normal = tissue & ~tumour
    assert tumour.sum() > 0.2 * tissue.sum()
    darkness = 255 - rgb.mean(-1)
    # nuclei are the dark purple pixels; tumour nuclei cover more area and are darker
    assert darkness[nuclei & normal].mean() > darkness[~nuclei & normal].mean() + 40
    assert nuclei[tumour].mean() > 2 * nuclei[normal].mean()
    assert darkness[nuclei & tumour].mean() > darkness[nuclei & normal].mean() + 10
    # the stroma looks the same on both: the difference is in the nuclei
    stroma_t, stroma_n = rgb[tumour & ~nuclei].mean(0), rgb[normal & ~nuclei].mean(0)
    assert np.abs(stroma_t - stroma_n).max() < 12
    glass = ~tissue
    assert hsv_saturation(rgb[glass][None]).mean() < 0.02 and rgb[glass].mean() > 235


def test_tiles_get_labels_from_the_annotations(demo_dir: Path, demo_tiles: dict[str, Path]) -> None:
    tumour = read_tile_table(demo_tiles["tumor_001"])
    layout = demo.plan_layout(spec("tumor_001"), SIZE, seed=0)
    centres = tumour[["x", "y"]].to_numpy(float) + tumour[["w"]].to_numpy(float) / 2
    inside = np.zeros(len(tumour), bool)
    for t in layout.tumours:
        inside |= points_in_poly(centres, t)
    assert len(tumour) >= 20 and tumour["label"].notna().all()
    assert set(tumour["label"]) == {0, 1}
    deep = tumour["tumor_fraction"] > 0.9
    assert deep.any() and (tumour.loc[deep, "label"] == 1).all() and inside[deep.to_numpy()].all()
    assert (tumour.loc[~inside & (tumour["tumor_fraction"] < 0.1).to_numpy(), "label"] == 0).all()

    normal = read_tile_table(demo_tiles["normal_001"])  # its XML has no tumour polygon: every tile is label 0
    assert len(read_annotations(demo.slide_paths(demo_dir, spec("normal_001"))[1]).regions) == 0
    assert len(normal) >= 20 and normal["label"].notna().all() and (normal["label"] == 0).all()

    digi = read_tile_table(demo_tiles["digi_001"])
    assert {1, 2} <= set(digi["majority_class"]) and "fraction_2" in digi
    annotated = digi["fraction_1"] + digi["fraction_2"]  # the tissue is all annotated, the glass not
    np.testing.assert_allclose(annotated, digi["tissue_fraction"], atol=0.15)  # mask: 8 µm/px


def test_bad_input_is_one_line_error(cli, tmp_path: Path) -> None:
    assert "--size must be a multiple of 256" in demo_data(cli, tmp_path, "--size", "1000", expect=1)
    assert "unknown demo slides" in demo_data(cli, tmp_path, "--slides", "tumor_999", expect=1)
    assert "--processes must be >= 1" in demo_data(cli, tmp_path, "--processes", "0", expect=1)
