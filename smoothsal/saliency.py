"""The `smoothsal saliency` stage: every layer × attribution map of every tile of one slide.

One job per slide and smoothing method. Tiles stream from the slide in batches (DataLoader worker
processes); each batch gets one ``attribute`` pass for all layers and attributions (SmoothGrad noise
seeded per tile, so results do not depend on batch boundaries or on resuming); its channel-summed
maps and its per-tile measures (TV and checkerboard share of the full maps, predictions, prediction
difference against the original model, `predictions`) go to the store and its results table
(`store`), resumably: a killed job continues from its last complete batch.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Subset
from tqdm import tqdm

from . import __version__
from .attribution import ATTRIBUTIONS, SmoothGrad, attribute
from .checkpoints import weights_sha256
from .deeplift import deeplift_rules
from .deviation import GATES, deviation
from .errors import BadInput, BadOption, BadTable
from .files import output_locks
from .hardware import hardware
from .hooks import Hooks
from .killpoints import kill_point
from .metrics import checkerboard_share, total_variation
from .model_sources import canonical_kwargs, parse_arch
from .model_spec import ModelSpec
from .models import check_input_size, layer_map
from .precision import arithmetic_of, check_precision, chosen_precision, forward
from .predictions import TASKS, check_target, check_task, choose_targets, class_logits, prediction_columns
from .smoothing import changes_nothing, check_methods, downsampling_convs, smooth
from .store import StoreWriter, check_out, results_columns
from .surrogate import surrogate_sha256
from .tiles import (
    TileDataset,
    TileLoader,
    default_workers,
    labels_sha256,
    majority_classes,
    read_tile_table,
    tile_labels,
    tiles_sha256,
)

__all__ = ["TASKS", "RunOptions", "SaliencyResult", "SaliencySettings", "run_saliency", "tile_seed"]

DEVICES = ("auto", "cpu", "cuda")
_EMPTY_EXAMPLE = 224  # input size used to order layers when a slide has no tiles
CHECK_TILES = 8  # a bf16/tf32 job also computes its first tiles in fp32, to record its own deviation

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
    precision: str = "fp32"  # arithmetic of maps and predictions: fp32 (exact), bf16, tf32 (CUDA), auto
    model_kwargs: str = ""  # the model constructor's options, canonical JSON ("" = none)
    model_code_sha256: str | None = None  # of a python: arch's .py file (set by the job)

    def __post_init__(self) -> None:
        check_methods(self.method)
        unknown = [a for a in self.attributions if a not in ATTRIBUTIONS]
        if unknown or not self.attributions:
            raise BadOption(f"unknown attributions {unknown}; allowed: {', '.join(ATTRIBUTIONS)}")
        if not self.layers:
            raise BadOption("no layers given; name at least one (e.g. --layers layer1 layer2 layer3)")
        check_target(self.target)
        if self.task not in TASKS:
            raise BadOption(f"unknown task {self.task!r}; allowed: {', '.join(TASKS)}")
        if self.smoothgrad_samples < 0 or self.smoothgrad_stdev < 0:
            raise BadOption("SmoothGrad samples and stdev must be >= 0 (samples 0 = SmoothGrad off)")
        check_precision(self.precision)
        parse_arch(self.arch)
        object.__setattr__(self, "model_kwargs", canonical_kwargs(self.model_kwargs))

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
    max_batch: int | str = "auto"  # inputs per attribution forward/backward (bounds memory; see attribute)
    allow_pickle: bool = False  # the checkpoint may be a whole pickled module (loading it runs its code)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise BadOption(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.device not in DEVICES:
            raise BadOption(f"unknown device {self.device!r}; allowed: {', '.join(DEVICES)}")


@dataclass(frozen=True)
class SaliencyResult:
    """What a finished job reports."""

    n_tiles: int
    computed: int  # tiles computed by this run (the rest came from a resumed partial state)
    resumed_from: int  # tiles already done when this run started
    seconds: float  # wall time of the whole job
    compute_seconds: float  # of the tile loop alone (tiles/s = computed / compute_seconds)
    device: str


def tile_seed(seed: int, slide_id: str, tile: int) -> int:
    """The SmoothGrad noise seed of one tile: a hash of (seed, slide, tile index), < 2⁶³."""
    digest = hashlib.sha256(f"{seed}/{slide_id}/{tile}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# --- the model side -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Models:
    original: nn.Module
    method: nn.Module
    layers: dict[str, str]  # requested name → module, in forward order
    shapes: dict[str, tuple[int, int, int]]  # requested name → (C, h, w) for one tile
    changed: tuple[str, ...] = ()  # the downsampling convs the method replaces (none: maps = the original's)
    rules: dict[str, str] | None = None  # DeepLift: module → Captum's rule it gets (deeplift.deeplift_rules)


def _resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise BadOption("--device cuda given but CUDA is not available here; use --device auto or cpu")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def _forward_layers(
    model: nn.Module, modules: dict[str, str], example: torch.Tensor
) -> tuple[list[str], dict]:
    """Requested layer names in forward order, their output shapes, and the model's output shape."""
    order: list[str] = []
    shapes: dict[str, tuple[int, int, int]] = {}
    with Hooks() as hooks, torch.no_grad():
        for name in dict.fromkeys(modules.values()):

            def hook(_m: nn.Module, _i: object, out: torch.Tensor, name: str = name) -> None:
                if name not in shapes:
                    order.append(name)
                    shapes[name] = tuple(out.shape[1:])

            hooks.forward(model.get_submodule(name), hook)
        output = model(example)
    flat = [k for k, m in modules.items() if len(shapes[m]) != 3]
    if flat:
        raise BadOption(
            f"layer {flat[0]!r} gives outputs of shape {list(shapes[modules[flat[0]]])} per tile, not maps "
            "[C, h, w]; name convolutional layers (e.g. --layers layer1 layer2 layer3, or blocks)"
        )
    by_position = sorted(modules, key=lambda k: order.index(modules[k]))
    return by_position, {
        "layers": {k: shapes[modules[k]] for k in by_position},
        "output": tuple(output.shape),
    }


