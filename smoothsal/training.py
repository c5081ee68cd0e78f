"""Surrogate training: each bilinear path learns to mimic its own downsampling conv.

The original network runs unchanged (frozen, eval mode); a forward hook captures every
downsampling conv's (input, output); each path is trained on its conv's pair with an L1 loss, the
losses summed, one Adam over all paths. The loop is the same for one process and for DDP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .smoothing import SurrogatePaths, capture_conv_io

__all__ = ["StepCallback", "surrogate_losses", "train_surrogate"]

# Called after every optimiser step with (epoch, step in epoch, per-path L1 losses).
StepCallback = Callable[[int, int, dict[str, float]], None]


def _as_input(batch: object) -> torch.Tensor:
    """Batches may be tensors or (tensor, …) tuples/lists as DataLoaders give them."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise ValueError(f"a batch must be a tensor or a (tensor, ...) tuple, got {type(batch).__name__}")


def surrogate_losses(
    model: nn.Module, paths: nn.Module, x: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor]:
    """L1 loss of each path against its conv on batch ``x`` (``paths`` may be DDP-wrapped)."""
    with capture_conv_io(model, names) as captured, torch.no_grad():
        model(x)
    predicted = paths({n: captured[n][0] for n in names})
    return {n: F.l1_loss(predicted[n], captured[n][1]) for n in names}


def train_surrogate(
    model: nn.Module,
    batches: Iterable[object],
    *,
    epochs: int,
    lr: float = 1e-3,
    paths: SurrogatePaths | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    trainable: nn.Module | None = None,
    start_epoch: int = 0,
    on_step: StepCallback | None = None,
) -> SurrogatePaths:
    """Train surrogate paths for ``model`` on ``batches`` (re-iterated every epoch).

    ``paths``/``optimizer`` continue an earlier run; ``trainable`` is the module to call
    (e.g. ``DistributedDataParallel(paths)``); ``on_step`` sees the losses after every step.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    model.eval()
    device = next(model.parameters()).device
    if paths is None:
        first = _as_input(next(iter(batches))).to(device)
        paths = SurrogatePaths.for_model(model, first[:1])
    paths.check_fits(model)
    paths.to(device).train()
    trainable = paths if trainable is None else trainable
    optimizer = optimizer or torch.optim.Adam(paths.parameters(), lr=lr)
    names = paths.conv_names
    for epoch in range(start_epoch, epochs):
        for step, batch in enumerate(batches):
            losses = surrogate_losses(model, trainable, _as_input(batch).to(device), names)
            optimizer.zero_grad(set_to_none=True)
            torch.stack(list(losses.values())).sum().backward()
            optimizer.step()
            if on_step is not None:
                on_step(epoch, step, {n: float(v) for n, v in losses.items()})
    return paths.eval()
