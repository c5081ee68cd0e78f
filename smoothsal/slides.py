"""Whole-slide images: open, find tissue, tile, label.

Turns one slide into the tile table that every later stage reads (one row per tile, level-0
coordinates). Real slides are huge, so the tissue mask and the overview come from a low pyramid
level, and tiles are read at the coarsest level that still has the target resolution, one
`read_region` per tile.

Conventions: coordinates are level-0 pixels (x right, y down); a tile is (x, y, w, h) at level 0 and
`tile_size` px at the target resolution; class id 0 is background.
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, Self

import numpy as np
import openslide
import pandas as pd
import torch
from PIL import Image
from skimage.draw import polygon as draw_polygon
from skimage.filters import threshold_otsu
from skimage.morphology import isotropic_closing, remove_small_holes, remove_small_objects
from skimage.transform import downscale_local_mean

from .files import atomic_path

MPP_FIX = "set it with --mpp X (µm/px at level 0, from the scanner's specification)"
PLAUSIBLE_MPP = (0.01, 20.0)  # µm/px of a scanned level 0; 72 dpi TIFF defaults give ~353
LEVEL_TOLERANCE = 1.01  # a level up to 1% coarser than asked still counts as "fine enough"
MASK_BLOCK = 2048  # at most this many px per side in one low-res read: bounds memory on huge levels

# Class names (case-insensitive) → class id. 0 = exclusion: cut out of the other regions.
# A negative id means "ignore these annotations".
DEFAULT_CLASS_MAP: dict[str, int] = {
    "_0": 1, "_1": 1, "tumor": 1, "tumour": 1, "metastases": 1,
    "_2": 0, "exclusion": 0, "normal": 0,
}  # fmt: skip


# --- opening a slide ----------------------------------------------------------------------------


class SlideReader(Protocol):
    """What this module needs from a slide handle (an `openslide.OpenSlide` has it all)."""

    level_count: int
    level_dimensions: Sequence[tuple[int, int]]
    level_downsamples: Sequence[float]
    properties: Mapping[str, str]

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Slide:
    """An open slide with its level-0 µm/px."""

    path: Path
    reader: SlideReader
    mpp: float
    slide_id: str

    @property
    def dimensions(self) -> tuple[int, int]:
        return tuple(self.reader.level_dimensions[0])

    @property
    def downsamples(self) -> tuple[float, ...]:
        return tuple(self.reader.level_downsamples)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_reader(path: str | Path) -> openslide.OpenSlide:
    """Open a slide with OpenSlide, turning its errors into one-line errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: slide not found; check the path")
    try:
        return openslide.OpenSlide(path)
    except openslide.OpenSlideError as err:  # includes OpenSlideUnsupportedFormatError
        raise ValueError(
            f"{path}: cannot read this file as a slide ({_one_line(err)}); check that it is a "
            "whole-slide image OpenSlide reads (SVS, tiled TIFF, NDPI, MRXS, …) and not truncated"
        ) from None


def open_slide(path: str | Path, mpp: float | None = None, slide_id: str | None = None) -> Slide:
    """Open a slide; `mpp` (µm/px at level 0) overrides the metadata, which is needed when it has none.

    `slide_id` defaults to the file name without its suffix.
    """
    path = Path(path)
    reader = open_reader(path)
    try:
        return Slide(path, reader, resolve_mpp(path, reader.properties, mpp), slide_id or path.stem)
    except ValueError:
        reader.close()
        raise


