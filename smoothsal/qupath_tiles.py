"""Heatmaps as QuPath tile objects with measurements (`smoothsal export --qupath-tiles`).

One GeoJSON FeatureCollection per slide: one square per stride cell of the tile grid (cut into
``subdivide`` × ``subdivide`` squares when asked), in the slide's level-0 pixels, each a QuPath
``tile`` (or ``detection``) object carrying a classification {name, color} and a flat ``measurements``
map, which QuPath's Measure > Show measurement maps colours over the slide.

Stride cells: the tiles' positions lie on a lattice (the grid's stride, found as the greatest common
divisor of the tiles' coordinate differences; one tile alone: its size); every lattice cell that a tile
overlaps is one object, once, however many tiles overlap it.

Measurements per chosen method × attribution × layer, over the object's square, of the blended map in
the heatmap container (level 0, read through `container.open_container`): ``mean`` (over its defined
part, area-weighted: map pixels that straddle the square's edge count by their overlap), ``positive
mass µm^2`` (the integral of max(value, 0) over the square: value × µm²) and ``max`` (over the map
pixels that overlap it). Per tile, from the per-tile tables of `smoothsal saliency` (``--tables``):
class probabilities, the label, TV per attribution × layer and the prediction difference (all classes
and target, ×100 as in the report); a cell that several tiles overlap gets their mean. A value that
does not exist (no map there, an unlabelled tile, no table) is left out of the object's measurements:
QuPath reads a missing measurement as NaN (``MeasurementList``), while JSON has no NaN and QuPath
0.4 fails on the string "NaN" that 0.5 accepts.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from . import __version__
from .container import Container, ImageInfo, open_container
from .errors import BadOption, BadOutput, BadStore, BadTable
from .files import atomic_path, check_file_out
from .store import read_results

__all__ = [
    "KIND",
    "OBJECT_TYPES",
    "STATISTICS",
    "SUBDIVISIONS",
    "TILE_MEASURES",
    "Cells",
    "TileExportSettings",
    "TileExportSummary",
    "export_tiles",
    "is_ours",
    "map_statistics",
    "object_boxes",
    "stride_cells",
]

KIND = "qupath-tiles"  # the marker in the FeatureCollection's "smoothsal" member: only these are replaced
FORMAT = 1
STATISTICS = ("mean", "positive_mass", "max")
STAT_NAMES = {"mean": "mean", "positive_mass": "positive mass µm^2", "max": "max"}
TILE_MEASURES = ("probability", "label", "tv", "pd")
SUBDIVISIONS = (1, 2, 4)  # 20,000 tiles × 16 = 320,000 objects: under `max_objects`
OBJECT_TYPES = ("tile", "detection")
BAND_PX = 512  # map rows read at once
CHUNK_OBJECTS = 4096  # objects formatted at once
MAX_CLASSES = 1000  # prob_0 … prob_999 are looked for in the per-tile tables


@dataclass(frozen=True)
class TileExportSettings:
    """What the tile objects carry (the one source of defaults; None = all that the container holds)."""

    methods: tuple[str, ...] | None = None
    attributions: tuple[str, ...] | None = None
    layers: tuple[str, ...] | None = None
    statistics: tuple[str, ...] = STATISTICS
    tile_measures: tuple[str, ...] = TILE_MEASURES  # from the per-tile tables, when given
    subdivide: int = 1  # squares per stride cell side: 1, 2 or 4
    object_type: str = "tile"  # QuPath object type: tile or detection (both in measurement maps)
    class_name: str = "smoothsal"
    class_color: tuple[int, int, int] = (0, 114, 178)  # RGB, as QuPath's classification "color" reads it
    gzip: bool = False  # write .geojson.gz (QuPath opens it by that name)
    max_objects: int = 1_000_000

    def __post_init__(self) -> None:
        for option, values, known in (
            ("--qupath-statistics", self.statistics, STATISTICS),
            ("--qupath-tile-measures", self.tile_measures, TILE_MEASURES),
        ):
            bad = [v for v in values if v not in known]
            if bad:
                raise BadOption(
                    f"{option}: unknown {', '.join(map(repr, bad))}; choose from {' '.join(known)}"
                )
        if self.subdivide not in SUBDIVISIONS:
            raise BadOption(
                f"--qupath-subdivide must be one of {', '.join(map(str, SUBDIVISIONS))}, got {self.subdivide}"
            )
        if self.object_type not in OBJECT_TYPES:
            raise BadOption(f"--qupath-object-type must be tile or detection, got {self.object_type!r}")
        if len(self.class_color) != 3 or any(not 0 <= int(c) <= 255 for c in self.class_color):
            raise BadOption(f"class colour must be three numbers 0–255, got {list(self.class_color)}")
        if self.max_objects < 1:
            raise BadOption(f"max_objects must be >= 1, got {self.max_objects}")


@dataclass(frozen=True)
class TileExportSummary:
    geojson: Path
    objects: int
    stride_px: int  # level-0 px
    measurements: tuple[str, ...]
    bytes: int


@dataclass(frozen=True)
class Cells:
    """The stride cells that tiles overlap: lattice origin and step (level-0 px), each cell's (col,
    row), row-major, and which tile overlaps which cell (pairs of indices)."""

    origin: tuple[int, int]
    stride: int
    cols: np.ndarray
    rows: np.ndarray
    pair_tile: np.ndarray
    pair_cell: np.ndarray


def _lattice_step(coords: np.ndarray, size: int) -> int:
    diffs = np.unique(coords - coords.min())
    step = int(np.gcd.reduce(diffs[diffs > 0])) if (diffs > 0).any() else size
    return step if 0 < step <= size else size


def stride_cells(boxes: np.ndarray) -> Cells:
    """The stride cells of tile boxes [n, 4] (x, y, w, h) level-0 px."""
    boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
    if len(boxes) == 0:
        empty = np.zeros(0, np.int64)
        return Cells((0, 0), 1, empty, empty, empty, empty)
    size = int(boxes[:, 2:].max())
    stride = min(_lattice_step(boxes[:, 0], size), _lattice_step(boxes[:, 1], size))
    ox, oy = int(boxes[:, 0].min() % stride), int(boxes[:, 1].min() % stride)
    c0, r0 = (boxes[:, 0] - ox) // stride, (boxes[:, 1] - oy) // stride
    c1 = -(-(boxes[:, 0] + boxes[:, 2] - ox) // stride)
    r1 = -(-(boxes[:, 1] + boxes[:, 3] - oy) // stride)
    span = int(max((c1 - c0).max(), (r1 - r0).max()))
    tiles, cols, rows = [], [], []
    for dr in range(span):
        for dc in range(span):
            keep = np.flatnonzero((c0 + dc < c1) & (r0 + dr < r1))
            tiles.append(keep), cols.append(c0[keep] + dc), rows.append(r0[keep] + dr)
    tile, col, row = (np.concatenate(a) for a in (tiles, cols, rows))
    width = int(col.max()) + 1
    keys, cell = np.unique(row * width + col, return_inverse=True)
    return Cells((ox, oy), stride, keys % width, keys // width, tile, cell.ravel())


def object_boxes(cells: Cells, subdivide: int) -> np.ndarray:
    """[m · subdivide², 4] (x0, y0, x1, y1) level-0 px: each cell's squares, cell by cell, row-major within."""
    s, n = cells.stride, subdivide
    sub = np.arange(n)
    sr, sc = np.repeat(sub, n), np.tile(sub, n)
    x0 = cells.origin[0] + cells.cols[:, None] * s + sc[None, :] * s / n
    y0 = cells.origin[1] + cells.rows[:, None] * s + sr[None, :] * s / n
    x0, y0 = x0.ravel(), y0.ravel()
    return np.column_stack([x0, y0, x0 + s / n, y0 + s / n])


