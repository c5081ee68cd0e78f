"""Throughput and peak memory of the full attribution matrix: smoothsal vs the plain Captum loop.

The matrix: 4 smoothing methods × (gradient, DeepLift) × layer1–3 of a ResNet18, SmoothGrad
n = 20, σ = 0.2, 224 px tiles. The Captum loop makes one NoiseTunnel call per method, attribution
and layer. Each side runs in its own process (so peak RSS is its own) on the same tiles with the
same noise; the parent prints tiles/s, the ratio, and the largest relative difference.

    python benchmarks/attribution.py [--tiles 2] [--size 224] [--samples 20] [--threads 2]

With ``--precision fp32 bf16`` (any of smoothsal.attribution.PRECISIONS) the model is a trained
classifier (``--model``, default results/camelyon16/model.pt when present, else one trained here as
the demo test does: 2 epochs on 64-px tiles of two demo slides, ~30 s) on 224-px crops of demo slides,
with a surrogate trained for it; the Captum loop and each precision run interleaved, ``--repeats``
times each in a fresh process (warm-up first, minimum taken). Printed: tiles/s and ratios, and the
deviation of each precision from fp32 per method, attribution and layer (per tile on the channel-
summed maps: relative error median and max, minimum centred cosine; change of the mean TV).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import smoothsal as ss
from smoothsal.hardware import describe

LAYERS = ("layer1", "layer2", "layer3")
STDEV = 0.2
ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "results" / "camelyon16" / "model.pt"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


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


def run_smoothsal(
    models: dict[str, nn.Module], x: torch.Tensor, samples: int, precision: str = "fp32", per_call: int = 1
) -> dict:
    """``per_call`` tiles per attribute call, each with its own noise seed (the noise Captum draws after
    torch.manual_seed(tile) on CPU); max_batch: one tile's samples on CPU, "auto" on CUDA."""
    out = {}
    max_batch = samples if x.device.type == "cpu" else "auto"
    for i in range(0, len(x), per_call):
        for method, model in models.items():
            part = x[i : i + per_call]
            maps = ss.attribute(
                model, part, layers=list(LAYERS), target=[1] * len(part), smoothgrad=ss.SmoothGrad(samples, STDEV),
                max_batch=max_batch, precision=precision, noise_seeds=range(i, i + len(part)),
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


# --- a trained classifier on demo tiles (--precision) ------------------------------------------


def demo_crops(slide: Path, table_path: Path, n: int, size: int) -> torch.Tensor:
    """``n`` normalised ``size``-px crops at level 1 (1 µm/px) of a demo slide, spread over its tiles."""
    import numpy as np
    import openslide
    import pandas as pd

    table = pd.read_parquet(table_path).sort_values("label", ascending=False, kind="stable")
    rows = table.iloc[np.linspace(0, len(table) - 1, n).round().astype(int)]
    out = []
    with openslide.OpenSlide(slide) as reader:
        width, height = reader.dimensions
        for x, y in rows[["x", "y"]].to_numpy(int):
            x, y = min(x, width - 2 * size), min(y, height - 2 * size)
            rgb = np.asarray(reader.read_region((int(x), int(y)), 1, (size, size)).convert("RGB"))
            out.append(torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1))
    return (torch.stack(out) - MEAN) / STD


