"""The report's figures: TV per layer (the paper's Figure 4) and per slide an overview of every
method's heatmap at each layer over the tissue (Figures 5–7), read from the heatmap container."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..container import open_container
from ..errors import BadStore
from ..smoothing import METHODS, method_info
from .tables import label_of, method_label, ordered

if TYPE_CHECKING:
    from . import ReportSettings

__all__ = ["Overview", "Raster", "overview_figure", "read_overview", "tv_per_layer_figure"]


def tv_per_layer_figure(
    tv: pd.DataFrame, layers: Sequence[str], attributions: Sequence[str], title: str
) -> Figure:
    """The paper's Figure 4: mean TV (± std band) per layer in forward order, one line per method."""
    attributions = [a for a in attributions if (tv["attribution"] == a).any()]
    fig = Figure(figsize=(1.0 + 4.0 * len(attributions), 3.6), layout="constrained")
    axes = fig.subplots(1, len(attributions), squeeze=False)[0]
    x = np.arange(len(layers))
    for ax, attribution in zip(axes, attributions, strict=True):
        for method in ordered(tv["method"], METHODS):
            sel = tv[(tv["attribution"] == attribution) & (tv["method"] == method)]
            if sel.empty:
                continue
            g = sel.set_index("layer").reindex(layers)
            colour = method_info(method).colour if method in METHODS else None
            ax.plot(x, g["mean"], marker="o", ms=3.5, color=colour, label=method_label(method))
            ax.fill_between(x, g["mean"] - g["std"], g["mean"] + g["std"], color=colour, alpha=0.15, lw=0)
        ax.set_xticks(
            x, layers, rotation=45 if len(layers) > 4 else 0, ha="right" if len(layers) > 4 else "center"
        )
        ax.set_title(label_of(attribution), fontsize=10)
        ax.set_xlabel("layer (forward order)")
        ax.set_ylabel("total variation")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


@dataclass(frozen=True)
class Raster:
    """One pyramid level read from an OME-Zarr image: pixels (y, x[, c]) and their extent in µm."""

    data: np.ndarray
    extent: tuple[float, float, float, float]  # left, right, bottom, top (imshow, origin upper)


@dataclass(frozen=True)
class Overview:
    """What an overview figure shows of one container: tissue and every heatmap, at a low level."""

    path: Path
    slide_id: str
    tissue: Raster
    heatmaps: dict[tuple[str, str, str], Raster] = field(default_factory=dict)  # (method, attribution, layer)


def read_overview(container: str | Path, min_px: int = 384) -> Overview:
    """Tissue and every heatmap of a container, each at its smallest pyramid level with a side of at
    least ``min_px`` (else level 0), with its extent in µm."""
    c = open_container(container)

    def raster(index: int) -> Raster:
        level = c.level_at_least(index, min_px)
        info = c.images[index]
        h, w = info.levels[level].shape
        return Raster(c.region(index, level, slice(0, h), slice(0, w)), info.extent(level))

    tissue = [i for i in c.images if i.kind == "tissue"]
    if not tissue:
        raise BadStore(
            f"{c.path}: lists no tissue image; give the .ome.zarr that `smoothsal heatmaps` writes"
        )
    heatmaps = {(i.method, i.attribution, i.layer): raster(i.index) for i in c.images if i.kind == "heatmap"}
    slide_id = str(c.meta.get("slide_id") or c.path.name.removesuffix(".ome.zarr"))
    return Overview(c.path, slide_id, raster(tissue[0].index), heatmaps)


def overview_figure(
    overview: Overview,
    settings: ReportSettings,
    *,
    layers: Sequence[str] = (),
    attributions: Sequence[str] = (),
    tv: dict[tuple[str, str, str], float] | None = None,
    title: str = "",
) -> Figure:
    """Tissue thumbnail, then each method's heatmap at each layer over the tissue (paper Figures 5–7).

    One row per attribution × layer, one column per method; one symmetric colour scale per row (the
    ``settings.percentile`` of |value| over the row's methods); NaN and 0 (no tile) stay transparent.
    """
    keys = overview.heatmaps
    methods = ordered((m for m, _, _ in keys), METHODS)
    attributions = ordered((a for _, a, _ in keys), list(attributions))
    layers = ordered((layer for _, _, layer in keys), list(layers))
    rows = [
        (a, layer) for a in attributions for layer in layers if any((m, a, layer) in keys for m in methods)
    ]
    left, right, bottom, top = overview.tissue.extent
    aspect = min(3.0, max(0.3, abs(bottom - top) / max(abs(right - left), 1e-9)))
    ncols = 1 + max(1, len(methods))
    fig = Figure(figsize=(0.6 + 2.3 * ncols, 0.8 + 2.3 * aspect * max(1, len(rows))), layout="constrained")
    axes = fig.subplots(max(1, len(rows)), ncols, squeeze=False)
    tissue = overview.tissue.data
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].imshow(tissue, extent=overview.tissue.extent, interpolation="antialiased")
    axes[0, 0].set_title("tissue", fontsize=9)
    for r in range(1, axes.shape[0]):
        axes[r, 0].set_axis_off()
    if not rows:
        axes[0, 1].set_axis_off()
        axes[0, 1].text(0.5, 0.5, "no heatmaps in the container", ha="center", va="center", fontsize=9)
    for r, (attribution, layer) in enumerate(rows):
        maps = {
            m: _masked(keys[m, attribution, layer].data) for m in methods if (m, attribution, layer) in keys
        }
        values = np.concatenate([np.abs(z.compressed()) for z in maps.values()]) if maps else np.zeros(0)
        limit = float(np.percentile(values, settings.percentile)) if values.size else 1.0
        limit = limit if limit > 0 else 1.0
        image = None
        for c, method in enumerate(methods, start=1):
            ax = axes[r, c]
            if r == 0:
                ax.set_title(method_label(method), fontsize=9)
            if c == 1:
                ax.set_ylabel(f"{label_of(attribution)}\n{layer}", fontsize=9)
            ax.imshow(tissue, extent=overview.tissue.extent, interpolation="antialiased")
            if method not in maps:
                ax.text(0.5, 0.5, "missing", transform=ax.transAxes, ha="center", va="center", fontsize=8)
                continue
            image = ax.imshow(
                maps[method], extent=keys[method, attribution, layer].extent, cmap="coolwarm",
                vmin=-limit, vmax=limit, alpha=settings.alpha, interpolation="nearest",
            )  # fmt: skip
            ax.set_xlim(left, right)
            ax.set_ylim(bottom, top)
            value = (tv or {}).get((method, attribution, layer))
            if value is not None and np.isfinite(value):
                ax.text(0.02, 0.02, f"TV {value:.2f}", transform=ax.transAxes, fontsize=7,
                        bbox={"facecolor": "white", "alpha": 0.7, "lw": 0, "pad": 1})  # fmt: skip
        if image is not None:
            fig.colorbar(image, ax=list(axes[r, 1:]), shrink=0.85, pad=0.01)
    fig.suptitle(title or overview.slide_id, fontsize=10)
    return fig


def _masked(z: np.ndarray) -> np.ma.MaskedArray:
    z = np.asarray(z, dtype=np.float32)
    return np.ma.masked_where(~np.isfinite(z) | (z == 0), z)
