"""Gradient and DeepLift at many hidden layers from one forward and one backward per attribution.

DeepLift (rescale rule, zero baseline) obeys the chain rule for its multipliers, so one backward
pass in which every ReLU's local derivative is replaced by (relu(z) − relu(z₀)) / (z − z₀) gives the
multipliers at every layer at once; the gradient comes from a second backward over the same graph.
The baseline's activations do not depend on the tile: they are computed once per model and input
size. Results equal Captum's ``LayerDeepLift(multiply_by_inputs=True)`` and
``LayerGradientXActivation(multiply_by_inputs=False)`` in a ``NoiseTunnel``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import BadOption
from .hooks import Hooks
from .models import ReluUses, in_channels, layer_map, module_stack

__all__ = ["ATTRIBUTIONS", "SmoothGrad", "attribute", "target_scalar"]

ATTRIBUTIONS = ("gradient", "deeplift")
_EPS = 1e-10  # Captum's DeepLift eps: below it the plain derivative is used
# Nonlinearities that Captum's DeepLift treats with a rule of their own; one-pass DeepLift here
# implements the ReLU rule only, so these must not sit between a requested layer and the output.
_OTHER_NONLINEAR = (nn.ELU, nn.Sigmoid, nn.Tanh, nn.Softmax, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


@dataclass(frozen=True)
class SmoothGrad:
    """Average attributions over ``samples`` draws of x + N(0, stdev²) (stdev in input units).

    Noise is drawn per tile and sample as Captum's NoiseTunnel does; ``seed`` makes it repeatable.
    ``attribute(..., noise_seeds=...)`` instead seeds each tile on its own (see there).
    """

    samples: int = 20
    stdev: float = 0.2
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise BadOption(f"SmoothGrad samples must be >= 1, got {self.samples}")
        if not self.stdev >= 0 or self.stdev == float("inf"):  # NaN fails every comparison
            raise BadOption(f"--smoothgrad-stdev must be a finite number >= 0, got {self.stdev}")


# --- the ReLU that knows both derivatives -----------------------------------------------------


class _Mode:
    """Which derivative the ReLUs pass back in the current backward pass."""

    deeplift = False


class _TwoRuleReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, z0: torch.Tensor, mode: _Mode) -> torch.Tensor:
        out = torch.relu(z)
        ctx.save_for_backward(z, z0)
        ctx.mode = mode
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, z0 = ctx.saved_tensors
        plain = grad * (z > 0)
        if not ctx.mode.deeplift:
            return plain, None, None
        delta_in = z - z0
        rescaled = grad * (torch.relu(z) - torch.relu(z0)) / delta_in
        return torch.where(delta_in.abs() < _EPS, plain, rescaled), None, None


# --- the baseline -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Baseline:
    relu_inputs: dict[nn.Module, torch.Tensor]
    layer_outputs: dict[str, torch.Tensor]
    order: list[nn.Module]  # modules in call order, to check what runs after the layers


_BASELINES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Baseline]] = weakref.WeakKeyDictionary()


def _weights_version(model: nn.Module) -> int:
    """Changes whenever a parameter or buffer is modified in place (training, load_state_dict)."""
    return sum(t._version for t in model.parameters()) + sum(t._version for t in model.buffers())


def _baseline(model: nn.Module, like: torch.Tensor, layers: list[str]) -> _Baseline:
    """Activations of the zero input: once per model, input size and weights."""
    key = (tuple(like.shape[1:]), like.dtype, like.device, tuple(layers), _weights_version(model))
    cache = _BASELINES.setdefault(model, {})
    if key not in cache:
        cache.clear()
        cache[key] = _run_baseline(model, torch.zeros_like(like[:1]), layers)
    return cache[key]


def _run_baseline(model: nn.Module, zero: torch.Tensor, layers: list[str]) -> _Baseline:
    relu_inputs: dict[nn.Module, torch.Tensor] = {}
    layer_outputs: dict[str, torch.Tensor] = {}
    order: list[nn.Module] = []
    with Hooks() as hooks, module_stack(model) as modules, ReluUses(modules) as uses, torch.no_grad():
        for module in model.modules():
            hooks.forward(module, lambda m, i, o: order.append(m))
            if isinstance(module, nn.ReLU):
                hooks.forward(module, lambda m, i, o: relu_inputs.__setitem__(m, i[0].detach()))
        for name in layers:
            hook = lambda m, i, o, n=name: layer_outputs.__setitem__(n, o.detach())
            hooks.forward(model.get_submodule(name), hook)
        model(zero)
    _check_canonical(model, uses)
    return _Baseline(relu_inputs, layer_outputs, order)


def _check_canonical(model: nn.Module, uses: ReluUses) -> None:
    names = {m: n for n, m in model.named_modules()}
    reused = [names[m] for m, n in uses.module_calls.items() if n > 1]
    functional = [names[m] or type(m).__name__ for m in uses.functional_in]
    if reused or functional:
        raise BadOption(
            f"{type(model).__name__} is not in canonical form (ReLU modules run more than once: "
            f"{reused or 'none'}; F.relu called in: {functional or 'none'}); "
            "pass it through smoothsal.canonicalise(model, example) or load it with load_model"
        )


def _check_rules(model: nn.Module, baseline: _Baseline, layers: list[str]) -> None:
    layer_modules = {model.get_submodule(n) for n in layers}
    first = min(baseline.order.index(m) for m in layer_modules)
    names = {m: n for n, m in model.named_modules()}
    # forward hooks fire on exit, so a container's own position is after its children
    after = [m for m in baseline.order[first + 1 :] if isinstance(m, _OTHER_NONLINEAR)]
    if after:
        raise BadOption(
            f"{type(after[0]).__name__} {names[after[0]]!r} runs after layer {layers[0]!r}; "
            "one-pass DeepLift supports ReLU only there (use attributions=('gradient',))"
        )


# --- inputs and targets -----------------------------------------------------------------------


def _check_input(model: nn.Module, x: torch.Tensor) -> None:
    channels = in_channels(model)
    if x.ndim != 4 or x.shape[1] != channels:
        raise BadOption(
            f"input of shape {tuple(x.shape)} does not fit the model; "
            f"allowed: [B, {channels}, H, W] (B tiles of {channels} channels)"
        )


def _as_target(target: int | Sequence[int] | torch.Tensor, batch: int) -> torch.Tensor:
    t = torch.as_tensor(target, dtype=torch.long).flatten()
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise BadOption(f"target has {t.numel()} entries for {batch} tiles; give one per tile")
    return t


def target_scalar(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample target logit: ``output[b, target[b]]``, summed over pixels for segmentation."""
    classes = output.shape[1]
    if int(target.min()) < 0 or int(target.max()) >= classes:
        raise BadOption(
            f"target {target.tolist()} out of range for a model with {classes} output classes; "
            f"allowed: 0..{classes - 1}"
        )
    picked = output.gather(1, target.view(-1, *([1] * (output.ndim - 1))).expand(-1, 1, *output.shape[2:]))
    return picked.flatten(1).sum(1)