def prepare_trained(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    """Model, surrogate and tiles written to ``tmp/setup.pt`` for the children; what the model is."""
    from smoothsal import demo
    from smoothsal.cli import main as cli

    names = ("tumor_001", "normal_001")
    size = max(1024, -(-4 * args.size // 256) * 256)  # room for crops at level 1
    assert (
        cli(["demo-data", "--out", str(tmp), "--size", str(size), "--slides", *names, "--no-progress"]) == 0
    )
    tables, crops = [], []
    for k, name in enumerate(names):
        slide, annotation, _ = demo.slide_paths(tmp, next(s for s in demo.DEMO_SLIDES if s.name == name))
        table = tmp / f"{name}.parquet"
        tile_args = ["--tile-size", "64", "--target-mpp", "1.0"]
        assert (
            cli(["tiles", str(slide), "--annotations", str(annotation), "--out", str(table), *tile_args]) == 0
        )
        tables.append(str(table))
        crops.append(demo_crops(slide, table, (args.tiles + 1 - k) // 2, args.size))
    checkpoint = Path(args.model) if args.model else DEMO_MODEL
    if checkpoint.is_file():
        source = str(checkpoint)
    else:
        checkpoint = tmp / "model.pt"
        train = ["train-model", "--arch", "resnet18", "--num-classes", "2", "--tiles", *tables]
        assert (
            cli([*train, "--epochs", "2", "--batch-size", "16", "--out", str(checkpoint), "--no-progress"])
            == 0
        )
        source = "trained here: 2 epochs on 64-px tiles of tumor_001 + normal_001 (demo)"
    model = ss.load_model("resnet18", num_classes=2, checkpoint=checkpoint)
    x = torch.cat(crops)
    surrogate = ss.train_surrogate(model, [x[i : i + 2] for i in range(len(x))], epochs=2)
    torch.save({"model": model.state_dict(), "surrogate": surrogate, "x": x}, tmp / "setup.pt")
    return tmp / "setup.pt", source


def load_setup(args: argparse.Namespace) -> tuple[nn.Module, ss.SurrogatePaths, torch.Tensor]:
    if not args.setup:
        model, surrogate = build(args.size)
        return model, surrogate, tiles(args.tiles, args.size)
    setup = torch.load(args.setup, weights_only=False)
    model = ss.load_model("resnet18", num_classes=2)
    model.load_state_dict(setup["model"])
    return model, setup["surrogate"], setup["x"]


# --- processes ----------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model, surrogate, x = load_setup(args)
    models = {m: ss.smooth(model, m, surrogate=surrogate if m == "surrogate" else None) for m in ss.METHODS}
    if args.impl == "smoothsal":
        run = lambda ms, t, s: run_smoothsal(ms, t, s, args.impl_precision)
    else:
        run = run_captum
    # warm-up: baselines, converted copies, allocator, oneDNN kernels (at the timed batch size: cheap here)
    run(models, x[:1], args.samples if args.impl == "smoothsal" else 2)
    cpu, start = time.process_time(), time.perf_counter()
    maps = run(models, x, args.samples)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    torch.save({"|".join(k): torch.cat(v) for k, v in maps.items()}, args.out)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out).with_suffix(".json").write_text(
        json.dumps({"seconds": seconds, "cpu": cpu, "peak_mb": peak_mb})
    )


def spawn(args: argparse.Namespace, impl: str, precision: str, out: Path, setup: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--impl", impl, "--impl-precision", precision, "--out", str(out)]
    cmd += [f"--{k}={getattr(args, k)}" for k in ("tiles", "size", "samples", "threads")]
    cmd += ["--setup", str(setup)] if setup else []
    subprocess.run(cmd, check=True)
    result = json.loads(out.with_suffix(".json").read_text())
    result["maps"] = torch.load(out)
    return result


def largest_difference(ours: dict, ref: dict) -> float:
    if any(ours[k].isnan().any() or ref[k].isnan().any() for k in ref):
        return float("nan")
    return max(float((ours[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", nargs="+", choices=ss.attribution.PRECISIONS)
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (with --precision)")
    parser.add_argument("--captum-repeats", type=int, help="runs of the Captum loop (default: --repeats)")
    parser.add_argument("--model", help=f"trained resnet18 checkpoint (default {DEMO_MODEL} if present)")
    parser.add_argument(
        "--device", default="cpu", help="cuda: time on the GPU in one process (see gpu_matrix)"
    )
    parser.add_argument("--arch", nargs="+", default=["resnet18"], help="with --device cuda")
    parser.add_argument("--impl", choices=("smoothsal", "captum"))
    parser.add_argument("--impl-precision", default="fp32")
    parser.add_argument("--setup")
    parser.add_argument("--out")
    args = parser.parse_args()
    print(describe(args.device), flush=True)  # the machine every figure below was measured on
    if args.impl:
        return child(args)
    if args.device != "cpu":
        return gpu_matrix(args)
    if args.precision:
        return compare_precisions(args)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl in ("captum", "smoothsal"):
            results[impl] = spawn(args, impl, "fp32", Path(tmp) / f"{impl}.pt", None)
    worst = largest_difference(results["smoothsal"]["maps"], results["captum"]["maps"])
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


# --- --precision ----------------------------------------------------------------------------------


def compare_precisions(args: argparse.Namespace) -> None:
    precisions = list(dict.fromkeys(["fp32", *args.precision]))
    variants = [("captum", "fp32"), *(("smoothsal", p) for p in precisions)]
    repeats = {v: args.repeats for v in variants} | {("captum", "fp32"): args.captum_repeats or args.repeats}
    load_before = os.getloadavg()
    runs: dict[tuple[str, str], list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        setup, source = prepare_trained(args, Path(tmp))
        for r in range(max(repeats.values())):
            for v in variants:
                if r < repeats[v]:
                    runs[v].append(spawn(args, *v, Path(tmp) / f"{v[0]}-{v[1]}-{r}.pt", setup))
    best = {v: min(rs, key=lambda d: d["seconds"]) for v, rs in runs.items()}
    print(f"ResNet18 ({source}), {args.size} px demo crops, SmoothGrad n={args.samples} σ={STDEV}, "
          f"{args.tiles} tiles, {len(ss.METHODS)} methods × {len(ss.ATTRIBUTIONS)} attributions × "
          f"{len(LAYERS)} layers, {args.threads} threads; each variant in a fresh process after a warm-up, "
          f"interleaved, minimum of {args.repeats} runs (Captum {repeats[('captum', 'fp32')]})")  # fmt: skip
    print(f"  load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} (1 min)")
    fp32, captum = best[("smoothsal", "fp32")]["seconds"], best[("captum", "fp32")]["seconds"]
    print(f"  {'':16s} {'tiles/s':>8s} {'s/tile':>8s} {'CPU s/tile':>10s} {'×Captum':>8s} {'×fp32':>6s} "
          f"{'peak RSS':>9s}  all runs (s)")  # fmt: skip
    for v in variants:
        b, name = best[v], "Captum loop" if v[0] == "captum" else f"smoothsal {v[1]}"
        all_runs = " ".join(f"{d['seconds']:.1f}" for d in runs[v])
        print(f"  {name:16s} {args.tiles / b['seconds']:8.3f} {b['seconds'] / args.tiles:8.2f} "
              f"{b['cpu'] / args.tiles:10.2f} {captum / b['seconds']:8.2f} {fp32 / b['seconds']:6.2f} "
              f"{b['peak_mb']:7.0f} MB  {all_runs}")  # fmt: skip
    ref = best[("smoothsal", "fp32")]["maps"]
    worst = largest_difference(ref, best[("captum", "fp32")]["maps"])
    print(f"  smoothsal fp32 vs Captum: largest relative difference {worst:.2e}")
    for p in precisions[1:]:
        print_deviation(p, best[("smoothsal", p)]["maps"], ref)


def print_deviation(
    precision: str, ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], per_row: bool = True
) -> None:
    from smoothsal.metrics import total_variation

    print(f"  {precision} against fp32, per tile on the channel-summed maps (TV: change of the mean TV):")
    if per_row:
        print(f"    {'method':14s} {'attribution':11s} {'layer':6s} {'rel.err median':>14s} {'max':>7s} "
              f"{'cosine min':>10s} {'TV':>8s}")  # fmt: skip
    summary: dict[str, list] = {a: [[], [], []] for a in ss.ATTRIBUTIONS}
    for key, value in ref.items():
        low, high = ours[key].sum(1).flatten(1), value.sum(1).flatten(1)
        rel = (low - high).norm(dim=1) / high.norm(dim=1).clamp_min(1e-30)
        lc, hc = low - low.mean(1, keepdim=True), high - high.mean(1, keepdim=True)
        cos = (lc * hc).sum(1) / (lc.norm(dim=1) * hc.norm(dim=1)).clamp_min(1e-30)
        tv = float(total_variation(ours[key]).mean() / total_variation(value).mean() - 1)
        method, a, layer = key.split("|")
        for values, measure in zip(summary[a], (rel, cos, tv), strict=True):
            values.append(measure)
        if per_row:
            print(f"    {method:14s} {a:11s} {layer:6s} {float(rel.median()):14.4f} {float(rel.max()):7.4f} "
                  f"{float(cos.min()):10.5f} {tv:+8.3%}")  # fmt: skip
    for a, (rels, coss, tvs) in summary.items():
        rel, cos = torch.cat(rels), torch.cat(coss)
        print(f"    {a}, all methods and layers: relative error median {float(rel.median()):.4f}, "
              f"max {float(rel.max()):.4f}; centred cosine min {float(cos.min()):.5f}; "
              f"TV change within {max(map(abs, tvs)):.3%}")  # fmt: skip


# --- --device cuda ---------------------------------------------------------------------------------


def gpu_matrix(args: argparse.Namespace) -> None:
    """The full matrix on one GPU for each ``--arch`` (seeded random weights, BatchNorm statistics as
    trained): the Captum loop (IEEE fp32) and each precision in one process, interleaved, ``--repeats``
    runs after a warm-up, minimum taken; peak GPU memory per variant. 4 tiles per attribute call."""
    device = torch.device(args.device)
    precisions = list(dict.fromkeys(["fp32", *(args.precision or ["fp32", "tf32", "bf16"])]))
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, {args.size} px, SmoothGrad "
          f"n={args.samples} σ={STDEV}, {args.tiles} tiles, {len(ss.METHODS)} methods × "
          f"{len(ss.ATTRIBUTIONS)} attributions × {len(LAYERS)} layers; minimum of {args.repeats} "
          f"interleaved runs after a warm-up")  # fmt: skip
    for arch in args.arch:
        torch.manual_seed(0)
        model = ss.load_model(arch, num_classes=2)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        surrogate = ss.SurrogatePaths.for_model(model, torch.zeros(1, 3, args.size, args.size))
        models = {
            m: ss.smooth(model, m, surrogate=surrogate if m == "surrogate" else None).to(device)
            for m in ss.METHODS
        }
        x = tiles(args.tiles, args.size).to(device)
        variants = {"Captum loop": ("captum", "fp32")} | {
            f"smoothsal {p}": ("smoothsal", p) for p in precisions
        }
        seconds, peak, maps = {v: [] for v in variants}, {}, {}
        for impl, p in variants.values():
            _gpu_run(models, x[:1], args.samples, impl, p)  # warm-up
        for _ in range(args.repeats):
            for name, (impl, p) in variants.items():
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                maps[name] = _gpu_run(models, x, args.samples, impl, p)
                torch.cuda.synchronize(device)
                seconds[name].append(time.perf_counter() - start)
                peak[name] = torch.cuda.max_memory_allocated(device) / 2**20
        captum, fp32 = min(seconds["Captum loop"]), min(seconds["smoothsal fp32"])
        print(f"  {arch:16s} {'tiles/s':>8s} {'×Captum':>8s} {'×fp32':>6s} {'peak GPU':>10s}  all runs (s)")
        for name, runs in seconds.items():
            best = min(runs)
            print(f"  {name:16s} {args.tiles / best:8.2f} {captum / best:8.2f} {fp32 / best:6.2f} "
                  f"{peak[name]:6.0f} MiB  {' '.join(f'{r:.2f}' for r in runs)}")  # fmt: skip
        ref = {"|".join(k): torch.cat(v).cpu() for k, v in maps["smoothsal fp32"].items()}
        for p in precisions[1:]:
            ours = {"|".join(k): torch.cat(v).cpu() for k, v in maps[f"smoothsal {p}"].items()}
            print_deviation(p, ours, ref, per_row=False)


def _gpu_run(models: dict[str, nn.Module], x: torch.Tensor, samples: int, impl: str, precision: str) -> dict:
    if impl == "smoothsal":
        return run_smoothsal(models, x, samples, precision, per_call=4)
    return _captum_ieee(models, x, samples)


def _captum_ieee(models: dict[str, nn.Module], x: torch.Tensor, samples: int) -> dict:
    conv = torch.backends.cudnn.conv
    old, conv.fp32_precision = conv.fp32_precision, "ieee"
    try:
        return run_captum(models, x, samples)
    finally:
        conv.fp32_precision = old


if __name__ == "__main__":
    main()
