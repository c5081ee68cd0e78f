"""`smoothsal report`: the paper's tables and figures for your model over every slide's per-tile
tables, per-slide breakdowns, per-slide overview figures and one ``index.html``.

`tables` (reading and aggregating the per-tile tables), `figures`, `html`; this module writes them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from ..errors import BadOption
from ..faithfulness_tables import read_faithfulness
from ..files import OutputKind, output_dir
from .checkerboard import checkerboard_table
from .faithfulness import faithfulness_section
from .figures import Overview, Raster, overview_figure, read_overview, tv_per_layer_figure
from .fit import fit_path_table, fit_table, loss_curve_figure, read_fits
from .html import faithfulness_html, index_html
from .precision import precision_section
from .seams import read_seams, seam_figure, seam_table
from .tables import Collected, Table, collect, pool, report_tables

__all__ = [
    "Collected",
    "Overview",
    "Raster",
    "ReportResult",
    "ReportSettings",
    "Table",
    "collect",
    "overview_figure",
    "pool",
    "read_overview",
    "report_tables",
    "tv_per_layer_figure",
    "write_report",
]


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
            raise BadOption(f"--percentile must lie in [50, 100], got {self.percentile}")
        if not 0 < self.alpha <= 1:
            raise BadOption(f"--alpha must lie in (0, 1], got {self.alpha}")
        if self.thumbnail_px < 16:
            raise BadOption(f"--thumbnail-px must be at least 16, got {self.thumbnail_px}")


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


KIND = OutputKind(  # the output marker (`files` module doc) and the files a report holds
    "report",
    "smoothsal report",
    format=1,
    files=r"index\.html|tables/[^/]+\.(?:csv|md)|figures/[^/]+/[^/]+\.(?:png|svg)",
)


@dataclass(frozen=True)
class ReportResult:
    """Where the report went and what it holds (paths relative to ``out``)."""

    out: Path
    tables: list[str]
    figures: list[str]
    notes: list[str]


def _tables(collected: Collected) -> tuple[list[Table], list[str]]:
    """The tables in reading order, the checkerboard share beside TV, and the precision section's notes."""
    precision_tables, notes = precision_section(collected)
    built = report_tables(collected)
    names = [t.name for t in built]
    after_tv = names.index("tv_reduction" if "tv_reduction" in names else "tv") + 1
    return built[:after_tv] + [checkerboard_table(collected)] + built[after_tv:] + precision_tables, notes


def write_report(
    tables: Sequence[str | Path],
    out: str | Path,
    heatmaps: Sequence[str | Path] = (),
    settings: ReportSettings = ReportSettings(),
    seams: Sequence[str | Path] = (),
    faithfulness: Sequence[str | Path] = (),
    randomisation: Sequence[str | Path] = (),
    surrogates: Sequence[str | Path] = (),
) -> ReportResult:
    """Tables (CSV + Markdown), figures (PNG + SVG) and ``index.html`` under ``out``, written atomically.

    ``seams``: tables of `smoothsal seams` (the seam table and figures); ``faithfulness`` /
    ``randomisation``: the tables of `smoothsal faithfulness` (none: the report says the stage was not run);
    ``surrogates``: surrogate files (``results/{dataset}/surrogate.pt``) for the "Surrogate fit" section."""
    out = Path(out)
    collected = collect(tables)
    built, notes = _tables(collected)
    fits = read_fits(surrogates)
    if fits:
        built += [fit_table(fits), fit_path_table(fits)]
    seam_rows = read_seams(seams)
    if not seam_rows.empty:
        built.append(seam_table(seam_rows))
    faith = faithfulness_section(
        read_faithfulness(faithfulness, randomisation) if faithfulness else None, _slug
    )
    built = built + faith.tables
    if not any(t.name == "accuracy" for t in built):
        notes.append("No labelled tiles (classification labels) in any slide: accuracy is left out.")
    for slide in dict.fromkeys((e.dataset, e.slide_id) for e in collected.empty):
        where = f"{slide[0]} / {slide[1]}" if slide[0] else slide[1]
        notes.append(f"{where}: no tissue (0 tiles); left out of the tables and figures.")
    with output_dir(out, KIND) as tmp:
        for sub in ("tables", "tv_per_layer", "overview", "surrogate_fit", "seams", "faithfulness"):
            (tmp / (sub if sub == "tables" else f"figures/{sub}")).mkdir(parents=True)
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
            if not overview.heatmaps:  # a slide without tissue: its note says so
                continue
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
        figures |= _section_figures(tmp, fits, seam_rows, faith, settings)
        sections = [faithfulness_html(faith)]
        (tmp / "index.html").write_text(index_html(settings, collected, built, figures, notes, sections))
    return ReportResult(
        out,
        [f"tables/{t.name}.csv" for t in built],
        [f"{stem}.png" for group in figures.values() for stem, _ in group],
        notes,
    )


def _section_figures(
    tmp: Path, fits: list, seam_rows, faith, settings: ReportSettings
) -> dict[str, list[tuple[str, str]]]:
    """The surrogate fit, seam and faithfulness sections' figures, saved under ``tmp``: (stem, caption)."""
    losses = []
    for entry in fits:  # train/validation loss curves, one figure per surrogate
        stem = f"figures/surrogate_fit/{_slug(entry.dataset, entry.model)}_losses"
        _save(loss_curve_figure(entry), tmp / stem, settings.dpi)
        losses.append((stem, f"{entry.dataset} / {entry.model}"))
    seams = []
    for slide_id, rows in seam_rows.groupby("slide_id", sort=False) if not seam_rows.empty else ():
        stem = f"figures/seams/{_slug(str(slide_id))}"
        _save(seam_figure(rows, settings), tmp / stem, settings.dpi)
        seams.append((stem, f"{slide_id}: layer1 without and with overlap + window blending"))
    for stem, _, fig in faith.figures:
        _save(fig, tmp / stem, settings.dpi)
    return {
        "surrogate_fit": losses,
        "seams": seams,
        "faithfulness": [(stem, caption) for stem, caption, _ in faith.figures],
    }
