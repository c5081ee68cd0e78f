"""smoothsal.slides on real slides (OpenSlide reads, no mocks) and on small synthetic pyramids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image
from skimage.color import rgb2hsv
from skimage.transform import downscale_local_mean

from smoothsal import slides
from smoothsal.slides import LabelSettings, TileGridSettings

CMU, CMU_PYRAMID, TCGA = (
    "CMU-1-Small-Region.svs",
    "CMU-1-Small-Region-pyramid.tiff",
    "TCGA-CR-7395-01A-01-TS1.svs",
)


class RecordingReader:
    """A real OpenSlide handle that records every read_region (level, size): a spy, not a mock."""

    def __init__(self, inner: slides.SlideReader) -> None:
        self.inner = inner
        self.reads: list[tuple[int, tuple[int, int]]] = []

    def read_region(self, location, level, size):
        self.reads.append((level, tuple(size)))
        return self.inner.read_region(location, level, size)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def cmu(slides_dir: Path):
    with (
        slides.open_slide(slides_dir / CMU) as svs,
        slides.open_slide(slides_dir / CMU_PYRAMID) as tiff,
    ):
        yield svs, tiff


@pytest.fixture(scope="module")
def cmu_tissue(cmu):
    return tuple(slides.find_tissue(s) for s in cmu)


# --- opening, µm/px ------------------------------------------------------------------------------


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


# --- tissue mask and grid ------------------------------------------------------------------------


def test_svs_and_pyramid_tiff_give_the_same_grid(cmu, cmu_tissue):
    everything = TileGridSettings(min_tissue=0.0)
    a, b = (slides.plan_tiles(s, t, everything) for s, t in zip(cmu, cmu_tissue))
    assert len(a) == (2220 // 224) * (2967 // 224)
    pd.testing.assert_frame_equal(
        a[["col", "row", "x", "y", "w", "h", "level"]],
        b[["col", "row", "x", "y", "w", "h", "level"]],
    )
    assert np.abs(a.tissue_fraction - b.tissue_fraction).mean() < 0.03
    tissue_a, tissue_b = (
        set(zip(*slides.plan_tiles(s, t)[["x", "y"]].to_numpy().T)) for s, t in zip(cmu, cmu_tissue)
    )
    assert len(tissue_a & tissue_b) >= 0.95 * max(len(tissue_a), len(tissue_b)) > 30


@pytest.mark.parametrize("target_mpp, tiff_level", [(0.5, 0), (1.0, 1)])
def test_tiles_from_svs_and_pyramid_tiff_are_close(cmu, cmu_tissue, target_mpp, tiff_level):
    grid = TileGridSettings(target_mpp=target_mpp)
    a, b = (slides.plan_tiles(s, t, grid) for s, t in zip(cmu, cmu_tissue))
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


def test_background_has_no_tissue(cmu, cmu_tissue, tiles_dir):
    for tissue in cmu_tissue:  # the blank glass left of the specimen
        xs, ys = np.meshgrid([0, 224], [224, 448, 672])
        fractions = slides.box_fractions(
            tissue.mask, tissue.overview.downsample, xs.ravel(), ys.ravel(), 224, 224
        )
        assert fractions.max() < 0.01
    for name in ("no-tissue.png", "almost-white-1.png"):
        rgb = np.asarray(Image.open(tiles_dir / name).convert("RGB"))
        assert slides.tissue_mask(rgb, mpp=0.5).mean() < 0.01, name
    rgb = np.asarray(Image.open(tiles_dir / "tissue-level0-4302-10273-4814-10785.png").convert("RGB"))
    assert slides.tissue_mask(rgb, mpp=0.5).mean() > 0.5
    np.testing.assert_allclose(slides.hsv_saturation(rgb), rgb2hsv(rgb)[..., 1], atol=1e-6)
    uniform = np.full((64, 64, 3), (240, 236, 238), np.uint8)
    assert not slides.tissue_mask(uniform, mpp=8.0).any()


def test_tissue_mask_reads_only_low_levels(slides_dir):
    """Tiling reads nothing at level 0: the mask (and overview) come from the coarsest fine-enough level."""
    with slides.open_slide(slides_dir / CMU_PYRAMID) as slide:
        spy = RecordingReader(slide.reader)
        tiling = slides.tile_slide(slides.Slide(slide.path, spy, slide.mpp, slide.slide_id))
        assert len(tiling.table) > 30 and spy.reads
        assert {level for level, _ in spy.reads} == {3}  # 8 µm/px mask from the ×8 level, never level 0
        assert tiling.tissue.overview.level == 3
        spy.reads.clear()
        for row in tiling.table.head(5).itertuples():
            slides.read_tile(spy, row.x, row.y, row.w, row.level, row.tile_size)
        assert spy.reads == [(0, (224, 224))] * 5  # each tile: one read at its level, its own size


def test_single_level_slide_reads_level_zero_in_bounded_blocks(cmu):
    spy = RecordingReader(cmu[0].reader)
    low = slides.read_low_res(slides.Slide(cmu[0].path, spy, cmu[0].mpp, "x"), mpp=8.0)
    assert low.level == 0 and low.downsample == 16 and low.image.shape == (186, 139, 3)
    assert len(spy.reads) == 4 and all(max(size) <= slides.MASK_BLOCK for _, size in spy.reads)
    whole = slides.read_rgb(cmu[0].reader, 0, 0, 0, cmu[0].dimensions)  # one read: fine for this small slide
    expected = np.round(downscale_local_mean(whole, (16, 16, 1), cval=255)).astype(np.uint8)
    np.testing.assert_array_equal(low.image, expected)


def test_grid_options(cmu, cmu_tissue):
    slide, tissue = cmu[1], cmu_tissue[1]
    full = slides.plan_tiles(slide, tissue, TileGridSettings(min_tissue=0.0))
    half = slides.plan_tiles(slide, tissue, TileGridSettings(min_tissue=0.0, stride=112))
    assert len(half) == ((2220 - 224) // 112 + 1) * ((2967 - 224) // 112 + 1) and set(half.w) == {224}
    roi = slides.plan_tiles(slide, tissue, TileGridSettings(min_tissue=0.0, roi=(100, 200, 500, 700)))
    assert roi.x.min() == 100 and roi.y.min() == 200 and len(roi) == 2 * 3
    assert ((roi.x + roi.w) <= 600).all() and ((roi.y + roi.h) <= 900).all()
    sample = [slides.plan_tiles(slide, tissue, TileGridSettings(max_tiles=10, seed=s)) for s in (1, 1, 2)]
    assert len(sample[0]) == 10 and sample[0].equals(sample[1]) and not sample[0].equals(sample[2])
    assert sample[0].tissue_fraction.min() >= 0.5
    by_level = slides.plan_tiles(slide, tissue, TileGridSettings(level=2, min_tissue=0.0))
    assert set(by_level.level) == {2} and set(by_level.w) == {round(224 * slide.downsamples[2])}
    assert by_level.mpp.iloc[0] == pytest.approx(0.499 * 4, rel=0.01)
    assert len(full) == 117


def test_tiny_slide_yields_no_tiles(slides_dir):
    with slides.open_slide(slides_dir / "small.svs") as slide:
        tissue = slides.find_tissue(slide)
        table = slides.label_tiles(slides.plan_tiles(slide, tissue), None)
        assert len(table) == 0 and {"x", "y", "w", "slide_path", "label", "fraction_1"} <= set(table.columns)
        with pytest.raises(ValueError, match=r"small\.svs.*larger than the slide.*--tile-size"):
            slides.check_tile_fits(slide, TileGridSettings())
        small_tiles = slides.tile_slide(slide, TileGridSettings(tile_size=8, min_tissue=0.0))
        assert len(small_tiles.table) == 4


# --- annotations ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tumor_001", "tumor_081"])
def test_asap_xml_matches_ncrf_json(annotations_dir, name):
    annotations = slides.read_annotations(annotations_dir / f"{name}.xml")
    ncrf = json.loads((annotations_dir / f"{name}.ncrf.json").read_text())
    for label, key in ((1, "positive"), (0, "negative")):
        ours = [r.exterior for r in annotations.regions if r.label == label]
        theirs = [np.asarray(p["vertices"], float) for p in ncrf[key]]
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b)
    assert sum(len(r.exterior) for r in annotations.regions) > 80


def test_malformed_annotations_name_the_file(tmp_path):
    cases = {
        "cut.xml": '<?xml version="1.0"?><ASAP_Annotations><Annotations><Annotation',
        "other.xml": "<svg><g/></svg>",
        "nan.xml": '<ASAP_Annotations><Annotations><Annotation Name="A" PartOfGroup="_0"><Coordinates>'
        '<Coordinate Order="0" X="1" Y="abc"/></Coordinates></Annotation></Annotations></ASAP_Annotations>',
        "cut.geojson": '{"type": "FeatureCollection", "features": [',
        "bad.geojson": '{"type": "FeatureCollection", "features": '
        '[{"type": "Feature", "geometry": {"type": "Polygon"}}]}',  # no coordinates
        "notes.txt": "tumour in the top left",
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError) as err:
            slides.read_annotations(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value), name
    with pytest.raises(FileNotFoundError, match="missing.xml"):
        slides.read_annotations(tmp_path / "missing.xml")


def test_unknown_class_name_asks_for_a_class_map(tmp_path):
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps(_feature_collection([("Necrosis", _square(0, 0, 10))])))
    with pytest.raises(ValueError, match=r"qupath\.geojson.*'Necrosis'.*--class-map"):
        slides.read_annotations(path)
    assert len(slides.read_annotations(path, {"Necrosis": 2}).regions) == 1
    assert slides.read_annotations(path, {"necrosis": -1}).regions == ()  # negative id: ignored
    assert slides.parse_class_map("Tumor=1, Stroma=2,Exclusion=0") == {
        "tumor": 1,
        "stroma": 2,
        "exclusion": 0,
    }
    with pytest.raises(ValueError, match="NAME=ID"):
        slides.parse_class_map("Tumor:1")


def test_annotation_outside_the_slide_is_an_error(annotations_dir, cmu):
    annotations = slides.read_annotations(annotations_dir / "tumor_081.xml")
    with pytest.raises(
        ValueError,
        match=r"tumor_081\.xml.*CMU-1-Small-Region\.svs is 2220×2967.*annotation file of this slide",
    ):
        slides.check_annotations_within(annotations, cmu[0])


# --- labels on a synthetic slide -----------------------------------------------------------------

SIZE, MPP = (
    2048,
    0.5,
)  # synthetic slide: 2048² px at 0.5 µm/px → a 224-px grid of 9 × 9 tiles at level 0
TUMOUR = (
    448,
    448,
    1232,
    1120,
)  # x0, y0, x1, y1: tiles (col 2–4, row 2–4) whole, col 5 half (x 1120–1344)
HOLE = (672, 672, 896, 896)  # exactly tile (col 3, row 3)


def _square(x0, y0, x1, y1=None):
    y1 = x1 if y1 is None else y1
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def _feature_collection(items):
    return {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": rings if isinstance(rings[0][0], list) else [rings],
                },
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": name, "color": [255, 0, 0]},
                },
            }
            for name, rings in items
        ],
    }


@pytest.fixture(scope="module")
def synthetic_slide(tmp_path_factory) -> Path:
    """A 4-level tiled TIFF (downsamples exactly 1, 2, 4, 8) with resolution metadata (OpenSlide reads
    0.5 µm/px): noisy pink 'tissue' on the left three quarters, white glass on the right."""
    path = tmp_path_factory.mktemp("synthetic") / "synthetic.tiff"
    image = np.full((SIZE, SIZE, 3), 245, np.uint8)
    noise = np.random.default_rng(0).integers(-20, 21, (SIZE, SIZE * 3 // 4, 3))
    image[:, : SIZE * 3 // 4] = np.array([200, 120, 170]) + noise  # textured, so resampling shows
    with tifffile.TiffWriter(path) as tif:
        for i in range(4):
            level = image if i == 0 else downscale_local_mean(image, (2**i, 2**i, 1)).astype(np.uint8)
            res = 1e4 / (MPP * 2**i)
            tif.write(level, tile=(256, 256), photometric="rgb", compression="zlib", resolution=(res, res),
                      resolutionunit="CENTIMETER", subfiletype=int(i > 0), metadata=None)  # fmt: skip
    return path


def _asap_xml(polygons):
    annotations = "".join(
        f'<Annotation Name="A{i}" Type="Polygon" PartOfGroup="{group}"><Coordinates>'
        + "".join(f'<Coordinate Order="{k}" X="{x}" Y="{y}"/>' for k, (x, y) in enumerate(points))
        + "</Coordinates></Annotation>"
        for i, (group, points) in enumerate(polygons)
    )
    return (
        f'<?xml version="1.0"?><ASAP_Annotations><Annotations>{annotations}</Annotations></ASAP_Annotations>'
    )


def _fractions_by_tile(table, column):
    return {(r.col, r.row): getattr(r, column) for r in table.itertuples()}


def test_asap_polygon_labels_the_expected_tiles(synthetic_slide, tmp_path):
    xml = tmp_path / "synthetic.xml"
    xml.write_text(_asap_xml([("_0", _square(*TUMOUR)), ("_2", _square(*HOLE))]))
    with slides.open_slide(synthetic_slide) as slide:
        assert slide.mpp == pytest.approx(MPP) and len(slide.downsamples) == 4
        tiling = slides.tile_slide(
            slide,
            TileGridSettings(min_tissue=0.0),
            annotations=slides.read_annotations(xml),
            labels=LabelSettings(0.5),
        )
    table = tiling.table
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
    tissue = _fractions_by_tile(table, "tissue_fraction")
    assert tissue[(0, 0)] == pytest.approx(1.0) and tissue[(8, 0)] == pytest.approx(0.0)
    assert table.fraction_0.add(table.fraction_1).eq(1).all()
    mask = slides.tile_label_mask(tiling.annotations, 1120, 448, 224, 224)
    assert mask.shape == (224, 224) and (mask[:, :112] == 1).all() and (mask[:, 112:] == 0).all()
    small = slides.tile_label_mask(tiling.annotations, 1120, 448, 224, 56)  # at a coarser tile resolution
    assert small.shape == (56, 56) and small.mean() == pytest.approx(0.5)


def test_geojson_classes_give_fractions_and_majority(synthetic_slide, tmp_path):
    path = tmp_path / "qupath.geojson"
    tumour_with_hole = [_square(*TUMOUR), _square(*HOLE)]  # a polygon with an interior ring
    stroma = _square(0, 0, 448, 336)  # tiles (0–1, 0) whole, (0–1, 1) half
    path.write_text(json.dumps(_feature_collection([("Tumor", tumour_with_hole), ("Stroma", stroma)])))
    class_map = slides.parse_class_map("Tumor=1,Stroma=2")
    annotations = slides.read_annotations(path, class_map)
    with slides.open_slide(synthetic_slide) as slide:
        labels = LabelSettings(0.5, slides.n_classes(class_map))
        table = slides.tile_slide(
            slide, TileGridSettings(min_tissue=0.0), annotations=annotations, labels=labels
        ).table
    assert {"fraction_0", "fraction_1", "fraction_2", "majority_class"} <= set(table.columns)
    stroma_fraction = _fractions_by_tile(table, "fraction_2")
    majority = _fractions_by_tile(table, "majority_class")
    assert stroma_fraction[(0, 0)] == 1.0 and stroma_fraction[(1, 1)] == pytest.approx(0.5)
    assert majority[(0, 1)] == 2 and majority[(2, 2)] == 1 and majority[(5, 3)] == 1
    assert majority[(3, 3)] == 0 and majority[(8, 8)] == 0  # the hole, and plain background
    assert np.allclose(table[["fraction_0", "fraction_1", "fraction_2"]].sum(axis=1), 1.0)


def test_tiles_on_whole_downsample_levels_are_pixel_aligned(synthetic_slide):
    """At a level with a whole-number downsample, tile positions are multiples of it, so OpenSlide copies
    level pixels instead of resampling them (which is slower and blurs)."""
    grid = TileGridSettings(target_mpp=1.1, min_tissue=0.0, roi=(101, 51, 1500, 1500))
    with slides.open_slide(synthetic_slide) as slide:
        geo = slides.tile_geometry(slide, grid)
        assert (geo.level, geo.align, geo.size0, geo.stride0) == (1, 2, 493, 492)
        table = slides.plan_tiles(slide, slides.find_tissue(slide), grid)
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


def test_no_annotations_leave_label_columns_empty(cmu, cmu_tissue):
    table = slides.label_tiles(slides.plan_tiles(cmu[0], cmu_tissue[0]), None)
    assert (
        table.label.isna().all() and table.majority_class.isna().all() and table.tumor_fraction.isna().all()
    )


def test_labels_stay_fast_for_long_polygons(annotations_dir):
    """Clipping before rasterising: a 1,657-vertex Camelyon16 polygon costs little per tile."""
    import time

    annotations = slides.read_annotations(annotations_dir / "tumor_001.xml")
    region = max(annotations.regions, key=lambda r: len(r.exterior))
    (x0, y0), (x1, y1) = region.exterior.min(0).astype(int), region.exterior.max(0).astype(int)
    xs, ys = np.meshgrid(np.arange(x0, x1, 448), np.arange(y0, y1, 448))
    table = pd.DataFrame({"x": xs.ravel(), "y": ys.ravel(), "w": 448, "tile_size": 224})
    start = time.perf_counter()
    labelled = slides.label_tiles(table, annotations)
    per_tile = (time.perf_counter() - start) / len(table)
    assert 0 < labelled.tumor_fraction.mean() < 1 and labelled.tumor_fraction.max() == 1.0
    assert per_tile < 0.02, f"{per_tile * 1000:.1f} ms per tile"


# --- dataset -------------------------------------------------------------------------------------


def test_dataset_reads_tiles_of_several_slides(cmu, cmu_tissue, slides_dir):
    tables = [
        slides.label_tiles(slides.plan_tiles(s, t, TileGridSettings(target_mpp=1.0)), None)
        for s, t in zip(cmu, cmu_tissue)
    ]
    table = pd.concat(tables, ignore_index=True)
    opened: list[str] = []
    spies: list[RecordingReader] = []

    def opener(path: str) -> RecordingReader:
        opened.append(path)
        spies.append(RecordingReader(slides.open_reader(path)))
        return spies[-1]

    dataset = slides.TileDataset(table, opener=opener)
    items = [dataset[i] for i in range(len(dataset))]
    assert len(opened) == 2  # each slide opened once in this process
    for i, (image, index) in enumerate(items):
        assert index == i and image.shape == (3, 224, 224) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
    assert [len(s.reads) for s in spies] == [len(t) for t in tables]  # one read per tile
    assert {r for r in spies[0].reads} == {(0, (449, 449))} and {r for r in spies[1].reads} == {
        (1, (224, 224))
    }
    row = table.iloc[3]
    direct = slides.load_tile(row) / 255.0
    np.testing.assert_allclose(items[3][0].permute(1, 2, 0).numpy(), direct, atol=1e-6)
    normalised = slides.TileDataset(table, transform=lambda t: (t - 0.5) / 0.25)[3][0]
    torch.testing.assert_close(normalised, (items[3][0] - 0.5) / 0.25)


def test_dataset_in_dataloader_workers(cmu, cmu_tissue):
    table = slides.plan_tiles(cmu[1], cmu_tissue[1])
    loader = torch.utils.data.DataLoader(slides.TileDataset(table), batch_size=8, num_workers=2)
    seen = []
    for images, index in loader:
        assert images.shape[1:] == (3, 224, 224)
        seen.extend(index.tolist())
    assert sorted(seen) == list(range(len(table)))


# --- writing -------------------------------------------------------------------------------------


def test_outputs_are_written_whole(cmu, cmu_tissue, tmp_path):
    table = slides.label_tiles(slides.plan_tiles(cmu[0], cmu_tissue[0]), None)
    tiling = slides.Tiling(table, cmu_tissue[0], None)
    slides.write_table(table, tmp_path / "out" / "t.parquet")
    slides.plot_overview(tiling, tmp_path / "out" / "t.png")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "t.parquet",
        "t.png",
    ]  # no partial files left
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out" / "t.parquet"), table)
    with pytest.raises(ValueError):  # pyarrow cannot store Python objects
        slides.write_table(table.assign(bad=[object()] * len(table)), tmp_path / "out" / "u.parquet")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t.parquet", "t.png"]


# --- the `smoothsal tiles` command, for real (subprocesses, run concurrently to keep the suite fast) ---


def _smoothsal() -> list[str]:
    import shutil
    import sys

    exe = shutil.which("smoothsal")
    return [exe] if exe else [sys.executable, "-m", "smoothsal.cli"]


@pytest.fixture(scope="module")
def cli_runs(slides_dir, annotations_dir, synthetic_slide, tmp_path_factory):
    """name → (returncode, stdout, stderr, out path) for each `smoothsal tiles` case."""
    import subprocess

    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "cut.xml").write_text('<?xml version="1.0"?><ASAP_Annotations><Annotations><Annotation')
    (tmp / "synthetic.xml").write_text(_asap_xml([("_0", _square(*TUMOUR)), ("_2", _square(*HOLE))]))
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
        cmd = [*_smoothsal(), "tiles", *map(str, args), "--out", str(out)]
        procs[name] = (
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            out,
        )
    results = {}
    for name, (proc, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        results[name] = (proc.returncode, stdout, stderr, out)
    return results


def test_cli_defaults_are_the_library_defaults():
    from smoothsal.cli import _build_parser

    args = _build_parser().parse_args(["tiles", "slide.svs", "--out", "t.parquet"])
    grid, mask, labels = TileGridSettings(), slides.TissueMaskSettings(), LabelSettings()
    assert (args.tile_size, args.stride, args.target_mpp, args.level) == (
        grid.tile_size, grid.stride, grid.target_mpp, grid.level
    )  # fmt: skip
    assert (args.min_tissue, args.max_tiles, args.seed) == (grid.min_tissue, grid.max_tiles, grid.seed)
    assert (args.mask_mpp, args.min_saturation, args.closing_um) == (
        mask.mask_mpp, mask.min_saturation, mask.closing_um
    )  # fmt: skip
    assert (args.min_object_um2, args.min_hole_um2) == (mask.min_object_um2, mask.min_hole_um2)
    assert args.label_threshold == labels.threshold


def test_cli_writes_table_and_overview(cli_runs):
    rc, stdout, stderr, out = cli_runs["cmu"]
    assert rc == 0, stderr
    table = pd.read_parquet(out)
    assert len(table) == 20 and "20 tiles" in stdout
    labels = ["tumor_fraction", "label", "majority_class", "fraction_0", "fraction_1"]
    assert list(table.columns) == [*slides.TABLE_COLUMNS, *labels]
    assert set(table.slide_id) == {"CMU-1-Small-Region"} and Path(table.slide_path.iloc[0]).is_file()
    assert (table.tissue_fraction >= 0.5).all() and set(table.w) == {224} and table.label.isna().all()
    assert Image.open(out.with_suffix(".png")).size[0] >= 400
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiles.parquet", "tiles.png"]


def test_cli_labels_from_annotations(cli_runs):
    rc, _, stderr, out = cli_runs["synthetic"]
    assert rc == 0, stderr
    table = pd.read_parquet(out)
    positive = set(zip(*table.loc[table.label == 1, ["col", "row"]].to_numpy().T))
    assert positive == {(c, r) for c in (2, 3, 4) for r in (2, 3, 4)} - {(3, 3)}  # half tiles < 0.6
    assert _fractions_by_tile(table, "tumor_fraction")[(5, 3)] == pytest.approx(0.5)


def test_cli_slide_without_mpp(cli_runs, slides_dir):
    rc, _, stderr, out = cli_runs["tcga"]
    assert rc == 1 and not out.exists()
    assert stderr.count("\n") == 1 and stderr.startswith("smoothsal tiles: error: ")
    assert str(slides_dir / TCGA) in stderr and "no µm/px" in stderr and "--mpp X" in stderr
    rc, _, stderr, out = cli_runs["tcga_mpp"]
    assert rc == 0, stderr
    table = pd.read_parquet(out)
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
def test_cli_bad_input_is_one_line_error(cli_runs, case, names, says):
    rc, _stdout, stderr, out = cli_runs[case]
    assert rc == 1 and not out.exists() and not out.parent.exists()
    assert stderr.startswith("smoothsal tiles: error: ") and stderr.count("\n") == 1, stderr
    assert names in stderr and says in stderr and "Traceback" not in stderr
