"""Resolution stages from a traced forward pass: the aliases ``layer1 … layerN`` and ``blocks``, and the
resolution of every module output, so that "Layer1/2/3" means the same in every CNN family.

The paper's Layer1/2/3 are the input "downsampled 2, 3, 4 times". A module output's *resolution class*
is ``round(log2(input size / output size))`` (the same for height and width), so valid, unpadded
convolutions, which shave a few pixels, keep their class. ``layerK`` is the output of the last module,
in completion order, whose output has class K+1 (a stage container finishes after its last block, so it
wins over it; same tensor), where a module is a candidate only if

- its output is a 4-D map larger than 1×1 (a global pool's 1×1 output and the heads after it never are);
- it runs once per forward (a module that runs twice names no single tensor);
- its input is at most one class finer than its output (a whole-backbone ``features`` container that
  takes the image and ends at class 5 is no stage; its output is its last child's anyway);
- it does not run inside (its start/end nested in those of) a module run that takes class K+1 in and
  gives a coarser map out: a ResNet-50 Bottleneck runs ``conv1`` at ¼ before its stride-2 ``conv2``,
  so that block is no Layer1 candidate;
- its input is not coarser than its output (no upsampling module), and its forward starts before the
  first upsampling run starts (a run whose input is coarser than its output: a decoder's first
  ``Upsample`` / ``ConvTranspose2d`` / upsampling block, with what runs inside it). In an
  encoder–decoder only the encoder's modules count (an encoder stage that finishes at the coarsest
  class counts; decoder modules start later). This cut is taken at the first *upsampling* rather than at the first output at the coarsest
  class: both give the same Layer1/2/3 and the same U-Net encoder, but the latter would make a
  classifier's deepest alias its last downsampler (ConvNeXt ``features.6``, not the stage
  ``features.7``), since a classifier's last stage starts after its coarsest class appears.

N is the number of classes ≥ 2 found. ``blocks`` = the children of the stage modules (a stage module
without children stands for itself). The trace runs a zero example (default 224 px) in eval mode without
gradients; it is cached per model, module structure and input shape.
"""

from __future__ import annotations

import math
import re
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import BadOption, one_line
from .hooks import Hooks

__all__ = [
    "BLOCKS_ALIAS",
    "DEFAULT_SIZE",
    "FunctionalCall",
    "ModuleRun",
    "Trace",
    "layer_map",
    "resolution_class",
    "resolve_layer",
    "resolve_layers",
    "stage_blocks",
    "stage_modules",
    "stage_runs",
    "trace",
]

BLOCKS_ALIAS = "blocks"
DEFAULT_SIZE = 224
_ALIAS = re.compile(r"layer\d+")


@dataclass(frozen=True)
class ModuleRun:
    """One forward of one module: ``start``/``end`` count the pre- and post-hook events of the whole
    pass (``start < end``; a run nests inside another when its interval does). Classes and channels
    are None where the tensor is not a 4-D map larger than 1×1."""

    name: str
    start: int
    end: int
    in_class: int | None
    out_class: int | None
    channels: int | None
    out_shape: tuple[int, ...] | None


@dataclass(frozen=True)
class FunctionalCall:
    """A functional downsampling call (``F.max_pool2d`` …) made by a module that is not itself a pool or
    conv: ``owner`` the innermost running module, ``index`` counts that function's calls by that owner
    from 1; ``params`` the keyword view of its arguments (kernel_size, stride, …)."""

    owner: str
    func: str
    index: int
    order: int
    params: tuple[tuple[str, object], ...]
    in_class: int | None
    out_class: int | None


@dataclass(frozen=True)
class Trace:
    """Every module run (in completion order) and functional downsampling call of one forward."""

    size: tuple[int, int]
    runs: tuple[ModuleRun, ...]
    calls: tuple[FunctionalCall, ...]


def resolution_class(size: tuple[int, int], shape: Sequence[int]) -> int | None:
    """``round(log2(input size / output size))`` of a 4-D NCHW ``shape``, the same for height and width;
    None for anything else: a 1×1 map (a global pool), or sides of different classes, which is how a
    channels-last tensor (ConvNeXt permutes to NHWC around its LayerNorm) reads."""
    if len(shape) != 4 or shape[-2] * shape[-1] <= 1 or min(shape[-2:]) < 1:
        return None
    h, w = (round(math.log2(size[i] / shape[i - 2])) for i in (0, 1))
    return h if h == w else None


def _first_map(value: object) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value if value.dim() == 4 else None
    if isinstance(value, (tuple, list)):
        return next((t for t in map(_first_map, value) if t is not None), None)
    return None


