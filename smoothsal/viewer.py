"""`smoothsal view`: look at a heatmap container (tissue pyramid + saliency pyramids) in a browser.

A small local web server reads only the tiles of the visible region at the pyramid level that fits the
screen (never a whole level), so a Camelyon16-size slide opens at once. The page (``viewer_static/``,
hand-written, no third-party code, nothing loaded from the internet) pans and zooms two synchronised
panels in µm and colours the raw float32 heatmap tiles itself, so colour map, opacity and range changes
need no refetch. ``export`` writes the same page with a manifest and pre-cut tiles for a plain static
web server; ``open_napari`` opens the container in napari when it is installed.

URL scheme (the same for the server and the static export, relative to the page):
``manifest.json``, ``grid.json`` (tile grid), ``annotations.json``,
``tiles/{image}/{level}/{row}/{col}.jpg`` (tissue, RGB JPEG) and ``.f32`` (heatmap, little-endian
float32, row-major, the tile's own height × width; an empty tile is absent: 204 from the server, 404
from a static server). The page appends ``?v={manifest version}`` to tile URLs (ignored by servers),
so a browser never shows cached tiles of an earlier container.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import shutil
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from .files import atomic_dir

__all__ = [
    "COLORMAPS",
    "HOST",
    "TILE_SIZE",
    "Container",
    "ImageInfo",
    "Level",
    "export",
    "make_server",
    "napari_layers",
    "open_napari",
    "serve",
]

HOST = "127.0.0.1"  # the only address the server binds: nothing outside this machine can reach it
TILE_SIZE = 256  # px per served tile side, at every level
COLORMAPS = ("inferno", "viridis", "magma", "turbo", "gray", "coolwarm", "RdBu_r")
QUANTILE_STEPS = 201  # manifest quantiles at 0, 0.5, …, 100 %
STATIC_DIR = Path(__file__).with_name("viewer_static")
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "viewer.js": "text/javascript; charset=utf-8",
    "viewer.css": "text/css; charset=utf-8",
}
_UNITS_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6}
_TILE_URL = re.compile(r"/tiles/(\d{1,4})/(\d{1,3})/(\d{1,7})/(\d{1,7})\.(jpg|f32)")
_JPEG_QUALITY = 90


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

    def grid(self, level: int) -> tuple[int, int]:
        """(rows, cols) of served tiles at ``level``."""
        h, w = self.levels[level].shape
        return math.ceil(h / TILE_SIZE), math.ceil(w / TILE_SIZE)


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


class Container:
    """A `smoothsal heatmaps` container, opened read-only; reads tiles on demand (cached)."""

    def __init__(self, path: str | Path, cache_tiles: int = 256) -> None:
        import zarr

        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"{self.path} is not a directory; give a .ome.zarr made by `smoothsal heatmaps`"
            )
        try:
            self.root = zarr.open_group(store=_confined_store(self.path), mode="r")
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise ValueError(
                f"{self.path} is not a zarr group ({err}); give a .ome.zarr made by `smoothsal heatmaps`"
            ) from None
        meta = dict(self.root.attrs).get("smoothsal")
        if not isinstance(meta, dict) or not meta.get("images"):
            raise ValueError(
                f"{self.path} has no 'smoothsal' images in its attributes; make it with `smoothsal heatmaps`"
            )
        self.meta = meta
        self.images = tuple(self._image(i, entry) for i, entry in enumerate(meta["images"]))
        self._arrays: dict[tuple[int, int], Any] = {}
        self._lock = threading.Lock()
        self.tile_bytes = functools.lru_cache(maxsize=cache_tiles)(self._tile_bytes)

    # -- metadata ---------------------------------------------------------------------------------

    def _image(self, index: int, entry: dict[str, Any]) -> ImageInfo:
        path = str(entry.get("path", ""))
        if not path or path.startswith("/") or ".." in path.split("/"):
            raise ValueError(
                f"{self.path}: image path {path!r} is not inside the store; rewrite the container"
            )
        try:
            group = self.root[path]
        except KeyError:
            raise ValueError(
                f"{self.path}: image {path!r} listed but missing; rewrite the container"
            ) from None
        attrs = dict(group.attrs)
        ms = (attrs.get("ome", attrs)).get("multiscales")
        if not ms:
            raise ValueError(f"{self.path}/{path} has no NGFF multiscales metadata; rewrite the container")
        ms = ms[0]
        axes = tuple(a["name"] if isinstance(a, dict) else str(a) for a in ms["axes"])
        units = [a.get("unit", "micrometer") if isinstance(a, dict) else "micrometer" for a in ms["axes"]]
        if "y" not in axes or "x" not in axes:
            raise ValueError(f"{self.path}/{path}: axes {axes} lack y and x; rewrite the container")
        iy, ix = axes.index("y"), axes.index("x")
        factor = [_UNITS_UM.get(u or "micrometer", 1.0) for u in units]
        outer_scale, outer_shift = _transforms(ms.get("coordinateTransformations"), len(axes))
        levels = []
        for ds in ms["datasets"]:
            array = group[ds["path"]]
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
        first = group[ms["datasets"][0]["path"]]
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
        data = np.asarray(self.array(image, level)[index])
        kept = [a for a in info.axes if a in ("y", "x", "c")]
        order = [kept.index(a) for a in ("y", "x", "c") if a in kept]
        return data.transpose(order)

    def tile(self, image: int, level: int, row: int, col: int) -> np.ndarray:
        info = self.images[image]
        rows, cols = info.grid(level)
        if not (0 <= row < rows and 0 <= col < cols):
            raise IndexError(f"tile {row},{col} outside level {level} ({rows}x{cols} tiles)")
        return self.region(
            image,
            level,
            slice(row * TILE_SIZE, (row + 1) * TILE_SIZE),
            slice(col * TILE_SIZE, (col + 1) * TILE_SIZE),
        )

    def _tile_bytes(self, image: int, level: int, row: int, col: int) -> bytes | None:
        """The encoded tile (JPEG for the tissue, float32 LE for a heatmap); None when it holds no data."""
        info = self.images[image]
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

    # -- what the page loads ------------------------------------------------------------------------

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

    def manifest(self) -> dict[str, Any]:
        """Everything the page needs before loading tiles: images, levels, µm scales, quantiles, colour maps."""
        mpp = self.meta.get("slide_mpp")
        size_px = self.meta.get("slide_size_px")
        if mpp and size_px:
            extent = [float(size_px[0]) * float(mpp), float(size_px[1]) * float(mpp)]
        else:  # no slide size recorded: the first image's extent
            lv = self.images[0].levels[0]
            extent = [lv.origin[1] + lv.shape[1] * lv.scale[1], lv.origin[0] + lv.shape[0] * lv.scale[0]]
        images = []
        for im in self.images:
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
                    entry["quantiles"] = self.quantiles(im.index)
                except PermissionError as err:  # a chunk linked from outside the store: never read
                    entry["quantiles"], entry["error"] = None, str(err)
                entry["zero_is_empty"] = im.fill_value == 0.0
            images.append(entry)
        return {
            "format": "smoothsal-viewer/1",
            "version": self.version(),
            "title": str(self.meta.get("slide_id") or self.path.name),
            "slide": {"id": self.meta.get("slide_id"), "mpp": mpp, "size_px": size_px, "extent_um": extent},
            "tile_size": TILE_SIZE,
            "images": images,
            "colormaps": _colormaps(),
            "grid": "tiles" in self.root and mpp is not None,
            "annotations": bool(self.meta.get("annotations")) and mpp is not None,
        }

    def version(self) -> str:
        """Changes when the container is rewritten: tile URLs carry it, so browsers may cache tiles."""
        marks = [p for p in (self.path / ".zattrs", self.path / "zarr.json") if p.is_file()]
        stamp = max((p.stat().st_mtime_ns for p in marks), default=self.path.stat().st_mtime_ns)
        return format(stamp, "x")

    def grid(self) -> dict[str, Any]:
        """The tile grid as a flat list x, y, w, h, … in level-0 px, with the slide's µm/px."""
        if "tiles" not in self.root:
            return {"mpp": self.meta.get("slide_mpp"), "boxes": []}
        boxes = np.asarray(self.root["tiles"][...], dtype=np.int64).reshape(-1, 4)
        return {"mpp": self.meta.get("slide_mpp"), "boxes": boxes.ravel().tolist()}

    def annotations(self) -> dict[str, Any]:
        """Annotation polygons (level-0 px) with the slide's µm/px."""
        return {"mpp": self.meta.get("slide_mpp"), "polygons": list(self.meta.get("annotations") or [])}

    def tile_keys(self) -> Iterator[tuple[int, int, int, int]]:
        """Every (image, level, row, col) of the container."""
        for im in self.images:
            for level in range(len(im.levels)):
                rows, cols = im.grid(level)
                for row in range(rows):
                    for col in range(cols):
                        yield im.index, level, row, col


