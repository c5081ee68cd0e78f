"""Writing outputs so that a killed job never leaves a file that looks complete."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "partial_paths"]

_MARK = ".partial-"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``; it becomes ``path`` only if the block completes."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file path inside it, e.g. {path / 'out'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{_MARK}{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def partial_paths(path: str | Path) -> list[Path]:
    """Temporary files that killed writers of ``path`` left behind."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}{_MARK}*"))
