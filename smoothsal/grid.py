"""The tile grid: where tiles go on a slide, in level-0 px, and the pyramid level they are read from.

Pure geometry: a tile is (x, y, w, h) at level 0 and `tile_size` px at the target resolution; the grid
lies inside the slide's region of interest (or OpenSlide's bounds), and tile positions stay on whole
pixels of the level they are read from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BadOption
from .slides import Slide, best_level

__all__ = [
    "TileGeometry",
    "TileGridSettings",
    "check_tile_fits",
    "grid_positions",
    "pixel_aligned_step",
    "slide_region",
    "tile_geometry",
]


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
            raise BadOption(f"tile size and stride must be >= 1 px, got {self.tile_size} / {self.stride}")
        if not 0 <= self.min_tissue <= 1:
            raise BadOption(f"--min-tissue is a tissue fraction in [0, 1], got {self.min_tissue}")
        if self.max_tiles is not None and self.max_tiles < 0:
            raise BadOption(f"--max-tiles must be >= 0, got {self.max_tiles}")
        if self.level is None and self.target_mpp <= 0:
            raise BadOption(f"target resolution must be > 0 µm/px, got {self.target_mpp}")


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
        raise BadOption(f"tile size and stride must be ≥ 1 px, got {grid.tile_size} and {grid.stride}")
    if grid.level is not None:
        if not 0 <= grid.level < len(slide.downsamples):
            raise BadOption(
                f"{slide.path}: --level {grid.level} does not exist; the slide has levels "
                f"0–{len(slide.downsamples) - 1}"
            )
        level, downsample = grid.level, slide.downsamples[grid.level]
    else:
        if not grid.target_mpp > 0:
            raise BadOption(f"--target-mpp must be a positive number of µm per pixel, got {grid.target_mpp}")
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
        raise BadOption(f"{slide.path}: ROI {roi} lies outside the slide ({width}×{height} px); fix --roi")
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
        raise BadOption(
            f"{slide.path}: a tile ({grid.tile_size} px at {geo.mpp:.3g} µm/px = {geo.size0} px at "
            f"level 0) is larger than the slide{' ROI' if grid.roi else ''} ({w}×{h} px); use a "
            "smaller --tile-size or a finer --target-mpp/--level"
        )
