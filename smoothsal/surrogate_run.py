"""The `smoothsal train-surrogate` stage: one process, or N under torchrun.

DistributedDataParallel (nccl on GPU, gloo on CPU), a DistributedSampler over all tiles, the global
batch split evenly over the processes (so every step sees the same tiles whatever N is), and a
resumable state file written every epoch and every K steps: a killed run resumes with the same result
as an uninterrupted one. The surrogate itself (loop, file format) is `surrogate`.
"""

from __future__ import annotations

import itertools
import math
import os
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from .errors import BadCheckpoint, BadOption
from .files import atomic_path, check_file_out, partial_paths
from .killpoints import kill_point
from .models import check_input_size, in_channels, load_model, load_torch_dict, save_torch_file
from .smoothing import SurrogatePaths
from .surrogate import (
    Resume,
    SurrogateMeta,
    TrainSettings,
    model_fingerprint,
    save_surrogate,
    train_surrogate,
)
from .tiles import TileDataset, TileLoader, default_workers, read_tile_tables

__all__ = [
    "STATE_FORMAT",
    "RunOptions",
    "RunResult",
    "per_rank_batch_size",
    "run_training",
    "train_from_tables",
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
        raise BadOption(
            f"--batch-size {batch_size} cannot be split evenly over {world} processes; "
            f"use a multiple of {world}"
        )
    return batch_size // world


class _Checkpointer:
    """The ``on_step`` of a run: loss bookkeeping, checkpoints, log, progress bar."""

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
        kill_point("surrogate.step")  # tests: a real, uncatchable interruption after N steps

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
    state = load_torch_dict(path, "training state", "delete it or pass --no-resume")
    if state.get("format") != STATE_FORMAT:
        raise BadCheckpoint(f"{path} is not a smoothsal training state; delete it or pass --no-resume")
    if state["settings_hash"] != settings.hash:
        old = TrainSettings.from_dict(state["settings"]).as_dict()
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
    tiles: int = 0  # tiles trained on


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
        check_input_size(model, settings.tile_size, settings.arch)
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
        loader = TileLoader(
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
                model, batches, epochs=settings.epochs, resume=Resume(epoch, step, paths, optimizer),
                trainable=trainable, on_step=ckpt, amp=settings.amp,
            )  # fmt: skip
        meta = SurrogateMeta(settings, paths.specs, model_fingerprint(model), tuple(ckpt.rows))
        if d.rank == 0:
            save_surrogate(options.out, paths, meta)
            write_loss_log(ckpt.rows, options.log_path)
            state_path.unlink(missing_ok=True)  # done: a rerun starts fresh
        rss, gpu = _peak_memory(d)
        d.barrier()
        return RunResult(
            tuple(ckpt.rows), time.perf_counter() - start, resumed_from, d.rank, d.world, rss, gpu, len(table)
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
