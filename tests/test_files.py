"""Outputs written whole or not at all, and never over what is not ours."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import zarr

from smoothsal import files
from smoothsal.errors import BadOutput

KIND = files.OutputKind("test-output", "smoothsal test")


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
    assert (out / "b").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.lock", "d"]  # the lock file stays


def tree(path):
    """Every file and folder under ``path`` with its bytes (folders: None), to compare byte for byte."""
    return {
        str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))
    }


def test_output_dir_replaces_only_its_own_kind_and_marks_what_it_writes(tmp_path):
    out = tmp_path / "d"
    with files.output_dir(out, KIND) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("1")
    assert files.read_marker(out) == KIND.marker
    assert json.loads((out / files.MARKER_FILE).read_text()) == {"kind": "test-output", "format": 1}
    with files.output_dir(out, KIND) as tmp:  # ours: replaced as a whole
        tmp.mkdir()
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [files.MARKER_FILE, "b"]

    other = files.OutputKind("test-output", "smoothsal test", format=2)  # same kind, other format
    refused = r"d exists and is a test-output \(format 1\), not a test-output"
    with pytest.raises(BadOutput, match=refused), files.output_dir(out, other):
        pass
    empty = tmp_path / "empty"
    empty.mkdir()
    with files.output_dir(empty, KIND) as tmp:  # an empty folder holds nothing to lose
        tmp.mkdir()
    assert files.read_marker(empty) == KIND.marker


@pytest.mark.parametrize(
    "case", ["hidden files", "zarr of another program", "zarr of another kind", "a file"]
)
def test_output_dir_refuses_and_leaves_untouched_what_it_did_not_write(tmp_path, case):
    out = tmp_path / "out"
    if case == "hidden files":
        (out / ".git").mkdir(parents=True)
        (out / ".env").write_text("secret")
        (out / "tables").mkdir()
        (out / "tables" / "mine.csv").write_text("a,b")
    elif case == "a file":
        out.write_text("notes")
    else:
        group = zarr.open_group(out, mode="w", zarr_format=2)
        if case == "zarr of another kind":
            group.attrs[files.MARKER_KEY] = {"kind": "saliency-store", "format": 1}
    before = tree(tmp_path)
    refused = r"^\S*out exists and is .*give a new --out or remove it yourself$"
    with pytest.raises(BadOutput, match=refused), files.output_dir(out, KIND) as tmp:
        tmp.mkdir()
    assert tree(tmp_path) == {**before, ".out.lock": b""}


def test_a_second_writer_fails_at_once_and_the_lock_dies_with_the_first(tmp_path):
    out = tmp_path / "locked"
    script = (
        "import sys, time; from smoothsal import files\n"
        "with files.output_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        began = time.monotonic()
        locked = r"locked is being written by another process \(it holds \.locked\.lock\)"
        with pytest.raises(BadOutput, match=locked), files.output_dir(out, KIND):
            pass
        assert time.monotonic() - began < 1  # no waiting
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs, the OS drops the lock
        holder.wait()
    with files.output_dir(out, KIND) as tmp:
        tmp.mkdir()
    assert files.read_marker(out) == KIND.marker


def test_partials_of_killed_writers_are_cleared_by_the_next_writer(tmp_path):
    out = tmp_path / "o"
    stale = tmp_path / ".o.partial-99999"
    stale.mkdir()
    (stale / "half").write_text("x")
    with files.output_dir(out, KIND) as tmp:
        assert tmp.name == f".o.partial-{__import__('os').getpid()}" and not stale.exists()
        tmp.mkdir()