def _map_size(model: nn.Module, module: str, size: int, device: torch.device) -> int:
    """The smaller side of ``module``'s output on a ``size``-px input (0 where the model cannot take it)."""
    found: list[int] = []
    with Hooks() as hooks, torch.no_grad():
        hooks.forward(model.get_submodule(module), lambda _m, _i, out: found.append(min(out.shape[-2:])))
        try:
            model(torch.zeros(1, 3, size, size, device=device))
        except RuntimeError:  # too small for a pooling window or a valid conv
            return 0
    return found[0]


def _smallest_tile(model: nn.Module, module: str, size: int, device: torch.device) -> int:
    """The smallest tile size at which ``module`` gives maps of at least 2×2 (doubling, then bisection)."""
    low, high = size, 2 * size
    while _map_size(model, module, high, device) < 2:
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if _map_size(model, module, mid, device) >= 2 else (mid, high)
    return high


def _load_models(
    settings: SaliencySettings, spec: ModelSpec, tile_size: int, device: torch.device, tiles: Path
) -> tuple[_Models, object]:
    model, paths, norm = spec.load(device)
    model = model.requires_grad_(False).eval()
    check_input_size(model, tile_size, settings.arch)
    modules = layer_map(model, settings.layers)
    example = torch.zeros(1, 3, tile_size, tile_size, device=device)
    method = smooth(
        model, settings.method, surrogate=paths if settings.method == "surrogate" else None, example=example
    )
    order, shapes = _forward_layers(method, modules, example)
    small = [k for k in order if min(shapes["layers"][k][1:]) < 2]
    if small:
        h, w = shapes["layers"][small[0]][1:]
        need = _smallest_tile(method, modules[small[0]], tile_size, device)
        raise BadOption(
            f"layer {small[0]!r} gives {h}×{w} maps on the {tile_size}-px tiles of {tiles}: a map needs at least "
            f"2×2 (TV, heatmaps); tile the slide with --tile-size {need} or more, or leave {small[0]} out"
        )
    check_task(settings.task, shapes["output"], settings.arch)
    # the original changes nothing; a method, its surrogate's or the hooks' convs
    changed: tuple[str, ...] = ()
    if settings.method != "original":
        changed = tuple(paths.conv_names if paths else downsampling_convs(model, example))
    rules = (
        deeplift_rules(method, [modules[order[0]]], example) if "deeplift" in settings.attributions else None
    )
    return _Models(model, method, {k: modules[k] for k in order}, shapes["layers"], changed, rules), norm


