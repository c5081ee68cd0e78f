"""`smoothsal view`: the local server, its path confinement, the static export and the page in a real
headless Chromium (Selenium): layer/method switches, pan and zoom, checked on screenshot pixels.

The test container is written with ome-zarr-py (NGFF 0.4, Zarr v2) as `smoothsal heatmaps` writes it.
Its tissue has three coloured disks; each layer's heatmaps peak on one of them (layer1 on the blue disk,
layer2 on the green, layer3 on the purple one), at a different pixel size per layer, so a bright spot
sitting on its disk in the screenshot shows that map and tissue are aligned.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import zarr
from ngff import assert_valid_ngff
from ome_zarr.format import FormatV04
from ome_zarr.writer import write_multiscales_metadata
from PIL import Image
from skimage.transform import downscale_local_mean

from smoothsal import viewer
from smoothsal.container import write_series
from smoothsal.errors import BadOutput, BadStore

SLIDE_MPP = 0.5
SLIDE_PX = (4096, 3072)  # level-0 W, H → 2048 × 1536 µm
EXTENT = (SLIDE_PX[0] * SLIDE_MPP, SLIDE_PX[1] * SLIDE_MPP)
TISSUE_MPP = 2.0
DISK_UM = 90.0
BACKGROUND = (236, 198, 214)
# layer → (disk centre in µm, disk colour, heatmap pixel size in µm)
FEATURES = {
    "layer1": ((512.0, 512.0), (40, 60, 205), 2.0),
    "layer2": ((1280.0, 512.0), (35, 165, 55), 16.0),
    "layer3": ((1024.0, 1120.0), (150, 40, 160), 32.0),
}
SIGMA = {"original": 40.0, "surrogate": 80.0}  # µm: the surrogate's bump is wider
NAN_FROM_X = 1536.0  # µm: no tiles right of this (NaN: transparent; whole empty tiles in layer1)


def _pyramid(level0: np.ndarray, factors: tuple[int, ...]) -> list[np.ndarray]:
    """×2 levels until the longest side is < 512 px (as `smoothsal heatmaps` writes)."""
    levels = [level0]
    while max(levels[-1].shape[-2:]) >= 512:
        levels.append(downscale_local_mean(levels[-1], factors).astype(level0.dtype))
    return levels


def datasets(um: float, n: int, lead: int) -> list[dict]:
    """NGFF datasets of an ×2 pyramid: µm scale and the half-pixel translation (NGFF places pixel centres)."""
    return [
        {
            "path": str(k),
            "coordinateTransformations": [
                {"type": "scale", "scale": [*[1.0] * lead, um * 2**k, um * 2**k]},
                {"type": "translation", "translation": [*[0.0] * lead, um * 2**k / 2, um * 2**k / 2]},
            ],
        }
        for k in range(n)
    ]


def _omero(levels: list[np.ndarray], name: str) -> dict:
    """omero rendering settings as `smoothsal heatmaps` writes them: RGB tissue; a map grey, window p1–p99."""
    if levels[0].dtype == np.uint8:
        return {"channels": [{"label": c, "color": colour, "active": True,
                              "window": {"min": 0, "max": 255, "start": 0, "end": 255}}
                             for c, colour in (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))],
                "rdefs": {"model": "color"}}  # fmt: skip
    finite = levels[-1][np.isfinite(levels[-1])]
    lo, hi = np.percentile(finite, [1, 99]).tolist()
    window = {"min": float(finite.min()), "max": float(finite.max()), "start": lo, "end": hi}
    return {"channels": [{"label": name, "color": "FFFFFF", "active": True, "window": window}],
            "rdefs": {"model": "greyscale"}}  # fmt: skip


def _write_image(group: zarr.Group, levels: list[np.ndarray], um: float, axes: list[dict]) -> None:
    """Levels as NGFF 0.4 arrays ('/' chunk keys, 512 px chunks, NaN fill for maps) + ome-zarr-py metadata."""
    lead = levels[0].ndim - 2
    fill = 255 if levels[0].dtype == np.uint8 else np.nan
    for k, data in enumerate(levels):
        group.create_array(str(k), data=data, chunks=(*data.shape[:lead], 512, 512), fill_value=fill,
                           chunk_key_encoding={"name": "v2", "separator": "/"})  # fmt: skip
    name = group.path
    write_multiscales_metadata(group, datasets(um, len(levels), lead), fmt=FormatV04(), axes=axes, name=name,
                               metadata={"omero": _omero(levels, name)})  # fmt: skip


def tissue_image() -> np.ndarray:
    """RGB (c, y, x) at TISSUE_MPP: pink background, one disk per layer feature."""
    h, w = int(EXTENT[1] / TISSUE_MPP), int(EXTENT[0] / TISSUE_MPP)
    yy, xx = np.mgrid[0:h, 0:w]
    yy, xx = (yy + 0.5) * TISSUE_MPP, (xx + 0.5) * TISSUE_MPP
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = BACKGROUND
    for (cx, cy), colour, _ in FEATURES.values():
        rgb[(xx - cx) ** 2 + (yy - cy) ** 2 <= DISK_UM**2] = colour
    return rgb.transpose(2, 0, 1).copy()


def heatmap(method: str, attribution: str, layer: str) -> np.ndarray:
    (cx, cy), _, um = FEATURES[layer]
    h, w = round(EXTENT[1] / um), round(EXTENT[0] / um)
    yy, xx = np.mgrid[0:h, 0:w]
    yy, xx = (yy + 0.5) * um, (xx + 0.5) * um
    bump = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * SIGMA[method] ** 2))
    values = bump + 0.002 * xx / EXTENT[0]
    if attribution == "deeplift":
        values = 3.0 * values - 0.5
    values[xx >= NAN_FROM_X] = np.nan
    return values.astype(np.float32)


def write_container(
    path: Path, methods=("original", "surrogate"), attributions=("gradient", "deeplift"), series: bool = True
) -> Path:
    """A small heatmap container laid out as the contract (and `smoothsal heatmaps`) describes: format 2
    (the images also listed as a bioformats2raw-layout collection, `container.write_series`), or with
    ``series=False`` format 1 (as `smoothsal heatmaps` wrote before: no ``OME/``)."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    space = [{"name": a, "type": "space", "unit": "micrometer"} for a in ("y", "x")]
    tissue = tissue_image()
    _write_image(root.create_group("tissue"), _pyramid(tissue, (1, 2, 2)), TISSUE_MPP, [
        {"name": "c", "type": "channel"}, *space])  # fmt: skip
    images = [{"path": "tissue", "kind": "tissue"}]
    for method in methods:
        for attribution in attributions:
            for layer, (_, _, um) in FEATURES.items():
                sub = f"heatmaps/{method}/{attribution}/{layer}"
                _write_image(
                    root.create_group(sub), _pyramid(heatmap(method, attribution, layer), (2, 2)), um, space
                )
                root[sub].attrs.update({"method": method, "attribution": attribution, "layer": layer})
                images.append({"path": sub, "kind": "heatmap", "method": method, "attribution": attribution,
                               "layer": layer})  # fmt: skip
    step = 512  # level-0 px: a 256 µm tile grid
    boxes = [[x, y, step, step] for y in range(0, SLIDE_PX[1], step) for x in range(0, SLIDE_PX[0], step)]
    root.create_array("tiles", data=np.asarray(boxes, dtype=np.int64))
    (ax, ay), _, _ = FEATURES["layer1"]
    half = 150.0  # µm: a square annotation around the layer1 disk
    square = [[ax - half, ay - half], [ax + half, ay - half], [ax + half, ay + half], [ax - half, ay + half]]
    root.attrs["smoothsal"] = {
        "version": "test",
        "slide_id": "synthetic",
        "slide_path": "synthetic.tif",
        "slide_mpp": SLIDE_MPP,
        "slide_size_px": list(SLIDE_PX),
        "settings": {},
        "images": images,
        "tiles": "tiles",
        "annotations": [
            {"class": 1, "name": "Tumor", "vertices": [[x / SLIDE_MPP, y / SLIDE_MPP] for x, y in square]}
        ],
    }
    if series:
        write_series(root, [image["path"] for image in images], "smoothsal tests")
    assert_valid_ngff(path)
    return path


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_container(tmp_path_factory.mktemp("view") / "synthetic.ome.zarr")


