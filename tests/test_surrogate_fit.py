"""The surrogate's fit (smoothsal.surrogate_fit): the validation split, the convergence rule, the
validation L1 and the prediction measures, each against numbers worked out by hand or another
implementation. Training on real tiles with the rule is in test_surrogate_run.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers import conv_io
from torch import nn

from smoothsal import load_model
from smoothsal.evaluation import summarise
from smoothsal.smoothing import SurrogatePaths
from smoothsal.surrogate import SurrogateMeta, TrainSettings, read_surrogate, save_surrogate
from smoothsal.surrogate_fit import (
    Convergence,
    SurrogateFit,
    l1_from_sums,
    prediction_sums,
    split_tiles,
    summarise_predictions,
    validation_size,
    validation_sums,
)


def _table(slides: dict[str, tuple[int, int]]) -> pd.DataFrame:
    """slide id → (tiles of label 0, tiles of label 1)."""
    rows = [
        {"slide_id": s, "label": label}
        for s, counts in slides.items()
        for label, n in enumerate(counts)
        for _ in range(n)
    ]
    return pd.DataFrame(rows)


def test_validation_size_is_a_fraction_with_a_floor_and_at_most_half() -> None:
    assert validation_size(1000, 0.1, 32) == 100
    assert validation_size(253, 0.1, 32) == 32  # 26 < the floor
    assert validation_size(40, 0.1, 32) == 20  # never more than half
    assert validation_size(1001, 0.1, 0) == 101  # rounded up
    assert validation_size(1000, 0.0, 32) == 0 and validation_size(1, 0.5, 1) == 0


def test_split_is_seeded_disjoint_and_stratified_by_slide_and_label() -> None:
    table = _table({"a": (60, 20), "b": (100, 0), "c": (10, 10)})  # 200 tiles
    split = split_tiles(table, 0.2, 8, seed=0)
    assert len(split.validation) == 40 and len(split.train) == 160
    assert not set(split.train) & set(split.validation)
    assert sorted([*split.train, *split.validation]) == list(range(200))
    held = table.iloc[split.validation].groupby(["slide_id", "label"]).size().to_dict()
    # every stratum gives its share (20 %): 12, 4, 20, 2, 2
    assert held == {("a", 0): 12, ("a", 1): 4, ("b", 0): 20, ("c", 0): 2, ("c", 1): 2}
    again = split_tiles(table, 0.2, 8, seed=0)
    assert np.array_equal(again.validation, split.validation)
    assert not np.array_equal(split_tiles(table, 0.2, 8, seed=1).validation, split.validation)
    none = split_tiles(table, 0.0, 8, seed=0)
    assert len(none.validation) == 0 and np.array_equal(none.train, np.arange(200))


def test_split_without_labels_stratifies_by_slide() -> None:
    table = pd.DataFrame({"slide_id": ["a"] * 30 + ["b"] * 10})
    held = table.iloc[split_tiles(table, 0.5, 0, seed=3).validation]["slide_id"].value_counts().to_dict()
    assert held == {"a": 15, "b": 5}


def test_convergence_rule_by_hand() -> None:
    """min_delta 0.1: an epoch improves only below 0.9 × the L1 of the last epoch that improved; the
    state kept is the lowest L1's, improved or not."""
    rule, seen = Convergence(), []
    for epoch, value in enumerate([10.0, 8.0, 7.5, 7.0, 6.0, 5.9], start=1):
        rule = rule.update(value, epoch, 0.1)
        seen.append((rule.best, rule.best_epoch, rule.reference, rule.since, rule.converged(2)))
    assert seen == [
        (10.0, 1, 10.0, 0, False),
        (8.0, 2, 8.0, 0, False),
        (7.5, 3, 8.0, 1, False),  # lower (kept), but 7.5 > 7.2: no improvement
        (7.0, 4, 7.0, 0, False),  # 7.0 < 7.2: the margin is against the last improvement, not epoch 3
        (6.0, 5, 6.0, 0, False),
        (5.9, 6, 6.0, 1, False),
    ]
    stopped = rule.update(5.5, 7, 0.1)  # 5.5 > 5.4: two epochs without improvement
    assert stopped.converged(2) and (stopped.best, stopped.best_epoch) == (5.5, 7)
    assert not stopped.converged(0)  # patience 0: never (a fixed epoch count)
    assert rule.update(6.5, 7, 0.1).best_epoch == 6  # a worse epoch keeps the best
    assert Convergence(**rule.as_dict()) == rule  # what the state file keeps


