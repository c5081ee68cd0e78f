"""The bilinear surrogate: its training loop, its file format, and loading a model with it.

Training: the original network runs unchanged (frozen, eval mode); a forward hook captures every
downsampling conv's (input, output); each path is trained on its conv's pair with an L1 loss, the
losses summed, one Adam over all paths. The loop is the same for one process and for DDP (the
distributed run, with checkpoints, resume and the convergence rule, is `surrogate_run`; the
validation measures and the rule are `surrogate_fit`).

File format (``SURROGATE_FORMAT``): the paths' weights with the arch, conv names and specs, the
training settings and their hash, a fingerprint of the model's layers, the per-epoch loss log and
the fit record (how training ended, validation L1, prediction difference and agreement).
``model_spec.load_with_surrogate`` is what stages use: the model, its checked surrogate and the normalisation.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import file_sha256, weights_sha256
from .errors import BadCheckpoint, BadInput, BadOption, MissingInput
from .model_sources import architecture_normalisation, canonical_kwargs
from .models import IMAGENET_MEAN, IMAGENET_STD, Normalize, in_channels
from .smoothing import ConvSpec, SurrogatePaths, capture_conv_io, downsampling_convs
from .surrogate_fit import SurrogateFit, validation_size
from .tiles import tiles_sha256
from .torch_files import load_torch_dict, save_torch_file

__all__ = [
    "INITS",
    "SURROGATE_FORMAT",
    "EpochBatches",
    "EpochCallback",
    "Resume",
    "StepCallback",
    "SurrogateMeta",
    "TrainSettings",
    "check_surrogate_arch",
    "load_surrogate",
    "model_fingerprint",
    "read_surrogate",
    "save_surrogate",
    "surrogate_losses",
    "surrogate_sha256",
    "train_surrogate",
]

# Called after every optimiser step with (epoch, step in epoch, per-path L1 losses).
StepCallback = Callable[[int, int, dict[str, float]], None]
# Called after every epoch with its index; returns True to stop training there.
EpochCallback = Callable[[int], bool]
# (epoch, steps to skip) -> the batches of that epoch after the skipped ones.
EpochBatches = Callable[[int, int], Iterable[object]]

SURROGATE_FORMAT = "smoothsal-surrogate/1"


# --- training -------------------------------------------------------------------------------------


def _as_input(batch: object) -> torch.Tensor:
    """Batches may be tensors or (tensor, …) tuples/lists as DataLoaders give them."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise BadInput(f"a batch must be a tensor or a (tensor, ...) tuple, got {type(batch).__name__}")


def surrogate_losses(
    model: nn.Module, paths: nn.Module, x: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor]:
    """L1 loss of each path against its conv on batch ``x`` (``paths`` may be DDP-wrapped)."""
    with capture_conv_io(model, names) as captured, torch.no_grad():
        model(x)
    predicted = paths({n: captured[n][0] for n in names})
    return {n: F.l1_loss(predicted[n], captured[n][1]) for n in names}


@dataclass(frozen=True)
class Resume:
    """Where an earlier run stopped: ``step`` steps of ``epoch`` were done; its paths and optimiser."""

    epoch: int = 0
    step: int = 0
    paths: SurrogatePaths | None = None
    optimizer: torch.optim.Optimizer | None = None


