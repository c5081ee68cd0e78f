"""The report's tables from every slide's per-tile results tables: the paper's Tables 2–4 for your
model (TV per layer × attribution × method, TV reduction, prediction difference, accuracy) and per-slide
breakdowns.

Every statistic is a mean ± std over tiles (population std, ddof = 0, as ``smoothsal evaluate``).
Per-slide moments (n, mean, sum of squared deviations) are computed one table at a time and pooled
exactly (Chan et al.), so a report over thousands of slides never holds all tiles at once.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import BadTable
from ..smoothing import METHODS, check_methods, method_info
from ..store import RESULTS_FIX, read_results
from .checks import EmptySlide, SlideRuns

__all__ = [
    "ATTRIBUTION_NAMES",
    "PD_MEASURES",
    "Collected",
    "Table",
    "collect",
    "display_labels",
    "label_of",
    "mean_std",
    "measure_long",
    "method_label",
    "ordered",
    "pool",
    "report_tables",
    "wide",
]

ATTRIBUTION_NAMES = {"deeplift": "DeepLift", "gradient": "Gradient"}
PD_METHODS = ("surrogate", "forward_hook", "backward_hook")  # Table 3; backward_hook as a check (≈ 0)
PD_MEASURES = {
    "pd_all": "All classes", "pd_target": "Target class", "pd_masked": "Masked (segmentation)",
    "agree": "Agreement %",
}  # fmt: skip
OPTIONAL = ("pd_masked", "correct", "agree")
KEYS = ["dataset", "model", "slide_id", "method"]
ALL = "(all)"  # the rows over every dataset/model pair


def method_label(name: str) -> str:
    """A method's display name (the registry's label; the name itself for an unknown one)."""
    return method_info(name).label if name in METHODS else name


def label_of(name: object) -> object:
    """Display name of a method, attribution or prediction-difference measure (others unchanged)."""
    if not isinstance(name, str):
        return name
    return method_label(name) if name in METHODS else ATTRIBUTION_NAMES.get(name, PD_MEASURES.get(name, name))


@dataclass(frozen=True)
class Collected:
    """Per-slide moments of every measure, and what the tables hold.

    ``moments``: one row per dataset, model, slide, method and measure (``tv/{attribution}/{layer}``,
    ``checkerboard/…``, ``pd_all``, ``pd_target``, ``pd_masked``, ``correct``) with ``n`` (non-missing
    tiles), ``mean`` and ``m2`` (sum of squared deviations). ``tiles``: one row per dataset, model, slide,
    method with the tile count, task, source file and whether it records the checkerboard share. ``layers``: (dataset, model) → layers in forward order.
    """

    moments: pd.DataFrame
    tiles: pd.DataFrame
    layers: dict[tuple[str, str], list[str]]
    attributions: list[str]
    empty: tuple[EmptySlide, ...] = ()  # slides without tissue (0 tiles): a line in the report


def _moments(table: pd.DataFrame, measures: list[str]) -> pd.DataFrame:
    """Per (dataset, model, slide, method) and measure: n, mean, m2 (NaN values skipped)."""
    values = table[KEYS].copy()
    for m in measures:
        values[m] = pd.to_numeric(table[m], errors="coerce").astype(float)
    groups = values.groupby(KEYS, sort=False)
    n, mean = groups[measures].count(), groups[measures].mean()
    m2 = groups[measures].var(ddof=0) * n
    long = [
        frame.reset_index().melt(id_vars=KEYS, var_name="measure", value_name=name)
        for name, frame in (("n", n), ("mean", mean), ("m2", m2))
    ]
    out = long[0].assign(mean=long[1]["mean"].to_numpy(), m2=long[2]["m2"].to_numpy())
    return out[out["n"] > 0]


def _dataset_from_path(path: Path) -> str:
    """``results/{dataset}/saliency/{slide}/{method}.parquet`` → dataset (for tables without a name)."""
    return path.parents[2].name if len(path.parents) > 3 and path.parents[1].name == "saliency" else ""


def collect(paths: Iterable[str | Path]) -> Collected:
    """Read each per-tile table once (only the columns needed) into per-slide moments."""
    moments, tiles, seen = [], [], {}
    layers: dict[tuple[str, str], list[str]] = {}
    attributions: list[str] = []
    read = [Path(p) for p in paths]
    runs = SlideRuns()
    for path in read:
        results = read_results(path, OPTIONAL)
        check_methods(sorted(set(results.table["method"].astype(str))))
        table, tv = results.table.rename(columns={"arch": "model"}), results.tv
        table["dataset"] = table["dataset"].fillna("").astype(str).replace("", _dataset_from_path(path))
        table["model"] = table["model"].fillna("").astype(str)
        table["slide_id"] = table["slide_id"].astype(str)
        table["method"] = table["method"].astype(str)
        first = table.iloc[0] if len(table) else {}
        runs.add(path, *(str(first.get(k, "")) for k in ("dataset", "slide_id", "method")), len(table))
        for key in table[KEYS].drop_duplicates().itertuples(index=False):
            if tuple(key) in seen:
                raise BadTable(
                    f"{path}: slide {key.slide_id} ({key.method}, dataset {key.dataset!r}) is also in "
                    f"{seen[tuple(key)]}; give each per-tile table once"
                )
            seen[tuple(key)] = path
        for dataset, model in table[["dataset", "model"]].drop_duplicates().itertuples(index=False):
            order = layers.setdefault((dataset, model), [])
            order.extend(layer for _, _, layer in tv if layer not in order)
        attributions.extend(a for _, a, _ in tv if a not in attributions)
        measures = [c for c, _, _ in tv + results.checkerboard] + ["pd_all", "pd_target"]
        measures += [c for c in OPTIONAL if c in table]
        moments.append(_moments(table, measures))
        counts = table.groupby(KEYS, sort=False).agg(tiles=("tile", "size"), task=("task", "first"))
        tiles.append(counts.reset_index().assign(file=str(path), checkerboard=bool(results.checkerboard)))
    if not tiles:
        raise BadTable(f"no per-tile tables given; {RESULTS_FIX}")
    moments = pd.concat(moments, ignore_index=True)
    if not moments["measure"].str.startswith("tv/").any():
        where = str(read[0]) if len(read) == 1 else f"all {len(read)} per-tile tables"
        raise BadTable(f"{where}: no tile has a TV value (empty tables?); {RESULTS_FIX}")
    attributions = ordered(attributions, tuple(ATTRIBUTION_NAMES))  # the paper's order: DeepLift first
    return Collected(moments, pd.concat(tiles, ignore_index=True), layers, attributions, tuple(runs.empty))


def pool(moments: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Combine per-slide moments into n, mean, std per group: exact, as over the pooled tiles."""
    total = moments.assign(s=moments["n"] * moments["mean"]).groupby(by, sort=False)[["n", "s"]].sum()
    total["mean"] = total["s"] / total["n"]
    joined = moments.join(total["mean"].rename("pooled"), on=by)
    spread = joined["m2"] + joined["n"] * (joined["mean"] - joined["pooled"]) ** 2
    total["std"] = np.sqrt(spread.groupby([joined[k] for k in by], sort=False).sum() / total["n"])
    return total.drop(columns="s").reset_index()


