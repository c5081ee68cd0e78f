"""The `smoothsal saliency` stage: every layer × attribution map of every tile of one slide.

One job per slide and smoothing method. Tiles stream from the slide in batches (DataLoader worker
processes); each batch gets one ``attribute`` pass for all layers and attributions (SmoothGrad noise
seeded per tile, so results do not depend on batch boundaries or on resuming), its channel-summed
maps go straight into a chunked Zarr v2 store and its per-tile measures (TV of the full maps,
predictions, prediction difference against the original model) into a small table. Work state sits
in a hidden sibling ``.{out}.partial/``; a killed job continues from its last complete batch, and
the store and table appear under their final names only when every tile is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from . import __version__
from .attribution import ATTRIBUTIONS, SmoothGrad, attribute
from .errors import BadOption
from .evaluation import TARGETS
from .files import atomic_path, is_zarr_group, replace_dir
from .killpoints import kill_point
from .metrics import (
    majority_label,
    masked_prediction_difference,
    prediction_difference,
    probabilities,
    total_variation,
)
from .models import layer_map, weights_sha256
from .smoothing import METHODS, smooth
from .surrogate import load_with_surrogate, surrogate_sha256
from .tiles import (
    TileDataset,
    default_workers,
    labels_sha256,
    majority_classes,
    read_tile_table,
    tile_labels,
    tiles_sha256,
)

__all__ = [
    "TASKS",
    "RunOptions",
    "SaliencyResult",
    "SaliencySettings",
    "check_out",
    "partial_dir",
    "run_saliency",
    "table_columns",
    "tile_seed",
]

TASKS = ("classification", "segmentation")
DEVICES = ("auto", "cpu", "cuda")
PROGRESS_FORMAT = "smoothsal-saliency-progress/1"
COMPACT_ROWS = 64  # per-batch row files kept before they are merged into one
CHUNK_TILES = 64  # tiles per zarr chunk (one chunk = 64 maps of one layer: ~1 MB at 56×56)
_EMPTY_EXAMPLE = 224  # input size used to order layers when a slide has no tiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaliencySettings:
    """Everything that decides the maps and the table (recorded in both; guards resume)."""

    arch: str
    num_classes: int
    method: str
    layers: tuple[str, ...]
    attributions: tuple[str, ...] = ATTRIBUTIONS
    smoothgrad_samples: int = 20  # 0 = SmoothGrad off
    smoothgrad_stdev: float = 0.2
    seed: int = 0
    target: str = "label"
    task: str = "classification"
    dataset: str = ""
    model_sha256: str = "random-init"
    surrogate_sha256: str | None = None
    mean: tuple[float, ...] | None = None  # None: the surrogate's or ImageNet's
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; allowed: {', '.join(METHODS)}")
        unknown = [a for a in self.attributions if a not in ATTRIBUTIONS]
        if unknown or not self.attributions:
            raise ValueError(f"unknown attributions {unknown}; allowed: {', '.join(ATTRIBUTIONS)}")
        if not self.layers:
            raise ValueError("no layers given; name at least one (e.g. --layers layer1 layer2 layer3)")
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; allowed: {', '.join(TARGETS)}")
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; allowed: {', '.join(TASKS)}")
        if self.smoothgrad_samples < 0 or self.smoothgrad_stdev < 0:
            raise ValueError("SmoothGrad samples and stdev must be >= 0 (samples 0 = SmoothGrad off)")

    @property
    def smoothgrad(self) -> SmoothGrad | None:
        if self.smoothgrad_samples == 0:
            return None
        return SmoothGrad(self.smoothgrad_samples, self.smoothgrad_stdev)

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass(frozen=True)
class RunOptions:
    """How the job runs; none of these change the results."""

    out: Path  # the saliency store ({method}.zarr)
    table: Path  # the per-tile table ({method}.parquet)
    batch_size: int = 8
    workers: int | None = None  # DataLoader workers; None = min(4, cores − 1)
    device: str = "auto"
    progress: bool = True
    max_batch: int = 32  # inputs per attribution forward/backward (bounds memory)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; allowed: {', '.join(DEVICES)}")


@dataclass(frozen=True)
class SaliencyResult:
    """What a finished job reports."""

    n_tiles: int
    computed: int  # tiles computed by this run (the rest came from a resumed partial state)
    resumed_from: int  # tiles already done when this run started
    seconds: float  # wall time of the whole job
    compute_seconds: float  # of the tile loop alone (tiles/s = computed / compute_seconds)
    device: str


# --- inputs ---------------------------------------------------------------------------------------


def check_out(out: Path) -> None:
    """``--out`` is replaced at the end: refuse anything there that is not a Zarr store (a typo such as
    ``--out results/`` must not delete a folder)."""
    if out.exists() and not is_zarr_group(out):
        raise ValueError(
            f"{out} exists and is not a saliency store; give a new path ending in {{method}}.zarr, or remove it"
        )


def tile_seed(seed: int, slide_id: str, tile: int) -> int:
    """The SmoothGrad noise seed of one tile: a hash of (seed, slide, tile index), < 2⁶³."""
    digest = hashlib.sha256(f"{seed}/{slide_id}/{tile}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def partial_dir(out: Path) -> Path:
    """Where a job keeps its work state: a hidden sibling of the store."""
    return out.parent / f".{out.name}.partial"


def table_columns(settings: SaliencySettings, layers: Sequence[str]) -> list[str]:
    """The per-tile table's columns, in order."""
    k = settings.num_classes
    return [
        "dataset", "slide_id", "method", "arch", "tile", "x", "y", "w", "h", "mpp", "label", "target", "task",
        *(f"logit_{c}" for c in range(k)), *(f"prob_{c}" for c in range(k)),
        "pred", "correct", "pd_all", "pd_target", "pd_masked",
        *(f"tv/{a}/{layer}" for a in settings.attributions for layer in layers),
    ]  # fmt: skip