def train_surrogate(
    model: nn.Module,
    batches: Iterable[object] | EpochBatches,
    *,
    epochs: int,
    lr: float = 1e-3,
    resume: Resume = Resume(),
    trainable: nn.Module | None = None,
    on_step: StepCallback | None = None,
    on_epoch: EpochCallback | None = None,
    amp: bool = False,
) -> SurrogatePaths:
    """Train surrogate paths for ``model`` on ``batches`` (re-iterated every epoch).

    ``resume`` continues an earlier run (its paths and optimiser, and the steps done of its epoch:
    they are skipped and step numbers keep counting from there); ``trainable`` is the module to call
    (e.g. ``DistributedDataParallel(paths)``); ``on_step`` sees the losses after every step;
    ``on_epoch`` is called after every epoch and stops training by returning True (a convergence rule).
    ``batches`` is an iterable, or an ``EpochBatches`` callable ``(epoch, skip) -> iterable``
    (lets a sampler set its epoch and skip batches without reading them). ``amp``: bfloat16 autocast
    on CUDA (no effect on CPU). ``lr`` 1e-3 is the paper's, for fresh (random) paths; paths started at
    their convs (``SurrogatePaths.start_from``) want ``TrainSettings``' smaller default.
    """
    start_epoch, start_step, paths, optimizer = resume.epoch, resume.step, resume.paths, resume.optimizer
    if epochs < 1:
        raise BadOption(f"epochs must be >= 1, got {epochs}")
    if start_step < 0:
        raise BadOption(f"resume step must be >= 0, got {start_step}")
    if not callable(batches) and iter(batches) is batches:
        raise BadOption(
            "batches is a one-shot iterator (e.g. a generator) and would run dry after one epoch; "
            "pass a list, a DataLoader, or an (epoch, skip) -> batches callable"
        )
    model.eval()
    device = next(model.parameters()).device
    if paths is None:
        first = _as_input(next(iter(_epoch_batches(batches, start_epoch, 0)))).to(device)
        paths = SurrogatePaths.for_model(model, first[:1])
    paths.check_fits(model)
    paths.to(device).train()
    trainable = paths if trainable is None else trainable
    optimizer = optimizer or torch.optim.Adam(paths.parameters(), lr=lr)
    names = paths.conv_names
    autocast = amp and device.type == "cuda"
    for epoch in range(start_epoch, epochs):
        skip = start_step if epoch == start_epoch else 0
        for step, batch in enumerate(_epoch_batches(batches, epoch, skip), start=skip):
            x = _as_input(batch).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                losses = surrogate_losses(model, trainable, x, names)
            optimizer.zero_grad(set_to_none=True)
            torch.stack([v.float() for v in losses.values()]).sum().backward()
            optimizer.step()
            if on_step is not None:
                on_step(epoch, step, {n: float(v.detach()) for n, v in losses.items()})
        if on_epoch is not None and on_epoch(epoch):
            break
    return paths.eval()


def _epoch_batches(batches: Iterable[object] | EpochBatches, epoch: int, skip: int) -> Iterable[object]:
    """The batches of ``epoch`` after the first ``skip`` (a plain iterable draws and drops them)."""
    if callable(batches) and not hasattr(batches, "__iter__"):
        return batches(epoch, skip)
    return itertools.islice(batches, skip, None)


# --- settings -------------------------------------------------------------------------------------

