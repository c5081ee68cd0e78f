#!/usr/bin/env bash
# The GPU path in one script (sized for < 8 min on one H200):
#   (1) pytest -m gpu: CUDA attribute = CPU in fp32 (TF32 off), bf16/tf32 gates on CUDA, max_batch="auto"
#       within the free memory, `saliency --device cuda` killed and resumed = uninterrupted, train-surrogate
#       under torchrun with nccl = gloo on CPU;
#   (2) the full attribution matrix (4 methods x gradient/DeepLift x layer1-3, 224 px, SmoothGrad n = 20) on
#       the GPU for ResNet18 and ResNet50 at fp32, TF32 and bf16, with peak GPU memory, and the Captum loop on
#       the same GPU for the ratio.
#
# Assumes: run from the root of a copy of this repository (any directory works: it cds there) with
# smoothsal and its test extras installed (`pip install -e '.[test]'`, torch built with CUDA), at least one
# CUDA GPU, and the test data at ../shared/data next to the repository or at $SMOOTHSAL_DATA
# (tests use slides/CMU-1-Small-Region.svs). No network access needed.
#
#   bash benchmarks/gpu_check.sh [extra pytest arguments]
# Exit status: that of the tests (the benchmark still runs when a test fails).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: torch.cuda.is_available() is False")' || exit 2
python -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version(), "|", torch.cuda.get_device_name(0))'
nvidia-smi --query-gpu=name,memory.total,memory.used,utilization.gpu --format=csv 2>/dev/null || true

echo "== (1) pytest -m gpu"
timeout 360 python -m pytest -q -m gpu -p no:cacheprovider -rs --durations=8 tests/test_gpu.py "$@"
tests=$?
echo "== tests: exit $tests after $(( $(date +%s) - start )) s"

echo "== (2) full matrix on the GPU"
timeout 180 python benchmarks/attribution.py --device cuda --arch resnet18 resnet50 \
    --precision fp32 tf32 bf16 --tiles 8 --samples 20 --size 224 --repeats 3
echo "== benchmark: exit $? after $(( $(date +%s) - start )) s in all"
exit $tests