# --- the model side -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Models:
    original: nn.Module
    method: nn.Module
    layers: dict[str, str]  # requested name → module, in forward order
    shapes: dict[str, tuple[int, int, int]]  # requested name → (C, h, w) for one tile


def _resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda given but CUDA is not available here; use --device auto or cpu")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def _forward_layers(
    model: nn.Module, modules: dict[str, str], example: torch.Tensor
) -> tuple[list[str], dict]:
    """Requested layer names in forward order, their output shapes, and the model's output shape."""
    order: list[str] = []
    shapes: dict[str, tuple[int, int, int]] = {}
    handles = []
    for name in dict.fromkeys(modules.values()):

        def hook(_m: nn.Module, _i: object, out: torch.Tensor, name: str = name) -> None:
            if name not in shapes:
                order.append(name)
                shapes[name] = tuple(out.shape[1:])

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            output = model(example)
    finally:
        for h in handles:
            h.remove()
    by_position = sorted(modules, key=lambda k: order.index(modules[k]))
    return by_position, {
        "layers": {k: shapes[modules[k]] for k in by_position},
        "output": tuple(output.shape),
    }


def _check_task(task: str, output: tuple[int, ...], arch: str) -> None:
    spatial = output[2:]
    classification = len(output) == 2 or (len(output) == 4 and spatial == (1, 1))
    if task == "classification" and not classification:
        raise ValueError(
            f"arch {arch!r} gives outputs of shape {list(output)} ([B, K, H, W]): "
            "a segmentation model; pass --task segmentation"
        )
    if task == "segmentation" and (len(output) != 4 or spatial == (1, 1)):
        raise ValueError(
            f"arch {arch!r} gives outputs of shape {list(output)}, not [B, K, H, W] maps; "
            "pass --task classification"
        )


def _load_models(
    settings: SaliencySettings,
    checkpoint: Path | None,
    surrogate: Path | None,
    tile_size: int,
    device: torch.device,
) -> tuple[_Models, object]:
    model, paths, norm = load_with_surrogate(
        settings.arch, num_classes=settings.num_classes, checkpoint=checkpoint, surrogate=surrogate,
        mean=settings.mean, std=settings.std, device=device,
    )  # fmt: skip
    model = model.requires_grad_(False).eval()
    modules = layer_map(model, settings.layers)
    example = torch.zeros(1, 3, tile_size, tile_size, device=device)
    method = smooth(
        model, settings.method, surrogate=paths if settings.method == "surrogate" else None, example=example
    )
    order, shapes = _forward_layers(method, modules, example)
    _check_task(settings.task, shapes["output"], settings.arch)
    return _Models(model, method, {k: modules[k] for k in order}, shapes["layers"]), norm