@dataclass(frozen=True)
class Table:
    """One report table: ``data`` (long, numeric; the CSV) and ``cells`` (the paper's layout, text).

    ``marked`` flags the cells shown in bold (same shape as ``cells``), e.g. the lowest TV per row.
    """

    name: str
    title: str
    data: pd.DataFrame
    cells: pd.DataFrame
    marked: pd.DataFrame | None = None
    note: str = ""

    def markdown(self) -> str:
        text = self.cells.where(~self._marked(), "**" + self.cells + "**")
        flat = text.copy()
        flat.columns = [" ".join(c) if isinstance(c, tuple) else str(c) for c in text.columns]
        flat = flat.reset_index()
        flat.columns = [str(c) for c in flat.columns]
        body = flat.to_markdown(index=False, disable_numparse=True)
        return f"## {self.title}\n\n{body}\n" + (f"\n{self.note}\n" if self.note else "")

    def html(self) -> str:
        escaped = self.cells.map(html.escape)
        text = escaped.where(~self._marked(), "<strong>" + escaped + "</strong>")
        text.index = text.index.map(_escape_label)
        text.columns = text.columns.map(_escape_label)
        return text.to_html(escape=False, na_rep="–", classes="results", border=0)

    def _marked(self) -> pd.DataFrame:
        if self.marked is None:
            return pd.DataFrame(False, index=self.cells.index, columns=self.cells.columns)
        return self.marked.reindex_like(self.cells).fillna(False).astype(bool)