@contextlib.contextmanager
def running(server: ThreadingHTTPServer) -> Iterator[str]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{viewer.HOST}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def http_server(directory: Path) -> Iterator[str]:
    """Python's plain static server (`python -m http.server`) on a free local port."""
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(directory)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"port (\d+)", line).group(1))
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Debian Chromium through Selenium (no download: the system chromium and chromedriver)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("chromium and chromedriver are needed: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1000,800", "--force-device-scale-factor=1", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(arg)
    d = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield d
    finally:
        d.quit()


# --- screenshot analysis ---------------------------------------------------------------------------------


def wait_ready(driver, after: int = 0, timeout: float = 30.0) -> None:
    """Until the page has rendered more than `after` frames and has no tile or frame outstanding."""
    deadline = time.monotonic() + timeout
    script = "return !!window.smoothsal && smoothsal.renders() > arguments[0] && smoothsal.pending() === 0"
    while not driver.execute_script(script, after):
        if time.monotonic() > deadline:
            pytest.fail(f"viewer not ready after {timeout} s: {driver.find_element('id', 'status').text}")
        time.sleep(0.05)


def act(driver, action) -> None:
    """Run a UI action and wait until the page has redrawn and loaded what it needs."""
    before = driver.execute_script("return smoothsal.renders()")
    action()
    wait_ready(driver, before)


def canvas_rgb(driver, panel: int) -> np.ndarray:
    canvas = driver.find_element("css selector", f"#panel{panel} canvas.view")
    return np.asarray(Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("RGB")).astype(int)


def blob(mask: np.ndarray) -> tuple[np.ndarray, float]:
    """Centroid (x, y) in px and area of a pixel mask."""
    ys, xs = np.nonzero(mask)
    assert xs.size > 20, "feature not found in the screenshot"
    return np.array([xs.mean(), ys.mean()]), float(xs.size)


def disk(rgb: np.ndarray, layer: str) -> tuple[np.ndarray, float]:
    """The tissue disk of `layer` (screenshot at opacity 0): pixels near its colour."""
    colour = np.array(FEATURES[layer][1])
    return blob(np.abs(rgb - colour).max(axis=2) < 30)


def spot(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """The heatmap's bright spot (grey colour map, opacity 1): bright grey pixels."""
    return blob((rgb.min(axis=2) > 190) & (np.ptp(rgb, axis=2) < 14))


def ring(rgb: np.ndarray, centre: np.ndarray, radius: float) -> float:
    """Mean grey level on a circle around `centre` (how far a map's bump reaches)."""
    angles = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    xs = np.round(centre[0] + radius * np.cos(angles)).astype(int)
    ys = np.round(centre[1] + radius * np.sin(angles)).astype(int)
    return float(rgb[ys, xs].mean())


def expected_px(driver, panel: int, um: tuple[float, float]) -> np.ndarray:
    """Where a point in µm should be in a panel's screenshot, from the page's view (centre, µm/px)."""
    v = driver.execute_script("return smoothsal.view()")
    canvas = driver.find_element("css selector", f"#panel{panel} canvas.view")
    w, h = canvas.size["width"], canvas.size["height"]
    return np.array([w / 2 + (um[0] - v["cx"]) / v["upp"], h / 2 + (um[1] - v["cy"]) / v["upp"]])


def set_opacity(driver, value: str) -> None:
    from selenium.webdriver.common.keys import Keys

    slider = driver.find_element("id", "opacity")
    act(driver, lambda: slider.send_keys(Keys.HOME if value == "min" else Keys.END))


def select(driver, css: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    act(driver, lambda: Select(driver.find_element("css selector", css)).select_by_value(value))


def check_aligned(driver, layers: dict[int, str]) -> dict[int, dict[str, object]]:
    """Per panel: its layer's tissue disk sits where the view puts it, and the heatmap's bright spot on it."""
    set_opacity(driver, "min")
    tissue = {p: canvas_rgb(driver, p) for p in layers}
    set_opacity(driver, "max")
    maps = {p: canvas_rgb(driver, p) for p in layers}
    out = {}
    for p, layer in layers.items():
        centre, area = disk(tissue[p], layer)
        where = expected_px(driver, p, FEATURES[layer][0])
        upp = driver.execute_script("return smoothsal.view().upp")
        assert np.abs(centre - where).max() < 2.0, (p, layer, centre, where)
        assert abs(area - np.pi * (DISK_UM / upp) ** 2) < 0.1 * area, (p, layer, area)
        bright, bright_area = spot(maps[p])
        assert np.abs(bright - centre).max() < 2.5, (p, layer, bright, centre)
        out[p] = {
            "disk": centre,
            "spot": bright,
            "spot_area": bright_area,
            "ring": ring(maps[p], centre, 150 / upp),
        }
    return out


def check_page(driver, url: str) -> dict[str, object]:
    """The whole browser scenario; returns numbers for the report."""
    driver.get(url)
    wait_ready(driver)
    assert driver.execute_script("return smoothsal.panels().map(p => p.method)") == ["original", "surrogate"]
    fetched = "return performance.getEntriesByType('resource').length"
    before = driver.execute_script(fetched)
    select(driver, "#colormap", "gray")

    # 1. both panels on layer1: the spot sits on the blue disk; the surrogate's map is wider
    first = check_aligned(driver, {0: "layer1", 1: "layer1"})
    assert driver.execute_script(fetched) == before  # colour map and opacity changes fetch nothing
    assert first[1]["ring"] > first[0]["ring"] + 30  # 150 µm out, the surrogate's map is still bright

    # tile grid and annotations: drawn where the grid / the annotation square lie
    before = canvas_rgb(driver, 0)
    act(driver, lambda: driver.find_element("id", "grid").click())
    with_grid = canvas_rgb(driver, 0)
    gx = round(expected_px(driver, 0, (768.0, 0.0))[0])  # a grid line at 768 µm (3 × 256)
    y0, y1 = (round(expected_px(driver, 0, (0.0, y))[1]) for y in (0.0, EXTENT[1]))
    line = np.abs(with_grid[y0 + 2 : y1 - 2, gx - 1 : gx + 2] - before[y0 + 2 : y1 - 2, gx - 1 : gx + 2])
    assert (line.max(axis=2).max(axis=1) > 20).mean() > 0.95  # the line is drawn along the whole slide
    (cx0, cy0), (cx1, cy1) = (
        expected_px(driver, 0, um).round().astype(int) for um in ((768, 256), (1024, 512))
    )
    assert np.array_equal(
        with_grid[cy0 + 3 : cy1 - 2, cx0 + 3 : cx1 - 2], before[cy0 + 3 : cy1 - 2, cx0 + 3 : cx1 - 2]
    )
    act(driver, lambda: driver.find_element("id", "grid").click())
    act(driver, lambda: driver.find_element("id", "annotations").click())
    with_ann = canvas_rgb(driver, 0)
    (ax, ay), _, _ = FEATURES["layer1"]
    top = expected_px(driver, 0, (ax, ay - 150.0)).round().astype(int)  # the square's top edge, middle
    patch = with_ann[top[1] - 2 : top[1] + 3, top[0] - 3 : top[0] + 4]
    assert (np.abs(patch - [0, 229, 255]).max(axis=2) < 40).any(), patch  # class 1 colour, cyan
    act(driver, lambda: driver.find_element("id", "annotations").click())

    # 2. switch layer (panel 0 → layer2, on the green disk) and method / attribution / layer (panel 1)
    select(driver, "#panel0 .layer", "layer2")
    select(driver, "#panel1 .method", "original")
    select(driver, "#panel1 .attribution", "deeplift")
    select(driver, "#panel1 .layer", "layer3")
    second = check_aligned(driver, {0: "layer2", 1: "layer3"})
    assert np.abs(second[0]["spot"] - first[0]["spot"]).max() > 50  # the map changed with the layer
    select(driver, "#panel0 .method", "surrogate")
    third = check_aligned(driver, {0: "layer2", 1: "layer3"})
    assert third[0]["ring"] > second[0]["ring"] + 30  # … and with the method
    levels_fit = driver.execute_script("return smoothsal.panels().map(p => p.levels)")

    # 3. pan: drag panel 0; both panels move together, maps stay on their disks
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

    canvas0 = driver.find_element("css selector", "#panel0 canvas.view")
    canvas1 = driver.find_element("css selector", "#panel1 canvas.view")
    dx, dy = -90, -30
    act(driver, lambda: ActionChains(driver).move_to_element(canvas0).click_and_hold().move_by_offset(dx, dy)
        .release().perform())  # fmt: skip
    panned = check_aligned(driver, {0: "layer2", 1: "layer3"})
    for p in (0, 1):
        assert np.abs(panned[p]["disk"] - third[p]["disk"] - [dx, dy]).max() < 1.5

    # 4. zoom: wheel over panel 1 at the point between the green and the dark disk
    mid_um = (1152.0, 816.0)
    upp0 = driver.execute_script("return smoothsal.view().upp")
    at = expected_px(driver, 1, mid_um) - [canvas1.size["width"] / 2, canvas1.size["height"] / 2]
    origin = ScrollOrigin.from_element(canvas1, int(at[0]), int(at[1]))
    for _ in range(2):
        act(driver, lambda: ActionChains(driver).scroll_from_origin(origin, 0, -250).perform())
    upp1 = driver.execute_script("return smoothsal.view().upp")
    assert upp1 < upp0 / 1.8
    zoomed = check_aligned(driver, {0: "layer2", 1: "layer3"})
    levels_zoom = driver.execute_script("return smoothsal.panels().map(p => p.levels)")
    assert levels_zoom[0]["tissue"] < levels_fit[0]["tissue"]  # a finer tissue level once zoomed in
    centre = np.array([canvas1.size["width"] / 2, canvas1.size["height"] / 2])
    assert (
        np.abs(expected_px(driver, 1, mid_um) - centre - at).max() < 1.5
    )  # the point under the cursor stays
    return {"upp": (upp0, upp1), "levels": (levels_fit, levels_zoom), "spots": {
        "layer1": first, "layer2/3": second, "zoomed": zoomed}}  # fmt: skip


# --- tests -------------------------------------------------------------------------------------------------


def test_browser_on_the_server(container: Path, browser: object) -> None:
    with running(viewer.make_server(container, port=0)) as url:
        check_page(browser, url)


def test_browser_on_a_static_export(container: Path, browser: object, tmp_path: Path) -> None:
    summary = viewer.export(container, tmp_path / "site", progress=False)
    assert {"index.html", "viewer.js", "viewer.css", "manifest.json", "tiles"} <= {
        p.name for p in summary.out.iterdir()
    }
    with http_server(summary.out) as url:
        check_page(browser, url)


def raw_get(port: int, target: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """One request with the target sent byte for byte (no client-side normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", f"{host}:{port}")
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


TRAVERSALS = (
    "/../../../../../../etc/passwd",
    "/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/%2E%2E%2F%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "/tiles/0/0/0/..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/tiles/0/0/../../../../tissue/.zattrs",
    "/index.html/../../viewer.py",
    "/./viewer.py",
    "//etc/passwd",
    "/etc/passwd",
    "/%252e%252e/%252e%252e/etc/passwd",
    "/tissue/.zattrs",
    "/tissue/0/0/0/0",
    "/tiles",
    "/viewer_static/index.html",
    "/static/index.html",
    "/smoothsal/viewer.py",
    "/smoothsal/viewer/server.py",
    "http://127.0.0.1/../../etc/passwd",
)


def test_cli_serves_on_localhost_only_and_refuses_traversal(cli, container: Path) -> None:
    proc = cli.popen("view", container, "--port", "0")
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", line).group(1))
        # bound to the loopback address only (the kernel's listening sockets), not reachable elsewhere
        listening = [
            row.split()[1]
            for name in ("/proc/net/tcp", "/proc/net/tcp6")
            if os.path.exists(name)
            for row in Path(name).read_text().splitlines()[1:]
            if row.split()[3] == "0A" and row.split()[1].endswith(f":{port:04X}")
        ]
        assert listening == [f"0100007F:{port:04X}"], listening
        for address in subprocess.run(
            ["hostname", "-I"], check=False, capture_output=True, text=True
        ).stdout.split():
            if ":" not in address:
                with pytest.raises(OSError):
                    http.client.HTTPConnection(address, port, timeout=3).connect()
        # what it serves: the page, the manifest and tiles
        assert raw_get(port, "/") == (
            200,
            (Path(viewer.__file__).parent / "static/index.html").read_bytes(),
        )
        assert raw_get(port, "/manifest.json")[0] == 200
        assert raw_get(port, "/tiles/0/0/0/0.jpg")[0] == 200
        assert raw_get(port, "/tiles/1/0/0/0.f32")[0] == 200
        assert raw_get(port, "/tiles/0/0/99/0.jpg")[0] == 404
        # and nothing else
        for target in TRAVERSALS:
            status, body = raw_get(port, target)
            assert status in (403, 404), (target, status)
            assert b"root:" not in body and b"multiscales" not in body and b"import" not in body, target
        assert raw_get(port, "/index.html", host="evil.example")[0] == 403  # DNS rebinding
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the server stops and the command exits 0
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler (PYTHONFAULTHANDLER): every thread's stack
            code = f"still running 60 s after SIGINT; stderr: {proc.communicate(timeout=30)[1][-6000:]}"
        assert code == 0, code


def test_symlinks_out_of_the_store_are_refused(container: Path, tmp_path: Path) -> None:
    store = tmp_path / "linked.ome.zarr"
    shutil.copytree(container, store)
    outside = tmp_path / "outside"
    outside.mkdir()
    chunk = store / "heatmaps/original/gradient/layer2/0/0/0"
    shutil.move(chunk, outside / "chunk")
    chunk.symlink_to(outside / "chunk")  # a chunk whose real file lies outside the store
    image = next(
        i for i, e in enumerate(viewer.Page(store).images) if e.path.endswith("original/gradient/layer2")
    )
    with running(viewer.make_server(store, port=0)) as url:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        assert raw_get(port, f"/tiles/{image}/0/0/0.f32")[0] == 403
        assert raw_get(port, f"/tiles/{image - 1}/0/0/0.f32")[0] == 200
    # inside the store, a symlink is fine
    chunk.unlink()
    shutil.move(outside / "chunk", store / "chunk-copy")
    chunk.symlink_to(store / "chunk-copy")
    assert viewer.Page(store).tile_bytes(image, 0, 0, 0) is not None
    # a whole image linked from outside: refused when opening
    level = store / "heatmaps/original/gradient/layer3/0"
    shutil.move(level, outside / "0")
    level.symlink_to(outside / "0")
    with pytest.raises(BadStore, match="leaves the store"):
        viewer.Page(store)


def test_whole_slide_container_opens_without_reading_whole_levels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 100k × 50k px tissue level and a 50k × 25k float map (15 + 5 GB if read): opening, the manifest
    and two level-0 tiles read a handful of chunks (every read of the real store is counted)."""
    from zarr.storage import LocalStore

    reads: list[str] = []
    real_get = LocalStore.get

    async def counting_get(self, key, *args, **kwargs):
        reads.append(key)
        return await real_get(self, key, *args, **kwargs)

    root = zarr.open_group(str(tmp_path / "big.ome.zarr"), mode="w", zarr_format=2)
    space = [{"name": a, "type": "space", "unit": "micrometer"} for a in ("y", "x")]
    images = []
    for path, shape, um, axes in (
        ("tissue", (3, 50_000, 100_000), 0.5, [{"name": "c", "type": "channel"}, *space]),
        ("heatmaps/original/gradient/layer1", (25_000, 50_000), 1.0, space),
    ):
        group = root.create_group(path)
        level, k = shape, 0
        while True:
            dtype, fill = ("uint8", 255) if len(shape) == 3 else ("float32", float("nan"))
            group.create_array(str(k), shape=level, chunks=(*level[:-2], 512, 512), dtype=dtype, fill_value=fill,
                               chunk_key_encoding={"name": "v2", "separator": "/"})  # fmt: skip
            if max(level[-2:]) < 512:
                break
            level, k = (*level[:-2], -(-level[-2] // 2), -(-level[-1] // 2)), k + 1
        write_multiscales_metadata(group, datasets(um, k + 1, len(shape) - 2), fmt=FormatV04(), axes=axes)
        images.append({"path": path, "kind": "tissue" if len(shape) == 3 else "heatmap", "method": "original",
                       "attribution": "gradient", "layer": "layer1"})  # fmt: skip
    root["tissue/0"][:, 512:1024, 1024:1536] = 7  # one real chunk at level 0
    root["heatmaps/original/gradient/layer1/0"][100:200, 300:400] = 2.5
    assert_valid_ngff(tmp_path / "big.ome.zarr")
    last = root["heatmaps/original/gradient/layer1"]
    coarsest = str(len(last.attrs["multiscales"][0]["datasets"]) - 1)
    last[coarsest][:4, :4] = [[1, 2, 3, 4]] * 4
    root.attrs["smoothsal"] = {
        "slide_id": "big",
        "slide_mpp": 0.25,
        "slide_size_px": [200_000, 100_000],
        "images": images,
    }

    monkeypatch.setattr(LocalStore, "get", counting_get)
    c = viewer.Page(tmp_path / "big.ome.zarr")
    manifest = c.manifest()
    jpeg = c.tile_bytes(0, 0, 2, 4)  # rows 512..768, cols 1024..1280 px at level 0
    values = np.frombuffer(c.tile_bytes(1, 0, 0, 1), "<f4").reshape(256, 256)  # cols 256..512
    chunks = [k for k in reads if not k.rsplit("/", 1)[-1].startswith((".z", "zarr.json"))]
    # the coarsest heatmap level (the quantiles) and one chunk per tile; a whole level is 20,000 chunks
    assert 2 <= len(chunks) <= 6, chunks
    assert manifest["slide"]["extent_um"] == [50_000.0, 25_000.0]
    assert manifest["images"][0]["levels"][0]["shape"] == [50_000, 100_000]
    assert manifest["images"][0]["levels"][0]["origin"] == [0.0, 0.0]
    assert manifest["images"][1]["quantiles"][0] == 1.0 and manifest["images"][1]["quantiles"][-1] == 4.0
    assert np.abs(np.asarray(Image.open(io.BytesIO(jpeg)), dtype=int) - 7).max() <= 2
    assert np.all(values[100:200, 44:144] == 2.5) and np.isnan(values[:100]).all()
    assert c.tile_bytes(1, 0, 40, 40) is None  # never written: an empty tile, no content


def test_a_format_1_container_serves_the_same_page(container: Path, tmp_path: Path) -> None:
    """A container as `smoothsal heatmaps` wrote it before the image list (format 1: no OME/) gives the
    viewer the same manifest, tiles and grid as the same container in format 2, and exports."""
    old = write_container(tmp_path / "format1.ome.zarr", series=False)
    assert (container / "OME").is_dir() and not (old / "OME").exists()
    now, before = viewer.Page(container), viewer.Page(old)
    assert {k: v for k, v in before.manifest().items() if k != "version"} == {
        k: v for k, v in now.manifest().items() if k != "version"
    }
    keys = [(i, 0, 0, 0) for i in range(len(now.images))] + [(0, 0, 1, 1), (1, 0, 2, 1)]
    assert all(before.tile_bytes(*k) == now.tile_bytes(*k) for k in keys)
    assert before.grid() == now.grid()
    summary = viewer.export(old, tmp_path / "site", progress=False)
    assert summary.tiles > 0 and (tmp_path / "site" / "index.html").is_file()


def test_export_replaces_an_earlier_export_only(container: Path, tmp_path: Path) -> None:
    out = tmp_path / "site"
    first = viewer.export(container, out, progress=False)
    c = viewer.Page(container)
    keys = list(c.tile_keys())
    assert first.tiles == sum(c.tile_bytes(*k) is not None for k in keys) < len(keys)  # empty tiles left out
    jpg = out / "tiles/0/0/0/0.jpg"
    assert jpg.read_bytes() == c.tile_bytes(0, 0, 0, 0)
    (out / "stale").write_text(
        "x"
    )  # not written by the export: kept, and the export refused (issue 27 case 11)
    with pytest.raises(
        BadOutput, match=r"site holds 1 entry that `smoothsal view --export` did not write \(stale\)"
    ):
        viewer.export(container, out, progress=False)
    assert (out / "stale").read_text() == "x"
    (out / "stale").unlink()
    viewer.export(container, out, progress=False)
    assert jpg.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(BadOutput, match="`smoothsal view --export` replaces only a viewer-export"):
        viewer.export(container, other, progress=False)
    assert (other / "notes.txt").read_text() == "mine"


def test_bad_containers_fail_with_one_line(cli, tmp_path: Path) -> None:
    err = cli("view", tmp_path / "missing.ome.zarr", "--port", "0", expect=1).err
    assert "missing.ome.zarr: heatmap container not found (not a directory)" in err and err.count("\n") == 1
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=2)
    err = cli("view", tmp_path / "plain.zarr", "--export", tmp_path / "x", expect=1).err
    assert "smoothsal heatmaps" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_browser_on_a_real_container(cli, browser: object, slides_dir: Path, tmp_path: Path) -> None:
    """Real tiles of a real slide → `smoothsal saliency` → `smoothsal heatmaps` → the page: the heatmap is
    drawn exactly over the tile boxes of the tile table and nowhere else."""
    slide, out = slides_dir / "CMU-1-Small-Region.svs", tmp_path
    cli("tiles", slide, "--tile-size", "64", "--max-tiles", "10", "--out", out / "t.parquet")
    cli("saliency", slide, "--tiles", out / "t.parquet", "--arch", "resnet18", "--num-classes", "2",
        "--method", "original", "--layers", "layer1", "layer2", "--attributions", "gradient",
        "--smoothgrad-samples", "0", "--workers", "0", "--batch-size", "10", "--table", out / "original.parquet",
        "--no-progress", "--out", out / "original.zarr")  # fmt: skip
    cli("heatmaps", slide, "--saliency", out / "original.zarr", "--tiles", out / "t.parquet", "--no-progress",
        "--out", out / "cmu.ome.zarr")  # fmt: skip
    assert_valid_ngff(out / "cmu.ome.zarr")
    boxes = np.asarray(zarr.open_group(str(out / "cmu.ome.zarr"), mode="r")["tiles"][...])
    mpp = 0.499
    with running(viewer.make_server(out / "cmu.ome.zarr", port=0)) as url:
        browser.get(url)
        wait_ready(browser)
        for layer in ("layer2", "layer1"):  # (layer1 is shown first: select layer2 first, for a change)
            select(browser, "#panel0 .layer", layer)
            set_opacity(browser, "min")
            tissue = canvas_rgb(browser, 0)
            set_opacity(browser, "max")
            drawn = np.abs(canvas_rgb(browser, 0) - tissue).max(axis=2) > 6
            inside = np.zeros(drawn.shape, bool)
            near = np.zeros(drawn.shape, bool)  # within 2 px of a box edge: left out of the comparison
            for x, y, w, h in boxes:
                x0, y0 = expected_px(browser, 0, (x * mpp, y * mpp))
                x1, y1 = expected_px(browser, 0, ((x + w) * mpp, (y + h) * mpp))
                inside[round(y0) : round(y1), round(x0) : round(x1)] = True
                near[max(0, round(y0) - 2) : round(y1) + 2, max(0, round(x0) - 2) : round(x1) + 2] = True
                near[round(y0) + 2 : round(y1) - 2, round(x0) + 2 : round(x1) - 2] = False
            assert drawn[inside & ~near].mean() > 0.95, layer
            assert drawn[~inside & ~near].mean() < 0.002, layer


def test_case_17_view_stops_on_sigterm_listens_with_a_deep_backlog_and_serves_tiles_in_parallel(
    cli, container: Path
) -> None:
    """Started as `smoothsal view C &` from a script starts it (SIGINT ignored); `kill` (SIGTERM) must stop
    it cleanly. The kernel's listen queue (ss: Send-Q of a listening socket) is the server's backlog."""
    proc = subprocess.Popen(
        cli.command("view", container, "--port", "0"), env=cli.env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # noqa: PLW1509
    )  # fmt: skip
    try:
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", proc.stdout.readline()).group(1))
        listen = subprocess.run(
            ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
        )
        backlog = min(1024, int(Path("/proc/sys/net/core/somaxconn").read_text()))  # the kernel's cap
        assert [int(row.split()[2]) for row in listen.stdout.splitlines()] == [backlog], listen.stdout
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            statuses = list(pool.map(lambda _: raw_get(port, "/tiles/0/0/0/0.jpg")[0], range(64)))
        assert statuses == [200] * 64
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "still running 60 s after SIGTERM"
    assert code == 0, (code, proc.stderr.read()[-3000:])


def test_case_14_a_port_out_of_range_is_one_line(cli, container: Path) -> None:
    err = cli("view", container, "--port", "99999", expect=1).err.strip()
    assert err == "smoothsal view: error: --port must lie in 0…65535 (0: any free port), got 99999"


def test_a_container_deleted_or_replaced_under_the_viewer_is_said_so(
    container: Path, browser: object, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Issue 27 case 7: tiles of opened arrays answered 200 (stale) or 204 (drawn empty), grid.json an empty
    list and an unopened level a 60-line KeyError. Now every data request answers 410 with a line the page
    shows, and the server logs one line."""
    for change in ("replaced", "deleted"):
        store = tmp_path / change / "c.ome.zarr"
        shutil.copytree(container, store)
        page = viewer.Page(store)
        image = next(i for i, e in enumerate(page.images) if e.kind != "tissue")
        capsys.readouterr()
        with running(viewer.make_server(page, port=0)) as url:
            port = int(url.rsplit(":", 1)[1].strip("/"))
            browser.get(url)
            wait_ready(browser)
            assert raw_get(port, f"/tiles/{image}/0/0/0.f32")[0] == 200
            if change == "replaced":  # what `heatmaps` does: a new folder renamed over the old one
                shutil.copytree(container, store.with_name("new.ome.zarr"))
                shutil.rmtree(store)
                store.with_name("new.ome.zarr").rename(store)
            else:
                shutil.rmtree(store)
            last = len(page.images[image].levels) - 1
            for target in (f"/tiles/{image}/0/0/0.f32", f"/tiles/{image}/{last}/0/0.f32", "/grid.json"):
                status, body = raw_get(port, target)
                assert (status, body) == (410, viewer.server.GONE), (change, target, status, body)
            view = browser.execute_script("return smoothsal.view()")
            browser.execute_script("smoothsal.setView(arguments[0], arguments[1], arguments[2])",
                                   view["cx"] / 2, view["cy"] / 2, view["upp"] / 4)  # fmt: skip
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and "reload" not in browser.find_element("id", "status").text:
                time.sleep(0.2)
            assert browser.find_element("id", "status").text == viewer.server.GONE.decode().strip()
        logged = [line for line in capsys.readouterr().err.splitlines() if "changed or was removed" in line]
        assert logged == [f"smoothsal view: {store} changed or was removed; the page is told to reload"], (
            logged
        )
