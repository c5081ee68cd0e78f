"""Surrogate training: each bilinear path learns to mimic its own downsampling conv.

The original network runs unchanged (frozen, eval mode); a forward hook captures every
downsampling conv's (input, output); each path is trained on its conv's pair with an L1 loss, the
losses summed, one Adam over all paths. The loop is the same for one process and for DDP.

``run_training`` is the `smoothsal train-surrogate` stage: one process, or N under torchrun
(DistributedDataParallel; nccl on GPU, gloo on CPU), a DistributedSampler over all tiles, the global
batch split evenly over the processes (so every step sees the same tiles whatever N is), and a
resumable state file written every epoch and every K steps. ``save_surrogate``/``load_surrogate``
are the surrogate file format that later stages read.

``run_model_training`` is `smoothsal train-model`: a small seeded supervised run (tile classifier or
segmenter) that gives the demo its models, as a checkpoint ``load_model`` reads.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import resource
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from .files import atomic_path, partial_paths
from .models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    file_sha256,
    in_channels,
    load_model,
    load_torch_file,
    save_torch_file,
)
from .smoothing import ConvSpec, SurrogatePaths, capture_conv_io, downsampling_convs
from .tiles import TileDataset, default_workers, read_tile_table, read_tile_tables, tiles_sha256

__all__ = [
    "EpochBatches",
    "ModelResult",
    "ModelSettings",
    "Normalize",
    "RunOptions",
    "RunResult",
    "StepCallback",
    "SurrogateMeta",
    "TrainSettings",
    "check_arch",
    "file_sha256",
    "load_surrogate",
    "model_fingerprint",
    "read_surrogate",
    "read_tile_tables",
    "run_model_training",
    "run_training",
    "save_surrogate",
    "surrogate_losses",
    "tiles_sha256",
    "train_model",
    "train_surrogate",
]

# Called after every optimiser step with (epoch, step in epoch, per-path L1 losses).
StepCallback = Callable[[int, int, dict[str, float]], None]
# (epoch, steps to skip) -> the batches of that epoch after the skipped ones.
EpochBatches = Callable[[int, int], Iterable[object]]


def _as_input(batch: object) -> torch.Tensor:
    """Batches may be tensors or (tensor, …) tuples/lists as DataLoaders give them."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise ValueError(f"a batch must be a tensor or a (tensor, ...) tuple, got {type(batch).__name__}")


def surrogate_losses(
    model: nn.Module, paths: nn.Module, x: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor]:
    """L1 loss of each path against its conv on batch ``x`` (``paths`` may be DDP-wrapped)."""
    with capture_conv_io(model, names) as captured, torch.no_grad():
        model(x)
    predicted = paths({n: captured[n][0] for n in names})
    return {n: F.l1_loss(predicted[n], captured[n][1]) for n in names}


