"""The heatmap container in napari: the tissue (RGB) and every heatmap as layers in µm (scale and
translation from the container, contrast limits from robust percentiles)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .container import Container
from .errors import BadOption

__all__ = ["NapariLayer", "napari_layers", "open_napari"]


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
        raise BadOption(
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