def resolve_mpp(path: Path, properties: Mapping[str, str], override: float | None) -> float:
    """µm/px at level 0: the override if given, else the metadata; a clear error if neither works."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"{path}: --mpp must be a positive number of µm per pixel, got {override}")
        return float(override)
    mpp = mpp_from_properties(properties)
    if mpp is None:
        raise ValueError(f"{path}: the slide has no µm/px (microns per pixel) in its metadata; {MPP_FIX}")
    lo, hi = PLAUSIBLE_MPP
    if not lo <= mpp <= hi:
        raise ValueError(
            f"{path}: the slide has no usable µm/px: its metadata says {mpp:.4g} µm/px, which is "
            f"not a scan resolution (a default TIFF resolution?); {MPP_FIX}"
        )
    return mpp


def mpp_from_properties(properties: Mapping[str, str]) -> float | None:
    """µm/px from OpenSlide properties (`openslide.mpp-x/y`, else TIFF resolution); None if absent."""
    xy = [_as_float(properties.get(f"openslide.mpp-{a}")) for a in "xy"]
    if xy[0] is None:
        unit = {"centimeter": 1e4, "inch": 25400.0}.get(properties.get("tiff.ResolutionUnit", ""))
        res = [_as_float(properties.get(f"tiff.{a}Resolution")) for a in "XY"]
        if unit is None or not res[0]:
            return None
        xy = [unit / r if r else None for r in res]
    values = [v for v in xy if v is not None and v > 0]
    return float(np.mean(values)) if values else None


def _as_float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def best_level(downsamples: Sequence[float], downsample: float) -> int:
    """The coarsest level with a downsample ≤ `downsample`: reads the fewest pixels, loses no detail."""
    fine_enough = [i for i, d in enumerate(downsamples) if d <= downsample * LEVEL_TOLERANCE]
    return max(fine_enough, key=lambda i: downsamples[i]) if fine_enough else 0


# --- reading pixels ------------------------------------------------------------------------------


def read_rgb(reader: SlideReader, x: int, y: int, level: int, size: tuple[int, int]) -> np.ndarray:
    """One `read_region` as RGB uint8 (H, W, 3); transparent (unscanned) pixels become white."""
    rgba = np.asarray(reader.read_region((int(x), int(y)), int(level), (int(size[0]), int(size[1]))))
    return _on_white(rgba)


def _on_white(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.float32) / 255.0
    return (rgba[..., :3] * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


def read_size(size0: int, level_downsample: float) -> int:
    """Side in level-`L` px of a region that is `size0` px at level 0."""
    return max(1, round(size0 / level_downsample))


def read_tile(reader: SlideReader, x: int, y: int, size0: int, level: int, tile_size: int) -> np.ndarray:
    """A tile as RGB uint8 (tile_size, tile_size, 3): one read at `level`, resized only if needed."""
    n = read_size(size0, reader.level_downsamples[level])
    rgb = read_rgb(reader, x, y, level, (n, n))
    if n != tile_size:  # Pillow's bilinear filter widens its support when shrinking: antialiased
        rgb = np.array(Image.fromarray(rgb).resize((tile_size, tile_size), Image.Resampling.BILINEAR))
    return rgb


@dataclass(frozen=True, eq=False)
class LowRes:
    """A whole slide at low resolution: `image[i, j]` covers level-0 [j·d, (j+1)·d) × [i·d, (i+1)·d)."""

    image: np.ndarray  # RGB uint8 (H, W, 3)
    level: int  # pyramid level it was read from
    downsample: float  # d: level-0 px per image px


def read_low_res(slide: Slide, mpp: float) -> LowRes:
    """The slide at about `mpp` µm/px, from the coarsest level fine enough (level 0 only if alone).

    The level is read in blocks and averaged down by an integer factor, so memory stays bounded.
    """
    want = mpp / slide.mpp
    level = best_level(slide.downsamples, want)
    level_ds = slide.downsamples[level]
    factor = max(1, round(want / level_ds))
    width, height = slide.reader.level_dimensions[level]
    out = np.empty((math.ceil(height / factor), math.ceil(width / factor), 3), np.uint8)
    step = max(factor, MASK_BLOCK // factor * factor)  # whole blocks of `factor` px per read
    for by in range(0, height, step):
        for bx in range(0, width, step):
            size = (min(step, width - bx), min(step, height - by))
            block = read_rgb(slide.reader, round(bx * level_ds), round(by * level_ds), level, size)
            small = downscale_local_mean(block, (factor, factor, 1), cval=255) if factor > 1 else block
            out[
                by // factor : by // factor + small.shape[0],
                bx // factor : bx // factor + small.shape[1],
            ] = np.round(small).astype(np.uint8)
    return LowRes(out, level, level_ds * factor)


# --- tissue mask ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TissueMaskSettings:
    """Tissue = HSV saturation above Otsu's threshold (at least `min_saturation`), cleaned up."""

    mask_mpp: float = 8.0  # resolution of the mask, µm/px (read from a low pyramid level)
    min_saturation: float = 0.08  # floor on the threshold: blank glass (S ≈ 0–0.05) stays background
    closing_um: float = 16.0  # closing radius: joins tissue split by thin gaps
    min_object_um2: float = 20_000.0  # tissue specks up to this area are dropped (dust, debris)
    min_hole_um2: float = 20_000.0  # holes up to this area inside tissue are filled

    def __post_init__(self) -> None:
        if self.mask_mpp <= 0:
            raise ValueError(f"mask resolution must be > 0 µm/px, got {self.mask_mpp} (e.g. --mask-mpp 8)")


