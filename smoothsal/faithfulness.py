"""The `smoothsal faithfulness` stage: do a method's stored maps explain the ORIGINAL model?

One job per slide and method, on a seeded sample of the slide's tiles (stratified by label; the same
tiles for every method of a slide, so methods compare tile by tile). Per sampled tile and stored map
(attribution × layer):

- deletion / insertion AUC on the original model (`perturbation`), and the same for a seeded random
  pixel order (the reference; one per tile, shared by every method);
- relevance mass where the slide has annotations and the tile's target region covers 10–90 % of it;
- cascading model-parameter randomisation of the method's model (`randomisation`): the Spearman
  correlation of |map| with the stored map after each step, maps recomputed with the store's SmoothGrad
  settings and seeds.

The stored maps must belong to this slide's tile table, this method and this model (checked against
the store's metadata, one line naming both files). Deletion/insertion need forward passes only; the
randomisation costs one ``attribute`` pass per cascade step (``by="stage"``: head + 4 stages).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import __version__
from .annotations import parse_class_map, read_annotations
from .annotations.masks import tile_label_mask
from .attribution import SmoothGrad
from .checkpoints import weights_sha256
from .errors import BadOption, BadStore, BadTable
from .faithfulness_tables import write_faithfulness
from .killpoints import kill_point
from .metrics import region_fraction, relevance_mass
from .model_spec import ModelSpec
from .models import Normalize
from .perturbation import BASELINES, PerturbationSettings, deletion_insertion, upsample_maps
from .predictions import choose_targets, class_logits
from .randomisation import BATCHNORM, GROUPINGS, RandomisationSettings, attribution_maps, randomisation_curves
from .saliency import DEVICES, tile_seed
from .smoothing import smooth
from .store import SaliencyStore, open_store
from .surrogate import surrogate_sha256
from .tiles import TileDataset, majority_classes, read_tile_table, tile_labels, tiles_sha256

__all__ = [
    "FaithfulnessOptions",
    "FaithfulnessResult",
    "FaithfulnessSettings",
    "check_store",
    "fractions",
    "run_faithfulness",
    "sample_tiles",
]

MASS_RANGE = (0.1, 0.9)  # target-region share of a tile where relevance mass can tell maps apart


@dataclass(frozen=True)
class FaithfulnessSettings:
    """Everything that decides the faithfulness numbers (recorded in the tables; the one source of
    defaults for the CLI and the workflow's schema). ``sample``: tiles per slide (0 = all)."""

    sample: int = 64
    steps: int = 20
    baseline: str = "blur"
    blur_um: float = 5.0  # σ of the blurred copy, µm (converted to px at the tile's µm/px)
    randomisation: bool = True
    by: str = "stage"
    batchnorm: str = "reset"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sample < 0:
            raise BadOption(f"--sample must be >= 0 (0 = every tile), got {self.sample}")
        if self.steps < 1:
            raise BadOption(f"--steps must be >= 1, got {self.steps}")
        if self.baseline not in BASELINES:
            raise BadOption(f"unknown baseline {self.baseline!r}; allowed: {', '.join(BASELINES)}")
        if not self.blur_um > 0:
            raise BadOption(f"--blur-um must be > 0, got {self.blur_um}")
        if self.by not in GROUPINGS or self.batchnorm not in BATCHNORM:
            raise BadOption(f"--by must be one of {GROUPINGS}, --batchnorm one of {BATCHNORM}")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class FaithfulnessOptions:
    """How the job runs; none of these change the results."""

    out: Path  # the per-tile table (.parquet)
    randomisation_out: Path  # the randomisation table (.parquet)
    batch_size: int = 16  # tiles per chunk
    device: str = "auto"
    max_batch: int = 32  # inputs per forward (and backward) pass
    dataset: str = ""  # the dataset name written into the tables

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_batch < 1:
            raise BadOption("--batch-size and --max-batch must be >= 1")
        if self.device not in DEVICES:
            raise BadOption(f"unknown device {self.device!r}; allowed: {', '.join(DEVICES)}")


@dataclass(frozen=True)
class FaithfulnessResult:
    n_tiles: int
    sampled: int
    seconds: float
    device: str


# --- which tiles ----------------------------------------------------------------------------------


def sample_tiles(table: pd.DataFrame, n: int, seed: int) -> np.ndarray:
    """Row positions of a seeded sample of ``n`` tiles (0 or ≥ len: all), sorted.

    Stratified by ``label``: the labels (unlabelled tiles are one more group) take turns, each in its
    own seeded random order, so a rare class gets as many tiles as it has, up to an equal share.
    """
    total = len(table)
    if n == 0 or n >= total:
        return np.arange(total)
    rng = np.random.default_rng(seed)
    labels = tile_labels(table).numpy()
    groups = [rng.permutation(np.flatnonzero(labels == v)) for v in np.unique(labels)]
    picked: list[int] = []
    depth = 0
    while len(picked) < n:
        picked += [int(g[depth]) for g in groups if depth < len(g)][: n - len(picked)]
        depth += 1
    return np.sort(np.asarray(picked, dtype=np.int64))


# --- the store against its inputs -----------------------------------------------------------------


def _mismatch(
    store: SaliencyStore, what: str, theirs: object, ours: object, other: str, fix: str
) -> BadStore:
    return BadStore(
        f"{store.path} holds saliency of {what} {theirs!r}, but {other} is {what} {ours!r}; {fix}"
    )


def check_store(
    store: SaliencyStore, tiles: Path, table: pd.DataFrame, method: str, model: ModelSpec, layers: list[str]
) -> None:
    """One line naming the store and the other file unless the store's maps are this slide's tiles
    under this method and model, with every layer of ``layers``."""
    fix = "give the store `smoothsal saliency` wrote for these inputs (or rerun it)"
    slide_id = str(table["slide_id"].iloc[0]) if len(table) else store.meta["slide_id"]
    if str(store.meta["slide_id"]) != slide_id:
        raise _mismatch(store, "slide", store.meta["slide_id"], slide_id, f"tile table {tiles}", fix)
    if store.method != method:
        raise _mismatch(store, "method", store.method, method, "--method", fix)
    if store.meta["tiles_sha256"] != tiles_sha256(table) or int(store.meta["n_tiles"]) != len(table):
        raise BadStore(f"{store.path} was computed on other tiles than tile table {tiles} holds; {fix}")
    s = store.settings
    ours = {"arch": model.arch, "num_classes": model.num_classes, "model_kwargs": model.kwargs}
    for key, value in ours.items():
        if s.get(key, "") != value:
            raise _mismatch(store, key, s.get(key, ""), value, f"--{key.replace('_', '-')}", fix)
    checkpoint = model.checkpoint or "(none: random init)"
    if s.get("model_sha256") != weights_sha256(model.checkpoint):
        raise BadStore(f"{store.path} holds saliency of another model than checkpoint {checkpoint}; {fix}")
    if method == "surrogate" and s.get("surrogate_sha256") != surrogate_sha256(model.surrogate):
        raise BadStore(f"{store.path} holds saliency of another surrogate than {model.surrogate}; {fix}")
    missing = [layer for layer in layers if layer not in store.layers]
    if missing:
        raise BadStore(
            f"{store.path} has no maps at layer(s) {', '.join(missing)} (it holds {', '.join(store.layers)}) "
            f"for tile table {tiles}; rerun `smoothsal saliency` with those --layers"
        )


# --- one chunk of sampled tiles -------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    store: SaliencyStore
    settings: FaithfulnessSettings
    options: FaithfulnessOptions
    original: nn.Module
    method: nn.Module
    layers: list[str]
    slide_id: str
    sigma_px: float
    annotations: object | None


def _stored_maps(job: _Job, rows: np.ndarray, tiles: Path) -> dict[tuple[str, str], torch.Tensor]:
    maps = {}
    for a in job.store.attributions:
        for layer in job.layers:
            reader = job.store.maps(a, layer)
            values = np.stack([reader[int(i)] for i in rows])
            if np.isnan(values).any():
                raise BadStore(
                    f"{job.store.path}: maps {a}/{layer} of tiles of {tiles} are missing (NaN); the store is "
                    "incomplete, rerun `smoothsal saliency`"
                )
            maps[(a, layer)] = torch.from_numpy(values)
    return maps


def _targets(job: _Job, x: torch.Tensor, rows: pd.DataFrame) -> torch.Tensor:
    """The targets the saliency stage explained (same rule, same original model)."""
    s = job.store.settings
    task = s.get("task", "classification")
    with torch.no_grad():
        out = job.original(x).float().cpu()
    out = class_logits(out) if task == "classification" else out
    majority = majority_classes(rows) if task == "segmentation" else None
    return choose_targets(out, tile_labels(rows), s.get("target", "label"), task=task, majority=majority)


def _masks(job: _Job, rows: pd.DataFrame) -> torch.Tensor | None:
    if job.annotations is None:
        return None
    masks = [
        tile_label_mask(job.annotations, int(r.x), int(r.y), int(r.w), int(r.tile_size))
        for r in rows.itertuples(index=False)
    ]
    return torch.from_numpy(np.stack(masks).astype(np.int64))


def _mass(maps: torch.Tensor, mask: torch.Tensor | None, target: torch.Tensor, size) -> tuple:
    n = len(target)
    if mask is None:
        return np.full(n, np.nan), np.full(n, np.nan)
    fraction = region_fraction(mask, target).cpu().numpy()
    mass = relevance_mass(upsample_maps(maps, size), mask == target.view(-1, 1, 1)).cpu().numpy()
    usable = (fraction >= MASS_RANGE[0]) & (fraction <= MASS_RANGE[1])
    return np.where(usable, mass, np.nan), fraction


def _chunk(job: _Job, x: torch.Tensor, rows: pd.DataFrame, tiles: Path) -> tuple[list[dict], list[dict]]:
    """Per-tile rows and randomisation rows of one chunk of sampled tiles."""
    index = rows["tile"].to_numpy()
    maps = _stored_maps(job, index, tiles)
    target = _targets(job, x, rows)
    order_seeds = [tile_seed(job.settings.seed, f"{job.slide_id}/order", int(t)) for t in index]
    mask = _masks(job, rows)
    settings = PerturbationSettings(
        steps=job.settings.steps, baseline=job.settings.baseline, blur_sigma=job.sigma_px,
        max_batch=job.options.max_batch,
    )  # fmt: skip
    curves = deletion_insertion(
        job.original, x, {k: v.to(x.device) for k, v in maps.items()}, target=target.to(x.device),
        seeds=order_seeds, settings=settings, mask=mask,
    )  # fmt: skip
    d_auc, i_auc = curves.deletion_auc, curves.insertion_auc
    d_rand, i_rand = curves.deletion_auc_random.numpy(), curves.insertion_auc_random.numpy()
    labels = tile_labels(rows)
    rows_out = []
    for (a, layer), m in maps.items():
        mass, fraction = _mass(m, mask, target, tuple(x.shape[2:]))
        for j, tile in enumerate(index):
            rows_out.append({
                "tile": int(tile), "attribution": a, "layer": layer, "target": int(target[j]),
                "label": int(labels[j]), "deletion_auc": float(d_auc[(a, layer)][j]),
                "insertion_auc": float(i_auc[(a, layer)][j]), "deletion_auc_random": float(d_rand[j]),
                "insertion_auc_random": float(i_rand[j]), "relevance_mass": float(mass[j]),
                "target_fraction": float(fraction[j]),
                "region": curves.region[j] if curves.region else "tile",
                "deletion_curve": curves.deletion[(a, layer)][j].tolist(),
                "insertion_curve": curves.insertion[(a, layer)][j].tolist(),
                "deletion_curve_random": curves.deletion_random[j].tolist(),
                "insertion_curve_random": curves.insertion_random[j].tolist(),
            })  # fmt: skip
    return rows_out, _randomisation_rows(job, x, maps, target, index)


def _randomisation_rows(job: _Job, x, maps, target, index) -> list[dict]:
    if not job.settings.randomisation:
        return []
    s = job.store.settings
    samples = int(s.get("smoothgrad_samples", 0))
    smoothgrad = SmoothGrad(samples, float(s.get("smoothgrad_stdev", 0.2))) if samples else None
    seeds = [tile_seed(int(s.get("seed", 0)), job.slide_id, int(t)) for t in index]
    maps_fn = attribution_maps(
        x, layers=job.layers, target=target.to(x.device), attributions=job.store.attributions,
        smoothgrad=smoothgrad, noise_seeds=seeds, max_batch=job.options.max_batch,
        precision=str(s.get("precision", "fp32")),  # the stored maps' arithmetic, for like with like
    )  # fmt: skip
    curves = randomisation_curves(
        job.method, maps_fn, layers=job.layers,
        settings=RandomisationSettings(seed=job.settings.seed, by=job.settings.by, batchnorm=job.settings.batchnorm),
        before=maps, example=x[:1],
    )  # fmt: skip
    out = []
    for (a, layer), rho in curves.spearman.items():
        for j, tile in enumerate(index):
            for step, label in enumerate(curves.steps):
                out.append({
                    "tile": int(tile), "attribution": a, "layer": layer, "step": step + 1,
                    "randomised": label.label, "spearman": float(rho[j, step]),
                })  # fmt: skip
    return out


# --- the job --------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise BadOption("--device cuda given but CUDA is not available here; use --device auto or cpu")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def _prepare(
    slide: Path, tiles: Path, store_path: Path, method: str, model: ModelSpec, layers: list[str] | None
) -> tuple[pd.DataFrame, SaliencyStore, list[str]]:
    if method == "surrogate" and model.surrogate is None:
        raise BadOption("method 'surrogate' needs its surrogate: pass --surrogate FILE")
    table = read_tile_table(tiles, slide)
    store = open_store(store_path)
    layers = list(layers) if layers else store.layers
    check_store(store, tiles, table, method, model, layers)
    if len(table) and not (pd.to_numeric(table.get("mpp"), errors="coerce") > 0).all():
        raise BadTable(f"tile table {tiles} lacks the tiles' µm/px (mpp); make it with `smoothsal tiles`")
    return table, store, layers


