"""The saliency output of one slide under one method, written and read only here: the Zarr store of
every tile's maps and the per-tile results table beside it.

Store (Zarr v2 group, ``{method}.zarr``): one float32 array ``{attribution}/{layer}`` of shape
[tiles, h, w] per attribution and layer (each tile's map summed over channels, at the layer's resolution;
row i = row i of the tile table), chunked by ``CHUNK_TILES`` tiles; its root attribute ``smoothsal`` is
the store's ``meta``: version, slide_id, slide_path, method, layers (forward order), attributions,
settings (every setting that affects results, one dict), tiles_sha256, n_tiles.

Results table (Parquet, ``{method}.parquet``): one row per tile (`results_columns`), the same
``meta`` as JSON in the schema metadata under ``smoothsal``. Table format 2 added ``checkerboard/…`` columns;
store format 2 / table format 3 the model spec in ``settings`` (``model_kwargs``, ``model_code_sha256``);
earlier formats are still read and replaced.

``StoreWriter`` writes both resumably: work state sits in a hidden sibling ``.{store}.partial/`` (the
store being written, one row file per batch, a progress file); the store and the table appear under
their final names only when every tile is done.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from . import files
from .errors import BadOption, BadOutput, BadStore, BadTable, MissingInput, one_line
from .files import MARKER_KEY, OutputKind, atomic_path, check_replaceable, read_marker, replace_dir, writable
from .killpoints import kill_point

__all__ = [
    "CHUNK_TILES",
    "RESULT_COLUMNS",
    "SHARED_SETTINGS",
    "STORE_KIND",
    "TABLE_MARKER",
    "Results",
    "SaliencyStore",
    "StoreWriter",
    "TileMaps",
    "check_out",
    "chunk_file",
    "measure_columns",
    "open_store",
    "partial_dir",
    "read_results",
    "results_columns",
    "results_meta",
    "table_marker",
    "write_results",
]

PROGRESS_FORMAT = "smoothsal-saliency-progress/2"  # /2: row files carry the checkerboard columns
COMPACT_ROWS = 64  # per-batch row files kept before they are merged into one
CHUNK_TILES = 64  # tiles per zarr chunk (one chunk = 64 maps of one layer: ~1 MB at 56×56)
META_KEYS = ("slide_id", "method", "layers", "attributions", "tiles_sha256", "n_tiles")
STORE_FIX = "give a `smoothsal saliency` output"
# Settings of a saliency job that must agree between the outputs of one slide (every method's).
SHARED_SETTINGS = (
    "arch", "num_classes", "checkpoint", "model_sha256", "mean", "std", "attributions", "layers",
    "smoothgrad_samples", "smoothgrad_stdev", "seed", "target", "task", "dataset", "precision",
)  # fmt: skip
RESULTS_FIX = "give the per-tile .parquet tables that `smoothsal saliency --table` writes"
# What every per-tile results table has (besides tv/… and, from format 2, checkerboard/… columns).
RESULT_COLUMNS = ("dataset", "slide_id", "method", "arch", "tile", "task", "pd_all", "pd_target")

log = logging.getLogger(__name__)


# --- reading the store ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SaliencyStore:
    """An opened saliency store and its root metadata (``meta``, see the module doc)."""

    path: Path
    group: zarr.Group
    meta: dict[str, Any]

    @property
    def method(self) -> str:
        return str(self.meta["method"])

    @property
    def layers(self) -> list[str]:
        return [str(v) for v in self.meta["layers"]]

    @property
    def attributions(self) -> list[str]:
        return [str(v) for v in self.meta["attributions"]]

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.meta.get("settings") or {})

    def array(self, attribution: str, layer: str) -> zarr.Array:
        try:
            return self.group[f"{attribution}/{layer}"]
        except KeyError:
            raise BadStore(
                f"{self.path}: no array {attribution}/{layer} although its metadata lists it; the store "
                "is incomplete, rerun `smoothsal saliency`"
            ) from None

    def maps(self, attribution: str, layer: str) -> TileMaps:
        """Row i (tile i's map) of one array, read through a small cache of its chunks."""
        return TileMaps(self.array(attribution, layer), self.path)


def open_store(path: str | Path) -> SaliencyStore:
    """Open a saliency store read-only; a one-line error naming it when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise MissingInput(f"{path}: saliency store not found; run `smoothsal saliency` first")
    try:
        group = zarr.open_group(path, mode="r")
    except (FileNotFoundError, ValueError, KeyError, zarr.errors.BaseZarrError) as err:
        raise BadStore(f"{path}: not a zarr store ({one_line(err)}); {STORE_FIX}") from None
    meta = group.attrs.get("smoothsal")
    if not isinstance(meta, dict) or any(k not in meta for k in META_KEYS):
        raise BadStore(
            f"{path}: no smoothsal saliency metadata (root attribute 'smoothsal' with {', '.join(META_KEYS)}); "
            f"{STORE_FIX}"
        )
    return SaliencyStore(path, group, dict(meta))


class TileMaps:
    """Row i of a [n, h, w] store array, read one store chunk at a time through a small LRU cache."""

    def __init__(self, array: zarr.Array, path: Path | str = "store", max_bytes: int = 64 << 20) -> None:
        self.array, self.path = array, path
        self.step = int(array.chunks[0])
        per_chunk = self.step * int(np.prod(array.shape[1:])) * array.dtype.itemsize
        self.capacity = max(2, max_bytes // max(1, per_chunk))
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getitem__(self, i: int) -> np.ndarray:
        k = i // self.step
        block = self.cache.get(k)
        if block is None:
            block = self._read(k)
            self.cache[k] = block
            if len(self.cache) > self.capacity:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(k)
        return block[i - k * self.step]

    def _read(self, k: int) -> np.ndarray:
        chunk = chunk_file(Path(self.path), self.array, k)
        if not chunk.is_file():  # every chunk of a finished store is written, NaN or not
            raise BadStore(
                f"{chunk}: missing, a chunk (tiles {k * self.step}…) of array {self.array.path} in store "
                f"{self.path}; the store is damaged, rerun `smoothsal saliency`"
            )
        try:
            return np.asarray(self.array[k * self.step : (k + 1) * self.step], dtype=np.float32)
        except (RuntimeError, ValueError, OSError, zarr.errors.BaseZarrError) as err:  # e.g. blosc errors
            raise BadStore(
                f"{chunk}: cannot be read ({one_line(err)}), a chunk (tiles {k * self.step}…) of array "
                f"{self.array.path} in store {self.path}; the store is damaged, rerun `smoothsal saliency`"
            ) from None


def chunk_file(store: Path, array: zarr.Array, k: int) -> Path:
    """The file of chunk ``k`` (along tiles) of a store array (Zarr v2, '.'-separated chunk keys)."""
    return store / array.path / ".".join([str(k)] + ["0"] * (array.ndim - 1))


# --- the results table ----------------------------------------------------------------------------


def results_columns(num_classes: int, attributions: Sequence[str], layers: Sequence[str]) -> list[str]:
    """The columns of a saliency job's results table, in order (README, Outputs: Saliency)."""
    k = num_classes
    return [
        "dataset", "slide_id", "method", "arch", "tile", "x", "y", "w", "h", "mpp", "label", "target", "task",
        *(f"logit_{c}" for c in range(k)), *(f"prob_{c}" for c in range(k)),
        "pred", "correct", "pd_all", "pd_target", "pd_masked", "agree",
        *(f"{m}/{a}/{layer}" for m in ("tv", "checkerboard") for a in attributions for layer in layers),
    ]  # fmt: skip


def write_results(table: pd.DataFrame, path: str | Path, meta: Mapping[str, Any]) -> None:
    """A per-tile results table with ``meta`` as JSON in its schema metadata, written atomically."""
    with atomic_path(path) as tmp:
        _write_table(table, tmp, meta)


def _write_table(table: pd.DataFrame, path: Path, meta: Mapping[str, Any]) -> None:
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    extra = {b"smoothsal": json.dumps(meta), MARKER_KEY.encode(): json.dumps(TABLE_MARKER)}
    pq.write_table(arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), **extra}), path)


