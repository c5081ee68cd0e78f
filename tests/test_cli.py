"""Bad input at the command line: one line naming the file and the fix, exit status 1."""

from __future__ import annotations

import pytest

from smoothsal.cli import main


def run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def test_output_path_that_is_a_directory(slides_dir, tmp_path, capsys):
    code, err = run(["tiles", str(slides_dir / "CMU-1-Small-Region.svs"), "--out", str(tmp_path)], capsys)
    assert code == 1 and err.count("\n") == 1
    assert f"{tmp_path} is a directory; give a file path inside it" in err
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_corrupt_checkpoint(tiles_dir, tmp_path, capsys):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"not a torch file")
    args = [
        "compare",
        str(tiles_dir / "no-tissue.png"),
        "--checkpoint",
        str(bad),
        "--out",
        str(tmp_path / "f.png"),
    ]
    code, err = run(args, capsys)
    assert code == 1 and err.count("\n") == 1
    assert f"checkpoint {bad} could not be read as a torch file" in err and "torch.save" in err


def test_input_the_model_cannot_take_is_one_line(tiles_dir, tmp_path, capsys):
    """The bundle's head pools 7×7: a 64-px tile is too small; torch's complaint comes as one line."""
    args = ["compare", str(tiles_dir / "no-tissue.png"), "--arch", "monai_fc_resnet18", "--num-classes", "1",
            "--size", "64", "--samples", "1", "--out", str(tmp_path / "f.png")]  # fmt: skip
    code, err = run(args, capsys)
    assert code == 1 and err.count("\n") == 1
    assert "Output size is too small" in err and "SMOOTHSAL_DEBUG=1" in err


@pytest.mark.parametrize(
    "option,message",
    [(["--mask-mpp", "0"], "--mask-mpp 8"), (["--max-tiles", "-1"], "--max-tiles must be >= 0")],
)
def test_tiles_settings_out_of_range(slides_dir, tmp_path, capsys, option, message):
    args = [
        "tiles",
        str(slides_dir / "CMU-1-Small-Region.svs"),
        "--out",
        str(tmp_path / "t.parquet"),
        *option,
    ]
    code, err = run(args, capsys)
    assert code == 1 and message in err
