"""`smoothsal saliency SLIDE --tiles T.parquet ... --out M.zarr --table M.parquet`: stream the slide's tiles in
batches, compute gradient / DeepLift maps at the given layers (SmoothGrad seeded per tile) under one smoothing
method, and write the channel-summed maps (Zarr v2 store, one array per attribution/layer) and a per-tile
table (TV of the full maps, logits, prediction difference vs the original model). Resumable: a killed job
continues from its last complete batch (state in a hidden .OUT.partial/ beside OUT).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..precision import CHOICES
from ..predictions import TARGETS, TASKS
from ..saliency import DEVICES, RunOptions, SaliencySettings, run_saliency
from ..smoothing import METHODS
from .common import Command, default, model_args, tuple_or_none

COMMAND = Command(
    "saliency",
    "every layer × attribution map of every tile of one slide under one method (Zarr + Parquet)",
    "the finished batches are kept (in the hidden .OUT.partial beside --out); rerun the same command to "
    "resume from them",
)


def arguments(p: argparse.ArgumentParser) -> None:
    s, o = SaliencySettings, RunOptions
    p.add_argument("slide", type=Path, help="whole-slide image the tile table was made from")
    model_args(p, tiles=None)  # --tiles: the tile table of SLIDE (from `smoothsal tiles`)
    # fmt: off
    p.add_argument("--surrogate", type=Path, help="trained surrogate (.pt from train-surrogate); needed by --method surrogate")
    p.add_argument("--method", required=True, help=f"smoothing method: {', '.join(METHODS)}")
    p.add_argument("--layers", nargs="+", required=True, help="layer names or aliases (layer1 … layer4, blocks, module names)")
    p.add_argument("--attributions", nargs="+", default=list(default(s, "attributions")), help="gradient and/or deeplift (default both)")
    p.add_argument("--smoothgrad-samples", type=int, default=default(s, "smoothgrad_samples"), help=f"SmoothGrad samples per tile (default {default(s, 'smoothgrad_samples')}; 0 = off)")
    p.add_argument("--smoothgrad-stdev", type=float, default=default(s, "smoothgrad_stdev"), help=f"SmoothGrad noise σ in normalised input units (default {default(s, 'smoothgrad_stdev')})")
    p.add_argument("--seed", type=int, default=default(s, "seed"), help=f"seed of the per-tile SmoothGrad noise (default {default(s, 'seed')})")
    p.add_argument("--target", choices=TARGETS, default=default(s, "target"), help="target class (default: label, predicted where unlabelled)")
    p.add_argument("--task", choices=TASKS, default=default(s, "task"), help="model kind (segmentation: target = tile majority_class)")
    p.add_argument("--precision", choices=CHOICES, default=default(s, "precision"), help=f"arithmetic of maps and predictions (default {default(s, 'precision')}: exact; bf16 ~4× faster where native (AMX/AVX512-BF16 CPUs, GPUs of compute capability 8+), several times slower where emulated (e.g. AVX2 CPUs), maps within ~1 %%; auto: bf16 where native, else fp32, recorded as resolved; tf32: CUDA only)")
    p.add_argument("--dataset", default=default(s, "dataset"), help="dataset name written into the table")
    p.add_argument("--batch-size", type=int, default=default(o, "batch_size"), help=f"tiles per batch (default {default(o, 'batch_size')}; does not change results)")
    p.add_argument("--device", choices=DEVICES, default=default(o, "device"), help="default auto: CUDA when present")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=default(o, "progress"), help="no progress bar")
    p.add_argument("--out", type=Path, required=True, help="saliency store to write ({method}.zarr directory)")
    p.add_argument("--table", type=Path, required=True, help="per-tile table to write ({method}.parquet)")
    # fmt: on


def run(args: argparse.Namespace) -> None:
    settings = SaliencySettings(
        arch=args.arch, num_classes=args.num_classes, method=args.method, layers=tuple(args.layers),
        attributions=tuple(args.attributions), smoothgrad_samples=args.smoothgrad_samples,
        smoothgrad_stdev=args.smoothgrad_stdev, seed=args.seed, target=args.target, task=args.task,
        dataset=args.dataset, mean=tuple_or_none(args.mean), std=tuple_or_none(args.std), precision=args.precision,
        model_kwargs=args.model_kwargs,
    )  # fmt: skip
    options = RunOptions(
        out=args.out, table=args.table, batch_size=args.batch_size, workers=args.workers, device=args.device,
        progress=args.progress, allow_pickle=args.allow_pickle,
    )  # fmt: skip
    result = run_saliency(
        args.slide, args.tiles, settings, options, checkpoint=args.checkpoint, surrogate=args.surrogate
    )
    resumed = f", resumed at tile {result.resumed_from}" if result.resumed_from else ""
    rate = result.computed / result.compute_seconds if result.compute_seconds else float("nan")
    print(
        f"{args.slide}: {result.n_tiles} tiles ({result.computed} computed{resumed}, {rate:.2f} tiles/s "
        f"on {result.device}) → {args.out}, {args.table}"
    )
