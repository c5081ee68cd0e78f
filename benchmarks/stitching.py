"""Wall time and peak memory of `smoothsal heatmaps` stitching at Camelyon16 scale (no model, no GPU).

A synthetic slide of W×H level-0 px at 0.25 µm/px with ~20 % tissue as elliptic blobs, tiled with
224-px tiles at 0.5 µm/px (448 level-0 px, no overlap). Its saliency store is written directly in the
`smoothsal saliency` format (random float32 maps: layer1 56×56, layer2 28×28, layer3 14×14 per tile,
one method, one attribution). The tissue image is read from a synthetic OpenSlide-like reader that
draws the same blobs (4 levels, downsamples 1/4/16/64), so the tissue pyramid is part of the timing.

Each size runs in its own process: one to synthesise the inputs, one to stitch (`check_inputs` +
`write_container`, what `smoothsal heatmaps` runs after opening the slide). The stitching process
reports its own wall time and peak RSS (getrusage); `/usr/bin/time -v` is not needed.

    python benchmarks/stitching.py [--sizes 100000x200000 50000x100000] [--blend window] [--workdir DIR]

Seen on the project's 2-core Intel Xeon machine (AVX-512, AMX-BF16; no GPU; other jobs running beside
it, load average ~6-9, so wall times are 2-4× an idle machine's):

    python benchmarks/stitching.py --sizes 50000x100000 100000x200000 --workdir /tmp/bench

| slide W × H px | tiles | level-0 rows×cols: tissue / layer1 / layer2 / layer3 | synthesis s | stitching wall s | CPU s | RSS after imports MB | peak RSS MB | container MB |
| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |
| 50000 × 100000 | 4993 | 12500×6250 / 12500×6250 / 6250×3125 / 3125×1563 | 9 | 57 | 28 | 623 | 820 | 93 |
| 100000 × 200000 | 19935 | 25000×12500 / 25000×12500 / 12500×6250 / 6250×3125 | 13 | 205 | 107 | 622 | 840 | 367 |

Peak RSS is the same for a 4× larger slide (+20 MB): ~0.62 GB is the Python/torch import (torch comes in
with the tile table module smoothsal.tiles), ~0.2 GB the work: one output chunk at a time, a bounded
cache of saliency-store chunks (64 MB) and one tissue read (1024² px). CPU time grows with the area
(×3.8 for ×4); most of it is the tissue image here (the synthetic reader draws all 1.25 Gpx of level 1).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from smoothsal.hardware import describe

MPP = 0.25  # level-0 µm/px
TILE, TILE_MPP = 224, 0.5
SIZE0 = round(TILE * TILE_MPP / MPP)  # 448 level-0 px per tile
LAYERS = {"layer1": 4, "layer2": 8, "layer3": 16}
DOWNSAMPLES = (1, 4, 16, 64)
TISSUE_FRACTION = 0.2


class Blobs:
    """~20 % of the slide covered by seeded ellipses; `inside(x, y)` on level-0 coordinates."""

    def __init__(self, width: int, height: int, n: int = 14, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.cx = rng.uniform(0.15, 0.85, n) * width
        self.cy = rng.uniform(0.1, 0.9, n) * height
        self.rx = rng.uniform(0.5, 1.5, n)
        self.ry = rng.uniform(0.5, 1.5, n)
        ys, xs = np.mgrid[0 : height : height / 400, 0 : width : width / 200]
        self.scale = 0.12 * min(width, height)
        for _ in range(8):  # scale the radii to the tissue fraction wanted
            self.scale *= np.sqrt(TISSUE_FRACTION / max(self.inside(xs, ys).mean(), 1e-3))

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast(x, y).shape, bool)
        for cx, cy, rx, ry in zip(self.cx, self.cy, self.rx, self.ry):
            out |= ((x - cx) / (rx * self.scale)) ** 2 + ((y - cy) / (ry * self.scale)) ** 2 <= 1
        return out


class SyntheticReader:
    """An OpenSlide-like reader drawing the blobs: pink textured tissue on white glass.

    Pixels come from a precomputed mask at downsample 64 (nearest neighbour), so reads are cheap and
    the benchmark times the container writing, not the drawing."""

    def __init__(self, width: int, height: int, blobs: Blobs) -> None:
        self.level_count = len(DOWNSAMPLES)
        self.level_dimensions = [(width // d, height // d) for d in DOWNSAMPLES]
        self.level_downsamples = [float(d) for d in DOWNSAMPLES]
        self.properties = {"openslide.mpp-x": str(MPP), "openslide.mpp-y": str(MPP)}
        ys = (np.arange(height // 64) + 0.5) * 64
        xs = (np.arange(width // 64) + 0.5) * 64
        self.mask = blobs.inside(xs[None, :], ys[:, None])

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        d = DOWNSAMPLES[level]
        w, h = size
        x0 = location[0] + (np.arange(w) + 0.5) * d
        y0 = location[1] + (np.arange(h) + 0.5) * d
        rows = np.clip((y0 // 64).astype(int), 0, self.mask.shape[0] - 1)
        cols = np.clip((x0 // 64).astype(int), 0, self.mask.shape[1] - 1)
        tissue = self.mask[np.ix_(rows, cols)]
        texture = ((x0[None, :].astype(np.int64) * 7 + y0[:, None].astype(np.int64) * 13) % 40).astype(
            np.uint8
        )
        rgba = np.full((h, w, 4), 255, np.uint8)
        for ch, base in enumerate((215, 120, 170)):
            rgba[..., ch] = np.where(tissue, base - texture, 245)
        return Image.fromarray(rgba, "RGBA")

    def close(self) -> None:
        pass


def synthesise(workdir: Path, width: int, height: int) -> None:
    """Tile table + saliency store for a width×height slide, written under `workdir`."""
    from smoothsal.store import StoreWriter
    from smoothsal.tiles import tiles_sha256, write_tile_table

    blobs = Blobs(width, height)
    xs, ys = np.meshgrid(np.arange(0, width - SIZE0 + 1, SIZE0), np.arange(0, height - SIZE0 + 1, SIZE0))
    xs, ys = xs.ravel(), ys.ravel()
    keep = blobs.inside(xs + SIZE0 / 2, ys + SIZE0 / 2)
    n = int(keep.sum())
    table = pd.DataFrame({
        "slide_id": pd.Series(["synthetic"] * n, dtype="string"),
        "slide_path": pd.Series([str(workdir / "synthetic.tif")] * n, dtype="string"),
        "col": (xs[keep] // SIZE0).astype(np.int32), "row": (ys[keep] // SIZE0).astype(np.int32),
        "x": xs[keep].astype(np.int64), "y": ys[keep].astype(np.int64),
        "w": np.full(n, SIZE0, np.int64), "h": np.full(n, SIZE0, np.int64),
        "level": np.zeros(n, np.int32), "tile_size": np.full(n, TILE, np.int32),
        "mpp": np.full(n, TILE_MPP), "slide_mpp": np.full(n, MPP), "tissue_fraction": np.ones(n),
    })  # fmt: skip
    write_tile_table(table, workdir / "tiles.parquet")
    meta = {
        "version": "benchmark", "slide_id": "synthetic", "slide_path": str(workdir / "synthetic.tif"),
        "method": "original", "layers": list(LAYERS), "attributions": ["gradient"], "settings": {},
        "tiles_sha256": tiles_sha256(table), "n_tiles": n,
    }  # fmt: skip
    writer = StoreWriter(workdir / "original.zarr", workdir / "original.parquet", meta)
    writer.open({layer: (TILE // stride, TILE // stride) for layer, stride in LAYERS.items()}, TILE)
    rng = np.random.default_rng(0)
    for start in range(0, n, 64 * 16):
        stop = min(n, start + 64 * 16)
        maps = {
            ("gradient", layer): rng.standard_normal((stop - start, TILE // s, TILE // s), dtype=np.float32)
            for layer, s in LAYERS.items()
        }
        writer.write_batch(start, stop, maps, pd.DataFrame({"tile": np.arange(start, stop)}))
    writer.finish()
    (workdir / "slide.json").write_text(json.dumps({"width": width, "height": height, "n_tiles": n}))


def stitch(workdir: Path, blend: str) -> dict:
    """Run the heatmaps stage on the synthetic inputs; wall time and this process's peak RSS."""
    from smoothsal import heatmaps
    from smoothsal.container import open_container
    from smoothsal.slides import Slide
    from smoothsal.store import open_store
    from smoothsal.tiles import read_tile_table

    spec = json.loads((workdir / "slide.json").read_text())
    import smoothsal.tiles  # noqa: F401  (torch, via the tile Dataset: part of the baseline)

    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, cpu = time.perf_counter(), time.process_time()
    blobs = Blobs(spec["width"], spec["height"])
    slide = Slide(
        workdir / "synthetic.tif", SyntheticReader(spec["width"], spec["height"], blobs), MPP, "synthetic"
    )
    table = read_tile_table(workdir / "tiles.parquet")
    stores = [open_store(workdir / "original.zarr")]
    heatmaps.check_inputs(slide, table, workdir / "tiles.parquet", stores)
    out = heatmaps.write_container(
        workdir / "synthetic.ome.zarr", slide, table, stores, heatmaps.HeatmapSettings(blend=blend)
    )
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    shapes = {i.path: i.levels[0].shape for i in open_container(out).images}
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "baseline_rss_mb": baseline_mb,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "level0_shapes": shapes,
        "container_mb": size / 2**20,
        "n_tiles": spec["n_tiles"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes", nargs="+", default=["100000x200000", "50000x100000"], help="W×H level-0 px"
    )
    parser.add_argument("--blend", default="window", choices=("none", "mean", "window"))
    parser.add_argument(
        "--workdir", type=Path, help="where inputs and containers go (default: a temporary dir)"
    )
    parser.add_argument("--child", nargs=2, metavar=("STEP", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    print(describe("cpu"), flush=True)  # the machine every figure below was measured on
    if args.child:
        step, workdir = args.child[0], Path(args.child[1])
        if step.startswith("synth:"):
            w, h = map(int, step[6:].split("x"))
            synthesise(workdir, w, h)
        else:
            print(json.dumps(stitch(workdir, args.blend)))
        return
    root = args.workdir or Path(tempfile.mkdtemp(prefix="smoothsal-stitching-"))
    rows = []
    for size in args.sizes:
        workdir = root / size
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--child", f"synth:{size}", str(workdir)], check=True)
        synth_s = time.perf_counter() - t0
        done = subprocess.run(
            [sys.executable, __file__, "--blend", args.blend, "--child", "stitch", str(workdir)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        result = json.loads(done.stdout.strip().splitlines()[-1])
        w, h = map(int, size.split("x"))
        shapes = result["level0_shapes"]
        rows.append(
            f"| {w} × {h} | {result['n_tiles']} | "
            f"{' / '.join('×'.join(map(str, s[-2:])) for s in shapes.values())} | {synth_s:.0f} | "
            f"{result['seconds']:.0f} | {result['cpu_seconds']:.0f} | {result['baseline_rss_mb']:.0f} | "
            f"{result['peak_rss_mb']:.0f} | {result['container_mb']:.0f} |"
        )
        print(rows[-1], flush=True)
        if args.workdir is None:
            shutil.rmtree(workdir)
    print(
        "\n| slide W × H px | tiles | level-0 rows×cols: tissue / layer1 / layer2 / layer3 | synthesis s | "
        "stitching wall s | CPU s | RSS after imports MB | peak RSS MB | container MB |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    if args.workdir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