def tissue_mask(
    rgb: np.ndarray, mpp: float, settings: TissueMaskSettings = TissueMaskSettings()
) -> np.ndarray:
    """Boolean tissue mask of an RGB image at `mpp` µm/px: saturation, Otsu with a floor, morphology."""
    saturation = hsv_saturation(rgb)
    threshold = settings.min_saturation
    if np.ptp(saturation) > 0:
        threshold = max(threshold, float(threshold_otsu(saturation)))
    mask = saturation > threshold
    radius = round(settings.closing_um / mpp)
    if radius >= 1:
        mask = isotropic_closing(mask, radius)
    px_area = mpp * mpp
    mask = remove_small_objects(mask, max_size=int(settings.min_object_um2 / px_area))
    return remove_small_holes(mask, max_size=int(settings.min_hole_um2 / px_area))


def hsv_saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (max − min) / max in float32: `skimage.color.rgb2hsv(rgb)[..., 1]` without its
    float64 H×W×3 copies (a whole Camelyon16 slide at 8 µm/px is ~21 Mpx)."""
    high, low = rgb.max(axis=-1).astype(np.float32), rgb.min(axis=-1).astype(np.float32)
    return np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)


@dataclass(frozen=True, eq=False)
class Tissue:
    """A slide's tissue mask with the low-resolution image it was computed from."""

    overview: LowRes
    mask: np.ndarray  # bool, same grid as overview.image


def find_tissue(slide: Slide, settings: TissueMaskSettings = TissueMaskSettings()) -> Tissue:
    """Read the slide at `settings.mask_mpp` and threshold it."""
    low = read_low_res(slide, settings.mask_mpp)
    return Tissue(low, tissue_mask(low.image, slide.mpp * low.downsample, settings))