def _job(store, table, settings, options, model, layers, annotations, class_map, device) -> _Job:
    s = store.settings
    surrogate = model.surrogate if store.method == "surrogate" else None
    spec = replace(model, surrogate=surrogate, mean=tuple(s["mean"]), std=tuple(s["std"]))
    original, paths, _ = spec.load(device)
    original = original.requires_grad_(False).eval()
    size = int(table["tile_size"].iloc[0])
    example = torch.zeros(1, 3, size, size, device=device)
    method = (
        smooth(original, store.method, surrogate=paths, example=example)
        if store.method != "original"
        else original
    )
    ann = None
    if annotations is not None:
        ann = read_annotations(annotations, parse_class_map(class_map) if class_map else None)
    return _Job(
        store, settings, options, original, method, layers, str(table["slide_id"].iloc[0]),
        settings.blur_um / float(table["mpp"].iloc[0]), ann,
    )  # fmt: skip


def run_faithfulness(
    slide: Path,
    tiles: Path,
    store: Path,
    method: str,
    model: ModelSpec,
    settings: FaithfulnessSettings = FaithfulnessSettings(),
    options: FaithfulnessOptions | None = None,
    *,
    layers: list[str] | None = None,
    annotations: Path | None = None,
    class_map: str | None = None,
) -> FaithfulnessResult:
    """The per-tile faithfulness table and the randomisation table of one slide × method (module doc)."""
    began = time.perf_counter()
    options = options or FaithfulnessOptions(Path("faithfulness.parquet"), Path("randomisation.parquet"))
    table, opened, layers = _prepare(Path(slide), Path(tiles), Path(store), method, model, layers)
    device = _device(options.device)
    picked = sample_tiles(table, settings.sample, settings.seed)
    rows, random_rows = [], []
    if len(picked):
        job = _job(opened, table, settings, options, model, layers, annotations, class_map, device)
        data = TileDataset(table, transform=_normalise(opened))
        sampled = table.assign(tile=np.arange(len(table), dtype=np.int64)).iloc[picked]
        for start in range(0, len(sampled), options.batch_size):
            part = sampled.iloc[start : start + options.batch_size]
            x = torch.stack([data[int(i)][0] for i in part["tile"]]).to(device)
            r, rr = _chunk(job, x, part, Path(tiles))
            rows += r
            random_rows += rr
            kill_point("faithfulness.batch")  # tests: a real interruption after N batches
    slide_id = str(opened.meta["slide_id"])
    meta = {
        "version": __version__, "slide_id": slide_id, "dataset": options.dataset, "method": method,
        "arch": model.arch, "settings": settings.as_dict(), "store": str(store),
        "store_settings": opened.settings, "tiles_sha256": opened.meta["tiles_sha256"],
        "n_tiles": len(table), "sampled": len(picked),
        "fractions": fractions(settings.steps, int(table["tile_size"].iloc[0]) ** 2 if len(table) else 1),
    }  # fmt: skip
    common = {"dataset": options.dataset, "slide_id": slide_id, "method": method, "arch": model.arch}
    write_faithfulness(rows, random_rows, common, options.out, options.randomisation_out, meta)
    return FaithfulnessResult(len(table), len(picked), time.perf_counter() - began, device.type)


def _normalise(store: SaliencyStore) -> Normalize:
    """The normalisation the store's maps were computed with (recorded by `smoothsal saliency`)."""
    s = store.settings
    return Normalize(tuple(s["mean"]), tuple(s["std"]))


def fractions(steps: int, pixels: int) -> list[float]:
    """The changed share of a tile's pixels after each step (`perturbation.deletion_insertion`)."""
    return [(k * pixels) // steps / pixels for k in range(steps + 1)]