def _escape_label(label: object) -> object:
    return tuple(html.escape(str(x)) for x in label) if isinstance(label, tuple) else html.escape(str(label))


def mean_std(mean: float, std: float, decimals: int) -> str:
    """A table cell "mean ± std" ("–" where the mean is missing)."""
    return "–" if not np.isfinite(mean) else f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    """The distinct values in ``order`` first, then the others as they come."""
    present = list(dict.fromkeys(values))
    return [v for v in order if v in present] + [v for v in present if v not in order]


def wide(
    long: pd.DataFrame,
    rows: list[str],
    cols: list[str],
    value: str,
    row_order: list[tuple],
    col_order: list[tuple],
) -> pd.DataFrame:
    """``long``'s ``value`` laid out with ``rows`` down and ``cols`` across, in the orders given."""
    wide = long.set_index(rows + cols)[value].unstack(cols)
    index = (
        pd.MultiIndex.from_tuples(row_order, names=rows)
        if len(rows) > 1
        else pd.Index(row_order, name=rows[0])
    )
    columns = (
        pd.MultiIndex.from_tuples(col_order, names=cols)
        if len(cols) > 1
        else pd.Index(col_order, name=cols[0])
    )
    return wide.reindex(index=index, columns=columns)


def measure_orders(
    collected: Collected, long: pd.DataFrame, rows: list[str]
) -> tuple[list[tuple], list[tuple]]:
    """Row and column order of a per-layer measure table (TV, checkerboard): rows as they come, columns
    attribution × method in the run's attribution order and the paper's method order."""
    row_order = list(dict.fromkeys(long[rows].itertuples(index=False, name=None)))
    col_order = [
        (a, m)
        for a in collected.attributions
        for m in ordered(long["method"], METHODS)
        if ((long["attribution"] == a) & (long["method"] == m)).any()
    ]
    return row_order, col_order


def display_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """Display names for methods, attributions and measures in the index and the columns."""

    def rename(index: pd.Index) -> pd.Index:
        if isinstance(index, pd.MultiIndex):
            return pd.MultiIndex.from_tuples(
                [tuple(label_of(x) for x in t) for t in index], names=index.names
            )
        return pd.Index([label_of(x) for x in index], name=index.name)

    out = frame.copy()
    out.index, out.columns = rename(out.index), rename(out.columns)
    return out


def _layer_rank(collected: Collected, frame: pd.DataFrame) -> pd.Series:
    return pd.Series(
        [
            collected.layers[(d, m)].index(layer)
            for d, m, layer in frame[["dataset", "model", "layer"]].itertuples(index=False)
        ],
        index=frame.index,
    )


def _sort(frame: pd.DataFrame, collected: Collected, extra: Sequence[str] = ()) -> pd.DataFrame:
    keys = {
        "method": lambda s: s.map({m: i for i, m in enumerate(METHODS)}),
        "attribution": lambda s: s.map({a: i for i, a in enumerate(collected.attributions)}),
    }
    frame = frame.assign(_layer=_layer_rank(collected, frame)) if "layer" in frame else frame
    order = ["dataset", "model", *extra, *(["_layer"] if "layer" in frame else []), "attribution", "method"]
    order = [c for c in order if c in frame]
    frame = frame.sort_values(order, key=lambda s: keys[s.name](s) if s.name in keys else s, kind="stable")
    return frame.drop(columns="_layer", errors="ignore").reset_index(drop=True)


