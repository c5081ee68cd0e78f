"""The CUDA path, for real (marked ``gpu``; skipped without a CUDA device): ``attribute`` on CUDA equals
the CPU in fp32 with TF32 off, the bf16 and tf32 gates hold on CUDA, ``max_batch="auto"`` fits the
free memory, ``smoothsal saliency --device cuda`` resumes after a kill to the same result, and
``train-surrogate`` under torchrun with nccl matches gloo on CPU. Run them with ``pytest -m gpu``
(benchmarks/gpu_check.sh does, then times the GPU)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import CMU, PRECISION_LAYERS, SURROGATE_EPOCHS, agreement, missed, train_args
from helpers import PRECISION_SMOOTHGRAD as SMOOTHGRAD
from helpers import model as build_model

import smoothsal as ss
from smoothsal import store

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
    ),
]
LAYERS = list(PRECISION_LAYERS)


def max_relative_difference(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def fp32_flags() -> tuple[str, ...]:
    return (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_cuda_fp32_equals_cpu_with_tf32_off(arch):
    """Every method, both attributions, layer1-3, on SmoothGrad-like inputs made once (the CUDA noise
    generator draws other numbers): max |CUDA − CPU| / max |CPU| <= 1e-4 for the sample means. TF32 is
    what PyTorch uses for fp32 cuDNN convolutions by default; precision="fp32" turns it off for the call
    and restores the flags. ResNet50 checks DeepLift only: its random-init gradient flips ReLU masks under
    any change of kernel (3e-3 measured between two fp32 CPU kernels)."""
    net = build_model(arch)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    noisy = x.repeat_interleave(4, 0) + 0.2 * torch.randn(8, 3, 64, 64)
    surrogate = ss.SurrogatePaths.for_model(net, x[:1])
    for p in surrogate.parameters():
        torch.nn.init.normal_(p, std=0.05)
    attributions = ss.ATTRIBUTIONS if arch == "resnet18" else ("deeplift",)
    flags = fp32_flags()
    for method in ss.METHODS:
        smoothed = ss.smooth(net, method, surrogate=surrogate if method == "surrogate" else None)
        cpu = ss.attribute(smoothed, noisy, layers=LAYERS, target=1, attributions=attributions)
        cuda = ss.attribute(smoothed.cuda(), noisy.cuda(), layers=LAYERS, target=1, attributions=attributions)
        assert fp32_flags() == flags
        for a in attributions:
            for layer in LAYERS:
                assert cuda[a][layer].dtype == torch.float32 and cuda[a][layer].is_cuda
                ours, ref = (
                    cuda[a][layer].unflatten(0, (2, 4)).mean(1),
                    cpu[a][layer].unflatten(0, (2, 4)).mean(1),
                )
                assert max_relative_difference(ours, ref) <= 1e-4, (method, a, layer)


@pytest.mark.parametrize("low", ["bf16", "tf32"])
def test_low_precision_gates_hold_on_cuda(trained, low):
    """The gates of test_precision (the trained demo classifier, SmoothGrad, every method, layer1-3)
    for bf16 and tf32 against fp32, all on CUDA; DeepLift without SmoothGrad too."""
    assert not missed(agreement(*trained, SMOOTHGRAD, device="cuda", low=low))
    assert not missed(agreement(*trained, None, attributions=("deeplift",), device="cuda", low=low))


def test_auto_max_batch_fits_the_free_memory_and_changes_no_result():
    """16 tiles × 20 samples at 224 px (320 inputs) through ResNet50 in bf16: the batch max_batch="auto"
    picks runs within the free memory and gives the per-tile-seeded DeepLift of fixed batches of 20 (to
    bf16 rounding: other batches, other cuDNN kernels; the random-init gradient is too chaotic to compare)."""
    net = ss.smooth(build_model("resnet50"), "forward_hook").cuda()
    x = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(0)).cuda()
    args = {"layers": LAYERS, "target": 1, "smoothgrad": SMOOTHGRAD, "noise_seeds": list(range(16))}
    fixed = ss.attribute(net, x, **args, max_batch=20, precision="bf16")
    torch.cuda.synchronize()
    free, _ = torch.cuda.mem_get_info()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    auto = ss.attribute(net, x, **args, precision="bf16")
    peak = torch.cuda.max_memory_allocated() - start
    print(f"max_batch='auto': peak {peak / 2**30:.2f} GiB of {free / 2**30:.1f} GiB free")
    assert peak <= 0.9 * free
    for layer in LAYERS:
        assert max_relative_difference(auto["deeplift"][layer], fixed["deeplift"][layer].cpu()) <= 1e-2
        assert auto["gradient"][layer].isfinite().all()


SAMPLES = 2


def saliency_args(slide: Path, tiles: Path, out: Path, *extra: str) -> list[object]:
    """`smoothsal saliency` of forward_hook maps at layer1-3, SmoothGrad with SAMPLES samples, on CUDA."""
    return ["saliency", slide, "--tiles", tiles, "--arch", "resnet18", "--num-classes", "2", "--method",
            "forward_hook", "--layers", *LAYERS, "--smoothgrad-samples", SAMPLES, "--no-progress", "--device",
            "cuda", "--workers", "0", "--out", out / "forward_hook.zarr", "--table", out / "forward_hook.parquet",
            *extra]  # fmt: skip


def assert_same_outputs(a: Path, b: Path) -> None:
    """Two saliency runs' stores (metadata and maps) and tables agree (to the rounding of other batches)."""
    stores = [store.open_store(d / "forward_hook.zarr") for d in (a, b)]
    assert stores[0].meta == stores[1].meta
    for attribution in stores[0].attributions:
        for layer in stores[0].layers:
            ref, ours = (s.array(attribution, layer)[:] for s in stores)
            np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    tables = [store.read_results(d / "forward_hook.parquet").table for d in (a, b)]
    pd.testing.assert_frame_equal(tables[0], tables[1], rtol=1e-5)


