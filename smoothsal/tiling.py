"""The `smoothsal tiles` stage: one slide → its tile table and an overview PNG.

Tissue mask on a low pyramid level (`tissue`), a tile grid at the target resolution (`grid`), labels from
the slide's annotations (`annotations`), the table written through `tiles`. Reads only low levels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .annotations import (
    DEFAULT_CLASS_MAP,
    Annotations,
    check_annotations_within,
    n_classes,
    read_annotations,
    tile_label_mask,
)
from .errors import BadOption
from .files import atomic_path, check_file_out
from .fingerprint import slide_fingerprint
from .grid import TileGridSettings, check_tile_fits, grid_positions, slide_region, tile_geometry
from .slides import Slide, open_slide
from .tiles import write_tile_table
from .tissue import Tissue, TissueMaskSettings, box_fractions, find_tissue

__all__ = [
    "LabelSettings",
    "Tiling",
    "TilingSettings",
    "label_tiles",
    "make_tiles",
    "plan_tiles",
    "plot_overview",
    "tile_slide",
]


def plan_tiles(slide: Slide, tissue: Tissue, grid: TileGridSettings = TileGridSettings()) -> pd.DataFrame:
    """The tile table (no labels yet): the grid, its tissue fractions, filtered and optionally sampled.

    A slide smaller than one tile gives an empty table.
    """
    geo = tile_geometry(slide, grid)
    xs, ys, cols, rows = grid_positions(slide_region(slide, grid.roi), geo.size0, geo.stride0, geo.align)
    fractions = box_fractions(tissue.mask, tissue.overview.downsample, xs, ys, geo.size0, geo.size0)
    keep = np.flatnonzero(fractions >= grid.min_tissue)
    if grid.max_tiles is not None and len(keep) > grid.max_tiles:
        keep = np.sort(np.random.default_rng(grid.seed).choice(keep, grid.max_tiles, replace=False))
    n = len(keep)
    return pd.DataFrame(
        {
            "slide_id": pd.Series([slide.slide_id] * n, dtype="string"),
            "slide_path": pd.Series([str(slide.path.resolve())] * n, dtype="string"),
            "col": cols[keep].astype(np.int32),
            "row": rows[keep].astype(np.int32),
            "x": xs[keep].astype(np.int64),
            "y": ys[keep].astype(np.int64),
            "w": np.full(n, geo.size0, np.int64),
            "h": np.full(n, geo.size0, np.int64),
            "level": np.full(n, geo.level, np.int32),
            "tile_size": np.full(n, geo.tile_size, np.int32),
            "mpp": np.full(n, geo.mpp, np.float64),
            "slide_mpp": np.full(n, slide.mpp, np.float64),
            "tissue_fraction": fractions[keep].astype(np.float64),
        }
    )


@dataclass(frozen=True)
class LabelSettings:
    """How tiles get labels from annotations."""

    threshold: float = 0.5  # classification label = 1 when the tumour (class 1) fraction is ≥ this
    n_classes: int = 1  # foreground classes: one `fraction_k` column per class 0..n_classes


def _near_regions(table: pd.DataFrame, annotations: Annotations) -> np.ndarray:
    """Per tile: does its box overlap any region's bounding box? (vectorised)"""
    if not annotations.regions or table.empty:
        return np.zeros(len(table), bool)
    boxes = np.array([[*r.exterior.min(0), *r.exterior.max(0)] for r in annotations.regions])
    x, y, w = (table[c].to_numpy(float)[:, None] for c in ("x", "y", "w"))
    return ((boxes[:, 0] < x + w) & (boxes[:, 2] > x) & (boxes[:, 1] < y + w) & (boxes[:, 3] > y)).any(1)


def label_tiles(
    table: pd.DataFrame, annotations: Annotations | None, settings: LabelSettings = LabelSettings()
) -> pd.DataFrame:
    """The table with label columns: `fraction_k` per class, `tumor_fraction` (class 1), `label`
    (tumour fraction ≥ threshold), `majority_class` (most frequent non-background class, 0 if none).
    Without annotations the columns are there but empty (NA)."""
    k = settings.n_classes
    if k < 1:
        raise BadOption(f"n_classes must be ≥ 1 (class 1 = tumour), got {k}")
    table = table.copy()
    fractions = np.full((len(table), k + 1), np.nan if annotations is None else 0.0)
    if annotations is not None:
        fractions[:, 0] = 1.0  # tiles away from every region: all background, nothing to rasterise
        for i in np.flatnonzero(_near_regions(table, annotations)):
            x, y, w, size = (int(table[c].iat[i]) for c in ("x", "y", "w", "tile_size"))
            counts = np.bincount(tile_label_mask(annotations, x, y, w, size).ravel(), minlength=k + 1)
            fractions[i] = counts[: k + 1] / (size * size)
    foreground = fractions[:, 1:]
    majority = np.where((foreground > 0).any(1), foreground.argmax(1) + 1, 0)
    label = (fractions[:, 1] >= settings.threshold).astype(int)
    table["tumor_fraction"] = fractions[:, 1]
    table["label"] = pd.array(label, dtype="Int64")
    table["majority_class"] = pd.array(majority, dtype="Int64")
    if annotations is None:
        table["label"] = table["majority_class"] = pd.array([pd.NA] * len(table), dtype="Int64")
    for c in range(k + 1):
        table[f"fraction_{c}"] = fractions[:, c]
    return table


