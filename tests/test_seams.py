"""Seam measure (smoothsal/seams.py): known answers on synthetic stitched maps, the response to
overlapping tiles with window blending through the real stitcher (`smoothsal heatmaps`), and the score
`heatmaps` records for every map."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import zarr
from ngff import assert_valid_ngff
from scipy.ndimage import gaussian_filter

from smoothsal import heatmaps
from smoothsal.errors import BadStore
from smoothsal.seams import container_seams, seam_measure

T, ROWS, COLS = 32, 4, 6  # tile map side (px), tiles down and across (even counts: balanced checkerboard)
TOP = np.repeat(np.arange(ROWS) * T, COLS)
LEFT = np.tile(np.arange(COLS) * T, ROWS)
I, J = np.mgrid[0 : ROWS * T, 0 : COLS * T].astype(float)
RAMP = 10.0 + 0.1 * (I + J)  # positive linear ramp, slope 0.1 per px along both axes


def grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    return np.repeat(np.arange(rows) * T, cols), np.tile(np.arange(cols) * T, rows)


def measure(values: np.ndarray, **kw: object):
    return seam_measure(values, TOP, LEFT, T, T, **kw)


def test_a_linear_ramp_is_seamless_exactly() -> None:
    for values in (RAMP, 10.0 + 0.1 * I + 0.3 * J):  # equal and unequal slopes
        s = measure(values)
        assert s.band_ratio == pytest.approx(1.0, abs=1e-12) and s.jump_ratio == pytest.approx(1.0, abs=1e-12)
        assert s.score == pytest.approx(0.0, abs=1e-12)
    holes = RAMP.copy()
    holes[:T, T : 3 * T] = np.nan  # two tiles missing (no tissue): left out, still exactly seamless
    assert measure(holes).score == pytest.approx(0.0, abs=1e-12)
    assert measure(holes).band_pixels < measure(RAMP).band_pixels


def test_a_frame_around_every_tile_scores_its_contrast() -> None:
    li, lj = I % T, J % T
    band = np.minimum(np.minimum(li, T - 1 - li), np.minimum(lj, T - 1 - lj)) < 4  # b = 32 / 8
    for f in (0.5, 0.2, 2.0):  # dark and bright frames
        s = measure(RAMP * np.where(band, f, 1.0))
        assert s.band_px == 4 and s.band_pixels == band.sum()
        assert s.band_ratio == pytest.approx(f, rel=1e-12)
        assert s.jump_ratio == pytest.approx(1.0, rel=1e-12)  # uniform inside the band: no step at the line
        assert s.score == pytest.approx(abs(math.log(f)), rel=1e-12)


def test_steps_between_tiles_score_their_height() -> None:
    delta = 0.5  # checkerboard offsets ±δ: steps of 0.1 ± 2δ across lines, 0.1 beside them
    offsets = delta * (-1.0) ** (I // T + J // T)
    s = measure(RAMP + offsets)
    assert s.band_ratio == pytest.approx(1.0, rel=1e-12)
    assert s.jump_ratio == pytest.approx(2 * delta / 0.1, rel=1e-12)
    assert s.score == pytest.approx(math.log(10.0), rel=1e-12)


def test_row_blocks_give_the_same_answer() -> None:
    values = RAMP + 0.5 * (-1.0) ** (I // T + J // T) + np.random.default_rng(0).normal(0, 0.05, RAMP.shape)
    whole = measure(values)
    for rows in (1, 2, 3, 7, 33):
        assert measure(values, max_bytes=48 * values.shape[1] * rows).as_dict() == pytest.approx(
            whole.as_dict()
        )


def test_seamless_random_maps_score_near_zero() -> None:
    rows, cols = 12, 12
    top, left = grid(rows, cols)
    h, w = rows * T, cols * T
    for seed in range(3):
        rng = np.random.default_rng(seed)
        noise = rng.normal(size=(h, w))
        smooth = 20 * gaussian_filter(rng.normal(size=(h + 100, w + 100)), 6)[50:-50, 50:-50] + 0.2
        for values in (noise, smooth):
            s = seam_measure(values, top, left, T, T)
            assert s.score < 0.1, (seed, s)


def test_no_band_or_no_lines_is_nan() -> None:
    s = seam_measure(np.ones((2, 2)), np.array([0]), np.array([0]), 2, 2)  # 2-px tiles: all band
    assert math.isnan(s.score) and s.interior_pixels == 0


# --- through the real stitcher ---------------------------------------------------------------------------


def tile_maps(table, d: int, h: int, falloff: float) -> np.ndarray:
    """Per-tile maps of a smooth field over the slide, fading toward each tile's border as padded
    convolutions do: factor 1 − falloff · exp(−(distance to the border in px) / 3)."""
    centres = (np.arange(h) + 0.5) * d
    edge = np.minimum(np.arange(h), h - 1 - np.arange(h))
    envelope = 1 - falloff * np.exp(-np.minimum(edge[:, None], edge[None, :]) / 3.0)
    x, y = table["x"].to_numpy(), table["y"].to_numpy()
    maps = [
        (1.5 + np.sin((x[i] + centres)[None, :] / 90.0) * np.cos((y[i] + centres)[:, None] / 120.0))
        * envelope
        for i in range(len(table))
    ]
    return np.stack(maps).astype(np.float32)


@pytest.fixture(scope="module")
def stitched(slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same falloff maps stitched from tiles without overlap (blend none) and at half stride with
    window blending: 128-px tiles (32-px maps at layer1) on a complete grid of CMU-1-Small-Region."""
    from test_heatmaps import make_tiles, write_store

    cmu = slides_dir / "CMU-1-Small-Region.svs"
    root = tmp_path_factory.mktemp("seams")
    out = {}
    for name, stride, blend in (("plain", None, "none"), ("overlap", 64, "window")):
        tiles = root / f"{name}-tiles.parquet"  # beside the store's own {name}.parquet
        table = make_tiles(cmu, tiles, tile_size=128, stride=stride, roi=(0, 0, 1024, 1024), min_tissue=0.0)
        store = write_store(
            root / f"{name}.zarr", table, "original", {("gradient", "layer1"): tile_maps(table, 4, 32, 0.6)}
        )
        settings = heatmaps.HeatmapSettings(blend=blend, tissue=False)
        out[name] = heatmaps.make_heatmaps(
            cmu, [store], tiles, root / f"{name}.ome.zarr", settings, progress=False
        )
        assert_valid_ngff(out[name])
    return out