@pytest.fixture(scope="module")
def cmu_tiles(cli, slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    slide = slides_dir / CMU
    tiles = tmp_path_factory.mktemp("cuda_tiles") / "cmu.parquet"
    cli("tiles", slide, "--tile-size", "64", "--max-tiles", "12", "--out", tiles)
    return slide, tiles


def test_cuda_saliency_killed_then_resumed_gives_the_uninterrupted_result(cli, cmu_tiles, tmp_path: Path):
    """`smoothsal saliency --device cuda`: SIGKILLed after 2 batches of 3, resumed with batches of 4: the
    store and table of an uninterrupted run with batches of 5."""
    slide, tiles = cmu_tiles
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    cli(*saliency_args(slide, tiles, reference), "--batch-size", "5")
    args = saliency_args(slide, tiles, resumed)
    killed = cli.process(*args, "--batch-size", "3", kill_at="saliency.batch=2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (resumed / "forward_hook.zarr").exists()
    cli(*args, "--batch-size", "4")
    assert_same_outputs(reference, resumed)


# --- train-surrogate: nccl on GPU against gloo on CPU ------------------------------------------------


def train_surrogate(cli, tiles: Path, model: Path, out: Path, nproc: int, env: dict[str, str]) -> str:
    """conftest's tiny train-surrogate setting (32 tiles of CMU, seeded resnet18, 3 epochs × 4 steps)."""
    run = subprocess.run(
        cli.command(*train_args(tiles, model, out), nproc=nproc), env=cli.env() | env, capture_output=True,
        text=True, timeout=600, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_train_surrogate_under_torchrun_with_nccl_matches_gloo_on_cpu(
    cli, surrogate_tiles: Path, surrogate_model: Path, tmp_path: Path
):
    """12 steps (3 epochs × 4, global batch 8): nccl on the GPUs (1 or 2 processes, TF32 off through
    NVIDIA_TF32_OVERRIDE=0) and 2 gloo processes on CPU agree to test_surrogate_run's tolerances (losses
    rtol 1e-4, weights rtol 1e-3 / atol 1e-5)."""
    gpus = min(2, torch.cuda.device_count())
    args = (cli, surrogate_tiles, surrogate_model)
    nccl = train_surrogate(*args, tmp_path / "nccl.pt", gpus, {"NVIDIA_TF32_OVERRIDE": "0"})
    assert f"{gpus} process(es)" in nccl and "peak GPU MB" in nccl
    gloo = train_surrogate(*args, tmp_path / "gloo.pt", 2, {"CUDA_VISIBLE_DEVICES": ""})
    assert "2 process(es)" in gloo and "peak GPU MB" not in gloo
    losses = [pd.read_csv(tmp_path / f"{n}.losses.csv") for n in ("nccl", "gloo")]
    assert list(losses[0]["steps"]) == [4 * (e + 1) for e in range(SURROGATE_EPOCHS)]
    pd.testing.assert_frame_equal(losses[0], losses[1], rtol=1e-4)
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True)["state_dict"] for n in ("nccl", "gloo"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)
