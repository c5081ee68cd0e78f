"""Whole-slide images: open a slide, its level-0 µm/px, read pixels.

Real slides are huge, so everything reads one region at a time, at the coarsest pyramid level that
still has the resolution asked for. OpenSlide's errors become one-line errors naming the slide: one
that cannot be opened at all, or one that opens but has corrupt tile data (a damaged JPEG).

Conventions: coordinates are level-0 pixels (x right, y down).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self

import numpy as np
import openslide
from PIL import Image
from skimage.transform import downscale_local_mean

from .errors import BadOption, BadSlide, MissingInput, one_line

__all__ = [
    "LowRes",
    "Slide",
    "SlideReader",
    "best_level",
    "mpp_from_properties",
    "open_reader",
    "open_slide",
    "read_low_res",
    "read_rgb",
    "read_size",
    "read_tile",
    "resolve_mpp",
]

MPP_FIX = "set it with --mpp X (µm/px at level 0, from the scanner's specification)"
PLAUSIBLE_MPP = (0.01, 20.0)  # µm/px of a scanned level 0; 72 dpi TIFF defaults give ~353
LEVEL_TOLERANCE = 1.01  # a level up to 1% coarser than asked still counts as "fine enough"
MASK_BLOCK = 2048  # at most this many px per side in one low-res read: bounds memory on huge levels
DAMAGED_FIX = "the file is damaged: copy it again from its source, or leave the slide out (exclude:)"


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
    if path.is_dir():
        raise BadSlide(
            f"{path}: is a directory, not a slide file; give the slide's file (for MRXS the .mrxs beside "
            "its folder)"
        )
    if not path.is_file():
        raise MissingInput(f"{path}: slide not found; check the path")
    try:
        return openslide.OpenSlide(path)
    except openslide.OpenSlideError as err:  # includes OpenSlideUnsupportedFormatError
        raise BadSlide(
            f"{path}: cannot read this file as a slide ({one_line(err)}); check that it is a "
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
            raise BadOption(f"{path}: --mpp must be a positive number of µm per pixel, got {override}")
        return float(override)
    mpp = mpp_from_properties(properties)
    if mpp is None:
        raise BadSlide(f"{path}: the slide has no µm/px (microns per pixel) in its metadata; {MPP_FIX}")
    lo, hi = PLAUSIBLE_MPP
    if not lo <= mpp <= hi:
        raise BadSlide(
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


def best_level(downsamples: Sequence[float], downsample: float) -> int:
    """The coarsest level with a downsample ≤ `downsample`: reads the fewest pixels, loses no detail."""
    fine_enough = [i for i, d in enumerate(downsamples) if d <= downsample * LEVEL_TOLERANCE]
    return max(fine_enough, key=lambda i: downsamples[i]) if fine_enough else 0


# --- reading pixels ------------------------------------------------------------------------------


def read_rgb(
    reader: SlideReader, x: int, y: int, level: int, size: tuple[int, int], path: str | Path = "slide"
) -> np.ndarray:
    """One `read_region` as RGB uint8 (H, W, 3); transparent (unscanned) pixels become white.

    Corrupt tile data (OpenSlide's error on reading) is a one-line error naming `path`, the slide.
    """
    try:
        region = reader.read_region((int(x), int(y)), int(level), (int(size[0]), int(size[1])))
    except openslide.OpenSlideError as err:
        raise BadSlide(
            f"{path}: the pixels at level {int(level)}, x {int(x)}, y {int(y)} cannot be read "
            f"({one_line(err)}); {DAMAGED_FIX}"
        ) from None
    return _on_white(np.asarray(region))


def _on_white(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.float32) / 255.0
    return (rgba[..., :3] * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


def read_size(size0: int, level_downsample: float) -> int:
    """Side in level-`L` px of a region that is `size0` px at level 0."""
    return max(1, round(size0 / level_downsample))


def read_tile(
    reader: SlideReader, x: int, y: int, size0: int, level: int, tile_size: int, path: str | Path = "slide"
) -> np.ndarray:
    """A tile as RGB uint8 (tile_size, tile_size, 3): one read at `level`, resized only if needed."""
    n = read_size(size0, reader.level_downsamples[level])
    rgb = read_rgb(reader, x, y, level, (n, n), path)
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
            block = read_rgb(
                slide.reader, round(bx * level_ds), round(by * level_ds), level, size, slide.path
            )
            small = downscale_local_mean(block, (factor, factor, 1), cval=255) if factor > 1 else block
            out[
                by // factor : by // factor + small.shape[0],
                bx // factor : bx // factor + small.shape[1],
            ] = np.round(small).astype(np.uint8)
    return LowRes(out, level, level_ds * factor)
