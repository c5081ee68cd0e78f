"""`smoothsal evaluate`: how much each smoothing method changes the model's predictions (the paper's
Tables 2 and 3).

On labelled validation tiles: accuracy of ``original`` / ``surrogate`` / ``forward_hook`` (and
``backward_hook``, whose forward equals the original), agreement with the original, and the prediction
difference of each method against the original (DESIGN.md §1; ×100, mean ± std over tiles). The
per-tile measures are those of `smoothsal saliency` (`predictions`). Classification models only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from . import __version__
from .errors import BadOption
from .files import atomic_path, check_file_out
from .model_spec import ModelSpec
from .models import check_input_size
from .predictions import TARGETS, check_target, choose_targets, class_logits, prediction_columns
from .smoothing import SurrogatePaths, check_methods, smooth
from .store import write_results
from .tiles import TileDataset, TileLoader, read_tile_tables, tile_labels

__all__ = [
    "DEFAULT_METHODS",
    "TARGETS",
    "EvalResult",
    "EvalSettings",
    "evaluate",
    "per_tile_table",
    "predict",
    "run_evaluation",
    "smoothed_models",
    "summarise",
    "to_markdown",
    "write_summary",
]

DEFAULT_METHODS = ("original", "surrogate", "forward_hook")
TILE_KEYS = ("slide_id", "x", "y", "w", "level", "tile_size")


@dataclass(frozen=True)
class EvalSettings:
    """What `smoothsal evaluate` compares (``surrogate`` is left out without a surrogate file)."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    target: str = "label"
    batch_size: int = 64  # tiles per forward pass (does not change results)

    def __post_init__(self) -> None:
        check_methods(self.methods)
        check_target(self.target)
        if self.batch_size < 1:
            raise BadOption(f"--batch-size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class EvalResult:
    """One row per method (``summary``) and one row per tile (``tiles``)."""

    summary: pd.DataFrame
    tiles: pd.DataFrame


def smoothed_models(
    model: nn.Module, methods: Sequence[str], surrogate: SurrogatePaths | None, example: torch.Tensor
) -> dict[str, nn.Module]:
    """The model under each method (``surrogate`` needs trained paths)."""
    check_methods(methods)
    if "surrogate" in methods and surrogate is None:
        raise BadOption("method 'surrogate' needs a trained surrogate: pass --surrogate FILE")
    return {
        m: smooth(model, m, surrogate=surrogate if m == "surrogate" else None, example=example)
        for m in methods
    }


@torch.no_grad()
def predict(
    models: Mapping[str, nn.Module], dataset: Dataset, *, batch_size: int = 64, workers: int = 0
) -> dict[str, torch.Tensor]:
    """Logits ``[N, C]`` of every model on every tile (one read of each tile), on CPU."""
    device = next(next(iter(models.values())).parameters()).device
    loader = TileLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    out: dict[str, list[torch.Tensor]] = {m: [] for m in models}
    for batch in loader:
        x = (batch[0] if isinstance(batch, list | tuple) else batch).to(device)
        for name, model in models.items():
            out[name].append(class_logits(model(x)).float().cpu())
    return {m: torch.cat(v) for m, v in out.items()}


def summarise(
    logits: Mapping[str, torch.Tensor], labels: torch.Tensor, *, target: str = "label"
) -> EvalResult:
    """Accuracy (% of labelled tiles), agreement with the original (%), prediction difference ×100.

    Standard deviations are over tiles (population std, ddof = 0).
    """
    if "original" not in logits:
        raise BadOption("the prediction difference is measured against 'original': include it")
    original = logits["original"]
    if labels.numel() and labels.max() >= original.shape[1] and original.shape[1] > 1:
        raise BadOption(
            f"tile labels go up to {int(labels.max())} but the model has {original.shape[1]} classes; "
            "check --num-classes"
        )
    targets = choose_targets(original, labels, target)
    reference = prediction_columns("classification", original, original, labels, targets)["pred"]
    labelled = labels.numpy() >= 0
    rows, tiles = [], {"label": labels.numpy(), "target": targets.numpy()}
    for method, out in logits.items():
        cols = prediction_columns("classification", original, out, labels, targets)
        pd_all, pd_target = cols["pd_all"] * 100, cols["pd_target"] * 100
        rows.append(
            {
                "method": method,
                "tiles": len(out),
                "labelled": int(labelled.sum()),
                "accuracy": 100 * float(cols["correct"][labelled].mean()) if labelled.any() else float("nan"),
                "agreement": 100 * float((cols["pred"] == reference).mean()),
                "pd_all_mean": float(pd_all.mean()),
                "pd_all_std": float(pd_all.std()),
                "pd_target_mean": float(pd_target.mean()),
                "pd_target_std": float(pd_target.std()),
            }
        )
        tiles |= {
            f"{method}_pred": cols["pred"],
            f"{method}_pd_all": pd_all,
            f"{method}_pd_target": pd_target,
        }
    return EvalResult(pd.DataFrame(rows), pd.DataFrame(tiles))


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    labels: torch.Tensor,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    surrogate: SurrogatePaths | None = None,
    target: str = "label",
    batch_size: int = 64,
    workers: int = 0,
) -> EvalResult:
    """Predict ``dataset`` with the model under each method and summarise against the original."""
    methods = list(dict.fromkeys(["original", *methods]))
    example = dataset[0][0][None].to(next(model.parameters()).device)
    models = smoothed_models(model.eval(), methods, surrogate, example)
    return summarise(predict(models, dataset, batch_size=batch_size, workers=workers), labels, target=target)


