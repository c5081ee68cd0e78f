"""Writing outputs so that a killed job never leaves a file that looks complete."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import BadOutput, SmoothsalError, one_line

__all__ = ["atomic_dir", "atomic_path", "is_zarr_group", "partial_paths", "replace_dir"]

_MARK = ".partial-"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``; it becomes ``path`` only if the block completes."""
    path = Path(path)
    if path.is_dir():
        raise BadOutput(f"{path} is a directory; give a file path inside it, e.g. {path / 'out'}")
    with _writable(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{_MARK}{os.getpid()}")
    try:
        with _writable(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _writable(path: Path) -> Iterator[None]:
    """The OS refusing to write ``path`` (permissions, a full disk, a read-only file system) is bad output."""
    try:
        yield
    except SmoothsalError:
        raise
    except OSError as err:
        raise BadOutput(
            f"{path}: cannot be written ({one_line(err)}); give an --out you may write to"
        ) from err


def partial_paths(path: str | Path) -> list[Path]:
    """Temporary files that killed writers of ``path`` left behind."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}{_MARK}*"))


def is_zarr_group(path: Path) -> bool:
    """A Zarr group directory (v2 ``.zgroup`` or v3 ``zarr.json``)."""
    return path.is_dir() and ((path / ".zgroup").is_file() or (path / "zarr.json").is_file())


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory ``src`` to ``dst``; a former ``dst`` is removed only afterwards."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(path: str | Path, check_existing: Callable[[Path], None]) -> Iterator[Path]:
    """A fresh hidden sibling ``.NAME.partial`` (not yet created) that replaces ``path`` only if the block
    completes; one a killed run left is removed first.

    An existing ``path`` is first given to ``check_existing``, which raises if it is not ours to replace:
    a typo such as ``--out results/`` must never delete a folder.
    """
    path = Path(path)
    if path.exists():
        check_existing(path)
    with _writable(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _writable(path):
            yield tmp
            replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