def train_surrogate(
    model: nn.Module,
    batches: Iterable[object],
    *,
    epochs: int,
    lr: float = 1e-3,
    paths: SurrogatePaths | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    trainable: nn.Module | None = None,
    start_epoch: int = 0,
    on_step: StepCallback | None = None,
    start_step: int = 0,
    amp: bool = False,
) -> SurrogatePaths:
    """Train surrogate paths for ``model`` on ``batches`` (re-iterated every epoch).

    ``paths``/``optimizer`` continue an earlier run; ``trainable`` is the module to call
    (e.g. ``DistributedDataParallel(paths)``); ``on_step`` sees the losses after every step.
    ``batches`` is an iterable, or an ``EpochBatches`` callable ``(epoch, skip) -> iterable``
    (lets a sampler set its epoch and skip batches without reading them). ``start_step``: in
    ``start_epoch`` the first ``start_step`` steps were done before (resume); they are skipped and
    step numbers keep counting from there. ``amp``: bfloat16 autocast on CUDA (no effect on CPU).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if not callable(batches) and iter(batches) is batches:
        raise ValueError(
            "batches is a one-shot iterator (e.g. a generator) and would run dry after one epoch; "
            "pass a list, a DataLoader, or an (epoch, skip) -> batches callable"
        )
    model.eval()
    device = next(model.parameters()).device
    if paths is None:
        first = _as_input(next(iter(_epoch_batches(batches, start_epoch, 0)))).to(device)
        paths = SurrogatePaths.for_model(model, first[:1])
    paths.check_fits(model)
    paths.to(device).train()
    trainable = paths if trainable is None else trainable
    optimizer = optimizer or torch.optim.Adam(paths.parameters(), lr=lr)
    names = paths.conv_names
    autocast = amp and device.type == "cuda"
    for epoch in range(start_epoch, epochs):
        skip = start_step if epoch == start_epoch else 0
        for step, batch in enumerate(_epoch_batches(batches, epoch, skip), start=skip):
            x = _as_input(batch).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                losses = surrogate_losses(model, trainable, x, names)
            optimizer.zero_grad(set_to_none=True)
            torch.stack([v.float() for v in losses.values()]).sum().backward()
            optimizer.step()
            if on_step is not None:
                on_step(epoch, step, {n: float(v.detach()) for n, v in losses.items()})
    return paths.eval()


def _epoch_batches(batches: Iterable[object] | EpochBatches, epoch: int, skip: int) -> Iterable[object]:
    """The batches of ``epoch`` after the first ``skip`` (a plain iterable draws and drops them)."""
    if callable(batches) and not hasattr(batches, "__iter__"):
        return batches(epoch, skip)
    return itertools.islice(batches, skip, None)


# --- settings -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the trained weights; its hash guards resume and later stages.

    Not included (they do not change the result): process count, workers, checkpoint interval.
    """

    arch: str
    num_classes: int
    model_sha256: str  # of the model checkpoint, or "random-init" (weights from the seed)
    tiles_sha256: str  # of the tile table's tile positions, in order (the sampler's index space)
    n_tiles: int
    tile_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    epochs: int = 2
    batch_size: int = 512  # global: split evenly across the processes
    lr: float = 1e-3
    seed: int = 0
    amp: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "n_tiles", "tile_size", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    @property
    def hash(self) -> str:
        text = json.dumps(self.as_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def normalize(self) -> Normalize:
        return Normalize(self.mean, self.std)

    def as_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> TrainSettings:
        d = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# --- surrogate files ------------------------------------------------------------------------------

SURROGATE_FORMAT = "smoothsal-surrogate/1"
STATE_FORMAT = "smoothsal-surrogate-training/1"


@dataclass(frozen=True)
class SurrogateMeta:
    """What a surrogate file records next to its weights."""

    settings: TrainSettings
    specs: dict[str, ConvSpec]
    model_fingerprint: str = ""  # see model_fingerprint(); "" = not recorded
    losses: tuple[dict[str, float], ...] = ()  # the per-epoch loss log
    version: str = ""

    @property
    def arch(self) -> str:
        return self.settings.arch

    @property
    def conv_names(self) -> list[str]:
        return list(self.specs)


def model_fingerprint(model: nn.Module) -> str:
    """Hash of a model's parameter/buffer names and shapes: tells resnet18 from resnet34 even where
    their downsampling convs are identical (weights are not included: see ``model_sha256``)."""
    items = sorted((k, tuple(v.shape)) for k, v in model.state_dict().items())
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


def _spec_dict(spec: ConvSpec) -> dict[str, object]:
    return {f.name: getattr(spec, f.name) for f in fields(spec)}


def _spec_from(d: dict[str, object]) -> ConvSpec:
    return ConvSpec(**{k: tuple(v) if isinstance(v, list | tuple) else v for k, v in d.items()})


atomic_torch_save = save_torch_file


def save_surrogate(path: str | Path, paths: SurrogatePaths, meta: SurrogateMeta) -> None:
    """Write trained paths with their metadata (arch, conv names, specs, settings and hash)."""
    from . import __version__

    atomic_torch_save(
        {
            "format": SURROGATE_FORMAT,
            "version": meta.version or __version__,
            "arch": meta.arch,
            "num_classes": meta.settings.num_classes,
            "conv_names": meta.conv_names,
            "specs": {n: _spec_dict(s) for n, s in meta.specs.items()},
            "settings": meta.settings.as_dict(),
            "settings_hash": meta.settings.hash,
            "model_fingerprint": meta.model_fingerprint,
            "losses": list(meta.losses),
            "state_dict": {k: v.detach().cpu() for k, v in paths.state_dict().items()},
        },
        Path(path),
    )


def _torch_load(path: Path, what: str, fix: str) -> dict:
    obj = load_torch_file(path, what, fix)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a {what}")
    return obj


def read_surrogate(path: str | Path) -> tuple[SurrogatePaths, SurrogateMeta]:
    """Paths (eval mode, CPU) and metadata of a surrogate file, unchecked against any model."""
    path = Path(path)
    obj = _torch_load(path, "surrogate file", "train it again with `smoothsal train-surrogate`")
    if obj.get("format") != SURROGATE_FORMAT:
        raise ValueError(
            f"{path} is not a smoothsal surrogate (format {obj.get('format')!r}, expected "
            f"{SURROGATE_FORMAT!r}); make it with `smoothsal train-surrogate`"
        )
    specs = {n: _spec_from(obj["specs"][n]) for n in obj["conv_names"]}
    meta = SurrogateMeta(
        TrainSettings.from_dict(obj["settings"]), specs, obj.get("model_fingerprint", ""),
        tuple(obj.get("losses", ())), obj.get("version", ""),
    )  # fmt: skip
    paths = SurrogatePaths(specs)
    paths.load_state_dict(obj["state_dict"])
    return paths.eval(), meta


def load_surrogate(
    path: str | Path,
    *,
    arch: str | None = None,
    model: nn.Module | None = None,
    checkpoint: str | Path | None = None,
) -> SurrogatePaths:
    """Trained paths, checked against the model they will replace convs of.

    ``arch``: must be the arch the surrogate was trained for. ``model``: its downsampling convs must
    be exactly the surrogate's (names and shapes). ``checkpoint``: the model weights file; must be the
    one the surrogate was trained on (sha256). Each mismatch is a ValueError naming both sides.
    """
    paths, meta = read_surrogate(path)
    if arch is not None:
        check_arch(meta, arch, path)
    if model is not None:
        if meta.model_fingerprint and meta.model_fingerprint != model_fingerprint(model):
            raise ValueError(
                f"surrogate {path} was trained for arch {meta.arch!r} with {meta.settings.num_classes} "
                f"classes, but this {type(model).__name__} (arch {arch or 'unknown'!r}) has other layers; "
                "train a surrogate for this model"
            )
        example = torch.zeros(1, in_channels(model), meta.settings.tile_size, meta.settings.tile_size)
        names = downsampling_convs(model, example.to(next(model.parameters()).device))
        if names != meta.conv_names:
            raise ValueError(
                f"surrogate {path} (arch {meta.arch!r}) replaces convs {meta.conv_names}, but this "
                f"{type(model).__name__} (arch {arch or 'unknown'!r}) downsamples with {names}; train "
                "a surrogate for this model"
            )
        try:
            paths.check_fits(model)
        except ValueError as err:
            raise ValueError(f"surrogate {path} (arch {meta.arch!r}): {err}") from None
    if checkpoint is not None:
        sha = file_sha256(checkpoint)
        if meta.settings.model_sha256 != sha:
            raise ValueError(
                f"surrogate {path} was trained on model weights {meta.settings.model_sha256[:12]}, but "
                f"{checkpoint} is {sha[:12]}; retrain the surrogate for these weights"
            )
    return paths


def load_with_surrogate(
    arch: str,
    *,
    num_classes: int,
    checkpoint: str | Path | None = None,
    surrogate: str | Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, SurrogatePaths | None, Normalize]:
    """The model, its checked surrogate (if given) and the input normalisation it was trained with.

    Without ``checkpoint`` the model is the seeded random init the surrogate was trained on.
    """
    meta = read_surrogate(surrogate)[1] if surrogate is not None else None
    if meta is not None:
        check_arch(meta, arch, surrogate)
        if checkpoint is None and meta.settings.model_sha256 != "random-init":
            raise ValueError(
                f"surrogate {surrogate} was trained on a model checkpoint; pass it with --checkpoint"
            )
    norm = Normalize(
        tuple(mean or (meta.settings.mean if meta else IMAGENET_MEAN)),
        tuple(std or (meta.settings.std if meta else IMAGENET_STD)),
    )
    if meta is not None and (norm.mean, norm.std) != (meta.settings.mean, meta.settings.std):
        raise ValueError(
            f"surrogate {surrogate} was trained on inputs normalised with mean {meta.settings.mean}, "
            f"std {meta.settings.std}; pass the same --mean/--std or leave them out"
        )
    torch.manual_seed(meta.settings.seed if meta else 0)  # a random-init model: the one the surrogate saw
    model = load_model(arch, num_classes=num_classes, checkpoint=checkpoint).to(device)
    paths = None
    if surrogate is not None:
        paths = load_surrogate(surrogate, arch=arch, model=model, checkpoint=checkpoint).to(device)
    return model, paths, norm


def check_arch(meta: SurrogateMeta, arch: str, path: str | Path) -> None:
    """Raise a ValueError naming both archs unless the surrogate was trained for ``arch``."""
    if arch != meta.arch:
        raise ValueError(
            f"surrogate {path} was trained for arch {meta.arch!r}, not {arch!r}; train one for "
            f"{arch!r} with `smoothsal train-surrogate --arch {arch} ...`"
        )


# --- the training run (one process, or one of N under torchrun) ---------------------------------


@dataclass(frozen=True)
class RunOptions:
    """How a training run is carried out; none of these change the trained weights."""

    out: Path
    state: Path | None = None  # resumable training state; default OUT's stem + ".state.pt"
    log: Path | None = None  # per-epoch loss CSV; default OUT's stem + ".losses.csv"
    checkpoint_every: int = 100  # steps between mid-epoch checkpoints; 0 = at epoch ends only
    resume: bool = True  # continue from the state file when there is one
    workers: int | None = None  # DataLoader workers per process; None = min(4, cores per process − 1)
    progress: bool = True  # tqdm bar on rank 0
    stop_after_steps: int | None = None  # debug: SIGKILL every process after this many steps

    @property
    def state_path(self) -> Path:
        return self.state or self.out.with_name(self.out.stem + ".state.pt")

    @property
    def log_path(self) -> Path:
        return self.log or self.out.with_name(self.out.stem + ".losses.csv")


@dataclass(frozen=True)
class _Dist:
    """This process's place in the job: torchrun's env vars, or a plain single process."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    active: bool  # a process group exists (launched by torchrun)

    @classmethod
    def start(cls) -> _Dist:
        active = "RANK" in os.environ and "MASTER_ADDR" in os.environ
        rank = int(os.environ.get("RANK", "0")) if active else 0
        world = int(os.environ.get("WORLD_SIZE", "1")) if active else 1
        local = int(os.environ.get("LOCAL_RANK", "0")) if active else 0
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if active and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        return cls(rank, world, local, device, active)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over processes (a copy; float64 on CPU when returned)."""
        t = t.detach().clone()
        if self.active:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


class _ResumableSampler(torch.utils.data.Sampler[int]):
    """This rank's DistributedSampler order for an epoch (seed + epoch), minus its first ``skip``."""

    def __init__(self, base: DistributedSampler) -> None:
        self.base, self.skip = base, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


def per_rank_batch_size(batch_size: int, world: int) -> int:
    """The global batch split evenly: every step sees the same tiles whatever the process count."""
    if batch_size % world:
        raise ValueError(
            f"--batch-size {batch_size} cannot be split evenly over {world} processes; "
            f"use a multiple of {world}"
        )
    return batch_size // world


class _Checkpointer:
    """The ``on_step`` of a run: loss bookkeeping, checkpoints, log, progress bar, debug kill."""

    def __init__(
        self,
        d: _Dist,
        settings: TrainSettings,
        options: RunOptions,
        paths: SurrogatePaths,
        optimizer: torch.optim.Optimizer,
        steps_per_epoch: int,
    ) -> None:
        self.d, self.settings, self.options = d, settings, options
        self.paths, self.optimizer, self.steps_per_epoch = paths, optimizer, steps_per_epoch
        self.names = paths.conv_names
        self.sums = torch.zeros(len(self.names) + 1, dtype=torch.float64)  # per-path sums, step count
        self.global_step, self.run_steps = 0, 0
        self.rows: list[dict[str, float]] = []
        self.bar: tqdm | None = None

    # state file ---------------------------------------------------------------------------------

    def restore(self, state: dict) -> tuple[int, int]:
        """Take over a saved state; returns (epoch, step) to continue from."""
        self.paths.load_state_dict(state["paths"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        self.global_step, self.rows = state["global_step"], list(state["rows"])
        if self.d.rank == 0:  # the saved sums are already summed over processes
            self.sums = torch.tensor(state["loss_sums"], dtype=torch.float64)
        return state["epoch"], state["step"]

    def save(self, epoch: int, step: int) -> None:
        """All processes: reduce the partial epoch losses; rank 0 writes the state; barrier."""
        sums = self.d.sum(self.sums)
        if self.d.rank == 0:
            atomic_torch_save(
                {
                    "format": STATE_FORMAT,
                    "settings": self.settings.as_dict(),
                    "settings_hash": self.settings.hash,
                    "epoch": epoch,
                    "step": step,
                    "global_step": self.global_step,
                    "loss_sums": sums.tolist(),
                    "rows": self.rows,
                    "paths": self.paths.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "rng": torch.get_rng_state(),
                    "world_size": self.d.world,
                },
                self.options.state_path,
            )
        self.d.barrier()

    # per step -----------------------------------------------------------------------------------

    def __call__(self, epoch: int, step: int, losses: dict[str, float]) -> None:
        self.sums += torch.tensor([*(losses[n] for n in self.names), 1.0], dtype=torch.float64)
        self.global_step += 1
        self.run_steps += 1
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix(epoch=epoch + 1, l1=f"{sum(losses.values()):.4g}", refresh=False)
        if step + 1 == self.steps_per_epoch:
            self._end_epoch(epoch)
        elif self.options.checkpoint_every and self.global_step % self.options.checkpoint_every == 0:
            self.save(epoch, step + 1)
        if self.options.stop_after_steps is not None and self.run_steps >= self.options.stop_after_steps:
            os.kill(os.getpid(), signal.SIGKILL)  # a real, uncatchable interruption (tests)

    def _end_epoch(self, epoch: int) -> None:
        total = self.d.sum(self.sums)
        means = (total[:-1] / total[-1]).tolist()
        row = {"epoch": epoch + 1, "steps": self.global_step, "l1_total": sum(means)}
        self.rows.append(row | {f"l1:{n}": m for n, m in zip(self.names, means, strict=True)})
        self.sums.zero_()
        self.save(epoch + 1, 0)
        if self.d.rank == 0:
            write_loss_log(self.rows, self.options.log_path)


def write_loss_log(rows: Sequence[dict[str, float]], path: Path) -> None:
    """The per-epoch loss CSV (epoch, steps, l1_total, l1:<conv> …), rewritten atomically."""
    with atomic_path(path) as tmp:
        pd.DataFrame(list(rows)).to_csv(tmp, index=False)


def _read_state(path: Path, settings: TrainSettings) -> dict:
    state = _torch_load(path, "training state", "delete it or pass --no-resume")
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a smoothsal training state; delete it or pass --no-resume")
    if state["settings_hash"] != settings.hash:
        old = TrainSettings.from_dict(state["settings"]).as_dict()
        changed = [k for k, v in settings.as_dict().items() if old.get(k) != v]
        raise ValueError(
            f"training state {path} was written with other settings (changed: {', '.join(changed) or '?'}); "
            "pass --no-resume to start over, or delete it"
        )
    return state


@dataclass(frozen=True)
class RunResult:
    """What a finished run reports (rank 0's view; peak memory of every process)."""

    losses: tuple[dict[str, float], ...]
    seconds: float
    resumed_from: int  # global step the run resumed at (0 = fresh)
    rank: int
    world: int
    peak_rss_mb: tuple[float, ...]  # per process
    peak_gpu_mb: tuple[float, ...]  # per process (empty on CPU)


def run_training(
    settings: TrainSettings,
    table: pd.DataFrame,
    options: RunOptions,
    *,
    checkpoint: str | Path | None = None,
) -> RunResult:
    """Train and write a surrogate: DDP under torchrun (nccl on GPU, gloo on CPU), else one process.

    Checkpoints go to ``options.state_path`` (every epoch and every ``checkpoint_every`` steps) and a
    run with ``options.resume`` continues from there with the same result as an uninterrupted run.
    """
    start = time.perf_counter()
    d = _Dist.start()
    try:
        per_rank = per_rank_batch_size(settings.batch_size, d.world)
        torch.manual_seed(settings.seed)  # a random-init model (no checkpoint) is the same everywhere
        model = load_model(settings.arch, num_classes=settings.num_classes, checkpoint=checkpoint)
        model = model.to(d.device).requires_grad_(False).eval()
        torch.manual_seed(settings.seed)
        example = torch.zeros(1, in_channels(model), settings.tile_size, settings.tile_size, device=d.device)
        paths = SurrogatePaths.for_model(model, example).to(d.device)
        optimizer = torch.optim.Adam(paths.parameters(), lr=settings.lr)

        dataset = TileDataset(table, transform=settings.normalize)
        base = DistributedSampler(
            dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=settings.seed
        )
        sampler = _ResumableSampler(base)
        workers = default_workers(d.world) if options.workers is None else options.workers
        loader = DataLoader(
            dataset, batch_size=per_rank, sampler=sampler, num_workers=workers,
            pin_memory=d.device.type == "cuda",
        )  # fmt: skip
        steps_per_epoch = math.ceil(len(base) / per_rank)

        def batches(epoch: int, skip: int) -> DataLoader:
            sampler.set_epoch(epoch, skip * per_rank)
            return loader

        ckpt = _Checkpointer(d, settings, options, paths, optimizer, steps_per_epoch)
        epoch, step = 0, 0
        state_path = options.state_path
        if d.rank == 0:
            _remove_torn_files(state_path, options.out, options.log_path)
        if options.resume and state_path.is_file():
            epoch, step = ckpt.restore(_read_state(state_path, settings))
        resumed_from = ckpt.global_step
        trainable: nn.Module = paths
        if d.active:
            trainable = DistributedDataParallel(
                paths, device_ids=[d.local_rank] if d.device.type == "cuda" else None
            )
        total = settings.epochs * steps_per_epoch
        with tqdm(
            total=total, initial=ckpt.global_step, desc=f"surrogate {settings.arch}", unit="step",
            disable=d.rank != 0 or not options.progress, dynamic_ncols=True,
        ) as bar:  # fmt: skip
            ckpt.bar = bar
            train_surrogate(
                model, batches, epochs=settings.epochs, paths=paths, optimizer=optimizer,
                trainable=trainable, start_epoch=epoch, start_step=step, on_step=ckpt, amp=settings.amp,
            )  # fmt: skip
        meta = SurrogateMeta(settings, paths.specs, model_fingerprint(model), tuple(ckpt.rows))
        if d.rank == 0:
            save_surrogate(options.out, paths, meta)
            write_loss_log(ckpt.rows, options.log_path)
            state_path.unlink(missing_ok=True)  # done: a rerun starts fresh
        rss, gpu = _peak_memory(d)
        d.barrier()
        return RunResult(
            tuple(ckpt.rows), time.perf_counter() - start, resumed_from, d.rank, d.world, rss, gpu
        )
    finally:
        d.close()


def _remove_torn_files(*paths: Path) -> None:
    """Temporary files a killed run left half-written beside ``paths`` (never read; just clutter)."""
    for path in paths:
        for tmp in partial_paths(path):
            tmp.unlink(missing_ok=True)


def _peak_memory(d: _Dist) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Peak resident memory (and peak CUDA allocation) of every process, MB."""
    mine = torch.zeros(2, d.world, dtype=torch.float64)
    mine[0, d.rank] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if d.device.type == "cuda":
        mine[1, d.rank] = torch.cuda.max_memory_allocated(d.device) / 2**20
    both = d.sum(mine)
    return tuple(both[0].tolist()), tuple(both[1].tolist()) if d.device.type == "cuda" else ()


# --- the demo models: `smoothsal train-model` ------------------------------------------------------

MODEL_FORMAT = "smoothsal-model/1"


@dataclass(frozen=True)
class ModelSettings:
    """A small supervised run: tile classifier (labels from the tile table) or segmenter (masks from
    the annotations). Seeded: the same settings and tiles give the same weights on one machine."""

    arch: str
    num_classes: int
    epochs: int = 4
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise ValueError(
                f"train-model needs --num-classes >= 2 (softmax + cross-entropy), got {self.num_classes}"
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def model_task(model: nn.Module, tile_size: int) -> str:
    """The model's task: segmentation when it answers with a map ([B, K, H, W] at input size), else
    classification."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, in_channels(model), tile_size, tile_size))
    model.train(was_training)
    return "segmentation" if out.ndim == 4 and out.shape[-2:] == (tile_size, tile_size) else "classification"


def training_tiles(
    table: pd.DataFrame, task: str, annotations: dict[str, object] | None = None, num_classes: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """All tiles in memory as uint8 [N, 3, S, S] with their targets: the table's `label` (tiles with
    label < 0 or none are left out) or the annotation mask [N, S, S] of each tile's slide."""
    from .annotations import tile_label_mask

    if task == "classification":
        if "label" not in table:
            raise ValueError("the tile tables have no `label` column; tile the slides with --annotations")
        labels = table["label"].fillna(-1).to_numpy(dtype=int)
        table = table[labels >= 0].reset_index(drop=True)
        labels = labels[labels >= 0]
        if len(table) == 0:
            raise ValueError(
                "no labelled tiles (label >= 0) in the tile tables; tile the slides with --annotations"
            )
        if labels.max() >= num_classes:
            raise ValueError(f"tile label {labels.max()} does not fit --num-classes {num_classes}")
        targets = torch.from_numpy(labels.astype(np.int64))
    else:
        missing = sorted(set(table["slide_id"]) - set(annotations or {}))
        if missing:
            raise ValueError(
                f"segmentation needs the annotations of every slide; none given for {missing[:5]}"
            )
        masks = [
            tile_label_mask(annotations[sid], int(x), int(y), int(w), int(s))
            for sid, x, y, w, s in table[["slide_id", "x", "y", "w", "tile_size"]].itertuples(index=False)
        ]
        targets = torch.from_numpy(np.stack(masks).astype(np.int64))
        if int(targets.max()) >= num_classes:
            raise ValueError(
                f"annotation class {int(targets.max())} does not fit --num-classes {num_classes}; "
                "check --class-map"
            )
    dataset = TileDataset(table)
    images = torch.stack([(dataset[i][0] * 255).round().to(torch.uint8) for i in range(len(dataset))])
    return images, targets


def _augment(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips and 90° turns per tile (the same for its mask): tissue has no orientation."""
    dense = y.ndim == 3
    yy = y.unsqueeze(1) if dense else y
    for dim, turn in ((-1, False), (-2, False), (None, True)):
        flip = torch.rand(x.shape[0], generator=g) < 0.5
        if not flip.any():
            continue
        x = x.clone()
        x[flip] = x[flip].transpose(-1, -2) if turn else x[flip].flip(dim)
        if dense:
            yy = yy.clone()
            yy[flip] = yy[flip].transpose(-1, -2) if turn else yy[flip].flip(dim)
    return x, yy.squeeze(1) if dense else yy


def recompute_batchnorm(model: nn.Module, images: torch.Tensor, norm: Normalize, batch_size: int) -> None:
    """Set every BatchNorm's running statistics to the exact mean/variance over the training tiles
    under the final weights: a short run leaves them lagging behind the weights (exponential average)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches
    model.train()
    with torch.no_grad():
        for k in range(0, len(images), batch_size):
            model(norm(images[k : k + batch_size].float() / 255.0))
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    model.eval()


@dataclass(frozen=True)
class ModelResult:
    """A trained model's weights and its per-epoch log (loss, training accuracy)."""

    state_dict: dict[str, torch.Tensor]
    task: str
    history: tuple[dict[str, float], ...]
    seconds: float


def train_model(
    settings: ModelSettings,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    task: str,
    progress: bool = False,
) -> ModelResult:
    """Train `settings.arch` from a seeded random init with Adam and cross-entropy on in-memory tiles
    (uint8 [N, 3, S, S]); classes are weighted by inverse frequency, so rare tumour tiles count."""
    from .models import ARCHITECTURES

    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    g = torch.Generator().manual_seed(settings.seed)
    model = ARCHITECTURES[settings.arch](num_classes=settings.num_classes).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    counts = torch.bincount(targets.flatten(), minlength=settings.num_classes).double()
    weights = (counts.sum() / (settings.num_classes * counts.clamp(min=1))).float()
    norm = Normalize(settings.mean, settings.std)
    n = len(images)
    steps = math.ceil(n / settings.batch_size)
    history = []
    bar = tqdm(
        total=settings.epochs * steps, desc=f"train {settings.arch}", unit="step", disable=not progress
    )
    for epoch in range(settings.epochs):
        order = torch.randperm(n, generator=g)
        loss_sum, correct = 0.0, 0.0
        for k in range(steps):
            idx = order[k * settings.batch_size : (k + 1) * settings.batch_size]
            x, y = _augment(images[idx], targets[idx], g)
            logits = model(norm(x.float() / 255.0))
            logits = logits.flatten(1) if task == "classification" else logits
            loss = F.cross_entropy(logits, y, weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(idx)
            hit = (logits.argmax(1) == y).float()
            correct += float((hit.flatten(1).mean(1) if hit.ndim > 1 else hit).sum())  # per tile
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.3f}", refresh=False)
        history.append({"epoch": epoch + 1, "loss": loss_sum / n, "train_accuracy": correct / n})
    bar.close()
    recompute_batchnorm(model, images, norm, settings.batch_size)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return ModelResult(state, task, tuple(history), time.perf_counter() - start)


def save_model(path: str | Path, settings: ModelSettings, result: ModelResult) -> None:
    """The checkpoint `load_model(arch, num_classes=K, checkpoint=path)` reads (weights under
    `state_dict`), with the settings, normalisation and training log beside them."""
    from . import __version__

    atomic_torch_save(
        {
            "format": MODEL_FORMAT,
            "version": __version__,
            "arch": settings.arch,
            "num_classes": settings.num_classes,
            "task": result.task,
            "settings": {f.name: getattr(settings, f.name) for f in fields(settings)},
            "history": list(result.history),
            "state_dict": result.state_dict,
        },
        Path(path),
    )


def run_model_training(
    settings: ModelSettings,
    tables: Sequence[str | Path],
    out: str | Path,
    *,
    annotations: Sequence[str | Path] | None = None,
    class_map: dict[str, int] | None = None,
    progress: bool = False,
) -> ModelResult:
    """`smoothsal train-model`: read the tiles (and, for a segmenter, one annotation file per tile
    table, same order), train, write the checkpoint."""
    from .annotations import read_annotations
    from .models import ARCHITECTURES

    if settings.arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {settings.arch!r}; allowed: {', '.join(sorted(ARCHITECTURES))}")
    table = read_tile_tables(tables)
    torch.manual_seed(settings.seed)
    task = model_task(
        ARCHITECTURES[settings.arch](num_classes=settings.num_classes), int(table["tile_size"].iloc[0])
    )
    by_slide = None
    if task == "segmentation":
        if not annotations or len(annotations) != len(tables):
            raise ValueError(
                f"{settings.arch} is a segmenter: give --annotations, one file per tile table in the same "
                f"order ({len(tables)} tables, {len(annotations or [])} annotation files)"
            )
        by_slide = {}
        for t, a in zip(tables, annotations, strict=True):
            ann = read_annotations(a, class_map)
            for sid in read_tile_table(t)["slide_id"].unique():
                by_slide[sid] = ann
    images, targets = training_tiles(table, task, by_slide, settings.num_classes)
    result = train_model(settings, images, targets, task=task, progress=progress)
    save_model(out, settings, result)
    return result
