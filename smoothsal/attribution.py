"""Gradient and DeepLift at many hidden layers from one forward and one backward per attribution.

DeepLift (zero baseline) obeys the chain rule for its multipliers, so one backward pass in which every
ReLU's local derivative is replaced by (relu(z) − relu(z₀)) / (z − z₀), and every other module with a
Captum rule gets that rule (smoothsal/deeplift.py), gives the multipliers at every layer at once; the
gradient comes from a second backward over the same graph. The baseline's activations do not depend
on the tile: they are computed once per model and input size (a MaxPool after the first layer needs
the baseline in the batch: see deeplift.py). Results equal Captum's
``LayerDeepLift(multiply_by_inputs=True)`` and ``LayerGradientXActivation(multiply_by_inputs=False)``
in a ``NoiseTunnel``.

``precision`` chooses the arithmetic of the pass: ``fp32`` (exact; TF32 off on CUDA), ``tf32`` (CUDA
only: fp32 storage, TF32 tensor-core convolutions) or ``bf16`` (AMX on CPU, tensor cores on GPU),
which runs on a converted copy of the model (the given model is never changed). Noise, SmoothGrad
sums, DeepLift deltas and the returned maps are fp32 whatever the precision, except in ``fp64``: the
reference arithmetic (a float64 copy of the model, everything float64), against which tests judge
how far fp32 may lie from the exact result on a given CPU.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .deeplift import FunctionalCalls, Mode, check_supported, record_rule_io, rule_forward, rules_after
from .errors import BadOption
from .hooks import Hooks
from .models import ReluUses, in_channels, layer_map, module_stack
from .precision import (
    PRECISIONS,
    Arithmetic,
    arithmetic_of,
    as_compute_input,
    compute_model,
    cuda_fp32_math,
    weights_version,
)

__all__ = ["ATTRIBUTIONS", "CPU_MAX_BATCH", "PRECISIONS", "SmoothGrad", "attribute", "target_scalar"]

ATTRIBUTIONS = ("gradient", "deeplift")
CPU_MAX_BATCH = 32  # max_batch="auto" off CUDA: inputs per forward/backward
_GPU_MAX_BATCH = 256  # more does not run faster on one GPU, only holds memory
_GPU_MEMORY_SHARE = 0.5  # of the free GPU memory that max_batch="auto" plans to use
# Peak memory of the pass per byte of leaf-module outputs of one input: 0.7–0.85 measured on CPU
# (ResNet18/50, fp32/bf16, RSS growth); twice that for the CUDA allocator's slack and cuDNN workspaces.
_PEAK_PER_OUTPUT = 1.5


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


# --- the baseline -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Baseline:
    rule_io: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]  # rescale/maxpool modules' input, output
    calls: list[tuple[int, nn.Module, str]]  # functional nonlinearities (see deeplift.FunctionalCalls)
    layer_outputs: dict[str, torch.Tensor]
    order: list[nn.Module]  # modules in call order, to check what runs after the layers
    output_bytes: int  # bytes of all leaf-module outputs for one input (sizes the batch on GPU)


_BASELINES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Baseline]] = weakref.WeakKeyDictionary()


def _baseline(model: nn.Module, like: torch.Tensor, layers: list[str]) -> _Baseline:
    """Activations of the zero input: once per model, input size and weights."""
    key = (tuple(like.shape[1:]), like.dtype, like.device, tuple(layers), weights_version(model))
    cache = _BASELINES.setdefault(model, {})
    if key not in cache:
        cache.clear()
        cache[key] = _run_baseline(model, torch.zeros_like(like[:1]), layers)
    return cache[key]


def _run_baseline(model: nn.Module, zero: torch.Tensor, layers: list[str]) -> _Baseline:
    layer_outputs: dict[str, torch.Tensor] = {}
    order: list[nn.Module] = []
    sizes: list[int] = []

    def record(module: nn.Module, inputs: tuple, output: object) -> None:
        order.append(module)
        leaf = not any(True for _ in module.children())
        if leaf and isinstance(output, torch.Tensor) and not any(output is i for i in inputs):  # not Identity
            sizes.append(output.numel() * output.element_size())

    with ExitStack() as stack, torch.no_grad():
        hooks = stack.enter_context(Hooks())
        modules = stack.enter_context(module_stack(model))
        uses = stack.enter_context(ReluUses(modules))
        calls = stack.enter_context(FunctionalCalls(modules, order))
        for module in model.modules():
            hooks.forward(module, record)
        rule_io = record_rule_io(hooks, model)
        for name in layers:
            hook = lambda m, i, o, n=name: layer_outputs.__setitem__(n, o.detach().clone())  # in-place after
            hooks.forward(model.get_submodule(name), hook)
        model(zero)
    _check_canonical(model, uses)
    return _Baseline(rule_io, calls.calls, layer_outputs, order, sum(sizes))


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


def _check_rules(model: nn.Module, baseline: _Baseline, layers: list[str]) -> bool:
    """One line for what one-pass DeepLift cannot match to Captum after the first layer; True where a
    MaxPool runs there (the pass then runs inputs and baselines paired, see deeplift.py)."""
    rules = rules_after(model, baseline.order, baseline.calls, layers)
    first = min(layers, key=lambda n: baseline.order.index(model.get_submodule(n)))
    check_supported(model, rules, baseline.order, first)
    return "maxpool" in rules.values()


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


def _max_batch(max_batch: int | str, baseline: _Baseline | None, device: torch.device) -> int:
    """``max_batch`` as given, or for ``"auto"``: CPU_MAX_BATCH off CUDA, and on CUDA what a share
    of the free memory holds at the measured peak per input (needs the baseline)."""
    if max_batch == "auto":
        if device.type != "cuda" or baseline is None:
            return CPU_MAX_BATCH
        free = torch.cuda.mem_get_info(device)[0]
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        per_input = _PEAK_PER_OUTPUT * baseline.output_bytes
        return max(1, min(_GPU_MAX_BATCH, int(_GPU_MEMORY_SHARE * free / per_input)))
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise BadOption(f"max_batch must be an integer >= 1 or 'auto', got {max_batch!r}")
    return max_batch


# --- the pass ---------------------------------------------------------------------------------


@contextmanager
def _instrumented(
    model: nn.Module, baseline: _Baseline, layers: list[str], mode: Mode, low: bool, paired: bool
) -> Iterator[dict[str, torch.Tensor]]:
    """While active, the rule modules (deeplift.py) carry both derivatives and the layers' outputs are collected.

    Autograd records from the first requested layer's output on: nothing before it needs a graph.
    """
    outputs: dict[str, torch.Tensor] = {}

    def collect(_m: nn.Module, _inputs: tuple, out: torch.Tensor, name: str) -> torch.Tensor:
        if not out.requires_grad:  # the first layer, or frozen weights: a leaf of the graph
            out = out.detach().requires_grad_()
        outputs[name] = out
        torch.set_grad_enabled(True)
        return out

    with ExitStack() as stack:
        for module in model.modules():
            if module in baseline.rule_io and not getattr(module, "return_indices", False):
                stack.enter_context(rule_forward(module, baseline.rule_io[module], mode, low, paired))
        hooks = stack.enter_context(Hooks())
        for name in layers:
            hooks.forward(model.get_submodule(name), lambda m, i, o, n=name: collect(m, i, o, n))
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
    max_batch: int | str = "auto",
    noise_seeds: Sequence[int] | None = None,
    precision: str = "fp32",
) -> dict[str, dict[str, torch.Tensor]]:
    """Hidden-layer attributions: attribution → layer (as named, ``blocks`` expanded) → [B, C, h, w].

    One forward and one backward per attribution for all layers together, over the SmoothGrad
    samples in chunks of at most ``max_batch`` inputs (bounded memory; ``"auto"``: CPU_MAX_BATCH on
    CPU, sized from the free memory on CUDA). ``model`` must be in eval mode and canonical form
    (``load_model`` gives that). ``noise_seeds`` (one per tile) draws each tile's SmoothGrad noise
    from its own generator, so a tile's result does not depend on which other tiles share its batch
    (``smoothgrad.seed`` is then unused). ``precision``: one of PRECISIONS, or ``"fp64"`` (the
    reference; see the module). Maps are float32 (float64 in fp64).
    """
    unknown = [a for a in attributions if a not in ATTRIBUTIONS]
    if unknown or not attributions:
        raise BadOption(f"unknown attributions {unknown}; allowed: {', '.join(ATTRIBUTIONS)}")
    _check_input(model, x)
    if model.training:
        raise BadOption("model is in training mode; call model.eval() (BatchNorm must be frozen)")
    arithmetic = arithmetic_of(precision, x.device)
    _max_batch(max_batch, None, x.device)  # a bad value fails before any work
    keys = layer_map(model, layers)
    resolved = list(dict.fromkeys(keys.values()))
    target = _as_target(target, x.shape[0]).to(x.device)
    with cuda_fp32_math(x.device, arithmetic.tf32):
        net = compute_model(model, arithmetic, x[:1], resolved)
        baseline = _baseline(net, as_compute_input(x[:1], arithmetic), resolved)
        paired = "deeplift" in attributions and _check_rules(net, baseline, resolved)
        setup = _Pass(net, baseline, resolved, tuple(attributions), arithmetic, paired)
        per_forward = max(1, _max_batch(max_batch, baseline, x.device) // (2 if paired else 1))
        chunks = _chunks(x.shape[0], smoothgrad, per_forward)
        totals = _run(setup, x, target, chunks, smoothgrad, noise_seeds)
    count = smoothgrad.samples if smoothgrad else 1
    return {a: {key: totals[a][name] / count for key, name in keys.items()} for a in attributions}


@dataclass(frozen=True)
class _Pass:
    """What every chunk runs through: the compute model, its baseline, the layers and attributions."""

    net: nn.Module
    baseline: _Baseline
    layers: list[str]
    attributions: tuple[str, ...]
    arithmetic: Arithmetic
    paired: bool  # inputs and zero baselines in one batch (a MaxPool after the first layer)


def _run(
    setup: _Pass,
    x: torch.Tensor,
    target: torch.Tensor,
    chunks: Iterator[tuple[slice, int]],
    smoothgrad: SmoothGrad | None,
    noise_seeds: Sequence[int] | None,
) -> dict[str, dict[str, torch.Tensor]]:
    """The chunks' forward and backward passes; per attribution and layer, the fp32 sum over samples."""
    noise = _Noise(smoothgrad, noise_seeds, x)
    layers, baseline = setup.layers, setup.baseline
    totals = {a: {n: None for n in layers} for a in setup.attributions}
    mode = Mode(setup.attributions)
    acc = setup.arithmetic.accumulate
    for tiles, samples in chunks:
        added = acc if acc == torch.float64 else x.dtype  # fp64 adds the same noise in fp64
        inputs = as_compute_input(noise.add(x, tiles, samples, added), setup.arithmetic)
        n = inputs.shape[0]
        if setup.paired:  # Captum's order: inputs, then as many baselines; the target logit of both
            inputs = torch.cat([inputs, torch.zeros_like(inputs)])
        with _instrumented(setup.net, baseline, layers, mode, setup.arithmetic.low, setup.paired) as acts:
            output = setup.net(inputs)
        scalar = target_scalar(output, target[tiles].repeat_interleave(samples).repeat(inputs.shape[0] // n))
        scalar = scalar.sum()
        final = _final_grads(acts)
        for k, attribution in enumerate(setup.attributions):
            mode.deeplift = attribution == "deeplift"
            retain = k + 1 < len(setup.attributions)
            grads = torch.autograd.grad(scalar, [acts[n] for n in layers], retain_graph=retain)
            grads = [final.pop(name, grad) for name, grad in zip(layers, grads, strict=True)]
            for name, grad in zip(layers, grads, strict=True):
                value = grad = grad[:n]
                if mode.deeplift:  # the delta in fp32 (or fp64): activation and baseline are close
                    delta = acts[name][:n].detach().to(acc) - baseline.layer_outputs[name].to(acc)
                    value = delta * grad
                _accumulate(totals[attribution], name, tiles, _sample_sum(value, samples, acc), x.shape[0])
    return totals


def _final_grads(acts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Layer → its output's gradient after every tensor hook, filled by each backward.

    ``autograd.grad`` returns a non-leaf input's gradient *before* its tensor hooks when its node also
    runs (a shallower layer is requested too), so a rule's hook on a deeper layer's output (the input
    of a later ReLU or MaxPool) would be missed there. A hook registered after the forward, after the
    rules' hooks, sees the gradient they leave."""
    final: dict[str, torch.Tensor] = {}
    for name, out in acts.items():
        if not out.is_leaf:
            out.register_hook(lambda grad, name=name: final.__setitem__(name, grad))
    return final


class _Noise:
    """SmoothGrad's noise: one generator per tile (``noise_seeds``), one for all, or none."""

    def __init__(self, smoothgrad: SmoothGrad | None, seeds: Sequence[int] | None, x: torch.Tensor):
        self.smoothgrad = smoothgrad
        self.tiles = _tile_generators(seeds, x) if smoothgrad is not None else None
        self.generator = None
        if smoothgrad is not None and smoothgrad.seed is not None:
            self.generator = torch.Generator(device=x.device).manual_seed(smoothgrad.seed)

    def add(self, x: torch.Tensor, tiles: slice, samples: int, dtype: torch.dtype) -> torch.Tensor:
        """The chunk's inputs: each tile of ``tiles`` repeated ``samples`` times, plus its noise (the
        same fp32 draws in every precision), added in ``dtype`` (x's own, or float64 for fp64)."""
        inputs = x[tiles].to(dtype).repeat_interleave(samples, 0)
        if self.tiles is not None:
            return inputs + _tile_noise(self.tiles[tiles], samples, self.smoothgrad.stdev, x).to(dtype)
        if self.smoothgrad is not None:
            noise = torch.normal(
                0.0, self.smoothgrad.stdev, inputs.shape, generator=self.generator, device=x.device
            )
            return inputs + noise.to(dtype)
        return inputs


def _sample_sum(value: torch.Tensor, samples: int, dtype: torch.dtype) -> torch.Tensor:
    """[T·S, C, h, w] → the ``dtype`` sum over each tile's S samples, reduced in memory order (a
    channels_last tensor reduced as NCHW takes two orders of magnitude longer: 30–50 ms against
    0.2 ms for [20, 128, 28, 28] here)."""
    if value.is_contiguous() or not value.is_contiguous(memory_format=torch.channels_last):
        return value.unflatten(0, (-1, samples)).sum(1, dtype=dtype)
    nhwc = value.permute(0, 2, 3, 1)
    return nhwc.unflatten(0, (-1, samples)).sum(1, dtype=dtype).permute(0, 3, 1, 2)


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
    if totals[name] is None and tiles == slice(0, batch):
        totals[name] = value.contiguous()
    elif totals[name] is None:
        totals[name] = value.new_zeros((batch, *value.shape[1:]))
        totals[name][tiles] += value
    else:
        totals[name][tiles] += value