INITS = ("conv", "random")  # where the paths start: see SurrogatePaths.start_from


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the trained weights; its hash guards resume and later stages.

    Training holds out ``val_fraction`` of the tiles (at least ``val_min_tiles``, at most half; seeded,
    stratified by slide and label) and stops when the validation L1 has not improved by ``min_delta``
    (relative) for ``patience`` epochs, or after ``epochs``, keeping the best state. ``patience`` 0:
    exactly ``epochs`` epochs, the last state kept (the paper's setting; ``val_fraction`` 0 then
    trains on every tile, as the paper does, and records no fit). ``init`` "conv" starts each path at
    the conv it replaces (``SurrogatePaths.start_from``: about the forward hook, so training starts
    from a working model); "random" at PyTorch's default init, as the paper's code does.
    Not included (they do not change the result): process count, workers, checkpoint interval.
    """

    arch: str
    num_classes: int
    model_sha256: str  # of the model checkpoint, or "random-init" (weights from the seed)
    tiles_sha256: str  # of the tile table's tile positions, in order (the sampler's index space)
    n_tiles: int
    tile_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    epochs: int = 30  # at most (with patience 0: exactly)
    batch_size: int = 512  # global: split evenly across the processes
    lr: float = 2e-4  # from the conv init; the paper's 1e-3 (from a random init) undoes that start
    seed: int = 0
    amp: bool = False
    patience: int = 3  # epochs without improvement before stopping; 0 = run exactly `epochs`
    min_delta: float = 0.01  # an improvement = validation L1 below best × (1 − min_delta)
    val_fraction: float = 0.1  # of the tiles held out for validation; 0 = none (needs patience 0)
    val_min_tiles: int = 32  # held out at least (but never more than half the tiles)
    init: str = "conv"  # where the paths start: at the conv they replace, or "random" (the paper's)
    model_kwargs: str = ""  # the model constructor's options, canonical JSON ("" = none)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "n_tiles", "tile_size", "num_classes"):
            if getattr(self, name) < 1:
                raise BadOption(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise BadOption(f"lr must be > 0, got {self.lr}")
        for name in ("patience", "val_min_tiles"):
            if getattr(self, name) < 0:
                raise BadOption(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("min_delta", "val_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise BadOption(f"{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        object.__setattr__(self, "model_kwargs", canonical_kwargs(self.model_kwargs))
        if self.init not in INITS:
            raise BadOption(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.patience and not self.n_validation:
            raise BadOption(
                f"the convergence rule (patience {self.patience}) needs validation tiles, but "
                f"val-fraction {self.val_fraction} of {self.n_tiles} tiles holds out none; raise "
                "val-fraction, or pass patience 0 for a fixed epoch count"
            )

    @property
    def n_validation(self) -> int:
        """Tiles held out for validation (see ``surrogate_fit.validation_size``)."""
        return validation_size(self.n_tiles, self.val_fraction, self.val_min_tiles)

    @property
    def hash(self) -> str:
        text = json.dumps(self.as_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def normalize(self) -> Normalize:
        return Normalize(self.mean, self.std)

    def as_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def for_tiles(
        cls,
        table: pd.DataFrame,
        *,
        checkpoint: str | Path | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        **choices: object,
    ) -> TrainSettings:
        """The settings of training on ``table``'s tiles (hashed with the weights file); ``choices``
        are the other fields (arch, num_classes, epochs, …); mean/std default to the model's (a timm
        model's pretrained config), else ImageNet's."""
        if mean is None or std is None:
            default = architecture_normalisation(
                choices["arch"], choices["num_classes"], choices.get("model_kwargs")
            )
            mean, std = mean or default[0], std or default[1]
        norm = Normalize(tuple(mean), tuple(std))
        return cls(
            model_sha256=weights_sha256(checkpoint), tiles_sha256=tiles_sha256(table), n_tiles=len(table),
            tile_size=int(table["tile_size"].iloc[0]), mean=norm.mean, std=norm.std, **choices,
        )  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> TrainSettings:
        """Settings written by ``as_dict``; those of older files (no convergence or init fields) get
        what those files were trained with: a fixed epoch count on every tile, from a random init."""
        d = _LEGACY_SETTINGS | {f.name: d[f.name] for f in fields(cls) if f.name in d}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# How surrogates were trained before the convergence rule and the conv init (files without these).
_LEGACY_SETTINGS: dict[str, object] = {"patience": 0, "val_fraction": 0.0, "init": "random"}


# --- the surrogate file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SurrogateMeta:
    """What a surrogate file records next to its weights."""

    settings: TrainSettings
    specs: dict[str, ConvSpec]
    model_fingerprint: str = ""  # see model_fingerprint(); "" = not recorded
    losses: tuple[dict[str, float], ...] = ()  # the per-epoch loss log
    version: str = ""
    fit: SurrogateFit | None = None  # how training ended and how well it fits (None: older files)

    @property
    def arch(self) -> str:
        return self.settings.arch

    @property
    def conv_names(self) -> list[str]:
        return list(self.specs)


def model_fingerprint(model: nn.Module) -> str:
    """Hash of a model's parameter/buffer names and shapes: tells resnet18 from resnet34 even where
    their downsampling convs are identical (weights are not included: see ``model_sha256``)."""
    items = sorted((k, tuple(v.shape)) for k, v in model.state_dict().items())
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


def _spec_dict(spec: ConvSpec) -> dict[str, object]:
    return {f.name: getattr(spec, f.name) for f in fields(spec)}


def _spec_from(d: dict[str, object]) -> ConvSpec:
    return ConvSpec(**{k: tuple(v) if isinstance(v, list | tuple) else v for k, v in d.items()})


def save_surrogate(path: str | Path, paths: SurrogatePaths, meta: SurrogateMeta) -> None:
    """Write trained paths with their metadata (arch, conv names, specs, settings and hash)."""
    from . import __version__

    save_torch_file(
        {
            "format": SURROGATE_FORMAT,
            "version": meta.version or __version__,
            "arch": meta.arch,
            "num_classes": meta.settings.num_classes,
            "conv_names": meta.conv_names,
            "specs": {n: _spec_dict(s) for n, s in meta.specs.items()},
            "settings": meta.settings.as_dict(),
            "settings_hash": meta.settings.hash,
            "model_fingerprint": meta.model_fingerprint,
            "losses": list(meta.losses),
            "fit": meta.fit.as_dict() if meta.fit is not None else None,
            "state_dict": {k: v.detach().cpu() for k, v in paths.state_dict().items()},
        },
        Path(path),
    )


def read_surrogate(path: str | Path) -> tuple[SurrogatePaths, SurrogateMeta]:
    """Paths (eval mode, CPU) and metadata of a surrogate file, unchecked against any model."""
    path = Path(path)
    obj = load_torch_dict(path, "surrogate file", "train it again with `smoothsal train-surrogate`")
    if obj.get("format") != SURROGATE_FORMAT:
        raise BadCheckpoint(
            f"{path} is not a smoothsal surrogate (format {obj.get('format')!r}, expected "
            f"{SURROGATE_FORMAT!r}); make it with `smoothsal train-surrogate`"
        )
    specs = {n: _spec_from(obj["specs"][n]) for n in obj["conv_names"]}
    fit = SurrogateFit.from_dict(obj["fit"]) if obj.get("fit") else None
    meta = SurrogateMeta(
        TrainSettings.from_dict(obj["settings"]), specs, obj.get("model_fingerprint", ""),
        tuple(obj.get("losses", ())), obj.get("version", ""), fit,
    )  # fmt: skip
    paths = SurrogatePaths(specs)
    paths.load_state_dict(obj["state_dict"])
    return paths.eval(), meta


def load_surrogate(
    path: str | Path,
    *,
    arch: str | None = None,
    model: nn.Module | None = None,
    checkpoint: str | Path | None = None,
) -> SurrogatePaths:
    """Trained paths, checked against the model they will replace convs of.

    ``arch``: must be the arch the surrogate was trained for. ``model``: its downsampling convs must
    be exactly the surrogate's (names and shapes). ``checkpoint``: the model weights file; must be the
    one the surrogate was trained on (sha256). Each mismatch is a one-line ``BadCheckpoint`` naming both sides.
    """
    paths, meta = read_surrogate(path)
    if arch is not None:
        check_surrogate_arch(meta, arch, path)
    if model is not None:
        if meta.model_fingerprint and meta.model_fingerprint != model_fingerprint(model):
            raise BadCheckpoint(
                f"surrogate {path} was trained for arch {meta.arch!r} with {meta.settings.num_classes} "
                f"classes, but this {type(model).__name__} (arch {arch or 'unknown'!r}) has other layers; "
                "train a surrogate for this model"
            )
        example = torch.zeros(1, in_channels(model), meta.settings.tile_size, meta.settings.tile_size)
        names = downsampling_convs(model, example.to(next(model.parameters()).device))
        if names != meta.conv_names:
            raise BadCheckpoint(
                f"surrogate {path} (arch {meta.arch!r}) replaces convs {meta.conv_names}, but this "
                f"{type(model).__name__} (arch {arch or 'unknown'!r}) downsamples with {names}; train "
                "a surrogate for this model"
            )
        try:
            paths.check_fits(model)
        except BadCheckpoint as err:
            raise BadCheckpoint(f"surrogate {path} (arch {meta.arch!r}): {err}") from None
    if checkpoint is not None:
        sha = weights_sha256(checkpoint)
        if meta.settings.model_sha256 != sha:
            raise BadCheckpoint(
                f"surrogate {path} was trained on model weights {meta.settings.model_sha256[:12]}, but "
                f"{checkpoint} is {sha[:12]}; retrain the surrogate for these weights"
            )
    return paths


def surrogate_sha256(path: str | Path | None) -> str | None:
    """None without a surrogate, else the file's sha256 (what a stage records of the surrogate it used)."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise MissingInput(f"surrogate {path} does not exist; train it with `smoothsal train-surrogate`")
    return file_sha256(path)


def check_surrogate_arch(meta: SurrogateMeta, arch: str, path: str | Path) -> None:
    """Raise a one-line error naming both archs unless the surrogate was trained for ``arch``."""
    if arch != meta.arch:
        raise BadCheckpoint(
            f"surrogate {path} was trained for arch {meta.arch!r}, not {arch!r}; train one for "
            f"{arch!r} with `smoothsal train-surrogate --arch {arch} ...`"
        )