def measure_long(collected: Collected, per_slide: bool, measure: str = "tv") -> pd.DataFrame:
    """Per cell (dataset, model, [slide,] layer, attribution, method) of ``{measure}/…`` columns: tiles,
    mean, std, the lowest per row and attribution, reduction vs the original (%); sorted as the tables."""
    tv = collected.moments[collected.moments["measure"].str.startswith(f"{measure}/")]
    by = ["dataset", "model", *(["slide_id"] if per_slide else []), "measure", "method"]
    stats = pool(tv, by)
    parts = stats["measure"].str.split("/", n=2, expand=True)
    stats = stats.assign(attribution=parts[1], layer=parts[2]).drop(columns="measure")
    group = ["dataset", "model", *(["slide_id"] if per_slide else []), "layer", "attribution"]
    grouped = stats.groupby(group)["mean"]
    stats["lowest"] = (stats["mean"] == grouped.transform("min")) & (grouped.transform("size") > 1)
    original = stats[stats["method"] == "original"].set_index(group)["mean"]
    reference = stats.join(original.rename("original_mean"), on=group)["original_mean"]
    stats["reduction_percent"] = 100 * (1 - stats["mean"] / reference)
    stats = stats.rename(columns={"n": "tiles"})
    columns = [
        *group[:-2],
        "layer",
        "attribution",
        "method",
        "tiles",
        "mean",
        "std",
        "lowest",
        "reduction_percent",
    ]
    return _sort(stats[columns], collected, ["slide_id"] if per_slide else [])


def _tv_table(collected: Collected, per_slide: bool) -> Table:
    long = measure_long(collected, per_slide)
    rows = ["dataset", "model", *(["slide_id"] if per_slide else []), "layer"]
    cols = ["attribution", "method"]
    long["text"] = [mean_std(m, s, 3) for m, s in zip(long["mean"], long["std"], strict=True)]
    row_order, col_order = measure_orders(collected, long, rows)
    cells = wide(long, rows, cols, "text", row_order, col_order).fillna("–")
    marked = wide(long, rows, cols, "lowest", row_order, col_order).fillna(False).astype(bool)
    name, title = ("tv_per_slide", "Total variation per slide") if per_slide else ("tv", "Total variation")
    note = (
        "Mean ± std over tiles of the TV of each tile's saliency map (lower = smoother); "
        "the lowest mean per row and attribution in bold (the paper's Table 4)."
    )
    return Table(name, title, long.drop(columns="text"), display_labels(cells), display_labels(marked), note)


def _reduction_table(collected: Collected) -> Table | None:
    """TV reduction vs the original per method: average, min and max over layers (paper §4.2.2).

    One row per dataset/model, attribution and method; with several dataset/model pairs also rows
    ``(all)`` over every pair and layer, as the paper's averages over its models.
    """
    long = measure_long(collected, per_slide=False)
    long = long[(long["method"] != "original") & long["reduction_percent"].notna()]
    if long.empty:
        return None
    scopes = [long.assign(at=long["layer"])]
    if long[["dataset", "model"]].drop_duplicates().shape[0] > 1:
        at = long["dataset"] + "/" + long["model"] + "/" + long["layer"]
        scopes.append(long.assign(dataset=ALL, model=ALL, at=at))
    rows = []
    for frame in scopes:
        for key, g in frame.groupby(["dataset", "model", "attribution", "method"], sort=False):
            r = g.set_index("at")["reduction_percent"]
            rows.append(
                dict(zip(["dataset", "model", "attribution", "method"], key, strict=True))
                | {"layers": len(r), "mean_percent": r.mean(), "min_percent": r.min(), "min_at": r.idxmin(),
                   "max_percent": r.max(), "max_at": r.idxmax()}
            )  # fmt: skip
    data = _sort_reduction(pd.DataFrame(rows), collected)
    cells = pd.DataFrame(
        {
            "layers": data["layers"].astype(str).to_numpy(),
            "average (%)": data["mean_percent"].map("{:.1f}".format).to_numpy(),
            "min (%)": [f"{v:.1f} ({w})" for v, w in zip(data["min_percent"], data["min_at"], strict=True)],
            "max (%)": [f"{v:.1f} ({w})" for v, w in zip(data["max_percent"], data["max_at"], strict=True)],
        },
        index=pd.MultiIndex.from_frame(data[["dataset", "model", "attribution", "method"]]),
    )
    note = (
        "Reduction = 100 · (1 − mean TV of the method / mean TV of the original) per layer, then over layers."
    )
    return Table("tv_reduction", "TV reduction vs the original", data, display_labels(cells), None, note)


