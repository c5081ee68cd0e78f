"""Surrogate training at cluster scale, for real (smoothsal.surrogate_run): torchrun with 2 gloo processes
on tiles of a real slide agreeing with one process, a SIGKILLed run resumed to identical weights, a state of
other settings refused, the global batch split over processes."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import SURROGATE_BATCH as BATCH
from helpers import SURROGATE_EPOCHS as EPOCHS
from helpers import SURROGATE_TILES as TILES
from helpers import train_args

from smoothsal.models import save_torch_file
from smoothsal.surrogate import TrainSettings, read_surrogate
from smoothsal.surrogate_run import STATE_FORMAT, per_rank_batch_size

STEPS_PER_EPOCH = TILES // BATCH


def _train(
    cli, surrogate_tiles: Path, model: Path, out: Path, nproc: int | None, *extra: str, kill_at: str = ""
) -> subprocess.CompletedProcess:
    """`smoothsal train-surrogate` as a real command: under torchrun with `nproc` processes, or plain;
    ``kill_at``: SMOOTHSAL_KILL_AT for every process."""
    return cli.process(
        *train_args(surrogate_tiles, model, out, *extra), nproc=nproc, kill_at=kill_at, timeout=300
    )


def _ok(run: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def _losses(out: Path) -> pd.DataFrame:
    return pd.read_csv(out.with_name(out.stem + ".losses.csv"))


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def single_surrogate(cli, surrogate_tiles: Path, surrogate_model: Path, surrogate_dir: Path) -> Path:
    """The same run as one plain process (no torchrun)."""
    out = surrogate_dir / "single" / "surrogate.pt"
    assert "1 process(es)" in _ok(_train(cli, surrogate_tiles, surrogate_model, out, None)).stdout
    return out


@pytest.mark.slow
def test_torchrun_two_processes_every_path_learns_and_one_process_agrees(
    ddp_surrogate: Path, single_surrogate: Path
) -> None:
    log = _losses(ddp_surrogate)
    paths = [c for c in log if c.startswith("l1:")]
    assert list(log["epoch"]) == [1, 2, 3] and list(log["steps"]) == [4, 8, 12]
    assert len(paths) == 6  # resnet18: layer{2,3,4}.0.conv1 and .downsample.0
    for column in paths:
        assert log[column].iloc[-1] < 0.8 * log[column].iloc[0], column

    pd.testing.assert_frame_equal(_losses(single_surrogate), log, rtol=1e-4)
    a, b = _weights(ddp_surrogate), _weights(single_surrogate)
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(
    cli, ddp_surrogate: Path, surrogate_tiles: Path, surrogate_model: Path, surrogate_dir: Path
) -> None:
    out = surrogate_dir / "killed" / "surrogate.pt"
    state = out.with_name("surrogate.state.pt")
    killed = _train(
        cli, surrogate_tiles, surrogate_model, out, 2, kill_at="surrogate.step=7"
    )  # SIGKILLs itself
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr
    assert not out.exists() and state.is_file()
    saved = torch.load(state, weights_only=True)
    assert (saved["epoch"], saved["step"], saved["global_step"]) == (1, 2, 6)  # mid-epoch; step 7 lost
    assert not list(out.parent.glob(".*.partial-*"))  # no torn temporary files (files.atomic_path's names)

    resumed = _ok(_train(cli, surrogate_tiles, surrogate_model, out, 2))  # --resume is the default
    assert "resumed at step 6" in resumed.stdout
    reference, weights = _weights(ddp_surrogate), _weights(out)
    assert reference.keys() == weights.keys()
    assert all(torch.equal(reference[k], weights[k]) for k in reference)
    pd.testing.assert_frame_equal(_losses(out), _losses(ddp_surrogate), rtol=1e-9)
    assert not state.exists()  # finished: the next run starts fresh


@pytest.mark.slow
def test_sigkill_from_outside_at_any_moment_then_resume(
    cli, single_surrogate: Path, surrogate_tiles: Path, surrogate_model: Path, surrogate_dir: Path
) -> None:
    """SIGKILL at an arbitrary moment (maybe mid-write of a checkpoint): the resumed run is exact."""
    out = surrogate_dir / "outside-kill" / "surrogate.pt"
    state = out.with_name("surrogate.state.pt")
    args = train_args(surrogate_tiles, surrogate_model, out, "--checkpoint-every", "1")
    proc = cli.popen(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    resumed = _ok(_train(cli, surrogate_tiles, surrogate_model, out, None, "--checkpoint-every", "1"))
    assert f"resumed at step {done}" in resumed.stdout
    reference, weights = _weights(single_surrogate), _weights(out)
    assert all(torch.equal(reference[k], weights[k]) for k in reference)
    assert sorted(p.name for p in out.parent.iterdir()) == ["surrogate.losses.csv", "surrogate.pt"]


def test_changed_settings_refuse_to_resume(
    cli, ddp_surrogate: Path, surrogate_tiles: Path, surrogate_model: Path, surrogate_dir: Path
) -> None:
    out = surrogate_dir / "changed" / "surrogate.pt"
    base = ["train-surrogate", "--arch", "resnet18", "--num-classes", "2", "--checkpoint",
            str(surrogate_model), "--tiles", str(surrogate_tiles), "--out", str(out), "--epochs", "1",
            "--batch-size", "8", "--workers", "0", "--no-progress"]  # fmt: skip
    settings = read_surrogate(ddp_surrogate)[1].settings.as_dict() | {"lr": 0.5}  # a state of another run
    fake = {
        "format": STATE_FORMAT,
        "settings": settings,
        "settings_hash": TrainSettings.from_dict(settings).hash,
    }
    save_torch_file(fake, out.with_name("surrogate.state.pt"))
    err = cli(*base, expect=1).err.strip()
    assert err.startswith("smoothsal train-surrogate: error: training state") and "--no-resume" in err
    assert "epochs" in err and "lr" in err and len(err.splitlines()) == 1


def test_the_global_batch_splits_evenly_over_the_processes() -> None:
    assert per_rank_batch_size(512, 2) == 256 and per_rank_batch_size(512, 8) == 64
    with pytest.raises(ValueError, match="multiple of 3"):
        per_rank_batch_size(512, 3)
