"""`smoothsal evaluate`: on (validation) tiles, accuracy over the labelled tiles and the prediction difference
against the original (all classes and target class, ×100, mean ± std) of each smoothing method: the paper's
Tables 2 and 3 for your model. Classification models (tile table `label` column).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..evaluation import EvalSettings, run_evaluation, to_markdown
from ..predictions import TARGETS
from .common import Command, default, model_args, model_spec

COMMAND = Command(
    "evaluate", "accuracy and prediction difference of original / surrogate / forward_hook on tiles"
)


def arguments(p: argparse.ArgumentParser) -> None:
    e = EvalSettings
    model_args(p)
    # fmt: off
    p.add_argument("--surrogate", type=Path, help="trained surrogate (.pt from train-surrogate)")
    p.add_argument("--out", type=Path, required=True, help="summary table to write (.csv)")
    p.add_argument("--markdown", type=Path, help="the same as markdown (default: OUT with .md)")
    p.add_argument("--per-tile", type=Path, help="per-tile predictions and differences (.parquet)")
    p.add_argument("--methods", nargs="+", default=list(default(e, "methods")), help=f"methods to compare (default: {' '.join(default(e, 'methods'))}; surrogate only with --surrogate)")
    p.add_argument("--target", choices=TARGETS, default=default(e, "target"), help=f"target class (default: {default(e, 'target')})")
    p.add_argument("--batch-size", type=int, default=default(e, "batch_size"), help=f"tiles per forward pass (default {default(e, 'batch_size')})")
    # fmt: on


def run(args: argparse.Namespace) -> None:
    model = model_spec(args, args.surrogate)
    settings = EvalSettings(tuple(args.methods), args.target, args.batch_size)
    result = run_evaluation(
        args.tiles, model, args.out, settings, markdown=args.markdown, per_tile=args.per_tile,
        workers=args.workers or 0,
    )  # fmt: skip
    print(to_markdown(result.summary), end="")
