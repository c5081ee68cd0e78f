"""`smoothsal heatmaps`: stitched OME-Zarr containers from per-tile saliency maps.

Most tests write saliency stores in the `smoothsal saliency` format (contracts: root attrs `smoothsal`,
one [n_tiles, h, w] float32 array per attribution/layer) with known maps, so stitching can be checked
exactly; the last test runs the real `tiles` → `saliency` → `heatmaps` chain.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import zarr
from ngff import assert_valid_ngff
from ome_zarr.io import parse_url
from ome_zarr.reader import Multiscales, Reader

from smoothsal import files, heatmaps, slides
from smoothsal.container import open_container
from smoothsal.grid import TileGridSettings
from smoothsal.metrics import total_variation
from smoothsal.store import StoreWriter
from smoothsal.tiles import read_tile_table, tiles_sha256, write_tile_table
from smoothsal.tiling import tile_slide

# ome-zarr-py warns about its own deprecated Scaler when its writer is imported
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated class Scaler:DeprecationWarning")

SLIDE = "CMU-1-Small-Region.svs"  # 2220×2967 px, 0.499 µm/px
LAYERS = {"layer1": 4, "layer2": 8}  # name → stride


# --- builders -------------------------------------------------------------------------------------


def make_tiles(slide_path: Path, out: Path, **grid: object) -> pd.DataFrame:
    """A real tile table of the slide (as `smoothsal tiles` writes it)."""
    with slides.open_slide(slide_path) as slide:
        table = tile_slide(slide, TileGridSettings(**grid)).table
    write_tile_table(table, out)
    return table


def write_store(
    path: Path, table: pd.DataFrame, method: str, maps: dict[tuple[str, str], np.ndarray],
    settings: dict | None = None, **meta: object,
) -> Path:  # fmt: skip
    """A saliency store holding the given [n, h, w] maps, written by the store's own writer (with its
    results table beside it) as `smoothsal saliency` writes it."""
    attributions = list(dict.fromkeys(a for a, _ in maps))
    layers = list(dict.fromkeys(layer for _, layer in maps))
    meta = {
        "version": "0.1.0", "slide_id": str(table["slide_id"].iloc[0]),
        "slide_path": str(table["slide_path"].iloc[0]), "method": method, "layers": layers,
        "attributions": attributions, "settings": {"arch": "resnet18", "num_classes": 2, **(settings or {})},
        "tiles_sha256": tiles_sha256(table), "n_tiles": len(table),
    } | meta  # fmt: skip
    writer = StoreWriter(path, path.with_suffix(".parquet"), meta)
    writer.open(
        {layer: values.shape[1:] for (_, layer), values in maps.items()}, int(table["tile_size"].iloc[0])
    )
    writer.write_batch(0, len(table), maps, pd.DataFrame({"tile": np.arange(len(table))}))
    writer.finish()
    return path


def random_maps(table: pd.DataFrame, seed: int = 0, layers: dict[str, int] = LAYERS) -> dict:
    rng = np.random.default_rng(seed)
    size = int(table["tile_size"].iloc[0])
    return {
        ("gradient", layer): rng.normal(size=(len(table), size // s, size // s)).astype(np.float32)
        for layer, s in layers.items()
    }


def level(container: Path, path: str, k: int = 0) -> np.ndarray:
    return zarr.open_group(container, mode="r")[f"{path}/{k}"][...]


@pytest.fixture(scope="module")
def cmu(slides_dir: Path) -> Path:
    return slides_dir / SLIDE


@pytest.fixture(scope="module")
def grid(cmu: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """128-px tiles at 0.5 µm/px (128 level-0 px) in the upper part of the slide, no overlap."""
    out = tmp_path_factory.mktemp("grid") / "tiles.parquet"
    return out, make_tiles(cmu, out, tile_size=128, roi=(0, 0, 2220, 1400), min_tissue=0.3)


@pytest.fixture(scope="module")
def overlapping(cmu: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """A complete grid of 128-px tiles with stride 64: every inner pixel lies in 4 tiles."""
    out = tmp_path_factory.mktemp("overlap") / "tiles.parquet"
    return out, make_tiles(cmu, out, tile_size=128, stride=64, roi=(0, 0, 1024, 1024), min_tissue=0.0)


# --- stitching ------------------------------------------------------------------------------------


@pytest.mark.parametrize("blend", heatmaps.BLENDS)
def test_non_overlapping_tiles_land_exactly_and_empty_chunks_are_not_written(cmu, grid, tmp_path, blend):
    tiles, table = grid
    maps = random_maps(table)
    store = write_store(tmp_path / "original.zarr", table, "original", maps)
    settings = heatmaps.HeatmapSettings(blend=blend, chunk=256, tissue=False)
    out = heatmaps.make_heatmaps(cmu, [store], tiles, tmp_path / "s.ome.zarr", settings, progress=False)
    assert_valid_ngff(out)
    for (attribution, layer), values in maps.items():
        path = f"heatmaps/original/{attribution}/{layer}"
        stitched = level(out, path)
        d = 128 // values.shape[1]
        h = values.shape[1]
        covered = np.zeros(stitched.shape, bool)
        for i, (x, y) in enumerate(table[["x", "y"]].to_numpy()):
            r, c = y // d, x // d
            np.testing.assert_array_equal(stitched[r : r + h, c : c + h], values[i])
            covered[r : r + h, c : c + h] = True
        assert np.isnan(stitched[~covered]).all()
        # chunk files exist exactly for the 256-px blocks that hold a tile (background chunks are skipped)
        rows, cols = np.nonzero(covered)
        expected = {f"{r}/{c}" for r, c in zip(rows // 256, cols // 256)}
        level0 = out / path / "0"
        written = {f"{r.name}/{c.name}" for r in level0.iterdir() if r.is_dir() for c in r.iterdir()}
        assert written == expected
        assert len(expected) < np.ceil(stitched.shape[0] / 256) * np.ceil(stitched.shape[1] / 256)


def test_window_blending_has_no_seams_and_mean_and_none_differ_where_tiles_overlap(
    cmu, overlapping, tmp_path
):
    tiles, table = overlapping
    n, h, d = len(table), 32, 4  # layer1 maps: 32 px per 128-px tile
    x, y = table["x"].to_numpy(), table["y"].to_numpy()
    centres = (np.arange(h) + 0.5) * d

    def field(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        return np.sin(xs / 150.0)[None, :] + np.cos(ys / 200.0)[:, None]

    smooth = np.stack([field(x[i] + centres, y[i] + centres) for i in range(n)]).astype(np.float32)
    rng = np.random.default_rng(1)
    offsets = rng.uniform(-1, 1, n).astype(np.float32)
    cases = {
        "constant": np.full((n, h, h), 0.7, np.float32),
        "smooth": smooth,
        "offset": smooth + offsets[:, None, None],  # tiles disagree, as real tile maps do at borders
        "values": np.broadcast_to(offsets[:, None, None], (n, h, h)).copy(),
    }
    results: dict[tuple[str, str], np.ndarray] = {}
    for blend in heatmaps.BLENDS:
        stores = [
            write_store(tmp_path / f"{name}.zarr", table, name, {("gradient", "layer1"): values})
            for name, values in cases.items()
        ]
        settings = heatmaps.HeatmapSettings(blend=blend, chunk=256, tissue=False)
        out = heatmaps.make_heatmaps(
            cmu, stores, tiles, tmp_path / f"{blend}.ome.zarr", settings, progress=False
        )
        assert_valid_ngff(out)
        for name in cases:
            results[blend, name] = level(out, f"heatmaps/{name}/gradient/layer1")

    shape = results["none", "constant"].shape
    count, total, last = np.zeros(shape), np.zeros(shape), np.full(shape, np.nan)
    for i in range(n):
        box = np.s_[y[i] // d : y[i] // d + h, x[i] // d : x[i] // d + h]
        count[box] += 1
        total[box] += offsets[i]
        last[box] = offsets[i]
    covered = count > 0
    assert (count > 1).sum() > 0.5 * covered.sum()
    grid_field = field((np.arange(shape[1]) + 0.5) * d, (np.arange(shape[0]) + 0.5) * d)
    for blend in heatmaps.BLENDS:
        assert np.isnan(results[blend, "constant"][~covered]).all()
        np.testing.assert_allclose(results[blend, "constant"][covered], 0.7, rtol=1e-6)
        np.testing.assert_allclose(results[blend, "smooth"][covered], grid_field[covered], atol=1e-5)
    # mean = average of the covering tiles, none = the last one; alike where one tile covers
    np.testing.assert_allclose(
        results["mean", "values"][covered], (total / np.maximum(count, 1))[covered], atol=1e-6
    )
    np.testing.assert_array_equal(results["none", "values"][covered], last[covered])
    one = count == 1
    for blend in ("mean", "window"):
        np.testing.assert_allclose(results[blend, "values"][one], last[one], atol=1e-6)
    assert not np.allclose(results["mean", "values"][count > 1], results["none", "values"][count > 1])

    # seams: the largest step between neighbouring pixels, beyond the field's own steps
    def worst_step(a: np.ndarray) -> float:
        r = a - grid_field
        return max(np.nanmax(np.abs(np.diff(r, axis=0))), np.nanmax(np.abs(np.diff(r, axis=1))))

    steps = {blend: worst_step(results[blend, "offset"]) for blend in heatmaps.BLENDS}
    assert steps["none"] > 0.5 and steps["mean"] > 0.3  # tile borders show as jumps
    # window: neighbouring weights differ by at most ~π/32 of the tile maps' 32 px, so steps stay ~10× smaller
    assert steps["window"] < 0.2 * steps["none"] and steps["window"] < 0.5 * steps["mean"], steps


# --- the container --------------------------------------------------------------------------------


def _check_multiscales(
    path: Path, ngff: str, lead: int, pixel_um: float, extent_um: tuple[float, float]
) -> None:
    """Open one image with ome-zarr-py's reader and check axes, datasets, scales, pyramid and extent."""
    nodes = list(Reader(parse_url(path))())
    assert nodes and any(isinstance(s, Multiscales) for s in nodes[0].specs), path
    node = nodes[0]
    names = [a["name"] for a in node.metadata["axes"]]
    assert names == ["c", "y", "x"][1 - lead :]
    assert all(a.get("unit") == "micrometer" for a in node.metadata["axes"][lead:])
    shapes = [d.shape for d in node.data]
    transforms = node.metadata["coordinateTransformations"]
    assert len(transforms) == len(shapes) >= 1
    for k, (shape, tf) in enumerate(zip(shapes, transforms)):
        scale = tf[0]["scale"]
        assert tf[0]["type"] == "scale" and np.allclose(scale[lead:], pixel_um * 2**k)
        # physical size of every level = the slide's, within one pixel of that level
        for axis in (0, 1):
            assert abs(shape[lead + axis] * scale[lead + axis] - extent_um[axis]) <= scale[lead + axis]
        assert max(shape[lead:]) >= 512 or k == len(shapes) - 1
    assert max(shapes[-1][lead:]) < 512
    arr = zarr.open_array(path / "0", mode="r")
    assert all(c >= 256 or c == s for c, s in zip(arr.chunks[lead:], arr.shape[lead:]))
    group = zarr.open_group(path, mode="r")
    if ngff == "0.4":
        assert (path / ".zattrs").is_file() and group.attrs["multiscales"][0]["version"] == "0.4"
    else:
        assert (path / "zarr.json").is_file() and group.attrs["ome"]["version"] == "0.5"


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_container_opens_in_ome_zarr_reader_at_the_slides_physical_size(cli, cmu, grid, tmp_path, ngff):
    tiles, table = grid
    stores = [
        write_store(tmp_path / f"{m}.zarr", table, m, random_maps(table, seed=s))
        for s, m in enumerate(("original", "backward_hook"))
    ]
    annotation = tmp_path / "a.geojson"
    polygon = [[100, 100], [900, 120], [800, 700], [100, 100]]
    annotation.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": {"type": "Polygon", "coordinates": [polygon]},
        "properties": {"name": "t1", "classification": {"name": "Tumor"}}}]}))  # fmt: skip
    out = tmp_path / "slide.ome.zarr"
    args = ["heatmaps", str(cmu), "--saliency", *map(str, stores), "--tiles", str(tiles), "--ngff", ngff,
            "--annotations", str(annotation), "--out", str(out), "--no-progress",
            "--ome-tiff", "heatmaps/backward_hook/gradient/layer1", str(tmp_path / "bh.ome.tif")]  # fmt: skip
    cli(*args)
    assert_valid_ngff(out)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial left beside it

    meta = zarr.open_group(out, mode="r").attrs["smoothsal"]
    with slides.open_slide(cmu) as slide:
        size, mpp = slide.dimensions, slide.mpp
        tissue_ref = slides.read_low_res(slide, 2.0)
    assert meta["slide_size_px"] == list(size) and meta["slide_mpp"] == pytest.approx(mpp)
    assert meta["slide_id"] == "CMU-1-Small-Region" and meta["version"] and meta["settings"]["ngff"] == ngff
    assert meta["settings"]["tiles_sha256"] == tiles_sha256(table)
    kinds = [(i["kind"], i.get("method"), i.get("attribution"), i.get("layer")) for i in meta["images"]]
    assert kinds == [("tissue", None, None, None)] + [
        ("heatmap", m, "gradient", layer) for m in ("original", "backward_hook") for layer in LAYERS
    ]
    assert meta["annotations"] == [{"class": 1, "name": "t1", "vertices": polygon}]
    tiles_array = zarr.open_array(out / meta["tiles"], mode="r")[...]
    np.testing.assert_array_equal(tiles_array, table[["x", "y", "w", "h"]].to_numpy())

    extent = (size[1] * mpp, size[0] * mpp)  # (y, x) µm
    for image in meta["images"]:
        path = out / image["path"]
        if image["kind"] == "tissue":
            _check_multiscales(path, ngff, 1, tissue_ref.downsample * mpp, extent)
            tissue = np.moveaxis(level(out, "tissue"), 0, -1)
            assert tissue.dtype == np.uint8 and tissue.shape == tissue_ref.image.shape
            assert np.abs(tissue.astype(int) - tissue_ref.image).mean() < 1.0
            omero = zarr.open_group(path).attrs.asdict()
            omero = omero.get("ome", omero)["omero"]
            assert [c["color"] for c in omero["channels"]] == ["FF0000", "00FF00", "0000FF"]
        else:
            stride = LAYERS[image["layer"]]
            pixel_um = table["mpp"].iloc[0] * stride  # the tile map's pixel size
            _check_multiscales(path, ngff, 0, pixel_um, extent)
            attrs = zarr.open_group(path, mode="r").attrs["smoothsal"]
            assert (attrs["method"], attrs["layer"]) == (image["method"], image["layer"])
            assert level(out, image["path"]).dtype == np.float32

    # the OME-TIFF export: same pyramid, same pixel size, readable as OME by tifffile
    image = "heatmaps/backward_hook/gradient/layer1"
    with tifffile.TiffFile(tmp_path / "bh.ome.tif") as tif:
        assert tif.is_ome and tif.series[0].axes == "YX"
        levels = tif.series[0].levels
        group = zarr.open_group(out / image, mode="r")
        assert len(levels) == len([k for k in group.array_keys() if k.isdigit()]) >= 2
        for k, lev in enumerate(levels):
            np.testing.assert_array_equal(lev.asarray(), group[str(k)][...])
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        assert pixels["PhysicalSizeX"] == pytest.approx(table["mpp"].iloc[0] * LAYERS["layer1"])


