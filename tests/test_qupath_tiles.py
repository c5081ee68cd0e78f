"""`smoothsal export --qupath-tiles` (smoothsal/qupath_tiles.py): tile objects with measurements for QuPath.

The exported GeoJSON is read with `qupath_geojson`, a reader that follows QuPath's own import rules; the
same reader accepts GeoJSON as QuPath writes it (tests/data/qupath_written.geojson, written by hand from
QuPath's writer, `QuPathTypeAdapters`) and refuses what QuPath would refuse or silently drop.

The container is written by `smoothsal heatmaps` itself (tissue left out) from saliency stores in the
`smoothsal saliency` format whose maps sample a known field f(x, y) of level-0 px at each map pixel's
centre: overlapping tiles (128 px, stride 64) then blend to f, whatever the blend, so every object's
mean, positive mass and max are known; the per-tile tables carry known values per tile.
"""

from __future__ import annotations

import copy
import gzip
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
import yaml
from helpers import ROOT
from qupath_geojson import DETECTIONS, QuPathFormatError, load, read_objects
from test_heatmaps import make_tiles

from smoothsal import heatmaps
from smoothsal.cli import build_parser
from smoothsal.errors import BadOption
from smoothsal.qupath_tiles import SUBDIVISIONS, TileExportSettings, export_tiles, stride_cells
from smoothsal.store import StoreWriter
from smoothsal.tiles import tiles_sha256

pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated class Scaler:DeprecationWarning")

HERE = Path(__file__).parent
LAYERS = {"layer1": 4, "layer2": 8}  # name → level-0 px per map pixel (128-px tiles at ~1 level-0 px/px)
METHODS = {"original": 1.0, "backward_hook": 0.5}  # method → factor on the field


def field(x: np.ndarray, y: np.ndarray, factor: float) -> np.ndarray:
    """The known map, level-0 px coordinates: both signs, smooth."""
    return factor * (np.sin(x / 150.0) + np.cos(y / 97.0) - 0.3)


def write_store(path: Path, table: pd.DataFrame, method: str) -> Path:
    """A saliency store + results table (as `smoothsal saliency` writes them) sampling `field`."""
    n, size = len(table), int(table["tile_size"].iloc[0])
    maps = {}
    for layer, d in LAYERS.items():
        centres = (np.arange(size // d) + 0.5) * d
        xs = table["x"].to_numpy()[:, None, None] + centres[None, None, :]
        ys = table["y"].to_numpy()[:, None, None] + centres[None, :, None]
        maps[("gradient", layer)] = field(xs, ys, METHODS[method]).astype(np.float32)
    meta = {
        "version": "0.1.0", "slide_id": str(table["slide_id"].iloc[0]), "slide_path": str(table["slide_path"].iloc[0]),
        "method": method, "layers": list(LAYERS), "attributions": ["gradient"],
        "settings": {"arch": "resnet18", "num_classes": 2}, "tiles_sha256": tiles_sha256(table), "n_tiles": n,
    }  # fmt: skip
    i = np.arange(n, dtype=np.float64)
    rows = pd.DataFrame({
        "dataset": "d", "slide_id": table["slide_id"].to_numpy(), "method": method, "arch": "resnet18",
        "tile": np.arange(n), "x": table["x"].to_numpy(), "y": table["y"].to_numpy(), "w": table["w"].to_numpy(),
        "h": table["h"].to_numpy(), "label": np.where(np.arange(n) % 3 == 0, -1, np.arange(n) % 2),
        "target": 1, "task": "classification", "prob_0": 1 - i / n, "prob_1": i / n,
        "pd_all": i / 1000, "pd_target": i / 2000,
        "tv/gradient/layer1": i + 0.25, "tv/gradient/layer2": i + 0.5,
    })  # fmt: skip
    writer = StoreWriter(path, path.with_suffix(".parquet"), meta)
    writer.open({layer: v.shape[1:] for (_, layer), v in maps.items()}, size)
    writer.write_batch(0, n, maps, rows)
    writer.finish()
    return path


@pytest.fixture(scope="module")
def made(slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("qupath_tiles")
    slide = slides_dir / "CMU-1-Small-Region.svs"
    tiles = d / "tiles.parquet"
    # a partial grid (tissue only): overlapping 128-px tiles at stride 64
    table = make_tiles(slide, tiles, tile_size=128, stride=64, roi=(0, 0, 1024, 768), min_tissue=0.3)
    assert len(table) > 10 and int(table["w"].iloc[0]) == 128 and set(table["x"] % 64) == {0}
    stores = [write_store(d / f"{m}.zarr", table, m) for m in METHODS]
    settings = heatmaps.HeatmapSettings(tissue=False, chunk=256)
    container = heatmaps.make_heatmaps(slide, stores, tiles, d / "s.ome.zarr", settings, progress=False)
    return {
        "container": container,
        "table": table,
        "tables": [s.with_suffix(".parquet") for s in stores],
        "dir": d,
    }


def export(cli, made: dict, out: Path, *args: object) -> list:
    cli("export", made["container"], "--qupath-tiles", "--out", out, *args)
    data = load(out)
    assert data["smoothsal"]["kind"] == "qupath-tiles"
    return read_objects(data)


def cells_of(table: pd.DataFrame, stride: int = 64) -> set[tuple[int, int]]:
    """Every stride cell (x0, y0) that a tile covers, found independently of the exporter."""
    out = set()
    for x, y, w, h in table[["x", "y", "w", "h"]].to_numpy():
        out |= {(x + a, y + b) for a in range(0, w, stride) for b in range(0, h, stride)}
    return out


def expected(x0: float, y0: float, side: float, method: str, layer: str) -> dict[str, float]:
    d = LAYERS[layer]
    centres_x = np.arange(x0, x0 + side, d) + d / 2
    centres_y = np.arange(y0, y0 + side, d) + d / 2
    values = (
        field(centres_x[None, :], centres_y[:, None], METHODS[method]).astype(np.float32).astype(np.float64)
    )
    mpp = 0.499
    return {
        "mean": values.mean(), "max": values.max(),
        "positive mass µm^2": np.maximum(values, 0).sum() * (d * mpp) ** 2,
    }  # fmt: skip


# --- the reader follows QuPath ----------------------------------------------------------------------


def test_the_reader_accepts_geojson_as_qupath_writes_it():
    objects = read_objects(load(HERE / "data" / "qupath_written.geojson"))
    assert [o.object_type for o in objects] == ["annotation", "tile", "cell", "detection"]
    region, tile, cell, point = objects
    assert region.classification == ("Tumor", (200, 0, 0)) and region.locked and region.id is not None
    assert np.isnan(region.measurements["Mean tumour probability"])  # QuPath writes NaN as "NaN"
    assert region.measurements["Num Detections"] == 2.0
    assert tile.classification == ("Tumor: Positive", (200, 0, 0, 128)) and not tile.locked
    assert tile.measurements["Infinity test"] == np.inf
    assert cell.measurements == {"Nucleus: Area µm^2": 23.5, "Cell: Area µm^2": 96.0}
    assert point.classification is None and point.geometry.geom_type == "Point"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p["classification"].pop("color"), "needs a name (or names) and a color"),
        (lambda p: p.update(classification={"color": [1, 2, 3]}), "needs a name (or names) and a color"),
        (lambda p: p["classification"].update(color=[1, 2]), "not 0, 1, 3 or 4"),
        (lambda p: p["measurements"].update({"Area µm^2": "large"}), "not a number"),
        (lambda p: p.update(measurements="Area µm^2: 12"), "neither a map nor a list"),
        (lambda p: p["measurements"].update({"Area µm^2": None}), "not a number"),
    ],
)
def test_the_reader_refuses_what_qupath_refuses_or_drops(change, message):
    data = load(HERE / "data" / "qupath_written.geojson")
    bad = copy.deepcopy(data)
    change(bad["features"][0]["properties"])
    with pytest.raises(QuPathFormatError, match=re.escape(message)):
        read_objects(bad)
    with pytest.raises(QuPathFormatError, match="FeatureCollection"):
        read_objects(data["features"])


