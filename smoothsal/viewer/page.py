"""What the viewer page loads from one heatmap container: the manifest, the tile grid, the annotations
and the encoded tiles (JPEG for the tissue, little-endian float32 for a heatmap), ``TILE_SIZE`` px a side
at every pyramid level. The server and the static export serve exactly these."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..container import Container, ImageInfo

__all__ = ["COLORMAPS", "TILE_SIZE", "Page", "tile_grid"]

TILE_SIZE = 256  # px per served tile side, at every level
COLORMAPS = ("inferno", "viridis", "magma", "turbo", "gray", "coolwarm", "RdBu_r")
_JPEG_QUALITY = 90


def tile_grid(info: ImageInfo, level: int) -> tuple[int, int]:
    """(rows, cols) of served tiles of an image at ``level``."""
    h, w = info.levels[level].shape
    return math.ceil(h / TILE_SIZE), math.ceil(w / TILE_SIZE)


def _encode_rgb(data: np.ndarray) -> bytes:
    from PIL import Image

    if data.ndim == 2:
        data = data[..., None]
    if data.dtype != np.uint8:
        data = np.clip(data, 0, 255).astype(np.uint8)
    rgb = np.repeat(data[..., :1], 3, axis=2) if data.shape[2] < 3 else data[..., :3]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), "RGB").save(buf, "JPEG", quality=_JPEG_QUALITY)
    return buf.getvalue()


@functools.cache
def _colormaps() -> dict[str, list[int]]:
    """256-entry RGB look-up tables (flat r, g, b, …) of the offered matplotlib colour maps."""
    from matplotlib import colormaps

    x = np.linspace(0.0, 1.0, 256)
    return {
        name: (colormaps[name](x)[:, :3] * 255).round().astype(int).ravel().tolist() for name in COLORMAPS
    }


class Page:
    """The page's data of one container (opened read-only; encoded tiles cached)."""

    def __init__(self, container: str | Path | Container, cache_tiles: int = 256) -> None:
        self.container = container if isinstance(container, Container) else Container(container)
        self.tile_bytes = functools.lru_cache(maxsize=cache_tiles)(self._tile_bytes)

    @property
    def images(self) -> tuple[ImageInfo, ...]:
        return self.container.images

    def tile(self, image: int, level: int, row: int, col: int) -> np.ndarray:
        info = self.container.images[image]
        rows, cols = tile_grid(info, level)
        if not (0 <= row < rows and 0 <= col < cols):
            raise IndexError(f"tile {row},{col} outside level {level} ({rows}x{cols} tiles)")
        return self.container.region(
            image,
            level,
            slice(row * TILE_SIZE, (row + 1) * TILE_SIZE),
            slice(col * TILE_SIZE, (col + 1) * TILE_SIZE),
        )

    def _tile_bytes(self, image: int, level: int, row: int, col: int) -> bytes | None:
        """The encoded tile (JPEG for the tissue, float32 LE for a heatmap); None when it holds no data."""
        info = self.container.images[image]
        data = self.tile(image, level, row, col)
        if info.kind == "tissue":
            return _encode_rgb(data)
        values = data.astype("<f4", copy=False)
        empty = np.isnan(values)
        if info.fill_value is not None and math.isfinite(info.fill_value):
            empty |= values == info.fill_value  # chunks never written read as the fill value
        if empty.all():
            return None
        return np.ascontiguousarray(values).tobytes()

    def manifest(self) -> dict[str, Any]:
        """Everything the page needs before loading tiles: images, levels, µm scales, quantiles, colour maps."""
        c = self.container
        mpp = c.meta.get("slide_mpp")
        size_px = c.meta.get("slide_size_px")
        if mpp and size_px:
            extent = [float(size_px[0]) * float(mpp), float(size_px[1]) * float(mpp)]
        else:  # no slide size recorded: the first image's extent
            lv = c.images[0].levels[0]
            extent = [lv.origin[1] + lv.shape[1] * lv.scale[1], lv.origin[0] + lv.shape[0] * lv.scale[0]]
        images = []
        for im in c.images:
            entry: dict[str, Any] = {
                "index": im.index,
                "kind": im.kind,
                "path": im.path,
                "name": im.name,
                "format": "jpg" if im.kind == "tissue" else "f32",
                "levels": [
                    {"shape": list(lv.shape), "scale": list(lv.scale), "origin": list(lv.origin)}
                    for lv in im.levels
                ],
            }
            if im.kind != "tissue":
                entry |= {"method": im.method, "attribution": im.attribution, "layer": im.layer}
                try:
                    entry["quantiles"] = c.quantiles(im.index)
                except PermissionError as err:  # a chunk linked from outside the store: never read
                    entry["quantiles"], entry["error"] = None, str(err)
                entry["zero_is_empty"] = im.fill_value == 0.0
            images.append(entry)
        return {
            "format": "smoothsal-viewer/1",
            "version": c.version(),
            "title": str(c.meta.get("slide_id") or c.path.name),
            "slide": {"id": c.meta.get("slide_id"), "mpp": mpp, "size_px": size_px, "extent_um": extent},
            "tile_size": TILE_SIZE,
            "images": images,
            "colormaps": _colormaps(),
            "grid": "tiles" in c.root and mpp is not None,
            "annotations": bool(c.meta.get("annotations")) and mpp is not None,
        }

    def grid(self) -> dict[str, Any]:
        """The tile grid as a flat list x, y, w, h, … in level-0 px, with the slide's µm/px."""
        return {
            "mpp": self.container.meta.get("slide_mpp"),
            "boxes": self.container.tile_boxes().ravel().tolist(),
        }

    def annotations(self) -> dict[str, Any]:
        """Annotation polygons (level-0 px) with the slide's µm/px."""
        return {"mpp": self.container.meta.get("slide_mpp"), "polygons": self.container.annotations()}

    def tile_keys(self) -> Iterator[tuple[int, int, int, int]]:
        """Every (image, level, row, col) of the container."""
        for im in self.container.images:
            for level in range(len(im.levels)):
                rows, cols = tile_grid(im, level)
                for row in range(rows):
                    for col in range(cols):
                        yield im.index, level, row, col
