"""Stitching tile maps into one slide map: where each tile lands, how overlaps are blended, one output
block at a time (so memory does not grow with the slide).

Tile placement: a tile map of h px covering w level-0 px has d = w / h level-0 px per map px; its
top-left lands at y / d, x / d rounded half up. On a grid whose step is a multiple of d (the usual case)
that is exact; otherwise it is off by at most half a map pixel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import BadStore
from .store import TileMaps

__all__ = ["BLENDS", "Placement", "blend_weights", "blocks_of_tiles", "place_tiles", "stitch_block"]

BLENDS = ("none", "mean", "window")


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
        raise BadStore(
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


def blocks_of_tiles(placement: Placement, chunk: int) -> dict[tuple[int, int], list[int]]:
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
    maps: TileMaps | Mapping[int, np.ndarray] | Sequence[np.ndarray],  # tile i → its map
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