def _transforms(items: Sequence[dict[str, Any]] | None, ndim: int) -> tuple[list[float], list[float]]:
    scale, shift = [1.0] * ndim, [0.0] * ndim
    for t in items or ():
        if t.get("type") == "scale":
            scale = [float(v) for v in t["scale"]]
        elif t.get("type") == "translation":
            shift = [float(v) for v in t["translation"]]
    return scale, shift


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


# --- server -----------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """Routes a fixed set of names and integer tile addresses; no URL ever becomes a file path."""

    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def do_GET(self) -> None:
        self._respond(head=False)

    def _respond(self, head: bool) -> None:
        status, body, ctype = self._route()
        status = int(status)
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", ctype)
        if status != HTTPStatus.NO_CONTENT:  # a 204 carries no Content-Length (RFC 9110)
            self.send_header("Content-Length", str(len(body or b"")))
        tile = self.path.startswith("/tiles/") and "?v=" in self.path
        self.send_header("Cache-Control", "max-age=86400" if tile and status == 200 else "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _route(self) -> tuple[int, bytes | None, str]:
        text = "text/plain; charset=utf-8"
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if host not in (HOST, "localhost"):  # DNS rebinding: a foreign site's name resolving to us
            return HTTPStatus.FORBIDDEN, b"forbidden host\n", text
        raw = self.path
        path = unquote(urlsplit(raw).path)
        if (
            not raw.startswith("/")
            or raw.startswith("//")
            or path.startswith("//")
            or any(s in ("..", ".") for s in path.split("/"))
            or any(ch in path for ch in "\\\0")
            or ".." in unquote(raw)
        ):
            return HTTPStatus.FORBIDDEN, b"forbidden path\n", text
        container = self.server.container
        name = path.lstrip("/") or "index.html"
        if name in STATIC_FILES:
            return HTTPStatus.OK, (STATIC_DIR / name).read_bytes(), STATIC_FILES[name]
        if name == "manifest.json":
            return HTTPStatus.OK, self.server.manifest_bytes, "application/json"
        if name == "grid.json":
            return HTTPStatus.OK, _json(container.grid()), "application/json"
        if name == "annotations.json":
            return HTTPStatus.OK, _json(container.annotations()), "application/json"
        match = _TILE_URL.fullmatch(path)
        if not match:
            return HTTPStatus.NOT_FOUND, b"not found\n", text
        image, level, row, col = (int(g) for g in match.groups()[:4])
        if image >= len(container.images) or level >= len(container.images[image].levels):
            return HTTPStatus.NOT_FOUND, b"no such image or level\n", text
        info = container.images[image]
        if match.group(5) != ("jpg" if info.kind == "tissue" else "f32"):
            return HTTPStatus.NOT_FOUND, b"wrong tile format for this image\n", text
        try:
            body = container.tile_bytes(image, level, row, col)
        except IndexError:
            return HTTPStatus.NOT_FOUND, b"no such tile\n", text
        except PermissionError as err:
            return HTTPStatus.FORBIDDEN, f"{err}\n".encode(), text
        if body is None:
            return HTTPStatus.NO_CONTENT, None, text
        return HTTPStatus.OK, body, "image/jpeg" if info.kind == "tissue" else "application/octet-stream"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    container: Container
    manifest_bytes: bytes
    verbose: bool


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def make_server(container: str | Path | Container, port: int = 0, verbose: bool = False) -> _Server:
    """A server for ``container`` bound to 127.0.0.1:``port`` (0: any free port); call ``serve_forever``."""
    c = container if isinstance(container, Container) else Container(container)
    manifest = _json(c.manifest())
    try:
        server = _Server((HOST, port), _Handler)
    except OSError as err:
        raise OSError(
            f"cannot listen on {HOST}:{port} ({err.strerror}); pass another --port, or 0 for any"
        ) from None
    server.container, server.manifest_bytes, server.verbose = c, manifest, verbose
    return server


def serve(container: str | Path, port: int = 8765, open_browser: bool = False, verbose: bool = False) -> None:
    """Serve the viewer until interrupted (Ctrl-C)."""
    server = make_server(container, port, verbose)
    url = f"http://{HOST}:{server.server_address[1]}/"
    print(f"serving {container} at {url} (local only; Ctrl-C to stop)", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# --- static export ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    tiles: int  # tile files written (empty heatmap tiles are left out)
    bytes: int


def export(container: str | Path, out: str | Path, progress: bool = True) -> ExportSummary:
    """Write the page, manifest and every tile under ``out`` for a plain static web server.

    Written under a temporary sibling and renamed at the end; an earlier export at ``out`` is replaced,
    any other existing non-empty folder is refused.
    """
    from tqdm import tqdm

    c = Container(container)
    out = Path(out)
    with atomic_dir(out, _check_export) as tmp:
        tmp.mkdir()
        for name in STATIC_FILES:
            shutil.copyfile(STATIC_DIR / name, tmp / name)
        (tmp / "manifest.json").write_bytes(_json(c.manifest()))
        (tmp / "grid.json").write_bytes(_json(c.grid()))
        (tmp / "annotations.json").write_bytes(_json(c.annotations()))
        keys = list(c.tile_keys())
        written = size = 0
        for image, level, row, col in tqdm(
            keys, desc=f"export {c.path.name}", unit="tile", disable=not progress
        ):
            body = c.tile_bytes(image, level, row, col)
            if body is None:
                continue
            ext = "jpg" if c.images[image].kind == "tissue" else "f32"
            target = tmp / "tiles" / str(image) / str(level) / str(row) / f"{col}.{ext}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body)
            written, size = written + 1, size + len(body)
    return ExportSummary(out, written, size)


def _check_export(out: Path) -> None:
    if not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").is_file()):
        raise ValueError(
            f"{out} exists and is not an earlier export; remove it or give another --export folder"
        )


# --- napari -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NapariLayer:
    """What napari's ``add_image`` needs for one image: lazy pyramid levels in (y, x[, c]) order."""

    name: str
    data: tuple[Any, ...]
    scale: tuple[float, float]
    translate: tuple[float, float]
    rgb: bool
    contrast_limits: tuple[float, float] | None
    visible: bool


def napari_layers(container: str | Path | Container) -> list[NapariLayer]:
    """Layer descriptions for napari: the tissue (RGB) and every heatmap (first one visible), µm units."""
    import dask.array as da

    c = container if isinstance(container, Container) else Container(container)
    layers, shown = [], False
    for im in c.images:
        data = []
        for lv in range(len(im.levels)):
            arr = da.from_zarr(c.array(im.index, lv))
            index = tuple(slice(None) if a in ("y", "x", "c") else 0 for a in im.axes)
            kept = [a for a in im.axes if a in ("y", "x", "c")]
            data.append(arr[index].transpose([kept.index(a) for a in ("y", "x", "c") if a in kept]))
        limits = None
        if im.kind != "tissue":
            q = c.quantiles(im.index)
            limits = (q[2], q[-3]) if q and q[-3] > q[2] else None  # 1st and 99th percentiles
        layers.append(
            NapariLayer(
                name=im.name,
                data=tuple(data),
                scale=im.levels[0].scale,
                translate=im.levels[0].translation,  # napari, like NGFF, places pixel centres
                rgb=im.kind == "tissue",
                contrast_limits=limits,
                visible=im.kind == "tissue" or not shown,
            )
        )
        shown = shown or im.kind != "tissue"
    return layers


def open_napari(container: str | Path) -> None:
    """Open the container in napari (tissue + heatmaps as layers in µm); needs napari installed."""
    try:
        import napari
    except ImportError:
        raise ImportError(
            "napari is not installed; install it with `pip install 'napari[all]'`, or use the browser viewer "
            "(leave out --napari)"
        ) from None
    viewer = napari.Viewer(title=f"smoothsal: {Path(container).name}")
    for layer in napari_layers(container):
        viewer.add_image(
            list(layer.data),
            multiscale=len(layer.data) > 1,
            name=layer.name,
            scale=layer.scale,
            translate=layer.translate,
            rgb=layer.rgb,
            contrast_limits=layer.contrast_limits,
            colormap=None if layer.rgb else "inferno",
            opacity=1.0 if layer.rgb else 0.6,
            blending="translucent" if layer.rgb else "additive",
            visible=layer.visible,
        )
    viewer.scale_bar.visible = True
    viewer.scale_bar.unit = "um"
    napari.run()
