"""The CUDA path, for real (marked ``gpu``; skipped without a CUDA device): ``attribute`` on CUDA equals
the CPU in fp32 with TF32 off, the bf16 and tf32 gates hold on CUDA, ``max_batch="auto"`` fits the
free memory, ``smoothsal saliency --device cuda`` resumes after a kill to the same result, and
``train-surrogate`` under torchrun with nccl matches gloo on CPU. Run them with ``pytest -m gpu``
(benchmarks/gpu_check.sh does, then times the GPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import model as build_model
from test_precision import SMOOTHGRAD, agreement, missed, trained  # noqa: F401 (trained: a fixture)
from test_saliency import assert_same_outputs, saliency_args

import smoothsal as ss
from smoothsal.cli import main

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
    ),
]
LAYERS = ["layer1", "layer2", "layer3"]


def killed_after(batches: int) -> tuple[list[str], dict[str, str]]:
    """Extra arguments and environment that make `smoothsal saliency` SIGKILL itself after ``batches``
    batches. When the kill switch becomes an env var (issue 13), this is the one line to change:
    ``return [], {"SMOOTHSAL_KILL_AT": f"saliency.batch={batches}"}``."""
    return ["--stop-after-batches", str(batches)], {}


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
def test_low_precision_gates_hold_on_cuda(trained, low):  # noqa: F811
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


@pytest.fixture(scope="module")
def cmu(slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    slide = slides_dir / "CMU-1-Small-Region.svs"
    tiles = tmp_path_factory.mktemp("cuda_tiles") / "cmu.parquet"
    assert main(["tiles", str(slide), "--tile-size", "64", "--max-tiles", "12", "--out", str(tiles)]) == 0
    return slide, tiles


def test_cuda_saliency_killed_then_resumed_gives_the_uninterrupted_result(cmu, tmp_path: Path):
    """`smoothsal saliency --device cuda`: SIGKILLed after 2 batches of 3, resumed with batches of 4: the
    store and table of an uninterrupted run with batches of 5."""
    slide, tiles = cmu
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    cuda = ["--device", "cuda", "--workers", "0"]
    assert main([*saliency_args(slide, tiles, reference, "forward_hook", *cuda), "--batch-size", "5"]) == 0
    args = saliency_args(slide, tiles, resumed, "forward_hook", *cuda)
    kill_args, kill_env = killed_after(2)
    killed = subprocess.run(
        [sys.executable, "-m", "smoothsal.cli", *args, "--batch-size", "3", *kill_args],
        env=os.environ | kill_env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (resumed / "forward_hook.zarr").exists()
    assert main([*args, "--batch-size", "4"]) == 0
    assert_same_outputs(reference, resumed)


# --- train-surrogate: nccl on GPU against gloo on CPU ------------------------------------------------


@pytest.fixture(scope="module")
def surrogate_inputs(slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """test_training's setting: 32 labelled 64-px tiles of CMU-1-Small-Region.svs, a seeded resnet18."""
    import torchvision

    work = tmp_path_factory.mktemp("cuda_training")
    annotation = work / "left-half.geojson"
    polygon = [[0, 0], [1100, 0], [1100, 2967], [0, 2967], [0, 0]]
    feature = {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
               "geometry": {"type": "Polygon", "coordinates": [polygon]}}  # fmt: skip
    annotation.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    tiles = work / "tiles.parquet"
    args = ["tiles", str(slides_dir / "CMU-1-Small-Region.svs"), "--annotations", str(annotation)]
    args += [
        "--tile-size",
        "64",
        "--target-mpp",
        "2.0",
        "--max-tiles",
        "32",
        "--seed",
        "0",
        "--out",
        str(tiles),
    ]
    assert main(args) == 0
    torch.manual_seed(0)
    checkpoint = work / "model.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=2).state_dict(), checkpoint)
    return tiles, checkpoint


def train_surrogate(tiles: Path, checkpoint: Path, out: Path, nproc: int, env: dict[str, str]) -> str:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    args = ["train-surrogate", "--arch", "resnet18", "--num-classes", "2", "--checkpoint", str(checkpoint),
            "--tiles", str(tiles), "--out", str(out), "--epochs", "3", "--batch-size", "8", "--workers", "0",
            "--no-progress"]  # fmt: skip
    run = subprocess.run(
        [*launch, "-m", "smoothsal.cli", *args], env=os.environ | env, capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_train_surrogate_under_torchrun_with_nccl_matches_gloo_on_cpu(surrogate_inputs, tmp_path: Path):
    """12 steps (3 epochs × 4, global batch 8): nccl on the GPUs (1 or 2 processes, TF32 off through
    NVIDIA_TF32_OVERRIDE=0) and 2 gloo processes on CPU agree to test_training's tolerances (losses rtol
    1e-4, weights rtol 1e-3 / atol 1e-5)."""
    tiles, checkpoint = surrogate_inputs
    gpus = min(2, torch.cuda.device_count())
    nccl = train_surrogate(tiles, checkpoint, tmp_path / "nccl.pt", gpus, {"NVIDIA_TF32_OVERRIDE": "0"})
    assert f"{gpus} process(es)" in nccl and "peak GPU MB" in nccl
    gloo = train_surrogate(tiles, checkpoint, tmp_path / "gloo.pt", 2, {"CUDA_VISIBLE_DEVICES": ""})
    assert "2 process(es)" in gloo and "peak GPU MB" not in gloo
    losses = [pd.read_csv(tmp_path / f"{n}.losses.csv") for n in ("nccl", "gloo")]
    assert list(losses[0]["steps"]) == [4, 8, 12]
    pd.testing.assert_frame_equal(losses[0], losses[1], rtol=1e-4)
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True)["state_dict"] for n in ("nccl", "gloo"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)