def _warm_up(settings: SaliencySettings, models: _Models, tile_size: int, device: torch.device) -> None:
    """The one-time work of the first batch, before the tile loop: the models' converted copies (bf16)
    and DeepLift's baseline, which ``attribute`` caches per model and input size."""
    example = torch.zeros(1, 3, tile_size, tile_size, device=device)
    forward(models.original, example, settings.precision)
    forward(models.method, example, settings.precision)
    attribute(
        models.method, example, layers=list(models.layers), target=0, attributions=settings.attributions,
        precision=settings.precision,
    )  # fmt: skip


# --- per batch ------------------------------------------------------------------------------------


def _targets(
    settings: SaliencySettings, models: _Models, x: torch.Tensor, rows: pd.DataFrame
) -> torch.Tensor:
    labels = tile_labels(rows)
    majority = majority_classes(rows) if settings.task == "segmentation" else None
    original = forward(models.original, x, settings.precision)
    if settings.task == "classification":
        original = class_logits(original)
    return choose_targets(original, labels, settings.target, task=settings.task, majority=majority)


def _maps(
    settings: SaliencySettings, models: _Models, x: torch.Tensor, rows: pd.DataFrame, target: torch.Tensor,
    max_batch: int | str, precision: str,
) -> dict[str, dict[str, torch.Tensor]]:  # fmt: skip
    """The batch's full maps in ``precision``, SmoothGrad noise seeded per tile."""
    seeds = [
        tile_seed(settings.seed, str(s), int(t)) for s, t in zip(rows["slide_id"], rows["tile"], strict=True)
    ]
    return attribute(
        models.method, x, layers=list(models.layers), target=target.to(x.device),
        attributions=settings.attributions, smoothgrad=settings.smoothgrad, max_batch=max_batch,
        noise_seeds=seeds, precision=precision,
    )  # fmt: skip


def _check_sample(
    settings: SaliencySettings, models: _Models, rows: pd.DataFrame, norm: object, device: torch.device,
    max_batch: int | str,
) -> dict[str, object] | None:  # fmt: skip
    """A bf16 (or tf32) job's own check: its first CHECK_TILES tiles also in fp32, and per attribution ×
    layer the deviation of its maps from fp32 against the library's gates (None in fp32). Logs one
    warning line per cell that misses a gate."""
    if settings.precision == "fp32" or rows.empty:
        return None
    sample = rows.iloc[:CHECK_TILES]
    data = TileDataset(sample, transform=norm)
    x = torch.stack([data[i][0] for i in range(len(sample))]).to(device)
    target = _targets(settings, models, x, sample)
    low = _maps(settings, models, x, sample, target, max_batch, settings.precision)
    ref = _maps(settings, models, x, sample, target, max_batch, "fp32")
    cells = []
    for a in settings.attributions:
        for layer in models.layers:
            d = deviation(a, layer, low[a][layer], ref[a][layer])
            missed = d.missed()
            if missed:
                log.warning(
                    "saliency: %s maps of %s at %s deviate from fp32 beyond the gates on the first %d tiles "
                    "(%s); check them, or rerun in fp32", settings.precision, a, layer, len(sample),
                    "; ".join(missed),
                )  # fmt: skip
            cells.append(d.as_dict() | {"missed": missed})
    return {"precision": settings.precision, "tiles": len(sample), "gates": asdict(GATES), "cells": cells}


