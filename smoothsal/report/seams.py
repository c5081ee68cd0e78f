"""The report's seam section: per slide run by `smoothsal seams`, the seam score of every map without
overlap and with overlap + window blending (table), and the layer-1 maps of both side by side (figure)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..container import open_container
from ..overlap import read_seam_table
from ..smoothing import METHODS
from .figures import Overview, Raster, overview_figure
from .tables import Table, label_of, method_label, ordered

if TYPE_CHECKING:
    from . import ReportSettings

__all__ = ["read_seams", "seam_figure", "seam_table"]

NOTE = (
    "Seam score |ln band ratio| + |ln jump ratio| of each stitched map (0 = no trace of the tile grid): "
    "'without' stitches the non-overlapping tiles (the default tiling), 'with' every tile of the same run "
    "at stride = tile / overlap with Hann-window blending. Cell: without → with (with / without)."
)


def read_seams(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Every seam table, one after the other (empty when none are given)."""
    frames = [read_seam_table(p) for p in paths]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def seam_table(seams: pd.DataFrame) -> Table:
    """Slide × attribution × layer rows, one column per method: 'without → with (ratio)'."""
    methods = ordered(seams["method"], METHODS)
    data = seams.drop(columns=["container_without", "container_with"])
    rows = data[["slide_id", "attribution", "layer"]].drop_duplicates()
    cells = pd.DataFrame(
        "", index=pd.MultiIndex.from_frame(rows), columns=[method_label(m) for m in methods], dtype=object
    )
    for r in data.itertuples(index=False):
        text = f"{r.seams_without:.3f} → {r.seams_with:.3f} ({r.ratio:.2f})"
        cells.loc[(r.slide_id, r.attribution, r.layer), method_label(r.method)] = text
    cells.index = cells.index.set_levels([label_of(a) for a in cells.index.levels[1]], level=1)
    return Table("seams", "Seams: without overlap vs with overlap + window blending", data, cells, note=NOTE)


def _cropped(container: str | Path, layer: str) -> tuple[Overview, tuple[float, float, float, float]]:
    """The tissue and the `layer` maps of a seam container, level 0, cut to the bounding box of its tiles."""
    c = open_container(container)
    boxes = c.tile_boxes()
    mpp = float(c.meta["slide_mpp"])
    x0, y0 = boxes[:, 0].min() * mpp, boxes[:, 1].min() * mpp
    x1, y1 = (boxes[:, 0] + boxes[:, 2]).max() * mpp, (boxes[:, 1] + boxes[:, 3]).max() * mpp

    def raster(index: int) -> Raster:
        lv = c.images[index].levels[0]
        (oy, ox), (sy, sx) = lv.origin, lv.scale
        r0, r1 = int((y0 - oy) // sy), int(np.ceil((y1 - oy) / sy))
        q0, q1 = int((x0 - ox) // sx), int(np.ceil((x1 - ox) / sx))
        data = c.region(index, 0, slice(r0, r1), slice(q0, q1))
        return Raster(data, (ox + q0 * sx, ox + q1 * sx, oy + r1 * sy, oy + r0 * sy))

    tissue = next(i.index for i in c.images if i.kind == "tissue")
    maps = {(i.method, i.attribution, i.layer): raster(i.index) for i in c.images if i.layer == layer}
    slide_id = str(c.meta.get("slide_id"))
    return Overview(c.path, slide_id, raster(tissue), maps), (x0, x1, y1, y0)


def seam_figure(rows: pd.DataFrame, settings: ReportSettings, layer: str = "layer1") -> Figure:
    """One slide's `layer` maps without (top rows) and with overlap + window blending (bottom rows):
    the two containers of `smoothsal seams` side by side, as one overview with two variants per row."""
    first = rows.iloc[0]
    without, _ = _cropped(first["container_without"], layer)
    with_, _ = _cropped(first["container_with"], layer)
    maps, attributions = {}, []
    for name, overview in (("without overlap", without), ("overlap + window", with_)):
        for (method, attribution, lay), raster in overview.heatmaps.items():
            key = f"{label_of(attribution)}, {name}"
            maps[method, key, lay] = raster
            attributions.append(key)
    both = Overview(without.path, without.slide_id, without.tissue, maps)
    return overview_figure(
        both, settings, layers=[layer], attributions=list(dict.fromkeys(attributions)),
        title=f"{first['slide_id']}: {layer} without overlap vs at stride = tile / {first['overlap']} + window",
    )  # fmt: skip
