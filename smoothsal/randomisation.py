"""Cascading model-parameter randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps").

On a copy of the model, the weights are re-initialised from the output side inward: the head
first, then the deepest block, and so on down to the block of the shallowest explained layer.
After each step the method's maps are recomputed (same SmoothGrad seeds) and compared with the
maps of the intact model by the Spearman rank correlation of |map| per tile. A map that stays
the same when the weights it claims to explain are destroyed explains the input, not the model.

Choices:
- Re-initialisation draws what a freshly built torchvision ResNet has: every conv (surrogate-path
  and hook convs included) Kaiming-normal (fan-out, ReLU) with zero bias, linear layers PyTorch's
  default, norm layers weight 1 and bias 0. Each module draws from its own generator, seeded by
  (seed, qualified name): a module's new weights do not depend on the device or the grouping.
- BatchNorm running statistics are reset too (mean 0, variance 1, ``batchnorm="reset"``): they
  are learned from data through the trained weights and describe nothing once those are redrawn.
  The authors' ``randomize_model`` copies parameters only, so their partial steps keep the trained
  statistics; ``batchnorm="keep"`` does that.
- Surrogate method: smoothing installs each surrogate path under its conv's name, so a path whose
  conv lies in a randomised block is re-initialised with that block (its two convs drawn afresh,
  not retrained to the randomised conv).
- The stem (everything before the first block) is never re-initialised. Modules outside the blocks
  that run between two blocks go with the block before them; those after the last block are the
  head.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .attribution import ATTRIBUTIONS, SmoothGrad, attribute
from .errors import BadInput, BadOption
from .hooks import Hooks
from .metrics import spearman
from .models import resolve_layers, stage_blocks
from .smoothing import default_example

__all__ = [
    "CascadeStep",
    "MapsFn",
    "RandomisationCurves",
    "RandomisationSettings",
    "attribution_maps",
    "cascade",
    "cascade_steps",
    "randomisation_curves",
]

GROUPINGS = ("block", "stage")
BATCHNORM = ("reset", "keep")
MapsFn = Callable[[nn.Module], Mapping[Hashable, torch.Tensor]]
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class RandomisationSettings:
    """``by``: one step per block (Adebayo's cascade) or per resolution stage (the authors' eval,
    fewer steps; the default: benchmarks/faithfulness.py keeps the stage within its 5 % budget only so);
    ``batchnorm``: reset or keep running statistics (see the module docstring)."""

    seed: int = 0
    by: str = "stage"
    batchnorm: str = "reset"

    def __post_init__(self) -> None:
        if self.by not in GROUPINGS:
            raise BadOption(f"unknown grouping by={self.by!r}; allowed: {', '.join(GROUPINGS)}")
        if self.batchnorm not in BATCHNORM:
            raise BadOption(f"unknown batchnorm={self.batchnorm!r}; allowed: {', '.join(BATCHNORM)}")


@dataclass(frozen=True)
class CascadeStep:
    """One step: ``label`` (``head``, a block such as ``layer4.1``, or a stage alias such as
    ``layer4``) and the qualified names of the modules re-initialised at it."""

    label: str
    modules: tuple[str, ...]


@dataclass(frozen=True)
class RandomisationCurves:
    """``spearman[key]`` ``[B, S]``: column s compares |map| after ``steps[: s + 1]`` are
    re-initialised with |map| of the intact model (NaN where a map is constant)."""

    steps: tuple[CascadeStep, ...]
    spearman: dict[Hashable, torch.Tensor]


# --- the steps --------------------------------------------------------------------------------


def _parameter_owners(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Modules holding parameters or running statistics of their own, in the order they first run."""
    names = {m: n for n, m in model.named_modules()}
    owners = [m for m in names if list(m.parameters(recurse=False)) or hasattr(m, "reset_running_stats")]
    order: list[str] = []

    def record(module: nn.Module, _inputs: object) -> None:
        if names[module] not in order:
            order.append(names[module])

    with Hooks() as hooks, torch.no_grad():
        for m in owners:
            hooks.forward_pre(m, record)
        model(example)
    return order