# --- functional downsampling calls --------------------------------------------------------------

# Each function's parameters after the input, in order (the functional calls that can downsample).
_FUNCTIONAL = {
    torch.nn.functional.max_pool2d: ("F.max_pool2d", ("kernel_size", "stride", "padding", "dilation")),
    torch.nn.functional.avg_pool2d: ("F.avg_pool2d", ("kernel_size", "stride", "padding")),
    torch.max_pool2d: ("torch.max_pool2d", ("kernel_size", "stride", "padding", "dilation")),
    torch.nn.functional.conv2d: ("F.conv2d", ("weight", "bias", "stride", "padding", "dilation", "groups")),
    torch.conv2d: ("torch.conv2d", ("weight", "bias", "stride", "padding", "dilation", "groups")),
}
_OWN_OPS = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)  # their own functional call is the module itself


class _Recorder(TorchFunctionMode):
    """Records the functional downsampling calls made while ``stack`` (live module runs) is maintained."""

    def __init__(self, size: tuple[int, int], stack: list[tuple[nn.Module, str]], clock: list[int]):
        super().__init__()
        self.size, self.stack, self.clock = size, stack, clock
        self.calls: list[FunctionalCall] = []
        self.counts: Counter[tuple[str, str]] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FUNCTIONAL and self.stack and not isinstance(self.stack[-1][0], _OWN_OPS):
            self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args: tuple, kwargs: dict, out: object) -> None:
        label, names = _FUNCTIONAL[func]
        params = dict(zip(names, args[1:], strict=False)) | {k: v for k, v in kwargs.items() if k in names}
        owner = self.stack[-1][1]
        self.counts[owner, label] += 1
        x, y = _first_map(args[0]), _first_map(out)
        self.calls.append(
            FunctionalCall(
                owner, label, self.counts[owner, label], self.clock[0],
                tuple((k, v) for k, v in params.items() if k not in ("weight", "bias")),
                None if x is None else resolution_class(self.size, x.shape),
                None if y is None else resolution_class(self.size, y.shape),
            )
        )  # fmt: skip


# --- the trace ----------------------------------------------------------------------------------

_TRACES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Trace]] = weakref.WeakKeyDictionary()


def default_example(model: nn.Module, size: int = DEFAULT_SIZE) -> torch.Tensor:
    """A zero ``size``-px input with the model's channel count, dtype and device."""
    from .models import in_channels  # models re-exports this module

    param = next(model.parameters(), None)
    dtype, device = (torch.float32, "cpu") if param is None else (param.dtype, param.device)
    return torch.zeros(1, in_channels(model), size, size, dtype=dtype, device=device)


def trace(model: nn.Module, example: torch.Tensor | None = None) -> Trace:
    """The module runs and functional downsampling calls of one forward of ``example`` (default: a zero
    224-px input) in eval mode, without gradients; cached per model, structure and input shape."""
    example = default_example(model) if example is None else example
    named = tuple(model.named_modules())
    key = (tuple(example.shape), example.dtype, str(example.device), tuple((n, id(m)) for n, m in named))
    cache = _TRACES.setdefault(model, {})
    if key not in cache:
        cache.clear()
        cache[key] = _run_trace(model, dict(named), example)
    return cache[key]


def _run_trace(model: nn.Module, named: dict[str, nn.Module], example: torch.Tensor) -> Trace:
    size = (int(example.shape[-2]), int(example.shape[-1]))
    names = {m: n for n, m in named.items()}
    clock = [0]
    stack: list[tuple[nn.Module, str]] = []
    opened: list[tuple[int, int | None]] = []
    runs: list[ModuleRun] = []

    def enter(module: nn.Module, inputs: tuple) -> None:
        clock[0] += 1
        x = _first_map(inputs)
        stack.append((module, names.get(module, "?")))
        opened.append((clock[0], None if x is None else resolution_class(size, x.shape)))

    def leave(module: nn.Module, _inputs: tuple, output: object) -> None:
        clock[0] += 1
        (start, in_class), (_, name) = opened.pop(), stack.pop()
        y = output if isinstance(output, torch.Tensor) else None
        out_class = None if y is None else resolution_class(size, y.shape)
        shape = None if out_class is None else tuple(y.shape)
        channels = None if shape is None else shape[1]
        runs.append(ModuleRun(name, start, clock[0], in_class, out_class, channels, shape))

    modes = {m: m.training for m in named.values()}
    try:
        with Hooks() as hooks, torch.no_grad():
            for module in named.values():
                hooks.forward_pre(module, enter)
                hooks.forward(module, leave)
            model.eval()
            with _Recorder(size, stack, clock) as recorder:
                model(example)
    except RuntimeError as err:  # torch's shape checks: the example is too small, or of the wrong kind
        raise BadOption(
            f"cannot trace {type(model).__name__} on a {tuple(example.shape)} input to find its stages "
            f"({one_line(err)}); pass an example input the model takes"
        ) from None
    finally:
        for module, mode in modes.items():
            module.training = mode
    return Trace(size, tuple(runs), tuple(recorder.calls))


