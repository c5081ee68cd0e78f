"""The tile table: one row per tile (level-0 box, pyramid level, tile size, labels), written by
`smoothsal tiles` and read by every later stage, only through this module.

Columns (in this order, then the label columns of `tiling.label_tiles`): see ``TABLE_COLUMNS``. The
tiles' hash (``tiles_sha256``) ties every later output to the table it was computed on; ``TileDataset``
reads the tiles for a model, one ``read_region`` each, in DataLoader worker processes.

The schema metadata (``smoothsal``, JSON) holds the table's format and each slide's fingerprint (slide id →
`fingerprint.slide_fingerprint`): a stage that reads a slide again refuses one whose content changed since
the table was made. Tables of format 1 (before the fingerprint) are read with one warning, unchecked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader

from .errors import BadSlide, BadTable, MissingInput, SmoothsalError, from_worker, one_line
from .files import atomic_path
from .fingerprint import slide_fingerprint
from .slides import SlideReader, open_reader, read_tile

__all__ = [
    "REQUIRED_COLUMNS",
    "TABLE_COLUMNS",
    "TILE_KEY_COLUMNS",
    "TileDataset",
    "TileLoader",
    "default_workers",
    "labels_sha256",
    "load_tile",
    "majority_classes",
    "read_tile_table",
    "read_tile_tables",
    "tile_labels",
    "tiles_sha256",
    "write_tile_table",
]

TABLE_COLUMNS = (
    "slide_id", "slide_path", "col", "row", "x", "y", "w", "h", "level", "tile_size", "mpp",
    "slide_mpp", "tissue_fraction",
)  # fmt: skip
REQUIRED_COLUMNS = ("slide_id", "slide_path", "x", "y", "w", "h", "level", "tile_size")
TILE_KEY_COLUMNS = ("slide_id", "x", "y", "w", "h", "level", "tile_size")  # what `tiles_sha256` covers
INTEGER_COLUMNS = ("x", "y", "w", "h", "level", "tile_size")  # whole pixels (and a whole level)
FIX = "make it with `smoothsal tiles`"
TABLE_FORMAT = 2  # 2: the slides' fingerprints in the schema metadata; 1 (no metadata): before them
META_KEY = b"smoothsal"

log = logging.getLogger(__name__)


# --- writing and reading --------------------------------------------------------------------------


def write_tile_table(
    table: pd.DataFrame, path: str | Path, fingerprints: Mapping[str, str] | None = None
) -> None:
    """Write Parquet atomically: a temporary file renamed at the end (a killed job leaves no table).

    ``fingerprints`` (slide id → fingerprint) go into the schema metadata; by default those of the slide
    files the table names, as they are now (`tiling.make_tiles` gives the one taken before tiling)."""
    if fingerprints is None:
        fingerprints = {i: slide_fingerprint(p) for i, p in _slides(table) if p.is_file()}
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    meta = json.dumps({"format": TABLE_FORMAT, "slide_fingerprints": dict(fingerprints)})
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), META_KEY: meta})
    with atomic_path(path) as tmp:
        pq.write_table(arrow, tmp)


def _slides(table: pd.DataFrame) -> list[tuple[str, Path]]:
    """(slide id, slide file) of each slide the table names."""
    if table.empty or "slide_id" not in table or "slide_path" not in table:
        return []
    pairs = table[["slide_id", "slide_path"]].drop_duplicates().itertuples(index=False)
    return [(str(i), Path(str(p))) for i, p in pairs]


def _read(path: Path) -> tuple[pd.DataFrame, dict[str, str] | None]:
    """The checked table and its slides' fingerprints (None: a table of format 1, without them)."""
    if not path.is_file():
        raise MissingInput(f"tile table {path} does not exist; {FIX}")
    try:
        table = pd.read_parquet(path)
        raw = (pq.read_schema(path).metadata or {}).get(META_KEY)
        meta = json.loads(raw) if raw else {"format": 1, "slide_fingerprints": None}
    except (OSError, ValueError, pa.ArrowException) as err:
        raise BadTable(f"could not read tile table {path} ({one_line(err)}); {FIX}") from err
    if meta.get("format") not in (1, TABLE_FORMAT):
        raise BadTable(
            f"tile table {path} has format {meta.get('format')!r}, which this smoothsal cannot read; {FIX}"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in table]
    if missing:
        raise BadTable(f"tile table {path} lacks columns {missing}; {FIX}")
    table = table.reset_index(drop=True)
    _check_rows(table, path)
    return table, meta["slide_fingerprints"]