# --- the pass ---------------------------------------------------------------------------------


@contextmanager
def _two_rule_forward(relu: nn.ReLU, z0: torch.Tensor, mode: _Mode) -> Iterator[None]:
    """Runs ``relu`` as a ``_TwoRuleReLU`` while active (instance-level forward, restored after)."""
    relu.forward = lambda z: _TwoRuleReLU.apply(z, z0, mode)
    try:
        yield
    finally:
        del relu.forward


@contextmanager
def _instrumented(
    model: nn.Module, baseline: _Baseline, layers: list[str], mode: _Mode
) -> Iterator[dict[str, torch.Tensor]]:
    """While active, ReLUs carry both derivatives and the layers' outputs are collected.

    Autograd records from the first requested layer on only: the stem needs no graph.
    """
    outputs: dict[str, torch.Tensor] = {}

    def start_graph(_m: nn.Module, _inputs: tuple) -> None:
        torch.set_grad_enabled(True)

    def collect(_m: nn.Module, _inputs: tuple, out: torch.Tensor, name: str) -> torch.Tensor:
        if not out.requires_grad:  # frozen weights: make the layer a leaf of the graph
            out = out.detach().requires_grad_()
        outputs[name] = out
        return out

    with ExitStack() as stack:
        for module in model.modules():
            if isinstance(module, nn.ReLU):
                stack.enter_context(_two_rule_forward(module, baseline.relu_inputs[module], mode))
        hooks = stack.enter_context(Hooks())
        for name in layers:
            module = model.get_submodule(name)
            hooks.forward_pre(module, start_graph)
            hooks.forward(module, lambda m, i, o, n=name: collect(m, i, o, n))
        stack.enter_context(torch.no_grad())
        yield outputs


