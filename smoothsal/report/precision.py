"""The report's precision section: the arithmetic each slide's maps were computed in (as resolved from
``auto`` on the machine that ran the job), datasets that mix precisions, and each low-precision run's
own check against fp32 (`saliency.CHECK_TILES` tiles) with the cells that miss the library's gates."""

from __future__ import annotations

import pandas as pd

from ..deviation import GATES
from ..store import results_meta
from .tables import Collected, Table, display_labels

__all__ = ["precision_section"]

_KEYS = ["dataset", "model", "slide_id", "method"]


def _runs(collected: Collected) -> pd.DataFrame:
    """One row per per-tile table: its keys, resolved and requested precision, device, native bf16."""
    rows = []
    for row in collected.tiles.itertuples(index=False):
        meta = results_meta(row.file)
        hardware = meta.get("hardware") or {}
        settings = meta.get("settings") or {}
        rows.append(
            {
                **{k: getattr(row, k) for k in _KEYS},
                "precision": str(settings.get("precision", "")) or "unrecorded",
                "requested": str(meta.get("precision_requested", settings.get("precision", ""))),
                "device": str(hardware.get("model", "unrecorded")),
                "native_bf16": hardware.get("native_bf16"),
                "check": meta.get("precision_check"),
            }
        )
    return pd.DataFrame(rows, columns=[*_KEYS, "precision", "requested", "device", "native_bf16", "check"])


def _mixed_notes(runs: pd.DataFrame) -> list[str]:
    """One line per dataset/model whose slides were computed in more than one precision."""
    notes = []
    for (dataset, model), group in runs.groupby(["dataset", "model"], sort=False):
        counts = group.drop_duplicates(["slide_id", "precision"])["precision"].value_counts()
        if len(counts) > 1:
            mix = ", ".join(f"{p}: {n} slide(s)" for p, n in counts.items())
            where = f"{dataset} / {model}" if dataset else model
            notes.append(
                f"{where} mixes precisions ({mix}; see the precision table): its slides' maps and TV differ "
                "by that arithmetic too; on a cluster of mixed CPUs set saliency.precision to fp32 or bf16 "
                "instead of auto."
            )
    return notes


def _native(value: object) -> str:
    return "–" if value is None else ("yes" if value else "no")


def _precision_table(runs: pd.DataFrame) -> Table:
    data = runs.drop(columns="check")
    cells = data.set_index(_KEYS).assign(native_bf16=data["native_bf16"].map(_native).to_numpy())
    cells = cells.rename(columns={"native_bf16": "native bf16"}).astype(str)
    note = (
        "The arithmetic each per-tile table was computed in (requested: as configured; auto resolves to bf16 "
        "where the device has native bf16, else fp32) and the device that ran it."
    )
    return Table("precision", "Precision per slide", data, display_labels(cells), None, note)


def _check_table(runs: pd.DataFrame) -> Table | None:
    rows = []
    for run in runs.itertuples(index=False):
        for cell in (run.check or {}).get("cells", []):
            rows.append(
                {k: getattr(run, k) for k in _KEYS}
                | {"precision": run.precision, "tiles": run.check.get("tiles")}
                | {k: cell[k] for k in ("attribution", "layer", "cosine_median", "cosine_min")}
                | {k: cell[k] for k in ("relative_error_median", "tv_change")}
                | {"missed": "; ".join(cell.get("missed") or [])}
            )
    if not rows:
        return None
    data = pd.DataFrame(rows)
    shown = data.set_index([*_KEYS, "attribution", "layer"])
    cells = pd.DataFrame(
        {
            "precision": shown["precision"].astype(str),
            "cosine median (min)": [
                f"{m:.4f} ({n:.4f})" for m, n in zip(shown["cosine_median"], shown["cosine_min"], strict=True)
            ],
            "relative error median": shown["relative_error_median"].map("{:.4f}".format),
            "TV change": shown["tv_change"].map("{:+.2%}".format),
            "gates": ["✗ " + m if m else "✓" for m in shown["missed"]],
        },
        index=shown.index,
    )
    marked = pd.DataFrame(False, index=cells.index, columns=cells.columns)
    marked["gates"] = (shown["missed"] != "").to_numpy()
    note = (
        f"Each bf16/tf32 job computes its first tiles in fp32 too; per attribution and layer, the deviation of "
        f"its channel-summed maps from fp32 against the gates (centred cosine median ≥ {GATES.cosine_median}, "
        f"min ≥ {GATES.cosine_min}; mean TV within ±{GATES.tv_change:.0%}; DeepLift relative error median ≤ "
        f"{GATES.deeplift_relative_error}). ✗ marks a cell that misses one: read those maps with care."
    )
    return Table(
        "precision_check",
        "Low-precision check against fp32",
        data,
        display_labels(cells),
        display_labels(marked),
        note,
    )


def precision_section(collected: Collected) -> tuple[list[Table], list[str]]:
    """The per-slide precision table, the low-precision check table when any run made one, and a note per
    dataset that mixes precisions (each table's metadata read once)."""
    runs = _runs(collected)
    check = _check_table(runs)
    return [_precision_table(runs), *([check] if check is not None else [])], _mixed_notes(runs)
