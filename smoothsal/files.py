"""Writing outputs so that a killed job never leaves a file that looks complete, two writers never mix
their work, and nothing a command did not write is ever deleted or overwritten.

The rule for directory outputs (saliency stores, heatmap containers, reports, viewer exports): each
carries a *marker*, ``{"kind": …, "format": N}``, written by the one command that makes that kind of
output: in the root attributes (key ``smoothsal_output``) of a Zarr group, in a hidden file
``.smoothsal-output.json`` inside any other directory. An existing ``--out`` is replaced only if it
carries the marker of the command now writing (same kind, same format version, or an earlier format that
the kind lists in ``replaces``) or is an empty directory;
anything else is refused with one line naming it (`BadOutput`) and left untouched. Nor is a marked output
replaced while it holds entries its writer did not put there (`foreign_entries`): the marker of a finished
output records the names at its top level (``"entries"``), and what lies deeper must bear a name the
writer gives (`OutputKind.files`). An output from before the record is judged by those names alone, at
every depth. No output is written inside a marked output (`refuse_inside_output`): it would be deleted
with it, or keep it from being replaced.

Single-file outputs (tables, figures, checkpoints, logs) are written under a hidden temporary name and
renamed over the target: an existing *file* of that name is replaced whole, a directory or a link there
is refused before any work (`check_file_out`). The per-tile saliency table goes further: it replaces only
a table that `smoothsal saliency` wrote (`store.check_out`).

A writer holds an exclusive lock on its output for the whole run: ``fcntl.flock`` on a hidden file
``.NAME.lock`` beside it (the OS releases the lock when the process dies, however it dies; only the
holder removes the file, and a writer checks that the file it locked is still the one of that name). A second writer of the same output fails
at once, naming it. The work goes to a hidden sibling named after the writer's process
(``.NAME.partial-PID``) and replaces the output in one rename when complete; what killed writers left is
cleared only by a writer holding the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BadOutput, SmoothsalError, one_line
from .killpoints import kill_point

__all__ = [
    "MARKER_FILE",
    "MARKER_KEY",
    "OutputKind",
    "atomic_dir",
    "atomic_path",
    "check_file_out",
    "check_replaceable",
    "foreign_entries",
    "is_zarr_group",
    "lock_path",
    "output_dir",
    "output_lock",
    "output_locks",
    "partial_paths",
    "read_marker",
    "refuse_inside_output",
    "refuse_non_file",
    "replace_dir",
    "writable",
]

_MARK = ".partial-"
MARKER_KEY = "smoothsal_output"  # root attribute of a Zarr output
MARKER_FILE = ".smoothsal-output.json"  # marker inside any other directory output
ZARR_FILES = (
    r"(?:[^/]+/)*(?:\.z(?:array|attrs|group|metadata)|zarr\.json|c|(?:c\.)?\d+(?:\.\d+)*)"  # Zarr v2/v3 keys
)
_FORMAT_NAMES = frozenset({MARKER_FILE, ".zattrs", ".zgroup", ".zmetadata", "zarr.json"})  # at the top
_SNAKEMAKE = ".snakemake_timestamp"  # Snakemake's flag in each directory output it made (at any depth)
_NAMED = 3  # foreign entries a refusal names


@dataclass(frozen=True)
class OutputKind:
    """One kind of directory output: its marker and the command that writes it (for messages)."""

    kind: str  # e.g. "saliency-store"
    command: str  # e.g. "smoothsal saliency"
    format: int = 1  # bumped when the layout changes: an output of another format is not replaced …
    replaces: tuple[int, ...] = ()  # … except these earlier formats of this kind (still read, replaced whole)
    zarr: bool = False  # a Zarr group (marker in its root attributes; the writer puts it there)
    files: str = ""  # regex of the files' paths the writer makes, relative to the output ("": Zarr keys)

    @property
    def marker(self) -> dict[str, Any]:
        return {"kind": self.kind, "format": self.format}

    def record(self, path: Path) -> dict[str, Any]:
        """The marker of the finished output ``path``, recording the names at its top level (what
        `foreign_entries` allows there); the writer sets it last (a Zarr writer in the root attributes)."""
        return self.marker | {"entries": sorted(os.listdir(path))}

    def carried_by(self, marker: dict[str, Any] | None) -> bool:
        """Whether ``marker`` (`read_marker`'s) is this kind's, in this format (whatever it records)."""
        return marker is not None and (marker.get("kind"), marker.get("format")) == (self.kind, self.format)

    def replaceable(self, marker: dict[str, Any] | None) -> bool:
        """Whether an output carrying ``marker`` may be replaced: this kind's, in this or a `replaces` format."""
        formats = (self.format, *self.replaces)
        return marker is not None and marker.get("kind") == self.kind and marker.get("format") in formats

    def makes(self, relative: str) -> bool:
        """Whether the writer may have made the file at ``relative`` (a POSIX path inside the output)."""
        return re.fullmatch(self.files or (ZARR_FILES if self.zarr else ".*"), relative) is not None


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``; it becomes ``path`` only if the block completes."""
    path = Path(path)
    refuse_non_file(path)
    with writable(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{_MARK}{os.getpid()}")
    try:
        with writable(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def writable(path: Path) -> Iterator[None]:
    """The OS refusing to write ``path`` (permissions, a full disk, a read-only file system) is bad output;
    the message names ``path`` (the output the user gave), never a hidden temporary."""
    try:
        yield
    except SmoothsalError:
        raise
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else one_line(err)
        raise BadOutput(f"{path}: cannot be written ({reason}); give an --out you may write to") from err


def _sibling(path: Path) -> Path:
    """A file path beside ``path`` with the same suffixes: ``a.geojson.gz`` → ``a-new.geojson.gz``."""
    base, dot, rest = path.name.partition(".")
    return path.with_name(f"{base or path.name}-new{dot}{rest}" if base else f"{path.name}-new")


_PID_DIGITS = 7  # Linux pids stay below 2**22 (4194304)


def check_name_length(path: Path) -> None:
    """Before any work: the output's name and the hidden siblings written beside it (``.NAME.partial-PID``,
    ``.NAME.lock``) fit the file system's limit on a name (255 bytes on most)."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    longest = len(f".{path.name}{_MARK}".encode()) + _PID_DIGITS
    if longest > limit:
        raise BadOutput(
            f"{path}: its name is {len(path.name.encode())} bytes and the hidden temporary written beside it "
            f"(.NAME{_MARK}PID) {longest}, over the file system's limit of {limit} bytes per name; give a name "
            f"of at most {limit - longest + len(path.name.encode())} bytes"
        )