# --- per batch ------------------------------------------------------------------------------------


def _class_outputs(out: torch.Tensor) -> torch.Tensor:
    """[B, K] logits of a classification model ([B, K] or [B, K, 1, 1])."""
    return out.flatten(1)


def _targets(
    settings: SaliencySettings, original: torch.Tensor, labels: torch.Tensor, majority: torch.Tensor
) -> torch.Tensor:
    """DESIGN §1: classification → label (predicted where unlabelled, or always with --target
    predicted), 0 for one logit; segmentation → the tile's majority class (−1: no annotation) or,
    where there is none and with --target predicted, the original's predicted majority
    non-background class."""
    if settings.task == "segmentation":
        predicted = majority_label(original.argmax(1).cpu())
        return torch.where(majority >= 0, majority, predicted) if settings.target == "label" else predicted
    if original.shape[1] == 1:
        return torch.zeros(len(original), dtype=torch.long)
    predicted = original.argmax(1).cpu()
    return torch.where(labels >= 0, labels, predicted) if settings.target == "label" else predicted


def _prediction_columns(
    settings: SaliencySettings,
    original: torch.Tensor,
    out: torch.Tensor,
    labels: torch.Tensor,
    target: torch.Tensor,
    majority: torch.Tensor,
) -> dict[str, np.ndarray]:
    """logit_k, prob_k, pred, correct, pd_all, pd_target, pd_masked for one batch (CPU, float)."""
    p_orig, p_new = probabilities(original), probabilities(out)
    k = out.shape[1]
    if settings.task == "segmentation":
        logits, probs = out.mean(dim=(2, 3)), p_new.mean(dim=(2, 3))
        pred = majority_label(out.argmax(1))
        correct = np.full(len(out), np.nan)
        pixels = out.shape[2] * out.shape[3]
        pd_all, pd_target = prediction_difference(  # pixels as samples, then the mean per tile
            _pixels(p_orig), _pixels(p_new), target.repeat_interleave(pixels)
        )
        pd_all, pd_target = pd_all.view(len(out), -1).mean(1), pd_target.view(len(out), -1).mean(1)
        # the metric only needs each tile's majority label: a 1×1 "mask" holding it
        # (no annotation, −1, counts as background: NaN, as the metric is defined by the mask)
        pd_masked = masked_prediction_difference(p_orig, p_new, majority.clamp_min(0).view(-1, 1, 1)).numpy()
    else:
        logits, probs = out, p_new
        pred = (out[:, 0] > 0).long() if k == 1 else out.argmax(1)
        correct = np.where(labels.numpy() >= 0, (pred == labels).numpy().astype(float), np.nan)
        pd_all, pd_target = prediction_difference(p_orig, p_new, target)
        pd_masked = np.full(len(out), np.nan)
    cols = {f"logit_{c}": logits[:, c].numpy() for c in range(k)}
    cols |= {f"prob_{c}": probs[:, c].numpy() for c in range(k)}
    return cols | {
        "pred": pred.numpy().astype(np.int64),
        "correct": correct,
        "pd_all": pd_all.numpy().astype(np.float64),
        "pd_target": pd_target.numpy().astype(np.float64),
        "pd_masked": np.asarray(pd_masked, dtype=np.float64),
    }


def _pixels(p: torch.Tensor) -> torch.Tensor:
    """[B, K, H, W] → [B·H·W, K]."""
    return p.permute(0, 2, 3, 1).reshape(-1, p.shape[1])


