"""The report's "Surrogate fit" section (smoothsal.report.fit): surrogates trained here on real tiles
(one stopped by the convergence rule, one with the paper's fixed epoch count and no validation), read
back by `smoothsal report --surrogates` into the fit table, the per-path table, the loss-curve figures
and index.html; a file that is no surrogate is one line naming it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import SURROGATE_BATCH as BATCH
from helpers import SURROGATE_VALIDATION as VALIDATION
from PIL import Image

from smoothsal.report import write_report
from smoothsal.report.fit import fit_table, read_fits
from smoothsal.store import write_results
from smoothsal.surrogate import TrainSettings, read_surrogate
from smoothsal.surrogate_run import RunOptions, run_training
from smoothsal.tiles import read_tile_table


def _train(tiles: Path, model: Path, out: Path, **choices: object) -> Path:
    table = read_tile_table(tiles)
    settings = TrainSettings.for_tiles(
        table, checkpoint=model, arch="resnet18", num_classes=2, batch_size=BATCH, **choices
    )
    run_training(settings, table, RunOptions(out=out, workers=0, progress=False), checkpoint=model)
    return out


@pytest.fixture(scope="module")
def fits(surrogate_tiles: Path, surrogate_model: Path, tmp_path_factory) -> dict[str, Path]:
    """results/{dataset}/surrogate.pt for two datasets: one by the rule, one by a fixed epoch count."""
    root = tmp_path_factory.mktemp("fit-results")
    rule = {"epochs": 8, "patience": 1, "min_delta": 0.1, "val_min_tiles": VALIDATION}
    return {
        "ruled": _train(surrogate_tiles, surrogate_model, root / "ruled" / "surrogate.pt", **rule),
        "fixed": _train(
            surrogate_tiles, surrogate_model, root / "fixed" / "surrogate.pt", epochs=2, patience=0,
            val_fraction=0.0,
        ),
    }  # fmt: skip


def _per_tile_table(path: Path, n: int = 6) -> Path:
    """A small per-tile table as `smoothsal saliency --table` writes it (random values)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(n, 2))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    frame = pd.DataFrame(
        {
            "dataset": "ruled", "slide_id": "s1", "method": "surrogate", "arch": "resnet18", "tile": np.arange(n),
            "x": np.arange(n) * 224, "y": 0, "w": 224, "h": 224, "mpp": 0.5, "label": np.arange(n) % 2,
            "task": "classification", "logit_0": logits[:, 0], "logit_1": logits[:, 1], "prob_0": probs[:, 0],
            "prob_1": probs[:, 1], "pred": logits.argmax(1), "target": np.arange(n) % 2,
            "correct": (logits.argmax(1) == np.arange(n) % 2).astype(float), "pd_all": rng.uniform(0, 0.1, n),
        }
    )  # fmt: skip
    frame["pd_target"] = frame["pd_all"] / 2
    for attribution in ("deeplift", "gradient"):
        frame[f"tv/{attribution}/layer1"] = rng.uniform(1, 2, n)
    write_results(frame, path, {"slide_id": "s1", "method": "surrogate"})
    return path


@pytest.fixture(scope="module")
def report_dir(cli, fits: dict[str, Path], tmp_path_factory) -> Path:
    """`smoothsal report` with the surrogates, over a per-tile table of the saliency stage's format."""
    work = tmp_path_factory.mktemp("fit-report")
    table = _per_tile_table(work / "ruled" / "s1" / "surrogate.parquet")
    out = work / "report"
    done = cli("report", "--tables", table, "--surrogates", fits["ruled"], fits["fixed"], "--out", out)
    assert "index.html" in done.out
    return out


def test_the_fit_table_shows_each_surrogates_record(report_dir: Path, fits: dict[str, Path]) -> None:
    data = pd.read_csv(report_dir / "tables" / "surrogate_fit.csv").set_index("dataset")
    assert list(data.index) == ["ruled", "fixed"] and set(data["model"]) == {"resnet18"}
    ruled, fixed = (read_surrogate(fits[d])[1].fit for d in ("ruled", "fixed"))
    row = data.loc["ruled"]
    assert (row["stop_reason"], row["epochs_run"], row["kept_epoch"], row["best_epoch"]) == (
        ruled.stop_reason, ruled.epochs_run, ruled.kept_epoch, ruled.best_epoch
    )  # fmt: skip
    assert ruled.stop_reason == "converged"
    for column in ("val_l1_total", "pd_all_mean", "pd_target_mean", "agreement"):
        assert row[column] == pytest.approx(getattr(ruled, column), rel=1e-9), column
    assert row["val_rel_l1_max"] == pytest.approx(max(ruled.val_rel_l1.values()), rel=1e-9)
    assert (data.loc["fixed", "stop_reason"], data.loc["fixed", "epochs_run"]) == ("fixed_epochs", 2)
    assert pd.isna(data.loc["fixed", "val_l1_total"]) and fixed.val_l1_total is None

    text = (report_dir / "tables" / "surrogate_fit.md").read_text()
    assert "## Surrogate fit" in text and "converged (patience)" in text and "fixed epoch count" in text
    assert f"| {ruled.epochs_run} " in text and f"{ruled.pd_all_mean:.2f} ± {ruled.pd_all_std:.2f}" in text

    paths = pd.read_csv(report_dir / "tables" / "surrogate_fit_paths.csv")
    assert set(paths["dataset"]) == {"ruled"}  # the fixed run has no validation, so no per-path fit
    assert dict(zip(paths["path"], paths["val_rel_l1"], strict=True)) == pytest.approx(ruled.val_rel_l1)
    assert dict(zip(paths["path"], paths["val_l1"], strict=True)) == pytest.approx(ruled.val_l1)


def test_loss_curves_and_index_html(report_dir: Path) -> None:
    for dataset in ("ruled", "fixed"):
        png = report_dir / "figures" / "surrogate_fit" / f"{dataset}_resnet18_losses.png"
        assert png.is_file() and png.with_suffix(".svg").is_file()
        assert min(Image.open(png).size) > 100
    html = (report_dir / "index.html").read_text()
    assert '<h2 id="surrogate_fit">Surrogate fit</h2>' in html
    assert "figures/surrogate_fit/ruled_resnet18_losses.png" in html and "Surrogate fit per path" in html


def test_the_figure_and_table_read_the_loss_log_of_the_file(fits: dict[str, Path]) -> None:
    """The loss log the figure plots is the run's CSV (the same per-epoch rows in the file)."""
    entry = read_fits([fits["ruled"]])[0]
    csv = pd.read_csv(fits["ruled"].with_name("surrogate.losses.csv"))
    pd.testing.assert_frame_equal(entry.losses[csv.columns], csv, check_dtype=False)
    assert fit_table([entry]).cells.loc[("ruled", "resnet18"), "Stopped"] == "converged (patience)"


def test_a_file_that_is_no_surrogate_is_one_line_naming_it(cli, report_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "camelyon16" / "surrogate.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a torch file")
    table = next((report_dir.parent).rglob("surrogate.parquet"))
    err = cli("report", "--tables", table, "--surrogates", bad, "--out", tmp_path / "r", expect=1).err
    assert str(bad) in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
    with pytest.raises(FileNotFoundError):
        write_report([table], tmp_path / "r2", surrogates=[tmp_path / "missing.pt"])
