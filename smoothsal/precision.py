"""The arithmetic of an attribution pass: fp32 (exact), tf32 (CUDA) or bf16 (AMX / tensor cores);
and fp64, the library's reference arithmetic (tests ground fp32's tolerance in it; not a CLI choice).

bf16 and tf32 run on a converted copy of the model (the given model is never changed): frozen
weights, every BatchNorm folded into its conv (in fp32, before rounding: one op fewer forward and
backward), channels_last (what oneDNN and cuDNN compute in), and for bf16 bf16 weights. fp32 runs on
the model itself, in IEEE fp32 also on CUDA (where PyTorch otherwise runs fp32 convolutions in TF32).
fp64 runs on a float64 copy, noise added and every sum taken in float64, maps returned as float64.
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .errors import BadOption
from .hardware import hardware
from .hooks import Hooks

__all__ = [
    "AUTO",
    "CHOICES",
    "PRECISIONS",
    "REFERENCE",
    "Arithmetic",
    "arithmetic_of",
    "as_compute_input",
    "check_precision",
    "chosen_precision",
    "compute_model",
    "cuda_fp32_math",
    "fold_batchnorms",
    "forward",
    "resolve_precision",
    "weights_version",
]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "tf32", "bf16")  # the arithmetics a run computes in
AUTO = "auto"  # bf16 where the hardware has it natively, else fp32 (see resolve_precision)
CHOICES = (*PRECISIONS, AUTO)  # what users choose (CLI, config)
REFERENCE = "fp64"  # the library's reference arithmetic: attribute(..., precision="fp64")


def weights_version(model: nn.Module) -> int:
    """Changes whenever a parameter or buffer is modified in place (training, load_state_dict)."""
    return sum(t._version for t in model.parameters()) + sum(t._version for t in model.buffers())


@dataclass(frozen=True)
class Arithmetic:
    """How one precision computes: the dtype of weights and activations, TF32 on CUDA, layout."""

    dtype: torch.dtype
    tf32: bool
    channels_last: bool
    fold_batchnorm: bool

    @property
    def low(self) -> bool:
        """Below fp32 (bf16): the DeepLift multiplier is formed so that it never cancels."""
        return self.dtype not in (torch.float32, torch.float64)

    @property
    def accumulate(self) -> torch.dtype:
        """The dtype of noise, sums, DeepLift deltas and returned maps: fp64 for fp64, else fp32."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32


_ARITHMETIC = {
    "fp32": Arithmetic(torch.float32, tf32=False, channels_last=False, fold_batchnorm=False),
    "tf32": Arithmetic(torch.float32, tf32=True, channels_last=True, fold_batchnorm=True),
    "bf16": Arithmetic(torch.bfloat16, tf32=False, channels_last=True, fold_batchnorm=True),
    REFERENCE: Arithmetic(torch.float64, tf32=False, channels_last=False, fold_batchnorm=False),
}


def check_precision(precision: str) -> None:
    """A one-line error naming the allowed values unless ``precision`` is one of CHOICES."""
    if precision not in CHOICES:
        raise BadOption(f"unknown precision {precision!r}; allowed: {', '.join(CHOICES)}")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The precision a run computes in: ``auto`` → bf16 where ``device`` has native bf16, else fp32;
    any other choice as given. Record the result, so that a rerun does not mix precisions."""
    check_precision(precision)
    if precision == AUTO:
        return "bf16" if hardware(device).native_bf16 else "fp32"
    return precision


def chosen_precision(precision: str, device: torch.device | str) -> str:
    """``resolve_precision`` for a run that records its result: logs the one warning line when the
    result is bf16 on hardware that only emulates it (see smoothsal.hardware)."""
    resolved = resolve_precision(precision, device)
    warning = hardware(device).bf16_warning() if resolved == "bf16" else None
    if warning:
        log.warning("%s", warning)
    return resolved


def arithmetic_of(precision: str, device: torch.device) -> Arithmetic:
    """The arithmetic of one of CHOICES or REFERENCE on ``device`` (tf32 exists on CUDA only)."""
    if precision != REFERENCE:
        precision = resolve_precision(precision, device)
    if precision == "tf32" and device.type != "cuda":
        raise BadOption(f"precision 'tf32' needs a CUDA device (input is on {device}); use fp32 or bf16")
    return _ARITHMETIC[precision]


@contextmanager
def cuda_fp32_math(device: torch.device, tf32: bool) -> Iterator[None]:
    """On CUDA, fp32 convolutions and matmuls in IEEE fp32 or TF32 while active (flags restored)."""
    if device.type != "cuda":
        yield
        return
    conv, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if hasattr(conv, "conv") and hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        objects, attr, value = (conv.conv, matmul), "fp32_precision", "tf32" if tf32 else "ieee"
    else:
        objects, attr, value = (conv, matmul), "allow_tf32", tf32
    old = [getattr(o, attr) for o in objects]
    try:
        for o in objects:
            setattr(o, attr, value)
        yield
    finally:
        for o, v in zip(objects, old, strict=True):
            setattr(o, attr, v)


_COPIES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict[tuple, nn.Module]]] = (
    weakref.WeakKeyDictionary()
)


def compute_model(
    model: nn.Module, arithmetic: Arithmetic, example: torch.Tensor, layers: list[str]
) -> nn.Module:
    """The model the pass runs on: ``model`` itself in fp32, else a converted copy with frozen
    weights (BatchNorms folded, bf16 and/or channels_last), cached per model and arithmetic until
    the model's weights change."""
    if arithmetic.dtype == torch.float32 and not arithmetic.channels_last:
        return model
    param = next(model.parameters())
    modules = dict(model.named_modules())
    keep = tuple(n for n in layers if isinstance(modules[n], nn.Conv2d))  # a conv asked for stays a conv
    weights = (param.device, param.dtype, weights_version(model))
    key = (arithmetic, keep)
    if model not in _COPIES or _COPIES[model][0] != weights:
        _COPIES[model] = (weights, {})
    copies = _COPIES[model][1]
    if key not in copies:
        converted = copy.deepcopy(model).requires_grad_(False)
        if arithmetic.fold_batchnorm:
            converted = fold_batchnorms(converted, example.to(param.dtype), set(keep))
        layout = torch.channels_last if arithmetic.channels_last else torch.preserve_format
        copies[key] = converted.to(dtype=arithmetic.dtype, memory_format=layout)
    return copies[key]


