"""Tables and figures: the methods side by side on one tile (`smoothsal compare`), and the slide-scale
report over every slide's per-tile tables (`smoothsal report`): the paper's Tables 2–4 and Figure 4
for your own model, per-slide breakdowns, per-slide overview figures and one ``index.html``.

Every statistic is a mean ± std over tiles (population std, ddof = 0, as ``smoothsal evaluate``).
Per-slide moments (n, mean, sum of squared deviations) are computed one table at a time and pooled
exactly (Chan et al.), so a report over thousands of slides never holds all tiles at once.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from .attribution import ATTRIBUTIONS, SmoothGrad, attribute
from .files import atomic_dir
from .metrics import total_variation
from .smoothing import METHODS, SurrogatePaths, smooth

__all__ = [
    "Collected",
    "ReportSettings",
    "Table",
    "collect",
    "compare_methods",
    "comparison_figure",
    "overview_figure",
    "report_tables",
    "tv_per_layer_figure",
    "write_report",
]

METHOD_NAMES = {
    "original": "Original",
    "surrogate": "Bilinear surrogate",
    "backward_hook": "Backward hook",
    "forward_hook": "Forward hook",
}
ATTRIBUTION_NAMES = {"deeplift": "DeepLift", "gradient": "Gradient"}
METHOD_ORDER = ("original", "surrogate", "backward_hook", "forward_hook")  # the paper's columns
PD_METHODS = ("surrogate", "forward_hook", "backward_hook")  # Table 3; backward_hook as a check (≈ 0)
PD_MEASURES = {"pd_all": "All classes", "pd_target": "Target class", "pd_masked": "Masked (segmentation)"}
REQUIRED = ("dataset", "slide_id", "method", "arch", "tile", "task", "pd_all", "pd_target")
OPTIONAL = ("pd_masked", "correct")
KEYS = ["dataset", "model", "slide_id", "method"]
ALL = "(all)"  # the rows over every dataset/model pair
TABLE_FIX = "give the per-tile .parquet tables that `smoothsal saliency --table` writes"


# --- compare: one tile ----------------------------------------------------------------------------


def compare_methods(
    model: nn.Module,
    x: torch.Tensor,
    *,
    layer: str,
    target: int,
    methods: Sequence[str],
    surrogate: SurrogatePaths | None = None,
    smoothgrad: SmoothGrad | None = None,
) -> dict[tuple[str, str], tuple[np.ndarray, float]]:
    """(method, attribution) → (channel-summed saliency map of tile 0, its TV)."""
    out = {}
    for method in methods:
        smoothed = smooth(model, method, surrogate=surrogate if method == "surrogate" else None)
        maps = attribute(smoothed, x, layers=[layer], target=target, smoothgrad=smoothgrad)
        for attribution in ATTRIBUTIONS:
            z = maps[attribution][layer]
            out[method, attribution] = (z[0].sum(0).numpy(), float(total_variation(z)[0]))
    return out


def comparison_figure(
    rgb: np.ndarray, maps: dict[tuple[str, str], tuple[np.ndarray, float]], title: str, path: Path
) -> None:
    """Tile, then one saliency map per method; one row per attribution; TV in each title."""
    methods = list(dict.fromkeys(m for m, _ in maps))
    fig = Figure(figsize=(2.6 * (len(methods) + 1), 2.7 * len(ATTRIBUTIONS)))
    axes = fig.subplots(len(ATTRIBUTIONS), len(methods) + 1, squeeze=False)
    for row, attribution in enumerate(ATTRIBUTIONS):
        axes[row, 0].imshow(rgb)
        axes[row, 0].set_title("tile" if row == 0 else "", fontsize=9)
        axes[row, 0].set_ylabel(attribution)
        for col, method in enumerate(methods, start=1):
            z, tv = maps[method, attribution]
            limit = float(np.abs(z).max()) or 1.0
            axes[row, col].imshow(z, cmap="coolwarm", vmin=-limit, vmax=limit, interpolation="nearest")
            axes[row, col].set_title(f"{method}\nTV {tv:.2f}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# --- report: reading per-tile tables --------------------------------------------------------------


@dataclass(frozen=True)
class ReportSettings:
    """How the report looks; nothing here changes a number in a table."""

    title: str = "smoothsal report"
    percentile: float = 99.0  # colour limit of a heatmap row: this percentile of |value| over its methods
    alpha: float = 0.65  # heatmap opacity over the tissue
    thumbnail_px: int = 384  # read the smallest pyramid level with a side of at least this many px
    dpi: int = 110

    def __post_init__(self) -> None:
        if not 50 <= self.percentile <= 100:
            raise ValueError(f"--percentile must lie in [50, 100], got {self.percentile}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"--alpha must lie in (0, 1], got {self.alpha}")
        if self.thumbnail_px < 16:
            raise ValueError(f"--thumbnail-px must be at least 16, got {self.thumbnail_px}")


@dataclass(frozen=True)
class Collected:
    """Per-slide moments of every measure, and what the tables hold.

    ``moments``: one row per dataset, model, slide, method and measure (``tv/{attribution}/{layer}``,
    ``pd_all``, ``pd_target``, ``pd_masked``, ``correct``) with ``n`` (non-missing tiles), ``mean`` and
    ``m2`` (sum of squared deviations). ``tiles``: one row per dataset, model, slide, method with the
    tile count, task and source file. ``layers``: (dataset, model) → layers in forward order.
    """

    moments: pd.DataFrame
    tiles: pd.DataFrame
    layers: dict[tuple[str, str], list[str]]
    attributions: list[str]


def _tv_columns(path: Path, names: Sequence[str]) -> list[tuple[str, str, str]]:
    out = []
    for name in names:
        if name.startswith("tv/"):
            parts = name.split("/", 2)
            if len(parts) != 3 or not parts[1] or not parts[2]:
                raise ValueError(f"{path}: column {name!r} is not tv/{{attribution}}/{{layer}}; {TABLE_FIX}")
            out.append((name, parts[1], parts[2]))
    return out


def _read_one(path: Path) -> tuple[pd.DataFrame, list[tuple[str, str, str]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FileNotFoundError(f"{path}: per-tile table not found; {TABLE_FIX}")
    try:
        names = pq.read_schema(path).names
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"{path}: not a readable Parquet table ({err}); {TABLE_FIX}") from err
    tv = _tv_columns(path, names)
    missing = [c for c in REQUIRED if c not in names] + ([] if tv else ["tv/{attribution}/{layer}"])
    if missing:
        raise ValueError(f"{path}: missing columns {', '.join(missing)}; {TABLE_FIX}")
    columns = [*REQUIRED, *(c for c in OPTIONAL if c in names), *(c for c, _, _ in tv)]
    try:
        table = pd.read_parquet(path, columns=columns)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"{path}: not a readable Parquet table ({err}); {TABLE_FIX}") from err
    unknown = sorted(set(table["method"].astype(str)) - set(METHODS))
    if unknown:
        raise ValueError(f"{path}: unknown methods {unknown}; allowed: {', '.join(METHODS)}")
    return table, tv


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
    for path in read:
        table, tv = _read_one(path)
        table = table.rename(columns={"arch": "model"})
        table["dataset"] = table["dataset"].fillna("").astype(str).replace("", _dataset_from_path(path))
        table["model"] = table["model"].fillna("").astype(str)
        table["slide_id"] = table["slide_id"].astype(str)
        table["method"] = table["method"].astype(str)
        for key in table[KEYS].drop_duplicates().itertuples(index=False):
            if tuple(key) in seen:
                raise ValueError(
                    f"{path}: slide {key.slide_id} ({key.method}, dataset {key.dataset!r}) is also in "
                    f"{seen[tuple(key)]}; give each per-tile table once"
                )
            seen[tuple(key)] = path
        for dataset, model in table[["dataset", "model"]].drop_duplicates().itertuples(index=False):
            order = layers.setdefault((dataset, model), [])
            order.extend(layer for _, _, layer in tv if layer not in order)
        attributions.extend(a for _, a, _ in tv if a not in attributions)
        measures = [c for c, _, _ in tv] + ["pd_all", "pd_target"] + [c for c in OPTIONAL if c in table]
        moments.append(_moments(table, measures))
        counts = table.groupby(KEYS, sort=False).agg(tiles=("tile", "size"), task=("task", "first"))
        tiles.append(counts.reset_index().assign(file=str(path)))
    if not tiles:
        raise ValueError(f"no per-tile tables given; {TABLE_FIX}")
    moments = pd.concat(moments, ignore_index=True)
    if not moments["measure"].str.startswith("tv/").any():
        where = str(read[0]) if len(read) == 1 else f"all {len(read)} per-tile tables"
        raise ValueError(f"{where}: no tile has a TV value (empty tables?); {TABLE_FIX}")
    attributions = _ordered(attributions, tuple(ATTRIBUTION_NAMES))  # the paper's order: DeepLift first
    return Collected(moments, pd.concat(tiles, ignore_index=True), layers, attributions)


def pool(moments: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Combine per-slide moments into n, mean, std per group: exact, as over the pooled tiles."""
    total = moments.assign(s=moments["n"] * moments["mean"]).groupby(by, sort=False)[["n", "s"]].sum()
    total["mean"] = total["s"] / total["n"]
    joined = moments.join(total["mean"].rename("pooled"), on=by)
    spread = joined["m2"] + joined["n"] * (joined["mean"] - joined["pooled"]) ** 2
    total["std"] = np.sqrt(spread.groupby([joined[k] for k in by], sort=False).sum() / total["n"])
    return total.drop(columns="s").reset_index()


