"""`smoothsal train-model`: the embedded demo's models, trained from a seeded random init.

A small supervised run: a tile classifier (labels from the tile table, classes weighted by inverse
frequency) or a segmenter (per-pixel classes rasterised from the annotations), with random flips and
turns, BatchNorm statistics recomputed at the end; written as a checkpoint ``load_model`` reads.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .annotations import read_annotations, tile_label_mask
from .errors import BadOption, BadTable
from .files import check_file_out
from .model_sources import canonical_kwargs, model_kwargs, parse_arch
from .models import IMAGENET_MEAN, IMAGENET_STD, Normalize, check_input_size, in_channels
from .tiles import TileDataset, read_tile_table, read_tile_tables
from .torch_files import save_torch_file

__all__ = [
    "MODEL_FORMAT",
    "ModelResult",
    "ModelSettings",
    "model_task",
    "run_model_training",
    "save_model",
    "train_model",
    "training_tiles",
]


MODEL_FORMAT = "smoothsal-model/1"


@dataclass(frozen=True)
class ModelSettings:
    """A small supervised run: tile classifier (labels from the tile table) or segmenter (masks from
    the annotations). Seeded: the same settings and tiles give the same weights on one machine."""

    arch: str
    num_classes: int
    epochs: int = 4
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    model_kwargs: str = ""  # the architecture's constructor options, canonical JSON ("" = none)

    def __post_init__(self) -> None:
        parse_arch(self.arch)
        object.__setattr__(self, "model_kwargs", canonical_kwargs(self.model_kwargs))
        for name in ("epochs", "batch_size", "num_classes"):
            if getattr(self, name) < 1:
                raise BadOption(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise BadOption(
                f"train-model needs --num-classes >= 2 (softmax + cross-entropy), got {self.num_classes}"
            )
        if not self.lr > 0:
            raise BadOption(f"lr must be > 0, got {self.lr}")

    def build(self) -> nn.Module:
        """A randomly initialised model of this arch (seed it first for a repeatable init)."""
        return parse_arch(self.arch).build(self.num_classes, model_kwargs(self.model_kwargs))


def model_task(model: nn.Module, tile_size: int) -> str:
    """The model's task: segmentation when it answers with a map ([B, K, H, W] at input size), else
    classification."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, in_channels(model), tile_size, tile_size))
    model.train(was_training)
    return "segmentation" if out.ndim == 4 and out.shape[-2:] == (tile_size, tile_size) else "classification"


