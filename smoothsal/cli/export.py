"""`smoothsal export SLIDE.ome.zarr --map METHOD/ATTRIBUTION/LAYER --out HOTSPOTS.geojson`: one heatmap for
QuPath. The regions whose values reach the given percentiles of the map's values over tissue, as GeoJSON
polygons in the slide's level-0 pixels (QuPath: File > Import objects), with mean and max attribution and
area in µm² per region and one classification per threshold; with --ome-tiff also the map as a pyramidal
OME-TIFF at its physical pixel size. Replaces only earlier outputs of this command.

`smoothsal export SLIDE.ome.zarr --qupath-tiles --out SLIDE.geojson.gz --gzip [--tables M.parquet ...]`:
every map for QuPath's measurement maps instead: one tile object per stride cell of the tile grid (or
--qupath-subdivide 2|4 squares per cell) with the mean, positive mass and max of each chosen map over it
and, from the per-tile tables, each tile's probabilities, label, TV and prediction difference
(`smoothsal.qupath_tiles`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import BadOption
from ..qupath import ExportSettings, export
from ..qupath_tiles import STATISTICS, TILE_MEASURES, TileExportSettings, export_tiles
from .common import Command, default

COMMAND = Command(
    "export", "heatmaps for QuPath: hot-spot polygons (+ OME-TIFF), or tile objects with measurements"
)


def arguments(p: argparse.ArgumentParser) -> None:
    e, t = ExportSettings, TileExportSettings
    # fmt: off
    p.add_argument("container", type=Path, help="heatmap container (SLIDE.ome.zarr from `smoothsal heatmaps`)")
    p.add_argument("--out", type=Path, required=True, help="GeoJSON file to write")
    h = p.add_argument_group("hot spots (one map)")
    h.add_argument("--map", metavar="METHOD/ATTRIBUTION/LAYER", help="the heatmap to export (or its container path heatmaps/M/A/L); required without --qupath-tiles")
    h.add_argument("--percentiles", type=float, nargs="+", default=list(default(e, "percentiles")), help=f"thresholds as percentiles of the tissue's values (default {' '.join(f'{v:g}' for v in default(e, 'percentiles'))})")
    h.add_argument("--min-pixels", type=int, default=default(e, "min_pixels"), help=f"leave out smaller regions, map px (default {default(e, 'min_pixels')})")
    h.add_argument("--object-type", choices=("annotation", "detection"), default=default(e, "object_type"), help=f"QuPath object type (default {default(e, 'object_type')})")
    h.add_argument("--ome-tiff", type=Path, help="also write the map as a pyramidal OME-TIFF here")
    q = p.add_argument_group("tile objects for QuPath's measurement maps")
    q.add_argument("--qupath-tiles", action="store_true", help="write one object per stride cell with measurements instead of hot spots")
    q.add_argument("--tables", type=Path, nargs="+", default=[], metavar="M.parquet", help="per-tile tables of `smoothsal saliency` (one per method): probabilities, label, TV, prediction difference")
    q.add_argument("--qupath-methods", nargs="+", help="methods (default: all in the container)")
    q.add_argument("--qupath-attributions", nargs="+", help="attributions (default: all in the container)")
    q.add_argument("--qupath-layers", nargs="+", help="layers (default: all in the container)")
    q.add_argument("--qupath-statistics", nargs="+", default=list(default(t, "statistics")), help=f"of each map over each object, of {' '.join(STATISTICS)} (default all)")
    q.add_argument("--qupath-tile-measures", nargs="*", default=list(default(t, "tile_measures")), help=f"from the tables, of {' '.join(TILE_MEASURES)} (default all; none: give the option no value)")
    q.add_argument("--qupath-subdivide", type=int, default=default(t, "subdivide"), help=f"squares per stride cell side: 1, 2 or 4 (default {default(t, 'subdivide')})")
    q.add_argument("--qupath-object-type", default=default(t, "object_type"), help=f"QuPath object type: tile or detection (default {default(t, 'object_type')})")
    q.add_argument("--gzip", action="store_true", help="write gzip (name the --out .geojson.gz)")
    # fmt: on


def _stray(args: argparse.Namespace, tiles: bool) -> list[str]:
    """The options of the other mode that were given (differ from their defaults)."""
    p = argparse.ArgumentParser()
    arguments(p)
    defaults = vars(p.parse_args([str(args.container), "--out", str(args.out)]))
    hot = ("map", "percentiles", "min_pixels", "object_type", "ome_tiff")
    names = hot if tiles else [n for n in defaults if n.startswith("qupath_") or n in ("tables", "gzip")]
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) != defaults[n]]


def _tiles(args: argparse.Namespace) -> None:
    stray = _stray(args, tiles=True)
    if stray:
        raise BadOption(f"{' '.join(stray)}: hot-spot options, not for --qupath-tiles; leave them out")
    settings = TileExportSettings(
        methods=None if args.qupath_methods is None else tuple(args.qupath_methods),
        attributions=None if args.qupath_attributions is None else tuple(args.qupath_attributions),
        layers=None if args.qupath_layers is None else tuple(args.qupath_layers),
        statistics=tuple(args.qupath_statistics),
        tile_measures=tuple(args.qupath_tile_measures),
        subdivide=args.qupath_subdivide,
        object_type=args.qupath_object_type,
        gzip=args.gzip,
    )
    result = export_tiles(args.container, args.out, settings, tables=args.tables)
    print(
        f"{args.container} → {result.geojson}: {result.objects} {settings.object_type} objects "
        f"(stride {result.stride_px} px / {settings.subdivide}), {len(result.measurements)} measurements each, "
        f"{result.bytes} bytes"
    )


def run(args: argparse.Namespace) -> None:
    if args.qupath_tiles:
        _tiles(args)
        return
    stray = _stray(args, tiles=False)
    if stray:
        raise BadOption(f"{' '.join(stray)}: options of --qupath-tiles; add --qupath-tiles or leave them out")
    if args.map is None:
        raise BadOption("--map METHOD/ATTRIBUTION/LAYER is required for hot spots (or give --qupath-tiles)")
    settings = ExportSettings(
        percentiles=tuple(args.percentiles), min_pixels=args.min_pixels, object_type=args.object_type
    )
    result = export(args.container, args.map, args.out, settings, ome_tiff=args.ome_tiff)
    regions = ", ".join(
        f"{n} {name} (>= {result.thresholds[name]:.4g})" for name, n in result.regions.items()
    )
    tiff = f"; {result.ome_tiff}" if result.ome_tiff else ""
    print(f"{args.container} {result.image} → {result.geojson}: {regions}{tiff}")
