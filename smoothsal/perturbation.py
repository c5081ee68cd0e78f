"""Deletion and insertion curves (Petsiuk et al. 2018, RISE's causal metric) on the original model.

A tile's channel-summed map, upsampled (bilinear) to the tile's pixels, orders the pixels, highest
value first (positive = evidence for the target). In K steps the next 1/K of the pixels is removed
(deletion: original → replaced) or inserted (insertion: replaced → original), and after each step
the model's probability of the tile's target is the score. A map that explains the model makes the
deletion curve fall early (low AUC) and the insertion curve rise early (high AUC); the same curves
in a seeded random pixel order, one per tile, are the reference.

Work shared across the maps of a tile: the replaced tile, the curves' end points (the original and
the fully replaced tile) and the random-order curves (they do not depend on the map). Everything
else is one batched stream of forward passes over tiles × maps × steps; no backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2.functional import gaussian_blur

from .errors import BadOption
from .metrics import auc, probabilities

__all__ = [
    "BASELINES",
    "Curves",
    "PerturbationSettings",
    "baseline_tiles",
    "deletion_insertion",
    "pixel_ranks",
    "random_orders",
    "random_ranks",
    "target_scores",
    "upsample_maps",
]

BASELINES = ("blur", "mean", "zero")
REGIONS = ("mask", "predicted", "all")  # where a segmentation score is averaged, per tile


@dataclass(frozen=True)
class PerturbationSettings:
    """How pixels are removed and inserted.

    ``baseline``: what a removed pixel becomes: ``blur`` (a Gaussian-blurred copy of the tile,
    σ = ``blur_sigma`` pixels of the tile; the stage converts from µm), ``mean`` (the tile's mean
    colour) or ``zero`` (0 after normalisation: the normalisation's mean colour). ``steps`` = K.
    ``max_batch``: inputs per forward pass.
    """

    steps: int = 20
    baseline: str = "blur"
    blur_sigma: float = 5.0
    max_batch: int = 32

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise BadOption(f"steps must be >= 1, got {self.steps}")
        if self.baseline not in BASELINES:
            raise BadOption(f"unknown baseline {self.baseline!r}; allowed: {', '.join(BASELINES)}")
        if self.baseline == "blur" and not self.blur_sigma > 0:
            raise BadOption(f"blur_sigma must be > 0 pixels, got {self.blur_sigma}")
        if self.max_batch < 1:
            raise BadOption(f"max_batch must be >= 1, got {self.max_batch}")


@dataclass(frozen=True)
class Curves:
    """Scores after each step, per tile: ``[B, K+1]`` (index 0: nothing changed yet).

    ``deletion`` / ``insertion`` hold one curve set per map key; the random-order curves are one
    per tile, shared by all its maps. ``fractions`` ``[K+1]`` is the share of pixels changed at
    each step. ``region`` (segmentation only) says per tile over which pixels the target
    probability was averaged: ``mask``, ``predicted`` or ``all`` (see ``target_scores``).
    """

    fractions: torch.Tensor
    deletion: dict[Hashable, torch.Tensor]
    insertion: dict[Hashable, torch.Tensor]
    deletion_random: torch.Tensor
    insertion_random: torch.Tensor
    region: tuple[str, ...] | None = None

    @property
    def deletion_auc(self) -> dict[Hashable, torch.Tensor]:
        return {k: auc(v, self.fractions) for k, v in self.deletion.items()}

    @property
    def insertion_auc(self) -> dict[Hashable, torch.Tensor]:
        return {k: auc(v, self.fractions) for k, v in self.insertion.items()}

    @property
    def deletion_auc_random(self) -> torch.Tensor:
        return auc(self.deletion_random, self.fractions)

    @property
    def insertion_auc_random(self) -> torch.Tensor:
        return auc(self.insertion_random, self.fractions)


# --- the pieces -------------------------------------------------------------------------------


def baseline_tiles(x: torch.Tensor, settings: PerturbationSettings = PerturbationSettings()) -> torch.Tensor:
    """What removed pixels become, per tile ``[B, C, H, W]`` (model input units)."""
    if settings.baseline == "zero":
        return torch.zeros_like(x)
    if settings.baseline == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()
    sigma = float(settings.blur_sigma)
    # ±3σ, but reflect padding needs the kernel shorter than twice the tile
    size = min(2 * math.ceil(3 * sigma) + 1, 2 * min(x.shape[-2:]) - 1)
    return gaussian_blur(x, [size, size], [sigma, sigma])


def upsample_maps(maps: torch.Tensor | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Maps ``[B, h, w]`` → ``[B, H, W]`` by bilinear interpolation (float32)."""
    m = torch.as_tensor(maps).float()
    if m.ndim != 3:
        raise ValueError(f"maps must be channel-summed [B, h, w], got shape {tuple(m.shape)}")
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return F.interpolate(m[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def _ranks_of(order: torch.Tensor) -> torch.Tensor:
    """Inverse permutations: rank[b, order[b, i]] = i."""
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks.int()


def pixel_ranks(values: torch.Tensor, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Each pixel's place in the order ``[B, H, W]`` → ``[B, H·W]``: 0 = highest value.

    Equal values keep the order ``tiebreak`` ``[B, H·W]`` (pixel indices, e.g. the tile's random
    order: a flat region of the map is then removed in no particular direction), else raster order.
    """
    flat = values.flatten(1)
    if flat.isnan().any():
        bad = flat.isnan().any(1).nonzero().flatten().tolist()
        raise ValueError(f"maps of tiles {bad} (0-based in this batch) hold NaN; they cannot order pixels")
    if tiebreak is None:
        return _ranks_of(torch.argsort(flat, dim=1, descending=True, stable=True))
    tiebreak = tiebreak.to(flat.device)
    visited = torch.argsort(flat.gather(1, tiebreak), dim=1, descending=True, stable=True)
    return _ranks_of(tiebreak.gather(1, visited))


def random_orders(seeds: Sequence[int], pixels: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A random permutation of the pixels per tile ``[B, pixels]``, drawn from that tile's own seed."""
    orders = [torch.randperm(pixels, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(orders).to(device)


def random_ranks(seeds: Sequence[int], pixels: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Each pixel's place in the tile's random order (``random_orders``) ``[B, pixels]``."""
    return _ranks_of(random_orders(seeds, pixels, device))


def _is_classification(output: torch.Tensor) -> bool:
    return output.ndim == 2 or (output.ndim == 4 and output.shape[2:] == (1, 1))


def _regions(
    original: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Per tile the pixels whose target probability is averaged, and which rule chose them."""
    size = original.shape[2:]
    predicted = original.argmax(1) == target.view(-1, 1, 1)
    if mask is None:
        annotated = torch.zeros_like(predicted)
    else:
        m = mask.to(original.device).long()
        if tuple(m.shape[1:]) != tuple(size):
            m = F.interpolate(m[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()
        annotated = m == target.view(-1, 1, 1)
    regions, kinds = [], []
    for a, p in zip(annotated, predicted, strict=True):
        kind = "mask" if a.any() else "predicted" if p.any() else "all"
        regions.append(a if kind == "mask" else p if kind == "predicted" else torch.ones_like(a))
        kinds.append(kind)
    return torch.stack(regions), tuple(kinds)


def target_scores(
    output: torch.Tensor, target: torch.Tensor, region: torch.Tensor | None = None
) -> torch.Tensor:
    """The probability of each input's target (softmax; sigmoid for one logit) ``[J]``.

    Classification: outputs ``[J, K]`` or ``[J, K, 1, 1]``. Segmentation ``[J, K, H, W]``: the
    mean target probability over ``region`` ``[J, H, W]`` (boolean).
    """
    if _is_classification(output):
        p = probabilities(output.flatten(1).double())
        return p.gather(1, target.view(-1, 1)).squeeze(1)
    p = probabilities(output.double()).gather(1, target.view(-1, 1, 1, 1).expand(-1, 1, *output.shape[2:]))
    r = region.to(p.dtype)
    return (p[:, 0] * r).flatten(1).sum(1) / r.flatten(1).sum(1)


# --- the curves -------------------------------------------------------------------------------


def _forward(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(inputs).float()


def _check(x: torch.Tensor, maps: Mapping, target: torch.Tensor, seeds: Sequence[int], mask) -> None:
    if x.ndim != 4:
        raise ValueError(f"tiles must be [B, C, H, W], got shape {tuple(x.shape)}")
    b = x.shape[0]
    if not maps:
        raise ValueError("no maps given; pass at least one [B, h, w] map per key")
    for key, m in maps.items():
        if tuple(m.shape)[:1] != (b,) or len(m.shape) != 3:
            raise ValueError(f"map {key!r} has shape {tuple(m.shape)}; expected [{b}, h, w]")
    if target.shape != (b,) or len(seeds) != b:
        raise ValueError(f"give one target and one seed per tile ({b}); got {target.numel()}, {len(seeds)}")
    if mask is not None and tuple(mask.shape) != (b, *x.shape[2:]):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected [{b}, {x.shape[2]}, {x.shape[3]}]")


def deletion_insertion(
    model: nn.Module,
    x: torch.Tensor,
    maps: Mapping[Hashable, torch.Tensor | np.ndarray],
    *,
    target: Sequence[int] | torch.Tensor,
    seeds: Sequence[int],
    settings: PerturbationSettings = PerturbationSettings(),
    mask: torch.Tensor | np.ndarray | None = None,
) -> Curves:
    """Deletion and insertion curves of every map, and the random-order reference, per tile.

    ``model``: the ORIGINAL model, in eval mode. ``x``: tiles ``[B, C, H, W]`` (model input).
    ``maps``: key (e.g. ``(attribution, layer)``) → channel-summed maps ``[B, h, w]``. ``seeds``:
    one per tile for its random order (which also breaks ties within a map). ``mask`` (segmentation): class labels ``[B, H, W]``, −1
    where not annotated. Segmentation scores average over the tile's target-class pixels of the
    mask; where the mask has none, over the pixels the model assigns to the target on the
    unperturbed tile; where there are none either, over the whole tile (``Curves.region``).
    """
    target = torch.as_tensor(target, dtype=torch.long).flatten().to(x.device)
    mask = None if mask is None else torch.as_tensor(mask)
    _check(x, maps, target, seeds, mask)
    b, k, pixels = x.shape[0], settings.steps, x.shape[2] * x.shape[3]
    counts = [(i * pixels) // k for i in range(k + 1)]
    replaced = baseline_tiles(x, settings)
    keys = list(maps)
    shuffled = random_orders(seeds, pixels, x.device)  # the reference order, and the maps' tie-break
    ranks = [pixel_ranks(upsample_maps(maps[key], x.shape[2:]).to(x.device), shuffled) for key in keys]
    ranks = torch.stack([*ranks, _ranks_of(shuffled)], dim=1)  # [B, M+1, N]

    ends = torch.cat([_forward(model, c) for c in torch.cat([x, replaced]).split(settings.max_batch)])
    region, kinds = None, None
    if not _is_classification(ends):
        region, kinds = _regions(ends[:b], target, mask)
    end_scores = target_scores(ends, target.repeat(2), None if region is None else region.repeat(2, 1, 1))
    scores = torch.empty(b, ranks.shape[1], 2, k + 1, dtype=torch.float64)  # [tile, order, del/ins, step]
    scores[:, :, 0, 0] = scores[:, :, 1, -1] = end_scores[:b].cpu().view(-1, 1)
    scores[:, :, 0, -1] = scores[:, :, 1, 0] = end_scores[b:].cpu().view(-1, 1)

    # every interior step of every curve: (tile, order, insertion?, step) in one flat index
    grid = torch.cartesian_prod(
        torch.arange(b), torch.arange(ranks.shape[1]), torch.arange(2), torch.arange(1, k)
    ).view(-1, 4)
    limits = torch.tensor(counts, device=x.device)
    for jobs in grid.split(settings.max_batch):
        t, o, ins, step = (c.to(x.device) for c in jobs.unbind(1))
        changed = ranks[t, o] < limits[step].view(-1, 1)  # the first n_k pixels of the order
        from_replaced = (changed ^ ins.bool().view(-1, 1)).view(-1, 1, *x.shape[2:])
        inputs = torch.where(from_replaced, replaced[t], x[t])
        s = target_scores(_forward(model, inputs), target[t], None if region is None else region[t])
        scores[jobs[:, 0], jobs[:, 1], jobs[:, 2], jobs[:, 3]] = s.cpu()

    return Curves(
        fractions=torch.tensor(counts, dtype=torch.float64) / pixels,
        deletion={key: scores[:, i, 0] for i, key in enumerate(keys)},
        insertion={key: scores[:, i, 1] for i, key in enumerate(keys)},
        deletion_random=scores[:, -1, 0],
        insertion_random=scores[:, -1, 1],
        region=kinds,
    )