def test_overlap_with_window_blending_at_most_halves_the_seams(stitched: dict[str, Path]) -> None:
    image = "heatmaps/original/gradient/layer1"
    plain, overlap = (container_seams(stitched[k])[image] for k in ("plain", "overlap"))
    assert plain.band_ratio < 0.8 and plain.score > 0.25, plain  # the frame shows
    assert overlap.score <= 0.5 * plain.score, (plain, overlap)
    print(f"seam score {plain.score:.3f} without overlap, {overlap.score:.3f} at half stride + window")


def test_a_container_without_a_tile_grid_is_refused(stitched: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "c.ome.zarr"
    shutil.copytree(stitched["plain"], copy)
    shutil.rmtree(copy / "tiles")
    group = zarr.open_group(copy, mode="r")
    assert "tiles" not in group
    with pytest.raises(BadStore, match="no tile grid"):
        container_seams(copy)


def test_heatmaps_records_each_maps_seams(stitched: dict[str, Path]) -> None:
    """The score in the container's attributes is the one `container_seams` measures from its pixels."""
    for name, path in stitched.items():
        image = "heatmaps/original/gradient/layer1"
        group = zarr.open_group(path, mode="r")
        recorded = group[image].attrs["smoothsal"]["seams"]
        assert recorded == pytest.approx(container_seams(path)[image].as_dict()), name
        (entry,) = [i for i in group.attrs["smoothsal"]["images"] if i["path"] == image]
        assert entry["seam_score"] == pytest.approx(recorded["score"])


@pytest.mark.slow
def test_real_maps_of_a_random_resnet18_lose_their_frame_with_overlap(
    cli, slides_dir: Path, tmp_path: Path
) -> None:
    """`smoothsal tiles` → `saliency` (random-init ResNet18, layer1 gradient) → `heatmaps` on a real slide,
    without overlap and at half stride (window blending): the zero-padding frame shows, and overlap at
    least halves the seam score (measured: 0.72 → 0.14)."""
    slide = slides_dir / "CMU-1-Small-Region.svs"
    scores = {}
    for name, stride in (("plain", []), ("overlap", ["--stride", "64"])):
        d = tmp_path / name
        cli("tiles", slide, "--tile-size", "128", "--roi", "768", "768", "512", "512", "--min-tissue", "0.5",
            *stride, "--out", d / "t.parquet")  # fmt: skip
        cli("saliency", slide, "--tiles", d / "t.parquet", "--arch", "resnet18", "--num-classes", "2",
            "--method", "original", "--layers", "layer1", "--attributions", "gradient", "--smoothgrad-samples", "0",
            "--target", "predicted", "--workers", "0", "--no-progress", "--out", d / "o.zarr",
            "--table", d / "o.parquet")  # fmt: skip
        cli("heatmaps", slide, "--saliency", d / "o.zarr", "--tiles", d / "t.parquet", "--no-tissue",
            "--no-progress", "--out", d / "c.ome.zarr")  # fmt: skip
        assert_valid_ngff(d / "c.ome.zarr")
        scores[name] = container_seams(d / "c.ome.zarr")["heatmaps/original/gradient/layer1"]
    assert scores["plain"].band_ratio < 0.8, scores  # a dark frame around every tile
    assert scores["overlap"].score <= 0.5 * scores["plain"].score, scores
