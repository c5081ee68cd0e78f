"""`smoothsal demo-data --out demo/`: synthetic H&E-like slides for the demo workflow and tests: pink stroma,
purple nuclei; tumour regions with larger, darker, denser, irregular nuclei. Writes OUT/camelyon16/*.tif with
ASAP XML tumour annotations, OUT/digipath/*.tif with GeoJSON (Tumor, Stroma), and *_nuclei.png (the level-0
nucleus mask). The same --seed and --size give the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..demo import DemoSettings, make_demo_data, select_slides
from .common import Command, default

COMMAND = Command(
    "demo-data", "write the deterministic synthetic demo slides (pyramidal TIFF, 0.5 µm/px) and annotations"
)


def arguments(p: argparse.ArgumentParser) -> None:
    d = DemoSettings
    # fmt: off
    p.add_argument("--out", type=Path, required=True, help="folder to write into (e.g. demo/)")
    p.add_argument("--seed", type=int, default=default(d, "seed"), help=f"seed of every slide (default {default(d, 'seed')})")
    p.add_argument("--size", type=int, default=default(d, "size"), help=f"slide side, px at 0.5 µm/px (default {default(d, 'size')})")
    p.add_argument("--slides", nargs="+", metavar="NAME", help="only these slides (e.g. tumor_001 digi_003)")
    p.add_argument("--processes", type=int, default=1, help="slides rendered side by side (default 1; the same files)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    # fmt: on


def run(args: argparse.Namespace) -> None:
    settings = DemoSettings(args.size, args.seed)
    written = make_demo_data(
        args.out, settings, select_slides(args.slides), progress=args.progress, processes=args.processes
    )
    print(f"{args.out}: {len(written)} files (slides, annotations, nucleus masks)")