def box_fractions(
    mask: np.ndarray, downsample: float, xs: np.ndarray, ys: np.ndarray, w: int, h: int
) -> np.ndarray:
    """Fraction of mask pixels (by pixel centre) inside each level-0 box (x, y, w, h); vectorised.

    A box smaller than a mask pixel takes the pixel under its centre.
    """
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def span(start: np.ndarray, length: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.ceil(start / downsample - 0.5).astype(np.int64)
        hi = np.ceil((start + length) / downsample - 0.5).astype(np.int64)
        centre = np.floor((start + length / 2) / downsample).astype(np.int64)
        lo, hi = np.where(hi > lo, lo, centre), np.where(hi > lo, hi, centre + 1)
        return np.clip(lo, 0, n), np.clip(hi, 0, n)

    r0, r1 = span(np.asarray(ys, float), h, mask.shape[0])
    c0, c1 = span(np.asarray(xs, float), w, mask.shape[1])
    total = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    area = (r1 - r0) * (c1 - c0)
    return np.where(area > 0, total / np.maximum(area, 1), 0.0)


# --- tile grid -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileGridSettings:
    """Where tiles go: size and stride at the target resolution, which tiles are kept."""

    tile_size: int = 224  # px at the target resolution
    stride: int | None = None  # px at the target resolution; None = tile_size (no overlap)
    target_mpp: float = 0.5  # µm/px of the tiles; ignored when `level` is set
    level: int | None = None  # read tiles at this pyramid level, unresized
    min_tissue: float = 0.5  # keep tiles whose tissue fraction is at least this
    roi: tuple[int, int, int, int] | None = None  # (x, y, w, h) at level 0; None = the slide's bounds
    max_tiles: int | None = None  # keep a random sample of at most this many tiles
    seed: int = 0  # for that sample

    def __post_init__(self) -> None:
        if self.tile_size < 1 or (self.stride is not None and self.stride < 1):
            raise ValueError(f"tile size and stride must be >= 1 px, got {self.tile_size} / {self.stride}")
        if self.max_tiles is not None and self.max_tiles < 0:
            raise ValueError(f"--max-tiles must be >= 0, got {self.max_tiles}")
        if self.level is None and self.target_mpp <= 0:
            raise ValueError(f"target resolution must be > 0 µm/px, got {self.target_mpp}")


@dataclass(frozen=True)
class TileGeometry:
    """A grid's sizes at level 0 and the level its tiles are read from."""

    size0: int  # tile side, level-0 px
    stride0: int  # grid step, level-0 px
    level: int
    tile_size: int  # tile side, px at the target resolution
    mpp: float  # µm/px of a tile as returned (slide mpp · size0 / tile_size)
    align: int = 1  # tile positions are multiples of this (level-0 px)


def pixel_aligned_step(level_downsample: float) -> int:
    """Level-0 step that keeps reads at this level on whole level pixels: the downsample if it is a
    whole number, else 1. OpenSlide resamples (bilinear: slower, slightly blurred) any read whose
    level-0 position is not a whole level pixel."""
    nearest = round(level_downsample)
    return nearest if abs(level_downsample - nearest) < 1e-9 else 1


def tile_geometry(slide: Slide, grid: TileGridSettings) -> TileGeometry:
    """Level-0 tile size and stride, and the pyramid level to read, for `grid` on `slide`."""
    if grid.tile_size < 1 or (grid.stride is not None and grid.stride < 1):
        raise ValueError(f"tile size and stride must be ≥ 1 px, got {grid.tile_size} and {grid.stride}")
    if grid.level is not None:
        if not 0 <= grid.level < len(slide.downsamples):
            raise ValueError(
                f"{slide.path}: --level {grid.level} does not exist; the slide has levels "
                f"0–{len(slide.downsamples) - 1}"
            )
        level, downsample = grid.level, slide.downsamples[grid.level]
    else:
        if not grid.target_mpp > 0:
            raise ValueError(f"--target-mpp must be a positive number of µm per pixel, got {grid.target_mpp}")
        downsample = grid.target_mpp / slide.mpp
        level = best_level(slide.downsamples, downsample)
    align = pixel_aligned_step(slide.downsamples[level])
    size0 = max(1, round(grid.tile_size * downsample))
    stride0 = max(align, round((grid.stride or grid.tile_size) * downsample / align) * align)
    return TileGeometry(size0, stride0, level, grid.tile_size, slide.mpp * size0 / grid.tile_size, align)


def slide_region(slide: Slide, roi: tuple[int, int, int, int] | None) -> tuple[int, int, int, int]:
    """The level-0 box to tile: the ROI clipped to the slide, else OpenSlide's bounds, else all of it."""
    width, height = slide.dimensions
    if roi is None:
        p = slide.reader.properties
        keys = [f"openslide.bounds-{k}" for k in ("x", "y", "width", "height")]
        roi = tuple(int(p[k]) for k in keys) if all(k in p for k in keys) else (0, 0, width, height)
    x, y, w, h = roi
    x0, y0, x1, y1 = max(0, x), max(0, y), min(width, x + w), min(height, y + h)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{slide.path}: ROI {roi} lies outside the slide ({width}×{height} px); fix --roi")
    return x0, y0, x1 - x0, y1 - y0


def grid_positions(
    region: tuple[int, int, int, int], size0: int, stride0: int, align: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Level-0 (x, y) and (col, row) of every tile that fits wholly inside `region`, row-major;
    the first tile starts at the region's first multiple of `align`."""
    x, y, w, h = region
    x, y = -(-x // align) * align, -(-y // align) * align
    w, h = region[0] + w - x, region[1] + h - y
    ncol = (w - size0) // stride0 + 1 if w >= size0 else 0
    nrow = (h - size0) // stride0 + 1 if h >= size0 else 0
    rows, cols = np.meshgrid(np.arange(nrow), np.arange(ncol), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    return x + cols * stride0, y + rows * stride0, cols, rows


def check_tile_fits(slide: Slide, grid: TileGridSettings) -> None:
    """Raise a clear error when not even one tile fits in the slide (or ROI)."""
    geo = tile_geometry(slide, grid)
    _, _, w, h = slide_region(slide, grid.roi)
    if geo.size0 > min(w, h):
        raise ValueError(
            f"{slide.path}: a tile ({grid.tile_size} px at {geo.mpp:.3g} µm/px = {geo.size0} px at "
            f"level 0) is larger than the slide{' ROI' if grid.roi else ''} ({w}×{h} px); use a "
            "smaller --tile-size or a finer --target-mpp/--level"
        )


TABLE_COLUMNS = (
    "slide_id", "slide_path", "col", "row", "x", "y", "w", "h", "level", "tile_size", "mpp",
    "slide_mpp", "tissue_fraction",
)  # fmt: skip


def plan_tiles(slide: Slide, tissue: Tissue, grid: TileGridSettings = TileGridSettings()) -> pd.DataFrame:
    """The tile table (no labels yet): the grid, its tissue fractions, filtered and optionally sampled.

    A slide smaller than one tile gives an empty table.
    """
    geo = tile_geometry(slide, grid)
    xs, ys, cols, rows = grid_positions(slide_region(slide, grid.roi), geo.size0, geo.stride0, geo.align)
    fractions = box_fractions(tissue.mask, tissue.overview.downsample, xs, ys, geo.size0, geo.size0)
    keep = np.flatnonzero(fractions >= grid.min_tissue)
    if grid.max_tiles is not None and len(keep) > grid.max_tiles:
        keep = np.sort(np.random.default_rng(grid.seed).choice(keep, grid.max_tiles, replace=False))
    n = len(keep)
    return pd.DataFrame(
        {
            "slide_id": pd.Series([slide.slide_id] * n, dtype="string"),
            "slide_path": pd.Series([str(slide.path.resolve())] * n, dtype="string"),
            "col": cols[keep].astype(np.int32),
            "row": rows[keep].astype(np.int32),
            "x": xs[keep].astype(np.int64),
            "y": ys[keep].astype(np.int64),
            "w": np.full(n, geo.size0, np.int64),
            "h": np.full(n, geo.size0, np.int64),
            "level": np.full(n, geo.level, np.int32),
            "tile_size": np.full(n, geo.tile_size, np.int32),
            "mpp": np.full(n, geo.mpp, np.float64),
            "slide_mpp": np.full(n, slide.mpp, np.float64),
            "tissue_fraction": fractions[keep].astype(np.float64),
        }
    )


# --- annotations ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Region:
    """One annotated polygon in level-0 px, with optional holes."""

    name: str
    label: int  # class id; 0 = exclusion (cut out of every other region)
    exterior: np.ndarray  # (N, 2) float (x, y)
    holes: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True, eq=False)
class Annotations:
    """A slide's annotated regions, in paint order (exclusions last)."""

    path: Path
    regions: tuple[Region, ...]


def parse_class_map(text: str) -> dict[str, int]:
    """`"Tumor=1,Stroma=2,Exclusion=0"` → {"tumor": 1, …} (names case-insensitive)."""
    mapping: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.rpartition("=")
        if not name.strip() or not value.strip().lstrip("-").isdigit():
            raise ValueError(
                f"--class-map: cannot read {item!r}; write NAME=ID pairs separated by commas, e.g. "
                "Tumor=1,Stroma=2,Exclusion=0 (0 = exclusion, negative = ignore)"
            )
        mapping[name.strip().lower()] = int(value)
    return mapping


def n_classes(class_map: Mapping[str, int]) -> int:
    """Number of foreground classes: the largest class id in the map."""
    return max([0, *class_map.values()])


def read_annotations(path: str | Path, class_map: Mapping[str, int] | None = None) -> Annotations:
    """Read ASAP XML (`.xml`) or GeoJSON (`.geojson`/`.json`) annotations in level-0 px.

    Errors name the file and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found; check --annotations")
    mapping = {k.lower(): v for k, v in (DEFAULT_CLASS_MAP if class_map is None else class_map).items()}
    if path.suffix.lower() == ".xml":
        raw = _asap_regions(path)
    elif path.suffix.lower() in (".geojson", ".json"):
        raw = _geojson_regions(path)
    else:
        raise ValueError(f"{path}: unknown annotation format; give ASAP XML (.xml) or GeoJSON (.geojson)")
    regions = [replace(r, label=_class_id(path, r.label, mapping)) for r in raw]
    regions = [r for r in regions if r.label >= 0]
    return Annotations(path, tuple(sorted(regions, key=lambda r: r.label == 0)))


def _class_id(path: Path, name: Any, mapping: Mapping[str, int]) -> int:
    key = str(name).lower()
    if key not in mapping:
        raise ValueError(
            f"{path}: annotation class {name!r} has no class id; map it with --class-map "
            f"'{name}=ID' (0 = exclusion, negative = ignore; known: {', '.join(sorted(mapping))})"
        )
    return mapping[key]


def _asap_regions(path: Path) -> list[Region]:
    """ASAP XML polygons; `label` holds the group name until mapped."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(
            f"{path}: malformed ASAP XML ({err}); re-export it from ASAP or fix the file"
        ) from None
    annotations = root.findall("./Annotations/Annotation")
    if root.tag != "ASAP_Annotations" or root.find("Annotations") is None:
        raise ValueError(
            f"{path}: not an ASAP annotation file (root <{root.tag}>, expected "
            "<ASAP_Annotations><Annotations>); give ASAP XML or QuPath GeoJSON"
        )
    regions = []
    for ann in annotations:
        if ann.get("Type", "Polygon") in ("Dot", "PointSet"):
            continue  # points have no area
        try:
            coords = sorted(
                (
                    float(c.get("Order", i)),
                    float(c.attrib["X"].replace(",", ".")),
                    float(c.attrib["Y"].replace(",", ".")),
                )
                for i, c in enumerate(ann.iter("Coordinate"))
            )
        except (KeyError, ValueError):
            raise ValueError(
                f"{path}: annotation {ann.get('Name')!r} has a coordinate without numeric X/Y; "
                "fix or remove it"
            ) from None
        if len(coords) >= 3:
            vertices = np.array([(x, y) for _, x, y in coords], dtype=np.float64)
            group = ann.get("PartOfGroup", "None")
            regions.append(Region(ann.get("Name", ""), group, vertices))  # type: ignore[arg-type]
    return regions


def _geojson_regions(path: Path) -> list[Region]:
    """GeoJSON (QuPath export) polygons; `label` holds the class name until mapped."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path}: malformed GeoJSON ({_one_line(err)}); re-export it from QuPath or fix the file"
        ) from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    else:
        features = data  # QuPath < 0.4 writes a bare list of features
    if not isinstance(features, list):
        raise ValueError(
            f"{path}: not GeoJSON features (expected a FeatureCollection); re-export it from QuPath"
        )
    regions = []
    for i, feature in enumerate(features):
        try:
            regions.extend(_feature_regions(feature, i))
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise ValueError(
                f"{path}: feature {i} is not a valid GeoJSON Polygon/MultiPolygon "
                f"({_one_line(err)}); fix or remove it"
            ) from None
    return regions


def _feature_regions(feature: dict, index: int) -> list[Region]:
    props = feature.get("properties") or {}
    cls = props.get("classification")
    name = cls.get("name") if isinstance(cls, dict) else cls
    name = name if name else "Unclassified"
    geometry = feature["geometry"]
    kind = geometry["type"]
    if kind == "Polygon":
        polygons = [geometry["coordinates"]]
    elif kind == "MultiPolygon":
        polygons = geometry["coordinates"]
    else:
        return []  # points and lines have no area
    regions = []
    for rings in polygons:
        arrays = [np.asarray(ring, dtype=np.float64)[:, :2] for ring in rings]
        if len(arrays[0]) >= 3:
            regions.append(
                Region(str(props.get("name", f"feature {index}")), name, arrays[0], tuple(arrays[1:]))
            )
    return regions


def check_annotations_within(annotations: Annotations, slide: Slide, tolerance: float = 0.01) -> None:
    """Raise when a region reaches outside the slide (by more than `tolerance` × its size)."""
    width, height = slide.dimensions
    for region in annotations.regions:
        (x0, y0), (x1, y1) = region.exterior.min(0), region.exterior.max(0)
        if (
            x0 < -tolerance * width
            or y0 < -tolerance * height
            or x1 > (1 + tolerance) * width
            or y1 > (1 + tolerance) * height
        ):
            raise ValueError(
                f"{annotations.path}: region {region.name!r} spans x {x0:.0f}–{x1:.0f}, "
                f"y {y0:.0f}–{y1:.0f} but {slide.path.name} is {width}×{height} px at level 0; "
                "give the annotation file of this slide"
            )


# --- annotations → labels ------------------------------------------------------------------------


def _clip_to_box(vertices: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Sutherland–Hodgman: the polygon clipped to an axis-aligned box (x0, y0, x1, y1); vectorised.

    Clipping first keeps rasterisation cost per tile independent of the polygon's vertex count.
    """
    v = vertices
    for axis, bound, keep_above in (
        (0, box[0], True),
        (0, box[2], False),
        (1, box[1], True),
        (1, box[3], False),
    ):
        if len(v) == 0:
            break
        inside = v[:, axis] >= bound if keep_above else v[:, axis] <= bound
        prev, prev_inside = np.roll(v, 1, axis=0), np.roll(inside, 1)
        crossing = inside != prev_inside
        delta = v[:, axis] - prev[:, axis]
        t = np.divide(bound - prev[:, axis], delta, out=np.zeros(len(v)), where=crossing & (delta != 0))
        hit = prev + t[:, None] * (v - prev)
        v = np.stack([hit, v], axis=1)[np.stack([crossing, inside], axis=1)]
    return v


def _shoelace(v: np.ndarray) -> float:
    return 0.5 * abs(float(np.dot(v[:, 0], np.roll(v[:, 1], 1)) - np.dot(v[:, 1], np.roll(v[:, 0], 1))))


def _fill(vertices: np.ndarray, x: float, y: float, scale: float, size: int) -> np.ndarray:
    """Pixels of a size×size tile (origin (x, y), `scale` px per level-0 px) inside the polygon."""
    margin = 2.0 / scale
    box = (x - margin, y - margin, x + size / scale + margin, y + size / scale + margin)
    clipped = _clip_to_box(vertices, box)
    out = np.zeros((size, size), bool)
    if len(clipped) < 3:
        return out
    if math.isclose(_shoelace(clipped), (box[2] - box[0]) * (box[3] - box[1]), rel_tol=1e-9):
        out[:] = True  # the polygon covers the whole tile
        return out
    rows, cols = draw_polygon(
        (clipped[:, 1] - y) * scale - 0.5, (clipped[:, 0] - x) * scale - 0.5, (size, size)
    )
    out[rows, cols] = True
    return out


def _overlaps(region: Region, x: float, y: float, w: float, h: float) -> bool:
    (x0, y0), (x1, y1) = region.exterior.min(0), region.exterior.max(0)
    return x0 < x + w and x1 > x and y0 < y + h and y1 > y


def _near_regions(table: pd.DataFrame, annotations: Annotations) -> np.ndarray:
    """Per tile: does its box overlap any region's bounding box? (vectorised)"""
    if not annotations.regions or table.empty:
        return np.zeros(len(table), bool)
    boxes = np.array([[*r.exterior.min(0), *r.exterior.max(0)] for r in annotations.regions])
    x, y, w = (table[c].to_numpy(float)[:, None] for c in ("x", "y", "w"))
    return ((boxes[:, 0] < x + w) & (boxes[:, 2] > x) & (boxes[:, 1] < y + w) & (boxes[:, 3] > y)).any(1)


def tile_label_mask(annotations: Annotations, x: int, y: int, w: int, size: int) -> np.ndarray:
    """The label mask (size×size uint8 class ids, 0 = background) of the level-0 tile (x, y, w, w)."""
    labels = np.zeros((size, size), np.uint8)
    scale = size / w
    for region in annotations.regions:
        if not _overlaps(region, x, y, w, w):
            continue
        inside = _fill(region.exterior, x, y, scale, size)
        for hole in region.holes:
            inside &= ~_fill(hole, x, y, scale, size)
        labels[inside] = region.label
    return labels


@dataclass(frozen=True)
class LabelSettings:
    """How tiles get labels from annotations."""

    threshold: float = 0.5  # classification label = 1 when the tumour (class 1) fraction is ≥ this
    n_classes: int = 1  # foreground classes: one `fraction_k` column per class 0..n_classes


def label_tiles(
    table: pd.DataFrame, annotations: Annotations | None, settings: LabelSettings = LabelSettings()
) -> pd.DataFrame:
    """The table with label columns: `fraction_k` per class, `tumor_fraction` (class 1), `label`
    (tumour fraction ≥ threshold), `majority_class` (most frequent non-background class, 0 if none).
    Without annotations the columns are there but empty (NA)."""
    k = settings.n_classes
    if k < 1:
        raise ValueError(f"n_classes must be ≥ 1 (class 1 = tumour), got {k}")
    table = table.copy()
    fractions = np.full((len(table), k + 1), np.nan if annotations is None else 0.0)
    if annotations is not None:
        fractions[:, 0] = 1.0  # tiles away from every region: all background, nothing to rasterise
        for i in np.flatnonzero(_near_regions(table, annotations)):
            x, y, w, size = (int(table[c].iat[i]) for c in ("x", "y", "w", "tile_size"))
            counts = np.bincount(tile_label_mask(annotations, x, y, w, size).ravel(), minlength=k + 1)
            fractions[i] = counts[: k + 1] / (size * size)
    foreground = fractions[:, 1:]
    majority = np.where((foreground > 0).any(1), foreground.argmax(1) + 1, 0)
    label = (fractions[:, 1] >= settings.threshold).astype(int)
    table["tumor_fraction"] = fractions[:, 1]
    table["label"] = pd.array(label, dtype="Int64")
    table["majority_class"] = pd.array(majority, dtype="Int64")
    if annotations is None:
        table["label"] = table["majority_class"] = pd.array([pd.NA] * len(table), dtype="Int64")
    for c in range(k + 1):
        table[f"fraction_{c}"] = fractions[:, c]
    return table


# --- one slide, end to end -----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Tiling:
    """A tiled slide: the table and what the overview needs."""

    table: pd.DataFrame
    tissue: Tissue
    annotations: Annotations | None


def tile_slide(
    slide: Slide,
    grid: TileGridSettings = TileGridSettings(),
    mask: TissueMaskSettings = TissueMaskSettings(),
    annotations: Annotations | None = None,
    labels: LabelSettings = LabelSettings(),
) -> Tiling:
    """Tissue mask, grid, labels: the whole `tiles` stage for one slide. Reads only low levels."""
    check_tile_fits(slide, grid)
    if annotations is not None:
        check_annotations_within(annotations, slide)
    tissue = find_tissue(slide, mask)
    table = label_tiles(plan_tiles(slide, tissue, grid), annotations, labels)
    return Tiling(table, tissue, annotations)


def write_table(table: pd.DataFrame, path: str | Path) -> None:
    """Write Parquet atomically: a temporary file renamed at the end (a killed job leaves no table)."""
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)


def plot_overview(tiling: Tiling, path: str | Path, title: str = "") -> None:
    """PNG overview: low-res slide, tissue outline (green), tiles (blue; red when labelled tumour),
    annotation outlines (yellow; exclusions dashed). Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    low, table = tiling.tissue.overview, tiling.table
    height, width = low.image.shape[:2]
    fig = Figure(figsize=(8, 8 * height / width + 0.4), dpi=max(100, min(300, width // 8)))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    ax.imshow(low.image, interpolation="lanczos" if width > 800 else "nearest")
    if tiling.tissue.mask.any() and min(tiling.tissue.mask.shape) >= 2:
        ax.contour(tiling.tissue.mask, levels=[0.5], colors="lime", linewidths=0.8)
    d = low.downsample
    corners = table[["x", "y", "w"]].to_numpy(float) / d
    boxes = [((x, y), (x + w, y), (x + w, y + w), (x, y + w)) for x, y, w in corners - (0.5, 0.5, 0)]
    tumour = table["label"].fillna(0).to_numpy(bool) if "label" in table else np.zeros(len(table), bool)
    for selected, colour in ((~tumour, "dodgerblue"), (tumour, "red")):  # tumour tiles drawn on top
        tiles = [b for b, keep in zip(boxes, selected) if keep]
        ax.add_collection(PolyCollection(tiles, facecolors="none", edgecolors=colour, linewidths=0.4))
    for region in tiling.annotations.regions if tiling.annotations else ():
        for ring in (region.exterior, *region.holes):
            closed = np.vstack([ring, ring[:1]]) / d - 0.5
            ax.plot(
                closed[:, 0],
                closed[:, 1],
                color="yellow",
                lw=0.8,
                ls="--" if region.label == 0 else "-",
            )
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_axis_off()
    legend = "tiles blue (label 1: red) · tissue green · annotations yellow (exclusions dashed)"
    fig.suptitle(f"{title or f'{len(table)} tiles'}\n{legend}", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


# --- reading tiles for a model -------------------------------------------------------------------


class TileDataset(torch.utils.data.Dataset):
    """Tiles of a tile table (one or many slides) as float tensors [3, H, W], RGB in [0, 1].

    Each tile is one `read_region` at the table's level, resized only when that level is not exactly
    the tile size. Each process (DataLoader worker) opens each slide once, lazily; handles are never
    shared across a fork. `__getitem__(i)` returns `(image, i)`, i = row position in the table.
    `transform` (e.g. normalisation) is applied to the [0, 1] tensor; `opener` opens a slide path.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        max_open: int = 16,
        opener: Callable[[str], SlideReader] = open_reader,
    ) -> None:
        self.table = table.reset_index(drop=True)
        self.transform = transform
        self.max_open = max_open
        self.opener = opener
        self._columns = {
            c: self.table[c].to_numpy() for c in ("slide_path", "x", "y", "w", "level", "tile_size")
        }
        self._handles: OrderedDict[str, SlideReader] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        c = self._columns
        reader = self._reader(str(c["slide_path"][i]))
        rgb = read_tile(
            reader, c["x"][i], c["y"][i], int(c["w"][i]), int(c["level"][i]), int(c["tile_size"][i])
        )
        image = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
        return (self.transform(image) if self.transform else image), int(i)

    def _reader(self, path: str) -> SlideReader:
        """This process's handle for `path`, opened on first use (at most `max_open` kept open)."""
        if self._pid != os.getpid():  # forked worker: the parent's handles are not ours
            self._handles, self._pid = OrderedDict(), os.getpid()
        if path not in self._handles:
            self._handles[path] = self.opener(path)
            if len(self._handles) > self.max_open:
                self._handles.popitem(last=False)[1].close()
        self._handles.move_to_end(path)
        return self._handles[path]

    def __getstate__(self) -> dict[str, Any]:  # spawn workers: send the table, not the handles
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = OrderedDict(), -1
        return state


def load_tile(row: Mapping[str, Any] | pd.Series, reader: SlideReader | None = None) -> np.ndarray:
    """One tile of a table row as RGB uint8 (for plotting and checks; the Dataset is the fast path)."""
    own = reader is None
    reader = reader or open_reader(row["slide_path"])
    try:
        return read_tile(
            reader,
            int(row["x"]),
            int(row["y"]),
            int(row["w"]),
            int(row["level"]),
            int(row["tile_size"]),
        )
    finally:
        if own:
            reader.close()


def read_tables(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Concatenate per-slide tile tables (e.g. the training tiles of many slides) into one."""
    return pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