def stitch_command(slide: Path, store: Path, tiles: Path, out: Path) -> list:
    """`smoothsal heatmaps` of one store in 256-px chunks (several blocks: room for an interruption)."""
    return [
        "heatmaps",
        slide,
        "--saliency",
        store,
        "--tiles",
        tiles,
        "--chunk",
        "256",
        "--out",
        out,
        "--no-progress",
    ]


def test_killed_job_leaves_no_container_and_a_rerun_completes_it(cli, cmu, grid, tmp_path):
    tiles, table = grid
    store = write_store(tmp_path / "original.zarr", table, "original", random_maps(table))
    out = tmp_path / "s.ome.zarr"
    cmd = stitch_command(cmu, store, tiles, out)
    killed = cli.process(*cmd, kill_at="heatmaps.block=2")  # SIGKILLs itself after 2 stitched blocks
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    (partial,) = files.partial_paths(out)  # .s.ome.zarr.partial-PID of the killed writer
    assert (partial / "tissue" / "0").is_dir()  # it died mid-write
    cli(*cmd)
    assert_valid_ngff(out)
    assert not partial.exists() and files.partial_paths(out) == []
    meta = open_container(out).meta
    assert [i["path"] for i in meta["images"]][-1] == "heatmaps/original/gradient/layer2"
    assert np.isfinite(level(out, "heatmaps/original/gradient/layer2")).any()


