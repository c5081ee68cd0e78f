"""The report's faithfulness section: do a method's maps explain the ORIGINAL model?

From the tables of `smoothsal faithfulness` (`faithfulness_tables`): per dataset/model × method ×
attribution × layer the mean deletion AUC (lower = more faithful) and insertion AUC (higher = more
faithful), their gap to the random pixel order, their difference to the original method's maps on the
same tiles, each with a 95 % percentile bootstrap interval over tiles; the Spearman correlation at full
randomisation; relevance mass. Figures: mean deletion/insertion curves per layer, randomisation curves.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..faithfulness_tables import Faithfulness
from ..metrics import bootstrap_mean_ci
from ..smoothing import METHODS, method_info
from .tables import ATTRIBUTION_NAMES, Table, label_of, method_label, ordered

__all__ = ["FaithfulnessSection", "faithfulness_section"]

GROUP = ["dataset", "model", "method", "attribution", "layer"]
PAIR = ["dataset", "model", "slide_id", "tile", "attribution", "layer"]
NOT_RUN = (
    "Faithfulness was not run: no `smoothsal faithfulness` tables were given (in the workflow: config "
    "faithfulness: enabled: false)."
)
NOTE = (
    "Deletion / insertion on the original model, whatever method made the map: AUC of the target "
    "probability as the map's highest pixels are removed (replaced by the blurred tile) or inserted. "
    "Deletion: lower = more faithful; insertion: higher. 'vs random' = method − random pixel order, "
    "'vs original' = method − the original method's maps on the same tiles; [95 % bootstrap interval over "
    "tiles]. An interval that excludes 0 is a difference. ρ: Spearman correlation of |map| with the "
    "intact model's after the whole cascade is re-initialised (near 0 = the map depends on the weights). "
    "Relevance mass: share of the positive map in the annotated target region (tiles with 10–90 % of it)."
)


@dataclass(frozen=True)
class FaithfulnessSection:
    """The section's tables, figures ((stem, caption, figure)) and its HTML (figures linked by stem)."""

    tables: list[Table]
    figures: list[tuple[str, str, Figure]] = field(default_factory=list)
    note: str = ""


def _ci(values: pd.Series) -> tuple[float, float, float]:
    return bootstrap_mean_ci(np.array(values, dtype=float))  # a writable copy


def _cell(mean: float, low: float, high: float, decimals: int = 3) -> str:
    if np.isnan(mean):
        return "–"
    return f"{mean:+.{decimals}f} [{low:+.{decimals}f}, {high:+.{decimals}f}]"


def _paired(tiles: pd.DataFrame) -> pd.DataFrame:
    """Each row with the original method's AUCs on the same tile, attribution and layer (NaN without)."""
    original = tiles[tiles["method"] == "original"][[*PAIR, "deletion_auc", "insertion_auc"]]
    original = original.rename(columns={"deletion_auc": "del_orig", "insertion_auc": "ins_orig"})
    return tiles.merge(original, on=PAIR, how="left")


def _final_spearman(randomisation: pd.DataFrame) -> pd.DataFrame:
    if randomisation.empty:
        return pd.DataFrame(columns=[*GROUP, "spearman_full"])
    last = randomisation.groupby([*GROUP, "slide_id", "tile"])["step"].transform("max")
    final = randomisation[randomisation["step"] == last]
    return final.groupby(GROUP, sort=False)["spearman"].mean().rename("spearman_full").reset_index()


