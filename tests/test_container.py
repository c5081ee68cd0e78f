"""The heatmap container's one reader, on a container `smoothsal heatmaps` wrote from a real slide: images
and levels in µm, the tile grid, one-line errors for what is not a container or is damaged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from helpers import CMU
from ngff import assert_valid_ngff, assert_valid_series

from smoothsal import container, heatmaps
from smoothsal.errors import BadOption, BadStore, MissingInput
from smoothsal.grid import TileGridSettings
from smoothsal.slides import open_slide
from smoothsal.store import StoreWriter
from smoothsal.tiles import tiles_sha256, write_tile_table
from smoothsal.tiling import tile_slide


@pytest.fixture(scope="module")
def written(slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    d = tmp_path_factory.mktemp("container")
    with open_slide(slides_dir / CMU) as slide:
        table = tile_slide(
            slide, TileGridSettings(tile_size=128, roi=(0, 0, 1024, 1024), min_tissue=0.0)
        ).table
    write_tile_table(table, d / "tiles.parquet")
    meta = {"version": "test", "slide_id": "CMU-1-Small-Region", "slide_path": str(slides_dir / CMU),
            "method": "original", "layers": ["layer1"], "attributions": ["gradient"], "settings": {},
            "tiles_sha256": tiles_sha256(table), "n_tiles": len(table)}  # fmt: skip
    writer = StoreWriter(d / "original.zarr", d / "original.parquet", meta)
    writer.open({"layer1": (32, 32)}, 128)
    values = np.arange(len(table), dtype=np.float32)[:, None, None] * np.ones((1, 32, 32), np.float32)
    writer.write_batch(
        0, len(table), {("gradient", "layer1"): values}, pd.DataFrame({"tile": np.arange(len(table))})
    )
    writer.finish()
    out = heatmaps.make_heatmaps(
        slides_dir / CMU, [d / "original.zarr"], d / "tiles.parquet", d / "c.ome.zarr", heatmaps.HeatmapSettings(chunk=256),
        progress=False,
    )  # fmt: skip
    assert_valid_ngff(out)
    return out, table


def test_images_levels_extents_and_tile_grid(written):
    out, table = written
    c = container.open_container(out)
    assert [i.path for i in c.images] == ["tissue", "heatmaps/original/gradient/layer1"]
    tissue, heatmap = c.image("tissue"), c.image("heatmaps/original/gradient/layer1")
    assert tissue.kind == "tissue" and tissue.axes == ("c", "y", "x") and heatmap.axes == ("y", "x")
    mpp = c.meta["slide_mpp"]
    width_um, height_um = (side * mpp for side in c.meta["slide_size_px"])
    for info in (tissue, heatmap):  # every level spans the slide, whatever its pixel size
        for k, lv in enumerate(info.levels):
            left, right, bottom, top = info.extent(k)
            assert (left, top) == (0.0, 0.0)
            assert abs(right - width_um) <= lv.scale[1] and abs(bottom - height_um) <= lv.scale[0]
    assert heatmap.levels[0].scale == pytest.approx((4 * mpp, 4 * mpp))  # 128 level-0 px per 32 map px
    np.testing.assert_array_equal(c.tile_boxes(), table[["x", "y", "w", "h"]].to_numpy())
    level0 = c.region(heatmap.index, 0, slice(0, 8), slice(0, 64))  # the first two tiles' rows
    assert level0.shape == (8, 64) and set(np.unique(level0)) == {0.0, 1.0}
    assert (
        c.level_at_least(tissue.index, 10_000) == 0
        and c.level_at_least(tissue.index, 1) == len(tissue.levels) - 1
    )
    q = c.quantiles(heatmap.index)
    assert len(q) == 201 and q[0] >= 0 and q[-1] <= len(table) - 1
    with pytest.raises(BadOption, match="no image 'heatmaps/x'; choose one of tissue, heatmaps/original"):
        c.image("heatmaps/x")


def test_what_is_not_a_container_or_is_damaged_is_one_line_naming_it(written, tmp_path):
    with pytest.raises(MissingInput, match=r"none\.ome\.zarr: heatmap container not found"):
        container.open_container(tmp_path / "none.ome.zarr")
    zarr.open_group(tmp_path / "plain.zarr", mode="w", zarr_format=2)
    with pytest.raises(
        BadStore, match=r"plain\.zarr: no 'smoothsal' root attributes listing images; give the"
    ):
        container.open_container(tmp_path / "plain.zarr")
    out, _ = written

    damaged = tmp_path / "damaged.ome.zarr"
    shutil.copytree(out, damaged)
    chunk = next(
        p
        for p in (damaged / "heatmaps/original/gradient/layer1/0").rglob("*")
        if p.is_file() and not p.name.startswith(".")
    )
    chunk.write_bytes(b"\x00garbage" * 10)
    c = container.open_container(damaged)
    image = c.image("heatmaps/original/gradient/layer1")
    with pytest.raises(
        BadStore, match=r"damaged\.ome\.zarr: heatmaps/original/gradient/layer1 level 0 cannot be read"
    ):
        h, w = image.levels[0].shape
        c.region(image.index, 0, slice(0, h), slice(0, w))
    shutil.rmtree(damaged / "heatmaps/original/gradient/layer1/1")
    with pytest.raises(BadStore, match="lists level '1', which is missing"):
        container.open_container(damaged)


# --- the NGFF check every container test uses (tests/ngff.py) fails on containers that break the spec ---

LAYER1 = "heatmaps/original/gradient/layer1"


def _edit_multiscales(path: Path, change) -> None:
    attrs = path / LAYER1 / ".zattrs"
    meta = json.loads(attrs.read_text())
    change(meta["multiscales"][0])
    attrs.write_text(json.dumps(meta))


BROKEN = {
    "a level missing": (lambda p: shutil.rmtree(p / LAYER1 / "1"), "Expected to find an array"),
    "three axes for 2-D arrays": (
        lambda p: _edit_multiscales(p, lambda ms: ms["axes"].insert(0, {"name": "c", "type": "channel"})),
        "length of axes",
    ),
    "translation before scale": (
        lambda p: _edit_multiscales(p, lambda ms: ms["datasets"][0]["coordinateTransformations"].reverse()),
        "Expected a scale or",
    ),
    "another version": (lambda p: _edit_multiscales(p, lambda ms: ms.update(version="0.3")), "0.4"),
    "an image without multiscales": (
        lambda p: _edit_multiscales(p, lambda ms: ms.clear()),
        "not a valid NGFF",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_the_ngff_check_fails_on_broken_containers(written, tmp_path, case):
    break_it, message = BROKEN[case]
    copy = tmp_path / "broken.ome.zarr"
    shutil.copytree(written[0], copy)
    assert set(assert_valid_ngff(copy)) == {"tissue", LAYER1}  # valid before it is broken
    break_it(copy)
    with pytest.raises(AssertionError, match=message):
        assert_valid_ngff(copy)


# --- and on containers whose image list (format 2: bioformats2raw layout) breaks the spec or the images ---


def _edit_xml(path: Path, old: str, new: str) -> None:
    xml = path / "OME" / "METADATA.ome.xml"
    text = xml.read_text()
    assert old in text
    xml.write_text(text.replace(old, new, 1))


def _edit_attrs(path: Path, change) -> None:
    attrs = path / ".zattrs"
    meta = json.loads(attrs.read_text())
    change(meta)
    attrs.write_text(json.dumps(meta))


def _edit_series(path: Path, change) -> None:
    attrs = path / "OME" / ".zattrs"
    meta = json.loads(attrs.read_text())
    change(meta["series"])
    attrs.write_text(json.dumps(meta))


BROKEN_SERIES = {
    "another layout version": (lambda p: _edit_attrs(p, lambda a: a.update({"bioformats2raw.layout": 2})), "bioformats2raw"),
    "a map missing from series": (lambda p: _edit_series(p, lambda s: s.pop()), "series"),
    "series in another order": (lambda p: _edit_series(p, lambda s: s.reverse()), "series"),
    "an Image ID that is not its path": (lambda p: _edit_xml(p, 'ID="Image:tissue"', 'ID="Image:0"'), "Image"),
    "a pixel size that is not level 0's": (lambda p: _edit_xml(p, 'PhysicalSizeY="', 'PhysicalSizeY="3'), "heatmaps|tissue"),
    "a size that is not level 0's": (lambda p: _edit_xml(p, 'SizeX="', 'SizeX="1'), "heatmaps|tissue"),
    "XML the OME schema refuses": (lambda p: _edit_xml(p, "<MetadataOnly />", "<Nonsense />"), "not valid OME-XML"),
    "no XML": (lambda p: (p / "OME" / "METADATA.ome.xml").unlink(), "METADATA"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BROKEN_SERIES))
def test_the_series_check_fails_on_broken_image_lists(written, tmp_path, case):
    break_it, message = BROKEN_SERIES[case]
    copy = tmp_path / "broken.ome.zarr"
    shutil.copytree(written[0], copy)
    assert assert_valid_series(copy) == ["tissue", LAYER1]  # valid before it is broken
    break_it(copy)
    with pytest.raises((AssertionError, FileNotFoundError), match=message):
        assert_valid_series(copy)
