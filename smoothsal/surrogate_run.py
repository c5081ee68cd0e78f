"""The `smoothsal train-surrogate` stage: one process, or N under torchrun.

DistributedDataParallel (nccl on GPU, gloo on CPU), a DistributedSampler over the training tiles (the held-out
validation tiles never among them), the global batch split evenly over the processes (so every step sees the
same tiles whatever N is), and a resumable state file written every epoch and every K steps: a killed run
resumes with the same result as an uninterrupted one, the convergence rule's state (best L1, best paths,
epochs since improvement) included. After every epoch each process measures its share of the validation
tiles; the sums are added up and rank 0's copy is broadcast, so every process takes the same stop decision.
The surrogate itself (loop, file format) is `surrogate`; the validation measures and the rule `surrogate_fit`.
"""

from __future__ import annotations

import itertools
import math
import os
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from .errors import BadCheckpoint, BadOption
from .files import atomic_path, check_file_out, partial_paths
from .killpoints import kill_point
from .model_spec import load_model
from .models import check_input_size, in_channels
from .smoothing import SurrogatePaths, smooth
from .surrogate import (
    EpochBatches,
    Resume,
    SurrogateMeta,
    TrainSettings,
    model_fingerprint,
    save_surrogate,
    train_surrogate,
)
from .surrogate_fit import (
    Convergence,
    SurrogateFit,
    TileSplit,
    l1_from_sums,
    prediction_sums,
    split_tiles,
    summarise_predictions,
    validation_sums,
)
from .tiles import TileDataset, TileLoader, default_workers, majority_classes, read_tile_tables, tile_labels
from .torch_files import load_torch_dict, save_torch_file

__all__ = [
    "STATE_FORMAT",
    "RunOptions",
    "RunResult",
    "TrainingData",
    "per_rank_batch_size",
    "run_training",
    "train_from_tables",
    "training_data",
    "write_loss_log",
]

STATE_FORMAT = "smoothsal-surrogate-training/1"


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
    allow_pickle: bool = False  # the checkpoint may be a whole pickled model (loading it runs its code)

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

    def agreed_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over processes, then rank 0's copy on every process: decisions taken from it agree."""
        t = self.sum(t)
        if self.active:
            t = t.to(self.device)
            dist.broadcast(t, src=0)
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
        raise BadOption(f"--batch-size {batch_size} cannot be split evenly over {world} processes; use a multiple of {world}")  # fmt: skip
    return batch_size // world


@dataclass(frozen=True)
class TrainingData:
    """The tiles of a run as one process reads them. Batches are ``(images, rows)``, rows = positions
    in the tile table: training batches come only from ``split.train``; ``validation`` is this
    process's share of ``split.validation`` (None without validation tiles)."""

    split: TileSplit
    batches: EpochBatches  # (epoch, steps to skip) -> this process's training batches of that epoch
    steps_per_epoch: int
    validation: DataLoader | None
    labels: torch.Tensor  # per table row: the label (−1 = none)
    majority: torch.Tensor  # per table row: the majority class, the segmentation target (−1 = none)


def training_data(
    settings: TrainSettings, table: pd.DataFrame, *, rank: int = 0, world: int = 1, workers: int = 0,
    pin_memory: bool = False,
) -> TrainingData:  # fmt: skip
    """The split of ``table`` (seeded; see ``surrogate_fit.split_tiles``) and this process's loaders."""
    per_rank = per_rank_batch_size(settings.batch_size, world)
    split = split_tiles(table, settings.val_fraction, settings.val_min_tiles, settings.seed)
    dataset = TileDataset(table, transform=settings.normalize)
    train = Subset(dataset, split.train.tolist())
    base = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=settings.seed)
    sampler = _ResumableSampler(base)
    loader = TileLoader(train, batch_size=per_rank, sampler=sampler, num_workers=workers, pin_memory=pin_memory)  # fmt: skip

    def batches(epoch: int, skip: int) -> DataLoader:
        sampler.set_epoch(epoch, skip * per_rank)
        return loader

    validation = None
    if len(split.validation):
        mine = Subset(dataset, split.validation[rank::world].tolist())  # every process its share
        validation = TileLoader(mine, batch_size=per_rank, num_workers=workers, pin_memory=pin_memory)  # fmt: skip
    return TrainingData(
        split,
        batches,
        math.ceil(len(base) / per_rank),
        validation,
        tile_labels(table),
        majority_classes(table),
    )


