"""`smoothsal compare TILE.png --out F.png`: gradient and DeepLift at one hidden layer for each smoothing method
on one RGB tile image, with their total variation: a quick look before a slide-scale run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..compare import DEFAULT_MODEL, CompareSettings, run_compare
from ..precision import CHOICES
from .common import Command, arch_args, default, model_spec

COMMAND = Command("compare", "saliency of every smoothing method on one tile image, side by side (PNG)")


def arguments(p: argparse.ArgumentParser) -> None:
    c, m = CompareSettings, DEFAULT_MODEL
    # fmt: off
    p.add_argument("tile", type=Path, help="RGB(A) tile image (PNG/JPEG), any size")
    p.add_argument("--out", type=Path, required=True, help="figure to write (.png)")
    arch_args(p, arch=m.arch, num_classes=m.num_classes)
    p.add_argument("--surrogate", type=Path, help="trained surrogate (adds the surrogate method)")
    p.add_argument("--layer", default=default(c, "layer"), help=f"layer name or alias (default {default(c, 'layer')})")
    p.add_argument("--target", type=int, default=default(c, "target"), help=f"target class (default {default(c, 'target')})")
    p.add_argument("--size", type=int, default=default(c, "size"), help=f"tile side fed to the model, px (default {default(c, 'size')})")
    p.add_argument("--samples", type=int, default=default(c, "samples"), help=f"SmoothGrad samples (0: off; default {default(c, 'samples')})")
    p.add_argument("--stdev", type=float, default=default(c, "stdev"), help=f"SmoothGrad noise σ (default {default(c, 'stdev')})")
    p.add_argument("--precision", choices=CHOICES, default=default(c, "precision"), help=f"arithmetic of the maps (default {default(c, 'precision')}: exact; bf16: faster only where native: AMX/AVX512-BF16 CPUs, GPUs of compute capability 8+; emulated elsewhere and several times slower; auto: bf16 where native, else fp32)")
    # fmt: on


def run(args: argparse.Namespace) -> None:
    model = model_spec(args, args.surrogate)
    settings = CompareSettings(args.layer, args.target, args.size, args.samples, args.stdev, args.precision)
    result = run_compare(args.tile, args.out, model, settings)
    for (method, attribution), (_, tv) in result.maps.items():
        print(f"{method} {attribution} TV {tv:.4f}")
    print(f"wrote {result.out}")
