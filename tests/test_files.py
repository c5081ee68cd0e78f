"""Outputs written whole or not at all, and never over what is not ours."""

from __future__ import annotations

import pytest

from smoothsal import files
from smoothsal.errors import BadOutput


def test_atomic_path_appears_only_when_the_block_completes(tmp_path):
    out = tmp_path / "sub" / "t.txt"
    with pytest.raises(RuntimeError, match="killed"), files.atomic_path(out) as tmp:
        tmp.write_text("half")
        assert files.partial_paths(out) == [tmp]  # the temporary sits beside it, hidden
        raise RuntimeError("killed")
    assert not out.exists() and files.partial_paths(out) == []
    with files.atomic_path(out) as tmp:
        tmp.write_text("whole")
    assert out.read_text() == "whole" and files.partial_paths(out) == []
    with (
        pytest.raises(BadOutput, match=r"is a directory; give a file path inside it"),
        files.atomic_path(tmp_path),
    ):
        pass


def test_an_unwritable_output_is_bad_output_naming_it(tmp_path):
    """The OS refusing the write (here: a parent that is a file, which no permission bit lets one bypass)."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    match = r"notes\.txt/t\.txt: cannot be written .*give an --out you may write to"
    with pytest.raises(BadOutput, match=match), files.atomic_path(blocker / "t.txt") as tmp:
        tmp.write_text("x")
    with (
        pytest.raises(BadOutput, match=r"notes\.txt/d: cannot be written"),
        files.atomic_dir(blocker / "d", print),
    ):
        pass
    assert blocker.read_text() == "mine"


def test_atomic_dir_replaces_only_what_the_check_accepts(tmp_path):
    out = tmp_path / "d"
    with files.atomic_dir(out, lambda p: None) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("1")
    with files.atomic_dir(out, lambda p: None) as tmp:
        tmp.mkdir()
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]  # replaced as a whole

    def refuse(path):
        raise BadOutput(f"{path} is not ours")

    with pytest.raises(BadOutput, match="is not ours"), files.atomic_dir(out, refuse):
        pass
    assert (out / "b").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
