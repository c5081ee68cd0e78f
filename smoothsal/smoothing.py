"""The paper's three ways to remove checkerboard noise from stride-2 convolutions, and the registry of
smoothing methods (name, label, colour, builder) that every stage, table and figure uses.

``smooth(model, method)`` returns a smoothed copy; the given model is never changed. Smoothed
convs are ``nn.Conv2d`` subclasses (or a surrogate path) installed under the same qualified name,
so layer names and state-dict keys stay as they were.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BadCheckpoint, BadOption
from .hooks import Hooks
from .models import in_channels

log = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "SHIFTS",
    "BackwardHookConv2d",
    "ConvSpec",
    "ForwardHookConv2d",
    "Method",
    "SurrogatePath",
    "SurrogatePaths",
    "capture_conv_io",
    "check_methods",
    "default_example",
    "downsampling_convs",
    "method_info",
    "smooth",
]

SHIFTS = ((0, 0), (0, 1), (1, 0), (1, 1))


def _roll_add(t: torch.Tensor, dim: int, shift: int) -> torch.Tensor:
    """``t + torch.roll(t, shift, dim)`` for shift ±1, written slice by slice: same sums, no copy
    of ``t``, and the memory layout kept (torch.roll returns NCHW: slow next to channels_last)."""
    n = t.shape[dim]
    out = torch.empty_like(t)
    body, edge = (1, 0) if shift > 0 else (0, n - 1)  # where t's rolled copy lands without wrapping
    torch.add(t.narrow(dim, body, n - 1), t.narrow(dim, 1 - body, n - 1), out=out.narrow(dim, body, n - 1))
    torch.add(t.narrow(dim, edge, 1), t.narrow(dim, n - 1 - edge, 1), out=out.narrow(dim, edge, 1))
    return out


def _roll_mean_of(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` rolled spatially (wrap-around) by the four shifts of a 2×2 cell: width first."""
    return _roll_add(_roll_add(t, 3, 1), 2, 1).mul_(0.25)


class _RollMean(torch.autograd.Function):
    """The roll-mean; its gradient is the roll-mean with negative shifts, height first (the
    adjoint, summed in the order autograd would sum it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _roll_mean_of(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _roll_add(_roll_add(grad, 2, -1), 3, -1).mul_(0.25)


def _roll_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` rolled spatially (wrap-around) by the four shifts of a 2×2 cell."""
    return _RollMean.apply(t)


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

    with Hooks() as hooks, torch.no_grad():
        for module in names:
            if isinstance(module, nn.Conv2d):
                hooks.forward(module, record)
        model(example)
    return order[1:]


# --- backward and forward hook ----------------------------------------------------------------


class _RollMeanGrad(torch.autograd.Function):
    """Identity forward; the gradient passed back is the mean of its four rolls."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        # not view_as: for a batch of one, view() rewrites the batch stride of a channels_last input
        # (ConvNeXt's LayerNorm2d gives one), and the conv then takes another kernel: not bit for bit
        return x.as_strided(x.size(), x.stride(), x.storage_offset())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _roll_mean_of(grad)


class _Wrapped(nn.Module):
    """A downsampling conv run inside a method: the conv itself (its own class and forward, e.g. a
    subclass that pads dynamically) is kept as ``conv`` and called on a changed input."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def extra_repr(self) -> str:
        return "wraps its conv; the conv's own forward runs"