def _chunks(batch: int, smoothgrad: SmoothGrad | None, max_batch: int) -> Iterator[tuple[slice, int]]:
    """(tile slice, samples in this chunk) pairs that keep each forward at most ``max_batch``."""
    samples = smoothgrad.samples if smoothgrad else 1
    tiles_per = max(1, min(batch, max_batch // samples))
    per_chunk = max(1, min(samples, max_batch // tiles_per))
    for start in range(0, batch, tiles_per):
        for done in range(0, samples, per_chunk):
            yield slice(start, min(batch, start + tiles_per)), min(per_chunk, samples - done)


def attribute(
    model: nn.Module,
    x: torch.Tensor,
    *,
    layers: str | Sequence[str],
    target: int | Sequence[int] | torch.Tensor,
    attributions: Sequence[str] = ATTRIBUTIONS,
    smoothgrad: SmoothGrad | None = None,
    max_batch: int = 32,
    noise_seeds: Sequence[int] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Hidden-layer attributions: attribution → layer (as named, ``blocks`` expanded) → [B, C, h, w].

    One forward and one backward per attribution for all layers together, over the SmoothGrad
    samples in chunks of at most ``max_batch`` inputs (bounded memory). ``model`` must be in eval
    mode and canonical form (``load_model`` gives that). ``noise_seeds`` (one per tile) draws each
    tile's SmoothGrad noise from its own generator, so a tile's result does not depend on which
    other tiles share its batch (``smoothgrad.seed`` is then unused).
    """
    unknown = [a for a in attributions if a not in ATTRIBUTIONS]
    if unknown or not attributions:
        raise BadOption(f"unknown attributions {unknown}; allowed: {', '.join(ATTRIBUTIONS)}")
    _check_input(model, x)
    if model.training:
        raise BadOption("model is in training mode; call model.eval() (BatchNorm must be frozen)")
    keys = layer_map(model, layers)
    resolved = list(dict.fromkeys(keys.values()))
    target = _as_target(target, x.shape[0]).to(x.device)
    baseline = _baseline(model, x, resolved)
    if "deeplift" in attributions:
        _check_rules(model, baseline, resolved)
    generator = None
    if smoothgrad is not None and smoothgrad.seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(smoothgrad.seed)
    tile_generators = _tile_generators(noise_seeds, x) if smoothgrad is not None else None
    totals = {a: {n: None for n in resolved} for a in attributions}
    mode = _Mode()
    for tiles, samples in _chunks(x.shape[0], smoothgrad, max_batch):
        inputs = x[tiles].repeat_interleave(samples, 0)
        if tile_generators is not None:
            inputs = inputs + _tile_noise(tile_generators[tiles], samples, smoothgrad.stdev, x)
        elif smoothgrad is not None:
            inputs = inputs + torch.normal(
                0.0, smoothgrad.stdev, inputs.shape, generator=generator, device=x.device
            ).to(x.dtype)
        with _instrumented(model, baseline, resolved, mode) as acts:
            output = model(inputs)
        scalar = target_scalar(output, target[tiles].repeat_interleave(samples)).sum()
        for k, attribution in enumerate(attributions):
            mode.deeplift = attribution == "deeplift"
            grads = torch.autograd.grad(
                scalar, [acts[n] for n in resolved], retain_graph=k + 1 < len(attributions)
            )
            for name, grad in zip(resolved, grads, strict=True):
                value = grad
                if mode.deeplift:
                    value = (acts[name].detach() - baseline.layer_outputs[name]) * grad
                value = value.unflatten(0, (-1, samples)).sum(1)
                _accumulate(totals[attribution], name, tiles, value, x.shape[0])
    count = smoothgrad.samples if smoothgrad else 1
    return {a: {key: totals[a][name] / count for key, name in keys.items()} for a in attributions}


def _tile_generators(seeds: Sequence[int] | None, x: torch.Tensor) -> list[torch.Generator] | None:
    """One generator per tile, seeded with that tile's seed (None: no per-tile seeds)."""
    if seeds is None:
        return None
    seeds = [int(s) for s in seeds]
    if len(seeds) != x.shape[0]:
        raise BadOption(f"noise_seeds has {len(seeds)} entries for {x.shape[0]} tiles; give one per tile")
    return [torch.Generator(device=x.device).manual_seed(s) for s in seeds]


def _tile_noise(
    generators: list[torch.Generator], samples: int, stdev: float, x: torch.Tensor
) -> torch.Tensor:
    """The next ``samples`` noise draws of each tile, one draw per call: a tile's draws are the
    same sequence however its samples are split into chunks."""
    shape = (1, *x.shape[1:])
    draws = [
        torch.normal(0.0, stdev, shape, generator=g, device=x.device)
        for g in generators
        for _ in range(samples)
    ]
    return torch.cat(draws).to(x.dtype)


def _accumulate(
    totals: dict[str, torch.Tensor | None], name: str, tiles: slice, value: torch.Tensor, batch: int
) -> None:
    if totals[name] is None:
        totals[name] = value.new_zeros((batch, *value.shape[1:]))
    totals[name][tiles] += value
