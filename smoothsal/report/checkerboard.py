"""The report's checkerboard table, beside TV: per dataset/model × layer × attribution × method, the
mean share of each tile's map energy in the period-2 patterns (`metrics.checkerboard_share`), and per
dataset/model whether every smoothing method lowers it against the original, in the run's numbers.

Tables written before the measure (per-tile table format 1) have no such column: their cells say
"not recorded".
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .tables import (
    Collected,
    Table,
    display_labels,
    label_of,
    mean_std,
    measure_long,
    measure_orders,
    wide,
)

__all__ = ["NOT_RECORDED", "checkerboard_table", "lowered"]

NOT_RECORDED = "not recorded"
_KEYS = ["dataset", "model", "layer", "attribution", "method"]


def checkerboard_table(collected: Collected) -> Table:
    """Every cell of the TV table with the checkerboard share's mean ± std over tiles (CSV: ``tiles``,
    ``mean``, ``std``, ``lowest``, ``reduction_percent`` and ``recorded``)."""
    cells_of_tv = measure_long(collected, per_slide=False)[_KEYS]
    if collected.moments["measure"].str.startswith("checkerboard/").any():
        long = cells_of_tv.merge(measure_long(collected, False, "checkerboard"), on=_KEYS, how="left")
    else:
        long = cells_of_tv.assign(tiles=0, mean=np.nan, std=np.nan, lowest=False, reduction_percent=np.nan)
    recorded = collected.tiles.groupby(["dataset", "model", "method"])["checkerboard"].any()
    keys = long[["dataset", "model", "method"]].itertuples(index=False, name=None)
    long["recorded"] = [bool(recorded.get(k, False)) for k in keys]
    long["tiles"] = long["tiles"].fillna(0).astype(int)
    long["lowest"] = long["lowest"].astype(object).fillna(False).astype(bool)
    text = [
        mean_std(m, s, 4) if r else NOT_RECORDED
        for m, s, r in zip(long["mean"], long["std"], long["recorded"], strict=True)
    ]
    rows, cols = ["dataset", "model", "layer"], ["attribution", "method"]
    row_order, col_order = measure_orders(collected, long, rows)
    cells = wide(long.assign(text=text), rows, cols, "text", row_order, col_order).fillna("–")
    marked = wide(long, rows, cols, "lowest", row_order, col_order).fillna(False).astype(bool)
    note = (
        "Mean ± std over tiles of the share of each tile's map energy (each channel's mean removed, summed "
        "over channels) in the period-2 patterns (−1)^h, (−1)^w, (−1)^(h+w): 1 = a pure checkerboard, near "
        "0 = smooth (a linear ramp on N × N: 3/(N² − 1)); the lowest mean per row and attribution in bold; "
        f"“{NOT_RECORDED}”: per-tile tables written before the measure."
    )
    return Table(
        "checkerboard",
        "Checkerboard share per method and layer",
        long,
        display_labels(cells),
        display_labels(marked),
        " ".join([note, *lowered(long)]),
    )


def lowered(long: pd.DataFrame) -> list[str]:
    """One sentence per dataset/model with the original and a smoothing method: does every smoothing
    method have a lower mean share than the original at every layer and attribution, with each
    method's range of mean share / the original's."""
    sentences = []
    known = long[long["recorded"] & long["mean"].notna()]
    for (dataset, model), group in known.groupby(["dataset", "model"], sort=False):
        original = group[group["method"] == "original"].set_index(["layer", "attribution"])["mean"]
        smoothed = group[group["method"] != "original"]
        at = pd.MultiIndex.from_frame(smoothed[["layer", "attribution"]])
        smoothed = smoothed.assign(ratio=smoothed["mean"].to_numpy() / original.reindex(at).to_numpy())
        smoothed = smoothed[smoothed["ratio"].notna()]
        if smoothed.empty:
            continue
        where = f"{dataset} / {model}" if dataset else model
        ranges = "; ".join(
            f"{label_of(m)} {r.min():.2f}–{r.max():.2f}"
            for m, r in smoothed.groupby("method", sort=False)["ratio"]
        )
        above = smoothed[smoothed["ratio"] >= 1]
        if above.empty:
            verdict = "every smoothing method lowers the checkerboard share at every layer and attribution"
        else:
            cases = ", ".join(
                f"{label_of(m)} at {layer} ({label_of(a)})"
                for m, layer, a in above[["method", "layer", "attribution"]].itertuples(index=False)
            )
            verdict = f"not every smoothing method lowers the checkerboard share: not {cases}"
        sentences.append(f"{where}: {verdict} (mean share / the original's: {ranges}).")
    return sentences
