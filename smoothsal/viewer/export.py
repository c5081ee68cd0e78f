"""The viewer as a static site: the page, its manifest and every non-empty tile pre-cut under one folder,
for any static web server (the same URL scheme as the local server)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadStore
from ..files import OutputKind, output_dir
from .page import Page
from .server import STATIC_DIR, STATIC_FILES, page_json

__all__ = ["KIND", "ExportSummary", "export"]

KIND = OutputKind(  # the output marker and the files an export holds
    "viewer-export",
    "smoothsal view --export",
    format=1,
    files=r"[^/]+\.(?:html|js|css|json)|tiles/(?:\d+/){3}\d+\.(?:jpg|f32)",
)


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    tiles: int  # tile files written (empty heatmap tiles are left out)
    bytes: int


def export(container: str | Path, out: str | Path, progress: bool = True) -> ExportSummary:
    """Write the page, manifest and every tile under ``out`` for a plain static web server.

    Written under a temporary sibling and renamed at the end; only an earlier export at ``out`` (one
    carrying the export marker, `files` module doc) or an empty folder is replaced, anything else refused.
    """
    from tqdm import tqdm

    c = Page(container)
    out = Path(out)
    with output_dir(out, KIND) as tmp:
        tmp.mkdir()
        for name in STATIC_FILES:
            shutil.copyfile(STATIC_DIR / name, tmp / name)
        (tmp / "manifest.json").write_bytes(page_json(c.manifest()))
        (tmp / "grid.json").write_bytes(page_json(c.grid()))
        (tmp / "annotations.json").write_bytes(page_json(c.annotations()))
        keys = list(c.tile_keys())
        written = size = 0
        for image, level, row, col in tqdm(
            keys, desc=f"export {c.container.path.name}", unit="tile", disable=not progress
        ):
            try:
                body = c.tile_bytes(image, level, row, col)
            except PermissionError as err:  # a chunk linked from outside the container: never exported
                raise BadStore(
                    f"{c.container.path}: {err}; copy the linked files into the container"
                ) from None
            if body is None:
                continue
            ext = "jpg" if c.images[image].kind == "tissue" else "f32"
            target = tmp / "tiles" / str(image) / str(level) / str(row) / f"{col}.{ext}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body)
            written, size = written + 1, size + len(body)
    return ExportSummary(out, written, size)
