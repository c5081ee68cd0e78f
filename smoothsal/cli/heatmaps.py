"""`smoothsal heatmaps SLIDE --saliency M.zarr ... --tiles T.parquet --out SLIDE.ome.zarr`: the tissue as an RGB
pyramid at ~--tissue-mpp µm/px and one float32 pyramid per method × attribution × layer, stitched from the
per-tile maps (overlaps blended), all with µm coordinateTransformations so they overlay in napari / QuPath /
vizarr. Chunk-wise: memory does not grow with the slide. Written under a hidden .OUT.partial and renamed at
the end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..annotations import parse_class_map
from ..container import open_container
from ..heatmaps import BLENDS, NGFF_VERSIONS, HeatmapSettings, make_heatmaps
from .common import Command, default, stitch_inputs

COMMAND = Command(
    "heatmaps", "stitch one slide's saliency stores into one OME-Zarr container (tissue + heatmap pyramids)"
)


def arguments(p: argparse.ArgumentParser) -> None:
    h = HeatmapSettings
    # fmt: off
    stitch_inputs(p, stores="saliency stores of SLIDE ({method}.zarr from `smoothsal saliency`)", tiles="tile table of SLIDE (.parquet) the stores were computed on")
    p.add_argument("--annotations", type=Path, help="ASAP XML or GeoJSON annotations to store with the maps (level-0 px)")
    p.add_argument("--class-map", help="annotation class names → ids, as for `smoothsal tiles`")
    p.add_argument("--tissue-mpp", type=float, default=default(h, "tissue_mpp"), help=f"tissue image resolution, µm/px (default {default(h, 'tissue_mpp')})")
    p.add_argument("--no-tissue", dest="tissue", action="store_false", default=default(h, "tissue"), help="leave the tissue image out")
    p.add_argument("--blend", choices=BLENDS, default=default(h, "blend"), help=f"overlapping tiles: none (last wins), mean, window (Hann-weighted; default {default(h, 'blend')})")
    p.add_argument("--ngff", choices=NGFF_VERSIONS, default=default(h, "ngff"), help=f"OME-Zarr version: 0.4 on Zarr v2 (widest viewer support) or 0.5 on Zarr v3 (default {default(h, 'ngff')})")
    p.add_argument("--chunk", type=int, default=default(h, "chunk"), help=f"chunk side, px (default {default(h, 'chunk')}, at least 256)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--out", type=Path, required=True, help="container to write (SLIDE.ome.zarr directory)")
    p.add_argument("--ome-tiff", nargs=2, action="append", default=[], metavar=("IMAGE", "FILE"), help="also export IMAGE (e.g. heatmaps/original/gradient/layer2, or tissue) as a pyramidal OME-TIFF FILE for QuPath; repeatable")
    # fmt: on


def run(args: argparse.Namespace) -> None:
    settings = HeatmapSettings(
        tissue_mpp=args.tissue_mpp, blend=args.blend, ngff=args.ngff, chunk=args.chunk, tissue=args.tissue
    )
    class_map = parse_class_map(args.class_map) if args.class_map else None
    written = make_heatmaps(
        args.slide, args.saliency, args.tiles, args.out, settings, mpp=args.mpp, annotations=args.annotations,
        class_map=class_map, progress=args.progress, ome_tiff=[tuple(pair) for pair in args.ome_tiff],
    )  # fmt: skip
    tiffs = "".join(f", {image} → {path}" for image, path in args.ome_tiff)
    print(f"{args.slide}: {len(open_container(written).images)} images → {written}{tiffs}")
