"""How much each smoothing method changes the model's predictions: the paper's Tables 2 and 3.

On labelled validation tiles: accuracy of ``original`` / ``surrogate`` / ``forward_hook`` (and
``backward_hook``, whose forward equals the original), and the prediction difference of each method
against the original (DESIGN.md §1; ×100, mean ± std over tiles). Classification only for now:
the target class is the tile's label (or the original's predicted class where a tile has no label).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .files import atomic_path
from .metrics import accuracy, prediction_difference, probabilities
from .smoothing import METHODS, SurrogatePaths, smooth

__all__ = [
    "TARGETS",
    "EvalResult",
    "evaluate",
    "per_tile_table",
    "predict",
    "smoothed_models",
    "summarise",
    "to_markdown",
    "write_summary",
]

TARGETS = ("label", "predicted")  # the target class: ground truth (predicted where unlabelled), or predicted
DEFAULT_METHODS = ("original", "surrogate", "forward_hook")


@dataclass(frozen=True)
class EvalResult:
    """One row per method (``summary``) and one row per tile (``tiles``)."""

    summary: pd.DataFrame
    tiles: pd.DataFrame


def smoothed_models(
    model: nn.Module, methods: Sequence[str], surrogate: SurrogatePaths | None, example: torch.Tensor
) -> dict[str, nn.Module]:
    """The model under each method (``surrogate`` needs trained paths)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; allowed: {', '.join(METHODS)}")
    if "surrogate" in methods and surrogate is None:
        raise ValueError("method 'surrogate' needs a trained surrogate: pass --surrogate FILE")
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
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    out: dict[str, list[torch.Tensor]] = {m: [] for m in models}
    for batch in loader:
        x = (batch[0] if isinstance(batch, list | tuple) else batch).to(device)
        for name, model in models.items():
            logits = model(x)
            if logits.ndim == 4 and logits.shape[2:] == (1, 1):  # conv heads (MONAI bundle): [B, C, 1, 1]
                logits = logits.flatten(1)
            if logits.ndim != 2:
                raise ValueError(
                    f"the model gives outputs of shape {tuple(logits.shape)}; evaluate handles "
                    "classification ([B, C] logits) only so far (segmentation Dice needs label masks)"
                )
            out[name].append(logits.float().cpu())
    return {m: torch.cat(v) for m, v in out.items()}


def _targets(original: torch.Tensor, labels: torch.Tensor, target: str) -> torch.Tensor:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; allowed: {', '.join(TARGETS)}")
    if original.shape[1] == 1:
        return torch.zeros(len(original), dtype=torch.long)  # one logit: its probability is the target
    predicted = original.argmax(dim=1)
    return torch.where(labels >= 0, labels, predicted) if target == "label" else predicted


def _predicted(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)


def summarise(
    logits: Mapping[str, torch.Tensor], labels: torch.Tensor, *, target: str = "label"
) -> EvalResult:
    """Accuracy (% of labelled tiles), agreement with the original (%), prediction difference ×100.

    Standard deviations are over tiles (population std, ddof = 0).
    """
    if "original" not in logits:
        raise ValueError("the prediction difference is measured against 'original': include it")
    original = logits["original"]
    if labels.numel() and labels.max() >= original.shape[1] and original.shape[1] > 1:
        raise ValueError(
            f"tile labels go up to {int(labels.max())} but the model has {original.shape[1]} classes; "
            "check --num-classes"
        )
    targets = _targets(original, labels, target)
    p_original = probabilities(original)
    labelled = labels >= 0
    rows, tiles = [], {"label": labels.numpy(), "target": targets.numpy()}
    for method, out in logits.items():
        pd_all, pd_target = (
            v.numpy() * 100 for v in prediction_difference(p_original, probabilities(out), targets)
        )
        rows.append(
            {
                "method": method,
                "tiles": len(out),
                "labelled": int(labelled.sum()),
                "accuracy": 100 * accuracy(out[labelled], labels[labelled])
                if labelled.any()
                else float("nan"),
                "agreement": 100 * float((_predicted(out) == _predicted(original)).float().mean()),
                "pd_all_mean": float(pd_all.mean()),
                "pd_all_std": float(pd_all.std()),
                "pd_target_mean": float(pd_target.mean()),
                "pd_target_std": float(pd_target.std()),
            }
        )
        tiles |= {
            f"{method}_pred": _predicted(out).numpy(),
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


TILE_KEYS = ("slide_id", "x", "y", "w", "level", "tile_size")


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
