"""Every downsampling op of a model, with the smoothing methods that change it: the listing behind
``smoothsal inspect``.

Found from one traced forward (``stages.trace``): conv modules with a stride above 1 (any kernel, kernel-2
patchify convs, grouped/depthwise, dilated, subclasses such as timm's ``Conv2dSame``), pooling modules
(``MaxPool2d``, ``AvgPool2d``) with a stride above 1, and functional ``F.max_pool2d`` / ``F.avg_pool2d``
/ ``torch.max_pool2d`` / ``F.conv2d`` calls with a stride above 1 made by modules that are not
themselves convs or pools (Inception's ``F.max_pool2d``). Only the convs that
``smoothing.downsampling_convs`` lists (every stride-2 conv but the stem) are changed by a smoothing
method; pools and functional calls never are, and saying so is the point of the listing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .stages import FunctionalCall, ModuleRun, trace

__all__ = ["DownsamplingOp", "downsampling_ops"]

_POOLS = (nn.MaxPool2d, nn.AvgPool2d)


@dataclass(frozen=True)
class DownsamplingOp:
    """One downsampling op, in forward order.

    ``name``: the qualified module name, or ``"owner:F.max_pool2d#k"`` for the k-th (from 1) such
    functional call by module ``owner`` (``""`` = the model itself); ``kind``: ``"conv"``, ``"pool"`` or
    ``"functional"``; ``op``: the module's class name or the function; ``groups`` is 1 for pools;
    ``padding`` may be a string (``"same"``); ``in_class`` / ``out_class``: resolution classes of its input
    and output (``stages.resolution_class``; None for a 1×1 or non-map tensor); ``changed_by``: the
    smoothing methods that change it (empty: every method leaves it as trained).
    """

    name: str
    kind: str
    op: str
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int
    dilation: tuple[int, ...]
    padding: tuple[int, ...] | str
    in_class: int | None
    out_class: int | None
    changed_by: tuple[str, ...]


def _pair(value: object, default: int) -> tuple[int, ...]:
    if value is None or (isinstance(value, (tuple, list)) and not value):
        value = default
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value)
    return (int(value),) * 2


def _module_op(name: str, module: nn.Module, run: ModuleRun, changed: tuple[str, ...]) -> DownsamplingOp:
    if isinstance(module, nn.Conv2d):
        return DownsamplingOp(
            name, "conv", type(module).__name__, tuple(module.kernel_size), tuple(module.stride),
            module.groups, tuple(module.dilation),
            module.padding if isinstance(module.padding, str) else tuple(module.padding),
            run.in_class, run.out_class, changed,
        )  # fmt: skip
    kernel = _pair(module.kernel_size, 1)
    return DownsamplingOp(
        name, "pool", type(module).__name__, kernel, _pair(module.stride, kernel[0]), 1,
        _pair(getattr(module, "dilation", 1), 1), _pair(module.padding, 0), run.in_class, run.out_class, (),
    )  # fmt: skip


def _functional_op(call: FunctionalCall) -> DownsamplingOp | None:
    params = dict(call.params)
    conv = "conv2d" in call.func
    kernel = () if conv else _pair(params.get("kernel_size"), 1)
    stride = _pair(params.get("stride"), 1 if conv else kernel[0])
    if max(stride) <= 1:
        return None
    padding = params.get("padding", 0)
    return DownsamplingOp(
        f"{call.owner}:{call.func}#{call.index}", "functional", call.func, kernel, stride,
        int(params.get("groups", 1)), _pair(params.get("dilation"), 1),
        padding if isinstance(padding, str) else _pair(padding, 0), call.in_class, call.out_class, (),
    )  # fmt: skip


def _downsamples(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return max(module.stride) > 1
    if isinstance(module, _POOLS):
        kernel = _pair(module.kernel_size, 1)
        return max(_pair(module.stride, kernel[0])) > 1
    return False


def downsampling_ops(model: nn.Module, example: torch.Tensor | None = None) -> list[DownsamplingOp]:
    """Every downsampling op that a forward of ``example`` (default: a zero 224-px input) runs, in the
    order they finish; each module once (its first run). The model is left as it was (eval mode and no
    gradients only during the trace)."""
    from .smoothing import METHODS, downsampling_convs  # smoothing imports models, which imports stages

    t = trace(model, example)
    changed = set(downsampling_convs(model, example))
    methods = tuple(sorted(m for m in METHODS if m != "original"))
    modules = dict(model.named_modules())
    timed: list[tuple[int, DownsamplingOp]] = []
    seen: set[str] = set()
    for run in t.runs:
        module = modules.get(run.name)
        if module is not None and run.name not in seen and _downsamples(module):
            seen.add(run.name)
            op = _module_op(run.name, module, run, methods if run.name in changed else ())
            timed.append((run.end, op))
    for call in t.calls:
        op = _functional_op(call)
        if op is not None:
            timed.append((call.order, op))
    return [op for _, op in sorted(timed, key=lambda pair: pair[0])]