def refuse_non_file(path: Path, option: str = "--out") -> None:
    """The one rule for every single-file output: a link there (to a file or not) is neither written
    through nor replaced, and a directory is never replaced; one line naming it and a path that works.
    Its name must fit the file system with the temporary beside it (`check_name_length`)."""
    check_name_length(path)
    if path.is_symlink():
        raise BadOutput(
            f"{path} is a link (to {os.readlink(path)}); smoothsal neither writes through nor replaces links: "
            f"give another file path for {option}, e.g. {_sibling(path)}"
        )
    if path.is_dir():
        raise BadOutput(f"{path} is a directory; give a file path for {option}, e.g. {path / 'out'}")


def check_file_out(
    *paths: str | Path | None, option: str = "--out", within: Iterable[str | Path] = ()
) -> None:
    """Before any work: each single-file output may be written (a directory or a link there is refused,
    never replaced; its folder can be created and written; it lies in no marked output, nor in the
    directory outputs ``within`` that the command writes). A file there is replaced atomically: single
    files are replaced whole, folders never (see the module doc)."""
    for path in filter(None, paths):
        path = Path(path)
        refuse_non_file(path, option)
        refuse_inside_output(path, option, within)
        folder = path.parent  # made when the output is written: bad input leaves no empty folder behind
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        with writable(path):
            if not folder.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))


