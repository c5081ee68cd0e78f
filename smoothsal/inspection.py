"""What smoothsal will do to a network, before it runs (``smoothsal inspect``): its downsampling ops in forward
order and the methods that change each, the stage aliases with the modules, resolutions and channels behind
them, the DeepLift rule each nonlinearity after the first stage gets, and what cannot be explained. The
workflow's dry run makes the same checks per dataset (``check_explainable``), so an impossible layer or method
stops before any job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from tabulate import tabulate
from torch import nn

from .deeplift import deeplift_rules
from .downsampling import DownsamplingOp, downsampling_ops
from .errors import BadOption
from .models import in_channels
from .smoothing import METHODS, changes_nothing, check_methods
from .stages import ModuleRun, layer_map, stage_runs, trace

__all__ = ["Inspection", "Stage", "check_explainable", "inspect_model", "to_text", "unchanged_methods"]


@dataclass(frozen=True)
class Stage:
    """A stage alias: the module behind it, and its output on the inspected tile (1/``downsampled`` of it)."""

    alias: str
    module: str
    channels: int
    shape: tuple[int, ...]
    downsampled: int  # 2 ** resolution class: 4 = the input downsampled twice


@dataclass(frozen=True)
class Inspection:
    """Everything ``inspect`` reports of one model on one tile size."""

    arch: str
    tile_size: int
    downsampling: list[DownsamplingOp]
    stages: list[Stage]
    deeplift: list[tuple[str, str, str]]  # (module or caller:function, its type, rule) after the first stage
    warnings: list[str] = field(default_factory=list)  # methods that change nothing
    problems: list[str] = field(default_factory=list)  # what cannot be explained, one line each

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _example(model: nn.Module, tile_size: int) -> torch.Tensor:
    param = next(model.parameters())
    return torch.zeros(1, in_channels(model), tile_size, tile_size, dtype=param.dtype, device=param.device)


def _stages(runs: dict[str, ModuleRun]) -> list[Stage]:
    return [
        Stage(alias, run.name, run.channels or 0, tuple(run.out_shape or ())[1:], 2**run.out_class)
        for alias, run in runs.items()
    ]


def inspect_model(model: nn.Module, arch: str, tile_size: int = 224) -> Inspection:
    """Inspect ``model`` (eval mode, canonical form: ``load_model`` gives that) on ``tile_size``-px tiles."""
    example = _example(model, tile_size)
    try:
        runs = stage_runs(trace(model, example))
    except BadOption as err:
        raise BadOption(f"arch {arch!r} on {tile_size}-px tiles: {err}; try another --tile-size") from None
    ops = downsampling_ops(model, example)
    problems = (
        [] if runs else [f"no stage alias: nothing in arch {arch!r} downsamples a {tile_size}-px tile 4×"]
    )
    rules: list[tuple[str, str, str]] = []
    if runs:
        found = deeplift_rules(model, [next(iter(runs.values())).name], example)
        rules = [(name, type_of(model, name), rule) for name, rule in found.items()]
        problems += [f"deeplift: {kind} {n!r} gets Captum's softmax rule, which one-pass DeepLift cannot match: "
                     "attribute with gradient only there" for n, kind, r in rules if r == "softmax"]  # fmt: skip
    warnings = [changes_nothing(m, f"arch {arch!r}") for m in unchanged_methods(ops)]
    return Inspection(arch, tile_size, ops, _stages(runs), rules, warnings, problems)


def unchanged_methods(ops: Sequence[DownsamplingOp]) -> list[str]:
    """The smoothing methods that change none of ``ops`` (their maps equal the original's)."""
    changed = {m for op in ops for m in op.changed_by}
    return [m for m in METHODS if m != "original" and m not in changed]


def type_of(model: nn.Module, name: str) -> str:
    """The class name of module ``name`` (a functional call ``caller:function``: the function)."""
    if ":" in name:
        return name.rpartition(":")[2]
    return type(model.get_submodule(name)).__name__


def check_explainable(
    model: nn.Module,
    arch: str,
    tile_size: int,
    layers: Sequence[str],
    methods: Sequence[str],
    attributions: Sequence[str] = ("gradient", "deeplift"),
) -> list[str]:
    """What a workflow's dry run checks per dataset: one ``BadOption`` line for what cannot run (a layer the
    model has not, maps under 2×2, the surrogate of a model with no conv to replace, DeepLift through a
    module it has no per-tile rule for); returns the warnings (a hook method that changes nothing)."""
    check_methods(list(methods))
    example = _example(model, tile_size)
    modules = layer_map(model, list(layers), example)
    by_name = {r.name: r for r in trace(model, example).runs}
    small = [
        k
        for k, name in modules.items()
        if by_name.get(name) and min((by_name[name].out_shape or (0,))[-2:]) < 2
    ]
    if small:
        raise BadOption(
            f"layer {small[0]!r} of arch {arch!r} gives maps under 2×2 on {tile_size}-px tiles (TV and heatmaps need "
            f"2×2); raise tile_size or leave {small[0]} out"
        )
    unchanged = unchanged_methods(downsampling_ops(model, example))
    if "surrogate" in methods and "surrogate" in unchanged:
        raise BadOption(
            f"arch {arch!r} has no stride-2 conv after the stem: no surrogate to train; leave out method surrogate"
        )
    if "deeplift" in attributions:
        first = min(modules.values(), key=lambda name: by_name[name].start if name in by_name else 0)
        softmax = [n for n, rule in deeplift_rules(model, [first], example).items() if rule == "softmax"]
        if softmax:
            raise BadOption(
                f"arch {arch!r}: {type_of(model, softmax[0])} {softmax[0]!r} runs after layer {first!r}, and one-pass "
                "DeepLift cannot match Captum's softmax rule; leave deeplift out of attributions or pick later layers"
            )
    return [changes_nothing(m, f"arch {arch!r}") for m in unchanged if m in methods]


def to_text(report: Inspection) -> str:
    """The report as plain-text tables (what ``smoothsal inspect`` prints)."""
    ops = [
        (op.name or "(model)", op.kind, op.op, "×".join(map(str, op.kernel)), "×".join(map(str, op.stride)),
         op.groups, f"1/{2 ** op.out_class}" if op.out_class is not None else "", ", ".join(op.changed_by) or "none")
        for op in report.downsampling
    ]  # fmt: skip
    stages = [
        (s.alias, s.module, f"1/{s.downsampled}", s.channels, "×".join(map(str, s.shape[-2:])))
        for s in report.stages
    ]
    groups: dict[tuple[str, str], list[str]] = {}
    for name, kind, rule in report.deeplift:
        groups.setdefault((kind, rule), []).append(name)
    rules = [
        (kind, rule, len(names), ", ".join(names[:3]) + (" …" if len(names) > 3 else ""))
        for (kind, rule), names in groups.items()
    ]
    parts = [
        f"{report.arch} on {report.tile_size}-px tiles",
        "Downsampling ops (forward order)\n" + tabulate(ops, ["op", "kind", "type", "kernel", "stride", "groups", "out", "changed by"], disable_numparse=True),
        "Stage aliases\n" + tabulate(stages, ["alias", "module", "resolution", "channels", "map"], disable_numparse=True),
        "DeepLift rules after the first stage (Captum's)\n"
        + (tabulate(rules, ["type", "rule", "modules", "e.g."], disable_numparse=True) if rules else "(none)"),
    ]  # fmt: skip
    notes = [f"warning: {w}" for w in report.warnings] + [f"cannot explain: {p}" for p in report.problems]
    return "\n\n".join(parts + (["\n".join(notes)] if notes else [])) + "\n"