# --- report: tables -------------------------------------------------------------------------------


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


def _pm(mean: float, std: float, decimals: int) -> str:
    return "–" if not np.isfinite(mean) else f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(values))
    return [v for v in order if v in present] + [v for v in present if v not in order]


def _wide(
    long: pd.DataFrame,
    rows: list[str],
    cols: list[str],
    value: str,
    row_order: list[tuple],
    col_order: list[tuple],
) -> pd.DataFrame:
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


def _label(frame: pd.DataFrame) -> pd.DataFrame:
    """Display names for methods, attributions and measures in the index and the columns."""
    names = METHOD_NAMES | ATTRIBUTION_NAMES | PD_MEASURES

    def rename(index: pd.Index) -> pd.Index:
        if isinstance(index, pd.MultiIndex):
            return pd.MultiIndex.from_tuples(
                [tuple(names.get(x, x) for x in t) for t in index], names=index.names
            )
        return pd.Index([names.get(x, x) for x in index], name=index.name)

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
        "method": lambda s: s.map({m: i for i, m in enumerate(METHOD_ORDER)}),
        "attribution": lambda s: s.map({a: i for i, a in enumerate(collected.attributions)}),
    }
    frame = frame.assign(_layer=_layer_rank(collected, frame)) if "layer" in frame else frame
    order = ["dataset", "model", *extra, *(["_layer"] if "layer" in frame else []), "attribution", "method"]
    order = [c for c in order if c in frame]
    frame = frame.sort_values(order, key=lambda s: keys[s.name](s) if s.name in keys else s, kind="stable")
    return frame.drop(columns="_layer", errors="ignore").reset_index(drop=True)


