"""Per-tile saliency maps → one OME-Zarr container per slide (tissue + stitched heatmap pyramids).

The `heatmaps` stage. It reads the saliency stores of one slide (one per method, written by
`smoothsal saliency`), checks that they belong together (same slide, same tile table, same layers and
attributions), and writes a container with:

- `tissue/`: the slide as an RGB uint8 pyramid at about `tissue_mpp` µm/px, read from OpenSlide;
- `heatmaps/{method}/{attribution}/{layer}/`: float32 pyramids of the stitched tile maps, at the map's
  own pixel size (tile µm/px × layer stride), NaN where no tile lies;
- `tiles`: the tile grid (x, y, w, h level-0 px); optional annotation polygons in the root attributes.

Every image carries NGFF `coordinateTransformations` in µm (scale, plus the half-pixel translation of
pixel centres), so a 1/16-resolution layer-3 map overlays the tissue at its physical size.

Memory does not grow with the slide: level 0 is built one output chunk at a time from the tiles that
touch that chunk (the saliency store is read through a small cache of its chunks), and each coarser
level one chunk at a time from the four chunks below it. Chunks with no tile are never written. The
container is written under a hidden sibling name and renamed at the end, so a killed job leaves none.
`export_ome_tiff` streams one image of a container into a pyramidal OME-TIFF (for QuPath).

Tile placement: a tile map of h px covering w level-0 px has d = w / h level-0 px per map px; its
top-left lands at y / d, x / d rounded half up. On a grid whose step is a multiple of d (the usual case)
that is exact; otherwise it is off by at most half a map pixel.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from skimage.transform import downscale_local_mean
from tqdm import tqdm

from .annotations import Annotations, check_annotations_within, read_annotations
from .files import atomic_dir, is_zarr_group
from .killpoints import kill_point
from .slides import Slide, SlideReader, best_level, open_slide, read_rgb
from .tiles import read_tile_table, tiles_sha256

__all__ = [
    "BLENDS",
    "HeatmapSettings",
    "Placement",
    "SaliencyStore",
    "blend_weights",
    "check_inputs",
    "export_ome_tiff",
    "make_heatmaps",
    "open_saliency",
    "place_tiles",
    "read_container",
    "write_container",
]

BLENDS = ("none", "mean", "window")
NGFF_VERSIONS = ("0.4", "0.5")
# Settings of the saliency job that must agree between the stores of one slide (when both record them).
SHARED_SETTINGS = (
    "arch", "num_classes", "checkpoint", "model_sha256", "mean", "std", "attributions", "layers",
    "smoothgrad_samples", "smoothgrad_stdev", "seed", "target", "task", "dataset",
)  # fmt: skip


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
            raise ValueError(f"--blend must be one of {', '.join(BLENDS)}, got {self.blend!r}")
        if self.ngff not in NGFF_VERSIONS:
            raise ValueError(f"--ngff must be 0.4 or 0.5, got {self.ngff!r}")
        if not self.tissue_mpp > 0:
            raise ValueError(f"--tissue-mpp must be > 0 µm/px, got {self.tissue_mpp}")
        if self.chunk < 256 or self.smallest < 1:
            raise ValueError(f"chunks must be >= 256 px, got {self.chunk}")


# --- saliency stores ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SaliencyStore:
    """An opened saliency store (`smoothsal saliency` output) and its root metadata."""

    path: Path
    group: zarr.Group
    meta: dict[str, Any]

    @property
    def method(self) -> str:
        return str(self.meta["method"])

    @property
    def layers(self) -> list[str]:
        return [str(v) for v in self.meta["layers"]]

    @property
    def attributions(self) -> list[str]:
        return [str(v) for v in self.meta["attributions"]]

    def array(self, attribution: str, layer: str) -> zarr.Array:
        try:
            arr = self.group[f"{attribution}/{layer}"]
        except KeyError:
            raise ValueError(
                f"{self.path}: no array {attribution}/{layer} although its metadata lists it; the store "
                "is incomplete, rerun `smoothsal saliency`"
            ) from None
        return arr


def open_saliency(path: str | Path) -> SaliencyStore:
    """Open a saliency store read-only; a one-line error naming it when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: saliency store not found; run `smoothsal saliency` first")
    try:
        group = zarr.open_group(path, mode="r")
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: not a zarr store ({err}); give a `smoothsal saliency` output") from None
    meta = group.attrs.get("smoothsal")
    required = ("slide_id", "method", "layers", "attributions", "tiles_sha256", "n_tiles")
    if not isinstance(meta, dict) or any(k not in meta for k in required):
        raise ValueError(
            f"{path}: no smoothsal saliency metadata (root attribute 'smoothsal' with {', '.join(required)}); "
            "give a `smoothsal saliency` output"
        )
    return SaliencyStore(path, group, dict(meta))


