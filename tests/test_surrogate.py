"""The surrogate (smoothsal.surrogate): its training loop resumes mid-epoch, its settings hash, its file
refuses another architecture, another model's layers and other weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smoothsal import load_model, smooth
from smoothsal.surrogate import Resume, TrainSettings, load_surrogate, train_surrogate


def test_surrogate_refuses_another_architecture(
    cli, ddp_surrogate: Path, surrogate_tiles: Path, surrogate_model: Path
) -> None:
    with pytest.raises(ValueError, match=r"arch 'resnet18', not 'resnet34'"):
        load_surrogate(ddp_surrogate, arch="resnet34")
    # resnet34's downsampling convs have resnet18's names and shapes: the fingerprint tells them apart
    resnet34 = load_model("resnet34", num_classes=2)
    with pytest.raises(ValueError, match=r"trained for arch 'resnet18' with 2 classes, but this ResNet"):
        load_surrogate(ddp_surrogate, model=resnet34)
    args = ["evaluate", "--arch", "resnet34", "--num-classes", "2", "--tiles", str(surrogate_tiles),
            "--surrogate", str(ddp_surrogate), "--out", str(ddp_surrogate.parent / "x.csv")]  # fmt: skip
    err = cli(*args, expect=1).err.strip()
    assert err.startswith("smoothsal evaluate: error:") and "resnet18" in err and "resnet34" in err
    # the right model loads, and its weights must be the ones the surrogate was trained on
    resnet18 = load_model("resnet18", num_classes=2, checkpoint=surrogate_model)
    paths = load_surrogate(ddp_surrogate, arch="resnet18", model=resnet18, checkpoint=surrogate_model)
    assert smooth(resnet18, "surrogate", surrogate=paths)(torch.zeros(1, 3, 64, 64)).shape == (1, 2)
    with pytest.raises(ValueError, match="retrain the surrogate for these weights"):
        load_surrogate(ddp_surrogate, checkpoint=surrogate_tiles)


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
    seen.clear()  # on_epoch stops the loop after the epoch for which it returns True
    ended = []
    train_surrogate(model, data, epochs=5, on_step=record, on_epoch=lambda e: ended.append(e) or e == 1)
    assert ended == [0, 1] and seen == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_settings_hash_and_range_errors() -> None:
    s = TrainSettings("resnet18", 2, "abc", "def", n_tiles=10, tile_size=64)
    assert s.hash == TrainSettings.from_dict(s.as_dict()).hash
    assert s.hash != TrainSettings("resnet18", 2, "abc", "def", n_tiles=10, tile_size=64, lr=1e-4).hash
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        TrainSettings("resnet18", 2, "abc", "def", n_tiles=10, tile_size=64, epochs=0)