def fold_batchnorms(model: nn.Module, example: torch.Tensor, keep: set[str]) -> nn.Module:
    """Every eval BatchNorm2d that normalises a conv's output, folded into that conv in fp32 (one
    op fewer each way, one rounding fewer in bf16). Pairs are found on ``example``; the folded model
    must give the same output on it, else ``model`` is returned as it was."""
    names = {m: n for n, m in model.named_modules()}
    outputs: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    calls: dict[nn.Module, int] = {}
    pairs: list[tuple[str, str]] = []

    def conv_out(m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
        calls[m] = calls.get(m, 0) + 1
        outputs[id(out)] = (m, out)

    def bn_in(m: nn.Module, inputs: tuple) -> None:
        calls[m] = calls.get(m, 0) + 1
        conv, out = outputs.get(id(inputs[0]), (None, None))
        if out is inputs[0] and names[conv] not in keep:
            pairs.append((names[conv], names[m]))

    with Hooks() as hooks, torch.no_grad(), cuda_fp32_math(example.device, tf32=False):  # IEEE fp32
        for m in names:
            if type(m) is nn.BatchNorm2d and m.track_running_stats and m.running_var is not None:
                hooks.forward_pre(m, bn_in)
            elif isinstance(m, nn.Conv2d) and m.padding_mode == "zeros":
                hooks.forward(m, conv_out)
        reference = model(example)
    pairs = [(c, b) for c, b in pairs if calls[model.get_submodule(c)] == calls[model.get_submodule(b)] == 1]
    if not pairs:
        return model
    folded = copy.deepcopy(model)
    for conv, bn in pairs:
        fused = fuse_conv_bn_eval(folded.get_submodule(conv), folded.get_submodule(bn))
        for name, new in ((conv, fused.requires_grad_(False)), (bn, nn.Identity())):
            parent, _, attr = name.rpartition(".")
            setattr(folded.get_submodule(parent), attr, new)
    with torch.no_grad(), cuda_fp32_math(example.device, tf32=False):
        result = folded(example)
    same = torch.allclose(result, reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max()))
    return folded if same else model


def as_compute_input(x: torch.Tensor, arithmetic: Arithmetic) -> torch.Tensor:
    """``x`` in the dtype and layout the compute model takes (``x`` itself in fp32)."""
    layout = torch.channels_last if arithmetic.channels_last else torch.preserve_format
    return x.to(dtype=arithmetic.dtype, memory_format=layout)


def forward(model: nn.Module, x: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """``model(x)`` without autograd, in the arithmetic ``attribute(precision=...)`` uses (on the same
    cached copy), as fp32: e.g. the predictions beside bf16 maps, which in fp32 would cost ~13 % of the
    bf16 attribution time of a batch (two forwards of 8 tiles against 20 samples each)."""
    arithmetic = arithmetic_of(precision, x.device)
    with torch.no_grad(), cuda_fp32_math(x.device, arithmetic.tf32):
        net = compute_model(model, arithmetic, x[:1], [])
        return net(as_compute_input(x, arithmetic)).float()
