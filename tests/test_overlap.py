"""The `seams` stage (smoothsal/overlap.py): one run on half-stride tiles of a real slide, stitched from the
same stores without overlap (the non-overlapping sub-grid, no blending) and with overlap + window
blending; both containers valid NGFF, the table's scores those of the containers, overlap halving them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from ngff import assert_valid_ngff
from test_heatmaps import make_tiles, write_store
from test_seams import tile_maps

from smoothsal.errors import BadOption
from smoothsal.overlap import non_overlapping_rows, read_seam_table
from smoothsal.seams import container_seams

FALLOFF = {"original": 0.6, "backward_hook": 0.3}  # how far each method's maps fade at the tile border


def seam_run(cli, slides_dir: Path, root: Path) -> dict[str, Path]:
    """`smoothsal seams` on 128-px tiles at stride 64 over the upper-left 1024² px of CMU-1-Small-Region,
    with falloff maps (layer1, 32 px) for two methods. Returns the paths it wrote (and its inputs)."""
    slide = slides_dir / "CMU-1-Small-Region.svs"
    tiles = root / "tiles.parquet"
    table = make_tiles(slide, tiles, tile_size=128, stride=64, roi=(0, 0, 1024, 1024), min_tissue=0.0)
    stores = [
        write_store(root / f"{m}.zarr", table, m, {("gradient", "layer1"): tile_maps(table, 4, 32, f)})
        for m, f in FALLOFF.items()
    ]
    out = {"slide": slide, "tiles": tiles, "without": root / "without.ome.zarr", "with": root / "with.ome.zarr",
           "table": root / "seams.csv"}  # fmt: skip
    run = cli("seams", slide, "--saliency", *stores, "--tiles", tiles, "--without", out["without"],
              "--with", out["with"], "--table", out["table"])  # fmt: skip
    assert "seam score without → with overlap" in run.out
    return out


@pytest.fixture(scope="module")
def run(cli, slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return seam_run(cli, slides_dir, tmp_path_factory.mktemp("seams"))


def test_both_stitchings_come_from_the_same_stores(run: dict[str, Path]) -> None:
    table = pd.read_parquet(run["tiles"])
    assert len(table) == 15 * 15  # complete grid, stride 64 over 1024 px
    without, with_ = (zarr.open_group(run[k], mode="r") for k in ("without", "with"))
    boxes = np.asarray(without["tiles"][...])
    assert len(boxes) == 8 * 8 and (boxes[:, :2] % 128 == 0).all()  # the non-overlapping sub-grid
    assert with_["tiles"].shape == (len(table), 4)
    for group, blend in ((without, "none"), (with_, "window")):
        assert group["heatmaps/original/gradient/layer1"].attrs["smoothsal"]["blend"] == blend
    # without overlap every map pixel is its one tile's value: tile (row 2, col 2) of the sub-grid
    i = int(np.flatnonzero((table["x"] == 256) & (table["y"] == 256))[0])
    expected = tile_maps(table.iloc[[i]], 4, 32, FALLOFF["original"])[0]
    level0 = without["heatmaps/original/gradient/layer1/0"][64:96, 64:96]
    np.testing.assert_array_equal(level0, expected)
    for path in (run["without"], run["with"]):
        assert_valid_ngff(path)


def test_table_holds_the_containers_scores_and_overlap_halves_them(run: dict[str, Path]) -> None:
    seams = read_seam_table(run["table"])
    assert sorted(seams["method"]) == sorted(FALLOFF) and set(seams["layer"]) == {"layer1"}
    image = "heatmaps/{}/gradient/layer1"
    measured = {k: container_seams(run[k]) for k in ("without", "with")}
    for row in seams.itertuples(index=False):
        assert row.seams_without == pytest.approx(measured["without"][image.format(row.method)].score)
        assert row.seams_with == pytest.approx(measured["with"][image.format(row.method)].score)
        assert row.tiles_without == 64 and row.tiles_with == 225 and row.overlap == 2
        assert row.seams_without > 0.25 and row.seams_with <= 0.5 * row.seams_without, row
        assert row.ratio == pytest.approx(row.seams_with / row.seams_without)
    by = seams.set_index("method")["seams_without"]
    assert by["original"] > by["backward_hook"]  # the stronger falloff shows more


def test_non_overlapping_tiles_are_refused_with_one_line(cli, run: dict[str, Path], tmp_path: Path) -> None:
    plain = tmp_path / "plain.parquet"
    table = make_tiles(run["slide"], plain, tile_size=128, roi=(0, 0, 512, 512), min_tissue=0.0)
    with pytest.raises(BadOption, match="do not overlap by a whole fraction"):
        non_overlapping_rows(table, plain)
    store = write_store(tmp_path / "original.zarr", table, "original",
                        {("gradient", "layer1"): tile_maps(table, 4, 32, 0.5)})  # fmt: skip
    done = cli("seams", run["slide"], "--saliency", store, "--tiles", plain, "--without", tmp_path / "w.ome.zarr",
               "--with", tmp_path / "o.ome.zarr", "--table", tmp_path / "s.csv", expect=1)  # fmt: skip
    assert "plain.parquet" in done.err and "--stride" in done.err and len(done.err.strip().splitlines()) == 1
    assert not (tmp_path / "w.ome.zarr").exists() and not (tmp_path / "s.csv").exists()
