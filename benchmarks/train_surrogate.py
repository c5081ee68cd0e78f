"""Wall time and peak memory of `smoothsal train-surrogate`, plain and under torchrun.

Makes 224-px tiles (0.5 µm/px) of the real slides in ../shared/data and a seeded resnet18 checkpoint,
then runs each launch under `/usr/bin/time -v` and prints a markdown table with the exact commands.

    python benchmarks/train_surrogate.py --nproc 0 1 2 --epochs 2 --batch-size 32

`--nproc 0` = a plain process (no torchrun); N ≥ 1 = `torchrun --standalone --nproc_per_node N`.
Peak RSS per process comes from the command's own report (getrusage in each rank); `/usr/bin/time`
reports the largest single process of the tree, not the sum.

Seen on the project's 2-core Intel Xeon machine (AVX-512, AMX-BF16; no GPU; torch 2.14.1; other jobs beside it,
load average 3.4-3.7, so the same command varied 24-46 s between runs): 93 tiles of 224 px
(CMU-1-Small-Region + TCGA-CR-7395 at --mpp 0.25), resnet18, 2 epochs, global batch 32 (6 steps):

| launch | wall (time -v) | training s (rank 0) | peak RSS per process, MB |
| --- | ---: | ---: | ---: |
| plain | 0:27-0:49 | 24-46 | 1573-1587 |
| torchrun x 1 | 0:50 | 45 | 1566-1668 |
| torchrun x 2 | 0:31 | 23.4 | 1396, 1439 |

About 1.0 GB of each process is torch + the model (a 64-px run peaks at 1.1 GB); two processes
on two cores are no faster than one process with two threads. Activations saved for backward per
tile (fp32, measured with saved_tensors_hooks): resnet18 @224 px 4.0 MB, resnet50 @224 14.7 MB,
FlexibleUNet-ResNet34 @1536 126 MB; path parameters (x4 with grads + Adam): resnet18 9.3 M, resnet50 80.5 M.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from smoothsal.hardware import describe

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SMOOTHSAL_DATA", ROOT.parent / "shared" / "data"))
SLIDES = {"CMU-1-Small-Region.svs": None, "TCGA-CR-7395-01A-01-TS1.svs": 0.25}  # slide → --mpp override


def make_inputs(work: Path, tile_size: int, arch: str, num_classes: int) -> tuple[list[Path], Path]:
    """Tile tables of the shared slides and a seeded random-weights model checkpoint."""
    import torch

    from smoothsal.architectures import ARCHITECTURES

    work.mkdir(parents=True, exist_ok=True)
    tables = []
    for slide, mpp in SLIDES.items():
        out = work / f"{Path(slide).stem}-{tile_size}.parquet"
        if not out.exists():
            cmd = ["smoothsal", "tiles", str(DATA / "slides" / slide), "--out", str(out),
                   "--tile-size", str(tile_size), "--target-mpp", "0.5"]  # fmt: skip
            subprocess.run(cmd + (["--mpp", str(mpp)] if mpp else []), check=True, capture_output=True)
        tables.append(out)
    model = work / f"{arch}.pt"
    if not model.exists():
        torch.manual_seed(0)
        torch.save(ARCHITECTURES[arch](num_classes=num_classes).state_dict(), model)
    return tables, model


def command(nproc: int, tables: list[Path], model: Path, out: Path, args: argparse.Namespace) -> list[str]:
    launch = (
        ["smoothsal"]
        if nproc == 0
        else ["torchrun", "--standalone", "--nproc_per_node", str(nproc), "--no-python", "smoothsal"]
    )
    return [*launch, "train-surrogate", "--arch", args.arch, "--num-classes", str(args.num_classes),
            "--checkpoint", str(model), "--tiles", *map(str, tables), "--out", str(out),
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--no-resume",
            "--no-progress", *(["--workers", str(args.workers)] if args.workers is not None else [])]  # fmt: skip


def measure(cmd: list[str]) -> dict[str, str]:
    run = subprocess.run(["/usr/bin/time", "-v", *cmd], check=False, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{run.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", run.stderr).group(1)
    maxrss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    report = run.stdout.strip().splitlines()[-1]
    ranks = re.search(r"peak RSS MB \[([^\]]*)\]", report).group(1)
    train_s = re.search(r", ([\d.]+) s, peak", report).group(1)
    return {"wall": wall, "train_s": train_s, "rss_ranks": ranks, "time_maxrss_mb": f"{maxrss / 1024:.0f}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, nargs="+", default=[0, 2])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--num-classes", type=int, default=2)
    p.add_argument("--tile-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int)
    p.add_argument("--work", type=Path, default=Path("/tmp/smoothsal-bench-train"))
    args = p.parse_args()
    print(describe("cpu"), flush=True)  # the machine every figure below was measured on
    tables, model = make_inputs(args.work, args.tile_size, args.arch, args.num_classes)
    import pandas as pd

    n = sum(len(pd.read_parquet(t)) for t in tables)
    print(f"{n} tiles of {args.tile_size} px, {args.arch}, {args.epochs} epochs, global batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print(
        "| launch | wall (time -v) | training s (rank 0) | peak RSS per process, MB | time -v max RSS, MB |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    cmds = []
    for nproc in args.nproc:
        cmd = command(nproc, tables, model, args.work / f"surrogate-{nproc}.pt", args)
        r = measure(cmd)
        cmds.append(" ".join(cmd))
        launch = "plain" if nproc == 0 else f"torchrun × {nproc}"
        print(f"| {launch} | {r['wall']} | {r['train_s']} | {r['rss_ranks']} | {r['time_maxrss_mb']} |")
    print("\ncommands:\n" + "\n".join(f"    /usr/bin/time -v {c}" for c in cmds))


if __name__ == "__main__":
    main()
