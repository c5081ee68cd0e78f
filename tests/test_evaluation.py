"""`smoothsal evaluate` (smoothsal.evaluation): the paper's Tables 2 and 3 from a real surrogate run,
checked against the model run directly; the summary by hand; the bundle's conv head."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import SURROGATE_BATCH as BATCH
from helpers import SURROGATE_TILES as TILES

from smoothsal import load_model, metrics, smooth
from smoothsal.models import Normalize
from smoothsal.surrogate import read_surrogate
from smoothsal.tiles import TileDataset, read_tile_table

STEPS_PER_EPOCH = TILES // BATCH


def test_evaluate_writes_the_papers_tables(
    cli, ddp_surrogate: Path, surrogate_tiles: Path, surrogate_model: Path, surrogate_dir: Path
) -> None:
    out = surrogate_dir / "eval" / "table.csv"
    args = ["evaluate", "--arch", "resnet18", "--num-classes", "2", "--checkpoint", str(surrogate_model),
            "--tiles", str(surrogate_tiles), "--surrogate", str(ddp_surrogate), "--out", str(out),
            "--per-tile", str(out.with_name("tiles.parquet"))]  # fmt: skip
    cli(*args)
    table = pd.read_csv(out).set_index("method")
    assert list(table.index) == ["original", "surrogate", "forward_hook"]
    assert (table["tiles"] == TILES).all() and (table["labelled"] == TILES).all()
    assert table.loc["original", ["pd_all_mean", "pd_target_mean"]].tolist() == [0.0, 0.0]
    assert (table.loc[["surrogate", "forward_hook"], "pd_all_mean"] > 0).all()
    # two classes: the all-classes difference is exactly twice the target-class one
    assert table["pd_all_mean"].tolist() == pytest.approx((2 * table["pd_target_mean"]).tolist())
    assert "| surrogate | 32 |" in out.with_suffix(".md").read_text()

    # the same numbers computed here, independently of the evaluate stage
    tile_table = read_tile_table(surrogate_tiles)
    model = load_model("resnet18", num_classes=2, checkpoint=surrogate_model)
    x = torch.stack([TileDataset(tile_table, transform=Normalize())[i][0] for i in range(TILES)])
    labels = torch.tensor(tile_table["label"].astype(int).to_numpy())
    paths = read_surrogate(ddp_surrogate)[0]
    with torch.no_grad():
        original, surrogate = model(x), smooth(model, "surrogate", surrogate=paths)(x)
    assert table.loc["original", "accuracy"] == pytest.approx(100 * metrics.accuracy(original, labels))
    p_all, _ = metrics.prediction_difference(
        metrics.probabilities(original), metrics.probabilities(surrogate), labels
    )
    assert table.loc["surrogate", "pd_all_mean"] == pytest.approx(100 * float(p_all.mean()), rel=1e-5)
    per_tile = pd.read_parquet(out.with_name("tiles.parquet"))
    assert len(per_tile) == TILES and per_tile["surrogate_pd_all"].to_numpy() == pytest.approx(
        100 * p_all.numpy(), rel=1e-4
    )


def test_summarise_by_hand() -> None:
    from smoothsal.evaluation import summarise
    from smoothsal.tiles import tile_labels

    labels = tile_labels(pd.DataFrame({"label": pd.array([0, 1, pd.NA], dtype="Int64")}))
    assert labels.tolist() == [0, 1, -1]
    original = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 3.0]])
    other = torch.tensor([[0.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    s = summarise({"original": original, "other": other}, labels).summary.set_index("method")
    p = torch.softmax(torch.tensor([2.0, 0.0]), 0)[0].item()  # 0.881
    q = torch.softmax(torch.tensor([3.0, 0.0]), 0)[0].item()  # 0.953
    # tile 3 has no label: its target is the original's prediction (class 1)
    expected_all = [2 * (p - 0.5) * 100, 0.0, 2 * (2 * q - 1) * 100]
    assert s.loc["other", "pd_all_mean"] == pytest.approx(sum(expected_all) / 3)
    assert s.loc["other", "pd_target_mean"] == pytest.approx(sum(expected_all) / 6)
    assert s.loc["other", "labelled"] == 2 and s.loc["other", "accuracy"] == 100.0  # tie → class 0
    assert s.loc["other", "agreement"] == pytest.approx(200 / 3)
    assert s.loc["original", "pd_all_std"] == 0.0


def test_evaluate_handles_the_bundle_models_conv_head() -> None:
    """MONAI's Camelyon16 bundle net gives [B, 1, 1, 1] logits: evaluate reads them as [B, 1]."""
    from smoothsal import evaluation

    torch.manual_seed(0)
    model = load_model("monai_fc_resnet18", num_classes=1)
    x = torch.randn(3, 3, 224, 224)
    logits = evaluation.predict({"original": model}, [(x[i], i) for i in range(3)], batch_size=3)
    with torch.no_grad():
        assert torch.equal(logits["original"], model(x).flatten(1))
    result = evaluation.summarise(logits, torch.tensor([1, 0, -1]))
    assert list(result.summary["method"]) == ["original"]
    assert int(result.summary["labelled"].iloc[0]) == 2