def refuse_inside_output(path: Path, option: str = "--out", within: Iterable[str | Path] = ()) -> None:
    """An output never goes inside a directory output that carries a marker (any folder above ``path``,
    as given or with links resolved) or that the command writes (``within``): that output is replaced
    whole when rewritten, and an entry its writer did not make keeps it from being replaced."""
    path = Path(os.path.abspath(path))
    ours = {Path(os.path.abspath(p)) for p in within} | {Path(p).resolve() for p in within}
    for folder in dict.fromkeys([*path.parents, *path.parent.resolve().parents, path.parent.resolve()]):
        try:
            marker = None if folder in ours else read_marker(folder)
        except OSError:
            continue
        if folder in ours or marker is not None:
            what = f"a {marker.get('kind')}" if marker else "the output this command writes"
            raise BadOutput(
                f"{path} lies inside {folder}, {what}, which smoothsal rewrites whole (it would be deleted, or "
                f"keep that output from being rewritten); give an {option} outside it, e.g. {folder.parent / path.name}"
            )


def partial_paths(path: str | Path) -> list[Path]:
    """Temporary files that killed writers of ``path`` left behind."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}{_MARK}*"))


def is_zarr_group(path: Path) -> bool:
    """A Zarr group directory (v2 ``.zgroup`` or v3 ``zarr.json``)."""
    return path.is_dir() and ((path / ".zgroup").is_file() or (path / "zarr.json").is_file())


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The output marker a directory carries (see the module doc), None when it has none."""
    path = Path(path)
    if (path / "zarr.json").is_file():
        meta = _json(path / "zarr.json")
        found = (meta.get("attributes") or {}).get(MARKER_KEY) if isinstance(meta, dict) else None
    elif (path / ".zgroup").is_file():
        attrs = _json(path / ".zattrs")
        found = attrs.get(MARKER_KEY) if isinstance(attrs, dict) else None
    else:
        found = _json(path / MARKER_FILE)
    return found if isinstance(found, dict) else None


def foreign_entries(path: Path, kind: OutputKind) -> list[str]:
    """What ``path``, an output carrying ``kind``'s marker, holds that its writer did not put there
    (relative paths, a folder with a trailing ``/``): a name at the top level that the marker's record
    lacks (an output from before the record: a file whose path ``kind`` does not make); deeper, a link
    or a file whose path ``kind`` does not make. The format's own files and Snakemake's flag are allowed."""
    entries = (read_marker(path) or {}).get("entries")
    found = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.name in _FORMAT_NAMES or entry.name == _SNAKEMAKE:
            continue
        folder, recorded = entry.is_dir(follow_symlinks=False), isinstance(entries, list)
        if recorded and entry.name not in entries:
            found.append(entry.name + "/" * folder)
        elif entry.is_symlink() or (not folder and not recorded and not kind.makes(entry.name)):
            found.append(entry.name)
        elif folder:
            found += _foreign_below(Path(entry.path), path, kind)
    return found


def _foreign_below(folder: Path, top: Path, kind: OutputKind) -> list[str]:
    found = []
    for root, dirs, names in os.walk(folder):
        here = Path(root)
        for name in sorted(dirs):
            if (here / name).is_symlink():
                found.append((here / name).relative_to(top).as_posix())
        for name in sorted(names):
            relative = (here / name).relative_to(top).as_posix()
            if name != _SNAKEMAKE and ((here / name).is_symlink() or not kind.makes(relative)):
                found.append(relative)
    return found


def _describe(path: Path) -> str:
    marker = read_marker(path)
    if marker is not None:
        return f"a {marker.get('kind')} (format {marker.get('format')})"
    return "a Zarr group of another program" if is_zarr_group(path) else "a folder smoothsal did not write"