def per_tile_table(table: pd.DataFrame, result: EvalResult) -> pd.DataFrame:
    """The tile table's keys (slide, position) beside each tile's predictions and differences."""
    keys = table[[c for c in TILE_KEYS if c in table]].reset_index(drop=True)
    return pd.concat([keys, result.tiles.reset_index(drop=True)], axis=1)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}"


def to_markdown(summary: pd.DataFrame) -> str:
    """The summary as a markdown table (accuracy in %, prediction differences ×100)."""
    lines = [
        "| method | tiles | accuracy (%) | agreement (%) | pred. diff. all classes (×100) | pred. diff. target (×100) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in summary.itertuples(index=False):
        acc = "n/a" if np.isnan(r.accuracy) else f"{r.accuracy:.2f}"
        lines.append(
            f"| {r.method} | {r.tiles} | {acc} | {r.agreement:.2f} | {_pm(r.pd_all_mean, r.pd_all_std)} "
            f"| {_pm(r.pd_target_mean, r.pd_target_std)} |"
        )
    return "\n".join(lines) + "\n"


def write_summary(summary: pd.DataFrame, csv: str | Path, markdown: str | Path | None = None) -> None:
    """Write the CSV (and markdown) through temporary files renamed into place."""
    for path, text in (
        (csv, summary.to_csv(index=False)),
        (markdown, to_markdown(summary) if markdown else None),
    ):
        if path is None or text is None:
            continue
        with atomic_path(path) as tmp:
            tmp.write_text(text)


def run_evaluation(
    tables: Sequence[str | Path],
    model: ModelSpec,
    out: str | Path,
    settings: EvalSettings = EvalSettings(),
    *,
    markdown: str | Path | None = None,
    per_tile: str | Path | None = None,
    workers: int = 0,
) -> EvalResult:
    """The `evaluate` stage: read the tiles, load the model (and surrogate), compare, write the summary
    (CSV, and markdown: default OUT with .md) and optionally the per-tile table (Parquet)."""
    check_file_out(out, markdown or Path(out).with_suffix(".md"), per_tile)
    table = read_tile_tables(tables)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network, surrogate, norm = model.load(device)
    check_input_size(network, int(table["tile_size"].iloc[0]), model.arch)
    methods = [m for m in settings.methods if m != "surrogate" or surrogate is not None]
    result = evaluate(
        network, TileDataset(table, transform=norm), tile_labels(table), methods=methods, surrogate=surrogate,
        target=settings.target, batch_size=settings.batch_size, workers=workers,
    )  # fmt: skip
    write_summary(result.summary, out, markdown or Path(out).with_suffix(".md"))
    if per_tile:
        meta = {"kind": "evaluate", "version": __version__, "arch": model.arch, "methods": methods}
        write_results(per_tile_table(table, result), per_tile, meta)
    return result
