"""The `seams` stage: what overlapping tiles with window blending do to the tile grid in the heatmaps.

Input: one slide's saliency stores computed on a tile table whose stride is the tile size / k (k ≥ 2,
the demo: half stride). From the same stores it writes two containers:

- ``without``: only the tiles of the non-overlapping grid (grid col and row multiples of k, i.e. the
  tiles a stride of one tile would have laid), stitched with blend ``none`` — what the default tiling
  gives;
- ``with``: every tile, stitched with Hann-window blending (`stitching.blend_weights`),

each with the seam measure of every map in its attributes (`heatmaps`), and a table (CSV, one row per
method × attribution × layer: both seam scores and their band and jump ratios), written and read here.
Same model, same per-tile maps, the same slide region: the only difference is the overlap + blending.
Cost: k² times the tiles of the non-overlapping grid (4× at half stride) for the saliency of that slide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from .container import open_container
from .errors import BadOption, BadTable, MissingInput
from .files import atomic_path
from .heatmaps import HeatmapSettings, check_inputs, write_container
from .slides import open_slide
from .store import open_store
from .tiles import read_tile_table

__all__ = ["SEAM_COLUMNS", "non_overlapping_rows", "read_seam_table", "seam_comparison"]

SEAM_COLUMNS = (
    "slide_id", "method", "attribution", "layer", "seams_without", "seams_with", "band_ratio_without",
    "band_ratio_with", "jump_ratio_without", "jump_ratio_with", "tiles_without", "tiles_with", "overlap",
    "container_without", "container_with",
)  # fmt: skip


def non_overlapping_rows(table: pd.DataFrame, tiles: Path) -> tuple[np.ndarray, int]:
    """Rows of the tiles on the non-overlapping sub-grid, and k = tile size / stride (level-0 px)."""
    w = int(table["w"].iloc[0])
    steps = [np.diff(np.unique(table[axis].to_numpy(np.int64))) for axis in ("x", "y")]
    step = int(min((s.min() for s in steps if s.size), default=w))
    if step >= w or w % step:
        raise BadOption(
            f"{tiles}: tiles {w} px apart by {step} px do not overlap by a whole fraction; tile the slide "
            "with `smoothsal tiles --stride` = tile size / 2 (or / k) for the seam comparison"
        )
    k = w // step
    col, row = table["col"].to_numpy(np.int64), table["row"].to_numpy(np.int64)
    rows = np.flatnonzero((col % k == 0) & (row % k == 0))
    if not rows.size:
        raise BadTable(f"{tiles}: no tile on the non-overlapping grid; tile a larger region")
    return rows, k


def _rows_of(without: Path, with_: Path, slide_id: str, counts: tuple[int, int], k: int) -> pd.DataFrame:
    images = {}
    for name, path in (("without", without), ("with", with_)):
        c = open_container(path)
        for entry in c.meta["images"]:
            if entry["kind"] == "heatmap":
                seams = dict(c.root[entry["path"]].attrs)["smoothsal"]["seams"]
                images.setdefault((entry["method"], entry["attribution"], entry["layer"]), {})[name] = seams
    out = []
    for (method, attribution, layer), s in images.items():
        row = {"slide_id": slide_id, "method": method, "attribution": attribution, "layer": layer}
        for name in ("without", "with"):
            row |= {
                f"seams_{name}": s[name]["score"],
                f"band_ratio_{name}": s[name]["band_ratio"],
                f"jump_ratio_{name}": s[name]["jump_ratio"],
            }
        out.append(row | {"tiles_without": counts[0], "tiles_with": counts[1], "overlap": k,
                          "container_without": str(without), "container_with": str(with_)})  # fmt: skip
    return pd.DataFrame(out, columns=list(SEAM_COLUMNS)).astype({c: float for c in SEAM_COLUMNS[4:10]})


def seam_comparison(
    slide_path: str | Path,
    saliency: Sequence[str | Path],
    tiles: str | Path,
    without: str | Path,
    with_: str | Path,
    table_out: str | Path,
    settings: HeatmapSettings = HeatmapSettings(),
    mpp: float | None = None,
) -> pd.DataFrame:
    """The `seams` stage for one slide (see the module docstring); returns the table it wrote."""
    tiles = Path(tiles)
    table = read_tile_table(tiles, slide_path)
    stores = [open_store(p) for p in saliency]
    rows, k = non_overlapping_rows(table, tiles)
    with open_slide(slide_path, mpp) as slide:
        check_inputs(slide, table, tiles, stores)
        extra = {"tiles_path": str(tiles), "seams": {"overlap": k}}
        write_container(without, slide, table, stores, replace(settings, blend="none"),
                        extra_settings=extra | {"seams": {"overlap": k, "tiles": "non-overlapping"}}, rows=rows)  # fmt: skip
        write_container(with_, slide, table, stores, replace(settings, blend="window"),
                        extra_settings=extra | {"seams": {"overlap": k, "tiles": "all"}})  # fmt: skip
    result = _rows_of(Path(without), Path(with_), str(table["slide_id"].iloc[0]), (len(rows), len(table)), k)
    with atomic_path(table_out) as tmp:
        result.to_csv(tmp, index=False)
    return result


def read_seam_table(path: str | Path) -> pd.DataFrame:
    """A seam table written by `seam_comparison`; one line naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path}: seam table not found; write it with `smoothsal seams`")
    try:
        frame = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadTable(f"{path}: not a seam table ({err}); write it with `smoothsal seams`") from None
    missing = [c for c in SEAM_COLUMNS if c not in frame.columns]
    if missing:
        raise BadTable(f"{path}: not a seam table (no {', '.join(missing)}); write it with `smoothsal seams`")
    for column in ("seams_without", "seams_with"):
        frame[column] = frame[column].astype(float)
    frame["ratio"] = [w / o if o and math.isfinite(o) else math.nan for o, w in
                      zip(frame["seams_without"], frame["seams_with"], strict=True)]  # fmt: skip
    return frame