def _check_slide(path: Path, recorded: Mapping[str, str] | None, slide_id: str, slide: Path) -> bool:
    """The slide file is the one the table was made from, as it was then: a slide replaced since (same
    path, other content, even with an older modification time) would be read under the old grid and
    labels. False where the table records no fingerprint for it (format 1): nothing to check."""
    want = None if recorded is None else recorded.get(slide_id)
    if want is None:
        return False
    if not slide.is_file():  # reading it fails, naming it
        return True
    try:
        now = slide_fingerprint(slide)
    except OSError as err:
        raise BadSlide(f"{slide}: cannot be read ({one_line(err)}); check its permissions") from None
    if now != want:
        raise BadTable(
            f"slide {slide} is not the file that tile table {path} was made from (its size or content "
            f"changed since: replaced or rewritten); tile it again: smoothsal tiles {slide} --out {path} "
            "(with the options it was tiled with)"
        )
    return True


def _warn_unchecked(paths: Sequence[Path]) -> None:
    """One line for the tables of format 1 read by a command."""
    if paths:
        more = f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""
        log.warning(
            "tile table %s%s predates slide fingerprints (format 1): a slide replaced since it was made "
            "cannot be noticed; make it again with `smoothsal tiles` to have its slide checked",
            paths[0],
            more,
        )


def _first(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad)[0])


def _row(table: pd.DataFrame, i: int) -> str:
    r = table.iloc[i]
    return f"row {i} (slide {r['slide_id']}, x {r['x']}, y {r['y']}, level {r['level']})"


def _check_rows(table: pd.DataFrame, path: Path) -> None:
    """Every tile a whole-pixel box of positive size, each (slide, x, y, level) once: a row that is not
    would be read at another place than it records, or computed and counted twice."""
    if table.empty:
        return
    for column in INTEGER_COLUMNS:
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(values) | (values != np.round(values))
        if column in ("w", "h", "tile_size"):
            bad |= values <= 0
        if bad.any():
            i = _first(bad)
            raise BadTable(
                f"tile table {path} {_row(table, i)}: {column} = {table[column].iloc[i]!r} is not a whole "
                f"number of pixels{' > 0' if column in ('w', 'h', 'tile_size') else ''}; {FIX}"
            )
    duplicated = table.duplicated(["slide_id", "x", "y", "level"]).to_numpy()
    if duplicated.any():
        i = _first(duplicated)
        raise BadTable(
            f"tile table {path} {_row(table, i)} repeats an earlier tile (same slide, x, y and level): it "
            f"would be computed and counted twice; remove the duplicate rows, or {FIX}"
        )


def _check_inside(table: pd.DataFrame, path: Path, slide: Path, size: tuple[int, int], levels: int) -> None:
    """Every tile's level-0 box [x, x + w) × [y, y + h) inside the slide's level 0 (what `tiles` emits,
    edge tiles included: its grid keeps only whole tiles), at a level the slide has; else the tile would
    be read on padding, or not at all."""
    width, height = size
    level = table["level"].to_numpy(np.int64)
    bad = (level < 0) | (level >= levels)
    if bad.any():
        i = _first(bad)
        raise BadTable(
            f"tile table {path} {_row(table, i)}: slide {slide.name} has no level {level[i]} (levels 0 to "
            f"{levels - 1}); {FIX} {slide}"
        )
    x, y, w, h = (table[c].to_numpy(np.int64) for c in ("x", "y", "w", "h"))
    bad = (x < 0) | (y < 0) | (x + w > width) | (y + h > height)
    if bad.any():
        i = _first(bad)
        raise BadTable(
            f"tile table {path} {_row(table, i)}: its {w[i]}×{h[i]} px box is not inside slide {slide.name} "
            f"({width}×{height} px at level 0); tiles must lie inside the slide: {FIX} {slide}"
        )


