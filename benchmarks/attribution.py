"""Throughput and peak memory of the full attribution matrix: smoothsal vs the plain Captum loop.

The matrix: 4 smoothing methods × (gradient, DeepLift) × layer1–3 of a ResNet18, SmoothGrad
n = 20, σ = 0.2, 224 px tiles. The Captum loop makes one NoiseTunnel call per method, attribution
and layer. Each side runs in its own process (so peak RSS is its own) on the same tiles with the
same noise; the parent prints tiles/s, the ratio, and the largest relative difference.

    python benchmarks/attribution.py [--tiles 2] [--size 224] [--samples 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import smoothsal as ss

LAYERS = ("layer1", "layer2", "layer3")
STDEV = 0.2


def build(size: int) -> tuple[nn.Module, ss.SurrogatePaths]:
    torch.manual_seed(0)
    model = ss.load_model("resnet18", num_classes=2)
    for m in model.modules():  # non-trivial BatchNorm statistics, as in a trained net
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    surrogate = ss.SurrogatePaths.for_model(model, torch.zeros(1, 3, size, size))
    return model, surrogate


def tiles(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def run_smoothsal(models: dict[str, nn.Module], x: torch.Tensor, samples: int) -> dict:
    out = {}
    for i in range(len(x)):
        for method, model in models.items():
            maps = ss.attribute(
                model, x[i : i + 1], layers=list(LAYERS), target=[1],
                smoothgrad=ss.SmoothGrad(samples, STDEV, seed=i), max_batch=samples,
            )  # fmt: skip
            for a, per_layer in maps.items():
                for layer, value in per_layer.items():
                    out.setdefault((method, a, layer), []).append(value)
    return out


def run_captum(models: dict[str, nn.Module], x: torch.Tensor, samples: int) -> dict:
    from captum.attr import LayerDeepLift, LayerGradientXActivation, NoiseTunnel

    out = {}
    for i in range(len(x)):
        for method, model in models.items():
            for layer in LAYERS:
                module = model.get_submodule(ss.resolve_layer(model, layer))
                for a in ss.ATTRIBUTIONS:
                    if a == "gradient":
                        algo = LayerGradientXActivation(model, module, multiply_by_inputs=False)
                        extra = {}
                    else:
                        algo = LayerDeepLift(model, module, multiply_by_inputs=True)
                        extra = {"baselines": torch.zeros_like(x[i : i + 1])}
                    torch.manual_seed(i)
                    value = NoiseTunnel(algo).attribute(
                        x[i : i + 1], nt_type="smoothgrad", nt_samples=samples, stdevs=STDEV,
                        target=1, **extra,
                    )  # fmt: skip
                    out.setdefault((method, a, layer), []).append(value.detach())
    return out


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model, surrogate = build(args.size)
    models = {m: ss.smooth(model, m, surrogate=surrogate if m == "surrogate" else None) for m in ss.METHODS}
    x = tiles(args.tiles, args.size)
    run = run_smoothsal if args.impl == "smoothsal" else run_captum
    run(models, x[:1], 2)  # warm-up (baselines, allocator, oneDNN kernels)
    start = time.perf_counter()
    maps = run(models, x, args.samples)
    seconds = time.perf_counter() - start
    torch.save({"|".join(k): torch.cat(v) for k, v in maps.items()}, args.out)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out).with_suffix(".json").write_text(json.dumps({"seconds": seconds, "peak_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--impl", choices=("smoothsal", "captum"))
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.impl:
        return child(args)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl in ("captum", "smoothsal"):
            out = Path(tmp) / f"{impl}.pt"
            cmd = [sys.executable, __file__, "--impl", impl, "--out", str(out)]
            cmd += [f"--{k}={getattr(args, k)}" for k in ("tiles", "size", "samples", "threads")]
            subprocess.run(cmd, check=True)
            results[impl] = json.loads(out.with_suffix(".json").read_text())
            results[impl]["maps"] = torch.load(out)
    ours, ref = results["smoothsal"]["maps"], results["captum"]["maps"]
    worst = max(float((ours[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref)
    if any(ours[k].isnan().any() or ref[k].isnan().any() for k in ref):
        worst = float("nan")
    print(f"ResNet18, {args.size} px, SmoothGrad n={args.samples} σ={STDEV}, {args.tiles} tiles, "
          f"{len(ss.METHODS)} methods × {len(ss.ATTRIBUTIONS)} attributions × {len(LAYERS)} layers, "
          f"{args.threads} threads")  # fmt: skip
    for impl in ("captum", "smoothsal"):
        r = results[impl]
        print(f"  {impl:9s}  {args.tiles / r['seconds']:.3f} tiles/s  ({r['seconds']:.1f} s)  "
              f"peak RSS {r['peak_mb']:.0f} MB")  # fmt: skip
    ratio = results["captum"]["seconds"] / results["smoothsal"]["seconds"]
    mem = results["smoothsal"]["peak_mb"] / results["captum"]["peak_mb"]
    print(f"  throughput ratio smoothsal/captum: {ratio:.2f}x; peak memory ratio {mem:.2f}")
    print(f"  largest relative difference: {worst:.2e}")


if __name__ == "__main__":
    main()
