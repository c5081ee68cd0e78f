"""The `smoothsal` command: one subcommand per workflow stage.

Each subcommand parses its arguments and calls one library function; logic lives in the modules.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smoothsal",
        description="Smooth hidden-layer saliency maps for whole-slide images.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_tiles, _add_train_surrogate, _add_evaluate, _add_compare):
        add(sub)
    return parser


# --- tiles (smoothsal.slides) -------------------------------------------------------------------


def _add_tiles(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "tiles",
        help="tissue mask, tile grid and labels of one slide → tile table (Parquet) + overview PNG",
        description="Find tissue on a low pyramid level, lay a tile grid at the target resolution, label "
        "tiles from annotations, and write the tile table and an overview PNG.",
    )
    p.add_argument("slide", type=Path, help="whole-slide image (any format OpenSlide reads)")
    p.add_argument("--out", type=Path, required=True, help="tile table to write (.parquet)")
    p.add_argument("--overview", type=Path, help="overview PNG to write (default: OUT with .png)")
    p.add_argument("--slide-id", help="slide id in the table (default: the file name without suffix)")
    p.add_argument("--annotations", type=Path, help="ASAP XML or GeoJSON annotations, level-0 px")
    p.add_argument(
        "--class-map",
        help="annotation class names → ids, e.g. Tumor=1,Stroma=2,Exclusion=0 (0 = exclusion, "
        "negative = ignore; default: Camelyon16 groups _0/_1/Tumor=1, _2/Exclusion=0)",
    )
    p.add_argument("--mpp", type=float, help="µm/px at level 0, overriding (or replacing missing) metadata")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--target-mpp", type=float, default=0.5, help="tile resolution, µm/px (default 0.5)")
    res.add_argument("--level", type=int, help="read tiles at this pyramid level instead, unresized")
    p.add_argument("--tile-size", type=int, default=224, help="tile side, px at the target resolution (default 224)")
    p.add_argument("--stride", type=int, help="grid step, px at the target resolution (default: tile size)")
    p.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a tile (default 0.5)")
    p.add_argument("--roi", type=int, nargs=4, metavar=("X", "Y", "W", "H"), help="region to tile, level-0 px")
    p.add_argument("--max-tiles", type=int, help="keep a random sample of at most N tiles")
    p.add_argument("--seed", type=int, default=0, help="seed of that sample")
    p.add_argument("--label-threshold", type=float, default=0.5, help="tumour fraction for label 1 (default 0.5)")
    p.add_argument("--mask-mpp", type=float, default=8.0, help="tissue-mask resolution, µm/px (default 8)")
    p.add_argument("--min-saturation", type=float, default=0.08, help="floor of the saturation threshold (default 0.08)")
    p.add_argument("--closing-um", type=float, default=16.0, help="tissue-mask closing radius, µm (default 16)")
    p.add_argument("--min-object-um2", type=float, default=20000.0, help="drop tissue specks up to this area, µm²")
    p.add_argument("--min-hole-um2", type=float, default=20000.0, help="fill holes in tissue up to this area, µm²")
    p.set_defaults(func=_run_tiles)


def _run_tiles(args: argparse.Namespace) -> None:
    from smoothsal import slides

    grid = slides.TileGridSettings(
        tile_size=args.tile_size,
        stride=args.stride,
        target_mpp=args.target_mpp,
        level=args.level,
        min_tissue=args.min_tissue,
        roi=tuple(args.roi) if args.roi else None,
        max_tiles=args.max_tiles,
        seed=args.seed,
    )
    mask = slides.TissueMaskSettings(
        mask_mpp=args.mask_mpp,
        min_saturation=args.min_saturation,
        closing_um=args.closing_um,
        min_object_um2=args.min_object_um2,
        min_hole_um2=args.min_hole_um2,
    )
    class_map = slides.parse_class_map(args.class_map) if args.class_map else slides.DEFAULT_CLASS_MAP
    labels = slides.LabelSettings(args.label_threshold, max(1, slides.n_classes(class_map)))
    annotations = slides.read_annotations(args.annotations, class_map) if args.annotations else None
    with slides.open_slide(args.slide, args.mpp, args.slide_id) as slide:
        tiling = slides.tile_slide(slide, grid, mask, annotations, labels)
    overview = args.overview or args.out.with_suffix(".png")
    slides.plot_overview(tiling, overview, title=f"{args.slide.name}: {len(tiling.table)} tiles")
    slides.write_table(tiling.table, args.out)  # last: the table marks a finished slide
    print(f"{args.slide}: {len(tiling.table)} tiles → {args.out} (overview {overview})")


# --- train-surrogate / evaluate (smoothsal.training) ---------------------------------------------


def _model_args(p: argparse.ArgumentParser) -> None:
    """--arch / --num-classes / --checkpoint / --tiles / normalisation, shared by training and evaluation."""
    from pathlib import Path

    p.add_argument("--arch", required=True, help="model architecture (see smoothsal.ARCHITECTURES)")
    p.add_argument("--num-classes", type=int, required=True, help="outputs of the model (1 = one logit)")
    p.add_argument("--checkpoint", type=Path, help="model weights (.pt); without it a seeded random init")
    p.add_argument("--tiles", type=Path, nargs="+", required=True, metavar="TABLE", help="tile tables (.parquet)")
    p.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="input normalisation mean (default ImageNet)")
    p.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="input normalisation std (default ImageNet)")
    p.add_argument("--workers", type=int, help="DataLoader workers per process (default: min(4, cores per process - 1))")


def _add_train_surrogate(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "train-surrogate",
        help="train the bilinear surrogate paths of a model on tiles (multi-GPU: torchrun)",
        description="Train one bilinear surrogate path per downsampling conv of the frozen model (L1 per "
        "path, summed; Adam). Run plainly for one process, or under `torchrun --nproc_per_node N "
        "--no-python smoothsal train-surrogate ...` for N processes (nccl on GPU, gloo on CPU); the "
        "global --batch-size is split evenly across them. Checkpoints every epoch and every "
        "--checkpoint-every steps; a killed run resumes with the same result.",
    )
    _model_args(p)
    p.add_argument("--out", type=Path, required=True, help="surrogate file to write (.pt)")
    p.add_argument("--state", type=Path, help="resumable training state (default: OUT stem + .state.pt)")
    p.add_argument("--log", type=Path, help="per-epoch L1 loss CSV (default: OUT stem + .losses.csv)")
    p.add_argument("--epochs", type=int, default=2, help="epochs (default 2, the paper's Camelyon16 setting)")
    p.add_argument("--batch-size", type=int, default=512, help="global batch size over all processes (default 512)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the path init and the tile order")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only; ignored on CPU)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (0: epoch ends only)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True, help="continue from --state if present")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar on rank 0")
    p.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)  # debug: SIGKILL itself (tests)
    p.set_defaults(func=_run_train_surrogate)


def _train_settings(args: argparse.Namespace, table: object) -> object:
    from smoothsal import training

    norm = training.Normalize(tuple(args.mean or training.IMAGENET_MEAN), tuple(args.std or training.IMAGENET_STD))
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise FileNotFoundError(f"model checkpoint {args.checkpoint} does not exist")
    return training.TrainSettings(
        arch=args.arch,
        num_classes=args.num_classes,
        model_sha256=training.file_sha256(args.checkpoint) if args.checkpoint else "random-init",
        tiles_sha256=training.tiles_sha256(table),
        n_tiles=len(table),
        tile_size=int(table["tile_size"].iloc[0]),
        mean=norm.mean,
        std=norm.std,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        amp=args.amp,
    )


def _run_train_surrogate(args: argparse.Namespace) -> None:
    from smoothsal import training

    table = training.read_tile_tables(args.tiles)
    options = training.RunOptions(
        out=args.out, state=args.state, log=args.log, checkpoint_every=args.checkpoint_every,
        resume=args.resume, workers=args.workers, progress=args.progress,
        stop_after_steps=args.stop_after_steps,
    )  # fmt: skip
    result = training.run_training(_train_settings(args, table), table, options, checkpoint=args.checkpoint)
    if result.rank == 0:
        last = result.losses[-1]["l1_total"] if result.losses else float("nan")
        gpu = f", peak GPU MB {[round(m) for m in result.peak_gpu_mb]}" if result.peak_gpu_mb else ""
        print(
            f"{args.out}: {len(table)} tiles, {result.world} process(es), final L1 {last:.4g}, "
            f"{result.seconds:.1f} s, peak RSS MB {[round(m) for m in result.peak_rss_mb]}{gpu}"
            + (f" (resumed at step {result.resumed_from})" if result.resumed_from else "")
        )


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "evaluate",
        help="accuracy and prediction difference of original / surrogate / forward_hook on tiles",
        description="On (validation) tiles: accuracy over the labelled tiles and the prediction difference "
        "against the original (all classes and target class, ×100, mean ± std) of each smoothing method: "
        "the paper's Tables 2 and 3 for your model. Classification models (tile table `label` column).",
    )
    _model_args(p)
    p.add_argument("--surrogate", type=Path, help="trained surrogate (.pt from train-surrogate)")
    p.add_argument("--out", type=Path, required=True, help="summary table to write (.csv)")
    p.add_argument("--markdown", type=Path, help="the same as markdown (default: OUT with .md)")
    p.add_argument("--per-tile", type=Path, help="per-tile predictions and differences (.parquet)")
    p.add_argument(
        "--methods", nargs="+", default=["original", "surrogate", "forward_hook"],
        help="methods to compare (default: original surrogate forward_hook; surrogate only with --surrogate)",
    )  # fmt: skip
    p.add_argument("--target", choices=("label", "predicted"), default="label", help="target class (default: label)")
    p.add_argument("--batch-size", type=int, default=64, help="tiles per forward pass (default 64)")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> None:
    import torch

    from smoothsal import evaluation, training
    from smoothsal.slides import TileDataset

    table = training.read_tile_tables(args.tiles)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, surrogate, norm = training.load_with_surrogate(
        args.arch, num_classes=args.num_classes, checkpoint=args.checkpoint, surrogate=args.surrogate,
        mean=args.mean, std=args.std, device=device,
    )  # fmt: skip
    methods = [m for m in args.methods if m != "surrogate" or surrogate is not None]
    result = evaluation.evaluate(
        model, TileDataset(table, transform=norm), evaluation.tile_labels(table), methods=methods,
        surrogate=surrogate, target=args.target, batch_size=args.batch_size, workers=args.workers or 0,
    )  # fmt: skip
    evaluation.write_summary(result.summary, args.out, args.markdown or args.out.with_suffix(".md"))
    if args.per_tile:
        from smoothsal.slides import write_table

        write_table(evaluation.per_tile_table(table, result), args.per_tile)
    print(evaluation.to_markdown(result.summary), end="")


# --- compare (smoothsal.report) ------------------------------------------------------------------


def _add_compare(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "compare",
        help="saliency of every smoothing method on one tile image, side by side (PNG)",
        description="Gradient and DeepLift at one hidden layer for each smoothing method on one "
        "RGB tile image, with their total variation: a quick look before a slide-scale run.",
    )
    p.add_argument("tile", type=Path, help="RGB(A) tile image (PNG/JPEG), any size")
    p.add_argument("--out", type=Path, required=True, help="figure to write (.png)")
    p.add_argument("--arch", default="resnet18", help="model architecture (default resnet18)")
    p.add_argument("--num-classes", type=int, default=2, help="model outputs (default 2)")
    p.add_argument("--checkpoint", type=Path, help="trained weights (default: a seeded random init)")
    p.add_argument("--surrogate", type=Path, help="trained surrogate (adds the surrogate method)")
    p.add_argument("--layer", default="layer2", help="layer name or alias (default layer2)")
    p.add_argument("--target", type=int, default=0, help="target class (default 0)")
    p.add_argument("--size", type=int, default=224, help="tile side fed to the model, px")
    p.add_argument("--samples", type=int, default=20, help="SmoothGrad samples (0: off)")
    p.add_argument("--stdev", type=float, default=0.2, help="SmoothGrad noise σ")
    p.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from smoothsal import report
    from smoothsal.attribution import SmoothGrad
    from smoothsal.training import load_with_surrogate

    try:
        image = Image.open(args.tile).convert("RGB").resize((args.size, args.size))
    except (OSError, UnidentifiedImageError) as err:
        raise CommandError(f"{args.tile}: not a readable image ({err}); give a PNG or JPEG tile")
    rgb = np.asarray(image)
    model, surrogate, norm = load_with_surrogate(
        args.arch, num_classes=args.num_classes, checkpoint=args.checkpoint, surrogate=args.surrogate
    )
    x = norm(torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0).unsqueeze(0)
    methods = ["original", "backward_hook", "forward_hook"] + (["surrogate"] if surrogate else [])
    smoothgrad = SmoothGrad(args.samples, args.stdev, seed=0) if args.samples else None
    maps = report.compare_methods(
        model, x, layer=args.layer, target=args.target, methods=methods,
        surrogate=surrogate, smoothgrad=smoothgrad,
    )  # fmt: skip
    weights = args.checkpoint.name if args.checkpoint else "random weights"
    title = f"{args.arch} ({weights}), {args.layer}, target {args.target}, {args.tile.name}"
    report.comparison_figure(rgb, maps, title, args.out)
    print(f"wrote {args.out}")


# --- entry point ----------------------------------------------------------------------------------


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CommandError, ValueError, OSError) as err:  # bad input, unreadable or unwritable files
        print(f"smoothsal {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except RuntimeError as err:  # torch refusing an input (e.g. a tile too small for the model)
        if os.environ.get("SMOOTHSAL_DEBUG"):
            raise
        print(
            f"smoothsal {args.command}: error: {_one_line(err)} (set SMOOTHSAL_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