def _sort_reduction(data: pd.DataFrame, collected: Collected) -> pd.DataFrame:
    rank = {a: i for i, a in enumerate(collected.attributions)}
    data = data.assign(
        _all=data["dataset"] == ALL,
        _a=data["attribution"].map(rank),
        _m=data["method"].map({m: i for i, m in enumerate(METHODS)}),
    )
    data = data.sort_values(["_all", "dataset", "model", "_a", "_m"], kind="stable")
    return data.drop(columns=["_all", "_a", "_m"]).reset_index(drop=True)


def _pd_table(collected: Collected, per_slide: bool) -> Table | None:
    measures = [m for m in PD_MEASURES if (collected.moments["measure"] == m).any()]
    moments = collected.moments[
        collected.moments["measure"].isin(measures) & collected.moments["method"].isin(PD_METHODS)
    ]
    if moments.empty:
        return None
    rows = ["dataset", "model", *(["slide_id"] if per_slide else [])]
    stats = pool(moments, [*rows, "method", "measure"])
    stats[["mean", "std"]] *= 100
    stats = stats.rename(columns={"n": "tiles"})
    methods = [m for m in PD_METHODS if (stats["method"] == m).any()]
    stats = stats.assign(
        _m=stats["method"].map({m: i for i, m in enumerate(methods)}),
        _k=stats["measure"].map({m: i for i, m in enumerate(measures)}),
    )
    stats = (
        stats.sort_values([*rows, "_m", "_k"], kind="stable")
        .drop(columns=["_m", "_k"])
        .reset_index(drop=True)
    )
    stats["text"] = [
        f"{m:.1f}" if k == "agree" else mean_std(m, s, 2)
        for m, s, k in zip(stats["mean"], stats["std"], stats["measure"], strict=True)
    ]
    row_order = list(dict.fromkeys(stats[rows].itertuples(index=False, name=None)))
    if len(rows) == 1:
        row_order = [r[0] for r in row_order]
    col_order = [
        (m, k) for m in methods for k in measures if ((stats["method"] == m) & (stats["measure"] == k)).any()
    ]
    cells = wide(stats, rows, ["method", "measure"], "text", row_order, col_order).fillna("–")
    name = "prediction_difference_per_slide" if per_slide else "prediction_difference"
    title = "Prediction difference per slide" if per_slide else "Prediction difference vs the original"
    note = (
        "×100, mean ± std over tiles, after softmax (sigmoid for one logit): all classes Σ|ỹ−ŷ|, target "
        "class |ỹₜ−ŷₜ| (the paper's Table 3); masked: segmentation pixels where the original is confident "
        "about the tile's majority class; agreement: % of tiles whose predicted class (segmentation: majority "
        "class) is the original's. The backward hook leaves the forward unchanged: its row checks ≈ 0."
    )
    if not per_slide:
        note = " ".join([note, *surrogate_vs_forward_hook(stats)])
    return Table(name, title, stats.drop(columns="text"), display_labels(cells), None, note)