# --- bad input ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(cmu, grid, slides_dir, tmp_path_factory) -> dict[str, Path]:
    """Good stores of the CMU tiles plus stores and tables that do not fit them."""
    tiles, table = grid
    d = tmp_path_factory.mktemp("bad")
    maps = random_maps(table)
    other = make_tiles(
        slides_dir / "CMU-1-Small-Region-pyramid.tiff", d / "pyramid_tiles.parquet", tile_size=128
    )
    shuffled = table.iloc[::-1].reset_index(drop=True)
    zarr.open_group(d / "empty.zarr", mode="w", zarr_format=2)
    return {
        "slide": cmu,
        "pyramid": slides_dir / "CMU-1-Small-Region-pyramid.tiff",
        "tiles": tiles,
        "other_tiles": d / "pyramid_tiles.parquet",
        "original": write_store(d / "original.zarr", table, "original", maps),
        "backward_hook": write_store(d / "backward_hook.zarr", table, "backward_hook", maps),
        "other_store": write_store(d / "other.zarr", other, "original", random_maps(other)),
        "short": write_store(d / "short.zarr", table.iloc[:-1], "backward_hook", {k: v[:-1] for k, v in maps.items()}),
        "resorted": write_store(d / "resorted.zarr", shuffled, "backward_hook", maps),
        "layers": write_store(d / "layers.zarr", table, "backward_hook", random_maps(table, layers={"layer1": 4})),
        "arch": write_store(d / "arch.zarr", table, "backward_hook", maps, settings={"arch": "resnet50"}),
        "empty": d / "empty.zarr",
    }  # fmt: skip


