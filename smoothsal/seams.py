"""Seam measure: how much a stitched heatmap shows its tile grid.

Per-tile maps fall off toward the tile border (the model's zero padding) and neighbouring tiles disagree,
so a map stitched from non-overlapping tiles shows a frame around every tile; overlapping tiles with
window blending hide it. This module puts a number on that, for one heatmap's level 0 (map pixels, NaN
where no tile lies) and the tile grid (the container's ``tiles``, level-0 px), placed as `smoothsal
heatmaps` placed them (`stitching.place_tiles`).

Definitions. Tile i covers map rows [top_i, top_i + h) and columns [left_i, left_i + w). The grid lines
are X = {left_i, left_i + w} and Y = {top_i, top_i + h} over all tiles (a line at L lies between pixels
L − 1 and L; with stride s every multiple of s is one); they cut the map into cells (the tiles
themselves without overlap, quarter tiles at half stride). Over the defined pixels m (NaN: no tile),
with a band width b = max(1, round(w / 8)) map px:

- Band ratio R_b = mean |m| over the band / mean |m| over the interior, where the band is the pixels
  within b px of a grid line (min(d_y(i), d_x(j)) < b, d = pixels between a pixel and the nearest
  line) and the interior the rest. Every cell is split alike, so the map's own variation between cells
  cancels; R_b < 1 is a dark frame, > 1 a bright one; a frame that scales the band by f gives R_b = f
  exactly.
- Jump ratio R_j. Across every grid line at L, the step |m(L) − m(L − 1)| against the steps beside it,
  ½ (|m(L − 1) − m(L − 2)| + |m(L + 1) − m(L)|), all four pixels defined; per axis
  R_a = Σ across / Σ beside, and R_j = (R_x R_y)^½ (the axes that have such lines). A smooth map steps
  alike on and beside a line (R_j ≈ 1, any linear ramp exactly 1); steps between tiles give R_j > 1, a
  map that flattens into a kink at the border R_j < 1.
- Seam score S = |ln R_b| + |ln R_j|: 0 = no trace of the tile grid; it grows with frame contrast and
  border steps and does not change when the map is scaled. NaN when there is no band or no interior, or no
  line has defined pixels around it (tiles under 2b + 1 or 3 px); inf when the band or the steps across
  lines are all zero. (Normalising per cell instead, or comparing all steps across with all steps
  within, was tried: on smooth random maps both are biased or noisy by several per cent.)

Computed in blocks of rows (with two rows above and one below, for lines between rows): memory is
bounded by `max_bytes`, whatever the slide's size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .container import open_container
from .errors import BadStore
from .stitching import place_tiles

__all__ = ["BAND_FRACTION", "Seams", "container_seams", "seam_measure"]

BAND_FRACTION = 1 / 8  # band width as a fraction of the tile map's side


@dataclass(frozen=True)
class Seams:
    """The seam measure of one heatmap (see the module docstring) and the counts behind it."""

    score: float  # |ln band_ratio| + |ln jump_ratio|; 0 = no seams
    band_ratio: float  # mean |m| in the band / in the interior
    jump_ratio: float  # step across grid lines / steps beside them (geometric mean of the two axes)
    band_px: int  # b, map px
    band_pixels: int
    interior_pixels: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def as_json(self) -> dict[str, float | int | None]:
        """As container attributes store it: NaN and inf (no band, no steps) as None (JSON has neither)."""
        return {
            k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in asdict(self).items()
        }


def _distance_to_lines(n: int, lines: np.ndarray) -> np.ndarray:
    """For pixels 0…n−1: pixels between each and the nearest line (a line at L lies before pixel L)."""
    j = np.arange(n)
    k = np.searchsorted(lines, j, side="right")  # lines[k − 1] <= j < lines[k]
    far = np.iinfo(np.int64).max
    left = np.where(k > 0, j - lines[np.maximum(k - 1, 0)], far)
    right = np.where(k < len(lines), lines[np.minimum(k, len(lines) - 1)] - 1 - j, far)
    return np.minimum(left, right)


def _steps(values: np.ndarray, lines: np.ndarray) -> tuple[float, float]:
    """Σ |step across| and Σ |mean step beside| over `lines` along axis 0 of `values` (columns: samples)."""
    if len(lines) == 0:
        return 0.0, 0.0
    q = [np.abs(values[lines + k] - values[lines + k - 1]) for k in (-1, 0, 1)]  # before, across, after
    beside = (q[0] + q[2]) / 2
    ok = np.isfinite(q[1]) & np.isfinite(beside)
    return float(q[1][ok].sum()), float(beside[ok].sum())


def seam_measure(
    level0: Any, top: np.ndarray, left: np.ndarray, tile_h: int, tile_w: int, max_bytes: int = 64 << 20
) -> Seams:
    """The seam measure of a stitched map (2-D array-like, NaN = no tile; read in row blocks) with tiles
    at map-pixel rows `top` and columns `left`, each `tile_h` × `tile_w` map px."""
    height, width = (int(v) for v in level0.shape)
    top, left = np.asarray(top, np.int64), np.asarray(left, np.int64)
    band = max(1, round(tile_w * BAND_FRACTION))
    xs = np.unique(np.concatenate([left, left + tile_w]))
    ys = np.unique(np.concatenate([top, top + tile_h]))
    dx, dy = _distance_to_lines(width, xs), _distance_to_lines(height, ys)
    parts = np.zeros(4)  # Σ|m| band, n band, Σ|m| interior, n interior
    jumps = np.zeros((2, 2))  # axis (x, y) × (Σ across, Σ beside)
    x_lines = xs[(xs >= 2) & (xs <= width - 2)]  # lines with two pixels before and one after
    y_lines = ys[(ys >= 2) & (ys <= height - 2)]
    rows = max(1, min(height, max_bytes // max(1, 48 * width)))  # float64 block and its temporaries
    for r0 in range(0, height, rows):
        r1 = min(height, r0 + rows)
        lo, hi = max(0, r0 - 2), min(height, r1 + 1)
        block = np.asarray(level0[lo:hi], dtype=np.float64)
        own = block[r0 - lo : r1 - lo]
        defined = np.isfinite(own)
        magnitude = np.abs(np.where(defined, own, 0.0))
        in_band = (dy[r0:r1, None] < band) | (dx[None, :] < band)
        parts += [magnitude[in_band].sum(), (defined & in_band).sum(),
                  magnitude[~in_band].sum(), (defined & ~in_band).sum()]  # fmt: skip
        jumps[0] += _steps(own.T, x_lines)
        mine = y_lines[(y_lines >= r0) & (y_lines < r1)]
        jumps[1] += _steps(block, mine - lo)
    return _summary(parts, jumps, band)


def _summary(parts: np.ndarray, jumps: np.ndarray, band: int) -> Seams:
    s_band, n_band, s_int, n_int = parts
    r_band = (s_band / n_band) / (s_int / n_int) if n_band and n_int and s_int > 0 else math.nan
    axes = [across / beside for across, beside in jumps if beside > 0]
    r_jump = math.prod(axes) ** (1 / len(axes)) if axes else math.nan
    if math.isnan(r_band) or math.isnan(r_jump):
        score = math.nan
    elif r_band == 0 or r_jump == 0:
        score = math.inf  # nothing in the band, or no step across any line: all contrast is the grid's
    else:
        score = abs(math.log(r_band)) + abs(math.log(r_jump))
    return Seams(score, float(r_band), float(r_jump), band, int(n_band), int(n_int))


def container_seams(path: str | Path, images: Sequence[str] | None = None) -> dict[str, Seams]:
    """The seam measure of every heatmap of a container (or of the `images` given by container path),
    keyed by image path, from its level 0 and the container's tile grid (as `heatmaps` placed it)."""
    c = open_container(path)
    boxes = c.tile_boxes()
    if not len(boxes):
        raise BadStore(f"{c.path}: no tile grid ('tiles' array); rewrite it with `smoothsal heatmaps`")
    size = tuple(c.meta["slide_size_px"])
    table = pd.DataFrame(boxes, columns=["x", "y", "w", "h"])
    out = {}
    for im in c.images:
        if im.kind == "tissue" or (images is not None and im.path not in images):
            continue
        d = im.levels[0].scale[1] / float(c.meta["slide_mpp"])  # level-0 slide px per map px
        p = place_tiles(table, (round(boxes[0, 3] / d), round(boxes[0, 2] / d)), size)
        out[im.path] = seam_measure(c.array(im.index, 0), p.top, p.left, p.tile_h, p.tile_w)
    return out