def _batch(
    settings: SaliencySettings,
    models: _Models,
    x: torch.Tensor,
    rows: pd.DataFrame,
    max_batch: int,
) -> tuple[dict[tuple[str, str], np.ndarray], pd.DataFrame]:
    """One batch: channel-summed maps per (attribution, layer) and the batch's table rows."""
    labels = tile_labels(rows)
    majority = majority_classes(rows) if settings.task == "segmentation" else None
    with torch.no_grad():
        original = models.original(x).float()
        out = original if settings.method == "original" else models.method(x).float()
    if settings.task == "classification":
        original, out = _class_outputs(original), _class_outputs(out)
    target = _targets(settings, original, labels, majority)
    seeds = [
        tile_seed(settings.seed, str(s), int(t)) for s, t in zip(rows["slide_id"], rows["tile"], strict=True)
    ]
    maps = attribute(
        models.method, x, layers=list(models.layers), target=target.to(x.device),
        attributions=settings.attributions, smoothgrad=settings.smoothgrad, max_batch=max_batch,
        noise_seeds=seeds,
    )  # fmt: skip
    summed, tv = {}, {}
    for a in settings.attributions:
        for layer in models.layers:
            z = maps[a][layer]
            tv[f"tv/{a}/{layer}"] = total_variation(z).cpu().numpy().astype(np.float64)
            summed[(a, layer)] = z.sum(dim=1).float().cpu().numpy()
    preds = _prediction_columns(settings, original.cpu(), out.cpu(), labels, target, majority)
    table = pd.DataFrame(
        {
            "dataset": settings.dataset,
            "slide_id": rows["slide_id"].astype(str).to_numpy(),
            "method": settings.method,
            "arch": settings.arch,
            "tile": rows["tile"].to_numpy(np.int64),
            **{c: rows[c].to_numpy() for c in ("x", "y", "w", "h")},
            "mpp": rows["mpp"].to_numpy(np.float64) if "mpp" in rows else np.nan,
            "label": labels.numpy(),
            "target": target.numpy().astype(np.int64),
            "task": settings.task,
            **preds,
            **tv,
        }
    )
    return summed, table


# --- work state -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _State:
    """Paths of a job's partial state."""

    root: Path
    store: Path
    rows: Path
    progress: Path

    @classmethod
    def of(cls, out: Path) -> _State:
        root = partial_dir(out)
        return cls(root, root / out.name, root / "rows", root / "progress.json")

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


def _start(
    state: _State,
    meta: dict,
    n: int,
    shapes: dict[str, tuple[int, int, int]],
    tile_size: int,
    targets_sha256: str = "",
) -> tuple[zarr.Group, int]:
    """Open the partial state when it belongs to these settings, tiles and labels, else start afresh."""
    progress = state.read_progress()
    key = {
        "settings": meta["settings"], "tiles_sha256": meta["tiles_sha256"], "n_tiles": n,
        "targets_sha256": targets_sha256,
    }  # fmt: skip
    if progress is not None and progress.get("key") == key and state.store.is_dir():
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
    group.attrs["smoothsal"] = meta
    for a in meta["attributions"]:
        for layer in meta["layers"]:
            _, h, w = shapes.get(layer, (0, 0, 0))
            arr = group.create_array(
                f"{a}/{layer}", shape=(n, h, w), chunks=(max(1, min(n, CHUNK_TILES)), max(h, 1), max(w, 1)),
                dtype="float32", fill_value=np.nan,
            )  # fmt: skip
            arr.attrs.update({"layer": layer, "attribution": a, "stride": tile_size / h if h else None})
    state.write_progress({"format": PROGRESS_FORMAT, "key": key, "batches": []})
    return group, 0


def _finish(state: _State, options: RunOptions, meta: dict, columns: list[str], n: int) -> None:
    """Check every tile is done, move the store into place, write the table (last)."""
    progress = state.read_progress()
    if progress is None or _done(progress["batches"]) < n:
        raise RuntimeError(f"saliency: {state.root} does not hold every tile; rerun the job")
    parts = sorted(state.rows.glob("*.parquet"))
    if parts:
        table = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True).sort_values("tile")
        table = table.drop_duplicates("tile").reset_index(drop=True)[columns]
    else:
        table = pd.DataFrame({c: pd.Series(dtype=_empty_dtype(c)) for c in columns})
    zarr.consolidate_metadata(zarr.open_group(state.store, mode="r+", zarr_format=2).store)
    replace_dir(state.store, options.out)
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), b"smoothsal": json.dumps(meta)})
    with atomic_path(options.table) as tmp:
        pq.write_table(arrow, tmp)
    shutil.rmtree(state.root, ignore_errors=True)


def _empty_dtype(column: str) -> str:
    if column in ("dataset", "slide_id", "method", "arch", "task"):
        return "object"
    if column in ("tile", "x", "y", "w", "h", "label", "target", "pred"):
        return "int64"
    return "float64"


# --- the job --------------------------------------------------------------------------------------