def _schema(path: Path) -> pa.Schema:
    if not path.is_file():
        raise MissingInput(f"{path}: per-tile table not found; {RESULTS_FIX}")
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as err:
        raise BadTable(f"{path}: not a readable Parquet table ({one_line(err)}); {RESULTS_FIX}") from err


def results_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta`` a results table was written with ({} for a table without it)."""
    raw = (_schema(Path(path)).metadata or {}).get(b"smoothsal")
    return json.loads(raw) if raw else {}


def measure_columns(
    path: Path | str, names: Iterable[str], measure: str = "tv"
) -> list[tuple[str, str, str]]:
    """(column, attribution, layer) of every ``{measure}/{attribution}/{layer}`` column, in table order."""
    out = []
    for name in names:
        if name.startswith(f"{measure}/"):
            parts = name.split("/", 2)
            if len(parts) != 3 or not parts[1] or not parts[2]:
                raise BadTable(
                    f"{path}: column {name!r} is not {measure}/{{attribution}}/{{layer}}; {RESULTS_FIX}"
                )
            out.append((name, parts[1], parts[2]))
    return out


@dataclass(frozen=True)
class Results:
    """A per-tile results table as read: the columns asked for, its TV and checkerboard columns."""

    table: pd.DataFrame
    tv: list[tuple[str, str, str]]  # (column, attribution, layer)
    checkerboard: list[tuple[str, str, str]]  # the same; none in a format 1 table


def read_results(path: str | Path, optional: Sequence[str] = ()) -> Results:
    """The ``RESULT_COLUMNS``, those of ``optional`` present and every TV and checkerboard column of a
    results table; one-line errors naming the file when it lacks them or cannot be read."""
    path = Path(path)
    names = _schema(path).names
    tv, checkerboard = measure_columns(path, names), measure_columns(path, names, "checkerboard")
    missing = [c for c in RESULT_COLUMNS if c not in names] + ([] if tv else ["tv/{attribution}/{layer}"])
    if missing:
        raise BadTable(f"{path}: missing columns {', '.join(missing)}; {RESULTS_FIX}")
    columns = [*RESULT_COLUMNS, *(c for c in optional if c in names), *(c for c, _, _ in tv + checkerboard)]
    try:
        table = pd.read_parquet(path, columns=columns)
    except (OSError, pa.ArrowException) as err:
        raise BadTable(f"{path}: not a readable Parquet table ({one_line(err)}); {RESULTS_FIX}") from err
    return Results(table, tv, checkerboard)


# --- writing: partial state, resume, the finished outputs -----------------------------------------


STORE_KIND = OutputKind("saliency-store", "smoothsal saliency", format=2, replaces=(1,), zarr=True)
TABLE_MARKER = {"kind": "saliency-table", "format": 3}  # in the results table's schema metadata
TABLE_FORMATS = (1, 2, 3)  # still read (and replaced by a rerun); 1 lacks the checkerboard columns, 1–2 the spec


def check_out(out: Path, table: Path | None = None) -> None:
    """Before any work: the store may replace what is at ``out`` only if `smoothsal saliency` wrote it
    (`files.check_replaceable`), the table at ``table`` only if it is a results table it wrote (a
    Parquet file carrying ``TABLE_MARKER``); else one line naming the path, and nothing is touched."""
    check_replaceable(out, STORE_KIND)
    if table is None:
        return
    if Path(table).resolve() == Path(out).resolve():
        raise BadOption(
            f"--table {table} is the same path as --out; give {Path(out).with_suffix('.parquet')}"
        )
    files.refuse_inside_output(table, "--table", within=[out])
    if table.is_dir() or table.is_symlink():
        raise BadOutput(
            f"{table} is a directory or a link; give a new file path for --table (METHOD.parquet)"
        )
    if table.exists() and table_marker(table) not in [TABLE_MARKER | {"format": f} for f in TABLE_FORMATS]:
        raise BadOutput(
            f"{table} exists and is not a per-tile table that `smoothsal saliency` wrote; give a new "
            "--table or remove it yourself"
        )
    with writable(table):  # an unwritable directory is found now, not after the work
        table.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=table.parent, prefix=f".{table.name}.partial-")
        os.close(fd)
        os.unlink(probe)


def table_marker(path: Path) -> dict | None:
    """The output marker in a Parquet file's schema metadata (None: not a table we wrote)."""
    try:
        raw = (pq.read_schema(path).metadata or {}).get(MARKER_KEY.encode())
        return json.loads(raw) if raw else None
    except (OSError, ValueError, pa.ArrowException):
        return None