def check_inputs(
    slide: Slide, table: pd.DataFrame, tiles_path: str | Path, stores: Sequence[SaliencyStore]
) -> None:
    """Raise one-line errors naming the files when the slide, tile table and stores do not belong together."""
    tiles_path = Path(tiles_path)
    if table.empty:
        raise ValueError(f"{tiles_path}: the tile table has no tiles; nothing to stitch")
    ids = table["slide_id"].astype(str).unique()
    if len(ids) != 1:
        raise ValueError(
            f"{tiles_path}: tiles of several slides ({', '.join(ids[:3])}); give one slide's table"
        )
    mpp = float(table["slide_mpp"].iloc[0])
    if not math.isclose(mpp, slide.mpp, rel_tol=1e-3):
        raise ValueError(
            f"{slide.path}: {slide.mpp:.4g} µm/px here but {mpp:.4g} in {tiles_path}; pass the same --mpp "
            "as to `smoothsal tiles`"
        )
    width, height = slide.dimensions
    x, y, w, h = (table[c].to_numpy(np.int64) for c in ("x", "y", "w", "h"))
    if (x < 0).any() or (y < 0).any() or (x + w > width).any() or (y + h > height).any():
        raise ValueError(
            f"{tiles_path}: tiles reach outside {slide.path.name} ({width}×{height} px); give the tile table "
            "of this slide"
        )
    if len(np.unique(w)) != 1 or len(np.unique(h)) != 1 or len(table["tile_size"].unique()) != 1:
        raise ValueError(f"{tiles_path}: tiles of several sizes; stitching needs one tile size per slide")
    if not stores:
        raise ValueError("no saliency stores given; pass them with --saliency")
    digest, slide_id = tiles_sha256(table), str(ids[0])
    first = stores[0]
    seen: dict[str, Path] = {}
    for store in stores:
        meta, name = store.meta, store.path
        if str(meta["slide_id"]) != slide_id:
            raise ValueError(
                f"{name}: saliency of slide {meta['slide_id']!r} but {tiles_path} is slide {slide_id!r}; "
                "give the stores and tile table of one slide"
            )
        if int(meta["n_tiles"]) != len(table):
            raise ValueError(
                f"{name}: {meta['n_tiles']} tiles but {tiles_path} has {len(table)}; the store is incomplete "
                "or of another tile table, rerun `smoothsal saliency` with these tiles"
            )
        if meta["tiles_sha256"] != digest:
            raise ValueError(
                f"{name}: computed on another tile table than {tiles_path} (tiles_sha256 differs); rerun "
                "`smoothsal saliency` with these tiles or give the matching --tiles"
            )
        if store.method in seen:
            raise ValueError(
                f"{name} and {seen[store.method]}: both are method {store.method!r}; give each once"
            )
        seen[store.method] = name
        for key, mine, theirs in (
            ("layers", store.layers, first.layers),
            ("attributions", store.attributions, first.attributions),
        ):
            if mine != theirs:
                raise ValueError(
                    f"{name} and {first.path}: different {key} ({', '.join(mine)} vs {', '.join(theirs)}); "
                    "compute every method's saliency with the same settings"
                )
        mine_s, theirs_s = meta.get("settings") or {}, first.meta.get("settings") or {}
        for key in SHARED_SETTINGS:
            if key in mine_s and key in theirs_s and mine_s[key] != theirs_s[key]:
                raise ValueError(
                    f"{name} and {first.path}: different saliency setting {key} ({mine_s[key]!r} vs "
                    f"{theirs_s[key]!r}); compute every method's saliency with the same settings"
                )
        for attribution in store.attributions:
            for layer in store.layers:
                arr = store.array(attribution, layer)
                ref = first.array(attribution, layer)
                if arr.ndim != 3 or arr.shape[0] != len(table) or arr.shape[1:] != ref.shape[1:]:
                    raise ValueError(
                        f"{name}: array {attribution}/{layer} has shape {arr.shape}, expected "
                        f"({len(table)}, {', '.join(map(str, ref.shape[1:]))}); the store is damaged, rerun "
                        "`smoothsal saliency`"
                    )


