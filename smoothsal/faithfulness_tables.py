"""The faithfulness stage's output, written and read only here: two long Parquet tables per slide × method.

``{method}.parquet``: one row per sampled tile × attribution × layer (``FAITHFULNESS_COLUMNS``: the AUCs
of the map's and the random order's deletion/insertion curves, the curves themselves as lists, relevance
mass, NaN where not defined). ``{method}.randomisation.parquet``: one row per tile × attribution × layer
× cascade step (``RANDOMISATION_COLUMNS``). Both carry the job's ``meta`` (settings, store, fractions) as
JSON under ``smoothsal`` in the schema metadata.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import BadTable, MissingInput, one_line
from .files import atomic_path

__all__ = [
    "FAITHFULNESS_COLUMNS",
    "RANDOMISATION_COLUMNS",
    "Faithfulness",
    "read_faithfulness",
    "write_faithfulness",
]

KEY_COLUMNS = ("dataset", "slide_id", "method", "arch", "tile", "attribution", "layer")
FAITHFULNESS_COLUMNS = (
    *KEY_COLUMNS, "target", "label", "deletion_auc", "insertion_auc", "deletion_auc_random",
    "insertion_auc_random", "relevance_mass", "target_fraction", "region", "deletion_curve",
    "insertion_curve", "deletion_curve_random", "insertion_curve_random",
)  # fmt: skip
RANDOMISATION_COLUMNS = (*KEY_COLUMNS, "step", "randomised", "spearman")
FIX = "give the tables `smoothsal faithfulness` writes (--out and --randomisation-out)"
_TYPES = {"tile": "int64", "target": "int64", "label": "int64", "step": "int64"}
_TEXT = ("dataset", "slide_id", "method", "arch", "attribution", "layer", "region", "randomised")


def _frame(
    rows: Sequence[Mapping[str, Any]], common: Mapping[str, Any], columns: Sequence[str]
) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in columns})
    frame = pd.DataFrame(list(rows)).assign(**common)
    return frame[list(columns)]


def _dtype(column: str) -> str:
    if column in _TYPES:
        return _TYPES[column]
    return "object" if column in _TEXT or column.endswith("_curve") or "_curve_" in column else "float64"


def _write(frame: pd.DataFrame, path: Path, meta: Mapping[str, Any]) -> None:
    arrow = pa.Table.from_pandas(frame, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), b"smoothsal": json.dumps(meta)})
    with atomic_path(path) as tmp:
        pq.write_table(arrow, tmp)


def write_faithfulness(
    rows: Sequence[Mapping[str, Any]],
    randomisation: Sequence[Mapping[str, Any]],
    common: Mapping[str, Any],
    out: str | Path,
    randomisation_out: str | Path,
    meta: Mapping[str, Any],
) -> None:
    """Both tables, each written atomically; ``common`` (dataset, slide, method, arch) goes into every row."""
    _write(_frame(rows, common, FAITHFULNESS_COLUMNS), Path(out), {**meta, "table": "faithfulness"})
    _write(
        _frame(randomisation, common, RANDOMISATION_COLUMNS),
        Path(randomisation_out),
        {**meta, "table": "randomisation"},
    )


@dataclass(frozen=True)
class Faithfulness:
    """Every given table, concatenated: per-tile rows, randomisation rows, and each file's ``meta``."""

    tiles: pd.DataFrame
    randomisation: pd.DataFrame
    meta: list[dict[str, Any]]


def _read(path: Path, kind: str, columns: Sequence[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    if not path.is_file():
        raise MissingInput(f"{path}: faithfulness table not found; run `smoothsal faithfulness` first")
    try:
        schema = pq.read_schema(path)
        frame = pd.read_parquet(path)
    except (OSError, pa.ArrowException) as err:
        raise BadTable(f"{path}: not a readable Parquet table ({one_line(err)}); {FIX}") from err
    raw = (schema.metadata or {}).get(b"smoothsal")
    meta = json.loads(raw) if raw else {}
    missing = [c for c in columns if c not in frame]
    if meta.get("table") != kind or missing:
        what = f"missing columns {', '.join(missing)}" if missing else f"not a {kind} table"
        raise BadTable(f"{path}: {what}; {FIX}")
    return frame, meta


def read_faithfulness(tables: Sequence[str | Path], randomisation: Sequence[str | Path] = ()) -> Faithfulness:
    """The per-tile tables and randomisation tables of any number of slides and methods."""
    parts = [_read(Path(p), "faithfulness", FAITHFULNESS_COLUMNS) for p in tables]
    random_parts = [_read(Path(p), "randomisation", RANDOMISATION_COLUMNS) for p in randomisation]

    def concat(frames: list[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else _frame([], {}, columns)

    return Faithfulness(
        concat([f for f, _ in parts], FAITHFULNESS_COLUMNS),
        concat([f for f, _ in random_parts], RANDOMISATION_COLUMNS),
        [m for _, m in parts],
    )