@dataclass(frozen=True, eq=False)
class Tiling:
    """A tiled slide: the table and what the overview needs."""

    table: pd.DataFrame
    tissue: Tissue
    annotations: Annotations | None


def tile_slide(
    slide: Slide,
    grid: TileGridSettings = TileGridSettings(),
    mask: TissueMaskSettings = TissueMaskSettings(),
    annotations: Annotations | None = None,
    labels: LabelSettings = LabelSettings(),
) -> Tiling:
    """Tissue mask, grid, labels: the whole `tiles` stage for one slide. Reads only low levels."""
    check_tile_fits(slide, grid)
    if annotations is not None:
        check_annotations_within(annotations, slide)
    tissue = find_tissue(slide, mask)
    table = label_tiles(plan_tiles(slide, tissue, grid), annotations, labels)
    return Tiling(table, tissue, annotations)


def plot_overview(tiling: Tiling, path: str | Path, title: str = "") -> None:
    """PNG overview: low-res slide, tissue outline (green), tiles (blue; red when labelled tumour),
    annotation outlines (yellow; exclusions dashed). Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    low, table = tiling.tissue.overview, tiling.table
    height, width = low.image.shape[:2]
    fig = Figure(figsize=(8, 8 * height / width + 0.4), dpi=max(100, min(300, width // 8)))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    ax.imshow(low.image, interpolation="lanczos" if width > 800 else "nearest")
    if tiling.tissue.mask.any() and min(tiling.tissue.mask.shape) >= 2:
        ax.contour(tiling.tissue.mask, levels=[0.5], colors="lime", linewidths=0.8)
    d = low.downsample
    corners = table[["x", "y", "w"]].to_numpy(float) / d
    boxes = [((x, y), (x + w, y), (x + w, y + w), (x, y + w)) for x, y, w in corners - (0.5, 0.5, 0)]
    tumour = table["label"].fillna(0).to_numpy(bool) if "label" in table else np.zeros(len(table), bool)
    for selected, colour in ((~tumour, "dodgerblue"), (tumour, "red")):  # tumour tiles drawn on top
        tiles = [b for b, keep in zip(boxes, selected) if keep]
        ax.add_collection(PolyCollection(tiles, facecolors="none", edgecolors=colour, linewidths=0.4))
    for region in tiling.annotations.regions if tiling.annotations else ():
        for ring in (region.exterior, *region.holes):
            closed = np.vstack([ring, ring[:1]]) / d - 0.5
            ax.plot(
                closed[:, 0],
                closed[:, 1],
                color="yellow",
                lw=0.8,
                ls="--" if region.label == 0 else "-",
            )
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_axis_off()
    legend = "tiles blue (label 1: red) · tissue green · annotations yellow (exclusions dashed)"
    fig.suptitle(f"{title or f'{len(table)} tiles'}\n{legend}", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


@dataclass(frozen=True)
class TilingSettings:
    """Everything `smoothsal tiles` decides: the grid, the tissue mask, the labels."""

    grid: TileGridSettings = field(default_factory=TileGridSettings)
    mask: TissueMaskSettings = field(default_factory=TissueMaskSettings)
    labels: LabelSettings = field(default_factory=LabelSettings)


def make_tiles(
    slide_path: str | Path,
    out: str | Path,
    settings: TilingSettings = TilingSettings(),
    *,
    annotations: str | Path | None = None,
    class_map: Mapping[str, int] | None = None,
    mpp: float | None = None,
    slide_id: str | None = None,
    overview: str | Path | None = None,
) -> Tiling:
    """The `tiles` stage for one slide: tile it, write the overview (default: OUT with .png), then the
    table (last: the table marks a finished slide) with the slide's fingerprint, taken once it opened.
    The label columns cover every class of the map."""
    check_file_out(out, overview or Path(out).with_suffix(".png"))
    class_map = DEFAULT_CLASS_MAP if class_map is None else class_map
    labels = replace(settings.labels, n_classes=max(1, n_classes(class_map)))
    regions = read_annotations(annotations, class_map) if annotations else None
    with open_slide(slide_path, mpp, slide_id) as slide:
        fingerprint = {slide.slide_id: slide_fingerprint(slide.path)}  # the file as it is tiled
        tiling = tile_slide(slide, settings.grid, settings.mask, regions, labels)
    overview = Path(overview) if overview else Path(out).with_suffix(".png")
    plot_overview(tiling, overview, title=f"{Path(slide_path).name}: {len(tiling.table)} tiles")
    write_tile_table(tiling.table, out, fingerprint)
    return tiling
