"""The `smoothsal heatmaps` stage: per-tile saliency maps → one OME-Zarr container per slide.

It reads the saliency stores of one slide (one per method), checks that they belong together (same
slide, same tile table, same layers and attributions) and writes the container (`container`: tissue
pyramid, one float32 pyramid per method × attribution × layer, the tile grid, µm coordinates).

Memory does not grow with the slide: level 0 is built one output chunk at a time from the tiles that
touch that chunk (`stitching`; the store is read through a small cache of its chunks), and each coarser
level one chunk at a time from the four chunks below it. Chunks with no tile are never written. The
container is written under a hidden sibling name and renamed at the end, so a killed job leaves none.
`export_ome_tiff` streams one image of a container into a pyramidal OME-TIFF (for QuPath).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from skimage.transform import downscale_local_mean
from tqdm import tqdm

from . import __version__
from .annotations import Annotations, check_annotations_within, read_annotations
from .container import (
    KIND,
    annotation_list,
    create_array,
    create_root,
    open_container,
    write_marker,
    write_multiscales,
    write_pyramid,
    write_series,
)
from .errors import BadOption, BadStore, BadTable
from .files import atomic_path, check_file_out, output_dir
from .killpoints import kill_point
from .seams import seam_measure
from .slides import Slide, SlideReader, best_level, open_slide, read_rgb
from .stitching import BLENDS, Placement, blend_weights, blocks_of_tiles, place_tiles, stitch_block
from .store import SHARED_SETTINGS, SaliencyStore, TileMaps, open_store
from .tiles import read_tile_table, tiles_sha256

__all__ = [
    "BLENDS",
    "HeatmapSettings",
    "check_inputs",
    "export_ome_tiff",
    "make_heatmaps",
    "write_container",
]

NGFF_VERSIONS = ("0.4", "0.5")


@dataclass(frozen=True)
class HeatmapSettings:
    """How the container is built."""

    tissue_mpp: float = 2.0  # µm/px of the tissue image's level 0 (the nearest whole-level factor)
    blend: str = "window"  # overlapping tiles: none (last wins) | mean | window (Hann-weighted mean)
    ngff: str = "0.4"  # "0.4" (Zarr v2, read everywhere) or "0.5" (Zarr v3)
    chunk: int = 512  # chunk side in px (every level of every image)
    smallest: int = 512  # pyramids stop at the first level whose longer side is below this
    tissue: bool = True  # write the tissue image

    def __post_init__(self) -> None:
        if self.blend not in BLENDS:
            raise BadOption(f"--blend must be one of {', '.join(BLENDS)}, got {self.blend!r}")
        if self.ngff not in NGFF_VERSIONS:
            raise BadOption(f"--ngff must be 0.4 or 0.5, got {self.ngff!r}")
        if not self.tissue_mpp > 0:
            raise BadOption(f"--tissue-mpp must be > 0 µm/px, got {self.tissue_mpp}")
        if self.chunk < 256 or self.smallest < 1:
            raise BadOption(f"chunks must be >= 256 px, got {self.chunk}")


# --- checking the inputs --------------------------------------------------------------------------


def _check_table(slide: Slide, table: pd.DataFrame, tiles: Path) -> None:
    """The tile table (already checked to be this slide's, `tiles.read_tile_table`) fits the slide; an
    empty one (no tissue) gives a container without heatmaps."""
    if table.empty:
        return
    mpp = float(table["slide_mpp"].iloc[0])
    if not math.isclose(mpp, slide.mpp, rel_tol=1e-3):
        raise BadOption(
            f"{slide.path}: {slide.mpp:.4g} µm/px here but {mpp:.4g} in {tiles}; pass the same --mpp "
            "as to `smoothsal tiles`"
        )
    width, height = slide.dimensions
    x, y, w, h = (table[c].to_numpy(np.int64) for c in ("x", "y", "w", "h"))
    if (x < 0).any() or (y < 0).any() or (x + w > width).any() or (y + h > height).any():
        raise BadTable(
            f"{tiles}: tiles reach outside {slide.path.name} ({width}×{height} px); give the tile table "
            "of this slide"
        )
    if len(np.unique(w)) != 1 or len(np.unique(h)) != 1 or len(table["tile_size"].unique()) != 1:
        raise BadTable(f"{tiles}: tiles of several sizes; stitching needs one tile size per slide")


def _check_store(store: SaliencyStore, table: pd.DataFrame, tiles: Path) -> None:
    """One store was computed on exactly these tiles."""
    meta, name = store.meta, store.path
    slide_id = str(table["slide_id"].iloc[0]) if len(table) else str(meta["slide_id"])
    if str(meta["slide_id"]) != slide_id:
        raise BadStore(
            f"{name}: saliency of slide {meta['slide_id']!r} but {tiles} is slide {slide_id!r}; "
            "give the stores and tile table of one slide"
        )
    if int(meta["n_tiles"]) != len(table):
        raise BadStore(
            f"{name}: {meta['n_tiles']} tiles but {tiles} has {len(table)}; the store is incomplete "
            "or of another tile table, rerun `smoothsal saliency` with these tiles"
        )
    if meta["tiles_sha256"] != tiles_sha256(table):
        raise BadStore(
            f"{name}: computed on another tile table than {tiles} (tiles_sha256 differs); rerun "
            "`smoothsal saliency` with these tiles or give the matching --tiles"
        )


def _check_alike(store: SaliencyStore, first: SaliencyStore, n: int) -> None:
    """Two stores of one slide hold the same layers, attributions, settings and array shapes."""
    name = store.path
    for key, mine, theirs in (
        ("layers", store.layers, first.layers),
        ("attributions", store.attributions, first.attributions),
    ):
        if mine != theirs:
            raise BadStore(
                f"{name} and {first.path}: different {key} ({', '.join(mine)} vs {', '.join(theirs)}); "
                "compute every method's saliency with the same settings"
            )
    mine_s, theirs_s = store.settings, first.settings
    for key in SHARED_SETTINGS:
        if key in mine_s and key in theirs_s and mine_s[key] != theirs_s[key]:
            raise BadStore(
                f"{name} and {first.path}: different saliency setting {key} ({mine_s[key]!r} vs "
                f"{theirs_s[key]!r}); compute every method's saliency with the same settings"
            )
    for attribution in store.attributions:
        for layer in store.layers:
            arr, ref = store.array(attribution, layer), first.array(attribution, layer)
            if arr.ndim != 3 or arr.shape[0] != n or arr.shape[1:] != ref.shape[1:]:
                raise BadStore(
                    f"{name}: array {attribution}/{layer} has shape {arr.shape}, expected "
                    f"({n}, {', '.join(map(str, ref.shape[1:]))}); the store is damaged, rerun "
                    "`smoothsal saliency`"
                )


def check_inputs(
    slide: Slide, table: pd.DataFrame, tiles_path: str | Path, stores: Sequence[SaliencyStore]
) -> None:
    """Raise one-line errors naming the files when the slide, tile table and stores do not belong together."""
    tiles_path = Path(tiles_path)
    _check_table(slide, table, tiles_path)
    if not stores:
        raise BadOption("no saliency stores given; pass them with --saliency")
    seen: dict[str, Path] = {}
    for store in stores:
        _check_store(store, table, tiles_path)
        if store.method in seen:
            raise BadOption(
                f"{store.path} and {seen[store.method]}: both are method {store.method!r}; give each once"
            )
        seen[store.method] = store.path
        _check_alike(store, stores[0], len(table))


# --- writing --------------------------------------------------------------------------------------


def tissue_geometry(reader: SlideReader, slide_mpp: float, tissue_mpp: float) -> tuple[int, int, float]:
    """(pyramid level to read, whole factor to average down by, level-0 px per tissue px)."""
    downsamples = list(reader.level_downsamples)
    want = tissue_mpp / slide_mpp
    level = best_level(downsamples, want)
    factor = max(1, round(want / downsamples[level]))
    return level, factor, downsamples[level] * factor


def write_tissue(
    group: zarr.Group, slide: Slide, settings: HeatmapSettings, progress: bool = False
) -> dict[str, Any]:
    """The slide as an RGB uint8 pyramid at ~`settings.tissue_mpp`, read one output chunk at a time."""
    reader, slide_mpp = slide.reader, slide.mpp
    level, factor, downsample = tissue_geometry(reader, slide_mpp, settings.tissue_mpp)
    lw, lh = reader.level_dimensions[level]
    shape = (3, math.ceil(lh / factor), math.ceil(lw / factor))
    c = settings.chunk
    arr = create_array(group, "0", shape, (3, c, c), np.uint8, 255, ("c", "y", "x"))
    level_ds = reader.level_downsamples[level]
    blocks = [(r, q) for r in range(math.ceil(shape[1] / c)) for q in range(math.ceil(shape[2] / c))]
    for r, q in tqdm(blocks, desc="tissue", disable=not progress, leave=False):
        x, y = q * c * factor, r * c * factor  # level-`level` px
        size = (min(c * factor, lw - x), min(c * factor, lh - y))
        rgb = read_rgb(reader, round(x * level_ds), round(y * level_ds), level, size, slide.path)
        if factor > 1:
            rgb = np.rint(downscale_local_mean(rgb, (factor, factor, 1), cval=255)).astype(np.uint8)
        arr[:, r * c : r * c + rgb.shape[0], q * c : q * c + rgb.shape[1]] = np.moveaxis(rgb, -1, 0)
    shapes = write_pyramid(
        group, arr, set(blocks), settings.chunk, settings.smallest, "uint8", ("c", "y", "x")
    )
    pixel_um = slide_mpp * downsample
    omero = {
        "channels": [
            {"label": label, "color": color, "active": True,
             "window": {"min": 0, "max": 255, "start": 0, "end": 255}}
            for label, color in (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))
        ],
        "rdefs": {"model": "color"},
    }  # fmt: skip
    write_multiscales(group, shapes, pixel_um, settings.ngff, "tissue", lead=1, omero=omero)
    info = {"kind": "tissue", "pixel_size_um": pixel_um, "level": level, "downsample": downsample}
    group.attrs["smoothsal"] = info
    return info


def write_heatmap(
    group: zarr.Group, maps: TileMaps, placement: Placement, slide_mpp: float,
    settings: HeatmapSettings, name: str, attrs: Mapping[str, Any], progress: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Stitch one (method, attribution, layer) into `group` as an NGFF multiscales image."""
    c = settings.chunk
    level0 = create_array(group, "0", placement.shape, (c, c), np.float32, np.nan, ("y", "x"))
    weights = blend_weights(placement.tile_h, placement.tile_w, settings.blend)
    blocks = blocks_of_tiles(placement, c)
    written: set[tuple[int, int]] = set()
    H, W = placement.shape
    for (r, q), tiles in tqdm(blocks.items(), desc=name, disable=not progress, leave=False):
        box = (r * c, q * c, min((r + 1) * c, H), min((q + 1) * c, W))
        level0[box[0] : box[2], box[1] : box[3]] = stitch_block(
            maps, placement, tiles, box, settings.blend, weights
        )
        written.add((r, q))
        kill_point("heatmaps.block")  # tests: a real, uncatchable interruption after N blocks
    shapes = write_pyramid(group, level0, written, settings.chunk, settings.smallest, "float", ("y", "x"))
    pixel_um = slide_mpp * placement.downsample
    coarsest = np.asarray(group[str(len(shapes) - 1)][...])
    finite = coarsest[np.isfinite(coarsest)]
    lo, hi = np.percentile(finite, [1, 99]).tolist() if finite.size else [0.0, 1.0]
    seams = seam_measure(level0, placement.top, placement.left, placement.tile_h, placement.tile_w)
    info = dict(attrs) | {
        "pixel_size_um": pixel_um,
        "downsample": placement.downsample,
        "fill": "NaN",
        "blend": settings.blend,
        "value_range_p1_p99": [lo, hi],
        "seams": seams.as_json(),  # how much the map shows its tile grid (`seams`)
    }
    omero = {
        "channels": [{"label": name, "color": "FFFFFF", "active": True,
                      "window": {"min": float(np.min(finite)) if finite.size else 0.0,
                                 "max": float(np.max(finite)) if finite.size else 1.0,
                                 "start": lo, "end": hi}}],
        "rdefs": {"model": "greyscale"},
    }  # fmt: skip
    write_multiscales(group, shapes, pixel_um, settings.ngff, name, lead=0, omero=omero)
    group.attrs["smoothsal"] = info
    return info


class _Rows:
    """Tile i of a subset = row `index[i]` of the store's maps."""

    def __init__(self, maps: TileMaps, index: np.ndarray) -> None:
        self.maps, self.index = maps, index

    def __getitem__(self, i: int) -> np.ndarray:
        return self.maps[int(self.index[i])]


def write_container(
    out: str | Path,
    slide: Slide,
    table: pd.DataFrame,
    stores: Sequence[SaliencyStore],
    settings: HeatmapSettings = HeatmapSettings(),
    annotations: Annotations | None = None,
    extra_settings: Mapping[str, Any] | None = None,
    progress: bool = False,
    rows: Sequence[int] | None = None,
) -> Path:
    """Write the container for checked inputs (see `check_inputs`); `slide.reader` supplies the tissue
    image (any `SlideReader`), skipped when `settings.tissue` is false. `rows`: stitch only these tiles
    of the table (the container's tile grid then holds only them). Returns `out`."""
    out = Path(out)
    index = np.arange(len(table)) if rows is None else np.asarray(rows, np.int64)
    table = table.iloc[index]
    images: list[dict[str, Any]] = []
    with output_dir(out, KIND) as tmp:
        root = create_root(tmp, settings.ngff)
        if settings.tissue:
            info = write_tissue(root.create_group("tissue"), slide, settings, progress)
            images.append({"path": "tissue", "kind": "tissue", "pixel_size_um": info["pixel_size_um"]})
        for store in stores if len(table) else ():  # no tiles (no tissue): no heatmap images
            for attribution in store.attributions:
                for layer in store.layers:
                    arr = store.array(attribution, layer)
                    placement = place_tiles(table, arr.shape[1:], slide.dimensions)
                    maps = _Rows(store.maps(attribution, layer), index)
                    path = f"heatmaps/{store.method}/{attribution}/{layer}"
                    attrs = {"kind": "heatmap", "method": store.method, "attribution": attribution, "layer": layer,
                             "stride": arr.attrs.get("stride"), "saliency": str(store.path)}  # fmt: skip
                    info = write_heatmap(
                        root.require_group(path), maps, placement, slide.mpp, settings, path, attrs, progress,
                    )  # fmt: skip
                    images.append({"path": path, **{k: info[k] for k in ("kind", "method", "attribution", "layer")},
                                   "pixel_size_um": info["pixel_size_um"], "seam_score": info["seams"]["score"]})  # fmt: skip
        boxes = table[["x", "y", "w", "h"]].to_numpy(np.int64)
        tiles = create_array(root, "tiles", boxes.shape, (max(1, min(len(boxes), 65536)), 4), np.int64, 0)
        tiles[...] = boxes
        meta: dict[str, Any] = {
            "version": __version__,
            "slide_id": str(stores[0].meta["slide_id"]),
            "n_tiles": len(table),
            "slide_path": str(slide.path),
            "slide_mpp": slide.mpp,
            "slide_size_px": list(slide.dimensions),
            "settings": asdict(settings) | {
                "tiles_sha256": tiles_sha256(table),
                "saliency": [{"path": str(s.path), "method": s.method, "settings": s.meta.get("settings", {})}
                             for s in stores],
            } | dict(extra_settings or {}),
            "images": images,
            "tiles": "tiles",
        }  # fmt: skip
        if annotations is not None:
            meta["annotations"] = annotation_list(annotations)
        write_series(root, [image["path"] for image in images], f"smoothsal {__version__}")
        root.attrs["smoothsal"] = json.loads(json.dumps(meta, default=str))
        write_marker(root, tmp)
    return out


def make_heatmaps(
    slide_path: str | Path,
    saliency: Sequence[str | Path],
    tiles: str | Path,
    out: str | Path,
    settings: HeatmapSettings = HeatmapSettings(),
    mpp: float | None = None,
    annotations: str | Path | None = None,
    class_map: Mapping[str, int] | None = None,
    progress: bool = True,
    ome_tiff: Sequence[tuple[str, str | Path]] = (),
) -> Path:
    """The `heatmaps` stage for one slide: read and check inputs, write the container atomically, then
    export the images named in `ome_tiff` ((image path, file) pairs) as pyramidal OME-TIFFs."""
    tiles = Path(tiles)
    check_file_out(*(path for _, path in ome_tiff), option="--ome-tiff", within=[out])
    table = read_tile_table(tiles, slide_path)
    stores = [open_store(p) for p in saliency]
    ann = read_annotations(annotations, class_map) if annotations else None
    with open_slide(slide_path, mpp) as slide:
        check_inputs(slide, table, tiles, stores)
        if ann is not None:
            check_annotations_within(ann, slide)
        images = ["tissue"] * settings.tissue + [
            f"heatmaps/{s.method}/{a}/{layer}" for s in stores for a in s.attributions for layer in s.layers
        ]
        for image, _ in ome_tiff:
            if image not in images:
                raise BadOption(
                    f"--ome-tiff: no image {image!r} will be written; choose one of {', '.join(images)}"
                )
        extra = {"tiles_path": str(tiles), "mpp_override": mpp,
                 "annotations_path": str(annotations) if annotations else None}  # fmt: skip
        write_container(out, slide, table, stores, settings, ann, extra, progress)
    for image, path in ome_tiff:
        export_ome_tiff(out, image, path)
    return Path(out)


TIFF_TILE = 256


def _tiff_tiles(level: zarr.Array, rgb: bool) -> Iterator[np.ndarray]:
    """A level's 256-px tiles in TIFF order (row-major), read one band of tile rows at a time."""
    h, w = level.shape[-2:]
    band = max(TIFF_TILE, (level.chunks[-2] // TIFF_TILE) * TIFF_TILE)
    fill = 255 if rgb else np.nan
    for r0 in range(0, h, band):
        rows = np.asarray(level[..., r0 : r0 + band, :])
        if rgb:
            rows = np.moveaxis(rows, 0, -1)  # c, y, x → y, x, c (interleaved RGB)
        for r in range(0, rows.shape[0], TIFF_TILE):
            for c in range(0, w, TIFF_TILE):
                tile = rows[r : r + TIFF_TILE, c : c + TIFF_TILE]
                if tile.shape[:2] != (TIFF_TILE, TIFF_TILE):
                    pad = [(0, TIFF_TILE - tile.shape[0]), (0, TIFF_TILE - tile.shape[1])] + [(0, 0)] * (
                        tile.ndim - 2
                    )
                    tile = np.pad(tile, pad, constant_values=fill)
                yield np.ascontiguousarray(tile)


def export_ome_tiff(container: str | Path, image: str, out: str | Path) -> Path:
    """Write one image of a container (a heatmap, or `tissue`) as a pyramidal OME-TIFF (256-px tiles,
    zlib, sub-resolutions as SubIFDs, µm pixel size) for QuPath and other TIFF readers. Streams tile rows,
    so memory stays bounded; written atomically."""
    import tifffile

    c = open_container(container)
    info = c.image(image)
    levels = range(len(info.levels))
    for lv in info.levels:  # a TIFF has square pixels and no origin: the image must start at the corner
        if not math.isclose(*lv.scale, rel_tol=1e-9) or max(map(abs, lv.origin)) > 1e-6 * lv.scale[1]:
            raise BadStore(f"{c.path}: {lv.path} is not square pixels from the slide's corner; an OME-TIFF "
                           "cannot hold it, rewrite the container with `smoothsal heatmaps`")  # fmt: skip
    pixel_um = info.levels[0].scale[0]
    rgb = info.kind == "tissue" or "c" in info.axes
    with atomic_path(out) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
        for k in levels:
            arr = c.array(info.index, k)
            h, w = arr.shape[-2:]
            shape = (h, w, 3) if rgb else (h, w)
            options: dict[str, Any] = {"subfiletype": 1} if k != levels[0] else {
                "subifds": len(levels) - 1,
                "metadata": {
                    "axes": "YXS" if rgb else "YX", "Name": image, "PhysicalSizeX": pixel_um,
                    "PhysicalSizeXUnit": "µm", "PhysicalSizeY": pixel_um, "PhysicalSizeYUnit": "µm",
                },
            }  # fmt: skip
            tif.write(
                _tiff_tiles(arr, rgb), shape=shape, dtype=arr.dtype, tile=(TIFF_TILE, TIFF_TILE),
                photometric="rgb" if rgb else "minisblack", compression="zlib",
                resolution=(1e4 / info.levels[k].scale[1], 1e4 / info.levels[k].scale[0]),
                resolutionunit="CENTIMETER", **options,
            )  # fmt: skip
    return Path(out)