def check_replaceable(path: str | Path, kind: OutputKind) -> None:
    """Raise `BadOutput` unless ``path`` is absent, holds nothing (no file or link at any depth: Snakemake
    creates the folders of a rule's outputs before the job), or carries ``kind``'s marker."""
    path = Path(path)
    check_name_length(path)
    refuse_inside_output(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise BadOutput(
            f"{path} exists and is not a directory that `{kind.command}` wrote; give a new --out or "
            "remove it yourself"
        )
    if not path.exists():
        return
    if kind.replaceable(read_marker(path)):
        with writable(path):
            found = foreign_entries(path, kind)
        if found:
            more = ", …" if len(found) > _NAMED else ""
            raise BadOutput(
                f"{path} holds {len(found)} entr{'y' if len(found) == 1 else 'ies'} that `{kind.command}` did "
                f"not write ({', '.join(found[:_NAMED])}{more}), which replacing it would delete: move them "
                "out of it, or give another --out"
            )
        return
    with writable(path):
        empty = _holds_nothing(path)
    if not empty:
        raise BadOutput(
            f"{path} exists and is {_describe(path)}; `{kind.command}` replaces only a {kind.kind} "
            f"(format {kind.format}) it wrote: give a new --out or remove it yourself"
        )


def _holds_nothing(path: Path) -> bool:
    """Whether ``path`` is a tree of folders only: no file and no link anywhere below it."""
    for root, dirs, files in os.walk(path):
        if files or any((Path(root) / d).is_symlink() for d in dirs):
            return False
    return True


def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _locked_fd(path: Path, lock: Path) -> int:
    """An open descriptor holding the flock of ``lock``, the file now at that name (retried when the
    holder before removed it between our open and our lock)."""
    while True:
        with writable(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BadOutput(
                f"{path} is being written by another process (it holds {lock.name}); wait for it to "
                "finish or give another --out"
            ) from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # we locked a file its holder had already removed: take the one there now


@contextmanager
def output_lock(path: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock of output ``path`` for the block; `BadOutput` at once when another process
    holds it. The lock file ``.NAME.lock`` is removed by its holder just before it lets go (a waiter
    that opened the removed file finds it gone and takes the new one), so a finished output leaves
    none; a killed writer's stays, unlocked, and the next writer reuses it."""
    path = Path(path)
    check_name_length(path)
    lock = lock_path(path)
    fd = _locked_fd(path, lock)
    try:
        kill_point("files.locked")
        yield path
    finally:
        try:
            os.unlink(lock)
        except OSError:
            pass
        os.close(fd)


@contextmanager
def output_locks(*paths: str | Path) -> Iterator[None]:
    """The locks of several outputs of one command (always taken in the order given)."""
    with ExitStack() as stack:
        for path in paths:
            stack.enter_context(output_lock(path))
        yield


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory ``src`` to ``dst``; a former ``dst`` is removed only afterwards.
    Call it holding ``dst``'s lock."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def _clear_partials(path: Path) -> None:
    """Remove what killed writers of ``path`` left (only a holder of the lock calls this)."""
    for stale in partial_paths(path):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def atomic_dir(path: str | Path, check_existing: Callable[[Path], None]) -> Iterator[Path]:
    """A fresh hidden sibling ``.NAME.partial-PID`` (not yet created) that replaces ``path`` only if the
    block completes, all under ``path``'s lock.

    An existing ``path`` is given to ``check_existing`` before anything is written and again just before
    the replace; it raises if ``path`` is not ours to replace.
    """
    path = Path(path)
    with output_lock(path):
        if path.exists() or path.is_symlink():
            check_existing(path)
        _clear_partials(path)
        tmp = path.with_name(f".{path.name}{_MARK}{os.getpid()}")
        try:
            with writable(path):
                yield tmp
                if path.exists() or path.is_symlink():
                    check_existing(path)
                replace_dir(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def output_dir(path: str | Path, kind: OutputKind) -> Iterator[Path]:
    """`atomic_dir` for one kind of output: an existing ``path`` is replaced only if it carries ``kind``'s
    marker (or is an empty directory); the finished output carries it (a Zarr writer sets the root
    attribute itself, last, with `OutputKind.record`; any other directory gets `MARKER_FILE` here)."""
    refuse_inside_output(Path(path))
    with atomic_dir(path, lambda p: check_replaceable(p, kind)) as tmp:
        yield tmp
        if not kind.zarr:
            tmp.mkdir(exist_ok=True)
            (tmp / MARKER_FILE).write_text(json.dumps(kind.record(tmp)) + "\n")
        marker = read_marker(tmp)
        if not kind.carried_by(marker) or "entries" not in marker or foreign_entries(tmp, kind):
            raise RuntimeError(  # a bug: the output could not be replaced later
                f"{tmp}: the writer did not set the {kind.kind} marker last (`OutputKind.record`), or made "
                f"{foreign_entries(tmp, kind)[:_NAMED]}, which `OutputKind.files` does not allow"
            )
