"""Annotations → per-pixel class ids of a tile (label masks): polygons clipped to the tile first, so the
cost per tile does not grow with a polygon's vertex count, then rasterised with scikit-image."""

from __future__ import annotations

import math

import numpy as np
from skimage.draw import polygon as draw_polygon

from .regions import Annotations, Region

__all__ = ["overlaps", "tile_label_mask"]


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


def overlaps(region: Region, x: float, y: float, w: float, h: float) -> bool:
    """Does the region's bounding box overlap the level-0 box (x, y, w, h)?"""
    (x0, y0), (x1, y1) = region.exterior.min(0), region.exterior.max(0)
    return x0 < x + w and x1 > x and y0 < y + h and y1 > y


def tile_label_mask(annotations: Annotations, x: int, y: int, w: int, size: int) -> np.ndarray:
    """The label mask (size×size uint8 class ids, 0 = background) of the level-0 tile (x, y, w, w)."""
    labels = np.zeros((size, size), np.uint8)
    scale = size / w
    for region in annotations.regions:
        if not overlaps(region, x, y, w, w):
            continue
        inside = _fill(region.exterior, x, y, scale, size)
        for hole in region.holes:
            inside &= ~_fill(hole, x, y, scale, size)
        labels[inside] = region.label
    return labels