def _summary(tiles: pd.DataFrame, randomisation: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for key, g in _paired(tiles).groupby(GROUP, sort=False):
        row = dict(zip(GROUP, key, strict=True)) | {"tiles": len(g)}
        for what in ("deletion", "insertion"):
            row[f"{what}_auc"] = float(g[f"{what}_auc"].mean())
            row[f"{what}_auc_random"] = float(g[f"{what}_auc_random"].mean())
            gap = _ci(g[f"{what}_auc"] - g[f"{what}_auc_random"])
            row |= {
                f"{what}_vs_random": gap[0],
                f"{what}_vs_random_low": gap[1],
                f"{what}_vs_random_high": gap[2],
            }
            short = what[:3]
            diff = _ci(g[f"{what}_auc"] - g[f"{short}_orig"]) if key[2] != "original" else (np.nan,) * 3
            row |= {f"{what}_vs_original": diff[0], f"{what}_vs_original_low": diff[1],
                    f"{what}_vs_original_high": diff[2]}  # fmt: skip
        mass = g["relevance_mass"].dropna()
        row |= {"relevance_mass": float(mass.mean()) if len(mass) else np.nan, "relevance_tiles": len(mass)}
        rows.append(row)
    data = pd.DataFrame(rows)
    if data.empty:
        return data
    data = data.merge(_final_spearman(randomisation), on=GROUP, how="left")
    order = {m: i for i, m in enumerate(METHODS)}
    attr = {a: i for i, a in enumerate(ATTRIBUTION_NAMES)}
    return data.sort_values(
        ["dataset", "model", "method", "attribution"],
        key=lambda c: c.map(order) if c.name == "method" else (c.map(attr) if c.name == "attribution" else c),
        kind="stable",
    ).reset_index(drop=True)


def _cells(data: pd.DataFrame) -> pd.DataFrame:
    cells = pd.DataFrame(
        {
            "tiles": data["tiles"].astype(str),
            "deletion AUC ↓": data["deletion_auc"].map("{:.3f}".format),
            "vs random": [_cell(*r) for r in data[["deletion_vs_random", "deletion_vs_random_low", "deletion_vs_random_high"]].to_numpy()],
            "vs original": [_cell(*r) for r in data[["deletion_vs_original", "deletion_vs_original_low", "deletion_vs_original_high"]].to_numpy()],
            "insertion AUC ↑": data["insertion_auc"].map("{:.3f}".format),
            "vs random ": [_cell(*r) for r in data[["insertion_vs_random", "insertion_vs_random_low", "insertion_vs_random_high"]].to_numpy()],
            "vs original ": [_cell(*r) for r in data[["insertion_vs_original", "insertion_vs_original_low", "insertion_vs_original_high"]].to_numpy()],
            "ρ full randomisation": data["spearman_full"].map(lambda v: "–" if pd.isna(v) else f"{v:.2f}"),
            "relevance mass": data["relevance_mass"].map(lambda v: "–" if pd.isna(v) else f"{v:.2f}"),
        }
    )  # fmt: skip
    cells.index = pd.MultiIndex.from_frame(
        data[GROUP].map(label_of).rename(columns=str.capitalize), names=[c.capitalize() for c in GROUP]
    )
    return cells


def _randomisation_table(randomisation: pd.DataFrame) -> Table | None:
    if randomisation.empty:
        return None
    keys = [*GROUP, "step", "randomised"]
    rows = []
    for key, g in randomisation.groupby(keys, sort=False):
        mean, low, high = _ci(g["spearman"])
        rows.append(
            dict(zip(keys, key, strict=True)) | {"tiles": len(g), "spearman": mean, "low": low, "high": high}
        )
    data = pd.DataFrame(rows)
    cells = pd.DataFrame({"tiles": data["tiles"].astype(str),
                          "ρ": [_cell(*r, decimals=2) for r in data[["spearman", "low", "high"]].to_numpy()]})  # fmt: skip
    cells.index = pd.MultiIndex.from_frame(data[keys].map(label_of).astype(str))
    return Table("faithfulness_randomisation", "Faithfulness: cascading model randomisation", data, cells,
                 note="Spearman ρ of |map| with the intact model's map after each cascade step "
                      "(head first, then stages or blocks from the output side in); mean [95 % bootstrap].")  # fmt: skip


def _colour(method: str) -> str | None:
    return method_info(method).colour if method in METHODS else None


def _curves_figure(
    tiles: pd.DataFrame, layers: Sequence[str], fractions: Sequence[float], title: str
) -> Figure:
    attributions = ordered(tiles["attribution"], tuple(ATTRIBUTION_NAMES))
    fig = Figure(figsize=(1.0 + 3.4 * len(layers), 1.0 + 2.8 * len(attributions)), layout="constrained")
    axes = fig.subplots(len(attributions), len(layers), squeeze=False)
    x = np.asarray(fractions)
    for i, attribution in enumerate(attributions):
        for j, layer in enumerate(layers):
            ax, sel = axes[i, j], tiles[(tiles["attribution"] == attribution) & (tiles["layer"] == layer)]
            for method in ordered(sel["method"], METHODS):
                m = sel[sel["method"] == method]
                for what, style in (("deletion", "-"), ("insertion", "--")):
                    curve = np.mean(np.stack(m[f"{what}_curve"].to_numpy()), axis=0)
                    ax.plot(x, curve, style, color=_colour(method), label=f"{method_label(method)} {what}")
            if len(sel):
                first = sel[sel["method"] == sel["method"].iloc[0]]
                for what, style in (("deletion", "-"), ("insertion", "--")):
                    curve = np.mean(np.stack(first[f"{what}_curve_random"].to_numpy()), axis=0)
                    ax.plot(x, curve, style, color="0.6", lw=1, label=f"random {what}")
            ax.set_title(f"{label_of(attribution)} · {layer}", fontsize=9)
            ax.set_xlabel("fraction of pixels removed / inserted")
            ax.set_ylabel("target probability")
            ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    return fig


def _randomisation_figure(summary: pd.DataFrame, layers: Sequence[str], title: str) -> Figure:
    attributions = ordered(summary["attribution"], tuple(ATTRIBUTION_NAMES))
    fig = Figure(figsize=(1.0 + 3.4 * len(layers), 1.0 + 2.8 * len(attributions)), layout="constrained")
    axes = fig.subplots(len(attributions), len(layers), squeeze=False)
    for i, attribution in enumerate(attributions):
        for j, layer in enumerate(layers):
            ax = axes[i, j]
            sel = summary[(summary["attribution"] == attribution) & (summary["layer"] == layer)]
            for method in ordered(sel["method"], METHODS):
                m = sel[sel["method"] == method].sort_values("step")
                ax.plot(
                    m["step"],
                    m["spearman"],
                    marker="o",
                    ms=3,
                    color=_colour(method),
                    label=method_label(method),
                )
                ax.set_xticks(m["step"], m["randomised"], rotation=45, ha="right", fontsize=7)
            ax.set_ylim(-0.2, 1.05)
            ax.axhline(0, color="0.6", lw=0.8)
            ax.set_title(f"{label_of(attribution)} · {layer}", fontsize=9)
            ax.set_ylabel("Spearman ρ of |map|")
            ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def faithfulness_section(data: Faithfulness | None, slug) -> FaithfulnessSection:
    """Tables and figures of the section; ``slug(dataset, model)`` names a figure's file."""
    if data is None or data.tiles.empty:
        return FaithfulnessSection([], [], NOT_RUN if data is None else "Faithfulness: no sampled tiles.")
    tiles = data.tiles.rename(columns={"arch": "model"})
    randomisation = data.randomisation.rename(columns={"arch": "model"})
    summary = _summary(tiles, randomisation)
    tables = [Table("faithfulness", "Faithfulness: deletion and insertion on the original model", summary,
                    _cells(summary), note=NOTE)]  # fmt: skip
    random_table = _randomisation_table(randomisation)
    if random_table is not None:
        tables.append(random_table)
    figures = []
    fractions = {
        (m.get("dataset", ""), m.get("arch", "")): m["fractions"] for m in data.meta if "fractions" in m
    }
    for (dataset, model), g in tiles.groupby(["dataset", "model"], sort=False):
        layers = list(dict.fromkeys(g["layer"]))
        caption = f"{dataset} / {model}" if dataset else model
        steps = len(g["deletion_curve"].iloc[0])
        x = fractions.get((dataset, model)) or list(np.linspace(0, 1, steps))
        stem = f"figures/faithfulness/curves_{slug(dataset, model)}"
        figures.append(
            (stem, f"Deletion / insertion curves: {caption}", _curves_figure(g, layers, x, caption))
        )
        if random_table is not None:
            r = random_table.data
            sel = r[(r["dataset"] == dataset) & (r["model"] == model)]
            if len(sel):
                stem = f"figures/faithfulness/randomisation_{slug(dataset, model)}"
                fig = _randomisation_figure(sel, layers, f"Randomisation: {caption}")
                figures.append((stem, f"Cascading randomisation: {caption}", fig))
    return FaithfulnessSection(tables, figures)


def section_html(section: FaithfulnessSection, table_html, figure_html) -> str:
    """The section as HTML: ``table_html(table)`` and ``figure_html(stem, caption)`` from `html`."""
    parts = ['<h2 id="faithfulness">Faithfulness</h2>']
    if section.note:
        parts.append(f'<p class="note">{html.escape(section.note)}</p>')
    parts += [table_html(t) for t in section.tables]
    parts += [figure_html(stem, caption) for stem, caption, _ in section.figures]
    return "\n".join(parts)
