"""`smoothsal inspect --arch A [--num-classes K] [--checkpoint W] [--tile-size S] [--json]`: what smoothsal will do
to a network before it runs — its downsampling ops in forward order and which methods change each, the stage
aliases with the modules, resolutions and channels behind them, the DeepLift rule each nonlinearity gets, and
what cannot be explained.
"""

from __future__ import annotations

import argparse
import json

from .common import Command, arch_args, model_spec

COMMAND = Command(
    "inspect", "what smoothsal will do to a network: downsampling ops, stage aliases, DeepLift rules"
)


def arguments(p: argparse.ArgumentParser) -> None:
    arch_args(p, num_classes=2)
    p.add_argument(
        "--tile-size", type=int, default=224, help="input side in px the model is traced on (default 224)"
    )
    p.add_argument("--json", action="store_true", help="the report as JSON instead of tables")


def run(args: argparse.Namespace) -> None:
    from ..inspection import inspect_model, to_text

    model = model_spec(args).load()[0]
    report = inspect_model(model, args.arch, args.tile_size)
    print(json.dumps(report.as_dict(), indent=1) if args.json else to_text(report))
