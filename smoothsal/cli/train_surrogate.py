"""`smoothsal train-surrogate`: train one bilinear surrogate path per downsampling conv of the frozen model
(L1 per path, summed; Adam). Run plainly for one process, or under `torchrun --nproc_per_node N --no-python
smoothsal train-surrogate ...` for N processes (nccl on GPU, gloo on CPU); the global --batch-size is split
evenly across them. Checkpoints every epoch and every --checkpoint-every steps; a killed run resumes with the
same result.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..surrogate import INITS, TrainSettings
from ..surrogate_fit import fit_line
from ..surrogate_run import RunOptions, train_from_tables
from .common import Command, default, model_args, tuple_or_none

COMMAND = Command(
    "train-surrogate",
    "train the bilinear surrogate paths of a model on tiles (multi-GPU: torchrun)",
    "the training state of the last checkpoint is kept (--state; by default beside --out as NAME.state.pt); "
    "rerun the same command to resume from it",
)


def arguments(p: argparse.ArgumentParser) -> None:
    t, o = TrainSettings, RunOptions
    model_args(p)
    # fmt: off
    p.add_argument("--out", type=Path, required=True, help="surrogate file to write (.pt)")
    p.add_argument("--state", type=Path, help="resumable training state (default: OUT stem + .state.pt)")
    p.add_argument("--log", type=Path, help="per-epoch L1 loss CSV (default: OUT stem + .losses.csv)")
    p.add_argument("--epochs", type=int, default=default(t, "epochs"), help=f"epochs at most; with --patience 0 exactly (default {default(t, 'epochs')})")
    p.add_argument("--batch-size", type=int, default=default(t, "batch_size"), help=f"global batch size over all processes (default {default(t, 'batch_size')})")
    p.add_argument("--lr", type=float, default=default(t, "lr"), help=f"Adam learning rate (default {default(t, 'lr')})")
    p.add_argument("--seed", type=int, default=default(t, "seed"), help="seed of the path init and the tile order")
    p.add_argument("--patience", type=int, default=default(t, "patience"), help=f"stop after this many epochs without a validation improvement; 0: run exactly --epochs, keep the last state (the paper's setting) (default {default(t, 'patience')})")
    p.add_argument("--min-delta", type=float, default=default(t, "min_delta"), help=f"an improvement: validation L1 below the last improvement's × (1 - MIN_DELTA) (default {default(t, 'min_delta')})")
    p.add_argument("--val-fraction", type=float, default=default(t, "val_fraction"), help=f"fraction of the tiles held out for validation, seeded, stratified by slide and label; 0 (with --patience 0): train on every tile (default {default(t, 'val_fraction')})")
    p.add_argument("--val-min-tiles", type=int, default=default(t, "val_min_tiles"), help=f"validation tiles at least, never more than half the tiles (default {default(t, 'val_min_tiles')})")
    p.add_argument("--init", choices=INITS, default=default(t, "init"), help=f"where the paths start: conv = at the conv each replaces (about the forward hook), random = PyTorch's init, the paper's (default {default(t, 'init')})")
    p.add_argument("--amp", action="store_true", default=default(t, "amp"), help="bfloat16 autocast (CUDA only; ignored on CPU)")
    p.add_argument("--checkpoint-every", type=int, default=default(o, "checkpoint_every"), help="steps between checkpoints (0: epoch ends only)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=default(o, "resume"), help="continue from --state if present")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=default(o, "progress"), help="progress bar on rank 0")
    # fmt: on


def run(args: argparse.Namespace) -> None:
    options = RunOptions(
        out=args.out, state=args.state, log=args.log, checkpoint_every=args.checkpoint_every,
        resume=args.resume, workers=args.workers, progress=args.progress, allow_pickle=args.allow_pickle,
    )  # fmt: skip
    result = train_from_tables(
        args.tiles, options, checkpoint=args.checkpoint, mean=tuple_or_none(args.mean),
        std=tuple_or_none(args.std), arch=args.arch, num_classes=args.num_classes, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, amp=args.amp, patience=args.patience,
        min_delta=args.min_delta, val_fraction=args.val_fraction, val_min_tiles=args.val_min_tiles, init=args.init,
        model_kwargs=args.model_kwargs,
    )  # fmt: skip
    if result.rank == 0:
        print(f"{args.out}: {result.tiles} tiles, {result.world} process(es), {fit_line(result.fit)}, "
              f"{result.seconds:.1f} s, peak RSS MB {[round(m) for m in result.peak_rss_mb]}"
              + (f", peak GPU MB {[round(m) for m in result.peak_gpu_mb]}" if result.peak_gpu_mb else "")
              + (f" (resumed at step {result.resumed_from})" if result.resumed_from else ""))  # fmt: skip
