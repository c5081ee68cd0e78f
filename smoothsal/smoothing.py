"""The paper's three ways to remove checkerboard noise from stride-2 convolutions.

``smooth(model, method)`` returns a smoothed copy; the given model is never changed. Smoothed
convs are ``nn.Conv2d`` subclasses (or a surrogate path) installed under the same qualified name,
so layer names and state-dict keys stay as they were.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .models import in_channels

__all__ = [
    "METHODS",
    "SHIFTS",
    "BackwardHookConv2d",
    "ConvSpec",
    "ForwardHookConv2d",
    "SurrogatePath",
    "SurrogatePaths",
    "capture_conv_io",
    "default_example",
    "downsampling_convs",
    "smooth",
]

METHODS = ("original", "backward_hook", "forward_hook", "surrogate")
SHIFTS = ((0, 0), (0, 1), (1, 0), (1, 1))


def _roll_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` rolled spatially (wrap-around) by the four shifts of a 2×2 cell."""
    rolled = t + torch.roll(t, (0, 1), (2, 3))
    rolled = rolled + torch.roll(rolled, (1, 0), (2, 3))
    return rolled * 0.25


# --- finding the convs ------------------------------------------------------------------------


def default_example(model: nn.Module, size: int = 224) -> torch.Tensor:
    """A zero input with the model's channel count, for tracing."""
    param = next(model.parameters())
    channels = in_channels(model)
    return torch.zeros(1, channels, size, size, dtype=param.dtype, device=param.device)


def downsampling_convs(model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """Qualified names of the stride-2 convs that smoothing changes, in forward order.

    Found by running ``example`` through the model; the first (stem) conv is excluded.
    """
    example = default_example(model) if example is None else example
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []

    def record(module: nn.Module, _inputs: object, _output: object) -> None:
        name = names[module]
        if module.stride != (1, 1) and name not in order:
            order.append(name)

    handles = [m.register_forward_hook(record) for m in names if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order[1:]


# --- backward and forward hook ----------------------------------------------------------------


class _RollMeanGrad(torch.autograd.Function):
    """Identity forward; the gradient passed back is the mean of its four rolls."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _roll_mean(grad)


class BackwardHookConv2d(nn.Conv2d):
    """Same forward; every input pixel receives a gradient from every weight (roll-mean)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_RollMeanGrad.apply(x))


class ForwardHookConv2d(nn.Conv2d):
    """The conv applied to the four rolled inputs, averaged (conv is affine: roll-mean first)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_roll_mean(x))


def _recast(conv: nn.Conv2d, cls: type[nn.Conv2d]) -> nn.Conv2d:
    new = copy.copy(conv)
    new.__class__ = cls
    return new


# --- bilinear surrogate -----------------------------------------------------------------------


@dataclass(frozen=True)
class ConvSpec:
    """The geometry of a downsampling conv: enough to build its surrogate and size its output."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvSpec:
        if isinstance(conv.padding, str):
            raise ValueError(f"string padding {conv.padding!r} on a downsampling conv is not supported")
        return cls(
            conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
            tuple(conv.padding), tuple(conv.dilation),
        )  # fmt: skip

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The original conv's output size for an input of ``height`` × ``width``."""
        return tuple(
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(
                (height, width),
                self.padding,
                self.dilation,
                self.kernel_size,
                self.stride,
                strict=True,
            )
        )  # type: ignore[return-value]


class SurrogatePath(nn.Module):
    """conv3×3 (C_in→C_out) → bilinear resize to the conv's output size → conv3×3 (C_out→C_out)."""

    def __init__(self, spec: ConvSpec):
        super().__init__()
        self.spec = spec
        self.pre = nn.Conv2d(spec.in_channels, spec.out_channels, 3, padding=1)
        self.post = nn.Conv2d(spec.out_channels, spec.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.spec.output_size(*x.shape[-2:])
        y = F.interpolate(self.pre(x), size=size, mode="bilinear", align_corners=False)
        return self.post(y)


def _key(name: str) -> str:
    return name.replace(".", "/")


class SurrogatePaths(nn.Module):
    """One trainable surrogate path per downsampling conv, keyed by the conv's qualified name."""

    def __init__(self, specs: dict[str, ConvSpec]):
        super().__init__()
        self.specs = dict(specs)
        self.paths = nn.ModuleDict({_key(n): SurrogatePath(s) for n, s in self.specs.items()})

    @classmethod
    def for_model(cls, model: nn.Module, example: torch.Tensor | None = None) -> SurrogatePaths:
        """Fresh paths for every downsampling conv of ``model``."""
        names = downsampling_convs(model, example)
        if not names:
            raise ValueError(f"{type(model).__name__} has no downsampling convs to replace")
        return cls({n: ConvSpec.of(model.get_submodule(n)) for n in names})

    @property
    def conv_names(self) -> list[str]:
        return list(self.specs)

    def path(self, name: str) -> SurrogatePath:
        return self.paths[_key(name)]

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each path applied to its conv's captured input (training entry point; DDP-friendly)."""
        return {n: self.path(n)(x) for n, x in inputs.items()}

    def check_fits(self, model: nn.Module) -> None:
        """Raise a clear error if these paths were not made for ``model``'s convs."""
        modules = dict(model.named_modules())
        for name, spec in self.specs.items():
            conv = modules.get(name)
            if not isinstance(conv, nn.Conv2d) or ConvSpec.of(conv) != spec:
                found = ConvSpec.of(conv) if isinstance(conv, nn.Conv2d) else type(conv).__name__
                raise ValueError(
                    f"surrogate path {name!r} ({spec}) does not fit {type(model).__name__} "
                    f"(found {found}); train a surrogate for this model"
                )


@contextmanager
def capture_conv_io(
    model: nn.Module, names: list[str]
) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """While active, each forward of ``model`` stores (input, output) of the named convs."""
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name in names:

        def hook(_m: nn.Module, inputs: tuple, output: torch.Tensor, name: str = name) -> None:
            captured[name] = (inputs[0].detach(), output.detach())

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


# --- the entry point --------------------------------------------------------------------------


def smooth(
    model: nn.Module,
    method: str,
    *,
    surrogate: SurrogatePaths | None = None,
    example: torch.Tensor | None = None,
) -> nn.Module:
    """A copy of ``model`` whose downsampling convs (stem excluded) are smoothed by ``method``.

    ``original`` returns an unchanged copy; ``surrogate`` needs the trained paths.
    """
    if method not in METHODS:
        raise ValueError(f"unknown smoothing method {method!r}; allowed: {', '.join(METHODS)}")
    if (method == "surrogate") != (surrogate is not None):
        raise ValueError("pass surrogate=SurrogatePaths exactly when method='surrogate'")
    if method == "original":
        return copy.deepcopy(model).eval()
    if surrogate is not None:
        surrogate.check_fits(model)
        names = surrogate.conv_names
    else:
        names = downsampling_convs(model, example)
    smoothed = copy.deepcopy(model)
    for name in names:
        conv = smoothed.get_submodule(name)
        if method == "backward_hook":
            new: nn.Module = _recast(conv, BackwardHookConv2d)
        elif method == "forward_hook":
            new = _recast(conv, ForwardHookConv2d)
        else:
            new = copy.deepcopy(surrogate.path(name))  # type: ignore[union-attr]
        parent, _, attr = name.rpartition(".")
        setattr(smoothed.get_submodule(parent), attr, new)
    return smoothed.eval()