class _TileMaps:
    """Row i of a [n, h, w] store array, read one store chunk at a time through a small LRU cache."""

    def __init__(self, array: zarr.Array, max_bytes: int = 64 << 20) -> None:
        self.array = array
        self.step = int(array.chunks[0])
        per_chunk = self.step * int(np.prod(array.shape[1:])) * array.dtype.itemsize
        self.capacity = max(2, max_bytes // max(1, per_chunk))
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getitem__(self, i: int) -> np.ndarray:
        k = i // self.step
        block = self.cache.get(k)
        if block is None:
            block = np.asarray(self.array[k * self.step : (k + 1) * self.step], dtype=np.float32)
            self.cache[k] = block
            if len(self.cache) > self.capacity:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(k)
        return block[i - k * self.step]


# --- stitching ------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Placement:
    """Where each tile map lies in a heatmap's level-0 grid (map px)."""

    top: np.ndarray  # int64 [n]
    left: np.ndarray  # int64 [n]
    tile_h: int
    tile_w: int
    shape: tuple[int, int]  # (H, W) of level 0
    downsample: float  # level-0 slide px per map px


def place_tiles(table: pd.DataFrame, map_shape: tuple[int, int], slide_size: tuple[int, int]) -> Placement:
    """Map-pixel positions of every tile for maps of `map_shape` (h, w) on a slide of `slide_size` (W, H)."""
    th, tw = map_shape
    d = float(table["w"].iloc[0]) / tw
    dy = float(table["h"].iloc[0]) / th
    if not math.isclose(d, dy, rel_tol=1e-6):
        raise ValueError(
            f"tile maps of {th}×{tw} px over {table['w'].iloc[0]}×{table['h'].iloc[0]} level-0 px are not square"
        )
    # round half up (not to even): tiles one grid step apart stay one step apart
    top = np.floor(table["y"].to_numpy(np.float64) / d + 0.5).astype(np.int64)
    left = np.floor(table["x"].to_numpy(np.float64) / d + 0.5).astype(np.int64)
    width, height = slide_size
    shape = (
        max(math.ceil(height / d), int((top + th).max())),
        max(math.ceil(width / d), int((left + tw).max())),
    )
    return Placement(top, left, th, tw, shape, d)


def blend_weights(h: int, w: int, blend: str) -> np.ndarray:
    """Per-pixel weight of one tile: ones, or a separable Hann window sampled at pixel centres.

    The Hann window sin²(π (i + ½) / n) is never zero, so a pixel covered by one tile keeps its value,
    and where tiles overlap each pixel is a mean weighted towards the tile whose centre is nearer: no
    seams. Dividing by the summed weights makes it exact for any stride.
    """
    if blend != "window":
        return np.ones((h, w))
    wy = np.sin(np.pi * (np.arange(h) + 0.5) / h) ** 2
    wx = np.sin(np.pi * (np.arange(w) + 0.5) / w) ** 2
    return np.outer(wy, wx)


def _blocks_of_tiles(placement: Placement, chunk: int) -> dict[tuple[int, int], list[int]]:
    """Output chunk (row, col) → indices of the tiles touching it, in table order."""
    p = placement
    out: dict[tuple[int, int], list[int]] = {}
    r0, r1 = p.top // chunk, (p.top + p.tile_h - 1) // chunk
    c0, c1 = p.left // chunk, (p.left + p.tile_w - 1) // chunk
    for i in range(len(p.top)):
        for r in range(r0[i], r1[i] + 1):
            for c in range(c0[i], c1[i] + 1):
                out.setdefault((int(r), int(c)), []).append(i)
    return dict(sorted(out.items()))


def stitch_block(
    maps: Callable[[int], np.ndarray] | _TileMaps,
    placement: Placement,
    tiles: Sequence[int],
    box: tuple[int, int, int, int],
    blend: str,
    weights: np.ndarray,
) -> np.ndarray:
    """The level-0 block `box` = (row0, col0, row1, col1) from the tiles touching it (NaN where none)."""
    r0, c0, r1, c1 = box
    p = placement
    acc = np.zeros((r1 - r0, c1 - c0))
    wsum = np.zeros_like(acc)
    for i in tiles:
        t, left = int(p.top[i]), int(p.left[i])
        ya, yb = max(t, r0), min(t + p.tile_h, r1)
        xa, xb = max(left, c0), min(left + p.tile_w, c1)
        if ya >= yb or xa >= xb:
            continue
        tile = maps[i][ya - t : yb - t, xa - left : xb - left]
        dst = (slice(ya - r0, yb - r0), slice(xa - c0, xb - c0))
        if blend == "none":  # last tile wins
            acc[dst] = tile
            wsum[dst] = 1.0
        else:
            w = weights[ya - t : yb - t, xa - left : xb - left]
            acc[dst] += w * tile
            wsum[dst] += w
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(wsum > 0, acc / wsum, np.nan).astype(np.float32)


# --- writing zarr images --------------------------------------------------------------------------


def _format(ngff: str) -> Any:
    from ome_zarr.format import FormatV04, FormatV05

    return FormatV04() if ngff == "0.4" else FormatV05()


def _create_array(
    group: zarr.Group, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any,
    fill: Any, dims: Sequence[str] | None = None,
) -> zarr.Array:  # fmt: skip
    """A chunked array that skips writing chunks equal to the fill value (NGFF-style '/' chunk keys)."""
    kwargs: dict[str, Any] = {"config": {"write_empty_chunks": False}}
    if group.metadata.zarr_format == 2:
        from numcodecs import Blosc

        kwargs |= {
            "compressors": Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE),
            "chunk_key_encoding": {"name": "v2", "separator": "/"},
        }
    else:
        from zarr.codecs import BloscCodec

        kwargs |= {"compressors": BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")}
        if dims:
            kwargs["dimension_names"] = list(dims)
    chunks = tuple(min(c, s) for c, s in zip(chunks, shape))
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, **kwargs)


