"""The report's "Surrogate fit" section (issue 14): how each dataset's surrogate training ended and how
well the kept paths reproduce the original model on the held-out validation tiles, read from the
surrogate files (their fit record and per-epoch loss log), and a train/validation loss-curve figure.

A surrogate file's dataset is the folder it lies in (the workflow writes ``results/{dataset}/surrogate.pt``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from ..surrogate import read_surrogate
from ..surrogate_fit import SurrogateFit
from .tables import Table

__all__ = ["FitEntry", "fit_path_table", "fit_table", "loss_curve_figure", "read_fits"]

_STOP = {
    "converged": "converged (patience)",
    "max_epochs": "epoch cap reached (not converged)",
    "fixed_epochs": "fixed epoch count",
}
_NOTE = (
    "How surrogate training ended and how well the kept paths fit, on the validation tiles held out of "
    "the train split: L1 = Σ over paths of mean |surrogate path − conv|, relative L1 = a path's L1 / mean "
    "|conv output| (worst path shown; per path in surrogate_fit_paths); prediction difference ×100 "
    "(softmax, mean ± std over tiles) of the model with every path in place against the original; "
    "agreement: % of tiles with the same predicted class (segmentation: majority class). A surrogate "
    "that stopped by the epoch cap is not finished: train it longer."
)


@dataclass(frozen=True)
class FitEntry:
    """One surrogate file's fit: its dataset (folder), model (arch), fit record and loss log."""

    dataset: str
    model: str
    fit: SurrogateFit | None
    losses: pd.DataFrame


def read_fits(paths: Sequence[str | Path]) -> list[FitEntry]:
    """The fit of each surrogate file (read with its checks: a bad file names itself)."""
    entries = []
    for path in paths:
        _, meta = read_surrogate(path)
        dataset = Path(path).resolve().parent.name
        entries.append(FitEntry(dataset, meta.arch, meta.fit, pd.DataFrame(list(meta.losses))))
    return entries


def _mean_std(mean: float | None, std: float | None) -> str:
    return "–" if mean is None else f"{mean:.2f} ± {std:.2f}"


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _row(e: FitEntry) -> tuple[dict[str, object], dict[str, str]]:
    f = e.fit
    data: dict[str, object] = {"dataset": e.dataset, "model": e.model}
    if f is None:
        return data | {"stop_reason": None}, {"Stopped": "not recorded (older surrogate file)"}
    data |= {k: v for k, v in f.as_dict().items() if k not in ("val_l1", "val_rel_l1", "validation_rows")}
    data["val_rel_l1_max"] = f.val_rel_l1_max
    agreement = _num(f.agreement, ".1f") + (
        f" (pixels {f.pixel_agreement:.1f})" if f.pixel_agreement is not None else ""
    )
    cells = {
        "Stopped": _STOP.get(f.stop_reason, f.stop_reason),
        "Epochs": str(f.epochs_run),
        "Kept / best epoch": f"{f.kept_epoch} / {_num(f.best_epoch, 'd')}",
        "Train / val tiles": f"{f.train_tiles} / {f.validation_tiles}",
        "Val L1": _num(f.val_l1_total, ".4g"),
        "Relative L1 (worst path)": _num(f.val_rel_l1_max, ".3f"),
        "PD all classes": _mean_std(f.pd_all_mean, f.pd_all_std),
        "PD target class": _mean_std(f.pd_target_mean, f.pd_target_std),
        "PD masked": _mean_std(f.pd_masked_mean, f.pd_masked_std),
        "Agreement %": agreement,
    }
    return data, cells


def fit_table(entries: Sequence[FitEntry]) -> Table:
    """One row per dataset/model: the "Surrogate fit" table."""
    rows = [_row(e) for e in entries]
    data = pd.DataFrame([d for d, _ in rows])
    cells = pd.DataFrame([c for _, c in rows], index=pd.MultiIndex.from_frame(data[["dataset", "model"]]))
    if cells.get("PD masked", pd.Series(dtype=str)).eq("–").all():
        cells = cells.drop(columns="PD masked", errors="ignore")  # no segmentation model
    return Table("surrogate_fit", "Surrogate fit", data, cells.fillna("–"), note=_NOTE)


def fit_path_table(entries: Sequence[FitEntry]) -> Table:
    """One row per dataset/model and surrogate path: validation L1 and relative L1."""
    rows = [
        {
            "dataset": e.dataset,
            "model": e.model,
            "path": name,
            "val_l1": l1,
            "val_rel_l1": (e.fit.val_rel_l1 or {}).get(name),
        }
        for e in entries
        if e.fit is not None and e.fit.val_l1
        for name, l1 in e.fit.val_l1.items()
    ]
    data = pd.DataFrame(rows, columns=["dataset", "model", "path", "val_l1", "val_rel_l1"])
    cells = pd.DataFrame(
        {
            "Val L1": [f"{v:.4g}" for v in data["val_l1"]],
            "Relative L1": [_num(v, ".3f") for v in data["val_rel_l1"]],
        },
        index=pd.MultiIndex.from_frame(data[["dataset", "model", "path"]]),
    )
    note = "Validation L1 and relative L1 (L1 / mean |conv output|) of each kept surrogate path."
    return Table("surrogate_fit_paths", "Surrogate fit per path", data, cells, note=note)


def loss_curve_figure(entry: FitEntry) -> Figure:
    """Train and validation L1 (summed over paths) per epoch, the kept epoch marked."""
    fig = Figure(figsize=(5.5, 3.4), layout="constrained")
    ax = fig.add_subplot()
    log = entry.losses
    if "l1_total" in log:
        ax.plot(log["epoch"], log["l1_total"], "o-", label="train L1 (epoch mean)")
    if "val_l1_total" in log:
        ax.plot(log["epoch"], log["val_l1_total"], "s-", label="validation L1")
    if entry.fit is not None:
        ax.axvline(
            entry.fit.kept_epoch, color="grey", ls="--", lw=1, label=f"kept (epoch {entry.fit.kept_epoch})"
        )
    ax.set(
        xlabel="epoch", ylabel="L1 (sum over paths)", title=f"Surrogate loss: {entry.dataset} / {entry.model}"
    )
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    return fig
