"""`smoothsal view SLIDE.ome.zarr`: serve the container on 127.0.0.1 only, a page with the tissue and a heatmap
overlay in two synchronised panels (method, attribution, layer, colour map, opacity, range from robust
percentiles, tile grid, annotations). Tiles are read on demand at the level the screen needs, so whole-slide
containers open at once. On a cluster node: `ssh -L PORT:127.0.0.1:PORT node`, then open
http://127.0.0.1:PORT/ locally. --export writes a static site instead, --napari opens napari.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..viewer import export, serve
from ..viewer.server import DEFAULT_PORT
from .common import Command

COMMAND = Command(
    "view", "look at a heatmap container in the browser (local server), as a static site, or in napari"
)


def arguments(p: argparse.ArgumentParser) -> None:
    # fmt: off
    p.add_argument("container", type=Path, help="heatmap container (SLIDE.ome.zarr)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on 127.0.0.1 (default {DEFAULT_PORT}; 0: any free one)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.add_argument("--verbose", action="store_true", help="log every request")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--export", type=Path, metavar="DIR", help="instead: write page, manifest, tiles to DIR (static site)")
    mode.add_argument("--napari", action="store_true", help="instead: open it in napari (if installed)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar (--export)")
    # fmt: on


def run(args: argparse.Namespace) -> None:
    if args.napari:
        from ..napari import open_napari

        open_napari(args.container)
    elif args.export:
        result = export(args.container, args.export, progress=args.progress)
        print(
            f"{args.container} → {result.out}: {result.tiles} tiles, {result.bytes / 2**20:.1f} MiB; "
            f"view with `python -m http.server --bind 127.0.0.1 --directory {result.out}`"
        )
    else:
        serve(args.container, port=args.port, open_browser=args.open, verbose=args.verbose)