def run_saliency(
    slide: Path,
    tiles: Path,
    settings: SaliencySettings,
    options: RunOptions,
    *,
    checkpoint: Path | None = None,
    surrogate: Path | None = None,
) -> SaliencyResult:
    """Saliency store + per-tile table of one slide under one method (resumable; see module doc)."""
    began = time.perf_counter()
    # the files' own hashes, whatever the caller put in: they guard resume and are the store's provenance
    if settings.method == "surrogate" and surrogate is None:
        raise BadOption("method 'surrogate' needs a trained surrogate: pass --surrogate FILE")
    settings = replace(
        settings, model_sha256=weights_sha256(checkpoint), surrogate_sha256=surrogate_sha256(surrogate)
    )
    check_out(options.out)
    table = read_tile_table(tiles, slide)
    if settings.task == "segmentation" and "majority_class" not in table:
        raise ValueError(
            f"tile table {tiles} has no majority_class column (the segmentation target); "
            "make it with `smoothsal tiles --annotations FILE --class-map ...`"
        )
    if checkpoint is not None and not checkpoint.is_file():
        raise FileNotFoundError(f"model checkpoint {checkpoint} does not exist")
    _check_labels(settings, table, tiles)
    device = _resolve_device(options.device)
    n = len(table)
    tile_size = int(table["tile_size"].iloc[0]) if n else _EMPTY_EXAMPLE
    models, norm = _load_models(settings, checkpoint, surrogate, tile_size, device)
    layers = list(models.layers)
    settings_dict = settings.as_dict() | {"mean": list(norm.mean), "std": list(norm.std)}
    slide_id = str(table["slide_id"].iloc[0]) if n else slide.stem
    meta = {
        "version": __version__, "slide_id": slide_id, "slide_path": str(slide), "method": settings.method,
        "layers": layers, "attributions": list(settings.attributions), "settings": settings_dict,
        "tiles_sha256": tiles_sha256(table), "n_tiles": n,
    }  # fmt: skip
    state = _State.of(options.out)
    group, done = _start(state, meta, n, models.shapes if n else {}, tile_size, labels_sha256(table))
    if done:
        log.warning("saliency: resuming %s at tile %d of %d", options.out, done, n)
    arrays = {(a, layer): group[f"{a}/{layer}"] for a in settings.attributions for layer in layers}
    rows = table.assign(tile=np.arange(n, dtype=np.int64))
    dataset = Subset(TileDataset(rows, transform=norm), range(done, n))
    workers = default_workers(1) if options.workers is None else options.workers
    loader = DataLoader(
        dataset, batch_size=options.batch_size, num_workers=workers if len(dataset) else 0,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    progress = state.read_progress()
    loop_began = time.perf_counter()
    with tqdm(
        total=n, initial=done, unit="tile", desc=f"saliency {settings.method} {slide_id}",
        disable=not options.progress, dynamic_ncols=True,
    ) as bar:  # fmt: skip
        for x, index in loader:
            start, stop = int(index[0]), int(index[-1]) + 1
            maps, part = _batch(settings, models, x.to(device), rows.iloc[start:stop], options.max_batch)
            for key, values in maps.items():
                arrays[key][start:stop] = values
            with atomic_path(state.rows / f"{start:09d}.parquet") as tmp:
                part.to_parquet(tmp, index=False)
            _add_batch(progress["batches"], start, stop)
            state.write_progress(progress)  # the batch counts as done from here on
            _compact_rows(state.rows)
            bar.update(stop - start)
            kill_point("saliency.batch")  # tests: a real, uncatchable interruption after N batches
    loop_seconds = time.perf_counter() - loop_began
    _finish(state, options, meta, table_columns(settings, layers), n)
    return SaliencyResult(n, n - done, done, time.perf_counter() - began, loop_seconds, device.type)


def _check_labels(settings: SaliencySettings, table: pd.DataFrame, tiles: Path) -> None:
    """Labels / majority classes must name classes of the model."""
    k = settings.num_classes
    column = "majority_class" if settings.task == "segmentation" else "label"
    if column not in table or table.empty or (settings.task == "classification" and k == 1):
        return
    values = pd.to_numeric(table[column], errors="coerce").fillna(-1)
    if values.max() >= k:
        raise ValueError(
            f"tile table {tiles} has {column} up to {int(values.max())} but the model has {k} classes; "
            "check --num-classes"
        )