# --- map statistics -------------------------------------------------------------------------------


def _integral(values: np.ndarray, u0: np.ndarray, u1: np.ndarray) -> np.ndarray:
    """∫ over [u0, u1) of the piecewise-constant function with ``values`` on unit pixels (exact)."""
    padded = np.append(values, 0.0)
    cum = np.concatenate([[0.0], np.cumsum(values)])

    def at(u: np.ndarray) -> np.ndarray:
        k = np.floor(u).astype(np.int64)
        return cum[k] + (u - k) * padded[k]

    return at(u1) - at(u0)


def _band_statistics(
    band: np.ndarray, wy: np.ndarray, u0: np.ndarray, u1: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Σ weight·value, Σ weight (defined pixels), Σ weight·max(value, 0) and max, per x-range [u0, u1)
    (map-pixel units from the band's first column) of a band whose rows carry weights ``wy``."""
    rows = wy > 0
    z, w = band[rows].astype(np.float64), wy[rows, None]
    finite = np.isfinite(z)
    z0 = np.where(finite, z, 0.0)
    s = _integral((w * z0).sum(0), u0, u1)
    a = _integral((w * finite).sum(0), u0, u1)
    p = _integral((w * np.maximum(z0, 0.0)).sum(0), u0, u1)
    top = np.append(np.where(finite, z, -np.inf).max(0), -np.inf)
    start = np.floor(u0).astype(np.int64)
    stop = np.maximum(np.ceil(u1).astype(np.int64), start + 1)
    m = np.maximum.reduceat(top, np.column_stack([start, stop]).ravel())[::2]
    return s, a, p, np.where(np.isfinite(m), m, np.nan)


def _snap(u: np.ndarray) -> np.ndarray:
    """Map-pixel coordinates within 1e-6 px of a pixel edge put on it (µm round-off must not add a
    pixel to a square that ends on an edge)."""
    edge = np.round(u)
    return np.where(np.abs(u - edge) < 1e-6, edge, u)


def map_statistics(
    c: Container, image: ImageInfo, boxes: np.ndarray, mpp: float, statistics: Sequence[str]
) -> dict[str, np.ndarray]:
    """Each statistic of the image's level 0 over each box [n, 4] (x0, y0, x1, y1, level-0 px)."""
    level = image.levels[0]
    (sy, sx), (oy, ox), (h, w) = level.scale, level.origin, level.shape
    u0, u1 = (_snap(np.clip((boxes[:, k] * mpp - ox) / sx, 0, w)) for k in (0, 2))
    v0, v1 = (_snap(np.clip((boxes[:, k] * mpp - oy) / sy, 0, h)) for k in (1, 3))
    sums, areas, pos, top = (np.full(len(boxes), np.nan) for _ in range(4))
    keys, group = np.unique(np.column_stack([v0, v1]), axis=0, return_inverse=True)
    group = group.ravel()
    members = np.split(
        np.argsort(group, kind="stable"), np.cumsum(np.bincount(group, minlength=len(keys)))[:-1]
    )
    k = 0
    while k < len(keys):
        first = int(np.floor(keys[k, 0]))
        end = k + 1
        while end < len(keys) and math.ceil(keys[end, 1]) - first <= BAND_PX:
            end += 1
        last = max(math.ceil(keys[k:end, 1].max()), first + 1)
        idx = np.concatenate(members[k:end])
        left = int(np.floor(u0[idx].min()))
        right = max(int(np.ceil(u1[idx].max())), left + 1)
        band = c.region(image.index, 0, slice(first, min(last, h)), slice(left, min(right, w)))
        band = np.pad(band, ((0, last - first - band.shape[0]), (0, right - left - band.shape[1])),
                      constant_values=np.nan)  # fmt: skip
        rows = np.arange(first, last)
        for g in range(k, end):
            sel = members[g]
            (a, b), sel_u0, sel_u1 = keys[g], u0[sel] - left, u1[sel] - left
            wy = np.clip(np.minimum(b, rows + 1) - np.maximum(a, rows), 0.0, 1.0)
            if b <= a or not (wy > 0).any():
                continue
            sums[sel], areas[sel], pos[sel], top[sel] = _band_statistics(band, wy, sel_u0, sel_u1)
        k = end
    defined = areas > 0
    out = {
        "mean": np.where(defined, sums / np.where(defined, areas, 1.0), np.nan),
        "positive_mass": np.where(defined, pos * sx * sy, np.nan),
        "max": np.where(defined, top, np.nan),
    }
    return {name: out[name] for name in statistics}


# --- per-tile tables ------------------------------------------------------------------------------


def _table_measures(
    path: Path, boxes: np.ndarray, slide_id: str, settings: TileExportSettings, attributions: Sequence[str],
    layers: Sequence[str],
) -> tuple[str, dict[str, np.ndarray]]:  # fmt: skip
    """(method, measurement name → value per container tile) from one per-tile results table."""
    classes = [f"prob_{c}" for c in range(MAX_CLASSES)]
    table = read_results(path, optional=["x", "y", "w", "h", "label", *classes]).table
    probs = [c for c in classes if c in table]
    missing = [c for c in ("x", "y", "w", "h") if c not in table]
    if missing:
        raise BadTable(
            f"{path}: no tile boxes ({', '.join(missing)}); give the table `smoothsal saliency` writes"
        )
    if len(table) and str(table["slide_id"].iloc[0]) != slide_id:
        raise BadTable(f"{path}: a table of slide {table['slide_id'].iloc[0]!r}, the container is {slide_id!r}; "
                       "give the tables of the container's slide")  # fmt: skip
    method = str(table["method"].iloc[0]) if len(table) else path.stem
    index = pd.MultiIndex.from_frame(table[["x", "y", "w", "h"]].astype(np.int64))
    rows = index.get_indexer(pd.MultiIndex.from_arrays(boxes.T))
    if len(boxes) and (rows < 0).all():
        raise BadTable(
            f"{path}: none of its tiles is a tile of the container; give the table of the same tiles"
        )

    def column(name: str, scale: float = 1.0) -> np.ndarray:
        values = table[name].to_numpy(np.float64) * scale
        return np.where(rows >= 0, values[np.maximum(rows, 0)], np.nan)

    out: dict[str, np.ndarray] = {}
    if "probability" in settings.tile_measures:
        shown = probs[1:] if len(probs) == 2 else probs  # two classes: the positive class's only
        out |= {f"{method} probability class {p.removeprefix('prob_')}": column(p) for p in shown}
    if "label" in settings.tile_measures and "label" in table:
        label = column("label")
        out["label"] = np.where(label >= 0, label, np.nan)  # -1: unlabelled
    if "tv" in settings.tile_measures:
        for attribution in attributions:
            for layer in layers:
                if f"tv/{attribution}/{layer}" in table:
                    out[f"{method} TV {attribution} {layer}"] = column(f"tv/{attribution}/{layer}")
    if "pd" in settings.tile_measures:
        out[f"{method} PD all ×100"] = column("pd_all", 100.0)
        out[f"{method} PD target ×100"] = column("pd_target", 100.0)
    return method, out


def _cell_means(values: np.ndarray, cells: Cells) -> np.ndarray:
    """Per cell, the mean of the finite values of the tiles that overlap it (NaN where none)."""
    v = values[cells.pair_tile]
    ok = np.isfinite(v)
    total = np.bincount(cells.pair_cell[ok], v[ok], minlength=len(cells.cols))
    count = np.bincount(cells.pair_cell[ok], minlength=len(cells.cols))
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# --- choosing and writing -------------------------------------------------------------------------


def _choose(option: str, asked: Sequence[str] | None, known: Sequence[str], path: Path) -> list[str]:
    known = list(dict.fromkeys(known))
    if asked is None:
        return known
    bad = [a for a in asked if a not in known]
    if bad:
        raise BadOption(f"{option} {' '.join(bad)}: not in {path}; choose from {' '.join(known)}")
    return list(dict.fromkeys(asked))


def _check_out(out: Path, settings: TileExportSettings) -> None:
    name = out.name.lower()
    base = name.removesuffix(".gz")
    if not base.endswith((".geojson", ".json")):
        raise BadOption(f"--out {out}: QuPath imports objects from .geojson (or .geojson.gz); name it so")
    if settings.gzip != name.endswith(".gz"):
        fix = f"name it {out.name}.gz" if settings.gzip else "add --gzip"
        raise BadOption(
            f"--out {out}: {'--gzip writes' if settings.gzip else 'a .gz name needs'} gzip; {fix}"
        )
    check_file_out(out)
    if out.exists() and not (out.is_file() and is_ours(out)):
        raise BadOutput(
            f"{out} exists and is not an earlier `smoothsal export --qupath-tiles` output; give another path"
        )


def _opener(path: Path) -> Any:
    return gzip.open if path.name.lower().endswith(".gz") else open


def is_ours(path: Path) -> bool:
    """Whether ``path`` is a FeatureCollection this module wrote (its opening bytes carry the marker)."""
    try:
        with _opener(path)(path, "rb") as f:
            head = f.read(256).decode("utf-8", "replace")
    except (OSError, EOFError):
        return False
    return head.startswith(f'{{"type": "FeatureCollection", "smoothsal": {{"kind": "{KIND}"')


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else format(v, ".10g")


def _features(
    boxes: np.ndarray, names: Sequence[str], values: np.ndarray, settings: TileExportSettings
) -> Iterator[str]:
    keys = [json.dumps(n, ensure_ascii=False) + ": " for n in names]
    head = json.dumps({"objectType": settings.object_type,
                       "classification": {"name": settings.class_name, "color": list(settings.class_color)}})[:-1]  # fmt: skip
    for start in range(0, len(boxes), CHUNK_OBJECTS):
        rows = values[start : start + CHUNK_OBJECTS].tolist()
        for (x0, y0, x1, y1), row in zip(boxes[start : start + CHUNK_OBJECTS].tolist(), rows, strict=True):
            x0, y0, x1, y1 = (_number(v) for v in (x0, y0, x1, y1))
            ring = f"[[{x0}, {y0}], [{x1}, {y0}], [{x1}, {y1}], [{x0}, {y1}], [{x0}, {y0}]]"
            # 7 significant digits: float32's; NaN and ±inf left out (JSON has none; QuPath reads missing as NaN)
            measures = ", ".join([k + format(v, ".7g") for k, v in zip(keys, row) if math.isfinite(v)])
            yield (f'{{"type": "Feature", "geometry": {{"type": "Polygon", "coordinates": [{ring}]}}, '
                   f'"properties": {head}, "measurements": {{{measures}}}}}}}')  # fmt: skip


def _write(f: IO[str], header: dict[str, Any], features: Iterator[str]) -> None:
    f.write('{"type": "FeatureCollection", "smoothsal": ' + json.dumps(header, ensure_ascii=False))
    f.write(', "features": [')
    for k, feature in enumerate(features):
        f.write(("\n" if k == 0 else ",\n") + feature)
    f.write("\n]}\n")


def export_tiles(
    container: str | Path, out: str | Path, settings: TileExportSettings = TileExportSettings(),
    tables: Sequence[str | Path] = (),
) -> TileExportSummary:  # fmt: skip
    """Write the tile objects of one container (and its slide's per-tile ``tables``) to ``out``, atomically."""
    out = Path(out)
    _check_out(out, settings)
    c = open_container(container)
    mpp, slide_id = c.meta.get("slide_mpp"), str(c.meta.get("slide_id", ""))
    if not mpp:
        raise BadStore(f"{c.path}: no slide_mpp in its metadata; rewrite it with `smoothsal heatmaps`")
    maps = [im for im in c.images if im.kind != "tissue"]
    methods = _choose("--qupath-methods", settings.methods, [im.method for im in maps], c.path)
    attributions = _choose(
        "--qupath-attributions", settings.attributions, [im.attribution for im in maps], c.path
    )
    layers = _choose("--qupath-layers", settings.layers, [im.layer for im in maps], c.path)
    chosen = [
        im for im in maps if im.method in methods and im.attribution in attributions and im.layer in layers
    ]
    tiles = c.tile_boxes()
    cells = stride_cells(tiles)
    n_sub = settings.subdivide**2
    n_objects = len(cells.cols) * n_sub
    if n_objects > settings.max_objects:
        raise BadOption(f"{c.path}: {len(cells.cols)} stride cells × {n_sub} = {n_objects} objects, more than "
                        f"{settings.max_objects}; use a smaller --qupath-subdivide")  # fmt: skip
    boxes = object_boxes(cells, settings.subdivide)
    columns: dict[str, np.ndarray] = {}
    for im in sorted(chosen, key=lambda i: (methods.index(i.method), attributions.index(i.attribution),
                                             layers.index(i.layer))):  # fmt: skip
        stats = map_statistics(c, im, boxes, float(mpp), settings.statistics)
        for stat, values in stats.items():
            columns[f"{im.method} {im.attribution} {im.layer} {STAT_NAMES[stat]}"] = values
    for path in map(Path, tables):
        method, measures = _table_measures(path, tiles, slide_id, settings, attributions, layers)
        if method not in methods:
            continue
        for name, values in measures.items():
            columns.setdefault(name, np.repeat(_cell_means(values, cells), n_sub))
    names = list(columns)
    values = (
        np.column_stack([columns[n].astype(np.float32) for n in names])
        if names
        else np.zeros((len(boxes), 0))
    )
    header = {
        "kind": KIND, "format": FORMAT, "version": __version__, "container": str(c.path), "slide_id": slide_id,
        "tables": [str(t) for t in tables], "stride_px": cells.stride, "origin_px": list(cells.origin),
        "objects": int(n_objects), "measurements": names, "settings": asdict(settings),
    }  # fmt: skip
    with atomic_path(out) as tmp:
        features = _features(boxes, names, values, settings)
        if settings.gzip:
            with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=6) as f:
                _write(f, header, features)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                _write(f, header, features)
    return TileExportSummary(out, int(n_objects), cells.stride, tuple(names), out.stat().st_size)