def partial_dir(out: Path) -> Path:
    """Where a job keeps its work state: a hidden sibling of the store."""
    return out.parent / f".{out.name}.partial"


@dataclass(frozen=True)
class _State:
    """Paths of a job's partial state."""

    root: Path
    store: Path
    rows: Path
    progress: Path
    table: Path  # the finished table, moved into place right after the store

    @classmethod
    def of(cls, out: Path) -> _State:
        root = partial_dir(out)
        return cls(root, root / out.name, root / "rows", root / "progress.json", root / "table.parquet")

    def read_progress(self) -> dict | None:
        try:
            return json.loads(self.progress.read_text())
        except (OSError, ValueError):
            return None

    def write_progress(self, progress: dict) -> None:
        with atomic_path(self.progress) as tmp:
            tmp.write_text(json.dumps(progress))


def _add_batch(batches: list[list[int]], start: int, stop: int) -> None:
    """Record a completed batch [start, stop); a batch right after the last one extends it (the
    list stays short however many batches a slide has)."""
    if batches and batches[-1][1] == start:
        batches[-1][1] = stop
    else:
        batches.append([start, stop])


def _compact_rows(rows: Path) -> None:
    """Merge the per-batch row files into one once there are ``COMPACT_ROWS`` of them.

    The merged file takes the first file's name (atomic replace); the others are removed after. A
    kill in between leaves duplicate rows, which ``_finish`` drops.
    """
    parts = sorted(rows.glob("*.parquet"))
    if len(parts) < COMPACT_ROWS:
        return
    merged = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True).drop_duplicates("tile")
    with atomic_path(parts[0]) as tmp:
        merged.to_parquet(tmp, index=False)
    for part in parts[1:]:
        part.unlink()


