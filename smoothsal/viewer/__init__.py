"""`smoothsal view`: look at a heatmap container (tissue pyramid + saliency pyramids) in a browser.

A small local web server (`server`) reads only the tiles of the visible region at the pyramid level that
fits the screen (never a whole level), so a Camelyon16-size slide opens at once. The page (``static/``,
hand-written, no third-party code, nothing loaded from the internet) pans and zooms two synchronised
panels in µm and colours the raw float32 heatmap tiles itself, so colour map, opacity and range changes
need no refetch. `export` writes the same page with a manifest and pre-cut tiles for a plain static web
server. napari lives in `smoothsal.napari`.

URL scheme (the same for the server and the static export, relative to the page; `page`):
``manifest.json``, ``grid.json`` (tile grid), ``annotations.json``,
``tiles/{image}/{level}/{row}/{col}.jpg`` (tissue, RGB JPEG) and ``.f32`` (heatmap, little-endian
float32, row-major, the tile's own height × width; an empty tile is absent: 204 from the server, 404
from a static server). The page appends ``?v={manifest version}`` to tile URLs (ignored by servers),
so a browser never shows cached tiles of an earlier container.
"""

from .export import ExportSummary, export
from .page import COLORMAPS, TILE_SIZE, Page
from .server import HOST, make_server, serve

__all__ = ["COLORMAPS", "HOST", "TILE_SIZE", "ExportSummary", "Page", "export", "make_server", "serve"]