class _Checkpointer:
    """The ``on_step`` and ``on_epoch`` of a run: loss bookkeeping, validation and the convergence
    rule, checkpoints, log, progress bar."""

    def __init__(
        self,
        d: _Dist,
        settings: TrainSettings,
        options: RunOptions,
        model: nn.Module,
        paths: SurrogatePaths,
        optimizer: torch.optim.Optimizer,
        data: TrainingData,
    ) -> None:
        self.d, self.settings, self.options, self.model = d, settings, options, model
        self.paths, self.optimizer, self.data = paths, optimizer, data
        self.steps_per_epoch = data.steps_per_epoch
        self.names = paths.conv_names
        self.sums = torch.zeros(len(self.names) + 1, dtype=torch.float64)  # per-path sums, step count
        self.global_step, self.run_steps = 0, 0
        self.rows: list[dict[str, float]] = []
        self.bar: tqdm | None = None
        self.convergence = Convergence()
        self.best_paths: dict[str, torch.Tensor] | None = None  # the paths of the best epoch (CPU)
        self.stopped = False  # the convergence rule said stop

    # state file ---------------------------------------------------------------------------------

    def restore(self, state: dict) -> tuple[int, int]:
        """Take over a saved state; returns (epoch, step) to continue from."""
        self.paths.load_state_dict(state["paths"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        self.global_step, self.rows = state["global_step"], list(state["rows"])
        self.convergence = Convergence(**state["convergence"])
        self.best_paths, self.stopped = state["best_paths"], state["stopped"]
        if self.d.rank == 0:  # the saved sums are already summed over processes
            self.sums = torch.tensor(state["loss_sums"], dtype=torch.float64)
        return state["epoch"], state["step"]

    def save(self, epoch: int, step: int) -> None:
        """All processes: reduce the partial epoch losses; rank 0 writes the state; barrier."""
        sums = self.d.sum(self.sums)
        if self.d.rank == 0:
            save_torch_file(
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
                    "convergence": self.convergence.as_dict(),
                    "best_paths": self.best_paths,
                    "stopped": self.stopped,
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
        every = self.options.checkpoint_every
        if step + 1 < self.steps_per_epoch and every and self.global_step % every == 0:
            self.save(epoch, step + 1)  # (an epoch's end is saved by end_epoch, after validation)
        kill_point("surrogate.step")  # tests: a real, uncatchable interruption after N steps

    # per epoch ----------------------------------------------------------------------------------

    def end_epoch(self, epoch: int) -> bool:
        """Log the epoch (train and validation L1), apply the convergence rule, checkpoint; True = stop."""
        total = self.d.sum(self.sums)
        means = (total[:-1] / total[-1]).tolist()
        row = {"epoch": epoch + 1, "steps": self.global_step, "l1_total": sum(means)}
        row |= {f"l1:{n}": m for n, m in zip(self.names, means, strict=True)}
        if self.data.validation is not None:
            sums = validation_sums(self.model, self.paths, self.data.validation, amp=self.settings.amp)
            l1, rel = l1_from_sums(self.d.agreed_sum(sums), self.names)
            row |= {"val_l1_total": sum(l1.values())} | {f"val_l1:{n}": v for n, v in l1.items()}
            row |= {f"val_rel_l1:{n}": v for n, v in rel.items()}
            self.convergence = self.convergence.update(
                row["val_l1_total"], epoch + 1, self.settings.min_delta
            )
            if self.convergence.best_epoch == epoch + 1:
                self.best_paths = {k: v.detach().cpu().clone() for k, v in self.paths.state_dict().items()}
            self.stopped = self.convergence.converged(self.settings.patience)
        self.rows.append(row)
        self.sums.zero_()
        self.save(epoch + 1, 0)
        if self.d.rank == 0:
            write_loss_log(self.rows, self.options.log_path)
        kill_point("surrogate.epoch")  # tests: killed after an epoch's checkpoint
        return self.stopped

    def keep(self) -> tuple[int, str]:
        """Put the kept state in the paths: the best epoch's under the rule, else the last; returns
        (its epoch, why training stopped)."""
        if self.settings.patience == 0:
            return len(self.rows), "fixed_epochs"
        self.paths.load_state_dict(self.best_paths)  # the rule always has validation: a best exists
        return self.convergence.best_epoch, "converged" if self.stopped else "max_epochs"


def write_loss_log(rows: Sequence[dict[str, float]], path: Path) -> None:
    """The per-epoch loss CSV, rewritten atomically: epoch, steps, l1_total and l1:<conv> (training
    L1, the mean over the epoch's steps), and with validation tiles val_l1_total, val_l1:<conv> and
    val_rel_l1:<conv> (validation L1 and L1 / mean |conv output|, after the epoch)."""
    with atomic_path(path) as tmp:
        pd.DataFrame(list(rows)).to_csv(tmp, index=False)


def _read_state(path: Path, settings: TrainSettings) -> dict:
    state = load_torch_dict(path, "training state", "delete it or pass --no-resume")
    if state.get("format") != STATE_FORMAT:
        raise BadCheckpoint(f"{path} is not a smoothsal training state; delete it or pass --no-resume")
    written = TrainSettings.from_dict(state["settings"])  # a state of an older version: what it trained with
    if written.hash != settings.hash:
        old = written.as_dict()
        changed = [k for k, v in settings.as_dict().items() if old.get(k) != v]
        raise BadCheckpoint(
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
    tiles: int = 0  # tiles trained on (the validation tiles left out)
    fit: SurrogateFit | None = None  # how training ended and how well the kept paths fit


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
    Training stops by the convergence rule (``settings.patience``) or after ``settings.epochs``; the
    file gets the kept paths and the fit record measured on the validation tiles.
    """
    start = time.perf_counter()
    d = _Dist.start()
    try:
        torch.manual_seed(settings.seed)  # a random-init model (no checkpoint) is the same everywhere
        model = load_model(settings.arch, num_classes=settings.num_classes, checkpoint=checkpoint,
                           kwargs=settings.model_kwargs, allow_pickle=options.allow_pickle)  # fmt: skip
        model = model.to(d.device).requires_grad_(False).eval()
        check_input_size(model, settings.tile_size, settings.arch)
        torch.manual_seed(settings.seed)
        example = torch.zeros(1, in_channels(model), settings.tile_size, settings.tile_size, device=d.device)
        paths = SurrogatePaths.for_model(model, example).to(d.device)
        if settings.init == "conv":
            paths.start_from(model)
        optimizer = torch.optim.Adam(paths.parameters(), lr=settings.lr)
        workers = default_workers(d.world) if options.workers is None else options.workers
        data = training_data(
            settings, table, rank=d.rank, world=d.world, workers=workers, pin_memory=d.device.type == "cuda"
        )
        ckpt = _Checkpointer(d, settings, options, model, paths, optimizer, data)
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
        total = settings.epochs * data.steps_per_epoch
        with tqdm(
            total=total, initial=ckpt.global_step, desc=f"surrogate {settings.arch}", unit="step",
            disable=d.rank != 0 or not options.progress, dynamic_ncols=True,
        ) as bar:  # fmt: skip
            ckpt.bar = bar
            if not ckpt.stopped:  # (a run killed after the rule said stop only has to finish)
                train_surrogate(
                    model, data.batches, epochs=settings.epochs, resume=Resume(epoch, step, paths, optimizer),
                    trainable=trainable, on_step=ckpt, on_epoch=ckpt.end_epoch, amp=settings.amp,
                )  # fmt: skip
        fit = _fit(ckpt, example)
        meta = SurrogateMeta(settings, paths.specs, model_fingerprint(model), tuple(ckpt.rows), fit=fit)
        if d.rank == 0:
            save_surrogate(options.out, paths.eval(), meta)
            write_loss_log(ckpt.rows, options.log_path)
            state_path.unlink(missing_ok=True)  # done: a rerun starts fresh
        rss, gpu = _peak_memory(d)
        d.barrier()
        return RunResult(
            tuple(ckpt.rows), time.perf_counter() - start, resumed_from, d.rank, d.world, rss, gpu,
            len(data.split.train), fit,
        )  # fmt: skip
    finally:
        d.close()


def _fit(ckpt: _Checkpointer, example: torch.Tensor) -> SurrogateFit:
    """Keep the best (or last) state in the paths and measure it against the model on the validation
    tiles (every process its share, the sums added up)."""
    kept, reason = ckpt.keep()
    data, rows = ckpt.data, ckpt.rows
    record = SurrogateFit(
        reason, len(rows), ckpt.global_step, kept, len(data.split.train), len(data.split.validation),
        validation_rows=tuple(data.split.validation.tolist()),
    )  # fmt: skip
    if data.validation is None:
        return record
    row = rows[kept - 1]
    smoothed = smooth(ckpt.model, "surrogate", surrogate=ckpt.paths.eval())
    sums = prediction_sums(ckpt.model, smoothed, data.validation, data.labels, data.majority)
    with torch.no_grad():
        out = ckpt.model(example)
    task = "segmentation" if out.ndim == 4 and out.shape[2:] != (1, 1) else "classification"
    return replace(
        record, best_epoch=ckpt.convergence.best_epoch, task=task, val_l1_total=row["val_l1_total"],
        val_l1={n: row[f"val_l1:{n}"] for n in ckpt.names},
        val_rel_l1={n: row[f"val_rel_l1:{n}"] for n in ckpt.names},
        **summarise_predictions(ckpt.d.agreed_sum(sums)),
    )  # fmt: skip


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


def train_from_tables(
    tables: Sequence[str | Path],
    options: RunOptions,
    *,
    checkpoint: str | Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **choices: object,
) -> RunResult:
    """The `train-surrogate` stage: read the tile tables, derive the settings (``choices`` are the
    other fields of ``TrainSettings``: arch, num_classes, epochs, …), train, write the surrogate."""
    check_file_out(options.out, options.state_path, options.log_path)
    table = read_tile_tables(tables)
    settings = TrainSettings.for_tiles(table, checkpoint=checkpoint, mean=mean, std=std, **choices)
    return run_training(settings, table, options, checkpoint=checkpoint)