def _inside(name: str, parent: str) -> bool:
    return name == parent or name.startswith(parent + ".")


def _groups(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, list[str]], list[str]]:
    """Per block the modules re-initialised with it (the block + what runs between it and the
    next one), and the head."""
    stages = stage_blocks(model)
    if not stages:
        raise BadOption(
            f"{type(model).__name__} has no known resolution stages (layer1…layer4 of a ResNet); "
            "model randomisation needs them to cascade block by block"
        )
    blocks = [b for bs in stages.values() for b in bs]
    groups: dict[str, list[str]] = {b: [b] for b in blocks}
    head: list[str] = []
    current = None
    for name in _parameter_owners(model, example):
        block = next((b for b in blocks if _inside(name, b)), None)
        if block is not None:
            current = block
        elif current == blocks[-1]:
            head.append(name)
        elif current is not None:
            groups[current].append(name)
    return groups, head


def _deepest_needed(model: nn.Module, layers: str | Sequence[str], blocks: list[str], head: list[str]) -> int:
    """Index of the shallowest block that the cascade must reach (len(blocks): the head only)."""
    found = []
    for layer in resolve_layers(model, layers):
        holding = [i for i, b in enumerate(blocks) if _inside(layer, b)]
        within = [i for i, b in enumerate(blocks) if _inside(b, layer)]  # a stage: its last block's output
        if holding or within:
            found.append(holding[0] if holding else within[-1])
        elif any(_inside(layer, h) or _inside(h, layer) for h in head):
            found.append(len(blocks))
        else:
            raise BadOption(
                f"layer {layer!r} lies before the first block (the stem); randomisation re-initialises "
                "blocks and the head only: explain a block or stage (e.g. layer1)"
            )
    return min(found)


def cascade_steps(
    model: nn.Module, layers: str | Sequence[str], *, by: str = "block", example: torch.Tensor | None = None
) -> list[CascadeStep]:
    """The cascade for maps at ``layers``: head, then blocks (or stages) from the deepest down to
    the one holding the shallowest of ``layers``. ``example`` is traced for the call order."""
    if by not in GROUPINGS:
        raise BadOption(f"unknown grouping by={by!r}; allowed: {', '.join(GROUPINGS)}")
    example = default_example(model, 224) if example is None else example
    groups, head = _groups(model, example)
    blocks = list(groups)
    stop = _deepest_needed(model, layers, blocks, head)
    steps = [CascadeStep("head", tuple(head))] if head else []
    if by == "block":
        return steps + [CascadeStep(b, tuple(groups[b])) for b in reversed(blocks[stop:])]
    for alias, members in reversed(stage_blocks(model).items()):
        if blocks.index(members[-1]) >= stop:
            steps.append(CascadeStep(alias, tuple(n for b in members for n in groups[b])))
    return steps


# --- re-initialisation ------------------------------------------------------------------------


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _draw(param: torch.Tensor, init: Callable[..., torch.Tensor], g: torch.Generator, **kw) -> None:
    fresh = torch.empty(param.shape, dtype=torch.float32)
    init(fresh, generator=g, **kw)
    param.copy_(fresh)


def _reinitialise(module: nn.Module, name: str, seed: int, batchnorm: str) -> None:
    g = _generator(seed, name)
    if isinstance(module, _CONVS):
        _draw(module.weight, nn.init.kaiming_normal_, g, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.Linear):
        _draw(module.weight, nn.init.kaiming_uniform_, g, a=math.sqrt(5))
        if module.bias is not None:
            bound = 1 / math.sqrt(module.in_features) if module.in_features else 0.0
            _draw(module.bias, nn.init.uniform_, g, a=-bound, b=bound)
    elif hasattr(module, "reset_running_stats"):  # BatchNorm / InstanceNorm with statistics
        if batchnorm == "reset" and getattr(module, "track_running_stats", True):
            module.reset_running_stats()
        if getattr(module, "affine", False):
            module.weight.fill_(1.0)
            module.bias.zero_()
    elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
        module.reset_parameters()
    elif list(module.parameters(recurse=False)):
        raise BadInput(
            f"cannot re-initialise {name!r} ({type(module).__name__}): smoothsal knows convs, linear and "
            "norm layers; randomisation needs every parameter of a block redrawn"
        )


