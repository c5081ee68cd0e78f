"""napari reader for `smoothsal heatmaps` containers: the tissue and every heatmap as layers, in µm.

`napari --plugin smoothsal SLIDE.ome.zarr` finds this reader through the npe2 manifest (``napari.yaml``,
entry point ``napari.manifest`` in pyproject.toml); `smoothsal view --napari` calls `open_napari`. Both
use `layer_data`, so they show the same thing:

- ``tissue``: the RGB pyramid, opaque, at the bottom;
- one layer per heatmap, named ``method/attribution/layer``, the first one visible. Every level keeps its
  NGFF scale and translation (µm, pixel centres), so a 1/16-resolution layer-3 map covers the tissue at
  its physical size.
- colour map ``smoothsal-diverging``: matplotlib's RdBu_r with opacity |2t − 1|, i.e. zero transparent,
  full blue at −L and full red at +L, blended over the tissue. Attributions are signed (evidence for
  and against the target), so the limits are symmetric, ±L with L the 99th percentile of |value| over
  the heatmap's defined pixels (its coarsest level, as the browser viewer does): a few extreme pixels
  do not wash out the rest, and 0 always sits at the transparent centre. NaN (no tile) is transparent.

The reader claims a path only when it is a Zarr group whose root attributes hold smoothsal's container
metadata (`container.Container` opens it); for anything else (another OME-Zarr, one image inside a
container) it returns None and leaves the path to other readers. napari's own builtin reader also declares
``*.zarr`` directories (and napari-ome-zarr does too, when installed), so a plain `napari SLIDE.ome.zarr`
asks which plugin to use: choose smoothsal, or pass ``--plugin smoothsal``. Checked with napari 0.9.2 and
napari-ome-zarr 0.10.0: on the root of a container of format 2 (a multi-image OME-Zarr, `ome_series`)
napari-ome-zarr opens the tissue (three channel layers) and every map, with the µm scale but without the
half-pixel translation and with a grey colour map; on a format-1 root it finds nothing ("No matching
spec"). napari's builtin reader fails on the root.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .container import Container, ImageInfo
from .errors import BadOption, SmoothsalError

__all__ = [
    "COLORMAP",
    "LIMIT_PERCENTILE",
    "add_layers",
    "colormap",
    "get_reader",
    "is_container",
    "layer_data",
    "open_napari",
    "read",
    "symmetric_limit",
]

COLORMAP = "smoothsal-diverging"
BASE_COLORMAP = "RdBu_r"  # matplotlib: blue (negative) → white → red (positive)
LIMIT_PERCENTILE = 99.0  # contrast limits ±(this percentile of |value|)
LayerData = tuple[Any, dict[str, Any], str]  # (a level, or the list of levels; kwargs; "image")
INSTALL = "install it with `pip install 'smoothsal[view]'`, or use the browser viewer (leave out --napari)"


def is_container(path: str | Path) -> bool:
    """Whether `path` is a smoothsal heatmap container (metadata only; no pixels are read)."""
    path = Path(path)
    if not path.is_dir() or not ((path / ".zattrs").is_file() or (path / "zarr.json").is_file()):
        return False
    try:
        Container(path)
    except (SmoothsalError, OSError):
        return False
    return True


def get_reader(path: str | Sequence[str]) -> Callable[[str | Sequence[str]], list[LayerData]] | None:
    """npe2 reader hook: `read` for one smoothsal container, None for anything else."""
    if not isinstance(path, str | Path):
        if len(path) != 1:
            return None
        path = path[0]
    return read if is_container(path) else None


def read(path: str | Sequence[str]) -> list[LayerData]:
    """npe2 reader: the layers of one container."""
    return layer_data(path if isinstance(path, str | Path) else path[0])


@functools.cache
def colormap() -> Any:
    """The diverging colour map with transparent zero (a napari Colormap)."""
    from matplotlib import colormaps
    from napari.utils.colormaps import Colormap

    t = np.linspace(0.0, 1.0, 256)
    rgba = colormaps[BASE_COLORMAP](t)
    rgba[:, 3] = np.abs(2.0 * t - 1.0)
    return Colormap(rgba, name=COLORMAP, display_name=COLORMAP)


def symmetric_limit(values: np.ndarray, percentile: float = LIMIT_PERCENTILE) -> float:
    """L for contrast limits ±L: the `percentile` of |value| over finite values (1.0 when none are)."""
    finite = np.abs(values[np.isfinite(values)].astype(np.float64))
    limit = float(np.percentile(finite, percentile)) if finite.size else 0.0
    if limit <= 0.0:
        limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    return limit


def _levels(c: Container, im: ImageInfo) -> Any:
    """Lazy dask arrays in (y, x[, c]) order, other axes at index 0: the list of levels, or the one level."""
    import dask.array as da

    kept = [a for a in im.axes if a in ("y", "x", "c")]
    order = [kept.index(a) for a in ("y", "x", "c") if a in kept]
    index = tuple(slice(None) if a in ("y", "x", "c") else 0 for a in im.axes)
    levels = [da.from_zarr(c.array(im.index, k))[index].transpose(order) for k in range(len(im.levels))]
    return levels if len(levels) > 1 else levels[0]


def layer_data(path: str | Path | Container, percentile: float = LIMIT_PERCENTILE) -> list[LayerData]:
    """napari LayerData tuples: the tissue (RGB) and every heatmap, in µm, first heatmap visible."""
    c = path if isinstance(path, Container) else Container(path)
    layers: list[LayerData] = []
    shown = False
    for im in c.images:
        common = {
            "scale": im.levels[0].scale,
            "translate": im.levels[0].translation,  # NGFF and napari both place pixel centres
            "multiscale": len(im.levels) > 1,
            "units": ("micrometer", "micrometer"),
            "axis_labels": ("y", "x"),
            "metadata": {"smoothsal": {"container": str(c.path), "image": im.path, "kind": im.kind}},
        }
        if im.kind == "tissue":
            layers.append((_levels(c, im), common | {"name": "tissue", "rgb": True}, "image"))
            continue
        last = len(im.levels) - 1
        h, w = im.levels[last].shape
        limit = symmetric_limit(c.region(im.index, last, slice(0, h), slice(0, w)), percentile)
        kwargs = common | {
            "name": f"{im.method}/{im.attribution}/{im.layer}",
            "colormap": colormap(),
            "contrast_limits": (-limit, limit),
            "blending": "translucent",
            "opacity": 1.0,
            "visible": not shown,
        }
        kwargs["metadata"]["smoothsal"] |= {
            "method": im.method,
            "attribution": im.attribution,
            "layer": im.layer,
        }
        layers.append((_levels(c, im), kwargs, "image"))
        shown = True
    return layers


def add_layers(viewer: Any, path: str | Path) -> list[Any]:
    """Add the container's layers to an open napari viewer; returns them."""
    return [getattr(viewer, f"add_{kind}")(data, **kwargs) for data, kwargs, kind in layer_data(path)]


def open_napari(path: str | Path, run: bool = True) -> Any:
    """A napari viewer showing the container, scale bar in µm; runs the event loop unless `run` is false."""
    try:
        import napari
    except ImportError:
        raise BadOption(f"napari is not installed; {INSTALL}") from None
    c = Container(path)  # a bad container fails here, before a window opens
    viewer = napari.Viewer(title=f"smoothsal: {Path(path).name}")
    add_layers(viewer, c.path)
    viewer.scale_bar.visible = True
    viewer.scale_bar.unit = "um"
    if run:
        napari.run()
    return viewer