# --- the export ---------------------------------------------------------------------------------------


def test_objects_cover_each_stride_cell_once_with_the_maps_values_over_it(cli, made, tmp_path):
    objects = export(cli, made, tmp_path / "s.geojson", "--tables", *made["tables"])
    assert {o.object_type for o in objects} == {"tile"} and {"tile"} <= DETECTIONS
    assert {o.classification for o in objects} == {("smoothsal", (0, 114, 178))}
    table = made["table"]
    boxes = [o.geometry for o in objects]
    assert all(b.equals(shapely.box(*b.bounds)) and b.area == 64 * 64 for b in boxes)  # squares, level-0 px
    corners = [(int(b.bounds[0]), int(b.bounds[1])) for b in boxes]
    assert len(corners) == len(set(corners)) and set(corners) == cells_of(table)  # each cell once
    tiles = shapely.union_all(
        [shapely.box(x, y, x + w, y + h) for x, y, w, h in table[["x", "y", "w", "h"]].to_numpy()]
    )
    assert shapely.union_all(boxes).symmetric_difference(tiles).area == 0
    n = len(table)
    for o, (x0, y0) in zip(objects, corners, strict=True):
        m = o.measurements
        assert all(isinstance(v, float) for v in m.values())
        for method in METHODS:
            for layer in LAYERS:
                for stat, value in expected(x0, y0, 64, method, layer).items():
                    assert m[f"{method} gradient {layer} {stat}"] == pytest.approx(value, rel=2e-6, abs=1e-6)
        over = table.index[
            (table["x"] <= x0) & (x0 < table["x"] + 128) & (table["y"] <= y0) & (y0 < table["y"] + 128)
        ]
        i = over.to_numpy(np.float64)
        assert m["original probability class 1"] == pytest.approx((i / n).mean(), rel=1e-6)
        assert "original probability class 0" not in m  # two classes: the positive one only
        assert m["backward_hook TV gradient layer2"] == pytest.approx((i + 0.5).mean(), rel=1e-6)
        assert m["original PD all ×100"] == pytest.approx((i / 10).mean(), rel=1e-6)
        labels = np.where(over % 3 == 0, np.nan, over % 2)
        if np.isnan(labels).all():
            assert "label" not in m  # no value: left out, QuPath reads it as NaN
        else:
            assert m["label"] == pytest.approx(np.nanmean(labels))


