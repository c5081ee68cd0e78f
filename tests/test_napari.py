"""The napari reader (smoothsal/napari.py + napari.yaml), in a real napari with PyQt6 under Xvfb.

The container is test_viewer's synthetic one: three coloured tissue disks, each layer's heatmaps peaking
on one of them at that layer's own pixel size (2, 16, 32 µm). napari runs in a child process (this file
run as a script) on an Xvfb display started here, so no Qt state or X connection outlives the test; the
child opens the container through napari's plugin machinery (`viewer.open(..., plugin="smoothsal")`),
takes `viewer.screenshot()` of the tissue alone and of each heatmap over it, and the parent checks that
every hot spot lands on its disk and every disk where napari's camera puts its µm position.

The same check runs with napari-ome-zarr alone (smoothsal's plugin disabled) on the container's root, a
multi-image OME-Zarr (format 2: bioformats2raw layout): it must find the tissue (one layer per channel) and
every map. napari-ome-zarr keeps only each image's scale, not the NGFF translation of pixel centres, so each
image sits half of its level-0 pixel up and left of where NGFF puts it; the check predicts that shift.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import zarr

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "smoothsal" / "napari.yaml"


def _napari() -> None:
    pytest.importorskip("napari", reason="napari is not installed: pip install -e '.[test]' (or '.[view]')")


# --- parent side ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_viewer import write_container

    return write_container(tmp_path_factory.mktemp("napari") / "synthetic.ome.zarr")


@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    """A private Xvfb display (`-displayfd` picks a free number)."""
    xvfb = shutil.which("Xvfb")
    if not xvfb:
        pytest.fail("Xvfb is needed for the napari test: apt-get install xvfb")
    read, write = os.pipe()
    proc = subprocess.Popen(
        [xvfb, "-displayfd", str(write), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
        pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(write)
    with os.fdopen(read) as f:
        number = f.readline().strip()
    if not number:
        proc.kill()
        pytest.fail("Xvfb did not start")
    try:
        yield f":{number}"
    finally:
        proc.terminate()
        proc.wait(10)


def screenshots(
    container: Path, display: str, out: Path, scale: float = 1.0, plugin: str = "smoothsal"
) -> tuple[dict, dict[str, np.ndarray]]:
    """Run the napari child; its layer summary and screenshots (name → RGB). ``scale`` ≠ 1 multiplies each
    heatmap layer's scale after the reader set it: a deliberately wrong scale, which the check must catch.
    ``plugin``: the reader napari opens the container with (smoothsal's, or napari-ome-zarr alone)."""
    _napari()
    env = dict(os.environ, DISPLAY=display, QT_QPA_PLATFORM="xcb", NAPARI_CONFIG=str(out / "napari.yaml"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))  # fmt: skip
    done = subprocess.run(
        [sys.executable, __file__, str(container), str(out), str(scale), plugin], env=env, capture_output=True,
        text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    with np.load(out / "shots.npz") as shots:
        return summary, {name: shots[name][..., :3].astype(int) for name in shots.files}


def _blob(mask: np.ndarray) -> tuple[np.ndarray, int]:
    ys, xs = np.nonzero(mask)
    assert xs.size > 20, "feature not found in the screenshot"
    return np.array([ys.mean(), xs.mean()]), int(xs.size)


def _screen(summary: dict, um: tuple[float, float], shape: tuple[int, ...]) -> np.ndarray:
    """Screenshot (row, col) of a world point (x, y) in µm, from napari's camera (centre, px per µm)."""
    cy, cx = summary["camera"]["center"][-2:]
    zoom = summary["camera"]["zoom"]
    return np.array([(um[1] - cy) * zoom + shape[0] / 2, (um[0] - cx) * zoom + shape[1] / 2]) - 0.5


def check_hot_spots(
    summary: dict, shots: dict[str, np.ndarray], names: list[str], drop_um: dict[str, float] | None = None,
    transparent_zero: bool = True,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Every tissue disk where napari's camera puts its µm position, every heatmap's hot spot on its disk
    (AssertionError otherwise); returns each hot spot's offset from its disk (screen px, (row, col)).

    ``drop_um``: how far up and left (µm, both axes) a reader puts each image ("tissue" and the map names)
    from where its NGFF metadata puts it; a hot spot must then be off its disk by the difference."""
    from test_viewer import DISK_UM, FEATURES

    drop_um = drop_um or {}
    tissue = shots["tissue"]
    zoom = summary["camera"]["zoom"]
    disks = {}
    for layer, ((x, y), colour, _) in FEATURES.items():
        disks[layer], area = _blob(np.abs(tissue - colour).max(axis=2) < 30)
        d = drop_um.get("tissue", 0.0)
        assert np.abs(disks[layer] - _screen(summary, (x - d, y - d), tissue.shape)).max() < 2.0, layer
        assert abs(area - np.pi * (DISK_UM * zoom) ** 2) < 0.1 * area, (layer, area)
    offsets = {}
    for name in names:
        layer = name.rsplit("/", 1)[1]
        shot = shots[name]
        top = np.asarray(summary.get("tops", {}).get(name, summary["top_colour"]))
        spot, area = _blob(np.abs(shot - top).max(axis=2) < 12)  # saturated: values >= the upper limit
        offsets[name] = spot - disks[layer]
        expected = -(drop_um.get(name, 0.0) - drop_um.get("tissue", 0.0)) * zoom
        assert np.abs(offsets[name] - expected).max() < 2.5, (name, spot, disks[layer], expected, offsets)
        assert np.hypot(*offsets[name]) < 0.5 * DISK_UM * zoom, (name, offsets[name])  # on its disk
        if transparent_zero and name.split("/")[1] == "gradient":  # ~0 elsewhere: other disks show through
            for other, ((x, y), colour, _) in FEATURES.items():
                if other != layer:
                    r, c = np.round(disks[other]).astype(int)
                    assert np.abs(shot[r - 3 : r + 4, c - 3 : c + 4] - colour).max() < 12, (name, other)
    return offsets


def heatmap_names(container: Path) -> list[str]:
    images = zarr.open_group(container, mode="r").attrs["smoothsal"]["images"]
    return [f"{i['method']}/{i['attribution']}/{i['layer']}" for i in images if i["kind"] == "heatmap"]


def test_napari_shows_every_heatmap_on_its_tissue_disk(container: Path, display: str, tmp_path: Path) -> None:
    summary, shots = screenshots(container, display, tmp_path)
    names = heatmap_names(container)
    assert [layer["name"] for layer in summary["layers"]] == ["tissue", *names]
    assert summary["layers"] == summary["open_viewer_layers"]  # `smoothsal view --napari`: the same layers
    assert summary["plugin"] == "smoothsal"
    offsets = check_hot_spots(summary, shots, names)
    print("hot spot offsets from their disks (screen px):", {k: v.round(2).tolist() for k, v in offsets.items()})  # fmt: skip


def test_napari_ome_zarr_alone_opens_the_root_with_every_map_on_its_disk(
    container: Path, display: str, tmp_path: Path
) -> None:
    """napari-ome-zarr, smoothsal's plugin disabled, on the container's root (format 2): the tissue (a layer
    per channel) and every map, each at its level-0 µm scale but without the NGFF pixel-centre translation;
    every hot spot on its disk, off it by just the half pixels napari-ome-zarr drops."""
    pytest.importorskip(
        "napari_ome_zarr", reason="napari-ome-zarr is not installed: pip install -e '.[test]'"
    )
    from smoothsal.container import open_container

    summary, shots = screenshots(container, display, tmp_path, plugin="napari-ome-zarr")
    assert summary["plugin"] == "napari-ome-zarr" and "smoothsal" not in summary["plugins"]
    names = heatmap_names(container)
    assert summary["keys"] == ["tissue"] * 3 + names
    assert [layer["name"] for layer in summary["layers"][:3]] == ["tissue: R", "tissue: G", "tissue: B"]
    c = open_container(container)
    images = {key: c.image("tissue" if key == "tissue" else f"heatmaps/{key}") for key in summary["keys"]}
    for layer, key in zip(summary["layers"], summary["keys"], strict=True):
        assert layer["scale"] == list(images[key].levels[0].scale), (key, layer)
        assert layer["translate"] == [0.0, 0.0] and layer["affine"] == np.eye(3).tolist(), (key, layer)
    drop = {key: image.levels[0].translation[0] for key, image in images.items()}  # half a level-0 pixel
    offsets = check_hot_spots(summary, shots, names, drop_um=drop, transparent_zero=False)
    zoom, mpp = summary["camera"]["zoom"], c.meta["slide_mpp"]
    for name, offset in offsets.items():  # measured (screen px → µm → slide level-0 px) vs NGFF's place
        um = offset / zoom
        print(f"napari-ome-zarr {name}: hot spot off its disk by (y, x) {um.round(2).tolist()} µm = "
              f"{(um / mpp).round(1).tolist()} slide level-0 px; dropped translations predict "
              f"{drop['tissue'] - drop[name]:.1f} µm")  # fmt: skip


def test_a_format_1_container_still_opens_in_the_plugin(display: str, tmp_path: Path) -> None:
    """A container as `smoothsal heatmaps` wrote it before the image list (format 1: no OME/, no layout
    attribute) opens through smoothsal's plugin as before, every hot spot on its disk."""
    from test_viewer import write_container

    old = write_container(tmp_path / "format1.ome.zarr", series=False)
    assert not (old / "OME").exists() and "bioformats2raw.layout" not in zarr.open_group(old, mode="r").attrs
    summary, shots = screenshots(old, display, tmp_path)
    names = heatmap_names(old)
    assert [layer["name"] for layer in summary["layers"]] == ["tissue", *names]
    assert summary["layers"] == summary["open_viewer_layers"]
    check_hot_spots(summary, shots, names)


def test_a_wrong_layer_scale_fails_the_check(container: Path, display: str, tmp_path: Path) -> None:
    """The same check on heatmaps whose scale is 10 % off (the tissue's right): the hot spots leave their
    disks, so the check above would catch a reader that got the scale wrong."""
    summary, shots = screenshots(container, display, tmp_path, scale=1.1)
    assert summary["layers"][1]["scale"] == pytest.approx(
        [1.1 * s for s in summary["open_viewer_layers"][1]["scale"]]
    )
    with pytest.raises(AssertionError) as caught:
        check_hot_spots(summary, shots, heatmap_names(container))
    print("with heatmap scale x1.1:", str(caught.value).splitlines()[0][:400])


def test_layer_scales_limits_and_colour_map(container: Path) -> None:
    _napari()
    from smoothsal import napari as sn
    from smoothsal.container import open_container

    layers = sn.layer_data(container)
    c = open_container(container)
    assert len(layers) == len(c.images)
    assert layers[0][1]["scale"] == (2.0, 2.0) and layers[0][1]["translate"] == (1.0, 1.0)  # pixel centres
    for (data, kwargs, kind), im in zip(layers, c.images, strict=True):
        data = data if kwargs["multiscale"] else [data]
        assert kind == "image" and kwargs["scale"] == im.levels[0].scale
        assert kwargs["translate"] == im.levels[0].translation
        assert [d.shape[:2] for d in data] == [lv.shape for lv in im.levels]
        if im.kind == "tissue":
            assert kwargs["rgb"] and data[0].shape[2] == 3
            continue
        coarsest = np.asarray(data[-1]).astype(np.float64)
        limit = np.percentile(np.abs(coarsest[np.isfinite(coarsest)]), 99)
        assert kwargs["contrast_limits"] == pytest.approx((-limit, limit))
        assert kwargs["blending"] == "translucent"
    assert [kw["visible"] for _, kw, _ in layers[1:]] == [True] + [False] * (len(layers) - 2)
    cmap = sn.colormap()
    rgba = cmap.map(np.array([0.0, 0.5, 1.0]))
    assert rgba[1, 3] == pytest.approx(0.0, abs=0.01)  # zero is transparent
    assert rgba[0, 3] == pytest.approx(1.0) and rgba[2, 3] == pytest.approx(1.0)
    assert rgba[0, 2] > rgba[0, 0] and rgba[2, 0] > rgba[2, 2]  # negative blue, positive red


def test_reader_claims_smoothsal_containers_only(container: Path, tmp_path: Path) -> None:
    from smoothsal import napari as sn

    assert callable(sn.get_reader(str(container))) and callable(sn.get_reader([str(container)]))
    plain = tmp_path / "plain.zarr"
    zarr.open_group(plain, mode="w", zarr_format=2).attrs["other"] = {"images": []}
    (tmp_path / "file.zarr").write_text("not a store")
    for path in (
        plain,  # a zarr group without smoothsal metadata
        container / "tissue",  # a plain OME-Zarr image: napari-ome-zarr's
        tmp_path / "missing.zarr",
        tmp_path / "file.zarr",
    ):
        assert sn.get_reader(str(path)) is None, path
    assert sn.get_reader([str(container), str(container)]) is None


def test_view_napari_without_napari_says_how_to_install(container: Path) -> None:
    code = (
        "import sys; sys.modules['napari'] = None; from smoothsal.cli import main; "
        f"sys.exit(main(['view', {str(container)!r}, '--napari']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    assert done.returncode == 1, done.stderr
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "napari is not installed" in err and "smoothsal[view]" in err, err


def test_manifest_and_entry_point() -> None:
    npe2 = pytest.importorskip("npe2", reason="npe2 (napari's plugin engine) is not installed")
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == "smoothsal"
    (reader,) = manifest.contributions.readers
    (command,) = [c for c in manifest.contributions.commands if c.id == reader.command]
    module, func = command.python_name.split(":")
    from smoothsal import napari as sn

    assert module == "smoothsal.napari" and getattr(sn, func) is sn.get_reader and reader.accepts_directories
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["napari.manifest"] == {"smoothsal": "smoothsal:napari.yaml"}
    assert "napari.yaml" in project["tool"]["setuptools"]["package-data"]["smoothsal"]
    # installed from this checkout: the entry point is registered and npe2 finds the manifest through it
    direct = metadata.distribution("smoothsal").read_text("direct_url.json") or "{}"
    if json.loads(direct).get("url", "").rstrip("/") == ROOT.as_uri():
        assert npe2.PluginManifest.from_distribution("smoothsal").name == "smoothsal"


# --- child side: napari itself ---------------------------------------------------------------------------


def _child(container: str, out: str, scale: float, plugin: str) -> None:
    """Open the container in napari through ``plugin`` (smoothsal's, or napari-ome-zarr with smoothsal's
    disabled), and screenshot the tissue and each heatmap."""
    import napari
    import npe2

    from smoothsal import napari as sn

    pm = npe2.PluginManager.instance()
    pm.discover()
    if plugin == "smoothsal" and "smoothsal" not in {m.name for m in pm.iter_manifests()}:
        pm.register(npe2.PluginManifest.from_file(MANIFEST))  # an install of another checkout
    elif plugin != "smoothsal" and "smoothsal" in {m.name for m in pm.iter_manifests()}:
        pm.disable("smoothsal")
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1100, 900)
    layers = viewer.open(container, plugin=plugin)

    def key(layer) -> str:  # napari-ome-zarr names a map "layer1: heatmaps/original/gradient/layer1"
        name = layer.name.split(": ", 1)[-1]
        return "tissue" if layer.name.startswith("tissue") else name.removeprefix("heatmaps/")

    def summary(layer_list) -> list[dict]:
        return [{"name": ly.name, "scale": [float(v) for v in ly.scale], "translate": [float(v) for v in ly.translate],
                 "affine": np.asarray(ly.affine.affine_matrix).round(9).tolist(),
                 "contrast_limits": [float(v) for v in ly.contrast_limits], "blending": str(ly.blending),
                 "rgb": bool(ly.rgb)} for ly in layer_list]  # fmt: skip

    heat = [ly for ly in layers if key(ly) != "tissue"]
    for ly in heat:
        ly.visible = False
        ly.scale = [s * scale for s in ly.scale]  # 1.0 except in the wrong-scale test
    viewer.reset_view()
    shots = {"tissue": viewer.screenshot(canvas_only=True, flash=False)}
    for ly in heat:
        ly.visible = True
        shots[key(ly)] = viewer.screenshot(canvas_only=True, flash=False)
        ly.visible = False
    camera = viewer.camera
    info = {
        "plugin": layers[0].source.reader_plugin,
        "plugins": sorted({m.name for m in pm.iter_manifests() if not pm.is_disabled(m.name)}),
        "layers": summary(layers),
        "keys": [key(ly) for ly in layers],
        "camera": {"center": [float(v) for v in camera.center], "zoom": float(camera.zoom)},
        "top_colour": (np.asarray(sn.colormap().map(np.array([1.0])))[0, :3] * 255).round().tolist(),
        "tops": {key(ly): (np.asarray(ly.colormap.map(np.array([1.0])))[0, :3] * 255).round().tolist()
                 for ly in heat},
    }  # fmt: skip
    viewer.close()
    if plugin == "smoothsal":
        second = sn.open_napari(container, run=False)  # what `smoothsal view --napari` shows
        info["open_viewer_layers"] = summary(second.layers)
        second.close()
    Path(out, "summary.json").write_text(json.dumps(info))
    np.savez_compressed(Path(out, "shots.npz"), **shots)


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)
    _child(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4])
