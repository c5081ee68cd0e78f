"""Surrogate training at cluster scale, for real: torchrun with 2 gloo processes on tiles of a real
slide, a SIGKILLed run resumed to identical weights, the surrogate file's guards, `smoothsal evaluate`.

One tiny setting throughout: resnet18 (2 classes, seeded random weights saved as a checkpoint),
32 tiles of 64 px from CMU-1-Small-Region.svs, global batch 8 (4 per process), 3 epochs = 12 steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from smoothsal import load_model, metrics, slides, smooth
from smoothsal.annotations import read_annotations
from smoothsal.cli import main
from smoothsal.grid import TileGridSettings
from smoothsal.models import Normalize, save_torch_file
from smoothsal.surrogate import Resume, TrainSettings, load_surrogate, read_surrogate, train_surrogate
from smoothsal.surrogate_run import STATE_FORMAT, per_rank_batch_size
from smoothsal.tiles import TileDataset, write_tile_table
from smoothsal.tiling import tile_slide

EPOCHS, BATCH, TILES = 3, 8, 32
STEPS_PER_EPOCH = TILES // BATCH


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def tiles(slides_dir: Path, work: Path) -> Path:
    """32 labelled 64-px tiles of a real slide; "tumour" = a polygon over its left half."""
    annotation = work / "left-half.geojson"
    polygon = [[0, 0], [1100, 0], [1100, 2967], [0, 2967], [0, 0]]
    feature = {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
               "geometry": {"type": "Polygon", "coordinates": [polygon]}}  # fmt: skip
    annotation.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    grid = TileGridSettings(tile_size=64, target_mpp=2.0, max_tiles=TILES, seed=0)
    with slides.open_slide(slides_dir / "CMU-1-Small-Region.svs") as slide:
        tiling = tile_slide(slide, grid, annotations=read_annotations(annotation))
    assert len(tiling.table) == TILES and set(tiling.table["label"].tolist()) == {0, 1}
    path = work / "tiles.parquet"
    write_tile_table(tiling.table, path)
    return path


@pytest.fixture(scope="module")
def model_checkpoint(work: Path) -> Path:
    torch.manual_seed(0)
    import torchvision

    path = work / "model.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=2).state_dict(), path)
    return path


def _train(
    tiles: Path, model: Path, out: Path, nproc: int | None, *extra: str, kill_at: str = ""
) -> subprocess.CompletedProcess:
    """`smoothsal train-surrogate` as a real command: under torchrun with `nproc` processes, or plain;
    ``kill_at``: SMOOTHSAL_KILL_AT for every process."""
    launch = [sys.executable, "-m", "smoothsal.cli"]
    if nproc is not None:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                  str(nproc), "-m", "smoothsal.cli"]  # fmt: skip
    args = ["train-surrogate", "--arch", "resnet18", "--num-classes", "2", "--checkpoint", str(model),
            "--tiles", str(tiles), "--out", str(out), "--epochs", str(EPOCHS), "--batch-size", str(BATCH),
            "--workers", "0", "--checkpoint-every", "2", "--no-progress", *extra]  # fmt: skip
    env = dict(os.environ, SMOOTHSAL_KILL_AT=kill_at)
    return subprocess.run([*launch, *args], check=False, capture_output=True, text=True, timeout=300, env=env)


def _ok(run: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert run.returncode == 0, run.stdout + run.stderr
    return run


@pytest.fixture(scope="module")
def ddp_run(tiles: Path, model_checkpoint: Path, work: Path) -> Path:
    """An uninterrupted 2-process run (torchrun, gloo): the reference for the other tests."""
    out = work / "ddp" / "surrogate.pt"
    run = _ok(_train(tiles, model_checkpoint, out, 2))
    assert "2 process(es)" in run.stdout
    return out


def _losses(out: Path) -> pd.DataFrame:
    return pd.read_csv(out.with_name(out.stem + ".losses.csv"))


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def single_run(tiles: Path, model_checkpoint: Path, work: Path) -> Path:
    """The same run as one plain process (no torchrun)."""
    out = work / "single" / "surrogate.pt"
    assert "1 process(es)" in _ok(_train(tiles, model_checkpoint, out, None)).stdout
    return out


@pytest.mark.slow
def test_torchrun_two_processes_every_path_learns_and_one_process_agrees(
    ddp_run: Path, single_run: Path
) -> None:
    log = _losses(ddp_run)
    paths = [c for c in log if c.startswith("l1:")]
    assert list(log["epoch"]) == [1, 2, 3] and list(log["steps"]) == [4, 8, 12]
    assert len(paths) == 6  # resnet18: layer{2,3,4}.0.conv1 and .downsample.0
    for column in paths:
        assert log[column].iloc[-1] < 0.8 * log[column].iloc[0], column

    pd.testing.assert_frame_equal(_losses(single_run), log, rtol=1e-4)
    a, b = _weights(ddp_run), _weights(single_run)
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(
    ddp_run: Path, tiles: Path, model_checkpoint: Path, work: Path
) -> None:
    out = work / "killed" / "surrogate.pt"
    state = out.with_name("surrogate.state.pt")
    killed = _train(
        tiles, model_checkpoint, out, 2, kill_at="surrogate.step=7"
    )  # each process SIGKILLs itself
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr
    assert not out.exists() and state.is_file()
    saved = torch.load(state, weights_only=True)
    assert (saved["epoch"], saved["step"], saved["global_step"]) == (1, 2, 6)  # mid-epoch; step 7 lost
    assert not list(out.parent.glob(".*.partial-*"))  # no torn temporary files (files.atomic_path's names)

    resumed = _ok(_train(tiles, model_checkpoint, out, 2))  # --resume is the default
    assert "resumed at step 6" in resumed.stdout
    reference, weights = _weights(ddp_run), _weights(out)
    assert reference.keys() == weights.keys()
    assert all(torch.equal(reference[k], weights[k]) for k in reference)
    pd.testing.assert_frame_equal(_losses(out), _losses(ddp_run), rtol=1e-9)
    assert not state.exists()  # finished: the next run starts fresh


@pytest.mark.slow
def test_sigkill_from_outside_at_any_moment_then_resume(
    single_run: Path, tiles: Path, model_checkpoint: Path, work: Path
) -> None:
    """SIGKILL at an arbitrary moment (maybe mid-write of a checkpoint): the resumed run is exact."""
    out = work / "outside-kill" / "surrogate.pt"
    state = out.with_name("surrogate.state.pt")
    launch = [sys.executable, "-m", "smoothsal.cli"]
    args = ["train-surrogate", "--arch", "resnet18", "--num-classes", "2", "--checkpoint", str(model_checkpoint),
            "--tiles", str(tiles), "--out", str(out), "--epochs", str(EPOCHS), "--batch-size", str(BATCH),
            "--workers", "0", "--checkpoint-every", "1", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen([*launch, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.3)  # a few more steps and checkpoint writes
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    done = torch.load(state, weights_only=True)["global_step"]
    assert 0 < done < EPOCHS * STEPS_PER_EPOCH
    resumed = _ok(_train(tiles, model_checkpoint, out, None, "--checkpoint-every", "1"))
    assert f"resumed at step {done}" in resumed.stdout
    reference, weights = _weights(single_run), _weights(out)
    assert all(torch.equal(reference[k], weights[k]) for k in reference)
    assert sorted(p.name for p in out.parent.iterdir()) == ["surrogate.losses.csv", "surrogate.pt"]


def test_changed_settings_refuse_to_resume(
    ddp_run: Path, tiles: Path, model_checkpoint: Path, work: Path, capsys: pytest.CaptureFixture
) -> None:
    out = work / "changed" / "surrogate.pt"
    base = ["train-surrogate", "--arch", "resnet18", "--num-classes", "2", "--checkpoint",
            str(model_checkpoint), "--tiles", str(tiles), "--out", str(out), "--epochs", "1",
            "--batch-size", "8", "--workers", "0", "--no-progress"]  # fmt: skip
    settings = read_surrogate(ddp_run)[1].settings.as_dict() | {"lr": 0.5}  # a state of another run
    fake = {
        "format": STATE_FORMAT,
        "settings": settings,
        "settings_hash": TrainSettings.from_dict(settings).hash,
    }
    save_torch_file(fake, out.with_name("surrogate.state.pt"))
    assert main(base) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("smoothsal train-surrogate: error: training state") and "--no-resume" in err
    assert "epochs" in err and "lr" in err and len(err.splitlines()) == 1


def test_surrogate_refuses_another_architecture(
    ddp_run: Path, tiles: Path, model_checkpoint: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(ValueError, match=r"arch 'resnet18', not 'resnet34'"):
        load_surrogate(ddp_run, arch="resnet34")
    # resnet34's downsampling convs have resnet18's names and shapes: the fingerprint tells them apart
    resnet34 = load_model("resnet34", num_classes=2)
    with pytest.raises(ValueError, match=r"trained for arch 'resnet18' with 2 classes, but this ResNet"):
        load_surrogate(ddp_run, model=resnet34)
    args = ["evaluate", "--arch", "resnet34", "--num-classes", "2", "--tiles", str(tiles),
            "--surrogate", str(ddp_run), "--out", str(ddp_run.parent / "x.csv")]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("smoothsal evaluate: error:") and "resnet18" in err and "resnet34" in err
    # the right model loads, and its weights must be the ones the surrogate was trained on
    resnet18 = load_model("resnet18", num_classes=2, checkpoint=model_checkpoint)
    paths = load_surrogate(ddp_run, arch="resnet18", model=resnet18, checkpoint=model_checkpoint)
    assert smooth(resnet18, "surrogate", surrogate=paths)(torch.zeros(1, 3, 64, 64)).shape == (1, 2)
    with pytest.raises(ValueError, match="retrain the surrogate for these weights"):
        load_surrogate(ddp_run, checkpoint=tiles)


def test_evaluate_writes_the_papers_tables(
    ddp_run: Path, tiles: Path, model_checkpoint: Path, work: Path, capsys: pytest.CaptureFixture
) -> None:
    out = work / "eval" / "table.csv"
    args = ["evaluate", "--arch", "resnet18", "--num-classes", "2", "--checkpoint", str(model_checkpoint),
            "--tiles", str(tiles), "--surrogate", str(ddp_run), "--out", str(out),
            "--per-tile", str(out.with_name("tiles.parquet"))]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    table = pd.read_csv(out).set_index("method")
    assert list(table.index) == ["original", "surrogate", "forward_hook"]
    assert (table["tiles"] == TILES).all() and (table["labelled"] == TILES).all()
    assert table.loc["original", ["pd_all_mean", "pd_target_mean"]].tolist() == [0.0, 0.0]
    assert (table.loc[["surrogate", "forward_hook"], "pd_all_mean"] > 0).all()
    # two classes: the all-classes difference is exactly twice the target-class one
    assert table["pd_all_mean"].tolist() == pytest.approx((2 * table["pd_target_mean"]).tolist())
    assert "| surrogate | 32 |" in out.with_suffix(".md").read_text()

    # the same numbers computed here, independently of the evaluate stage
    tile_table = pd.read_parquet(tiles)
    model = load_model("resnet18", num_classes=2, checkpoint=model_checkpoint)
    x = torch.stack([TileDataset(tile_table, transform=Normalize())[i][0] for i in range(TILES)])
    labels = torch.tensor(tile_table["label"].astype(int).to_numpy())
    paths = read_surrogate(ddp_run)[0]
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


def test_train_surrogate_skips_done_steps_when_resuming() -> None:
    """`Resume` continues mid-epoch; an `EpochBatches` callable is asked to skip, not the loop."""
    model = load_model("resnet18", num_classes=2)
    torch.manual_seed(0)
    data = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    asked, seen = [], []

    def batches(epoch: int, skip: int) -> list[torch.Tensor]:
        asked.append((epoch, skip))
        return data[skip:]

    def record(epoch: int, step: int, losses: dict[str, float]) -> None:
        seen.append((epoch, step))

    paths = train_surrogate(model, batches, epochs=3, resume=Resume(epoch=1, step=1), on_step=record)
    assert asked[-2:] == [(1, 1), (2, 0)] and seen == [(1, 1), (2, 0), (2, 1)]
    seen.clear()  # a plain iterable: the done batches are drawn and dropped
    train_surrogate(model, data, epochs=2, resume=Resume(1, 1, paths), on_step=record)
    assert seen == [(1, 1)]


def test_settings_and_batch_split_errors() -> None:
    assert per_rank_batch_size(512, 2) == 256 and per_rank_batch_size(512, 8) == 64
    with pytest.raises(ValueError, match="multiple of 3"):
        per_rank_batch_size(512, 3)
    s = TrainSettings("resnet18", 2, "abc", "def", n_tiles=10, tile_size=64)
    assert s.hash == TrainSettings.from_dict(s.as_dict()).hash
    assert s.hash != TrainSettings("resnet18", 2, "abc", "def", n_tiles=10, tile_size=64, lr=1e-4).hash
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        TrainSettings("resnet18", 2, "abc", "def", n_tiles=10, tile_size=64, epochs=0)


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


def test_compare_refuses_a_surrogate_without_its_checkpoint(
    ddp_run: Path, model_checkpoint: Path, tiles_dir: Path, work: Path, capsys: pytest.CaptureFixture
) -> None:
    tile = str(tiles_dir / "high-nuclei-score-level2.png")
    out = work / "compare.png"
    args = ["compare", tile, "--arch", "resnet18", "--num-classes", "2", "--surrogate", str(ddp_run),
            "--out", str(out), "--size", "64", "--samples", "2"]  # fmt: skip
    assert main(args) == 1
    assert "was trained on a model checkpoint; pass it with --checkpoint" in capsys.readouterr().err
    assert not out.exists()
    assert main([*args, "--checkpoint", str(model_checkpoint)]) == 0, capsys.readouterr().err
    assert out.exists()
