"""The fp32 tolerance rule, grounded in fp64 rather than in one CPU's rounding.

fp32 sums come out in another order on AVX2 and AVX-512 kernels and with another batch size, so a
fixed "equal to Captum within 1e-5" holds on one CPU and fails on the next. The rule instead:

- smoothsal's fp64 result equals Captum's fp64 result to ``FP64_AGREEMENT`` (relative to max|ref|):
  the two compute the same thing;
- smoothsal's fp32 result lies no further (max abs) from smoothsal's fp64 result than ``FP32_FACTOR``
  times Captum's own fp32 result lies from Captum's fp64 result on the same input, with a floor of
  ``FLOOR_EPS`` · ε₃₂ · max|ref|: smoothsal's fp32 is as exact as Captum's fp32, on whatever CPU runs it.
"""

from __future__ import annotations

import copy

import torch
from captum.attr import LayerDeepLift, LayerGradientXActivation, NoiseTunnel
from torch import nn

import smoothsal as ss

EPS32 = torch.finfo(torch.float32).eps
FP64_AGREEMENT = 1e-10
FP32_FACTOR = 4.0
FLOOR_EPS = 10.0


def max_abs(t: torch.Tensor) -> float:
    return float(t.detach().double().abs().max())


class PerClassLogits(nn.Module):
    """Captum needs ``[B, classes]``: segmentation logits summed over pixels (1×1 maps squeezed)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out.flatten(2).sum(-1) if out.ndim > 2 else out


def fp64_twin(model: nn.Module) -> nn.Module:
    """A float64 copy (the model itself is left alone)."""
    return copy.deepcopy(model).double()


def captum(
    model: nn.Module,
    x: torch.Tensor,
    layer: str | list[str],
    target,
    attribution: str,
    samples: int = 0,
    stdev: float = 0.0,
    seed: int = 0,
    samples_batch: int | None = None,
):
    """Captum's plain call for one attribution (NoiseTunnel's own noise when ``samples``), in the
    model's dtype: the fp32 or fp64 reference. A list of layers (gradient only: Captum's layer
    gradient takes several at once) gives a list of results."""
    if isinstance(layer, list) and samples:  # NoiseTunnel takes one layer's output
        return [captum(model, x, n, target, attribution, samples, stdev, seed, samples_batch) for n in layer]
    forward = PerClassLogits(model)
    several = isinstance(layer, list)
    names = [ss.resolve_layer(model, n, example=x[:1]) for n in (layer if several else [layer])]  # trace x
    modules = [model.get_submodule(n) for n in names]
    if attribution == "gradient":
        target_layer = modules if several else modules[0]
        method, extra = LayerGradientXActivation(forward, target_layer, multiply_by_inputs=False), {}
    else:
        assert not several, "Captum's LayerDeepLift takes one layer"
        method, extra = (
            LayerDeepLift(forward, modules[0], multiply_by_inputs=True),
            {"baselines": torch.zeros_like(x)},
        )
    if not samples:
        out = method.attribute(x, target=target, **extra)
    else:
        torch.manual_seed(seed)  # NoiseTunnel draws fp32 noise whatever the input's dtype: same draws in fp64
        out = NoiseTunnel(method).attribute(
            x, nt_type="smoothgrad", nt_samples=samples, stdevs=stdev, target=target,
            nt_samples_batch_size=samples_batch, **extra,
        )  # fmt: skip
    return [t.detach() for t in out] if several else out.detach()


def captum_all(model: nn.Module, x: torch.Tensor, layers: list[str], target, **noise) -> dict:
    """attribution → layer → (fp32, fp64) Captum results: gradient of every layer in one call per
    dtype, DeepLift one layer at a time."""
    twin, x64 = fp64_twin(model), x.double()
    grads = zip(
        captum(model, x, layers, target, "gradient", **noise),
        captum(twin, x64, layers, target, "gradient", **noise),
        strict=True,
    )
    return {
        "gradient": dict(zip(layers, grads, strict=True)),
        "deeplift": {
            n: (
                captum(model, x, n, target, "deeplift", **noise),
                captum(twin, x64, n, target, "deeplift", **noise),
            )
            for n in layers
        },
    }


def captum_pair(model: nn.Module, x: torch.Tensor, layer: str, target, attribution: str, **noise):
    """Captum's fp32 and fp64 results for the same input (and the same noise draws)."""
    return (
        captum(model, x, layer, target, attribution, **noise),
        captum(fp64_twin(model), x.double(), layer, target, attribution, **noise),
    )


def fp32_bound(captum32: torch.Tensor, captum64: torch.Tensor) -> float:
    """How far (max abs) an fp32 result may lie from its fp64 twin on this CPU (see the module)."""
    own = max_abs(captum32.double() - captum64)
    return max(FP32_FACTOR * own, FLOOR_EPS * EPS32 * max_abs(captum64))


def fp32_error(ours32: torch.Tensor, ours64: torch.Tensor) -> float:
    return max_abs(ours32.double() - ours64)


def assert_fp64_agrees(ours64: torch.Tensor, captum64: torch.Tensor, what: object = "") -> None:
    assert ours64.dtype == torch.float64 and captum64.dtype == torch.float64
    assert max_abs(ours64 - captum64) <= FP64_AGREEMENT * max_abs(captum64), what


def assert_fp32_within(ours32: torch.Tensor, ours64: torch.Tensor, bound: float, what: object = "") -> None:
    error = fp32_error(ours32, ours64)
    assert error <= bound, f"{what}: fp32 lies {error:.3g} from fp64, allowed {bound:.3g}"
