"""The report's ``index.html``: every table and figure on one self-contained page (opens offline)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote

from ..smoothing import METHODS
from .faithfulness import FaithfulnessSection, section_html
from .tables import Collected, Table, method_label, ordered

if TYPE_CHECKING:
    from . import ReportSettings

__all__ = ["faithfulness_html", "index_html"]


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


def index_html(
    settings: ReportSettings,
    collected: Collected,
    tables: list[Table],
    figures: dict[str, list[tuple[str, str]]],
    notes: list[str],
    sections: Sequence[str] = (),
) -> str:
    by_name = {t.name: t for t in tables}
    tiles = collected.tiles
    slides = tiles[["dataset", "model", "slide_id"]].drop_duplicates()
    summary = (
        f"{len(slides)} slide(s) in {slides[['dataset', 'model']].drop_duplicates().shape[0]} dataset/model "
        f"pair(s), {len(tiles)} per-tile table(s), methods: "
        + ", ".join(method_label(m) for m in ordered(tiles["method"], METHODS))
    )
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(settings.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(settings.title)}</h1>",
        f"<p>{html.escape(summary)}.</p>",
        *(f'<p class="note">{html.escape(n)}</p>' for n in notes),
    ]
    for name in ("tv", "tv_reduction", "checkerboard", "precision_check"):
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
    if "surrogate_fit" in by_name:  # issue 14: the surrogate fit section
        parts.append(_table_section(by_name["surrogate_fit"]))
        if "surrogate_fit_paths" in by_name:
            t = by_name["surrogate_fit_paths"]
            parts.append(
                f"<details><summary>{html.escape(t.title)}</summary>{_table_section(t, 3)}</details>"
            )
        parts.extend(
            _figure(stem, f"Surrogate loss per epoch: {caption}")
            for stem, caption in figures.get("surrogate_fit", [])
        )
    per_slide = [
        by_name[n]
        for n in ("tv_per_slide", "prediction_difference_per_slide", "accuracy_per_slide", "precision")
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
    if "seams" in by_name:
        parts.append(_table_section(by_name["seams"]))
        parts.extend(_figure(stem, caption) for stem, caption in figures.get("seams", []))
    parts.extend(sections)  # later sections (faithfulness), each its own module's HTML
    parts.append("</body></html>\n")
    return "\n".join(parts)


def faithfulness_html(section: FaithfulnessSection) -> str:
    """The faithfulness section (issue 15) with this module's table and figure markup."""
    return section_html(section, _table_section, _figure)
