"""`smoothsal tiles SLIDE --out T.parquet`: one slide's tile table and overview. Find tissue on a low pyramid
level, lay a tile grid at the target resolution, label tiles from annotations, and write the tile table and
an overview PNG.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..annotations import parse_class_map
from ..grid import TileGridSettings
from ..tiling import LabelSettings, TilingSettings, make_tiles
from ..tissue import TissueMaskSettings
from .common import Command, default

COMMAND = Command(
    "tiles", "tissue mask, tile grid and labels of one slide → tile table (Parquet) + overview PNG"
)


def arguments(p: argparse.ArgumentParser) -> None:
    g, m = TileGridSettings, TissueMaskSettings
    # fmt: off
    p.add_argument("slide", type=Path, help="whole-slide image (any format OpenSlide reads)")
    p.add_argument("--out", type=Path, required=True, help="tile table to write (.parquet)")
    p.add_argument("--overview", type=Path, help="overview PNG to write (default: OUT with .png)")
    p.add_argument("--slide-id", help="slide id in the table (default: the file name without suffix)")
    p.add_argument("--annotations", type=Path, help="ASAP XML or GeoJSON annotations, level-0 px")
    p.add_argument("--class-map", help="annotation class names → ids, e.g. Tumor=1,Stroma=2,Exclusion=0 (0 = exclusion, negative = ignore; default: Camelyon16 groups _0/_1/Tumor=1, _2/Exclusion=0)")
    p.add_argument("--mpp", type=float, help="µm/px at level 0, overriding (or replacing missing) metadata")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--target-mpp", type=float, default=default(g, "target_mpp"), help=f"tile resolution, µm/px (default {default(g, 'target_mpp')})")
    res.add_argument("--level", type=int, default=default(g, "level"), help="read tiles at this pyramid level instead, unresized")
    p.add_argument("--tile-size", type=int, default=default(g, "tile_size"), help=f"tile side, px at the target resolution (default {default(g, 'tile_size')})")
    p.add_argument("--stride", type=int, default=default(g, "stride"), help="grid step, px at the target resolution (default: tile size)")
    p.add_argument("--min-tissue", type=float, default=default(g, "min_tissue"), help=f"minimum tissue fraction of a tile (default {default(g, 'min_tissue')})")
    p.add_argument("--roi", type=int, nargs=4, metavar=("X", "Y", "W", "H"), help="region to tile, level-0 px")
    p.add_argument("--max-tiles", type=int, default=default(g, "max_tiles"), help="keep a random sample of at most N tiles")
    p.add_argument("--seed", type=int, default=default(g, "seed"), help="seed of that sample")
    p.add_argument("--label-threshold", type=float, default=default(LabelSettings, "threshold"), help=f"tumour fraction for label 1 (default {default(LabelSettings, 'threshold')})")
    p.add_argument("--mask-mpp", type=float, default=default(m, "mask_mpp"), help=f"tissue-mask resolution, µm/px (default {default(m, 'mask_mpp')})")
    p.add_argument("--min-saturation", type=float, default=default(m, "min_saturation"), help=f"floor of the saturation threshold (default {default(m, 'min_saturation')})")
    p.add_argument("--closing-um", type=float, default=default(m, "closing_um"), help=f"tissue-mask closing radius, µm (default {default(m, 'closing_um')})")
    p.add_argument("--min-object-um2", type=float, default=default(m, "min_object_um2"), help="drop tissue specks up to this area, µm²")
    p.add_argument("--min-hole-um2", type=float, default=default(m, "min_hole_um2"), help="fill holes in tissue up to this area, µm²")
    # fmt: on


def run(args: argparse.Namespace) -> None:
    settings = TilingSettings(
        grid=TileGridSettings(
            tile_size=args.tile_size, stride=args.stride, target_mpp=args.target_mpp, level=args.level,
            min_tissue=args.min_tissue, roi=tuple(args.roi) if args.roi else None, max_tiles=args.max_tiles,
            seed=args.seed,
        ),
        mask=TissueMaskSettings(
            mask_mpp=args.mask_mpp, min_saturation=args.min_saturation, closing_um=args.closing_um,
            min_object_um2=args.min_object_um2, min_hole_um2=args.min_hole_um2,
        ),
        labels=LabelSettings(args.label_threshold),
    )  # fmt: skip
    class_map = parse_class_map(args.class_map) if args.class_map else None
    tiled = make_tiles(
        args.slide, args.out, settings, annotations=args.annotations, class_map=class_map, mpp=args.mpp,
        slide_id=args.slide_id, overview=args.overview,
    )  # fmt: skip
    overview = args.overview or args.out.with_suffix(".png")
    print(f"{args.slide}: {len(tiled.table)} tiles → {args.out} (overview {overview})")