def _check_finite(what: str, values: torch.Tensor, rows: pd.DataFrame) -> None:
    """A NaN or Inf fails the job naming the slide and the first such tile (earlier batches stay done)."""
    bad = ~torch.isfinite(values.detach()).flatten(1).all(dim=1).cpu()
    if bool(bad.any()):
        r = rows.iloc[int(bad.nonzero()[0, 0])]
        raise BadInput(
            f"saliency: slide {r['slide_id']} tile {int(r['tile'])} (x {r['x']}, y {r['y']}): the {what} are not "
            "finite (NaN/Inf); check the model's weights and that tile; finished batches are kept (a rerun resumes)"
        )


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
    original = forward(models.original, x, settings.precision)  # fp32 logits, in the maps' arithmetic
    out = original if settings.method == "original" else forward(models.method, x, settings.precision)
    if settings.task == "classification":
        original, out = class_logits(original), class_logits(out)
    _check_finite("logits of the original model", original, rows)
    _check_finite(f"logits of the {settings.method} model", out, rows)
    target = choose_targets(original, labels, settings.target, task=settings.task, majority=majority)
    maps = _maps(settings, models, x, rows, target, max_batch, settings.precision)
    summed, tv, checkerboard = {}, {}, {}
    for a in settings.attributions:
        for layer in models.layers:
            z = maps[a][layer]
            _check_finite(f"{a} maps at {layer}", z, rows)
            tv[f"tv/{a}/{layer}"] = total_variation(z).cpu().numpy().astype(np.float64)
            checkerboard[f"checkerboard/{a}/{layer}"] = checkerboard_share(z).cpu().numpy()
            summed[(a, layer)] = z.sum(dim=1).float().cpu().numpy()
    preds = prediction_columns(settings.task, original.cpu(), out.cpu(), labels, target, majority)
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
            **checkerboard,
        }
    )
    return summed, table


# --- the job --------------------------------------------------------------------------------------


def _prepare(
    slide: Path, tiles: Path, settings: SaliencySettings, checkpoint: Path | None, surrogate: Path | None
) -> tuple[SaliencySettings, pd.DataFrame]:
    """The settings with the files' own hashes (they guard resume and are the store's provenance) and
    the slide's checked tile table."""
    if settings.method == "surrogate" and surrogate is None:
        raise BadOption("method 'surrogate' needs a trained surrogate: pass --surrogate FILE")
    settings = replace(
        settings, model_sha256=weights_sha256(checkpoint), surrogate_sha256=surrogate_sha256(surrogate),
        model_code_sha256=parse_arch(settings.arch).code_sha256(),
    )  # fmt: skip
    table = read_tile_table(tiles, slide)
    if settings.task == "segmentation" and "majority_class" not in table:
        raise BadTable(
            f"tile table {tiles} has no majority_class column (the segmentation target); "
            "make it with `smoothsal tiles --annotations FILE --class-map ...`"
        )
    k = settings.num_classes
    column = "majority_class" if settings.task == "segmentation" else "label"
    if column in table and not table.empty and not (settings.task == "classification" and k == 1):
        values = pd.to_numeric(table[column], errors="coerce").fillna(-1)
        if values.max() >= k:
            raise BadOption(
                f"tile table {tiles} has {column} up to {int(values.max())} but the model has {k} classes; "
                "check --num-classes"
            )
    return settings, table


