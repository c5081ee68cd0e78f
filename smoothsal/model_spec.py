"""The model to explain: one spec (architecture source, constructor options, checkpoint, surrogate,
normalisation) and the one loader every stage calls.

``load_model`` builds the architecture (``model_sources``), reads the checkpoint into it (``checkpoints``) and
puts it in eval mode and canonical form; ``ModelSpec.load`` adds the checked surrogate and the normalisation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints import load_weights, weights_sha256
from .errors import BadOption
from .model_sources import Architecture, canonical_kwargs, model_kwargs, parse_arch, timm_normalisation
from .models import IMAGENET_MEAN, IMAGENET_STD, Normalize, canonicalise, in_channels
from .smoothing import SurrogatePaths
from .surrogate import check_surrogate_arch, load_surrogate, read_surrogate

__all__ = [
    "ModelSpec",
    "canonical_kwargs",
    "load_model",
    "load_with_surrogate",
    "model_kwargs",
]

# Input sizes tried, smallest first, for the forward pass that canonicalises a model (the MONAI bundle's
# head pools a fixed 7×7 window, Inception-v3 needs 75 px).
_PROBE_SIZES = (64, 128, 224, 299)


def load_model(
    arch: str,
    *,
    num_classes: int,
    checkpoint: str | Path | None = None,
    kwargs: str | Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
) -> nn.Module:
    """A model of ``arch`` (a registered name, ``torchvision:``, ``timm:`` or ``python:``; see
    ``model_sources``) in eval mode and canonical form, with the checkpoint's weights if given.

    ``kwargs``: the constructor's options (a mapping or JSON text). ``allow_pickle``: accept a checkpoint that
    is a whole pickled module (loading it runs code from the file).
    """
    if num_classes < 1:
        raise BadOption(f"num_classes must be >= 1, got {num_classes}; fix --num-classes")
    # an nn.Module: a registered builder always gives one, and a python: builder's result is checked
    model = parse_arch(arch).build(num_classes, model_kwargs(kwargs))
    if checkpoint is not None:
        load_weights(model, Path(checkpoint), arch, allow_pickle=allow_pickle)
    return _canonical(model.eval(), arch)


def _canonical(model: nn.Module, arch: str) -> nn.Module:
    """``canonicalise`` on the smallest probe size the model runs on."""
    channels = in_channels(model)
    for size in _PROBE_SIZES:
        try:
            return canonicalise(model, torch.zeros(1, channels, size, size))
        except RuntimeError:  # too small for a pooling window or a fixed-size head: try the next size
            pass
    raise BadOption(
        f"arch {arch!r} runs on none of the input sizes {_PROBE_SIZES} (a {channels}-channel zero tile); "
        "smoothsal needs a CNN taking [B, C, H, W] tiles"
    )


@dataclass(frozen=True)
class ModelSpec:
    """Which model a stage runs: architecture (any source), classes, constructor options (JSON object
    text), weights (None: the seeded random init), surrogate, and input normalisation (None: the
    surrogate's, else the timm model's pretrained config's, else ImageNet's). ``allow_pickle`` lets a
    checkpoint be a whole pickled module."""

    arch: str
    num_classes: int
    checkpoint: Path | None = None
    surrogate: Path | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    kwargs: str = ""
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "kwargs", canonical_kwargs(self.kwargs))

    @property
    def architecture(self) -> Architecture:
        return parse_arch(self.arch)

    def record(self) -> dict[str, object]:
        """What results record of the model: source, options, weights and (``python:``) code hashes."""
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "kwargs": model_kwargs(self.kwargs),
            "model_sha256": weights_sha256(self.checkpoint),
            "code_sha256": self.architecture.code_sha256(),
        }

    def load(self, device: torch.device | str = "cpu") -> tuple[nn.Module, SurrogatePaths | None, Normalize]:
        """The model (on ``device``), its checked surrogate (if given) and the input normalisation."""
        return load_with_surrogate(
            self.arch, num_classes=self.num_classes, checkpoint=self.checkpoint, surrogate=self.surrogate,
            mean=self.mean, std=self.std, device=device, kwargs=self.kwargs, allow_pickle=self.allow_pickle,
        )  # fmt: skip


def load_with_surrogate(
    arch: str,
    *,
    num_classes: int,
    checkpoint: str | Path | None = None,
    surrogate: str | Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
    kwargs: str | Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
) -> tuple[nn.Module, SurrogatePaths | None, Normalize]:
    """The model, its checked surrogate (if given) and the input normalisation it was trained with.

    Without ``checkpoint`` the model is the seeded random init the surrogate was trained on.
    """
    meta = read_surrogate(surrogate)[1] if surrogate is not None else None
    if meta is not None:
        check_surrogate_arch(meta, arch, surrogate)
        if checkpoint is None and meta.settings.model_sha256 != "random-init":
            raise BadOption(
                f"surrogate {surrogate} was trained on a model checkpoint; pass it with --checkpoint"
            )
    torch.manual_seed(meta.settings.seed if meta else 0)  # a random-init model: the one the surrogate saw
    model = load_model(
        arch, num_classes=num_classes, checkpoint=checkpoint, kwargs=kwargs, allow_pickle=allow_pickle
    ).to(device)
    default = (meta.settings.mean, meta.settings.std) if meta else _default_normalisation(model)
    norm = Normalize(tuple(mean or default[0]), tuple(std or default[1]))
    if meta is not None and (norm.mean, norm.std) != (meta.settings.mean, meta.settings.std):
        raise BadOption(
            f"surrogate {surrogate} was trained on inputs normalised with mean {meta.settings.mean}, "
            f"std {meta.settings.std}; pass the same --mean/--std or leave them out"
        )
    paths = None
    if surrogate is not None:
        paths = load_surrogate(surrogate, arch=arch, model=model, checkpoint=checkpoint).to(device)
    return model, paths, norm


def _default_normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A timm model's pretrained-config mean/std, else ImageNet's."""
    return timm_normalisation(model) or (IMAGENET_MEAN, IMAGENET_STD)
