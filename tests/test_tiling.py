"""The `smoothsal tiles` stage: labels from annotations on a synthetic slide, and the command for real."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import (
    CMU,
    SYNTHETIC_MPP,
    SYNTHETIC_SIZE,
    TCGA,
    asap_xml,
    feature_collection,
    square,
)
from PIL import Image

from smoothsal import annotations, grid, slides, tiles, tiling
from smoothsal.tiles import read_tile_table

SIZE, MPP = SYNTHETIC_SIZE, SYNTHETIC_MPP  # the synthetic slide: a 224-px grid of 9 × 9 tiles at level 0
TUMOUR = (448, 448, 1232, 1120)  # x0, y0, x1, y1: tiles (col 2–4, row 2–4) whole, col 5 half (x 1120–1344)
HOLE = (672, 672, 896, 896)  # exactly tile (col 3, row 3)


def _fractions_by_tile(table, column):
    return {(r.col, r.row): getattr(r, column) for r in table.itertuples()}


def test_asap_polygon_labels_the_expected_tiles(synthetic_slide, tmp_path):
    xml = tmp_path / "synthetic.xml"
    xml.write_text(asap_xml([("_0", square(*TUMOUR)), ("_2", square(*HOLE))]))
    with slides.open_slide(synthetic_slide) as slide:
        assert slide.mpp == pytest.approx(MPP) and len(slide.downsamples) == 4
        tiled = tiling.tile_slide(
            slide,
            grid.TileGridSettings(min_tissue=0.0),
            annotations=annotations.read_annotations(xml),
            labels=tiling.LabelSettings(0.5),
        )
    table = tiled.table
    assert len(table) == 81
    tumour = _fractions_by_tile(table, "tumor_fraction")
    whole = {(c, r) for c in (2, 3, 4) for r in (2, 3, 4)} - {(3, 3)}
    for key, fraction in tumour.items():
        expected = 1.0 if key in whole else 0.5 if key[0] == 5 and key[1] in (2, 3, 4) else 0.0
        assert fraction == pytest.approx(expected, abs=1e-9), key
    assert set(zip(*table.loc[table.label == 1, ["col", "row"]].to_numpy().T)) == whole | {
        (5, 2),
        (5, 3),
        (5, 4),
    }
    on_tissue = _fractions_by_tile(table, "tissue_fraction")
    assert on_tissue[(0, 0)] == pytest.approx(1.0) and on_tissue[(8, 0)] == pytest.approx(0.0)
    assert table.fraction_0.add(table.fraction_1).eq(1).all()
    mask = annotations.tile_label_mask(tiled.annotations, 1120, 448, 224, 224)
    assert mask.shape == (224, 224) and (mask[:, :112] == 1).all() and (mask[:, 112:] == 0).all()
    small = annotations.tile_label_mask(tiled.annotations, 1120, 448, 224, 56)  # at a coarser tile resolution
    assert small.shape == (56, 56) and small.mean() == pytest.approx(0.5)


def test_geojson_classes_give_fractions_and_majority(synthetic_slide, tmp_path):
    path = tmp_path / "qupath.geojson"
    tumour_with_hole = [square(*TUMOUR), square(*HOLE)]  # a polygon with an interior ring
    stroma = square(0, 0, 448, 336)  # tiles (0–1, 0) whole, (0–1, 1) half
    path.write_text(json.dumps(feature_collection([("Tumor", tumour_with_hole), ("Stroma", stroma)])))
    class_map = annotations.parse_class_map("Tumor=1,Stroma=2")
    regions = annotations.read_annotations(path, class_map)
    with slides.open_slide(synthetic_slide) as slide:
        labels = tiling.LabelSettings(0.5, annotations.n_classes(class_map))
        table = tiling.tile_slide(
            slide, grid.TileGridSettings(min_tissue=0.0), annotations=regions, labels=labels
        ).table
    assert {"fraction_0", "fraction_1", "fraction_2", "majority_class"} <= set(table.columns)
    stroma_fraction = _fractions_by_tile(table, "fraction_2")
    majority = _fractions_by_tile(table, "majority_class")
    assert stroma_fraction[(0, 0)] == 1.0 and stroma_fraction[(1, 1)] == pytest.approx(0.5)
    assert majority[(0, 1)] == 2 and majority[(2, 2)] == 1 and majority[(5, 3)] == 1
    assert majority[(3, 3)] == 0 and majority[(8, 8)] == 0  # the hole, and plain background
    assert np.allclose(table[["fraction_0", "fraction_1", "fraction_2"]].sum(axis=1), 1.0)


def test_no_annotations_leave_label_columns_empty(cmu, cmu_tissue):
    table = tiling.label_tiles(tiling.plan_tiles(cmu[0], cmu_tissue[0]), None)
    assert (
        table.label.isna().all() and table.majority_class.isna().all() and table.tumor_fraction.isna().all()
    )


def test_labels_of_a_long_polygon_clipped_per_tile_equal_the_whole_polygon(annotations_dir):
    """Clipping before rasterising (so the cost per tile does not grow with a polygon's vertices) changes
    no pixel: on a 1,657-vertex Camelyon16 polygon, every tile's mask equals scikit-image's rasterisation
    of the whole polygon."""
    from skimage.draw import polygon as draw_polygon

    regions = annotations.read_annotations(annotations_dir / "tumor_001.xml")
    region = max(regions.regions, key=lambda r: len(r.exterior))
    assert len(region.exterior) > 1000
    (x0, y0), (x1, y1) = region.exterior.min(0).astype(int), region.exterior.max(0).astype(int)
    xs, ys = np.meshgrid(np.arange(x0, x1, 448), np.arange(y0, y1, 448))
    table = pd.DataFrame({"x": xs.ravel(), "y": ys.ravel(), "w": 448, "tile_size": 224})
    labelled = tiling.label_tiles(table, regions)
    assert 0 < labelled.tumor_fraction.mean() < 1 and labelled.tumor_fraction.max() == 1.0
    alone = annotations.Annotations(regions.path, (region,))
    partial = 0
    for x, y in table[["x", "y"]].to_numpy()[::2]:
        mask = annotations.tile_label_mask(alone, int(x), int(y), 448, 224)
        whole = np.zeros((224, 224), np.uint8)
        rows, cols = draw_polygon(
            (region.exterior[:, 1] - y) * 0.5 - 0.5, (region.exterior[:, 0] - x) * 0.5 - 0.5, (224, 224)
        )
        whole[rows, cols] = region.label
        np.testing.assert_array_equal(mask, whole)
        partial += 0 < (mask > 0).mean() < 1
    assert partial >= 5  # tiles the boundary crosses, where clipping matters


@pytest.fixture(scope="module")
def tiles_runs(cli, slides_dir, annotations_dir, synthetic_slide, tmp_path_factory):
    """name → (returncode, stdout, stderr, out path) for each `smoothsal tiles` case, run as real
    processes, all at once (it keeps the suite fast)."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "cut.xml").write_text('<?xml version="1.0"?><ASAP_Annotations><Annotations><Annotation')
    (tmp / "synthetic.xml").write_text(asap_xml([("_0", square(*TUMOUR)), ("_2", square(*HOLE))]))
    cases = {
        "cmu": [slides_dir / CMU, "--max-tiles", "20", "--seed", "1"],
        "synthetic": [
            synthetic_slide,
            "--annotations",
            tmp / "synthetic.xml",
            "--min-tissue",
            "0",
            "--label-threshold",
            "0.6",
        ],
        "tcga": [slides_dir / TCGA],
        "tcga_mpp": [slides_dir / TCGA, "--mpp", "0.25", "--target-mpp", "1.0"],
        "broken": [slides_dir / "broken.svs"],
        "small": [slides_dir / "small.svs"],
        "cut_xml": [slides_dir / CMU, "--annotations", tmp / "cut.xml"],
        "outside": [slides_dir / CMU, "--annotations", annotations_dir / "tumor_081.xml"],
    }
    procs = {}
    for name, args in cases.items():
        out = tmp / name / "tiles.parquet"
        procs[name] = (cli.popen("tiles", *args, "--out", out), out)
    results = {}
    for name, (proc, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        results[name] = (proc.returncode, stdout, stderr, out)
    return results


def test_command_writes_table_and_overview(tiles_runs):
    rc, stdout, stderr, out = tiles_runs["cmu"]
    assert rc == 0, stderr
    table = read_tile_table(out)
    assert len(table) == 20 and "20 tiles" in stdout
    labels = ["tumor_fraction", "label", "majority_class", "fraction_0", "fraction_1"]
    assert list(table.columns) == [*tiles.TABLE_COLUMNS, *labels]
    assert set(table.slide_id) == {"CMU-1-Small-Region"} and Path(table.slide_path.iloc[0]).is_file()
    assert (table.tissue_fraction >= 0.5).all() and set(table.w) == {224} and table.label.isna().all()
    assert Image.open(out.with_suffix(".png")).size[0] >= 400
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiles.parquet", "tiles.png"]


def test_command_labels_from_annotations(tiles_runs):
    rc, _, stderr, out = tiles_runs["synthetic"]
    assert rc == 0, stderr
    table = read_tile_table(out)
    positive = set(zip(*table.loc[table.label == 1, ["col", "row"]].to_numpy().T))
    assert positive == {(c, r) for c in (2, 3, 4) for r in (2, 3, 4)} - {(3, 3)}  # half tiles < 0.6
    assert _fractions_by_tile(table, "tumor_fraction")[(5, 3)] == pytest.approx(0.5)


def test_command_slide_without_mpp(tiles_runs, slides_dir):
    rc, _, stderr, out = tiles_runs["tcga"]
    assert rc == 1 and not out.exists()
    assert stderr.count("\n") == 1 and stderr.startswith("smoothsal tiles: error: ")
    assert str(slides_dir / TCGA) in stderr and "no µm/px" in stderr and "--mpp X" in stderr
    rc, _, stderr, out = tiles_runs["tcga_mpp"]
    assert rc == 0, stderr
    table = read_tile_table(out)
    assert len(table) >= 5 and set(table.level) == {1} and set(table.mpp) == {1.0} and set(table.w) == {896}


@pytest.mark.parametrize(
    "case, names, says",
    [
        ("broken", "broken.svs", "cannot read this file as a slide"),
        ("small", "small.svs", "larger than the slide"),
        ("cut_xml", "cut.xml", "malformed ASAP XML"),
        ("outside", "tumor_081.xml", "annotation file of this slide"),
    ],
)
def test_command_bad_input_is_one_line_error(tiles_runs, case, names, says):
    rc, _stdout, stderr, out = tiles_runs[case]
    assert rc == 1 and not out.exists() and not out.parent.exists()
    assert stderr.startswith("smoothsal tiles: error: ") and stderr.count("\n") == 1, stderr
    assert names in stderr and says in stderr and "Traceback" not in stderr