def _tv_long(collected: Collected, per_slide: bool) -> pd.DataFrame:
    tv = collected.moments[collected.moments["measure"].str.startswith("tv/")]
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
    long = _tv_long(collected, per_slide)
    rows = ["dataset", "model", *(["slide_id"] if per_slide else []), "layer"]
    cols = ["attribution", "method"]
    long["text"] = [_pm(m, s, 3) for m, s in zip(long["mean"], long["std"], strict=True)]
    row_order = list(dict.fromkeys(long[rows].itertuples(index=False, name=None)))
    col_order = [
        (a, m)
        for a in collected.attributions
        for m in _ordered(long["method"], METHOD_ORDER)
        if ((long["attribution"] == a) & (long["method"] == m)).any()
    ]
    cells = _wide(long, rows, cols, "text", row_order, col_order).fillna("–")
    marked = _wide(long, rows, cols, "lowest", row_order, col_order).fillna(False).astype(bool)
    name, title = ("tv_per_slide", "Total variation per slide") if per_slide else ("tv", "Total variation")
    note = (
        "Mean ± std over tiles of the TV of each tile's saliency map (lower = smoother); "
        "the lowest mean per row and attribution in bold (the paper's Table 4)."
    )
    return Table(name, title, long.drop(columns="text"), _label(cells), _label(marked), note)


