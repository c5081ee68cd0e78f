"""What the report refuses to mix, and the slides it can only mention: the per-tile tables of one slide
must come from one tile set and one set of saliency settings (only the method may differ), and a slide
without tissue (0 tiles) gets a line in the report instead of rows in its tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadTable
from ..store import SHARED_SETTINGS, results_meta

__all__ = ["EmptySlide", "SlideRuns"]


@dataclass(frozen=True)
class EmptySlide:
    """A slide whose per-tile table has no tiles (no tissue was found)."""

    dataset: str
    slide_id: str
    method: str
    file: Path


def _run_key(meta: dict[str, Any]) -> dict[str, Any]:
    settings = meta.get("settings") or {}
    return {"tile set (tiles_sha256)": meta.get("tiles_sha256"), "tile count": meta.get("n_tiles")} | {
        key: settings[key] for key in SHARED_SETTINGS if key in settings and key != "dataset"
    }


@dataclass
class SlideRuns:
    """The first per-tile table seen of each (dataset, slide) and its run's key; tables without the
    saliency metadata (hand-made) are not compared."""

    first: dict[tuple[str, str], tuple[Path, dict[str, Any]]] = field(default_factory=dict)
    empty: list[EmptySlide] = field(default_factory=list)

    def add(self, path: Path, dataset: str, slide_id: str, method: str, n_rows: int) -> None:
        """One per-tile table (of one slide and method); empty strings: take them from its metadata."""
        meta = results_meta(path)
        dataset = dataset or str((meta.get("settings") or {}).get("dataset") or "")
        slide_id = slide_id or str(meta.get("slide_id") or path.parent.name)
        if n_rows == 0:
            self.empty.append(EmptySlide(dataset, slide_id, method or str(meta.get("method", "")), path))
        if not meta:
            return
        key = (dataset, slide_id)
        mine = _run_key(meta)
        if key not in self.first:
            self.first[key] = (path, mine)
            return
        other, theirs = self.first[key]
        for name, value in mine.items():
            if name in theirs and theirs[name] != value:
                raise BadTable(
                    f"{path} and {other}: slide {key[1]} with different {name} ({value!r} vs "
                    f"{theirs[name]!r}); compute every method's saliency of a slide on the same tiles with "
                    "the same settings, or report them separately"
                )
