"""`smoothsal faithfulness SLIDE --tiles T.parquet --saliency M.zarr --method M ... --out F.parquet
--randomisation-out R.parquet`: do the stored maps of one slide × method explain the ORIGINAL model? On a
seeded sample of tiles: deletion / insertion AUC (original model, blurred / mean / zero replacement) against
a random pixel order, relevance mass where --annotations are given, and cascading model-parameter
randomisation (Spearman of |map| with the stored map). One row per tile × attribution × layer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..faithfulness import (
    FaithfulnessOptions,
    FaithfulnessSettings,
    run_faithfulness,
)
from ..perturbation import BASELINES
from ..randomisation import BATCHNORM, GROUPINGS
from ..saliency import DEVICES
from ..smoothing import METHODS
from .common import Command, arch_args, default, model_spec

COMMAND = Command(
    "faithfulness", "deletion/insertion, randomisation and relevance mass of one slide × method's stored maps"
)


def sample(text: str) -> int:
    return 0 if text == "all" else int(text)


def arguments(p: argparse.ArgumentParser) -> None:
    s, o = FaithfulnessSettings, FaithfulnessOptions
    # fmt: off
    p.add_argument("slide", type=Path, help="whole-slide image the tile table was made from")
    p.add_argument("--tiles", type=Path, required=True, help="tile table of SLIDE (from `smoothsal tiles`)")
    p.add_argument("--saliency", type=Path, required=True, help="saliency store of SLIDE under --method (.zarr)")
    p.add_argument("--method", required=True, choices=METHODS, help="smoothing method the store was made with")
    arch_args(p)
    p.add_argument("--surrogate", type=Path, help="trained surrogate (.pt); needed by --method surrogate")
    p.add_argument("--layers", nargs="+", help="layers to evaluate (default: every layer of the store)")
    p.add_argument("--annotations", type=Path, help="annotation file of SLIDE: relevance mass")
    p.add_argument("--class-map", help="annotation class names → ids, e.g. Tumor=1,Stroma=2")
    p.add_argument("--sample", type=sample, default=default(s, "sample"), help=f"tiles sampled per slide, stratified by label (default {default(s, 'sample')}; all = every tile)")
    p.add_argument("--steps", type=int, default=default(s, "steps"), help=f"deletion/insertion steps K (default {default(s, 'steps')})")
    p.add_argument("--baseline", choices=BASELINES, default=default(s, "baseline"), help=f"what removed pixels become (default {default(s, 'baseline')})")
    p.add_argument("--blur-um", type=float, default=default(s, "blur_um"), help=f"σ of the blurred tile in µm (default {default(s, 'blur_um')})")
    p.add_argument("--no-randomisation", dest="randomisation", action="store_false", default=default(s, "randomisation"), help="skip the model-randomisation test")
    p.add_argument("--by", choices=GROUPINGS, default=default(s, "by"), help=f"randomisation steps: per block or per stage (default {default(s, 'by')})")
    p.add_argument("--batchnorm", choices=BATCHNORM, default=default(s, "batchnorm"), help=f"BatchNorm statistics of randomised blocks (default {default(s, 'batchnorm')})")
    p.add_argument("--seed", type=int, default=default(s, "seed"), help=f"seed of the sample, the random order and the re-initialisation (default {default(s, 'seed')})")
    p.add_argument("--dataset", default=default(o, "dataset"), help="dataset name written into the tables")
    p.add_argument("--batch-size", type=int, default=default(o, "batch_size"), help=f"tiles per chunk (default {default(o, 'batch_size')}; does not change results)")
    p.add_argument("--device", choices=DEVICES, default=default(o, "device"), help="default auto: CUDA when present")
    p.add_argument("--out", type=Path, required=True, help="per-tile table to write (.parquet)")
    p.add_argument("--randomisation-out", type=Path, required=True, help="randomisation table to write (.parquet)")
    # fmt: on


def run(args: argparse.Namespace) -> None:
    settings = FaithfulnessSettings(
        sample=args.sample, steps=args.steps, baseline=args.baseline, blur_um=args.blur_um,
        randomisation=args.randomisation, by=args.by, batchnorm=args.batchnorm, seed=args.seed,
    )  # fmt: skip
    options = FaithfulnessOptions(
        args.out, args.randomisation_out, batch_size=args.batch_size, device=args.device, dataset=args.dataset
    )
    model = model_spec(args, args.surrogate)
    result = run_faithfulness(
        args.slide, args.tiles, args.saliency, args.method, model, settings, options, layers=args.layers,
        annotations=args.annotations, class_map=args.class_map,
    )  # fmt: skip
    print(
        f"{args.slide}: {result.sampled} of {result.n_tiles} tiles in {result.seconds:.1f} s on "
        f"{result.device} → {args.out}, {args.randomisation_out}"
    )
