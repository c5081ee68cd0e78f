"""The heatmap container (`smoothsal heatmaps` output), one per slide, written and read only here:
the writer's primitives and the one reader, used by heatmaps, report, viewer and napari.

Layout (OME-Zarr, NGFF 0.4 on Zarr v2 by default, 0.5 on Zarr v3):

- ``tissue/``: the slide as an RGB uint8 pyramid (c, y, x);
- ``heatmaps/{method}/{attribution}/{layer}/``: float32 pyramids (y, x) of the stitched maps, NaN where
  no tile lies, empty chunks not written;
- ``tiles``: the tile grid, [n, 4] level-0 (x, y, w, h) px;
- ``OME/``: the image list of a multi-image OME-Zarr (NGFF "bioformats2raw.layout": the root attribute
  ``bioformats2raw.layout: 3``, ``OME/series`` naming the image groups above, tissue first, and
  ``OME/METADATA.ome.xml``; `ome_series`), so that napari-ome-zarr and Bio-Formats find every image.

Format 2 added ``OME/`` and the layout attribute; format 1 containers (without them) are still read
(by the viewer, the napari plugin, the report and ``smoothsal export``) and replaced by `smoothsal heatmaps`.

Every image carries NGFF ``coordinateTransformations`` in µm (scale, plus the half-pixel translation
of pixel centres), so maps of any layer overlay the tissue at their physical size. The root attribute
``smoothsal`` holds version, slide_id, slide_path, slide_mpp, slide_size_px, settings, ``images`` (path,
kind, method, attribution, layer, pixel_size_um of each) and optional ``annotations`` (level-0 polygons).
"""

from __future__ import annotations

import math
import os
import re
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .annotations import Annotations
from .errors import BadOption, BadStore, MissingInput, one_line
from .files import MARKER_KEY, ZARR_FILES, OutputKind, check_replaceable
from .ome_series import XML_KEY, write_series

__all__ = [
    "KIND",
    "Container",
    "ImageInfo",
    "Level",
    "annotation_list",
    "check_existing",
    "create_array",
    "create_root",
    "ngff_axes",
    "ngff_datasets",
    "ngff_format",
    "open_container",
    "reduce2",
    "write_marker",
    "write_multiscales",
    "write_pyramid",
    "write_series",
]

FIX = "give the .ome.zarr that `smoothsal heatmaps` writes"
REWRITE = "rewrite the container with `smoothsal heatmaps`"
QUANTILE_STEPS = 201  # quantiles at 0, 0.5, …, 100 %
_UNITS_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6}


# --- writing --------------------------------------------------------------------------------------


def ngff_format(ngff: str) -> Any:
    from ome_zarr.format import FormatV04, FormatV05

    return FormatV04() if ngff == "0.4" else FormatV05()


def create_root(path: Path, ngff: str) -> zarr.Group:
    """A new, empty container root at ``path`` for NGFF ``ngff`` (Zarr v2 for 0.4, v3 for 0.5)."""
    return zarr.open_group(path, mode="w", zarr_format=ngff_format(ngff).zarr_format)


def create_array(
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
    chunks = tuple(max(1, min(c, s)) for c, s in zip(chunks, shape))
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, **kwargs)


def reduce2(block: np.ndarray, kind: str) -> np.ndarray:
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


