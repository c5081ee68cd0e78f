"""Where a model's architecture comes from: an ``--arch`` string → a builder of randomly initialised models.

Four sources, told apart by a prefix:

- a registered name (``resnet18`` … ``unet_resnet34``, see ``architectures``): unchanged behaviour;
- ``torchvision:NAME``: any torchvision classification or segmentation builder, with ``weights=None`` (and
  ``weights_backbone=None`` for segmentation), so nothing downloads; a dict output is unwrapped to ``["out"]``;
- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, num_classes=…)`` (timm is an optional extra);
  its pretrained config's mean/std are the default normalisation;
- ``python:MODULE:CALLABLE``: the user's own builder, called as ``CALLABLE(num_classes=K, **kwargs)``;
  MODULE is an importable dotted name or a ``.py`` file path (relative to the working directory).

Every failure to find or build an architecture is one line naming the arch and the fix; an exception raised
inside a user's builder is their code's bug and keeps its traceback.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .architectures import ARCHITECTURES
from .errors import BadOption, one_line
from .models import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "SOURCES",
    "Architecture",
    "DictOutput",
    "canonical_kwargs",
    "model_kwargs",
    "parse_arch",
    "timm_normalisation",
]

SOURCES = ("torchvision", "timm", "python")
_FORMS = (
    "a registered name ({names}), torchvision:NAME, timm:NAME, or python:MODULE:CALLABLE (MODULE a dotted "
    "module or a .py file)"
)


class DictOutput(nn.Module):
    """A model whose forward returns a dict (torchvision segmentation) seen through one of its keys."""

    def __init__(self, model: nn.Module, key: str = "out") -> None:
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, x):
        return self.model(x)[self.key]

    def extra_repr(self) -> str:
        return f"key={self.key!r}"


@dataclass(frozen=True)
class Architecture:
    """A parsed ``--arch``: its source and name (for ``python:``, ``name`` is ``MODULE:CALLABLE``)."""

    arch: str
    source: str  # "registered" | "torchvision" | "timm" | "python"
    name: str

    @property
    def code_file(self) -> Path | None:
        """The ``.py`` file a ``python:`` arch is built by (None otherwise, or for an installed module
        that cannot be located): what a workflow reruns jobs for when it changes."""
        if self.source != "python":
            return None
        module = self.name.rpartition(":")[0]
        if _is_path(module):
            return Path(module)
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        return Path(spec.origin) if spec is not None and spec.origin else None

    def code_sha256(self) -> str | None:
        """sha256 of ``code_file`` (recorded with a ``python:`` model's results), else None."""
        path = self.code_file
        if path is None or not path.is_file():
            return None
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def build(self, num_classes: int, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
        """A randomly initialised model of this architecture with ``num_classes`` outputs."""
        kwargs = dict(kwargs or {})
        if self.source == "registered":
            return ARCHITECTURES[self.name](num_classes=num_classes, **kwargs)
        if self.source == "torchvision":
            return _torchvision(self, num_classes, kwargs)
        if self.source == "timm":
            return _timm(self, num_classes, kwargs)
        return _python(self, num_classes, kwargs)


def parse_arch(arch: str) -> Architecture:
    """The ``Architecture`` an ``--arch`` string names (one line naming the allowed forms otherwise)."""
    if not isinstance(arch, str) or not arch:
        raise BadOption(f"--arch must be {_forms()}, got {arch!r}")
    if arch in ARCHITECTURES:
        return Architecture(arch, "registered", arch)
    source, sep, name = arch.partition(":")
    if not sep or source not in SOURCES or not name:
        raise BadOption(f"unknown arch {arch!r}; give {_forms()}")
    if source == "python" and not all(name.rpartition(":")[::2]):
        raise BadOption(
            f"arch {arch!r} names no callable; give python:MODULE:CALLABLE, e.g. python:models/net.py:build"
        )
    return Architecture(arch, source, name)


def _forms() -> str:
    return _FORMS.format(names=", ".join(sorted(ARCHITECTURES)))


# --- constructor options ---------------------------------------------------------------------


def model_kwargs(value: str | Mapping[str, Any] | None, option: str = "--model-kwargs") -> dict[str, Any]:
    """Constructor options as a dict, from a mapping or a JSON object text (one line naming ``option``)."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    try:
        parsed = json.loads(value)
    except ValueError as err:
        raise BadOption(
            f"{option} {value!r} is not JSON ({err}); give an object, e.g. '{{\"drop_rate\": 0.1}}'"
        )
    if not isinstance(parsed, dict):
        raise BadOption(f"{option} {value!r} is not a JSON object; give one, e.g. '{{\"drop_rate\": 0.1}}'")
    return parsed


def canonical_kwargs(value: str | Mapping[str, Any] | None) -> str:
    """Constructor options as canonical JSON text ("" for none): what settings record and compare."""
    options = model_kwargs(value)
    return json.dumps(options, sort_keys=True, separators=(",", ":")) if options else ""


# --- torchvision ------------------------------------------------------------------------------


def _torchvision(arch: Architecture, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision.models

    segmentation = arch.name in torchvision.models.list_models(module=torchvision.models.segmentation)
    try:
        builder = torchvision.models.get_model_builder(arch.name)
    except ValueError:
        raise BadOption(
            f"arch {arch.arch!r}: torchvision {torchvision.__version__} has no model {arch.name!r}; see "
            "torchvision.models.list_models() for the names"
        ) from None
    options = {"weights": None, **({"weights_backbone": None} if segmentation else {}), **kwargs}
    model = _call(arch, builder, num_classes, options)
    return DictOutput(model) if segmentation else model


# --- timm -------------------------------------------------------------------------------------


def _timm(arch: Architecture, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise BadOption(
            f"arch {arch.arch!r} needs timm, which is not installed; pip install 'smoothsal[timm]'"
        ) from None
    if not timm.is_model(arch.name):
        raise BadOption(
            f"arch {arch.arch!r}: timm {timm.__version__} has no model {arch.name!r}; see timm.list_models()"
        )
    return _call(arch, timm.create_model, num_classes, {"pretrained": False, **kwargs}, arch.name)


def timm_normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The mean/std of a timm model's pretrained config (None when it gives none)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        return None
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def architecture_normalisation(
    arch: str, num_classes: int, kwargs: str | Mapping[str, Any] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The default normalisation of ``arch`` without loading weights: a timm model's own, else ImageNet's."""
    architecture = parse_arch(arch)
    if architecture.source != "timm":
        return IMAGENET_MEAN, IMAGENET_STD
    return timm_normalisation(architecture.build(num_classes, model_kwargs(kwargs))) or (
        IMAGENET_MEAN,
        IMAGENET_STD,
    )


# --- python: the user's own builder -------------------------------------------------------------


def _python(arch: Architecture, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, attr = arch.name.rpartition(":")
    module = _import(arch, module_name)
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise BadOption(
            f"arch {arch.arch!r}: {module_name} has no callable {attr!r}; define {attr}(num_classes, **kwargs) "
            "there, returning the model"
        )
    model = _call(arch, builder, num_classes, kwargs)
    if not isinstance(model, nn.Module):
        raise BadOption(
            f"arch {arch.arch!r}: {attr}(num_classes={num_classes}) returned a {type(model).__name__}, not a "
            f"torch.nn.Module; make {attr} return the model"
        )
    return model


def _is_path(module: str) -> bool:
    return module.endswith(".py") or "/" in module or "\\" in module


def _import(arch: Architecture, module: str) -> object:
    """The module behind a ``python:`` arch: a file (its folder importable while it loads) or a dotted name."""
    if not _is_path(module):
        try:
            return importlib.import_module(module)
        except ImportError as err:
            raise BadOption(
                f"arch {arch.arch!r}: module {module!r} does not import ({one_line(err)}); install it, or give "
                "the .py file's path relative to the working directory"
            ) from None
    path = Path(module)
    if not path.is_file():
        raise BadOption(
            f"arch {arch.arch!r}: {path} is not a file (paths are relative to the working directory "
            f"{Path.cwd()}); fix the path"
        )
    name = f"smoothsal_user_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    loaded = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(loaded)
    except ImportError as err:
        raise BadOption(
            f"arch {arch.arch!r}: {path} does not import ({one_line(err)}); install what it imports"
        ) from None
    finally:
        sys.path.remove(str(path.parent.resolve()))
    sys.modules[name] = loaded  # so the classes it defines pickle and deepcopy by name
    return loaded


def _call(
    arch: Architecture, builder: Callable, num_classes: int, kwargs: dict[str, Any], *args
) -> nn.Module:
    """``builder(*args, num_classes=…, **kwargs)``, with a one-line error when it does not take them."""
    try:
        inspect.signature(builder).bind(*args, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise BadOption(
            f"arch {arch.arch!r} does not take num_classes={num_classes} with model kwargs {kwargs} ({err}); "
            "fix model.kwargs / --model-kwargs, or make the builder take num_classes"
        ) from None
    except ValueError:  # no signature (a builtin): let the call say
        pass
    return builder(*args, num_classes=num_classes, **kwargs)
