"""Throughput of the `saliency` stage against `attribute`'s own, per precision, in one process.

`run_saliency` reads the tiles from a real slide (DataLoader worker), runs the prediction forwards and
`attribute`, the per-tile measures (TV, prediction difference) and writes the Zarr store and table;
the reference is `attribute` alone on the same tiles (read once, beforehand), in batches of the same
size, with the same model, per-tile noise seeds, max_batch and precision. One method, gradient +
DeepLift at layer1-3 of a ResNet18 (seeded random init), SmoothGrad n = 20, 224-px tiles. The variants
run interleaved, ``--repeats`` times each after a warm-up, and the minimum counts; printed: tiles/s of
each, the ratio saliency/attribute per precision, peak RSS, and the load average around the runs.

    python benchmarks/saliency.py [--precision fp32 bf16] [--tiles 16] [--method forward_hook] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import smoothsal as ss
from smoothsal import grid, saliency, slides, tiling
from smoothsal.hardware import describe
from smoothsal.model_spec import load_with_surrogate
from smoothsal.tiles import TileDataset, read_tile_table, write_tile_table

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
LAYERS = ("layer1", "layer2", "layer3")


def setup(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path]:
    """The tile table of ``--tiles`` tiles and a seeded random-init checkpoint (both sides load it)."""
    with slides.open_slide(args.slide) as slide:
        table = tiling.tile_slide(
            slide, grid.TileGridSettings(tile_size=args.size, max_tiles=args.tiles)
        ).table
    tiles = tmp / "tiles.parquet"
    write_tile_table(table, tiles)
    torch.manual_seed(0)
    checkpoint = tmp / "model.pt"
    torch.save(ss.load_model("resnet18", num_classes=2).state_dict(), checkpoint)
    return tiles, checkpoint


class Reference:
    """`attribute` alone: the job's model (loaded as the job loads it) on the job's tiles, read once."""

    def __init__(self, args: argparse.Namespace, tiles: Path, checkpoint: Path):
        model, _, norm = load_with_surrogate("resnet18", num_classes=2, checkpoint=checkpoint)
        model = model.requires_grad_(False).eval()
        example = torch.zeros(1, 3, args.size, args.size)
        self.model = ss.smooth(model, args.method, example=example)
        table = read_tile_table(tiles)
        self.n = len(table)
        loader = DataLoader(TileDataset(table, transform=norm), batch_size=args.batch_size)
        self.batches = [(x, index) for x, index in loader]
        self.slide_id = str(table["slide_id"].iloc[0])
        self.args = args

    def seconds(self, precision: str) -> float:
        smoothgrad = ss.SmoothGrad(self.args.samples, 0.2)
        start = time.perf_counter()
        for x, index in self.batches:
            seeds = [saliency.tile_seed(0, self.slide_id, int(i)) for i in index]
            ss.attribute(self.model, x, layers=list(LAYERS), target=1, smoothgrad=smoothgrad,
                         noise_seeds=seeds, precision=precision, max_batch="auto")  # fmt: skip
        return time.perf_counter() - start


def job_seconds(args: argparse.Namespace, tiles: Path, checkpoint: Path, precision: str, out: Path) -> float:
    """The tile loop of one `run_saliency` job (model loading and one-time setup excluded)."""
    settings = saliency.SaliencySettings(
        "resnet18", 2, args.method, LAYERS, smoothgrad_samples=args.samples, precision=precision
    )
    options = saliency.RunOptions(
        out=out / "m.zarr", table=out / "m.parquet", batch_size=args.batch_size, workers=args.workers,
        device="cpu", progress=False,
    )  # fmt: skip
    result = saliency.run_saliency(args.slide, tiles, settings, options, checkpoint=checkpoint)
    assert result.computed == result.n_tiles
    return result.compute_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=DATA)
    parser.add_argument("--tiles", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument(
        "--method", default="forward_hook", choices=("original", "backward_hook", "forward_hook")
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, help="DataLoader workers of the job (default: the job's)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(describe("cpu"), flush=True)  # the machine every figure below was measured on
    load_before = os.getloadavg()
    runs: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tiles, checkpoint = setup(args, Path(tmp))
        reference = Reference(args, tiles, checkpoint)
        for p in args.precision:  # warm-up: converted copies, baselines, oneDNN primitives
            reference.seconds(p)
        for r in range(args.repeats):
            for p in args.precision:
                runs.setdefault(("attribute", p), []).append(reference.seconds(p))
                out = Path(tmp) / f"{p}-{r}"
                runs.setdefault(("saliency", p), []).append(job_seconds(args, tiles, checkpoint, p, out))
    n = reference.n
    print(f"saliency vs attribute: ResNet18 (seeded random init), {args.method}, {n} tiles of {args.size} px "
          f"from {args.slide.name}, batches of {args.batch_size}, SmoothGrad n={args.samples}, 2 attributions "
          f"× 3 layers, {torch.get_num_threads()} threads; interleaved, minimum of {args.repeats}")  # fmt: skip
    print(f"  load average before {load_before[0]:.1f} / {load_before[1]:.1f} (1 / 5 min), "
          f"after {os.getloadavg()[0]:.1f} / {os.getloadavg()[1]:.1f}")  # fmt: skip
    for p in args.precision:
        ref, job = min(runs[("attribute", p)]), min(runs[("saliency", p)])
        print(f"  {p}: attribute {n / ref:.3f} tiles/s, saliency {n / job:.3f} tiles/s: saliency/attribute "
              f"{ref / job:.1%}   (runs s: attribute {' '.join(f'{s:.1f}' for s in runs[('attribute', p)])}; "
              f"saliency {' '.join(f'{s:.1f}' for s in runs[('saliency', p)])})")  # fmt: skip
    if set(args.precision) == {"fp32", "bf16"}:
        ratio = min(runs[("saliency", "fp32")]) / min(runs[("saliency", "bf16")])
        print(f"  saliency bf16/fp32: {ratio:.2f}x")
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