def write_pyramid(
    group: zarr.Group, level0: zarr.Array, written: set[tuple[int, int]], chunk: int, smallest: int,
    kind: str, dims: Sequence[str],
) -> list[tuple[int, ...]]:  # fmt: skip
    """Write levels 1, 2, … (each ×2 smaller, built chunk by chunk from the level below) until the longer
    side is below `smallest`; only chunks with data below are computed. Returns every level's shape."""
    c = chunk
    shapes = [tuple(level0.shape)]
    below, index = level0, 0
    while max(shapes[-1][-2:]) >= smallest and max(shapes[-1][-2:]) > 1:
        index += 1
        lead, (h, w) = shapes[-1][:-2], shapes[-1][-2:]
        shape = (*lead, math.ceil(h / 2), math.ceil(w / 2))
        arr = create_array(group, str(index), shape, (*lead, c, c), below.dtype, below.fill_value, dims)
        todo = sorted({(r // 2, q // 2) for r, q in written})
        for r, q in todo:
            src = below[..., 2 * r * c : 2 * (r + 1) * c, 2 * q * c : 2 * (q + 1) * c]
            arr[..., r * c : (r + 1) * c, q * c : (q + 1) * c] = reduce2(np.asarray(src), kind)
        shapes.append(shape)
        below, written = arr, set(todo)
    return shapes


def ngff_datasets(shapes: Sequence[tuple[int, ...]], pixel_um: float, lead: int) -> list[dict[str, Any]]:
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


def ngff_axes(channels: bool) -> list[dict[str, str]]:
    space = [{"name": a, "type": "space", "unit": "micrometer"} for a in ("y", "x")]
    return ([{"name": "c", "type": "channel"}] if channels else []) + space


def write_multiscales(
    group: zarr.Group, shapes: Sequence[tuple[int, ...]], pixel_um: float, ngff: str, name: str, lead: int,
    omero: dict[str, Any],
) -> None:  # fmt: skip
    """NGFF multiscales metadata (µm scales and pixel-centre translations per level) of one image."""
    from ome_zarr.writer import write_multiscales_metadata

    write_multiscales_metadata(
        group,
        ngff_datasets(shapes, pixel_um, lead),
        fmt=ngff_format(ngff),
        axes=ngff_axes(channels=lead == 1),
        name=name,
        metadata={"omero": omero, "method": "smoothsal: tiles stitched, then 2×2 mean per level"},
    )


# the output marker; format 1 (before OME/) is still read and replaced
KIND = OutputKind("heatmap-container", "smoothsal heatmaps", format=2, replaces=(1,), zarr=True,
                  files=f"{ZARR_FILES}|{re.escape(XML_KEY)}")  # fmt: skip


def check_existing(path: Path) -> None:
    """An existing ``--out`` is replaced only if `smoothsal heatmaps` wrote it (`files.check_replaceable`)."""
    check_replaceable(path, KIND)


def write_marker(root: zarr.Group, path: Path) -> None:
    """Mark the finished container at ``path`` (``root``) as this command's output, recording what it
    holds: the last write (`files.OutputKind.record`)."""
    root.attrs[MARKER_KEY] = KIND.record(path)


def annotation_list(annotations: Annotations) -> list[dict[str, Any]]:
    """Annotation polygons as the container's root attributes store them (level-0 px)."""
    return [
        {
            "class": int(r.label),
            "name": r.name,
            "vertices": np.round(r.exterior, 2).tolist(),
            **({"holes": [np.round(h, 2).tolist() for h in r.holes]} if r.holes else {}),
        }
        for r in annotations.regions
    ]


# --- reading --------------------------------------------------------------------------------------


def _confined_store(root: Path) -> Any:
    """A read-only zarr LocalStore that refuses any key whose real path leaves ``root`` (symlinks out)."""
    from zarr.storage import LocalStore

    class ConfinedStore(LocalStore):
        def _check(self, key: str) -> None:
            real = os.path.realpath(self.root / key)
            if real != self.real_root and not real.startswith(self.real_root + os.sep):
                raise PermissionError(f"{key} leaves the store {self.root}; refusing to read it")

        async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
            self._check(key)
            return await super().get(key, prototype, byte_range)

        async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
            key_ranges = list(key_ranges)
            for key, _ in key_ranges:
                self._check(key)
            return await super().get_partial_values(prototype, key_ranges)

    store = ConfinedStore(root, read_only=True)
    store.real_root = os.path.realpath(root)
    return store


@dataclass(frozen=True)
class Level:
    """One pyramid level: its array path in the store, (y, x) shape, µm per pixel and NGFF translation.

    NGFF places pixel (i, j) at its centre: (i, j) · scale + translation; its top-left corner, where the
    page draws it, is ``origin`` = translation − scale / 2.
    """

    path: str
    shape: tuple[int, int]
    scale: tuple[float, float]
    translation: tuple[float, float]

    @property
    def origin(self) -> tuple[float, float]:
        return (self.translation[0] - self.scale[0] / 2, self.translation[1] - self.scale[1] / 2)


@dataclass(frozen=True)
class ImageInfo:
    """One multiscale image of the container (the tissue or one heatmap)."""

    index: int
    kind: str  # "tissue" | "heatmap"
    path: str
    axes: tuple[str, ...]
    levels: tuple[Level, ...]
    dtype: str
    fill_value: float | None
    method: str | None = None
    attribution: str | None = None
    layer: str | None = None

    @property
    def name(self) -> str:
        return self.path if self.kind == "tissue" else f"{self.method} / {self.attribution} / {self.layer}"

    def extent(self, level: int) -> tuple[float, float, float, float]:
        """(left, right, bottom, top) in µm of a level's pixel edges (matplotlib's imshow extent)."""
        lv = self.levels[level]
        (oy, ox), (sy, sx), (h, w) = lv.origin, lv.scale, lv.shape
        return ox, ox + w * sx, oy + h * sy, oy


def _transforms(items: Sequence[dict[str, Any]] | None, ndim: int) -> tuple[list[float], list[float]]:
    scale, shift = [1.0] * ndim, [0.0] * ndim
    for t in items or ():
        if t.get("type") == "scale":
            scale = [float(v) for v in t["scale"]]
        elif t.get("type") == "translation":
            shift = [float(v) for v in t["translation"]]
    return scale, shift


def _level_array(root: Path, group: zarr.Group, image: str, level: str) -> zarr.Array:
    try:
        return group[level]
    except KeyError:
        raise BadStore(
            f"{root}: image {image!r} lists level {level!r}, which is missing; {REWRITE}"
        ) from None


class Container:
    """A heatmap container opened read-only: its root metadata, its images and their levels (µm).

    Reads go through a store that refuses any key whose real path leaves the container (a symlink out
    of it), so a viewer serving it never exposes other files. Arrays are opened once and shared
    between threads.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise MissingInput(f"{self.path}: heatmap container not found (not a directory); {FIX}")
        try:
            self.root = zarr.open_group(store=_confined_store(self.path), mode="r")
        except (FileNotFoundError, ValueError, KeyError, zarr.errors.BaseZarrError) as err:
            raise BadStore(f"{self.path}: not a readable Zarr group ({one_line(err)}); {FIX}") from None
        meta = dict(self.root.attrs).get("smoothsal")
        empty = isinstance(meta, dict) and meta.get("n_tiles") == 0 and meta.get("images") == []
        if not isinstance(meta, dict) or not (meta.get("images") or empty):
            raise BadStore(f"{self.path}: no 'smoothsal' root attributes listing images; {FIX}")
        self.meta: dict[str, Any] = meta
        try:
            self.images = tuple(self._image(i, entry) for i, entry in enumerate(meta["images"]))
        except PermissionError as err:  # an image's files linked from outside the container
            raise BadStore(f"{self.path}: {err}; copy the linked files into the container") from None
        self._arrays: dict[tuple[int, int], Any] = {}
        self._lock = threading.Lock()

    # -- metadata ---------------------------------------------------------------------------------

    def _image(self, index: int, entry: dict[str, Any]) -> ImageInfo:
        path = str(entry.get("path", ""))
        if not path or path.startswith("/") or ".." in path.split("/"):
            raise BadStore(f"{self.path}: image path {path!r} is not inside the store; {REWRITE}")
        try:
            group = self.root[path]
        except KeyError:
            raise BadStore(f"{self.path}: image {path!r} listed but missing; {REWRITE}") from None
        attrs = dict(group.attrs)
        ms = (attrs.get("ome", attrs)).get("multiscales")
        if not ms:
            raise BadStore(f"{self.path}/{path} has no NGFF multiscales metadata; {REWRITE}")
        ms = ms[0]
        axes = tuple(a["name"] if isinstance(a, dict) else str(a) for a in ms["axes"])
        units = [a.get("unit", "micrometer") if isinstance(a, dict) else "micrometer" for a in ms["axes"]]
        if "y" not in axes or "x" not in axes:
            raise BadStore(f"{self.path}/{path}: axes {axes} lack y and x; {REWRITE}")
        iy, ix = axes.index("y"), axes.index("x")
        factor = [_UNITS_UM.get(u or "micrometer", 1.0) for u in units]
        outer_scale, outer_shift = _transforms(ms.get("coordinateTransformations"), len(axes))
        levels = []
        for ds in ms["datasets"]:
            array = _level_array(self.path, group, path, ds["path"])
            scale, shift = _transforms(ds.get("coordinateTransformations"), len(axes))
            sc = [s * o for s, o in zip(scale, outer_scale, strict=True)]
            tr = [t * o + u for t, o, u in zip(shift, outer_scale, outer_shift, strict=True)]
            levels.append(
                Level(
                    path=f"{path}/{ds['path']}",
                    shape=(int(array.shape[iy]), int(array.shape[ix])),
                    scale=(sc[iy] * factor[iy], sc[ix] * factor[ix]),
                    translation=(tr[iy] * factor[iy], tr[ix] * factor[ix]),
                )
            )
        first = _level_array(self.path, group, path, ms["datasets"][0]["path"])
        fill = first.fill_value
        return ImageInfo(
            index=index,
            kind=str(entry.get("kind", "heatmap")),
            path=path,
            axes=axes,
            levels=tuple(levels),
            dtype=str(first.dtype),
            fill_value=None if fill is None else float(fill),
            method=entry.get("method"),
            attribution=entry.get("attribution"),
            layer=entry.get("layer"),
        )

    def array(self, image: int, level: int) -> Any:
        key = (image, level)
        with self._lock:
            if key not in self._arrays:
                self._arrays[key] = self.root[self.images[image].levels[level].path]
            return self._arrays[key]

    # -- pixel reads --------------------------------------------------------------------------------

    def region(self, image: int, level: int, ys: slice, xs: slice) -> np.ndarray:
        """Pixels of one region: (h, w) for a heatmap, (h, w, c) for the tissue; other axes at index 0."""
        info = self.images[image]
        index = tuple(
            ys if a == "y" else xs if a == "x" else slice(None) if a == "c" else 0 for a in info.axes
        )
        try:
            data = np.asarray(self.array(image, level)[index])
        except PermissionError:  # a chunk linked from outside the container: the caller refuses it
            raise
        except (RuntimeError, ValueError, OSError, zarr.errors.BaseZarrError) as err:  # e.g. blosc errors
            raise BadStore(
                f"{self.path}: {info.path} level {level} cannot be read ({one_line(err)}); {REWRITE}"
            ) from None
        kept = [a for a in info.axes if a in ("y", "x", "c")]
        order = [kept.index(a) for a in ("y", "x", "c") if a in kept]
        return data.transpose(order)

    # -- what viewers need -------------------------------------------------------------------------

    def image(self, path: str) -> ImageInfo:
        """The image at ``path`` (e.g. ``tissue``, ``heatmaps/original/gradient/layer2``)."""
        for info in self.images:
            if info.path == path:
                return info
        raise BadOption(
            f"{self.path}: no image {path!r}; choose one of {', '.join(i.path for i in self.images)}"
        )

    def level_at_least(self, image: int, min_px: int) -> int:
        """The smallest pyramid level whose longer side is at least ``min_px`` (else level 0)."""
        sides = [max(lv.shape) for lv in self.images[image].levels]
        return max((k for k, side in enumerate(sides) if side >= min_px), default=0)

    def tile_boxes(self) -> np.ndarray:
        """The tile grid, [n, 4] level-0 (x, y, w, h) px (empty when the container has none)."""
        if "tiles" not in self.root:
            return np.zeros((0, 4), np.int64)
        return np.asarray(self.root["tiles"][...], dtype=np.int64).reshape(-1, 4)

    def quantiles(self, image: int) -> list[float] | None:
        """Quantiles 0…100 % (step 0.5) of a heatmap's defined values, from its coarsest level only."""
        info = self.images[image]
        last = len(info.levels) - 1
        h, w = info.levels[last].shape
        values = self.region(image, last, slice(0, h), slice(0, w)).astype(np.float64).ravel()
        values = values[np.isfinite(values)]
        if info.fill_value is not None and math.isfinite(info.fill_value):
            values = values[values != info.fill_value]
        if values.size == 0:
            return None
        return [float(q) for q in np.percentile(values, np.linspace(0, 100, QUANTILE_STEPS))]

    def version(self) -> str:
        """Changes when the container is rewritten: tile URLs carry it, so browsers may cache tiles."""
        marks = [p for p in (self.path / ".zattrs", self.path / "zarr.json") if p.is_file()]
        stamp = max((p.stat().st_mtime_ns for p in marks), default=self.path.stat().st_mtime_ns)
        return format(stamp, "x")

    def annotations(self) -> list[dict[str, Any]]:
        """Annotation polygons (level-0 px) stored with the maps."""
        return list(self.meta.get("annotations") or [])


def open_container(path: str | Path) -> Container:
    """Open a container for reading (any NGFF version); one-line errors naming it when it is not one."""
    return Container(path)