def run_saliency(
    slide: Path,
    tiles: Path,
    settings: SaliencySettings,
    options: RunOptions,
    *,
    checkpoint: Path | None = None,
    surrogate: Path | None = None,
) -> SaliencyResult:
    """Saliency store + per-tile table of one slide under one method (resumable; see module doc).

    Both outputs are locked for the whole run and checked before any work (`store.check_out`)."""
    with output_locks(options.out, options.table):
        check_out(options.out, options.table)
        return _run(slide, tiles, settings, options, checkpoint, surrogate)


def _run(
    slide: Path, tiles: Path, settings: SaliencySettings, options: RunOptions, checkpoint: Path | None,
    surrogate: Path | None,
) -> SaliencyResult:  # fmt: skip
    began = time.perf_counter()
    settings, table = _prepare(Path(slide), Path(tiles), settings, checkpoint, surrogate)
    device = _resolve_device(options.device)
    requested = settings.precision
    settings = replace(settings, precision=chosen_precision(requested, device))  # recorded as resolved
    arithmetic_of(settings.precision, device)  # tf32 off CUDA fails here, before any work
    n = len(table)
    tile_size = int(table["tile_size"].iloc[0]) if n else _EMPTY_EXAMPLE
    spec = ModelSpec(
        settings.arch, settings.num_classes, checkpoint, surrogate, settings.mean, settings.std,
        settings.model_kwargs, options.allow_pickle,
    )  # fmt: skip
    models, norm = _load_models(settings, spec, tile_size, device, Path(tiles))
    layers = list(models.layers)
    slide_id = str(table["slide_id"].iloc[0]) if n else Path(slide).stem
    unchanged = settings.method != "original" and not models.changed
    meta = {
        "version": __version__, "slide_id": slide_id, "slide_path": str(slide), "method": settings.method,
        "layers": layers, "attributions": list(settings.attributions),
        "settings": settings.as_dict() | {"mean": list(norm.mean), "std": list(norm.std)},
        "tiles_sha256": tiles_sha256(table), "n_tiles": n, "precision_requested": requested,
        "hardware": hardware(device).as_dict(), "changed_ops": list(models.changed), "deeplift_rules": models.rules,
        "warnings": [changes_nothing(settings.method, f"arch {settings.arch!r}")] if unchanged else [],
    }  # fmt: skip
    rows = table.assign(tile=np.arange(n, dtype=np.int64))
    check = _check_sample(settings, models, rows, norm, device, options.max_batch)
    if check is not None:
        meta["precision_check"] = check
    writer = StoreWriter(options.out, options.table, meta)
    done = writer.open(
        {layer: shape[1:] for layer, shape in models.shapes.items()}, tile_size, labels_sha256(table)
    )
    if done:
        log.warning("saliency: resuming %s at tile %d of %d", options.out, done, n)
    dataset = Subset(TileDataset(rows, transform=norm), range(done, n))
    workers = default_workers(1) if options.workers is None else options.workers
    loader = TileLoader(
        dataset, batch_size=options.batch_size, num_workers=workers if len(dataset) else 0,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    if len(dataset):
        _warm_up(settings, models, tile_size, device)
    loop_began = time.perf_counter()
    with tqdm(
        total=n, initial=done, unit="tile", desc=f"saliency {settings.method} {slide_id}",
        disable=not options.progress, dynamic_ncols=True,
    ) as bar:  # fmt: skip
        for x, index in loader:
            start, stop = int(index[0]), int(index[-1]) + 1
            maps, part = _batch(settings, models, x.to(device), rows.iloc[start:stop], options.max_batch)
            writer.write_batch(start, stop, maps, part)
            bar.update(stop - start)
            kill_point("saliency.batch")  # tests: a real, uncatchable interruption after N batches
    loop_seconds = time.perf_counter() - loop_began
    writer.finish(results_columns(settings.num_classes, settings.attributions, layers))
    return SaliencyResult(n, n - done, done, time.perf_counter() - began, loop_seconds, device.type)
