"""`smoothsal export` (smoothsal/qupath.py): hot-spot GeoJSON for QuPath and the OME-TIFF export.

A synthetic container holds one 2 µm/px heatmap over a 2048 × 1536 µm slide (0.5 µm/px, 4096 × 3072
level-0 px), NaN right of 1536 µm, uniform noise in [0, 1) elsewhere, and two plateaus sized so that the
default thresholds land on them: a ring of value 3 (6.7 % with the disk below → the 95th percentile is
3) and a disk of value 4 (1.3 % → the 99th percentile is 4). So p99 must give exactly the disk, p95 the
disk and the ring (with its hole), at known places and sizes. The OME-TIFF test uses a real container
(`smoothsal heatmaps` of CMU-1-Small-Region).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
import zarr
from ngff import assert_valid_ngff
from ome_zarr.format import FormatV04
from ome_zarr.writer import write_multiscales_metadata
from shapely.geometry import shape

from smoothsal import qupath

MPP, SLIDE_PX, UM = 0.5, (4096, 3072), 2.0  # slide µm/px, level-0 size (W, H), map µm/px
DISK = ((400.0, 400.0), 100.0)  # centre (x, y) µm, radius µm: value 4
RING = ((1000.0, 900.0), 200.0, 70.0)  # centre, outer and inner radius µm: value 3
NAN_FROM_X = 1536.0


def hot_map() -> np.ndarray:
    h, w = round(SLIDE_PX[1] * MPP / UM), round(SLIDE_PX[0] * MPP / UM)
    yy, xx = np.mgrid[0:h, 0:w]
    yy, xx = (yy + 0.5) * UM, (xx + 0.5) * UM  # pixel centres, µm
    values = np.random.default_rng(0).uniform(0, 1, (h, w))
    (cx, cy), r = DISK
    values[(xx - cx) ** 2 + (yy - cy) ** 2 <= r**2] = 4.0
    (cx, cy), outer, inner = RING
    d2 = (xx - cx) ** 2 + (yy - cy) ** 2
    values[(d2 <= outer**2) & (d2 > inner**2)] = 3.0
    values[xx >= NAN_FROM_X] = np.nan
    return values.astype(np.float32)


def write_hot_container(path: Path) -> tuple[Path, np.ndarray]:
    from test_viewer import datasets

    values = hot_map()
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    group = root.create_group("heatmaps/m/gradient/layer1")
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN 2×2 blocks → NaN
        levels = [values, np.nanmean(values.reshape(384, 2, 512, 2), axis=(1, 3)).astype(np.float32)]
    for k, data in enumerate(levels):
        group.create_array(str(k), data=data, chunks=(256, 256), fill_value=np.nan,
                           chunk_key_encoding={"name": "v2", "separator": "/"})  # fmt: skip
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in ("y", "x")]
    write_multiscales_metadata(group, datasets(UM, 2, 0), fmt=FormatV04(), axes=axes)
    root.attrs["smoothsal"] = {
        "slide_id": "hot", "slide_mpp": MPP, "slide_size_px": list(SLIDE_PX),
        "images": [{"path": "heatmaps/m/gradient/layer1", "kind": "heatmap", "method": "m",
                    "attribution": "gradient", "layer": "layer1"}],
    }  # fmt: skip
    assert_valid_ngff(path)
    return path, values


@pytest.fixture(scope="module")
def hot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    return write_hot_container(tmp_path_factory.mktemp("qupath") / "hot.ome.zarr")


def features(path: Path) -> dict[str, list[dict]]:
    """GeoJSON read back: class name → features; every geometry valid and inside the slide."""
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    slide = shapely.box(0, 0, *SLIDE_PX)
    out: dict[str, list[dict]] = {}
    for f in collection["features"]:
        assert f["type"] == "Feature" and f["geometry"]["type"] in ("Polygon", "MultiPolygon")
        geometry = shape(f["geometry"])
        assert geometry.is_valid and not geometry.is_empty, shapely.is_valid_reason(geometry)
        assert geometry.within(slide), geometry.bounds
        f["shape"] = geometry
        out.setdefault(f["properties"]["classification"]["name"], []).append(f)
    return out


def test_known_hot_spots_come_back_as_polygons_at_their_place_and_size(cli, hot, tmp_path):
    container, values = hot
    out = tmp_path / "hot.geojson"
    assert (
        "1 smoothsal p99 (>= 4)" in cli("export", container, "--map", "m/gradient/layer1", "--out", out).out
    )
    found = features(out)
    assert sorted(found) == ["smoothsal p95", "smoothsal p99"]
    finite = values[np.isfinite(values)]
    assert np.percentile(finite, 95) == 3.0 and np.percentile(finite, 99) == 4.0  # the fixture's premise

    (disk,) = found["smoothsal p99"]  # one polygon: the disk
    (cx, cy), r = DISK
    props = disk["properties"]
    assert props["objectType"] == "annotation" and props["classification"]["color"] == [220, 20, 60]
    centroid = disk["shape"].centroid
    assert abs(centroid.x - cx / MPP) < 1.0 and abs(centroid.y - cy / MPP) < 1.0  # level-0 px
    area_um2 = props["measurements"]["Area µm^2"]
    assert area_um2 == pytest.approx(np.pi * r**2, rel=0.01)
    assert area_um2 == pytest.approx(disk["shape"].area * MPP**2)
    pixels = props["measurements"]["Pixels"]
    assert pixels == int((values == 4.0).sum())
    assert abs(area_um2 / UM**2 - (pixels - 0.5)) < 1e-6  # marching squares cuts each corner by 1/8 px
    assert (
        props["measurements"]["Mean attribution"] == 4.0 and props["measurements"]["Max attribution"] == 4.0
    )

    ring, disk95 = sorted(found["smoothsal p95"], key=lambda f: -f["shape"].area)
    assert disk95["shape"].equals(disk["shape"])
    (rx, ry), outer, inner = RING
    assert len(ring["shape"].interiors) == 1  # the hole
    assert ring["shape"].centroid.distance(shapely.Point(rx / MPP, ry / MPP)) < 1.0
    hole = shapely.Polygon(ring["shape"].interiors[0])
    assert hole.area * MPP**2 == pytest.approx(np.pi * inner**2, rel=0.02)
    assert ring["properties"]["measurements"]["Area µm^2"] == pytest.approx(
        np.pi * (outer**2 - inner**2), rel=0.01
    )
    assert ring["properties"]["measurements"]["Max attribution"] == 3.0
    assert ring["properties"]["classification"] == {"name": "smoothsal p95", "color": [255, 170, 0]}
    meta = json.loads(out.read_text())["smoothsal"]
    assert meta["thresholds"] == {"smoothsal p95": 3.0, "smoothsal p99": 4.0} and meta["level"] == 0


def test_coarser_level_when_level0_is_too_large_and_other_thresholds(hot, tmp_path):
    container, _ = hot
    settings = qupath.ExportSettings(percentiles=(99.0,), max_pixels=200_000)  # level 0 has 786 432
    result = qupath.export(container, "heatmaps/m/gradient/layer1", tmp_path / "c.geojson", settings)
    assert result.level == 1 and result.regions == {"smoothsal p99": 1}
    (disk,) = features(tmp_path / "c.geojson")["smoothsal p99"]
    (cx, cy), r = DISK
    assert disk["shape"].centroid.distance(shapely.Point(cx / MPP, cy / MPP)) < 2.0
    assert disk["properties"]["measurements"]["Area µm^2"] == pytest.approx(np.pi * r**2, rel=0.04)


def test_outputs_it_did_not_write_are_refused(cli, hot, tmp_path):
    container, _ = hot
    mine = tmp_path / "notes.geojson"
    mine.write_text('{"type": "FeatureCollection", "features": []}')
    err = cli("export", container, "--map", "m/gradient/layer1", "--out", mine, expect=1).err.strip()
    assert len(err.splitlines()) == 1 and "not an earlier `smoothsal export` output" in err
    assert mine.read_text() == '{"type": "FeatureCollection", "features": []}'
    err = cli("export", container, "--map", "x/y/z", "--out", tmp_path / "a.geojson", expect=1).err
    assert "choose one of m/gradient/layer1" in err
    again = ["export", container, "--map", "m/gradient/layer1", "--out", tmp_path / "b.geojson"]
    cli(*again)
    cli(*again)  # its own output is replaced
    err = cli(*again[:-1], tmp_path / "c.geojson", "--percentiles", "95", "100", expect=1).err.strip()
    assert len(err.splitlines()) == 1 and "--percentiles must lie in [0, 100)" in err
    assert not (tmp_path / "c.geojson").exists()


def test_real_container_geojson_and_ome_tiff_at_the_slides_physical_size(slides_dir, tmp_path):
    from test_heatmaps import make_tiles, random_maps, write_store

    from smoothsal import heatmaps, slides

    cmu = slides_dir / "CMU-1-Small-Region.svs"
    table = make_tiles(cmu, tmp_path / "t.parquet", tile_size=128, roi=(0, 0, 2220, 1400), min_tissue=0.3)
    store = write_store(tmp_path / "original.zarr", table, "original", random_maps(table))
    container = heatmaps.make_heatmaps(
        cmu, [store], tmp_path / "t.parquet", tmp_path / "cmu.ome.zarr", progress=False
    )
    assert_valid_ngff(container)
    with slides.open_slide(cmu) as slide:
        (width, height), mpp = slide.dimensions, slide.mpp
    settings = qupath.ExportSettings(min_pixels=1)  # i.i.d. noise maps: mostly one-pixel regions
    result = qupath.export(
        container,
        "original/gradient/layer1",
        tmp_path / "cmu.geojson",
        settings,
        ome_tiff=tmp_path / "cmu.ome.tif",
    )
    found = features(tmp_path / "cmu.geojson")  # valid polygons inside the slide (checked there)
    assert all(result.regions.values()) and sum(map(len, found.values())) == sum(result.regions.values())
    exports = {"tissue": tmp_path / "tissue.ome.tif", "heatmaps/original/gradient/layer1": result.ome_tiff}
    heatmaps.export_ome_tiff(container, "tissue", exports["tissue"])
    for image, path in exports.items():
        with tifffile.TiffFile(path) as tif:
            pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
            level0 = tif.series[0].levels[0].shape
        size_x, size_y = pixels["SizeX"] * pixels["PhysicalSizeX"], pixels["SizeY"] * pixels["PhysicalSizeY"]
        assert (pixels["PhysicalSizeXUnit"], level0[:2]) == ("µm", (pixels["SizeY"], pixels["SizeX"]))
        # the extent is the slide's, to within one pixel of the exported image
        assert 0 <= size_x - width * mpp < pixels["PhysicalSizeX"] + 1e-6, (image, size_x, width * mpp)
        assert 0 <= size_y - height * mpp < pixels["PhysicalSizeY"] + 1e-6, (image, size_y, height * mpp)


def test_an_output_that_is_a_link_is_refused_and_kept(cli, hot, tmp_path):
    """Issue 27 cases 10 and 14: `export --out L.geojson` where L is the user's link to an earlier
    export replaced the link by a file; `tiles --out link.parquet` suggested a path inside the link.
    Every single-file output now refuses a link in one place, suggesting a path that works."""
    container, _ = hot
    earlier = tmp_path / "earlier.geojson"
    cli("export", container, "--map", "m/gradient/layer1", "--out", earlier)
    before = earlier.read_bytes()
    link = tmp_path / "L.geojson"
    link.symlink_to(earlier)
    err = cli("export", container, "--map", "m/gradient/layer1", "--out", link, expect=1).err.strip()
    assert len(err.splitlines()) == 1 and f"{link} is a link (to {earlier})" in err
    assert f"e.g. {tmp_path / 'L-new.geojson'}" in err
    assert link.is_symlink() and earlier.read_bytes() == before
    cli("export", container, "--map", "m/gradient/layer1", "--out", tmp_path / "L-new.geojson")
    assert (tmp_path / "L-new.geojson").is_file()  # the suggestion works


def test_tiles_out_link_suggests_a_path_that_works(cli, slides_dir, tmp_path):
    target = tmp_path / "real.parquet"
    target.write_bytes(b"mine")
    link = tmp_path / "link.parquet"
    link.symlink_to(target)
    slide = slides_dir / "CMU-1-Small-Region.svs"
    err = cli("tiles", slide, "--tile-size", "64", "--max-tiles", "2", "--out", link, expect=1).err.strip()
    assert len(err.splitlines()) == 1 and "link.parquet/out" not in err
    assert f"e.g. {tmp_path / 'link-new.parquet'}" in err and target.read_bytes() == b"mine"
    cli("tiles", slide, "--tile-size", "64", "--max-tiles", "2", "--out", tmp_path / "link-new.parquet")
