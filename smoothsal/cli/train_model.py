"""`smoothsal train-model`: seeded supervised training from a random init, the demo's models. A classifier
learns the tile table's `label` (cross-entropy, classes weighted by inverse frequency); a segmenter
(unet_resnet34) learns per-pixel classes rasterised from --annotations. Random flips/turns. Writes a
checkpoint that load_model(arch, num_classes=K, checkpoint=OUT) reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..annotations import parse_class_map
from ..demo_models import ModelSettings, run_model_training
from ..models import IMAGENET_MEAN, IMAGENET_STD
from .common import ARCH_HELP, Command, default, rgb

COMMAND = Command("train-model", "train a small tile classifier or segmenter on CPU (the demo models)")


def arguments(p: argparse.ArgumentParser) -> None:
    m = ModelSettings
    # fmt: off
    p.add_argument("--arch", required=True, help=ARCH_HELP)
    p.add_argument("--model-kwargs", default="", metavar="JSON", help="the architecture's constructor options (JSON object)")
    p.add_argument("--num-classes", type=int, required=True, help="classes ≥ 2 (with background)")
    p.add_argument("--tiles", type=Path, nargs="+", required=True, metavar="TABLE", help="tile tables (.parquet)")
    p.add_argument("--annotations", type=Path, nargs="+", metavar="FILE", help="segmentation: one annotation file per tile table, same order")
    p.add_argument("--class-map", help="annotation class names → ids (e.g. Tumor=1,Stroma=2)")
    p.add_argument("--epochs", type=int, default=default(m, "epochs"), help=f"epochs (default {default(m, 'epochs')})")
    p.add_argument("--batch-size", type=int, default=default(m, "batch_size"), help=f"tiles per step (default {default(m, 'batch_size')})")
    p.add_argument("--lr", type=float, default=default(m, "lr"), help=f"Adam learning rate (default {default(m, 'lr')})")
    p.add_argument("--seed", type=int, default=default(m, "seed"), help="seed of the init, tile order and augmentation")
    rgb(p, "ImageNet")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (.pt)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    # fmt: on


def run(args: argparse.Namespace) -> None:
    settings = ModelSettings(
        arch=args.arch, num_classes=args.num_classes, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, mean=tuple(args.mean or IMAGENET_MEAN), std=tuple(args.std or IMAGENET_STD),
        model_kwargs=args.model_kwargs,
    )  # fmt: skip
    class_map = parse_class_map(args.class_map) if args.class_map else None
    result = run_model_training(
        settings,
        args.tiles,
        args.out,
        annotations=args.annotations,
        class_map=class_map,
        progress=args.progress,
    )
    last = result.history[-1]
    print(
        f"{args.out}: {args.arch} ({result.task}), {settings.epochs} epochs in {result.seconds:.0f} s, "
        f"final loss {last['loss']:.4f}, training accuracy {last['train_accuracy']:.3f}"
    )
