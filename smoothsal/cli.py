"""The `smoothsal` command: one subcommand per workflow stage.

Each subcommand parses its arguments and calls one library function; logic lives in the modules.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smoothsal",
        description="Smooth hidden-layer saliency maps for whole-slide images.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_tiles, _add_train_surrogate, _add_evaluate):
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
    p.add_argument("--tile-size", type=int, default=224, help="tile side, px at the target resolution")
    p.add_argument("--stride", type=int, help="grid step, px at the target resolution (default: tile size)")
    p.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a tile")
    p.add_argument("--roi", type=int, nargs=4, metavar=("X", "Y", "W", "H"), help="region to tile, level-0 px")
    p.add_argument("--max-tiles", type=int, help="keep a random sample of at most N tiles")
    p.add_argument("--seed", type=int, default=0, help="seed of that sample")
    p.add_argument("--label-threshold", type=float, default=0.5, help="tumour fraction for label 1")
    p.add_argument("--mask-mpp", type=float, default=8.0, help="tissue-mask resolution, µm/px")
    p.add_argument("--min-saturation", type=float, default=0.08, help="floor of the saturation threshold")
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
    mask = slides.TissueMaskSettings(mask_mpp=args.mask_mpp, min_saturation=args.min_saturation)
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


def _add_train_surrogate(sub: argparse._SubParsersAction) -> None:
    pass


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    pass


# --- entry point ----------------------------------------------------------------------------------


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CommandError, ValueError, FileNotFoundError) as err:
        print(f"smoothsal {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
