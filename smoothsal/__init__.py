"""smoothsal: smooth hidden-layer saliency maps for whole-slide images (Smooth Deep Saliency)."""

__version__ = "0.1.0"  # first: modules read it while the package is imported

from .attribution import ATTRIBUTIONS, SmoothGrad, attribute
from .metrics import (
    accuracy,
    dice,
    masked_prediction_difference,
    prediction_difference,
    probabilities,
    total_variation,
)
from .models import ARCHITECTURES, canonicalise, load_model, resolve_layer, resolve_layers
from .smoothing import METHODS, SurrogatePaths, downsampling_convs, smooth
from .surrogate import train_surrogate

__all__ = [
    "ARCHITECTURES",
    "ATTRIBUTIONS",
    "METHODS",
    "SmoothGrad",
    "SurrogatePaths",
    "accuracy",
    "attribute",
    "canonicalise",
    "dice",
    "downsampling_convs",
    "load_model",
    "masked_prediction_difference",
    "prediction_difference",
    "probabilities",
    "resolve_layer",
    "resolve_layers",
    "smooth",
    "total_variation",
    "train_surrogate",
]