def _randomise(model: nn.Module, step: CascadeStep, settings: RandomisationSettings) -> None:
    with torch.no_grad():
        for top in step.modules:
            for sub, module in model.get_submodule(top).named_modules(prefix=top):
                _reinitialise(module, sub, settings.seed, settings.batchnorm)


def cascade(
    model: nn.Module,
    layers: str | Sequence[str],
    settings: RandomisationSettings = RandomisationSettings(),
    *,
    example: torch.Tensor | None = None,
) -> Iterator[tuple[CascadeStep, nn.Module]]:
    """Yields (step, model) after each step of the cascade; the model is one working copy,
    randomised further at each step (``model`` itself is never changed)."""
    steps = cascade_steps(model, layers, by=settings.by, example=example)
    work = copy.deepcopy(model)
    for step in steps:
        _randomise(work, step, settings)
        yield step, work


# --- the curves -------------------------------------------------------------------------------


def attribution_maps(
    x: torch.Tensor,
    *,
    layers: str | Sequence[str],
    target: int | Sequence[int] | torch.Tensor,
    attributions: Sequence[str] = ATTRIBUTIONS,
    smoothgrad: SmoothGrad | None = None,
    noise_seeds: Sequence[int] | None = None,
    max_batch: int = 32,
    precision: str = "fp32",
) -> MapsFn:
    """The stage's maps as a function of the model: (attribution, layer) → channel-summed
    ``[B, h, w]``, from ``attribute`` with fixed tiles, targets, SmoothGrad seeds and precision."""

    def maps(model: nn.Module) -> dict[Hashable, torch.Tensor]:
        out = attribute(
            model, x, layers=layers, target=target, attributions=attributions, smoothgrad=smoothgrad,
            max_batch=max_batch, noise_seeds=noise_seeds, precision=precision,
        )  # fmt: skip
        return {(a, layer): z.sum(dim=1) for a, per in out.items() for layer, z in per.items()}

    return maps


def _abs_maps(maps: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
    return {k: torch.as_tensor(v).detach().float().abs().cpu() for k, v in maps.items()}


def randomisation_curves(
    model: nn.Module,
    maps: MapsFn,
    *,
    layers: str | Sequence[str],
    settings: RandomisationSettings = RandomisationSettings(),
    before: Mapping[Hashable, torch.Tensor] | None = None,
    example: torch.Tensor | None = None,
) -> RandomisationCurves:
    """Spearman correlation of |map| with the intact model's, per tile, after each cascade step.

    ``model``: the model the method explains (the smoothed copy for a smoothing method).
    ``maps(model)`` → key → ``[B, h, w]`` (e.g. ``attribution_maps``). ``layers``: the explained
    layers (where the cascade stops). ``before``: the intact model's maps if already at hand (the
    stored ones), else computed here. One ``maps`` call per step (plus one without ``before``).
    """
    reference = _abs_maps(before if before is not None else maps(copy.deepcopy(model)))
    steps, columns = [], {k: [] for k in reference}
    for step, randomised in cascade(model, layers, settings, example=example):
        after = _abs_maps(maps(randomised))
        missing = [k for k in reference if k not in after]
        if missing:
            raise ValueError(f"the maps function gave no map for {missing} (given before: {list(reference)})")
        for key, ref in reference.items():
            columns[key].append(spearman(ref, after[key]))
        steps.append(step)
    return RandomisationCurves(tuple(steps), {k: torch.stack(c, dim=1) for k, c in columns.items()})