# --- stage aliases ------------------------------------------------------------------------------


def stage_runs(t: Trace) -> dict[str, ModuleRun]:
    """Alias → the run it names, by the rule of the module docstring."""
    spatial = [r for r in t.runs if r.out_class is not None]
    if not spatial:
        return {}
    upsampling = [r.start for r in spatial if r.in_class is not None and r.in_class > r.out_class]
    reached = min(upsampling, default=t.runs[-1].end + 1)  # where the decoder's first upsampling starts
    runs_of = Counter(r.name for r in t.runs)
    stages: dict[str, ModuleRun] = {}
    for c in sorted({r.out_class for r in spatial if r.out_class >= 2 and r.start < reached}):
        coarser = [r for r in t.runs if r.in_class == c and r.out_class is not None and r.out_class > c]
        found = [
            r
            for r in spatial
            if r.out_class == c
            and r.start < reached
            and r.name
            and runs_of[r.name] == 1
            and (r.in_class is None or c - 1 <= r.in_class <= c)
            and not any(d.start < r.start and r.end < d.end for d in coarser)
        ]
        if found:
            stages[f"layer{c - 1}"] = max(found, key=lambda r: r.end)
    return stages


def stage_modules(model: nn.Module, example: torch.Tensor | None = None) -> dict[str, str]:
    """Stage alias (``layer1`` …) → the qualified name of the module whose output it is, in order."""
    return {alias: run.name for alias, run in stage_runs(trace(model, example)).items()}


def stage_blocks(model: nn.Module, example: torch.Tensor | None = None) -> dict[str, list[str]]:
    """Stage alias → the qualified names of its stage module's children (the module itself if it has
    none), in registration order: the blocks that the paper's Figure 4 sweeps."""
    out: dict[str, list[str]] = {}
    for alias, name in stage_modules(model, example).items():
        children = [f"{name}.{child}" for child, _ in model.get_submodule(name).named_children()]
        out[alias] = children or [name]
    return out


# --- resolving layer names ----------------------------------------------------------------------


def resolve_layer(model: nn.Module, name: str, example: torch.Tensor | None = None) -> str:
    """The qualified module name behind a module name or a stage alias (``layer1`` … ``layerN``).

    An alias wins over a module of the same name (for a torchvision ResNet both are the same module).
    """
    modules = dict(model.named_modules())
    if name and name in modules and not _ALIAS.fullmatch(name):
        return name
    stages = stage_modules(model, example)
    if name in stages:
        return stages[name]
    if name and name in modules:
        return name
    aliases = ", ".join(stages) if stages else "none for this model"
    raise BadOption(
        f"unknown layer {name!r} for {type(model).__name__}; allowed: a module name "
        f"(e.g. {_example_names(modules)}), the aliases {aliases}, or {BLOCKS_ALIAS!r}"
    )


def layer_map(
    model: nn.Module, names: str | Sequence[str], example: torch.Tensor | None = None
) -> dict[str, str]:
    """Each requested name → its qualified module name; ``"blocks"`` expands to every block."""
    names = [names] if isinstance(names, str) else list(names)
    out: dict[str, str] = {}
    for name in names:
        if name == BLOCKS_ALIAS:
            stages = stage_blocks(model, example)
            if not stages:
                raise BadOption(
                    f"{type(model).__name__} has no resolution stages for {BLOCKS_ALIAS!r}; name the layers instead"
                )
            out |= {b: b for blocks in stages.values() for b in blocks}
        else:
            out[name] = resolve_layer(model, name, example)
    if not out:
        raise BadOption("no layers given; name at least one (e.g. --layers layer1)")
    return out


def resolve_layers(
    model: nn.Module, names: str | Sequence[str], example: torch.Tensor | None = None
) -> list[str]:
    """The distinct qualified module names behind several layer names, in the order given."""
    return list(dict.fromkeys(layer_map(model, names, example).values()))


def _example_names(modules: dict[str, nn.Module], n: int = 4) -> str:
    names = [name for name, m in modules.items() if name and len(list(m.children())) > 0]
    return ", ".join(names[:n])