def _done(batches: Sequence[Sequence[int]]) -> int:
    """Tiles done from the start on: batches run in tile order."""
    done = 0
    for start, stop in sorted(batches):
        if start > done:
            break
        done = max(done, stop)
    return done


def _empty_dtype(column: str) -> str:
    if column in ("dataset", "slide_id", "method", "arch", "task"):
        return "object"
    if column in ("tile", "x", "y", "w", "h", "label", "target", "pred"):
        return "int64"
    return "float64"


def _start(
    state: _State, out: Path, meta: dict, shapes: Mapping[str, tuple[int, int]], tile_size: int,
    targets_sha256: str = "",
) -> tuple[zarr.Group | None, int]:  # fmt: skip
    """Open the partial state when it belongs to these settings, tiles and labels, else start afresh."""
    n = int(meta["n_tiles"])
    progress = state.read_progress()
    key = {
        "settings": meta["settings"], "tiles_sha256": meta["tiles_sha256"], "n_tiles": n,
        "targets_sha256": targets_sha256,
    }  # fmt: skip
    moved = progress is not None and progress.get("moved") and state.table.is_file()
    if moved and progress.get("key") == key and STORE_KIND.carried_by(read_marker(out)):
        return None, n  # killed between moving the store and the table: `_finish` moves the table
    current = progress is not None and progress.get("format") == PROGRESS_FORMAT  # older rows lack columns
    if current and progress.get("key") == key and state.store.is_dir():
        try:
            group = zarr.open_group(state.store, mode="r+", zarr_format=2)
            done = _done(progress["batches"])
            for stale in state.rows.glob("*.parquet"):  # a batch killed before it was recorded
                if int(stale.stem) >= done:
                    stale.unlink()
            return group, done
        except (OSError, ValueError, KeyError, zarr.errors.BaseZarrError) as err:
            log.warning("saliency: partial state %s is unreadable (%s); starting over", state.root, err)
    elif progress is not None or state.root.exists():
        log.warning(
            "saliency: partial state %s was made with other settings or tiles; starting over", state.root
        )
    shutil.rmtree(state.root, ignore_errors=True)
    state.rows.mkdir(parents=True)
    group = zarr.open_group(state.store, mode="w", zarr_format=2)
    group.attrs.update({"smoothsal": meta, MARKER_KEY: STORE_KIND.marker})
    for a in meta["attributions"]:
        for layer in meta["layers"]:
            h, w = shapes.get(layer, (0, 0))
            arr = group.create_array(
                f"{a}/{layer}", shape=(n, h, w), chunks=(max(1, min(n, CHUNK_TILES)), max(h, 1), max(w, 1)),
                dtype="float32", fill_value=np.nan,
            )  # fmt: skip
            arr.attrs.update({"layer": layer, "attribution": a, "stride": tile_size / h if h else None})
    state.write_progress({"format": PROGRESS_FORMAT, "key": key, "batches": []})
    return group, 0


