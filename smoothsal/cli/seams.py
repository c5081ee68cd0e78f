"""`smoothsal seams SLIDE --saliency M.zarr ... --tiles T.parquet --without W.ome.zarr --with O.ome.zarr --table
S.csv`: what overlapping tiles with window blending do to the tile grid. The stores must be computed on tiles
at stride = tile size / k (half stride: `smoothsal tiles --stride`). Writes the container of the
non-overlapping sub-grid stitched without blending, the container of every tile with Hann-window blending
(each with the seam measure of every map in its attributes), and a table of both seam scores per method ×
attribution × layer (0 = no trace of the tile grid).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..heatmaps import NGFF_VERSIONS, HeatmapSettings
from ..overlap import seam_comparison
from .common import Command, default, stitch_inputs

COMMAND = Command(
    "seams", "one slide at overlapping tiles stitched without and with overlap + window blending: seam scores"
)


def arguments(p: argparse.ArgumentParser) -> None:
    h = HeatmapSettings
    # fmt: off
    stitch_inputs(p, stores="saliency stores of SLIDE on the overlapping tiles", tiles="overlapping tile table (stride = tile size / k) the stores were computed on")
    p.add_argument("--tissue-mpp", type=float, default=default(h, "tissue_mpp"), help=f"tissue image resolution, µm/px (default {default(h, 'tissue_mpp')})")
    p.add_argument("--ngff", choices=NGFF_VERSIONS, default=default(h, "ngff"), help=f"OME-Zarr version (default {default(h, 'ngff')})")
    p.add_argument("--without", type=Path, required=True, help="container to write: the non-overlapping tiles, no blending")
    p.add_argument("--with", dest="with_", type=Path, required=True, help="container to write: every tile, window blending")
    p.add_argument("--table", type=Path, required=True, help="seam table to write (.csv)")
    # fmt: on


def run(args: argparse.Namespace) -> None:
    settings = HeatmapSettings(tissue_mpp=args.tissue_mpp, ngff=args.ngff)
    table = seam_comparison(
        args.slide, args.saliency, args.tiles, args.without, args.with_, args.table, settings, mpp=args.mpp
    )
    layer1 = table[
        (table["layer"] == table["layer"].iloc[0]) & (table["attribution"] == table["attribution"].iloc[0])
    ]
    scores = ", ".join(
        f"{m} {a:.3f} → {b:.3f}"
        for m, a, b in layer1[["method", "seams_without", "seams_with"]].itertuples(index=False)
    )
    print(f"{args.slide}: seam score without → with overlap ({layer1['attribution'].iloc[0]}, {layer1['layer'].iloc[0]}): {scores}; {args.table}")  # fmt: skip
