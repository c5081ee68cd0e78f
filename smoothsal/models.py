"""What smoothsal needs of any CNN: its input normalisation and channel count and canonical ReLUs (loading a
model is ``model_spec``'s). The resolution stages (layer aliases) live in ``stages`` and are re-exported here.

Canonical form matters for DeepLift: Captum (and our one-pass DeepLift) attach state to each ReLU
module, so a ReLU module that runs twice, or a functional ``F.relu``, gives wrong attributions.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import BadOption, one_line
from .hooks import Hooks
from .stages import BLOCKS_ALIAS, layer_map, resolve_layer, resolve_layers, stage_blocks, stage_modules

__all__ = [
    "BLOCKS_ALIAS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Normalize",
    "ReluUses",
    "canonicalise",
    "check_input_size",
    "in_channels",
    "layer_map",
    "module_stack",
    "resolve_layer",
    "resolve_layers",
    "stage_blocks",
    "stage_modules",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalize:
    """Tile RGB in [0, 1] → the model's input units: (x − mean) / std per channel (picklable)."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise BadOption(
                f"normalisation needs one positive std per mean, got {self.mean} / {self.std}; fix --mean/--std"
            )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        return (x - mean) / std


def in_channels(model: nn.Module) -> int:
    """The channel count a CNN takes: its first Conv2d's input channels."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise BadOption(f"{type(model).__name__} has no Conv2d; smoothsal needs a CNN")
    return conv.in_channels


def check_input_size(model: nn.Module, size: int, arch: str, option: str = "--tile-size") -> None:
    """Raise a one-line error when ``model`` cannot take a ``size``-px tile (one probe forward).

    Some heads need a minimum input (the MONAI bundle pools a fixed 7×7 window): torch's own complaint
    would come deep from a forward pass; this names the size, the arch and the option to change.
    """
    param = next(model.parameters())
    probe = torch.zeros(1, in_channels(model), size, size, dtype=param.dtype, device=param.device)
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(probe)
    except RuntimeError as err:  # torch's shape checks (e.g. "Output size is too small")
        raise BadOption(
            f"a {size}-px tile is too small for arch {arch!r} ({one_line(err)}); use a larger {option}"
        ) from None
    finally:
        model.train(was_training)


# --- canonical ReLUs --------------------------------------------------------------------------

_FUNCTIONAL_RELUS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}


class ReluUses(TorchFunctionMode):
    """Records which module runs each ReLU: a ReLU module itself, or (functional) its caller.

    ``stack`` is the live module stack of ``module_stack``.
    """

    def __init__(self, stack: list[nn.Module]):
        super().__init__()
        self.stack = stack
        self.module_calls: Counter[nn.Module] = Counter()
        self.functional_in: set[nn.Module] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _FUNCTIONAL_RELUS and self.stack:
            owner = self.stack[-1]
            if isinstance(owner, nn.ReLU):
                self.module_calls[owner] += 1
            else:
                self.functional_in.add(owner)
        return func(*args, **(kwargs or {}))


@contextmanager
def module_stack(model: nn.Module) -> Iterator[list[nn.Module]]:
    """While active, the modules whose forward is running, outermost first (for ``ReluUses``)."""
    stack: list[nn.Module] = []

    def enter(module: nn.Module, _inputs: object) -> None:
        stack.append(module)

    def leave(_module: nn.Module, _inputs: object, _output: object) -> None:
        stack.pop()

    with Hooks() as hooks:
        for module in model.modules():
            hooks.forward_pre(module, enter)
            hooks.forward(module, leave)
        yield stack


class _LeafTracer(torch.fx.Tracer):
    """Traces one module's own forward, treating every submodule as an opaque call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True

    def call_module(self, m, forward, args, kwargs):
        # Modules built on the fly inside forward (MONAI's shortcut pooling) are traced through.
        if all(m is not sub for sub in self.root.modules()):
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


class ReLUPerUse(nn.ModuleList):
    """Stands in for a ReLU module that one forward calls n times: call k runs its own ReLU k.

    The count restarts whenever the owning module's forward starts (see ``_restart_relu_uses``),
    so a forward interrupted half-way (an exception, an out-of-memory retry) never shifts it.
    """

    def __init__(self, uses: int):
        super().__init__(nn.ReLU() for _ in range(uses))
        self.restart()

    def restart(self) -> None:
        self._calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relu = self[self._calls % len(self)]
        self._calls += 1
        return relu(x)


def _restart_relu_uses(module: nn.Module, _inputs: object) -> None:
    """Forward pre-hook of a module that owns ReLUPerUse children (module-level: survives deepcopy)."""
    for child in module.children():
        if isinstance(child, ReLUPerUse):
            child.restart()


def _split_functional_relus(module: nn.Module) -> nn.Module:
    """Rewrite ``module`` (torch.fx) so that each functional ReLU call is its own nn.ReLU."""
    try:
        graph = _LeafTracer().trace(module)
    except Exception as err:  # torch.fx raises anything a forward does on proxies
        raise BadOption(
            f"{type(module).__name__} calls F.relu/torch.relu and cannot be traced to give each "
            f"use its own nn.ReLU ({err}); use nn.ReLU modules in the model instead"
        ) from err
    new_modules: dict[str, nn.Module] = {}
    for node in graph.nodes:
        if node.op in ("call_function", "call_method") and _is_functional_relu(node):
            name = _fresh_name(module, new_modules, "relu_fn")
            new_modules[name] = nn.ReLU()
            node.op, node.target, node.args, node.kwargs = "call_module", name, node.args[:1], {}
    root = copy.copy(module)
    root._modules = dict(module._modules) | new_modules
    rewritten = torch.fx.GraphModule(root, graph, class_name=type(module).__name__)
    rewritten.train(module.training)
    return rewritten


def _is_functional_relu(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_)
    return node.target in ("relu", "relu_")


def _fresh_name(module: nn.Module, taken: dict[str, nn.Module], base: str) -> str:
    name, k = base, 1
    while name in taken or hasattr(module, name):
        k += 1
        name = f"{base}{k}"
    return name


def canonicalise(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of ``model`` where every ReLU use is its own non-inplace ``nn.ReLU`` module.

    Found by running ``example`` through the model, so any CNN works; only the modules that
    reuse a ReLU or call it functionally are rewritten (with torch.fx), the rest stay as they are.
    """
    model = copy.deepcopy(model)
    with module_stack(model) as stack, ReluUses(stack) as uses, torch.no_grad():
        model(example)
    owners: dict[int, nn.Module] = {}
    for relu, n in uses.module_calls.items():
        if n > 1:
            owners |= {id(p): p for p in _replace(model, relu, ReLUPerUse(n))}
    for owner in owners.values():
        owner.register_forward_pre_hook(_restart_relu_uses)
    for module in uses.functional_in:
        if module is model:
            model = _split_functional_relus(model)
        else:
            _replace(model, module, _split_functional_relus(module))
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return model


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> list[nn.Module]:
    """Put ``new`` wherever ``old`` is installed below the root of ``model``; return the parents."""
    parents = []
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if child is old:
                setattr(parent, attr, new)
                parents.append(parent)
    return parents
