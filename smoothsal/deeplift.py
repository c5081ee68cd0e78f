"""DeepLift's rules per module, as Captum 0.9 applies them, for the one-pass engine (attribution.py).

Captum picks a rule by the module's exact class (``type(m) in SUPPORTED_NON_LINEAR``: subclasses, such
as timm's own activation classes, get none):

- ``rescale`` (nn.ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus): the local derivative becomes
  (f(z) − f(z₀)) / (z − z₀), the plain derivative where |z − z₀| < 1e-10;
- ``maxpool`` (nn.MaxPool1d/2d/3d): grad·(max(o, o₀) − o₀) unpooled at the input's argmax plus
  grad·(o − max(o, o₀)) unpooled at the baseline's argmax, divided by z − z₀ (plain where tiny);
- ``softmax``: normalised over the whole batch of inputs and baselines together: no per-tile pass
  reproduces it, so smoothsal refuses it after a requested layer;
- ``gradient``: every other nonlinear module (SiLU, GELU, Hardswish, Hardsigmoid, LayerNorm, …) and
  functional calls (F.silu, torch.sigmoid, …) keep their plain derivative.

The rules are applied the way Captum's hooks apply them (see ``_Rule``): on the total gradient of
the module's input tensor, with the gradient seen at its output before any later rule rewrote it.
Captum's MaxPool rule also uses the gradient that reaches the baseline's half of its batch (which
differs from the input's wherever a later module falls back to its plain derivative, as at the many
zeros ReLU gives both, or has no rule), and where |z − z₀| < eps it takes the plain gradient of the
batch's first sample. So where a MaxPool runs after a requested layer the pass runs *paired*, as
Captum does: inputs and zero baselines in one batch, every rule formed from the two halves, at twice
the cost (and, like Captum's, the MaxPool fallback depends on which tile comes first in a chunk).
Without one, the baseline runs once per model and input size and is cached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import BadOption
from .hooks import Hooks
from .models import layer_map, module_stack

__all__ = ["RULES", "deeplift_rules", "rule_of"]

RULES = ("rescale", "maxpool", "softmax", "gradient")
EPS = 1e-10  # Captum's DeepLift eps: below it the plain derivative is used
_RESCALE = (nn.ReLU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Softplus)
_POOLS = {
    nn.MaxPool1d: (F.max_pool1d, F.max_unpool1d),
    nn.MaxPool2d: (F.max_pool2d, F.max_unpool2d),
    nn.MaxPool3d: (F.max_pool3d, F.max_unpool3d),
}
# Leaf modules that are linear in eval mode: they have no rule and need none.
_LINEAR = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.Bilinear,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.dropout._DropoutNd,
    nn.Identity,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.Flatten,
    nn.Unflatten,
    nn.Upsample,
    nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
)
_FUNCTIONAL = {  # functional nonlinearities: Captum differentiates them plainly
    F.silu, F.gelu, F.elu, F.leaky_relu, F.softplus, F.hardswish, F.hardsigmoid, F.mish, F.sigmoid,
    F.tanh, F.softmax, F.log_softmax, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.layer_norm,
    F.group_norm, F.adaptive_max_pool2d, torch.sigmoid, torch.tanh, torch.softmax, torch.Tensor.sigmoid,
    torch.Tensor.tanh, torch.Tensor.softmax,
}  # fmt: skip


def rule_of(module: nn.Module) -> str | None:
    """The rule Captum's DeepLift gives ``module`` (see the module), None for containers and linear
    leaves."""
    kind = type(module)
    if kind in _RESCALE:
        return "rescale"
    if kind in _POOLS:
        return "maxpool"
    if kind is nn.Softmax:
        return "softmax"
    if next(module.children(), None) is None and not isinstance(module, _LINEAR):
        return "gradient"
    return None


class Mode:
    """Which derivatives this pass needs and which one the rules pass back in the current backward."""

    def __init__(self, attributions: Sequence[str]):
        self.wants_gradient = "gradient" in attributions
        self.wants_deeplift = "deeplift" in attributions
        self.deeplift = False


# --- tracing ----------------------------------------------------------------------------------


class FunctionalCalls(TorchFunctionMode):
    """Records functional nonlinearities called by non-leaf modules: (modules exited so far, caller,
    function name). ``stack`` is ``module_stack``'s live stack, ``order`` the exit-order list."""

    def __init__(self, stack: list[nn.Module], order: list[nn.Module]):
        super().__init__()
        self.stack, self.order = stack, order
        self.calls: list[tuple[int, nn.Module, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _FUNCTIONAL and self.stack and next(self.stack[-1].children(), None) is not None:
            self.calls.append((len(self.order), self.stack[-1], func.__name__))
        return func(*args, **(kwargs or {}))


def record_rule_io(hooks: Hooks, model: nn.Module) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Registers hooks that store each rescale/maxpool module's (input, output) of the next forward
    (the input cloned before an in-place module overwrites it)."""
    io: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    inputs: dict[nn.Module, torch.Tensor] = {}
    for module in model.modules():
        if rule_of(module) in ("rescale", "maxpool"):
            hooks.forward_pre(module, lambda m, i: inputs.__setitem__(m, i[0].detach().clone()))
            hooks.forward(module, lambda m, i, o: io.__setitem__(m, (inputs[m], o.detach())))
    return io


def rules_after(
    model: nn.Module, order: list[nn.Module], calls: list[tuple[int, nn.Module, str]], layers: list[str]
) -> dict[str, str]:
    """Qualified name → rule for every module (and ``caller:function`` for functional calls) that
    runs after the first of ``layers`` (forward hooks fire on exit: a container after its children)."""
    first = min(order.index(model.get_submodule(n)) for n in layers)
    names = {m: n for n, m in model.named_modules()}
    found = [(k, names[m], rule_of(m)) for k, m in enumerate(order) if k > first and rule_of(m)]
    found += [(k, f"{names[m] or type(m).__name__}:{f}", "gradient") for k, m, f in calls if k > first]
    return {name: rule for _, name, rule in sorted(found, key=lambda t: t[0])}


def deeplift_rules(model: nn.Module, layers: str | Sequence[str], example: torch.Tensor) -> dict[str, str]:
    """For each nonlinear or pooling module that runs after the first of ``layers`` on ``example``,
    its qualified name → the DeepLift rule it gets (one of RULES); functional calls appear as
    ``caller:function`` with ``gradient``. Equal to what Captum's LayerDeepLift applies."""
    resolved = list(dict.fromkeys(layer_map(model, layers).values()))
    order: list[nn.Module] = []
    with Hooks() as hooks, module_stack(model) as stack, FunctionalCalls(stack, order) as calls:
        for module in model.modules():
            hooks.forward(module, lambda m, i, o: order.append(m))
        with torch.no_grad():
            model(example[:1])
    return rules_after(model, order, calls.calls, resolved)


def check_supported(model: nn.Module, rules: dict[str, str], order: list[nn.Module], first: str) -> None:
    """Refuses (one line) what one-pass DeepLift cannot match to Captum after layer ``first``."""
    modules = dict(model.named_modules())
    for name, rule in rules.items():
        module = modules.get(name)
        what = f"{type(module).__name__} {name!r}"
        if rule == "softmax":
            raise BadOption(
                f"{what} runs after layer {first!r}; Captum's DeepLift softmax rule normalises over the "
                "whole batch of inputs and baselines, which no per-tile pass reproduces "
                "(use attributions=('gradient',) or attribute at a layer after it)"
            )
        if rule in ("rescale", "maxpool") and order.count(module) > 1:
            raise BadOption(
                f"{what} runs {order.count(module)} times in one forward (Captum's DeepLift breaks too); "
                "give each use its own module"
            )
        if rule == "maxpool" and module.return_indices:
            raise BadOption(f"{what} returns indices; DeepLift needs MaxPool(return_indices=False)")


# --- the rules in the pass --------------------------------------------------------------------


class _LowPrecisionReLU(torch.autograd.Function):
    """bf16: the DeepLift multiplier (relu(z) − relu(z₀)) / (z − z₀) is formed once, in the forward,
    as (relu(z) + relu(z₀)) / (|z| + |z₀| + tiny). The two are equal in every sign case, and the plain
    derivative where z = z₀; this one is a ratio of sums of non-negative terms, so low precision
    never cancels and no threshold is needed, and it is exactly 1 or 0 where z and z₀ share a sign.
    The backward is then one multiply (or ReLU's own backward for the gradient)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, pos0: torch.Tensor, abs0: torch.Tensor, mode: Mode) -> torch.Tensor:
        out = torch.relu(z)
        multiplier = (out + pos0).div_(z.abs().add_(abs0)) if mode.wants_deeplift else None
        ctx.save_for_backward(out if mode.wants_gradient else None, multiplier)
        ctx.mode = mode
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, multiplier = ctx.saved_tensors
        if ctx.mode.deeplift:
            return grad * multiplier, None, None, None
        return torch.ops.aten.threshold_backward(grad, out, 0), None, None, None


@dataclass(frozen=True)
class _Rule:
    """One module's DeepLift rule, applied the way Captum's hooks apply it: a hook on the module's
    output keeps the gradient arriving there, and a hook on its input tensor replaces that tensor's
    total gradient (every consumer's part summed) by the rule's. So, as in Captum, a rule module fed
    directly by another sees the other's gradient before its rule, and another consumer's gradient of
    the same input is replaced too. ``z0``/``y0``: the cached baseline's input and output (None when
    paired: the baseline is the batch's second half); ``work``: the dtype the rule is formed in (fp32
    for bf16, from the bf16 values: exact secants, no cancellation)."""

    f: Callable[[torch.Tensor], torch.Tensor]
    mode: Mode
    work: torch.dtype | None
    z0: torch.Tensor | None = None
    y0: torch.Tensor | None = None
    pool: tuple | None = None  # MaxPool: (unpool function, pool kwargs)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.f(z)
        if not z.requires_grad:
            return y
        arriving: dict[str, torch.Tensor] = {}
        kept = z.detach()
        version = kept._version
        y.register_hook(lambda g: arriving.__setitem__("grad", g) if self.mode.deeplift else None)

        def replace(grad: torch.Tensor) -> torch.Tensor | None:
            if not self.mode.deeplift or "grad" not in arriving:
                return None
            if kept._version != version:  # detach() shares z's version counter; no reference to z
                raise RuntimeError("an in-place op changed a DeepLift rule module's input after it ran")
            return self.new_grad(kept, grad, arriving.pop("grad"))  # not held for the rest of the backward

        z.register_hook(replace)
        return y

    def new_grad(self, z: torch.Tensor, grad_in: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """Captum's ``nonlinear`` / ``maxpool`` for the input's total gradient ``grad_in``."""
        work = self.work or z.dtype
        zw, g = z.to(work), grad_out.to(work)
        with torch.no_grad():
            if self.z0 is not None:  # unpaired: the cached baseline
                delta_in = zw - self.z0
                return _where(delta_in, grad_in, g * (self.f(zw) - self.y0) / delta_in)
            zx, zr = zw.chunk(2)
            delta_in = torch.cat(2 * [zx - zr])
            if self.pool is None:
                yx, yr = self.f(zw).chunk(2)
                return _where(delta_in, grad_in, g * torch.cat(2 * [yx - yr]) / delta_in)
            # Captum indexes the gradient tensor: sample 0's plain gradient, broadcast to all
            return _where(delta_in, grad_in[0], _paired_pool(self.pool, zw, g) / delta_in)


def _where(delta_in: torch.Tensor, plain: torch.Tensor, rescaled: torch.Tensor) -> torch.Tensor:
    """The rule's gradient, the plain one where |Δ| < eps, in the gradient's dtype."""
    return torch.where(delta_in.abs() < EPS, plain, rescaled.to(plain.dtype))


def _paired_pool(pool: tuple, zw: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Captum's MaxPool numerator: grad·Δout unpooled at each half's own argmax, the halves summed."""
    unpool, kwargs = pool
    out, indices = kwargs["pool"](zw, **kwargs["args"], return_indices=True)
    o, o_r = out.chunk(2)
    top = torch.max(o, o_r)
    delta_out = torch.cat([top - o_r, o - top])
    mine, theirs = unpool(g * delta_out, indices, **kwargs["unpool"], output_size=list(zw.shape)).chunk(2)
    return torch.cat(2 * [mine + theirs])


def _pure(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's own forward, on a copy of its input where the module works in place."""
    forward = type(module).forward
    if getattr(module, "inplace", False):
        return lambda z: forward(module, z.clone())
    return lambda z: forward(module, z)


def _pool_args(module: nn.Module) -> tuple:
    pool, unpool = _POOLS[type(module)]
    args = {k: getattr(module, k) for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode")}
    return unpool, {
        "pool": pool,
        "args": args,
        "unpool": {k: args[k] for k in ("kernel_size", "stride", "padding")},
    }


@contextmanager
def rule_forward(
    module: nn.Module, io: tuple[torch.Tensor, torch.Tensor], mode: Mode, low: bool, paired: bool = False
) -> Iterator[None]:
    """Runs ``module`` with its DeepLift rule while active (instance-level forward, restored after).
    ``io``: its baseline input and output; ``paired``: the batch is [inputs; baselines] (see the module).
    Outside the graph (before the first layer, where grad is off) the module runs as it is."""
    rule = _rule(module, io, mode, low, paired)
    if rule is None:
        yield
        return
    plain = _pure(module)
    module.forward = lambda z: rule(z) if torch.is_grad_enabled() else plain(z)
    try:
        yield
    finally:
        del module.forward


def _rule(
    module: nn.Module, io: tuple[torch.Tensor, torch.Tensor], mode: Mode, low: bool, paired: bool
) -> Callable | None:
    f, work = _pure(module), (torch.float32 if low else None)
    if paired:
        pool = _pool_args(module) if rule_of(module) == "maxpool" else None
        return _Rule(f, mode, work, pool=pool).forward
    if rule_of(module) == "maxpool":  # unpaired passes only run MaxPools before the first layer
        return None
    z0, y0 = io
    if type(module) is nn.ReLU and low:
        pos0, abs0 = torch.relu(z0), z0.abs() + torch.finfo(z0.dtype).tiny
        return lambda z: _LowPrecisionReLU.apply(z, pos0, abs0, mode)
    if low:
        z0 = z0.float()
        with torch.no_grad():
            y0 = f(z0)
    return _Rule(f, mode, work, z0, y0).forward