class BackwardHookConv2d(_Wrapped):
    """Same forward; every input pixel receives a gradient from every weight (roll-mean)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_RollMeanGrad.apply(x))


class ForwardHookConv2d(_Wrapped):
    """The conv applied to the four rolled inputs, averaged (conv is affine: roll-mean first)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_roll_mean(x))


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
    same: bool = False  # pads itself to TF's "same" (timm's Conv2dSame): output = ceil(input / stride)

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvSpec:
        if isinstance(conv.padding, str):
            raise BadOption(f"string padding {conv.padding!r} on a downsampling conv is not supported")
        spec = cls(
            conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
            tuple(conv.padding), tuple(conv.dilation),
        )  # fmt: skip
        return spec if type(conv).forward is nn.Conv2d.forward else spec._probed(conv)

    def _probed(self, conv: nn.Conv2d) -> ConvSpec:
        """A conv subclass with its own forward: its output size measured on two input sizes; "same"
        padding is recognised, any other rule cannot be mirrored by a surrogate path."""
        param = next(conv.parameters())
        sizes = [2 * max(self.kernel_size) + k for k in (3, 4)]
        with torch.no_grad():
            got = [tuple(conv(param.new_zeros(1, self.in_channels, n, n)).shape[-2:]) for n in sizes]
        if got == [self.output_size(n, n) for n in sizes]:
            return self
        same = replace(self, same=True)
        if got == [same.output_size(n, n) for n in sizes]:
            return same
        raise BadOption(
            f"{type(conv).__name__} sizes its output unlike nn.Conv2d and unlike 'same' padding ({got} for inputs "
            f"{sizes}); a surrogate path cannot mirror it: leave the surrogate method out"
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The original conv's output size for an input of ``height`` × ``width``."""
        if self.same:
            return tuple(-(-n // s) for n, s in zip((height, width), self.stride, strict=True))  # type: ignore[return-value]
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

    def start_from(self, conv: nn.Conv2d) -> bool:
        """Start at the conv this path replaces: ``pre`` = its weights (at stride 1), ``post`` =
        identity, so the path begins as the conv's output averaged 2×2 (even sizes; odd ones are
        resampled bilinearly), about the forward hook, and training improves on that. A grouped or
        depthwise conv starts as its block-diagonal dense equivalent (the path itself is dense: it can
        hold the grouped conv exactly, and training may use the cross-group terms). False, and left as it
        was, for a conv that ``pre`` cannot hold (kernel other than 1 or 3, off-centre or non-zero
        padding, dilation)."""
        kh, kw = conv.kernel_size
        centred = conv.padding == (kh // 2, kw // 2) and conv.padding_mode == "zeros"
        if not centred or {kh, kw} - {1, 3} or conv.dilation != (1, 1):
            return False
        with torch.no_grad():
            self.pre.weight.zero_()
            top, left = (3 - kh) // 2, (3 - kw) // 2
            per_in, per_out = conv.in_channels // conv.groups, conv.out_channels // conv.groups
            for g in range(conv.groups):  # block g: outputs g·per_out… read inputs g·per_in…
                rows, cols = slice(g * per_out, (g + 1) * per_out), slice(g * per_in, (g + 1) * per_in)
                self.pre.weight[rows, cols, top : top + kh, left : left + kw] = conv.weight[rows].to(
                    self.pre.weight
                )
            if conv.bias is None:
                self.pre.bias.zero_()
            else:
                self.pre.bias.copy_(conv.bias)
            nn.init.dirac_(self.post.weight)
            self.post.bias.zero_()
        return True


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
            raise BadOption(f"{type(model).__name__} has no downsampling convs to replace")
        return cls({n: ConvSpec.of(model.get_submodule(n)) for n in names})

    def start_from(self, model: nn.Module) -> list[str]:
        """Start each path at the conv it replaces (``SurrogatePath.start_from``); the names of
        the paths that could, in order (the others keep their random init, with a warning)."""
        started = [n for n in self.specs if self.path(n).start_from(model.get_submodule(n))]
        if left := [n for n in self.specs if n not in started]:
            warnings.warn(
                f"{', '.join(left)}: kept a random init (not a zero-padded 1×1 or 3×3 conv)", stacklevel=2
            )
        return started

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
                raise BadCheckpoint(
                    f"surrogate path {name!r} ({spec}) does not fit {type(model).__name__} "
                    f"(found {found}); train a surrogate for this model"
                )


@contextmanager
def capture_conv_io(
    model: nn.Module, names: list[str]
) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """While active, each forward of ``model`` stores (input, output) of the named convs."""
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with Hooks() as hooks:
        for name in names:

            def hook(_m: nn.Module, inputs: tuple, output: torch.Tensor, name: str = name) -> None:
                captured[name] = (inputs[0].detach(), output.detach())

            hooks.forward(model.get_submodule(name), hook)
        yield captured


# --- the method registry ---------------------------------------------------------------------

# How a method replaces one downsampling conv: (qualified name, conv, trained paths) → its stand-in.
Replace = Callable[[str, nn.Conv2d, "SurrogatePaths | None"], nn.Module]


@dataclass(frozen=True)
class Method:
    """One smoothing method: its name, how tables and figures show it, and how ``smooth`` builds it."""

    name: str
    label: str  # display name (tables, figure titles)
    colour: str  # matplotlib colour of its line in figures
    replace: Replace | None  # None: the model unchanged
    needs_surrogate: bool = False

    def build(
        self, model: nn.Module, surrogate: SurrogatePaths | None = None, example: torch.Tensor | None = None
    ) -> nn.Module:
        """A smoothed eval-mode copy of ``model`` (``surrogate``: the trained paths of this model)."""
        if self.replace is None:
            return copy.deepcopy(model).eval()
        if surrogate is not None:
            surrogate.check_fits(model)
            names = surrogate.conv_names
        else:
            names = downsampling_convs(model, example)
            if not names:
                log.warning(changes_nothing(self.name, type(model).__name__))
        smoothed = copy.deepcopy(model)
        for name in names:
            parent, _, attr = name.rpartition(".")
            setattr(
                smoothed.get_submodule(parent),
                attr,
                self.replace(name, smoothed.get_submodule(name), surrogate),
            )
        return smoothed.eval()


def changes_nothing(method: str, model: str) -> str:
    """The warning for a method that changes nothing in a model (logged, and recorded with its maps)."""
    return (
        f"{method} changes nothing in {model}: it has no stride-2 conv after the stem (it downsamples by "
        "pooling or not at all), so its maps equal the original's"
    )


def _surrogate_path(name: str, _conv: nn.Conv2d, surrogate: SurrogatePaths | None) -> nn.Module:
    return copy.deepcopy(surrogate.path(name))  # type: ignore[union-attr]


# In the paper's column order (its Table 4): the original, then the three ways to smooth it.
_REGISTRY = (
    Method("original", "Original", "tab:gray", None),
    Method("surrogate", "Bilinear surrogate", "tab:blue", _surrogate_path, needs_surrogate=True),
    Method("backward_hook", "Backward hook", "tab:orange", lambda _n, conv, _s: BackwardHookConv2d(conv)),
    Method("forward_hook", "Forward hook", "tab:green", lambda _n, conv, _s: ForwardHookConv2d(conv)),
)
METHODS = tuple(m.name for m in _REGISTRY)
_BY_NAME = {m.name: m for m in _REGISTRY}


def check_methods(names: str | tuple[str, ...] | list[str]) -> None:
    """Raise a one-line error naming the allowed methods unless every name is one."""
    names = [names] if isinstance(names, str) else list(names)
    unknown = [m for m in names if m not in _BY_NAME]
    if unknown:
        what = f"method {unknown[0]!r}" if len(unknown) == 1 else f"methods {unknown}"
        raise BadOption(f"unknown {what}; allowed: {', '.join(METHODS)}")


def method_info(name: str) -> Method:
    """The registered method ``name`` (a one-line error naming the allowed ones otherwise)."""
    check_methods(name)
    return _BY_NAME[name]


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
    info = method_info(method)
    if info.needs_surrogate != (surrogate is not None):
        raise BadOption("pass surrogate=SurrogatePaths exactly when method='surrogate'")
    return info.build(model, surrogate, example)