def _finish(state: _State, out: Path, results: Path, meta: dict, columns: Sequence[str] | None) -> None:
    """Store and table appear together: the table is written into the partial state first, then the
    store and the table are moved into place; a kill in between is completed by the next run."""
    n = int(meta["n_tiles"])
    progress = state.read_progress()
    if progress is None or _done(progress["batches"]) < n:
        raise BadStore(f"saliency: {state.root} does not hold every tile; rerun the job")
    if not progress.get("moved"):
        parts = sorted(state.rows.glob("*.parquet"))
        if parts:
            table = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True).sort_values("tile")
            table = table.drop_duplicates("tile").reset_index(drop=True)
            table = table[list(columns)] if columns is not None else table
        else:
            table = pd.DataFrame({c: pd.Series(dtype=_empty_dtype(c)) for c in columns or ()})
        with atomic_path(state.table) as tmp:
            _write_table(table, tmp, meta)
        group = zarr.open_group(state.store, mode="r+", zarr_format=2)
        group.attrs[MARKER_KEY] = STORE_KIND.record(state.store)  # what it holds, for `check_replaceable`
        zarr.consolidate_metadata(group.store)
        check_replaceable(out, STORE_KIND)  # a file put into the old store meanwhile: kept, and said so
        replace_dir(state.store, out)
        state.write_progress(progress | {"moved": True})
        kill_point("saliency.finish")  # tests: killed between the two renames
    with writable(results):
        os.replace(state.table, results)
    shutil.rmtree(state.root, ignore_errors=True)


class StoreWriter:
    """Writes one store and its results table, resumably (see the module doc).

    ``open`` returns the number of tiles already done by an earlier, killed run with the same ``meta``
    and label hash (0: a fresh start); ``write_batch`` records tiles [start, stop); ``finish`` moves
    the store into place and writes the table.
    """

    def __init__(self, out: Path, results: Path, meta: Mapping[str, Any]) -> None:
        self.out, self.results, self.meta = Path(out), Path(results), dict(meta)
        self.state = _State.of(self.out)
        self.group: zarr.Group | None = None
        self.progress: dict | None = None

    def open(self, shapes: Mapping[str, tuple[int, int]], tile_size: int, labels_sha256: str = "") -> int:
        """Create or resume the partial store: one array per attribution × layer, ``shapes`` (h, w)
        per layer (a missing layer: 0 × 0, for a slide without tiles)."""
        self.group, done = _start(self.state, self.out, self.meta, shapes, tile_size, labels_sha256)
        self.progress = self.state.read_progress()
        return done

    def write_batch(
        self, start: int, stop: int, maps: Mapping[tuple[str, str], np.ndarray], rows: pd.DataFrame
    ) -> None:
        """Tiles [start, stop): their maps per (attribution, layer) and their results rows."""
        for (attribution, layer), values in maps.items():
            # every chunk is written, NaN or not: a missing chunk file then means a damaged store
            self.group[f"{attribution}/{layer}"].with_config({"write_empty_chunks": True})[start:stop] = (
                values
            )
        with atomic_path(self.state.rows / f"{start:09d}.parquet") as tmp:
            rows.to_parquet(tmp, index=False)
        _add_batch(self.progress["batches"], start, stop)
        self.state.write_progress(self.progress)  # the batch counts as done from here on
        _compact_rows(self.state.rows)

    def finish(self, columns: Sequence[str] | None = None) -> None:
        """Check every tile is done, move the store into place, write the table (last)."""
        _finish(self.state, self.out, self.results, self.meta, columns)