def read_tile_table(path: str | Path, slide: str | Path | None = None) -> pd.DataFrame:
    """One tile table, checked; with ``slide``, it must be that slide's table (one slide, one tile size).

    A table whose ``slide_path`` no longer exists but names a file of the same name (data moved) is
    pointed at ``slide``; ``slide`` itself must open (an unreadable slide fails here, naming it), and
    be the file the table was made from, as it was (its fingerprint; format 1 tables: a warning).
    """
    path = Path(path)
    if slide is not None and not Path(slide).is_file():
        raise MissingInput(f"slide {slide} does not exist; check the path")
    table, recorded = _read(path)
    if slide is None or table.empty:
        return table
    slide = Path(slide)
    ids, paths = table["slide_id"].unique().tolist(), table["slide_path"].unique().tolist()
    if len(ids) != 1 or len(paths) != 1:
        raise BadTable(
            f"tile table {path} holds tiles of several slides ({', '.join(map(str, ids[:3]))}); "
            f"give the table of {slide.name} alone"
        )
    reader = open_reader(slide)
    size, levels = reader.level_dimensions[0], reader.level_count
    reader.close()
    made_from = Path(paths[0])
    same = made_from.exists() and os.path.samefile(made_from, slide)
    moved = not made_from.exists() and made_from.name == slide.name
    if not (same or moved):
        raise BadTable(
            f"tile table {path} belongs to slide {ids[0]!r} (made from {made_from}), not this slide {slide}; "
            f"give the tile table made by `smoothsal tiles {slide}`"
        )
    if not _check_slide(path, recorded, str(ids[0]), slide):
        _warn_unchecked([path])
    sizes = table["tile_size"].unique().tolist()
    if len(sizes) != 1:
        raise BadTable(f"tile table {path} mixes tile sizes {sizes}; tile the slide with one --tile-size")
    _check_inside(table, path, slide, size, levels)
    return table.assign(slide_path=str(slide))


def read_tile_tables(paths: Sequence[str | Path]) -> pd.DataFrame:
    """The tiles of all given tables, in the given order; one tile size (they are batched). Each slide
    must be the file its table was made from, as it was (`read_tile_table`)."""
    if not paths:
        raise BadTable("no tile tables given; pass --tiles TABLE.parquet [...]")
    tables, unchecked = [], []
    for path in map(Path, paths):
        table, recorded = _read(path)
        checked = [_check_slide(path, recorded, i, slide) for i, slide in _slides(table)]
        if not all(checked):
            unchecked.append(path)
        tables.append(table)
    _warn_unchecked(unchecked)
    table = pd.concat(tables, ignore_index=True)
    names = ", ".join(map(str, paths))
    if table.empty:
        raise BadTable(
            f"the tile tables {names} hold no tiles; tile slides with tissue, or lower --min-tissue"
        )
    sizes = sorted(table["tile_size"].unique().tolist())
    if len(sizes) != 1:
        raise BadTable(
            f"the tile tables {names} mix tile sizes {sizes}; tile all slides with one --tile-size"
        )
    return table


# --- what the table says about its tiles ----------------------------------------------------------


def tiles_sha256(table: pd.DataFrame) -> str:
    """Hash of which tiles, in which order (slide paths left out: moving the data changes nothing)."""
    missing = [c for c in TILE_KEY_COLUMNS if c not in table]
    if missing:
        raise BadTable(f"tile table lacks columns {missing}; {FIX}")
    keys = pd.util.hash_pandas_object(table[list(TILE_KEY_COLUMNS)], index=False).to_numpy()
    return hashlib.sha256(keys.tobytes()).hexdigest()


