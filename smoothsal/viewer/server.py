"""The viewer's local web server: 127.0.0.1 only, a fixed set of names and integer tile addresses (no
URL ever becomes a file path), the Host header checked (DNS rebinding)."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ..container import Container
from ..errors import BadOption
from .page import Page

__all__ = ["DEFAULT_PORT", "HOST", "STATIC_DIR", "STATIC_FILES", "make_server", "page_json", "serve"]

HOST = "127.0.0.1"  # the only address the server binds: nothing outside this machine can reach it
DEFAULT_PORT = 8765
STATIC_DIR = Path(__file__).with_name("static")
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "viewer.js": "text/javascript; charset=utf-8",
    "viewer.css": "text/css; charset=utf-8",
}
_TEXT = "text/plain; charset=utf-8"
GONE = b"the container changed or was removed; reload the page\n"  # what the page shows on a 410
_TILE_URL = re.compile(r"/tiles/(\d{1,4})/(\d{1,3})/(\d{1,7})/(\d{1,7})\.(jpg|f32)")


class _Handler(BaseHTTPRequestHandler):
    """Routes a fixed set of names and integer tile addresses; no URL ever becomes a file path."""

    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def do_GET(self) -> None:
        self._respond(head=False)

    def _respond(self, head: bool) -> None:
        status, body, ctype = self._route()
        status = int(status)
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", ctype)
        if status != HTTPStatus.NO_CONTENT:  # a 204 carries no Content-Length (RFC 9110)
            self.send_header("Content-Length", str(len(body or b"")))
        tile = self.path.startswith("/tiles/") and "?v=" in self.path
        self.send_header("Cache-Control", "max-age=86400" if tile and status == 200 else "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _route(self) -> tuple[int, bytes | None, str]:
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if host not in (HOST, "localhost"):  # DNS rebinding: a foreign site's name resolving to us
            return HTTPStatus.FORBIDDEN, b"forbidden host\n", _TEXT
        raw = self.path
        path = unquote(urlsplit(raw).path)
        if _forbidden(raw, path):
            return HTTPStatus.FORBIDDEN, b"forbidden path\n", _TEXT
        page = self.server.page
        name = path.lstrip("/") or "index.html"
        if name in STATIC_FILES:
            return HTTPStatus.OK, (STATIC_DIR / name).read_bytes(), STATIC_FILES[name]
        if self.server.gone():  # deleted or replaced since the page opened it: no stale or empty answer
            return HTTPStatus.GONE, GONE, _TEXT
        if name == "manifest.json":
            return HTTPStatus.OK, self.server.manifest_bytes, "application/json"
        if name == "grid.json":
            return HTTPStatus.OK, page_json(page.grid()), "application/json"
        if name == "annotations.json":
            return HTTPStatus.OK, page_json(page.annotations()), "application/json"
        try:
            return _tile(page, path)
        except (KeyError, OSError, ValueError):
            if self.server.gone():  # changed while this tile was read
                return HTTPStatus.GONE, GONE, _TEXT
            raise  # anything else is a bug: its traceback


def _forbidden(raw: str, path: str) -> bool:
    """A request target that is not a plain absolute path of names (no traversal, no odd characters)."""
    return (
        not raw.startswith("/")
        or raw.startswith("//")
        or path.startswith("//")
        or any(s in ("..", ".") for s in path.split("/"))
        or any(ch in path for ch in "\\\0")
        or ".." in unquote(raw)
    )


def _tile(page: Page, path: str) -> tuple[int, bytes | None, str]:
    """A tile address ``/tiles/{image}/{level}/{row}/{col}.{jpg|f32}``: its bytes, 204 if empty, else 404."""
    match = _TILE_URL.fullmatch(path)
    if not match:
        return HTTPStatus.NOT_FOUND, b"not found\n", _TEXT
    image, level, row, col = (int(g) for g in match.groups()[:4])
    if image >= len(page.images) or level >= len(page.images[image].levels):
        return HTTPStatus.NOT_FOUND, b"no such image or level\n", _TEXT
    info = page.images[image]
    if match.group(5) != ("jpg" if info.kind == "tissue" else "f32"):
        return HTTPStatus.NOT_FOUND, b"wrong tile format for this image\n", _TEXT
    try:
        body = page.tile_bytes(image, level, row, col)
    except IndexError:
        return HTTPStatus.NOT_FOUND, b"no such tile\n", _TEXT
    except PermissionError as err:
        return HTTPStatus.FORBIDDEN, f"{err}\n".encode(), _TEXT
    if body is None:
        return HTTPStatus.NO_CONTENT, None, _TEXT
    return HTTPStatus.OK, body, "image/jpeg" if info.kind == "tissue" else "application/octet-stream"


def _identity(path: Path) -> tuple[int, int] | None:
    """The container folder's (device, inode): `heatmaps` replaces a container by renaming a new folder
    over it, so a replaced container has another inode, a deleted one none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # one thread per connection, never waited for at exit
    request_queue_size = (
        1024  # listen backlog (the stdlib's 5 drops bursts of tile requests; the kernel caps it)
    )
    page: Page
    manifest_bytes: bytes
    verbose: bool
    identity: tuple[int, int] | None
    said_gone: bool = False

    def gone(self) -> bool:
        """Whether the container was deleted or replaced since the server opened it (logged once)."""
        path = self.page.container.path
        if _identity(path) == self.identity:
            return False
        if not self.said_gone:
            self.said_gone = True
            print(
                f"smoothsal view: {path} changed or was removed; the page is told to reload", file=sys.stderr
            )
        return True


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # leaves serve_forever in the main thread; the server is then closed


def page_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def make_server(container: str | Path | Container | Page, port: int = 0, verbose: bool = False) -> _Server:
    """A server for ``container`` bound to 127.0.0.1:``port`` (0: any free port); call ``serve_forever``."""
    if not 0 <= port <= 65535:
        raise BadOption(f"--port must lie in 0…65535 (0: any free port), got {port}")
    page = container if isinstance(container, Page) else Page(container)
    manifest = page_json(page.manifest())
    try:
        server = _Server((HOST, port), _Handler)
    except OSError as err:
        raise BadOption(
            f"cannot listen on {HOST}:{port} ({err.strerror}); pass another --port, or 0 for any"
        ) from None
    server.page, server.manifest_bytes, server.verbose = page, manifest, verbose
    server.identity = _identity(page.container.path)
    return server


def serve(
    container: str | Path, port: int = DEFAULT_PORT, open_browser: bool = False, verbose: bool = False
) -> None:
    """Serve the viewer until interrupted: Ctrl-C (SIGINT) or SIGTERM (what `kill` and service managers
    send; a server started with ``&`` from a script ignores SIGINT)."""
    server = make_server(container, port, verbose)
    signal.signal(signal.SIGTERM, _stop)
    url = f"http://{HOST}:{server.server_address[1]}/"
    print(f"serving {container} at {url} (local only; Ctrl-C to stop)", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