def _reduce2(block: np.ndarray, kind: str) -> np.ndarray:
    """2× downsample of the last two axes: NaN-ignoring mean (heatmaps) or rounded mean (uint8)."""
    h, w = block.shape[-2:]
    pad = [(0, 0)] * (block.ndim - 2) + [(0, h % 2), (0, w % 2)]
    if kind == "float":
        b = np.pad(block, pad, constant_values=np.nan)
        b = b.reshape(*b.shape[:-2], b.shape[-2] // 2, 2, b.shape[-1] // 2, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN 2×2 → NaN
            return np.nanmean(b, axis=(-3, -1)).astype(np.float32)
    b = np.pad(block, pad, mode="edge").astype(np.float32)
    b = b.reshape(*b.shape[:-2], b.shape[-2] // 2, 2, b.shape[-1] // 2, 2)
    return np.rint(b.mean(axis=(-3, -1))).astype(np.uint8)


def _pyramid(
    group: zarr.Group, level0: zarr.Array, written: set[tuple[int, int]], settings: HeatmapSettings,
    kind: str, dims: Sequence[str],
) -> list[tuple[int, ...]]:  # fmt: skip
    """Write levels 1, 2, … (each ×2 smaller, built chunk by chunk from the level below) until the longer
    side is below `settings.smallest`; only chunks with data below are computed. Returns every level's
    shape."""
    c = settings.chunk
    shapes = [tuple(level0.shape)]
    below, index = level0, 0
    while max(shapes[-1][-2:]) >= settings.smallest and max(shapes[-1][-2:]) > 1:
        index += 1
        lead, (h, w) = shapes[-1][:-2], shapes[-1][-2:]
        shape = (*lead, math.ceil(h / 2), math.ceil(w / 2))
        arr = _create_array(group, str(index), shape, (*lead, c, c), below.dtype, below.fill_value, dims)
        todo = sorted({(r // 2, q // 2) for r, q in written})
        for r, q in todo:
            src = below[..., 2 * r * c : 2 * (r + 1) * c, 2 * q * c : 2 * (q + 1) * c]
            arr[..., r * c : (r + 1) * c, q * c : (q + 1) * c] = _reduce2(np.asarray(src), kind)
        shapes.append(shape)
        below, written = arr, set(todo)
    return shapes


def _datasets(shapes: Sequence[tuple[int, ...]], pixel_um: float, lead: int) -> list[dict[str, Any]]:
    """NGFF datasets: per level a µm scale and the translation that puts pixel centres where they are
    (a level-k pixel covers [j·s, (j+1)·s) µm from the slide's corner, s = 2^k · pixel_um)."""
    out = []
    for k in range(len(shapes)):
        s = pixel_um * 2**k
        out.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0] * lead + [s, s]},
                    {"type": "translation", "translation": [0.0] * lead + [s / 2, s / 2]},
                ],
            }
        )
    return out


