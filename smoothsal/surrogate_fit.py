"""How well a surrogate fits its model: the held-out validation tiles, the convergence rule, the fit record.

Validation: a seeded part of the training tiles (stratified by slide and label) that training never
sees. After every epoch each path's L1 on it (and the relative L1 = L1 / mean |conv output|) decides
when training has converged: it stops once the total validation L1 has not fallen by ``min_delta``
(relative) for ``patience`` epochs, keeping the state of the lowest validation L1. At the end the kept paths replace the
convs together and the surrogate's predictions are compared with the original's on the same tiles
(prediction difference ×100, agreement %): what tells a user whether the surrogate is finished.

Every measure is returned as float64 sums (``*_sums``) so that processes can add theirs up.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import torch
from torch import nn

from .errors import BadOption
from .metrics import majority_label, masked_prediction_difference, prediction_difference, probabilities
from .smoothing import SurrogatePaths, capture_conv_io

__all__ = [
    "STOP_REASONS",
    "Convergence",
    "SurrogateFit",
    "TileSplit",
    "fit_line",
    "l1_from_sums",
    "prediction_sums",
    "split_tiles",
    "summarise_predictions",
    "validation_size",
    "validation_sums",
]

# converged: the rule stopped it; max_epochs: the cap came first (not converged); fixed_epochs: no
# rule (patience 0), exactly the epochs asked for (the paper's setting).
STOP_REASONS = ("converged", "max_epochs", "fixed_epochs")


# --- the split ------------------------------------------------------------------------------------


def validation_size(n_tiles: int, fraction: float, min_tiles: int) -> int:
    """Tiles held out: ``fraction`` of them but at least ``min_tiles``, and never more than half."""
    if fraction <= 0:
        return 0
    return min(max(math.ceil(fraction * n_tiles), min_tiles), n_tiles // 2)


@dataclass(frozen=True)
class TileSplit:
    """Row positions in the tile table: the tiles trained on and the held-out validation tiles."""

    train: np.ndarray
    validation: np.ndarray


def split_tiles(table: pd.DataFrame, fraction: float, min_tiles: int, seed: int) -> TileSplit:
    """A seeded validation part of ``table``'s tiles, stratified by slide and label.

    Each stratum (slide × label; unlabelled tiles form their own) is shuffled; every tile gets its
    quantile in its stratum, and the tiles of lowest quantile are held out, so every slide and label
    gives its share. The same table and seed give the same split.
    """
    n = len(table)
    size = validation_size(n, fraction, min_tiles)
    if size == 0:
        return TileSplit(np.arange(n), np.arange(0))
    rng = np.random.default_rng(seed)
    label = (
        pd.to_numeric(table["label"], errors="coerce") if "label" in table else pd.Series(np.nan, table.index)
    )
    strata = table["slide_id"].astype(str) + "|" + label.fillna(-1).astype(int).astype(str)
    key = pd.DataFrame({"stratum": strata.to_numpy(), "u": rng.random(n)})
    rank = key.sort_values("u").groupby("stratum", sort=False).cumcount().sort_index()
    count = key.groupby("stratum")["u"].transform("size")
    quantile = (rank.to_numpy() + 0.5) / count.to_numpy()
    order = np.lexsort((key["u"].to_numpy(), quantile))  # by quantile, ties in the seeded order
    validation = np.sort(order[:size])
    train = np.setdiff1d(np.arange(n), validation)
    return TileSplit(train, validation)


# --- validation L1 --------------------------------------------------------------------------------


def _images(batch: object) -> torch.Tensor:
    return batch[0] if isinstance(batch, list | tuple) else batch  # type: ignore[return-value]


@torch.no_grad()
def validation_sums(
    model: nn.Module, paths: SurrogatePaths, batches: Iterable[object], *, amp: bool = False
) -> torch.Tensor:
    """``[3, P]`` float64 over ``batches``: Σ|path − conv|, Σ|conv output| and elements, per path."""
    names = paths.conv_names
    device = next(model.parameters()).device
    sums = torch.zeros(3, len(names), dtype=torch.float64)
    was_training = paths.training
    paths.eval()
    try:
        for batch in batches:
            x = _images(batch).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                with capture_conv_io(model, names) as captured:
                    model(x)
                predicted = paths({n: captured[n][0] for n in names})
            for i, n in enumerate(names):
                out = captured[n][1].float()
                sums[0, i] += float((predicted[n].float() - out).abs().sum(dtype=torch.float64))
                sums[1, i] += float(out.abs().sum(dtype=torch.float64))
                sums[2, i] += out.numel()
    finally:
        paths.train(was_training)
    return sums


def l1_from_sums(sums: torch.Tensor, names: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Per path: the L1 (mean |path − conv| per element) and the relative L1 (L1 / mean |conv output|)."""
    l1 = (sums[0] / sums[2]).tolist()
    rel = (sums[0] / sums[1].clamp_min(1e-30)).tolist()
    return dict(zip(names, l1, strict=True)), dict(zip(names, rel, strict=True))