class _Logits(nn.Module):
    """A 'model' whose input is its output plus ``shift``: tests choose the logits directly."""

    def __init__(self, shift: torch.Tensor | float = 0.0) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


class _ShiftByRow(nn.Module):
    """Adds a per-tile shift; the tile is recognised by its logits (the test's inputs are distinct)."""

    def __init__(self, shift: torch.Tensor) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))
        self.shift, self.seen = shift, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.seen is None:
            self.seen = 0
        out = x + self.shift[self.seen : self.seen + len(x)]
        self.seen += len(x)
        return out


def test_classification_measures_agree_with_the_evaluate_stage() -> None:
    torch.manual_seed(0)
    original = torch.randn(10, 3)
    shift = torch.randn(10, 3)
    labels = torch.tensor([0, 1, 2, -1, 0, 1, 2, -1, 0, 1])
    rows = torch.arange(10)
    batches = [(original[:6], rows[:6]), (original[6:], rows[6:])]
    sums = prediction_sums(_Logits(), _ShiftByRow(shift), batches, labels, torch.full((10,), -1))
    mine = summarise_predictions(sums)
    theirs = summarise({"original": original, "new": original + shift}, labels).summary.set_index("method")
    for key in ("pd_all_mean", "pd_all_std", "pd_target_mean", "pd_target_std", "agreement"):
        assert mine[key] == pytest.approx(theirs.loc["new", key], rel=1e-6), key
    assert mine["pd_masked_mean"] is None and mine["pixel_agreement"] is None


def test_segmentation_measures_by_hand() -> None:
    """Two 1×2-pixel tiles, two classes. Tile 0 majority class 1; tile 1 no annotation (masked: NaN)."""
    original = torch.tensor([[[[0.0, 0.0]], [[2.0, -2.0]]], [[[0.0, 0.0]], [[1.0, 1.0]]]])  # [2, 2, 1, 2]
    new = original.clone()
    new[0, 1, 0, 1] = 2.0  # tile 0, pixel 1: logit of class 1 from −2 to 2 (the argmax flips)
    batches = [(original, torch.tensor([0, 1]))]
    sums = prediction_sums(
        _Logits(), _Logits(new - original), batches, torch.tensor([-1, -1]), torch.tensor([1, -1])
    )
    got = summarise_predictions(sums)
    p = torch.sigmoid(torch.tensor(2.0)).item()  # softmax of (0, 2) for class 1
    q = torch.sigmoid(torch.tensor(-2.0)).item()
    flip = 2 * (p - q)  # Σ_c |Δ| at the changed pixel
    # tile 0: pixels (0, flip), mean flip / 2; tile 1 unchanged: 0. target class 1 (tile 1: predicted = 1)
    assert got["pd_all_mean"] == pytest.approx(100 * flip / 4)
    assert got["pd_target_mean"] == pytest.approx(100 * flip / 8)
    # masked, tile 0 only: M = p_orig[class 1] > 0.1 → both pixels (p and q = 0.119); mean flip / 2
    assert got["pd_masked_mean"] == pytest.approx(100 * flip / 2) and got["pd_masked_std"] == 0.0
    assert got["pixel_agreement"] == pytest.approx(75.0)  # 3 of 4 pixels keep their arg max
    assert got["agreement"] == 100.0  # both tiles' majority non-background class stays 1


