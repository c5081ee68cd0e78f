"""The user-facing error family: builtin bases, one-line messages, and errors raised in DataLoader
worker processes coming back as themselves."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from smoothsal import errors


class Failing(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 2:
            raise errors.BadSlide("/data/a.svs: tile data at level 0, (0, 0) cannot be read; re-copy it")
        return torch.zeros(1)


def test_every_class_is_a_smoothsal_error_and_the_builtin_it_stands_for():
    for cls in (errors.BadOption, errors.BadSlide, errors.BadAnnotation, errors.BadCheckpoint,
                errors.BadTable, errors.BadStore):  # fmt: skip
        assert issubclass(cls, errors.BadInput) and issubclass(cls, ValueError)
        assert issubclass(cls, errors.SmoothsalError)
    assert issubclass(errors.MissingInput, FileNotFoundError)
    assert issubclass(errors.BadOutput, OSError) and not issubclass(errors.BadOutput, ValueError)
    assert not issubclass(ValueError, errors.SmoothsalError)


def test_one_line_joins_a_multi_line_message():
    assert (
        errors.one_line(OSError("Not a JPEG file:\n  starts with 0x12"))
        == "Not a JPEG file: starts with 0x12"
    )
    assert errors.one_line(KeyError()) == "KeyError"


def test_an_error_from_a_worker_process_comes_back_with_its_own_message():
    loader = DataLoader(Failing(), batch_size=1, num_workers=1)
    with pytest.raises(errors.BadSlide) as caught:
        list(loader)
    wrapped = caught.value
    assert str(wrapped).startswith("Caught BadSlide in DataLoader worker process 0")  # torch's wrapping
    original = errors.from_worker(wrapped)
    assert type(original) is errors.BadSlide
    assert str(original) == "/data/a.svs: tile data at level 0, (0, 0) cannot be read; re-copy it"
    plain = errors.BadTable("t.parquet: no tiles")
    assert errors.from_worker(plain) is plain


def test_terminal_escapes_never_reach_a_message(cli, tmp_path, tiles_dir):
    """Issue 27 case 15: torch colours parts of its messages; a one-line error quoting them is plain."""
    import torchvision

    coloured = RuntimeError(
        "Weights only load failed, \x1b[1mdo those steps only if you trust it\x1b[0m.\nmore"
    )
    assert errors.one_line(coloured) == "Weights only load failed, do those steps only if you trust it. more"
    assert errors.plain("\x1b[31;1mred\x1b[0m \x1b[?25hcursor") == "red cursor"
    whole = tmp_path / "whole.pt"
    torch.save(
        torchvision.models.resnet18(num_classes=2), whole
    )  # a pickled module: torch's coloured refusal
    tile = min(tiles_dir.glob("*.png"))
    err = cli("compare", tile, "--arch", "resnet18", "--num-classes", "2", "--checkpoint", whole,
              "--out", tmp_path / "c.png", expect=1).err  # fmt: skip
    assert len(err.strip().splitlines()) == 1 and str(whole) in err and "\x1b" not in err
