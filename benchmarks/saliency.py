"""Throughput of the `saliency` stage end to end: tiles read from a real slide, one method, gradient +
DeepLift at layer1–3 of a ResNet18 (seeded random init), SmoothGrad n = 20, 224 px tiles, maps
written to Zarr. Prints tiles/s of the tile loop (model loading excluded) and peak RSS.

    python benchmarks/saliency.py [--tiles 8] [--size 224] [--samples 20] [--method original|backward_hook|forward_hook]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from pathlib import Path

from smoothsal import grid, saliency, slides, tiling
from smoothsal.tiles import write_tile_table

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=DATA)
    parser.add_argument("--tiles", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--method", default="original", choices=("original", "backward_hook", "forward_hook"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, slides.open_slide(args.slide) as slide:
        table = tiling.tile_slide(
            slide, grid.TileGridSettings(tile_size=args.size, max_tiles=args.tiles)
        ).table
        tiles = Path(tmp) / "tiles.parquet"
        write_tile_table(table, tiles)
        settings = saliency.SaliencySettings(
            "resnet18", 2, args.method, ("layer1", "layer2", "layer3"), smoothgrad_samples=args.samples
        )
        options = saliency.RunOptions(
            out=Path(tmp) / "m.zarr", table=Path(tmp) / "m.parquet", batch_size=args.batch_size,
            workers=args.workers, device=args.device, progress=False,
        )  # fmt: skip
        result = saliency.run_saliency(args.slide, tiles, settings, options)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"saliency {args.method}: {result.n_tiles} tiles of {args.size} px, SmoothGrad n={args.samples}, "
        f"2 attributions × 3 layers on {result.device}: {result.n_tiles / result.compute_seconds:.3f} tiles/s "
        f"(job {result.seconds:.1f} s, peak RSS {rss:.0f} MB)"
    )


if __name__ == "__main__":
    main()