def test_validation_l1_against_hooks_written_here() -> None:
    torch.manual_seed(0)
    model = load_model("resnet18", num_classes=2).eval()
    x = torch.randn(4, 3, 64, 64)
    paths = SurrogatePaths.for_model(model, x[:1])
    sums = validation_sums(model, paths, [(x[:2], None), (x[2:], None)])
    l1, rel = l1_from_sums(sums, paths.conv_names)
    io = conv_io(model, paths.conv_names, x)
    with torch.no_grad():
        for n in paths.conv_names:
            inp, out = io[n]
            assert l1[n] == pytest.approx(F.l1_loss(paths.path(n)(inp), out).item(), rel=1e-5)
            assert rel[n] == pytest.approx(l1[n] / out.abs().mean().item(), rel=1e-5)


def test_settings_of_the_rule() -> None:
    base = {"arch": "resnet18", "num_classes": 2, "model_sha256": "m", "tiles_sha256": "t", "tile_size": 64}
    s = TrainSettings(n_tiles=100, **base)
    assert (s.patience, s.min_delta, s.val_fraction, s.val_min_tiles, s.n_validation) == (
        3,
        0.01,
        0.1,
        32,
        32,
    )
    with pytest.raises(ValueError, match="needs validation tiles.*patience 0 for a fixed epoch count"):
        TrainSettings(n_tiles=100, val_fraction=0.0, **base)
    assert TrainSettings(n_tiles=100, val_fraction=0.0, patience=0, **base).n_validation == 0
    with pytest.raises(ValueError, match="min-delta must be in"):
        TrainSettings(n_tiles=100, min_delta=1.0, **base)
    with pytest.raises(ValueError, match="patience must be >= 0"):
        TrainSettings(n_tiles=100, patience=-1, **base)
    with pytest.raises(ValueError, match="init must be one of conv, random, got 'zeros'"):
        TrainSettings(n_tiles=100, init="zeros", **base)
    assert s.init == "conv" and s.hash != TrainSettings(n_tiles=100, init="random", **base).hash
    # files written before the rule were trained a fixed epoch count on every tile, from a random init
    old_keys = ("patience", "min_delta", "val_fraction", "init")
    old = TrainSettings.from_dict({k: v for k, v in s.as_dict().items() if k not in old_keys})
    assert (old.patience, old.val_fraction, old.init) == (0, 0.0, "random")


def test_fit_record_round_trips_through_the_surrogate_file(tmp_path) -> None:
    model = load_model("resnet18", num_classes=2)
    paths = SurrogatePaths.for_model(model, torch.zeros(1, 3, 64, 64))
    settings = TrainSettings("resnet18", 2, "m", "t", n_tiles=40, tile_size=64)
    fit = SurrogateFit(
        "converged", 5, 25, 3, 20, 20, best_epoch=3, task="classification", val_l1_total=1.5,
        val_l1={n: 0.25 for n in paths.conv_names}, val_rel_l1={n: 0.1 * i for i, n in enumerate(paths.conv_names)},
        pd_all_mean=0.4, pd_all_std=1.0, pd_target_mean=0.2, pd_target_std=0.5, agreement=100.0,
        validation_rows=(1, 4, 7),
    )  # fmt: skip
    save_surrogate(tmp_path / "s.pt", paths, SurrogateMeta(settings, paths.specs, fit=fit))
    meta = read_surrogate(tmp_path / "s.pt")[1]
    assert meta.fit == fit and meta.fit.val_rel_l1_max == pytest.approx(0.5)
    save_surrogate(tmp_path / "old.pt", paths, SurrogateMeta(settings, paths.specs))
    assert read_surrogate(tmp_path / "old.pt")[1].fit is None
    with pytest.raises(ValueError, match="unknown stop reason"):
        SurrogateFit("tired", 1, 1, 1, 1)
