"""`smoothsal train-surrogate`: train one bilinear surrogate path per downsampling conv of the frozen model
(L1 per path, summed; Adam). Run plainly for one process, or under `torchrun --nproc_per_node N --no-python
smoothsal train-surrogate ...` for N processes (nccl on GPU, gloo on CPU); the global --batch-size is split
evenly across them. Checkpoints every epoch and every --checkpoint-every steps; a killed run resumes with the
same result.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..surrogate import TrainSettings
from ..surrogate_run import RunOptions, train_from_tables
from .common import Command, default, model_args, tuple_or_none

COMMAND = Command(
    "train-surrogate", "train the bilinear surrogate paths of a model on tiles (multi-GPU: torchrun)"
)


def arguments(p: argparse.ArgumentParser) -> None:
    t, o = TrainSettings, RunOptions
    model_args(p)
    # fmt: off
    p.add_argument("--out", type=Path, required=True, help="surrogate file to write (.pt)")
    p.add_argument("--state", type=Path, help="resumable training state (default: OUT stem + .state.pt)")
    p.add_argument("--log", type=Path, help="per-epoch L1 loss CSV (default: OUT stem + .losses.csv)")
    p.add_argument("--epochs", type=int, default=default(t, "epochs"), help=f"epochs (default {default(t, 'epochs')}, the paper's Camelyon16 setting)")
    p.add_argument("--batch-size", type=int, default=default(t, "batch_size"), help=f"global batch size over all processes (default {default(t, 'batch_size')})")
    p.add_argument("--lr", type=float, default=default(t, "lr"), help=f"Adam learning rate (default {default(t, 'lr')})")
    p.add_argument("--seed", type=int, default=default(t, "seed"), help="seed of the path init and the tile order")
    p.add_argument("--amp", action="store_true", default=default(t, "amp"), help="bfloat16 autocast (CUDA only; ignored on CPU)")
    p.add_argument("--checkpoint-every", type=int, default=default(o, "checkpoint_every"), help="steps between checkpoints (0: epoch ends only)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=default(o, "resume"), help="continue from --state if present")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=default(o, "progress"), help="progress bar on rank 0")
    # fmt: on


def run(args: argparse.Namespace) -> None:
    options = RunOptions(
        out=args.out, state=args.state, log=args.log, checkpoint_every=args.checkpoint_every,
        resume=args.resume, workers=args.workers, progress=args.progress,
    )  # fmt: skip
    result = train_from_tables(
        args.tiles, options, checkpoint=args.checkpoint, mean=tuple_or_none(args.mean),
        std=tuple_or_none(args.std), arch=args.arch, num_classes=args.num_classes, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, amp=args.amp,
    )  # fmt: skip
    if result.rank == 0:
        last = result.losses[-1]["l1_total"] if result.losses else float("nan")
        gpu = f", peak GPU MB {[round(m) for m in result.peak_gpu_mb]}" if result.peak_gpu_mb else ""
        print(
            f"{args.out}: {result.tiles} tiles, {result.world} process(es), final L1 {last:.4g}, "
            f"{result.seconds:.1f} s, peak RSS MB {[round(m) for m in result.peak_rss_mb]}{gpu}"
            + (f" (resumed at step {result.resumed_from})" if result.resumed_from else "")
        )