def labels_sha256(table: pd.DataFrame) -> str:
    """Hash of the columns that decide each tile's target (``tiles_sha256`` covers only the grid):
    re-labelled tiles on the same grid must not resume work computed for the old targets."""
    columns = [c for c in ("label", "majority_class") if c in table]
    frame = table[columns].apply(pd.to_numeric, errors="coerce").fillna(-1).astype(np.int64)
    digest = hashlib.sha256(",".join(columns).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def _int_column(table: pd.DataFrame, column: str) -> torch.Tensor:
    if column not in table:
        return torch.full((len(table),), -1, dtype=torch.long)
    values = pd.to_numeric(table[column], errors="coerce").fillna(-1).to_numpy(np.int64, copy=True)
    return torch.from_numpy(values)


def tile_labels(table: pd.DataFrame) -> torch.Tensor:
    """The table's ``label`` column as long, −1 where a tile has no label (or there is no column)."""
    return _int_column(table, "label")


def majority_classes(table: pd.DataFrame) -> torch.Tensor:
    """The table's ``majority_class`` (segmentation target) as long, −1 where missing."""
    return _int_column(table, "majority_class")


# --- reading tiles for a model --------------------------------------------------------------------


class TileDataset(torch.utils.data.Dataset):
    """Tiles of a tile table (one or many slides) as float tensors [3, H, W], RGB in [0, 1].

    Each tile is one `read_region` at the table's level, resized only when that level is not exactly
    the tile size. Each process (DataLoader worker) opens each slide once, lazily; handles are never
    shared across a fork. `__getitem__(i)` returns `(image, i)`, i = row position in the table.
    `transform` (e.g. normalisation) is applied to the [0, 1] tensor; `opener` opens a slide path.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        max_open: int = 16,
        opener: Callable[[str], SlideReader] = open_reader,
    ) -> None:
        self.table = table.reset_index(drop=True)
        self.transform = transform
        self.max_open = max_open
        self.opener = opener
        self._columns = {
            c: self.table[c].to_numpy() for c in ("slide_path", "x", "y", "w", "level", "tile_size")
        }
        self._handles: OrderedDict[str, SlideReader] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        c = self._columns
        path = str(c["slide_path"][i])
        rgb = read_tile(
            self._reader(path), c["x"][i], c["y"][i], int(c["w"][i]), int(c["level"][i]),
            int(c["tile_size"][i]), path,
        )  # fmt: skip
        image = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
        return (self.transform(image) if self.transform else image), int(i)

    def _reader(self, path: str) -> SlideReader:
        """This process's handle for `path`, opened on first use (at most `max_open` kept open)."""
        if self._pid != os.getpid():  # forked worker: the parent's handles are not ours
            self._handles, self._pid = OrderedDict(), os.getpid()
        if path not in self._handles:
            self._handles[path] = self.opener(path)
            if len(self._handles) > self.max_open:
                self._handles.popitem(last=False)[1].close()
        self._handles.move_to_end(path)
        return self._handles[path]

    def __getstate__(self) -> dict[str, Any]:  # spawn workers: send the table, not the handles
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = OrderedDict(), -1
        return state


class TileLoader(DataLoader):
    """A DataLoader whose user-facing errors raised in worker processes (a slide with corrupt tile data)
    arrive as themselves, one line naming the slide, instead of torch's wrapped worker traceback."""

    def __iter__(self) -> Iterator[Any]:
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except SmoothsalError as err:
                raise from_worker(err) from None
            yield batch


def default_workers(processes: int = 1) -> int:
    """DataLoader workers per process: min(4, cores per process − 1), and none with 2 cores or fewer
    per process, where a forked reader only takes CPU from the compute (reading a batch takes ~1 % of
    its attribution). Measured on 2 cores: a worker made the bf16 saliency job 20 % slower
    (benchmarks/saliency.py) and 3 surrogate epochs 25 s instead of 17 (benchmarks/surrogate_convergence.py)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cores // processes
    return 0 if per_process <= 2 else min(4, per_process - 1)


def load_tile(row: Mapping[str, Any] | pd.Series, reader: SlideReader | None = None) -> np.ndarray:
    """One tile of a table row as RGB uint8 (for plotting and checks; the Dataset is the fast path)."""
    own = reader is None
    reader = reader or open_reader(row["slide_path"])
    try:
        return read_tile(
            reader, int(row["x"]), int(row["y"]), int(row["w"]), int(row["level"]), int(row["tile_size"]),
            row["slide_path"],
        )  # fmt: skip
    finally:
        if own:
            reader.close()
