"""Temporary module hooks: registered for the length of a ``with`` block, removed on exit.

Every place that needs to watch a forward pass (tracing the downsampling convs, capturing conv inputs,
recording layer shapes, DeepLift's baseline) registers its hooks through ``Hooks``, so a user's model is
left exactly as it was, also when the forward raises.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["Hooks"]


class Hooks:
    """Hook handles of one ``with`` block; all are removed when it ends, in reverse order."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def forward(self, module: nn.Module, hook: Callable[..., Any]) -> None:
        """``hook(module, inputs, output)`` after each forward of ``module`` (may return a new output)."""
        self._handles.append(module.register_forward_hook(hook))

    def forward_pre(self, module: nn.Module, hook: Callable[..., Any]) -> None:
        """``hook(module, inputs)`` before each forward of ``module``."""
        self._handles.append(module.register_forward_pre_hook(hook))

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()
