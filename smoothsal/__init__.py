"""smoothsal: smooth hidden-layer saliency maps for whole-slide images (Smooth Deep Saliency).

The public names below load their modules on first use (PEP 562), so that a command which needs no model
(`smoothsal tiles`, `heatmaps`, `report`) does not pay for importing torchvision.
"""

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"

_HOMES = {
    "attribution": ("ATTRIBUTIONS", "SmoothGrad", "attribute"),
    "deeplift": ("deeplift_rules",),
    "metrics": (
        "accuracy",
        "checkerboard_share",
        "dice",
        "masked_prediction_difference",
        "prediction_difference",
        "probabilities",
        "total_variation",
    ),
    "architectures": ("ARCHITECTURES",),
    "downsampling": ("DownsamplingOp", "downsampling_ops"),
    "model_spec": ("ModelSpec", "load_model"),
    "models": ("canonicalise",),
    "smoothing": ("METHODS", "SurrogatePaths", "downsampling_convs", "smooth"),
    "stages": ("layer_map", "resolve_layer", "resolve_layers", "stage_blocks", "stage_modules"),
    "surrogate": ("train_surrogate",),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [  # loaded on first use by __getattr__
    "ARCHITECTURES",
    "ATTRIBUTIONS",
    "METHODS",
    "DownsamplingOp",
    "ModelSpec",
    "SmoothGrad",
    "SurrogatePaths",
    "accuracy",
    "attribute",
    "canonicalise",
    "checkerboard_share",
    "deeplift_rules",
    "dice",
    "downsampling_convs",
    "downsampling_ops",
    "layer_map",
    "load_model",
    "masked_prediction_difference",
    "prediction_difference",
    "probabilities",
    "resolve_layer",
    "resolve_layers",
    "smooth",
    "stage_blocks",
    "stage_modules",
    "total_variation",
    "train_surrogate",
]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule, as `ss.metrics`
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