def surrogate_vs_forward_hook(stats: pd.DataFrame) -> list[str]:
    """One sentence per dataset/model with both: how the surrogate's mean all-class prediction
    difference compares with the forward hook's, in this run's own numbers (never a fixed claim)."""
    pd_all = stats[stats["measure"] == "pd_all"].set_index(["dataset", "model", "method"])["mean"]
    sentences = []
    for dataset, model in dict.fromkeys(zip(stats["dataset"], stats["model"], strict=True)):
        s, f = pd_all.get((dataset, model, "surrogate")), pd_all.get((dataset, model, "forward_hook"))
        if s is None or f is None or not (np.isfinite(s) and np.isfinite(f)):
            continue
        where = f"{dataset} / {model}" if dataset else model
        if f > 0 and s < f:
            verdict = (
                f"{s / f:.2f} of the forward hook's ({f:.2f}): the surrogate changes the predictions less"
            )
        elif s > f:
            verdict = f"above the forward hook's ({f:.2f}): here the surrogate changes the predictions more"
        else:
            verdict = f"equal to the forward hook's ({f:.2f})"
        sentences.append(f"{where}: the surrogate's all-class prediction difference ({s:.2f}) is {verdict}.")
    return sentences


def _accuracy_table(collected: Collected, per_slide: bool) -> Table | None:
    correct = collected.moments[collected.moments["measure"] == "correct"]
    if correct.empty:
        return None
    rows = ["dataset", "model", *(["slide_id"] if per_slide else [])]
    stats = pool(correct, [*rows, "method"]).rename(columns={"n": "labelled_tiles"})
    stats["accuracy_percent"] = 100 * stats["mean"]
    stats = _sort(stats.drop(columns=["mean", "std"]), collected, ["slide_id"] if per_slide else [])
    methods = ordered(stats["method"], METHODS)
    row_order = list(dict.fromkeys(stats[rows].itertuples(index=False, name=None)))
    if len(rows) == 1:
        row_order = [r[0] for r in row_order]
    cells = wide(stats.assign(text=stats["accuracy_percent"].map("{:.2f}".format)), rows, ["method"], "text",
                  row_order, methods).fillna("–")  # fmt: skip
    labelled = stats.groupby(rows, sort=False)["labelled_tiles"].max()
    cells.insert(0, "labelled tiles", labelled.reindex(cells.index).astype(int).astype(str).to_numpy())
    name, title = ("accuracy_per_slide", "Accuracy per slide") if per_slide else ("accuracy", "Accuracy")
    note = (
        "% of labelled tiles whose prediction equals the label (the paper's Table 2); "
        "unlabelled tiles and slides are left out."
    )
    return Table(name, title, stats, display_labels(cells), None, note)


def _inputs_table(collected: Collected) -> Table:
    tiles = collected.tiles
    data = tiles.pivot_table(
        index=["dataset", "model", "slide_id", "task"], columns="method", values="tiles", aggfunc="sum"
    )
    data = data.reindex(columns=ordered(tiles["method"], METHODS)).reset_index()
    data.columns.name = None
    cells = data.set_index(["dataset", "model", "slide_id", "task"]).map(
        lambda v: "–" if pd.isna(v) else str(int(v))
    )
    note = "Tiles per slide and method in the per-tile tables read."
    return Table("inputs", "Slides and tiles", data, display_labels(cells), None, note)


def report_tables(collected: Collected) -> list[Table]:
    """Every table of the report, in reading order (tables with nothing to show are left out)."""
    tables = [
        _tv_table(collected, per_slide=False),
        _reduction_table(collected),
        _pd_table(collected, per_slide=False),
        _accuracy_table(collected, per_slide=False),
        _inputs_table(collected),
        _tv_table(collected, per_slide=True),
        _pd_table(collected, per_slide=True),
        _accuracy_table(collected, per_slide=True),
    ]
    return [t for t in tables if t is not None]
