"""`smoothsal report --tables .../*.parquet --heatmaps .../*.ome.zarr --out DIR`: aggregate the per-tile tables
of `smoothsal saliency` (any number of slides, datasets and methods): TV (Table 4 layout, lowest per row in
bold), TV reduction vs the original, prediction difference (Table 3), accuracy where tiles are labelled
(Table 2), per-slide breakdowns, TV per layer (Figure 4) and, with --heatmaps, one overview figure per
slide. Writes tables/*.csv|md, figures/*.png|svg and a self-contained index.html under --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..report import ReportSettings, write_report
from .common import Command, default

COMMAND = Command("report", "the paper's tables and figures over every slide's per-tile tables → index.html")


def arguments(p: argparse.ArgumentParser) -> None:
    r = ReportSettings
    # fmt: off
    p.add_argument("--tables", type=Path, nargs="+", required=True, metavar="TABLE", help="per-tile tables (.parquet) from `smoothsal saliency --table`")
    p.add_argument("--heatmaps", type=Path, nargs="*", default=[], metavar="CONTAINER", help="heatmap containers (.ome.zarr) from `smoothsal heatmaps`: one overview figure each")
    p.add_argument("--seams", type=Path, nargs="*", default=[], metavar="TABLE", help="seam tables (.csv) from `smoothsal seams`: seam scores without / with overlap and their figures")
    p.add_argument("--out", type=Path, required=True, help="report directory (replaced as a whole)")
    p.add_argument("--title", default=default(r, "title"), help="title of index.html")
    p.add_argument("--percentile", type=float, default=default(r, "percentile"), help=f"colour limit per overview row: this percentile of |value| (default {default(r, 'percentile'):g})")
    p.add_argument("--alpha", type=float, default=default(r, "alpha"), help=f"heatmap opacity over the tissue (default {default(r, 'alpha')})")
    p.add_argument("--thumbnail-px", type=int, default=default(r, "thumbnail_px"), help=f"read the smallest pyramid level with a side of at least this (default {default(r, 'thumbnail_px')})")
    # fmt: on


def run(args: argparse.Namespace) -> None:
    settings = ReportSettings(
        title=args.title, percentile=args.percentile, alpha=args.alpha, thumbnail_px=args.thumbnail_px
    )
    result = write_report(args.tables, args.out, args.heatmaps, settings, seams=args.seams)
    print(
        f"{result.out / 'index.html'}: {len(result.tables)} tables, {len(result.figures)} figures "
        f"from {len(args.tables)} per-tile tables" + "".join(f"; {n}" for n in result.notes)
    )