# --- the convergence rule -------------------------------------------------------------------------


@dataclass(frozen=True)
class Convergence:
    """Where the convergence rule stands after some epochs.

    An epoch improves when its validation L1 falls below ``reference`` × (1 − min_delta), reference
    being the L1 of the last epoch that improved; ``since`` counts the epochs since. The state kept is
    the one of the lowest L1 (``best``, at ``best_epoch``, 1-based; 0 = none yet), whether or not it
    improved by the margin.
    """

    best: float = math.inf
    best_epoch: int = 0
    reference: float = math.inf
    since: int = 0

    def update(self, value: float, epoch: int, min_delta: float) -> Convergence:
        """The state after ``epoch`` (1-based) with validation L1 ``value``."""
        improved = value < self.reference * (1 - min_delta)
        best, best_epoch = (value, epoch) if value < self.best else (self.best, self.best_epoch)
        return Convergence(
            best, best_epoch, value if improved else self.reference, 0 if improved else self.since + 1
        )

    def converged(self, patience: int) -> bool:
        """No improvement for ``patience`` epochs (never with patience 0: a fixed epoch count)."""
        return patience > 0 and self.since >= patience

    def as_dict(self) -> dict[str, float | int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# --- prediction difference and agreement on the validation tiles ----------------------------------

# The per-tile measures summed by ``prediction_sums``: each as (Σ, Σ², count).
_MEASURES = ("pd_all", "pd_target", "pd_masked", "agreement", "pixel_agreement")


def _targets(original: torch.Tensor, labels: torch.Tensor, majority: torch.Tensor) -> torch.Tensor:
    """The label (segmentation: the majority class), the original's prediction where there is none."""
    if original.ndim == 4:
        return torch.where(majority >= 0, majority, majority_label(original.argmax(1)))
    if original.shape[1] == 1:
        return torch.zeros(len(original), dtype=torch.long)
    return torch.where(labels >= 0, labels, original.argmax(1))


def _predicted(logits: torch.Tensor) -> torch.Tensor:
    if logits.ndim == 4:
        return majority_label(logits.argmax(1))
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


def _tile_measures(
    original: torch.Tensor, new: torch.Tensor, labels: torch.Tensor, majority: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per tile (NaN where undefined): the measures of DESIGN §1, as fractions; agreement as 0/1."""
    target = _targets(original, labels, majority)
    p_orig, p_new = probabilities(original), probabilities(new)
    nan = torch.full((len(original),), math.nan, dtype=torch.float64)
    out = {"agreement": (_predicted(new) == _predicted(original)).double(), "pixel_agreement": nan}
    if original.ndim == 4:  # segmentation: pixels as samples, then the mean per tile
        k, pixels = original.shape[1], original.shape[2] * original.shape[3]
        flat_o, flat_n = (p.permute(0, 2, 3, 1).reshape(-1, k) for p in (p_orig, p_new))
        pd_all, pd_target = prediction_difference(flat_o, flat_n, target.repeat_interleave(pixels))
        out["pd_all"], out["pd_target"] = (
            v.view(len(original), -1).mean(1).double() for v in (pd_all, pd_target)
        )
        majority_mask = majority.clamp_min(0).view(-1, 1, 1)
        out["pd_masked"] = masked_prediction_difference(p_orig, p_new, majority_mask).double()
        out["pixel_agreement"] = (new.argmax(1) == original.argmax(1)).double().mean(dim=(1, 2))
    else:
        pd_all, pd_target = prediction_difference(p_orig, p_new, target)
        out |= {"pd_all": pd_all.double(), "pd_target": pd_target.double(), "pd_masked": nan}
    return out


@torch.no_grad()
def prediction_sums(
    model: nn.Module,
    smoothed: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    labels: torch.Tensor,
    majority: torch.Tensor,
) -> torch.Tensor:
    """``[3, M]`` float64 (Σ, Σ², count of defined tiles) of each measure in ``_MEASURES``: ``smoothed``
    (e.g. the model with every surrogate path in place) against the original ``model``, on
    ``batches`` of (images, row) where row indexes ``labels`` (−1 = none) and ``majority`` (the
    segmentation target, −1 = none)."""
    device = next(model.parameters()).device
    sums = torch.zeros(3, len(_MEASURES), dtype=torch.float64)
    for x, rows in batches:
        x = x.to(device, non_blocking=True)
        original, new = (_heads(m(x)).float().cpu() for m in (model.eval(), smoothed.eval()))
        per_tile = _tile_measures(original, new, labels[rows], majority[rows])
        for i, name in enumerate(_MEASURES):
            v = per_tile[name][~per_tile[name].isnan()]
            sums[:, i] += torch.stack([v.sum(), (v * v).sum(), torch.tensor(float(len(v)))])
    return sums


def _heads(out: torch.Tensor) -> torch.Tensor:
    """Conv heads of classifiers ([B, K, 1, 1], the MONAI bundle) as [B, K]."""
    return out.flatten(1) if out.ndim == 4 and out.shape[2:] == (1, 1) else out


def summarise_predictions(sums: torch.Tensor) -> dict[str, float | None]:
    """``SurrogateFit``'s prediction fields from ``prediction_sums`` (summed over processes): mean and
    population std over tiles, prediction differences ×100, agreements in %; None where no tile
    defines a measure (pd_masked and pixel_agreement of a classifier)."""
    out: dict[str, float | None] = {}
    for i, name in enumerate(_MEASURES):
        total, squares, count = sums[:, i].tolist()
        mean = total / count if count else None
        if name.endswith("agreement"):
            out[name] = None if mean is None else 100 * mean
            continue
        std = None if mean is None else math.sqrt(max(squares / count - mean * mean, 0.0))
        out[f"{name}_mean"] = None if mean is None else 100 * mean
        out[f"{name}_std"] = None if std is None else 100 * std
    return out


# --- the record -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SurrogateFit:
    """How training ended and how well the kept paths fit (the surrogate file's ``fit`` record).

    L1s are those of the kept state on the validation tiles (its epoch's row of the loss log);
    prediction differences are ×100 (mean, std over tiles), agreements in % of tiles (pixels), all of
    the model with every kept path in place against the original on the validation tiles. Target:
    the tile's label (segmentation: its majority class), the original's prediction where it has none.
    Without validation tiles (``val_fraction`` 0) only the first fields are set.
    """

    stop_reason: str  # one of STOP_REASONS
    epochs_run: int
    steps: int
    kept_epoch: int  # the epoch whose paths were saved: the best one, or the last (fixed_epochs)
    train_tiles: int
    validation_tiles: int = 0
    best_epoch: int | None = None  # epoch of the lowest validation L1
    task: str | None = None  # "classification" | "segmentation" (from the model's output)
    val_l1_total: float | None = None
    val_l1: dict[str, float] | None = None
    val_rel_l1: dict[str, float] | None = None
    pd_all_mean: float | None = None
    pd_all_std: float | None = None
    pd_target_mean: float | None = None
    pd_target_std: float | None = None
    pd_masked_mean: float | None = None  # segmentation only
    pd_masked_std: float | None = None
    agreement: float | None = None  # % of tiles whose predicted class (segmentation: majority) agrees
    pixel_agreement: float | None = None  # segmentation: % of pixels whose arg max agrees
    validation_rows: tuple[int, ...] = ()  # row positions of the validation tiles in the tile table

    def __post_init__(self) -> None:
        if self.stop_reason not in STOP_REASONS:
            raise BadOption(f"unknown stop reason {self.stop_reason!r}; allowed: {', '.join(STOP_REASONS)}")

    @property
    def val_rel_l1_max(self) -> float | None:
        """The worst path's relative L1 (one number to judge the fit by)."""
        return max(self.val_rel_l1.values()) if self.val_rel_l1 else None

    def as_dict(self) -> dict[str, object]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return d | {"validation_rows": list(self.validation_rows)}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> SurrogateFit:
        d = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        return cls(**d | {"validation_rows": tuple(d.get("validation_rows", ()))})  # type: ignore[arg-type]


def fit_line(fit: SurrogateFit | None) -> str:
    """How training ended, in one line (what `train-surrogate` prints)."""
    if fit is None:
        return "no fit recorded"
    line = f"stopped: {fit.stop_reason} after {fit.epochs_run} epoch(s), kept epoch {fit.kept_epoch}"
    if fit.val_l1_total is not None:
        line += f", validation L1 {fit.val_l1_total:.4g} (worst relative L1 {fit.val_rel_l1_max:.3g})"
    if fit.pd_all_mean is not None:
        line += f", prediction difference {fit.pd_all_mean:.3g} (x100), agreement {fit.agreement:.1f} %"
    return line