def test_subdivided_gzipped_and_chosen_measurements(cli, made, tmp_path):
    out = tmp_path / "s.geojson.gz"
    objects = export(cli, made, out, "--gzip", "--qupath-subdivide", "2", "--qupath-methods", "backward_hook",
                     "--qupath-layers", "layer2", "--qupath-statistics", "mean", "max", "--qupath-object-type", "detection")  # fmt: skip
    assert gzip.decompress(out.read_bytes())[:1] == b"{"
    assert len(objects) == 4 * len(cells_of(made["table"])) and {o.object_type for o in objects} == {
        "detection"
    }
    assert {tuple(o.measurements) for o in objects} == {
        ("backward_hook gradient layer2 mean", "backward_hook gradient layer2 max")
    }
    for o in objects[:40]:
        x0, y0, x1, _ = o.geometry.bounds
        assert x1 - x0 == 32
        want = expected(x0, y0, 32, "backward_hook", "layer2")
        assert o.measurements["backward_hook gradient layer2 mean"] == pytest.approx(
            want["mean"], rel=2e-6, abs=1e-6
        )


def test_it_replaces_only_its_own_output(cli, made, tmp_path):
    mine = tmp_path / "s.geojson"
    export(cli, made, mine)
    export(cli, made, mine)  # its own: replaced
    theirs = tmp_path / "theirs.geojson"
    theirs.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    err = cli("export", made["container"], "--qupath-tiles", "--out", theirs, expect=1).err.strip()
    assert len(err.splitlines()) == 1 and "not an earlier `smoothsal export --qupath-tiles` output" in err
    assert json.loads(theirs.read_text())["features"] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--qupath-subdivide", "3"], "--qupath-subdivide must be one of 1, 2, 4"),
        (["--qupath-methods", "nope"], "--qupath-methods nope: not in"),
        (["--qupath-layers", "layer9"], "choose from layer1 layer2"),
        (["--qupath-statistics", "median"], "unknown 'median'"),
        (["--qupath-object-type", "annotation"], "--qupath-object-type must be tile or detection"),
        (["--object-type", "detection"], "--object-type: hot-spot options"),
        (["--gzip"], "name it s.geojson.gz"),
        (["--map", "original/gradient/layer1"], "hot-spot options, not for --qupath-tiles"),
        (["--tables", "missing.parquet"], "missing.parquet"),
    ],
)
def test_bad_options_give_one_line_and_exit_1(cli, made, tmp_path, args, message):
    err = cli(
        "export", made["container"], "--qupath-tiles", "--out", tmp_path / "s.geojson", *args, expect=1
    ).err
    assert (
        len(err.strip().splitlines()) == 1 and err.startswith("smoothsal export: error:") and message in err
    )
    assert not (tmp_path / "s.geojson").exists()


def test_tile_options_without_qupath_tiles_and_bad_names_give_one_line(cli, made, tmp_path):
    err = cli("export", made["container"], "--map", "original/gradient/layer1", "--gzip", "--out",
              tmp_path / "h.geojson", expect=1).err  # fmt: skip
    assert len(err.strip().splitlines()) == 1 and "options of --qupath-tiles" in err
    err = cli("export", made["container"], "--qupath-tiles", "--out", tmp_path / "s.txt", expect=1).err
    assert len(err.strip().splitlines()) == 1 and "name it so" in err


def test_a_20000_tile_slide_stays_under_a_million_objects_and_more_is_refused(made, tmp_path):
    side = np.arange(200) * 224
    boxes = np.array([[x, y, 448, 448] for y in side[:100] for x in side])  # 20,000 tiles, stride half a tile
    cells = stride_cells(boxes)
    assert cells.stride == 224 and len(cells.cols) == 201 * 101  # each covered cell once
    assert len(cells.cols) * max(SUBDIVISIONS) ** 2 < 1_000_000
    with pytest.raises(BadOption, match="use a smaller --qupath-subdivide"):
        export_tiles(made["container"], tmp_path / "s.geojson", TileExportSettings(max_objects=10))


def test_the_config_and_the_command_line_default_to_the_settings():
    """The workflow's config qupath and the command's options leave out nothing: their defaults are
    `TileExportSettings`' (the one source)."""
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    qp = {k: v["default"] for k, v in schema["properties"]["qupath"]["properties"].items()}
    t = TileExportSettings
    assert qp == {"tiles": False, "subdivide": t.subdivide, "statistics": list(t.statistics),
                  "tile_measures": list(t.tile_measures)}  # fmt: skip
    args = vars(build_parser().parse_args(["export", "c.ome.zarr", "--qupath-tiles", "--out", "o.geojson"]))
    assert (args["qupath_subdivide"], args["qupath_statistics"], args["qupath_tile_measures"]) == (
        t.subdivide, list(t.statistics), list(t.tile_measures))  # fmt: skip
    assert args["qupath_object_type"] == t.object_type and args["qupath_methods"] is None