def _axes(channels: bool) -> list[dict[str, str]]:
    space = [{"name": a, "type": "space", "unit": "micrometer"} for a in ("y", "x")]
    return ([{"name": "c", "type": "channel"}] if channels else []) + space


def write_heatmap(
    group: zarr.Group, store_array: zarr.Array, placement: Placement, slide_mpp: float,
    settings: HeatmapSettings, name: str, attrs: Mapping[str, Any], progress: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Stitch one (method, attribution, layer) into `group` as an NGFF multiscales image."""
    c = settings.chunk
    level0 = _create_array(group, "0", placement.shape, (c, c), np.float32, np.nan, ("y", "x"))
    maps = _TileMaps(store_array)
    weights = blend_weights(placement.tile_h, placement.tile_w, settings.blend)
    blocks = _blocks_of_tiles(placement, c)
    written: set[tuple[int, int]] = set()
    H, W = placement.shape
    for (r, q), tiles in tqdm(blocks.items(), desc=name, disable=not progress, leave=False):
        box = (r * c, q * c, min((r + 1) * c, H), min((q + 1) * c, W))
        level0[box[0] : box[2], box[1] : box[3]] = stitch_block(
            maps, placement, tiles, box, settings.blend, weights
        )
        written.add((r, q))
        kill_point("heatmaps.block")  # tests: a real, uncatchable interruption after N blocks
    shapes = _pyramid(group, level0, written, settings, "float", ("y", "x"))
    pixel_um = slide_mpp * placement.downsample
    coarsest = np.asarray(group[str(len(shapes) - 1)][...])
    finite = coarsest[np.isfinite(coarsest)]
    lo, hi = np.percentile(finite, [1, 99]).tolist() if finite.size else [0.0, 1.0]
    info = dict(attrs) | {
        "pixel_size_um": pixel_um,
        "downsample": placement.downsample,
        "fill": "NaN",
        "blend": settings.blend,
        "value_range_p1_p99": [lo, hi],
    }
    omero = {
        "channels": [{"label": name, "color": "FFFFFF", "active": True,
                      "window": {"min": float(np.min(finite)) if finite.size else 0.0,
                                 "max": float(np.max(finite)) if finite.size else 1.0,
                                 "start": lo, "end": hi}}],
        "rdefs": {"model": "greyscale"},
    }  # fmt: skip
    _write_multiscales(group, shapes, pixel_um, settings, name, lead=0, omero=omero)
    group.attrs["smoothsal"] = info
    return info


def _write_multiscales(
    group: zarr.Group, shapes: Sequence[tuple[int, ...]], pixel_um: float, settings: HeatmapSettings,
    name: str, lead: int, omero: dict[str, Any],
) -> None:  # fmt: skip
    from ome_zarr.writer import write_multiscales_metadata

    write_multiscales_metadata(
        group,
        _datasets(shapes, pixel_um, lead),
        fmt=_format(settings.ngff),
        axes=_axes(channels=lead == 1),
        name=name,
        metadata={"omero": omero, "method": "smoothsal: tiles stitched, then 2×2 mean per level"},
    )


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
    arr = _create_array(group, "0", shape, (3, c, c), np.uint8, 255, ("c", "y", "x"))
    level_ds = reader.level_downsamples[level]
    blocks = [(r, q) for r in range(math.ceil(shape[1] / c)) for q in range(math.ceil(shape[2] / c))]
    for r, q in tqdm(blocks, desc="tissue", disable=not progress, leave=False):
        x, y = q * c * factor, r * c * factor  # level-`level` px
        size = (min(c * factor, lw - x), min(c * factor, lh - y))
        rgb = read_rgb(reader, round(x * level_ds), round(y * level_ds), level, size, slide.path)
        if factor > 1:
            rgb = np.rint(downscale_local_mean(rgb, (factor, factor, 1), cval=255)).astype(np.uint8)
        arr[:, r * c : r * c + rgb.shape[0], q * c : q * c + rgb.shape[1]] = np.moveaxis(rgb, -1, 0)
    shapes = _pyramid(group, arr, set(blocks), settings, "uint8", ("c", "y", "x"))
    pixel_um = slide_mpp * downsample
    omero = {
        "channels": [
            {"label": label, "color": color, "active": True,
             "window": {"min": 0, "max": 255, "start": 0, "end": 255}}
            for label, color in (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))
        ],
        "rdefs": {"model": "color"},
    }  # fmt: skip
    _write_multiscales(group, shapes, pixel_um, settings, "tissue", lead=1, omero=omero)
    info = {"kind": "tissue", "pixel_size_um": pixel_um, "level": level, "downsample": downsample}
    group.attrs["smoothsal"] = info
    return info


# --- the container --------------------------------------------------------------------------------


def _check_container(path: Path) -> None:
    if not is_zarr_group(path):
        raise ValueError(
            f"{path} exists and is not a Zarr container; give a new path (SLIDE.ome.zarr) or remove it"
        )


def _annotation_list(annotations: Annotations) -> list[dict[str, Any]]:
    return [
        {
            "class": int(r.label),
            "name": r.name,
            "vertices": np.round(r.exterior, 2).tolist(),
            **({"holes": [np.round(h, 2).tolist() for h in r.holes]} if r.holes else {}),
        }
        for r in annotations.regions
    ]


def write_container(
    out: str | Path,
    slide: Slide,
    table: pd.DataFrame,
    stores: Sequence[SaliencyStore],
    settings: HeatmapSettings = HeatmapSettings(),
    annotations: Annotations | None = None,
    extra_settings: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Path:
    """Write the container for checked inputs (see `check_inputs`); `slide.reader` supplies the tissue
    image (any `SlideReader`), skipped when `settings.tissue` is false. Returns `out`."""
    from . import __version__

    out = Path(out)
    fmt = _format(settings.ngff)
    images: list[dict[str, Any]] = []
    with atomic_dir(out, _check_container) as tmp:
        root = zarr.open_group(tmp, mode="w", zarr_format=fmt.zarr_format)
        if settings.tissue:
            info = write_tissue(root.create_group("tissue"), slide, settings, progress)
            images.append({"path": "tissue", "kind": "tissue", "pixel_size_um": info["pixel_size_um"]})
        for store in stores:
            for attribution in store.attributions:
                for layer in store.layers:
                    arr = store.array(attribution, layer)
                    placement = place_tiles(table, arr.shape[1:], slide.dimensions)
                    path = f"heatmaps/{store.method}/{attribution}/{layer}"
                    attrs = {"kind": "heatmap", "method": store.method, "attribution": attribution, "layer": layer,
                             "stride": arr.attrs.get("stride"), "saliency": str(store.path)}  # fmt: skip
                    info = write_heatmap(
                        root.require_group(path), arr, placement, slide.mpp, settings, path, attrs, progress,
                    )  # fmt: skip
                    images.append({"path": path, **{k: info[k] for k in ("kind", "method", "attribution", "layer")},
                                   "pixel_size_um": info["pixel_size_um"]})  # fmt: skip
        boxes = table[["x", "y", "w", "h"]].to_numpy(np.int64)
        tiles = _create_array(root, "tiles", boxes.shape, (max(1, min(len(boxes), 65536)), 4), np.int64, 0)
        tiles[...] = boxes
        meta: dict[str, Any] = {
            "version": __version__,
            "slide_id": str(table["slide_id"].iloc[0]),
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
            meta["annotations"] = _annotation_list(annotations)
        root.attrs["smoothsal"] = json.loads(json.dumps(meta, default=str))
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
    table = read_tile_table(tiles, slide_path)
    stores = [open_saliency(p) for p in saliency]
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
                raise ValueError(
                    f"--ome-tiff: no image {image!r} will be written; choose one of {', '.join(images)}"
                )
        extra = {"tiles_path": str(tiles), "mpp_override": mpp,
                 "annotations_path": str(annotations) if annotations else None}  # fmt: skip
        write_container(out, slide, table, stores, settings, ann, extra, progress)
    for image, path in ome_tiff:
        export_ome_tiff(out, image, path)
    return Path(out)


# --- OME-TIFF export -------------------------------------------------------------------------------

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

    from .files import atomic_path

    c = read_container(container)
    known = [i["path"] for i in c.images]
    if image not in known:
        raise ValueError(f"{container}: no image {image!r}; choose one of {', '.join(known)}")
    group = c.group[image]
    levels = sorted((k for k in group.array_keys() if k.isdigit()), key=int)
    pixel_um = float(dict(group.attrs).get("smoothsal", {}).get("pixel_size_um"))
    rgb = image == "tissue" or group[levels[0]].ndim == 3
    with atomic_path(out) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
        for k in levels:
            arr = group[k]
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
                resolution=(1e4 / (pixel_um * 2 ** int(k)), 1e4 / (pixel_um * 2 ** int(k))),
                resolutionunit="CENTIMETER", **options,
            )  # fmt: skip
    return Path(out)


# --- reading back ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Container:
    """A heatmaps container opened for reading: root metadata and its images' level-0 arrays."""

    path: Path
    group: zarr.Group
    meta: dict[str, Any]
    images: list[dict[str, Any]] = field(default_factory=list)

    def level(self, path: str, level: int = 0) -> zarr.Array:
        return self.group[f"{path}/{level}"]


def read_container(path: str | Path) -> Container:
    """Open a container written by `write_container` (any NGFF version)."""
    path = Path(path)
    group = zarr.open_group(path, mode="r")
    meta = group.attrs.get("smoothsal")
    if not isinstance(meta, dict) or "images" not in meta:
        raise ValueError(f"{path}: not a smoothsal heatmaps container; make it with `smoothsal heatmaps`")
    return Container(path, group, dict(meta), list(meta["images"]))