BAD = {  # case: (slide, stores, tiles, files the message must name, words it must contain)
    "tiles of another slide": ("slide", ["original"], "other_tiles", ["other_tiles", "slide"], "made from"),
    "slide not the tiles' slide": ("pyramid", ["original"], "tiles", ["pyramid", "tiles"], "not this slide"),
    "store of another slide": ("slide", ["other_store"], "tiles", ["other_store", "tiles"], "tiles"),
    "store missing tiles": ("slide", ["original", "short"], "tiles", ["short", "tiles"], "tiles"),
    "store of another tile table": ("slide", ["original", "resorted"], "tiles", ["resorted", "tiles"], "tiles_sha256"),
    "stores with different layers": ("slide", ["original", "layers"], "tiles", ["layers", "original"], "layers"),
    "stores with different settings": ("slide", ["original", "arch"], "tiles", ["arch", "original"], "arch"),
    "same method twice": ("slide", ["original", "original"], "tiles", ["original"], "both are method"),
    "not a saliency store": ("slide", ["empty"], "tiles", ["empty"], "saliency"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_one_line_naming_the_files(cli, inputs, tmp_path, case):
    slide, stores, tiles, named, word = BAD[case]
    out = tmp_path / "x.ome.zarr"
    args = ["heatmaps", str(inputs[slide]), "--saliency", *(str(inputs[s]) for s in stores),
            "--tiles", str(inputs[tiles]), "--out", str(out), "--no-progress"]  # fmt: skip
    err = cli(*args, expect=1).err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("smoothsal heatmaps: error:"), err
    for key in named:
        assert str(inputs[key]) in err or inputs[key].name in err, (key, err)
    assert word in err.lower() or word in err, err
    assert not out.exists() and not list(tmp_path.iterdir())


# --- the paper's effect at slide scale ------------------------------------------------------------


def heatmap_tv(stitched: np.ndarray, side: int) -> np.ndarray:
    """Heatmap TV: `metrics.total_variation` of every side×side window of a stitched level 0 that lies
    wholly on tiles (windows overlap by half; side = 2 tiles, so tile borders are inside windows)."""
    windows = [
        stitched[r : r + side, c : c + side]
        for r in range(0, stitched.shape[0] - side + 1, side // 2)
        for c in range(0, stitched.shape[1] - side + 1, side // 2)
    ]
    windows = [w for w in windows if np.isfinite(w).all()]
    return total_variation(torch.from_numpy(np.stack(windows))[:, None]).numpy()


def test_backward_hook_heatmaps_are_smoother_than_original_at_slide_scale(cli, cmu, tmp_path):
    """Real chain: `smoothsal tiles` → `smoothsal saliency` (random-init ResNet18, original and
    backward_hook, gradient, no SmoothGrad) → heatmaps. Paper Table 4: TV(backward_hook) < TV(original)."""
    tiles = tmp_path / "tiles.parquet"
    cli(
        "tiles",
        cmu,
        "--out",
        tiles,
        "--tile-size",
        "128",
        "--roi",
        "984",
        "800",
        "512",
        "512",
        "--min-tissue",
        "0.5",
    )
    assert len(read_tile_table(tiles)) == 16  # 4×4 tiles, all tissue
    stores = []
    for method in ("original", "backward_hook"):
        stores.append(tmp_path / f"{method}.zarr")
        cli("saliency", cmu, "--tiles", tiles, "--arch", "resnet18", "--num-classes", "2",
            "--method", method, "--layers", "layer1", "layer2", "layer3", "--attributions", "gradient",
            "--smoothgrad-samples", "0", "--target", "predicted", "--workers", "0", "--no-progress",
            "--out", stores[-1], "--table", tmp_path / f"{method}.parquet")  # fmt: skip
    out = heatmaps.make_heatmaps(
        cmu, stores, tiles, tmp_path / "h.ome.zarr", heatmaps.HeatmapSettings(tissue=False), progress=False
    )
    assert_valid_ngff(out)
    for layer, stride in (("layer1", 4), ("layer2", 8), ("layer3", 16)):
        side = 2 * 128 // stride
        tv = {
            m: heatmap_tv(level(out, f"heatmaps/{m}/gradient/{layer}"), side)
            for m in ("original", "backward_hook")
        }
        assert len(tv["original"]) >= 4
        assert tv["backward_hook"].mean() < tv["original"].mean(), (layer, tv)


def test_out_that_is_no_container_is_refused_not_deleted(cli, cmu, grid, tmp_path):
    """``--out results/`` (the container name forgotten) must not wipe the folder."""
    tiles, table = grid
    store = write_store(tmp_path / "original.zarr", table, "original", random_maps(table))
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    args = ["heatmaps", str(cmu), "--saliency", str(store), "--tiles", str(tiles), "--no-tissue",
            "--out", str(folder), "--no-progress"]  # fmt: skip
    err = cli(*args, expect=1).err.strip()
    assert len(err.splitlines()) == 1 and f"{folder} exists and is a folder smoothsal did not write" in err, (
        err
    )
    assert (folder / "notes.txt").read_text() == "keep me"
    out = tmp_path / "s.ome.zarr"  # a container there is replaced as before
    again = [*args[:-2], str(out), "--no-progress"]
    cli(*again)
    cli(*again)
    assert_valid_ngff(out)


def test_ctrl_c_says_nothing_was_left_and_the_rerun_equals_an_uninterrupted_run(cli, cmu, grid, tmp_path):
    """Issue 27 case 12: a real SIGINT after the first stitched block: one line, exit 130, no container
    and no temporary left; the rerun's container equals an uninterrupted one array for array."""
    tiles, table = grid
    store = write_store(tmp_path / "original.zarr", table, "original", random_maps(table))
    out = tmp_path / "s.ome.zarr"
    interrupted = cli.process(*stitch_command(cmu, store, tiles, out), kill_at="heatmaps.block=1/int")
    lines = interrupted.stderr.strip().splitlines()
    assert interrupted.returncode == 130 and len(lines) == 1, interrupted.stderr
    assert lines[0].startswith("smoothsal heatmaps: interrupted: nothing is left half-written")
    assert not out.exists() and files.partial_paths(out) == []
    cli(*stitch_command(cmu, store, tiles, out))
    cli(*stitch_command(cmu, store, tiles, tmp_path / "whole.ome.zarr"))
    a, b = zarr.open_group(out, mode="r"), zarr.open_group(tmp_path / "whole.ome.zarr", mode="r")
    compared = 0
    for path in _array_paths(b):
        assert np.array_equal(a[path][...], b[path][...], equal_nan=True), path
        compared += 1
    assert compared >= 2


def _array_paths(group, prefix: str = "") -> list[str]:
    """Every array's path in a Zarr group, depth first."""
    paths = [f"{prefix}{name}" for name, _ in group.arrays()]
    for name, sub in group.groups():
        paths += _array_paths(sub, f"{prefix}{name}/")
    return paths


def test_a_format_1_container_is_replaced_and_a_later_format_refused(cli, cmu, grid, tmp_path):
    """Format 2 added OME/ (the bioformats2raw image list): a container of format 1 (as written before,
    without it) is still `smoothsal heatmaps`' own and is replaced; one of a format it does not know is not."""
    tiles, table = grid
    store = write_store(tmp_path / "original.zarr", table, "original", random_maps(table))
    out = tmp_path / "s.ome.zarr"
    args = ["heatmaps", str(cmu), "--saliency", str(store), "--tiles", str(tiles), "--no-tissue",
            "--out", str(out), "--no-progress"]  # fmt: skip
    cli(*args)
    root = zarr.open_group(out, mode="r+")
    assert root.attrs[files.MARKER_KEY]["format"] == 2 and "OME" in root.attrs[files.MARKER_KEY]["entries"]
    shutil.rmtree(out / "OME")  # now as format 1 wrote it
    attrs = dict(root.attrs)
    del attrs["bioformats2raw.layout"]
    attrs[files.MARKER_KEY] = attrs[files.MARKER_KEY] | {"format": 1, "entries": ["heatmaps", "tiles"]}
    root.attrs.put(attrs)
    cli(*args)
    assert zarr.open_group(out, mode="r").attrs[files.MARKER_KEY]["format"] == 2
    assert_valid_ngff(out)
    root = zarr.open_group(out, mode="r+")
    root.attrs[files.MARKER_KEY] = root.attrs[files.MARKER_KEY] | {"format": 3}
    err = cli(*args, expect=1).err.strip()
    assert f"{out} exists and is a heatmap-container (format 3)" in err, err
    assert "replaces only a heatmap-container (format 2)" in err, err