def _reduction_table(collected: Collected) -> Table | None:
    """TV reduction vs the original per method: average, min and max over layers (paper §4.2.2).

    One row per dataset/model, attribution and method; with several dataset/model pairs also rows
    ``(all)`` over every pair and layer, as the paper's averages over its models.
    """
    long = _tv_long(collected, per_slide=False)
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
    return Table("tv_reduction", "TV reduction vs the original", data, _label(cells), None, note)


def _sort_reduction(data: pd.DataFrame, collected: Collected) -> pd.DataFrame:
    rank = {a: i for i, a in enumerate(collected.attributions)}
    data = data.assign(
        _all=data["dataset"] == ALL,
        _a=data["attribution"].map(rank),
        _m=data["method"].map({m: i for i, m in enumerate(METHOD_ORDER)}),
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
    stats["text"] = [_pm(m, s, 2) for m, s in zip(stats["mean"], stats["std"], strict=True)]
    row_order = list(dict.fromkeys(stats[rows].itertuples(index=False, name=None)))
    if len(rows) == 1:
        row_order = [r[0] for r in row_order]
    col_order = [
        (m, k) for m in methods for k in measures if ((stats["method"] == m) & (stats["measure"] == k)).any()
    ]
    cells = _wide(stats, rows, ["method", "measure"], "text", row_order, col_order).fillna("–")
    name = "prediction_difference_per_slide" if per_slide else "prediction_difference"
    title = "Prediction difference per slide" if per_slide else "Prediction difference vs the original"
    note = (
        "×100, mean ± std over tiles, after softmax (sigmoid for one logit): all classes Σ|ỹ−ŷ|, target "
        "class |ỹₜ−ŷₜ| (the paper's Table 3); masked: segmentation pixels where the original is confident "
        "about the tile's majority class. The backward hook leaves the forward unchanged: its row checks ≈ 0."
    )
    return Table(name, title, stats.drop(columns="text"), _label(cells), None, note)


def _accuracy_table(collected: Collected, per_slide: bool) -> Table | None:
    correct = collected.moments[collected.moments["measure"] == "correct"]
    if correct.empty:
        return None
    rows = ["dataset", "model", *(["slide_id"] if per_slide else [])]
    stats = pool(correct, [*rows, "method"]).rename(columns={"n": "labelled_tiles"})
    stats["accuracy_percent"] = 100 * stats["mean"]
    stats = _sort(stats.drop(columns=["mean", "std"]), collected, ["slide_id"] if per_slide else [])
    methods = _ordered(stats["method"], METHOD_ORDER)
    row_order = list(dict.fromkeys(stats[rows].itertuples(index=False, name=None)))
    if len(rows) == 1:
        row_order = [r[0] for r in row_order]
    cells = _wide(stats.assign(text=stats["accuracy_percent"].map("{:.2f}".format)), rows, ["method"], "text",
                  row_order, methods).fillna("–")  # fmt: skip
    labelled = stats.groupby(rows, sort=False)["labelled_tiles"].max()
    cells.insert(0, "labelled tiles", labelled.reindex(cells.index).astype(int).astype(str).to_numpy())
    name, title = ("accuracy_per_slide", "Accuracy per slide") if per_slide else ("accuracy", "Accuracy")
    note = (
        "% of labelled tiles whose prediction equals the label (the paper's Table 2); "
        "unlabelled tiles and slides are left out."
    )
    return Table(name, title, stats, _label(cells), None, note)


def _inputs_table(collected: Collected) -> Table:
    tiles = collected.tiles
    data = tiles.pivot_table(
        index=["dataset", "model", "slide_id", "task"], columns="method", values="tiles", aggfunc="sum"
    )
    data = data.reindex(columns=_ordered(tiles["method"], METHOD_ORDER)).reset_index()
    data.columns.name = None
    cells = data.set_index(["dataset", "model", "slide_id", "task"]).map(
        lambda v: "–" if pd.isna(v) else str(int(v))
    )
    note = "Tiles per slide and method in the per-tile tables read."
    return Table("inputs", "Slides and tiles", data, _label(cells), None, note)


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


# --- report: figures ------------------------------------------------------------------------------

_COLOURS = dict(zip(METHOD_ORDER, ("tab:gray", "tab:blue", "tab:orange", "tab:green"), strict=True))


def tv_per_layer_figure(
    tv: pd.DataFrame, layers: Sequence[str], attributions: Sequence[str], title: str
) -> Figure:
    """The paper's Figure 4: mean TV (± std band) per layer in forward order, one line per method."""
    attributions = [a for a in attributions if (tv["attribution"] == a).any()]
    fig = Figure(figsize=(1.0 + 4.0 * len(attributions), 3.6), layout="constrained")
    axes = fig.subplots(1, len(attributions), squeeze=False)[0]
    x = np.arange(len(layers))
    for ax, attribution in zip(axes, attributions, strict=True):
        for method in _ordered(tv["method"], METHOD_ORDER):
            sel = tv[(tv["attribution"] == attribution) & (tv["method"] == method)]
            if sel.empty:
                continue
            g = sel.set_index("layer").reindex(layers)
            colour = _COLOURS.get(method)
            ax.plot(x, g["mean"], marker="o", ms=3.5, color=colour, label=METHOD_NAMES.get(method, method))
            ax.fill_between(x, g["mean"] - g["std"], g["mean"] + g["std"], color=colour, alpha=0.15, lw=0)
        ax.set_xticks(
            x, layers, rotation=45 if len(layers) > 4 else 0, ha="right" if len(layers) > 4 else "center"
        )
        ax.set_title(ATTRIBUTION_NAMES.get(attribution, attribution), fontsize=10)
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


CONTAINER_FIX = "give the .ome.zarr that `smoothsal heatmaps` writes"


def read_raster(container: Path, image: str, min_px: int) -> Raster:
    """The smallest pyramid level of ``container/image`` with a side ≥ ``min_px`` (else level 0)."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    fmt = FormatV05() if (container / "zarr.json").exists() else FormatV04()
    location = parse_url(container / image, fmt=fmt)
    node = next(iter(Reader(location)()), None) if location is not None else None
    if node is None or not any(isinstance(s, Multiscales) for s in node.specs):
        raise ValueError(f"{container}: no OME-Zarr image at {image!r}; {CONTAINER_FIX}")
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in node.metadata["axes"]]
    if "y" not in axes or "x" not in axes:
        raise ValueError(f"{container}: image {image!r} has axes {axes}, no y and x; {CONTAINER_FIX}")
    iy, ix = axes.index("y"), axes.index("x")
    sides = [max(level.shape[iy], level.shape[ix]) for level in node.data]
    level = max((i for i, side in enumerate(sides) if side >= min_px), default=0)
    pick = tuple(slice(None) if a in ("y", "x", "c") else 0 for a in axes)
    kept = [a for a in axes if a in ("y", "x", "c")]
    data = np.asarray(node.data[level][pick])
    data = np.moveaxis(data, [kept.index("y"), kept.index("x")], [0, 1])
    transforms = node.metadata["coordinateTransformations"][level]
    scale = next((t["scale"] for t in transforms if t["type"] == "scale"), [1.0] * len(axes))
    shift = next((t["translation"] for t in transforms if t["type"] == "translation"), [0.0] * len(axes))
    (sy, sx), (ty, tx) = (scale[iy], scale[ix]), (shift[iy], shift[ix])
    h, w = data.shape[:2]  # NGFF coordinates are pixel centres
    return Raster(data, (tx - sx / 2, tx + (w - 0.5) * sx, ty + (h - 0.5) * sy, ty - sy / 2))


def read_overview(container: str | Path, min_px: int = 384) -> Overview:
    """Tissue and every heatmap listed in the container's ``smoothsal`` root attributes."""
    import zarr

    container = Path(container)
    try:
        attrs = dict(zarr.open_group(container, mode="r").attrs).get("smoothsal")
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{container}: not a readable Zarr group ({err}); {CONTAINER_FIX}") from err
    if not isinstance(attrs, dict) or not attrs.get("images"):
        raise ValueError(f"{container}: no 'smoothsal' root attributes listing images; {CONTAINER_FIX}")
    tissue = [i for i in attrs["images"] if i.get("kind") == "tissue"]
    if not tissue:
        raise ValueError(f"{container}: lists no tissue image; {CONTAINER_FIX}")
    heatmaps = {
        (i["method"], i["attribution"], i["layer"]): read_raster(container, i["path"], min_px)
        for i in attrs["images"]
        if i.get("kind") == "heatmap"
    }
    slide_id = str(attrs.get("slide_id") or container.name.removesuffix(".ome.zarr"))
    return Overview(container, slide_id, read_raster(container, tissue[0]["path"], min_px), heatmaps)


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
    methods = _ordered((m for m, _, _ in keys), METHOD_ORDER)
    attributions = _ordered((a for _, a, _ in keys), list(attributions))
    layers = _ordered((layer for _, _, layer in keys), list(layers))
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
                ax.set_title(METHOD_NAMES.get(method, method), fontsize=9)
            if c == 1:
                ax.set_ylabel(f"{ATTRIBUTION_NAMES.get(attribution, attribution)}\n{layer}", fontsize=9)
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


# --- report: writing ------------------------------------------------------------------------------


def _slug(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", p).strip("-") or "none" for p in parts)


def _save(fig: Figure, stem: Path, dpi: int) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(stem.with_suffix(".png"), dpi=dpi)
    fig.set_layout_engine("none")  # laid out once: the SVG reuses the PNG's layout
    fig.savefig(stem.with_suffix(".svg"), dpi=dpi)


def _dataset_of(overview: Overview, collected: Collected) -> tuple[str, str] | None:
    """(dataset, model) of a container's slide: the only one with that slide, or the path's dataset."""
    tiles = collected.tiles
    found = tiles.loc[tiles["slide_id"] == overview.slide_id, ["dataset", "model"]].drop_duplicates()
    pairs = list(found.itertuples(index=False, name=None))
    by_path = [p for p in pairs if p[0] == overview.path.resolve().parent.parent.name]
    return pairs[0] if len(pairs) == 1 else (by_path[0] if len(by_path) == 1 else None)


_REPORT_ENTRIES = {"index.html", "tables", "figures"}


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; give a directory for --out")
    if out.is_dir():
        other = sorted(
            p.name for p in out.iterdir() if p.name not in _REPORT_ENTRIES and not p.name.startswith(".")
        )
        if other:
            raise ValueError(
                f"{out} holds files that are no report ({', '.join(other[:3])}); "
                "give a new or empty directory"
            )


@dataclass(frozen=True)
class ReportResult:
    """Where the report went and what it holds (paths relative to ``out``)."""

    out: Path
    tables: list[str]
    figures: list[str]
    notes: list[str]


def write_report(
    tables: Sequence[str | Path],
    out: str | Path,
    heatmaps: Sequence[str | Path] = (),
    settings: ReportSettings = ReportSettings(),
) -> ReportResult:
    """Tables (CSV + Markdown), figures (PNG + SVG) and ``index.html`` under ``out``, written atomically."""
    out = Path(out)
    collected = collect(tables)
    built = report_tables(collected)
    notes = []
    if not any(t.name == "accuracy" for t in built):
        notes.append("No labelled tiles (classification labels) in any slide: accuracy is left out.")
    with atomic_dir(out, _check_out) as tmp:
        for sub in ("tables", "figures/tv_per_layer", "figures/overview"):
            (tmp / sub).mkdir(parents=True)
        for table in built:
            table.data.to_csv(tmp / "tables" / f"{table.name}.csv", index=False)
            (tmp / "tables" / f"{table.name}.md").write_text(table.markdown())
        figures: dict[str, list[tuple[str, str]]] = {"tv_per_layer": [], "overview": []}
        tv = next(t for t in built if t.name == "tv").data
        for (dataset, model), layers in collected.layers.items():
            sel = tv[(tv["dataset"] == dataset) & (tv["model"] == model)]
            if sel.empty:
                continue
            caption = f"{dataset} / {model}" if dataset else model
            stem = f"figures/tv_per_layer/{_slug(dataset, model)}"
            _save(tv_per_layer_figure(sel, layers, collected.attributions, f"TV per layer: {caption}"),
                  tmp / stem, settings.dpi)  # fmt: skip
            figures["tv_per_layer"].append((stem, caption))
        per_slide = next(t for t in built if t.name == "tv_per_slide").data
        for container in heatmaps:  # one at a time: a thousand slides never sit in memory together
            overview = read_overview(container, settings.thumbnail_px)
            pair = _dataset_of(overview, collected)
            dataset, model = pair if pair else (overview.path.resolve().parent.parent.name, "")
            rows = per_slide[(per_slide["slide_id"] == overview.slide_id) & (per_slide["dataset"] == dataset)]
            values = {
                (m, a, layer): v
                for m, a, layer, v in rows[["method", "attribution", "layer", "mean"]].itertuples(index=False)
            }
            caption = f"{dataset} / {overview.slide_id}" if dataset else overview.slide_id
            fig = overview_figure(
                overview, settings, layers=collected.layers.get(pair, []) if pair else [],
                attributions=collected.attributions, tv=values, title=f"{caption} ({overview.path.name})",
            )  # fmt: skip
            stem = f"figures/overview/{_slug(dataset, overview.slide_id)}"
            _save(fig, tmp / stem, settings.dpi)
            figures["overview"].append((stem, caption))
        (tmp / "index.html").write_text(_index_html(settings, collected, built, figures, notes))
    return ReportResult(
        out,
        [f"tables/{t.name}.csv" for t in built],
        [f"{stem}.png" for group in figures.values() for stem, _ in group],
        notes,
    )


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
table.results { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
table.results th, table.results td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
table.results td { white-space: nowrap; }
table.results th { background: #f3f3f3; text-align: center; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
.note { color: #555; font-size: 0.9em; } .files a { margin-right: 0.8em; }
"""


def _link(path: str, text: str) -> str:
    return f'<a href="{html.escape(quote(path))}">{html.escape(text)}</a>'


def _table_section(table: Table, level: int = 2) -> str:
    files = " ".join(_link(f"tables/{table.name}.{ext}", ext.upper()) for ext in ("csv", "md"))
    return (
        f'<h{level} id="{table.name}">{html.escape(table.title)}</h{level}>\n'
        f'<p class="note">{html.escape(table.note)} <span class="files">{files}</span></p>\n{table.html()}\n'
    )


def _figure(stem: str, caption: str) -> str:
    return (
        f'<figure><img src="{html.escape(quote(stem + ".png"))}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)} — {_link(stem + '.png', 'PNG')} {_link(stem + '.svg', 'SVG')}"
        "</figcaption></figure>"
    )


def _index_html(
    settings: ReportSettings,
    collected: Collected,
    tables: list[Table],
    figures: dict[str, list[tuple[str, str]]],
    notes: list[str],
) -> str:
    by_name = {t.name: t for t in tables}
    tiles = collected.tiles
    slides = tiles[["dataset", "model", "slide_id"]].drop_duplicates()
    summary = (
        f"{len(slides)} slide(s) in {slides[['dataset', 'model']].drop_duplicates().shape[0]} dataset/model "
        f"pair(s), {len(tiles)} per-tile table(s), methods: "
        + ", ".join(METHOD_NAMES.get(m, m) for m in _ordered(tiles["method"], METHOD_ORDER))
    )
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(settings.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(settings.title)}</h1>",
        f"<p>{html.escape(summary)}.</p>",
        *(f'<p class="note">{html.escape(n)}</p>' for n in notes),
    ]
    for name in ("tv", "tv_reduction"):
        if name in by_name:
            parts.append(_table_section(by_name[name]))
    if figures["tv_per_layer"]:
        parts.append('<h2 id="tv_per_layer">TV per layer</h2>')
        parts.append(
            '<p class="note">Mean TV over tiles (band: ± std) at every evaluated layer, in forward order '
            "(the paper's Figure 4).</p>"
        )
        parts.extend(_figure(stem, caption) for stem, caption in figures["tv_per_layer"])
    for name in ("prediction_difference", "accuracy", "inputs"):
        if name in by_name:
            parts.append(_table_section(by_name[name]))
    per_slide = [
        by_name[n]
        for n in ("tv_per_slide", "prediction_difference_per_slide", "accuracy_per_slide")
        if n in by_name
    ]
    if per_slide:
        parts.append('<h2 id="per_slide">Per slide</h2>')
        parts.extend(
            f"<details><summary>{html.escape(t.title)}</summary>{_table_section(t, 3)}</details>"
            for t in per_slide
        )
    if figures["overview"]:
        parts.append('<h2 id="overview">Slide overviews</h2>')
        parts.append(
            f'<p class="note">Tissue, then each method\'s heatmap at each layer over it (opacity '
            f"{settings.alpha}); one colour scale per row: ± the {settings.percentile:g}th percentile of "
            "|value| over its methods.</p>"
        )
        parts.extend(_figure(stem, caption) for stem, caption in figures["overview"])
    parts.append("</body></html>\n")
    return "\n".join(parts)
