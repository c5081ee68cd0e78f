"""`smoothsal export SLIDE.ome.zarr --map METHOD/ATTRIBUTION/LAYER --out HOTSPOTS.geojson`: one heatmap for
QuPath. The regions whose values reach the given percentiles of the map's values over tissue, as GeoJSON
polygons in the slide's level-0 pixels (QuPath: File > Import objects), with mean and max attribution and
area in µm² per region and one classification per threshold; with --ome-tiff also the map as a pyramidal
OME-TIFF at its physical pixel size. Replaces only earlier outputs of this command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..qupath import ExportSettings, export
from .common import Command, default

COMMAND = Command("export", "one heatmap for QuPath: hot-spot polygons as GeoJSON (+ the map as OME-TIFF)")


def arguments(p: argparse.ArgumentParser) -> None:
    e = ExportSettings
    # fmt: off
    p.add_argument("container", type=Path, help="heatmap container (SLIDE.ome.zarr from `smoothsal heatmaps`)")
    p.add_argument("--map", required=True, metavar="METHOD/ATTRIBUTION/LAYER", help="the heatmap to export (or its container path heatmaps/M/A/L)")
    p.add_argument("--out", type=Path, required=True, help="GeoJSON file to write")
    p.add_argument("--percentiles", type=float, nargs="+", default=list(default(e, "percentiles")), help=f"thresholds as percentiles of the tissue's values (default {' '.join(f'{v:g}' for v in default(e, 'percentiles'))})")
    p.add_argument("--min-pixels", type=int, default=default(e, "min_pixels"), help=f"leave out smaller regions, map px (default {default(e, 'min_pixels')})")
    p.add_argument("--object-type", choices=("annotation", "detection"), default=default(e, "object_type"), help=f"QuPath object type (default {default(e, 'object_type')})")
    p.add_argument("--ome-tiff", type=Path, help="also write the map as a pyramidal OME-TIFF here")
    # fmt: on


def run(args: argparse.Namespace) -> None:
    settings = ExportSettings(
        percentiles=tuple(args.percentiles), min_pixels=args.min_pixels, object_type=args.object_type
    )
    result = export(args.container, args.map, args.out, settings, ome_tiff=args.ome_tiff)
    regions = ", ".join(
        f"{n} {name} (>= {result.thresholds[name]:.4g})" for name, n in result.regions.items()
    )
    tiff = f"; {result.ome_tiff}" if result.ome_tiff else ""
    print(f"{args.container} {result.image} → {result.geojson}: {regions}{tiff}")