def training_tiles(
    table: pd.DataFrame, task: str, annotations: dict[str, object] | None = None, num_classes: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """All tiles in memory as uint8 [N, 3, S, S] with their targets: the table's `label` (tiles with
    label < 0 or none are left out) or the annotation mask [N, S, S] of each tile's slide."""
    if task == "classification":
        if "label" not in table:
            raise BadTable("the tile tables have no `label` column; tile the slides with --annotations")
        labels = table["label"].fillna(-1).to_numpy(dtype=int)
        table = table[labels >= 0].reset_index(drop=True)
        labels = labels[labels >= 0]
        if len(table) == 0:
            raise BadTable(
                "no labelled tiles (label >= 0) in the tile tables; tile the slides with --annotations"
            )
        if labels.max() >= num_classes:
            raise BadOption(f"tile label {labels.max()} does not fit --num-classes {num_classes}")
        targets = torch.from_numpy(labels.astype(np.int64))
    else:
        missing = sorted(set(table["slide_id"]) - set(annotations or {}))
        if missing:
            raise BadOption(
                f"segmentation needs the annotations of every slide; none given for {missing[:5]}"
            )
        masks = [
            tile_label_mask(annotations[sid], int(x), int(y), int(w), int(s))
            for sid, x, y, w, s in table[["slide_id", "x", "y", "w", "tile_size"]].itertuples(index=False)
        ]
        targets = torch.from_numpy(np.stack(masks).astype(np.int64))
        if int(targets.max()) >= num_classes:
            raise BadOption(
                f"annotation class {int(targets.max())} does not fit --num-classes {num_classes}; "
                "check --class-map"
            )
    dataset = TileDataset(table)
    images = torch.stack([(dataset[i][0] * 255).round().to(torch.uint8) for i in range(len(dataset))])
    return images, targets


def _augment(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips and 90° turns per tile (the same for its mask): tissue has no orientation."""
    dense = y.ndim == 3
    yy = y.unsqueeze(1) if dense else y
    for dim, turn in ((-1, False), (-2, False), (None, True)):
        flip = torch.rand(x.shape[0], generator=g) < 0.5
        if not flip.any():
            continue
        x = x.clone()
        x[flip] = x[flip].transpose(-1, -2) if turn else x[flip].flip(dim)
        if dense:
            yy = yy.clone()
            yy[flip] = yy[flip].transpose(-1, -2) if turn else yy[flip].flip(dim)
    return x, yy.squeeze(1) if dense else yy


def recompute_batchnorm(model: nn.Module, images: torch.Tensor, norm: Normalize, batch_size: int) -> None:
    """Set every BatchNorm's running statistics to the exact mean/variance over the training tiles
    under the final weights: a short run leaves them lagging behind the weights (exponential average)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches
    model.train()
    with torch.no_grad():
        for k in range(0, len(images), batch_size):
            model(norm(images[k : k + batch_size].float() / 255.0))
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    model.eval()


@dataclass(frozen=True)
class ModelResult:
    """A trained model's weights and its per-epoch log (loss, training accuracy)."""

    state_dict: dict[str, torch.Tensor]
    task: str
    history: tuple[dict[str, float], ...]
    seconds: float


def train_model(
    settings: ModelSettings,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    task: str,
    progress: bool = False,
) -> ModelResult:
    """Train `settings.arch` from a seeded random init with Adam and cross-entropy on in-memory tiles
    (uint8 [N, 3, S, S]); classes are weighted by inverse frequency, so rare tumour tiles count."""
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    g = torch.Generator().manual_seed(settings.seed)
    model = settings.build().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    counts = torch.bincount(targets.flatten(), minlength=settings.num_classes).double()
    weights = (counts.sum() / (settings.num_classes * counts.clamp(min=1))).float()
    norm = Normalize(settings.mean, settings.std)
    n = len(images)
    steps = math.ceil(n / settings.batch_size)
    history = []
    bar = tqdm(
        total=settings.epochs * steps, desc=f"train {settings.arch}", unit="step", disable=not progress
    )
    for epoch in range(settings.epochs):
        order = torch.randperm(n, generator=g)
        loss_sum, correct = 0.0, 0.0
        for k in range(steps):
            idx = order[k * settings.batch_size : (k + 1) * settings.batch_size]
            x, y = _augment(images[idx], targets[idx], g)
            logits = model(norm(x.float() / 255.0))
            logits = logits.flatten(1) if task == "classification" else logits
            loss = F.cross_entropy(logits, y, weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(idx)
            hit = (logits.argmax(1) == y).float()
            correct += float((hit.flatten(1).mean(1) if hit.ndim > 1 else hit).sum())  # per tile
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.3f}", refresh=False)
        history.append({"epoch": epoch + 1, "loss": loss_sum / n, "train_accuracy": correct / n})
    bar.close()
    recompute_batchnorm(model, images, norm, settings.batch_size)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return ModelResult(state, task, tuple(history), time.perf_counter() - start)


def save_model(path: str | Path, settings: ModelSettings, result: ModelResult) -> None:
    """The checkpoint `load_model(arch, num_classes=K, checkpoint=path)` reads (weights under
    `state_dict`), with the settings, normalisation and training log beside them."""
    from . import __version__

    save_torch_file(
        {
            "format": MODEL_FORMAT,
            "version": __version__,
            "arch": settings.arch,
            "num_classes": settings.num_classes,
            "task": result.task,
            "settings": {f.name: getattr(settings, f.name) for f in fields(settings)},
            "history": list(result.history),
            "state_dict": result.state_dict,
        },
        Path(path),
    )


def run_model_training(
    settings: ModelSettings,
    tables: Sequence[str | Path],
    out: str | Path,
    *,
    annotations: Sequence[str | Path] | None = None,
    class_map: dict[str, int] | None = None,
    progress: bool = False,
) -> ModelResult:
    """`smoothsal train-model`: read the tiles (and, for a segmenter, one annotation file per tile
    table, same order), train, write the checkpoint."""
    check_file_out(out)
    table = read_tile_tables(tables)
    torch.manual_seed(settings.seed)
    probe, tile_size = settings.build(), int(table["tile_size"].iloc[0])
    check_input_size(probe, tile_size, settings.arch)
    task = model_task(probe, tile_size)
    by_slide = None
    if task == "segmentation":
        if not annotations or len(annotations) != len(tables):
            raise BadOption(
                f"{settings.arch} is a segmenter: give --annotations, one file per tile table in the same "
                f"order ({len(tables)} tables, {len(annotations or [])} annotation files)"
            )
        by_slide = {}
        for t, a in zip(tables, annotations, strict=True):
            ann = read_annotations(a, class_map)
            for sid in read_tile_table(t)["slide_id"].unique():
                by_slide[sid] = ann
    images, targets = training_tiles(table, task, by_slide, settings.num_classes)
    result = train_model(settings, images, targets, task=task, progress=progress)
    save_model(out, settings, result)
    return result
