"""Per-tile prediction measures, the same for `smoothsal saliency` and `smoothsal evaluate`.

The class explained (target), the predicted class, classification logits from any head, and the
columns that compare a smoothed model's predictions with the original's (DESIGN.md §1): per-class logits
and probabilities, predicted class, correct, prediction difference (all classes, target class) and,
for segmentation, the masked prediction difference.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import BadOption
from .metrics import majority_label, masked_prediction_difference, prediction_difference, probabilities

__all__ = [
    "TARGETS",
    "TASKS",
    "check_target",
    "check_task",
    "choose_targets",
    "class_logits",
    "predicted_class",
    "prediction_columns",
]

TARGETS = ("label", "predicted")  # ground truth (predicted where unlabelled), or always the prediction
TASKS = ("classification", "segmentation")


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise BadOption(f"unknown target {target!r}; allowed: {', '.join(TARGETS)}")


def check_task(task: str, output: tuple[int, ...], arch: str) -> None:
    """Raise a one-line error unless a model with outputs of shape ``output`` does ``task``."""
    if task not in TASKS:
        raise BadOption(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    spatial = output[2:]
    classification = len(output) == 2 or (len(output) == 4 and spatial == (1, 1))
    if task == "classification" and not classification:
        raise BadOption(
            f"arch {arch!r} gives outputs of shape {list(output)} ([B, K, H, W]): "
            "a segmentation model; pass --task segmentation"
        )
    if task == "segmentation" and (len(output) != 4 or spatial == (1, 1)):
        raise BadOption(
            f"arch {arch!r} gives outputs of shape {list(output)}, not [B, K, H, W] maps; "
            "pass --task classification"
        )


def class_logits(out: torch.Tensor) -> torch.Tensor:
    """[B, K] logits of a classification model: [B, K], or [B, K, 1, 1] (conv heads, the MONAI bundle)."""
    if out.ndim == 4 and out.shape[2:] == (1, 1):
        return out.flatten(1)
    if out.ndim != 2:
        raise BadOption(
            f"the model gives outputs of shape {tuple(out.shape)}, not classification logits [B, K]; "
            "for a segmentation model use `smoothsal saliency --task segmentation`"
        )
    return out


def predicted_class(logits: torch.Tensor) -> torch.Tensor:
    """[B]: a single logit is class 1 above 0, else the arg max."""
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)


def choose_targets(
    original: torch.Tensor,
    labels: torch.Tensor,
    target: str,
    *,
    task: str = "classification",
    majority: torch.Tensor | None = None,
) -> torch.Tensor:
    """The class each tile's saliency explains (DESIGN §1).

    Classification: the label (the original's prediction where unlabelled, or always with ``target
    predicted``); 0 for a single logit. Segmentation: the tile's majority class (−1: no annotation) or,
    where there is none and with ``target predicted``, the original's predicted majority non-background
    class. ``original``: the original model's logits ([B, K] or [B, K, H, W]), on any device.
    """
    check_target(target)
    if task == "segmentation":
        predicted = majority_label(original.argmax(1).cpu())
        return torch.where(majority >= 0, majority, predicted) if target == "label" else predicted
    if original.shape[1] == 1:
        return torch.zeros(len(original), dtype=torch.long)
    predicted = original.argmax(1).cpu()
    return torch.where(labels >= 0, labels, predicted) if target == "label" else predicted


def _pixels(p: torch.Tensor) -> torch.Tensor:
    """[B, K, H, W] → [B·H·W, K]."""
    return p.permute(0, 2, 3, 1).reshape(-1, p.shape[1])


def prediction_columns(
    task: str,
    original: torch.Tensor,
    out: torch.Tensor,
    labels: torch.Tensor,
    target: torch.Tensor,
    majority: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """logit_k, prob_k, pred, correct, pd_all, pd_target, pd_masked, agree of one batch (CPU tensors, float).

    ``original``/``out``: the original's and the method's logits ([B, K], segmentation [B, K, H, W]);
    prediction differences are fractions (×100 for the tables); NaN where a measure is not defined;
    ``agree``: 1 where the method's predicted class (segmentation: majority class) is the original's.
    """
    p_orig, p_new = probabilities(original), probabilities(out)
    k = out.shape[1]
    if task == "segmentation":
        logits, probs = out.mean(dim=(2, 3)), p_new.mean(dim=(2, 3))
        pred = majority_label(out.argmax(1))
        agree = (pred == majority_label(original.argmax(1))).numpy().astype(float)
        correct = np.full(len(out), np.nan)
        pixels = out.shape[2] * out.shape[3]
        pd_all, pd_target = prediction_difference(  # pixels as samples, then the mean per tile
            _pixels(p_orig), _pixels(p_new), target.repeat_interleave(pixels)
        )
        pd_all, pd_target = pd_all.view(len(out), -1).mean(1), pd_target.view(len(out), -1).mean(1)
        # the metric only needs each tile's majority label: a 1×1 "mask" holding it
        # (no annotation, −1, counts as background: NaN, as the metric is defined by the mask)
        pd_masked = masked_prediction_difference(p_orig, p_new, majority.clamp_min(0).view(-1, 1, 1)).numpy()
    else:
        logits, probs = out, p_new
        pred = predicted_class(out)
        agree = (pred == predicted_class(original)).numpy().astype(float)
        correct = np.where(labels.numpy() >= 0, (pred == labels).numpy().astype(float), np.nan)
        pd_all, pd_target = prediction_difference(p_orig, p_new, target)
        pd_masked = np.full(len(out), np.nan)
    cols = {f"logit_{c}": logits[:, c].numpy() for c in range(k)}
    cols |= {f"prob_{c}": probs[:, c].numpy() for c in range(k)}
    return cols | {
        "pred": pred.numpy().astype(np.int64),
        "correct": correct,
        "pd_all": pd_all.numpy().astype(np.float64),
        "pd_target": pd_target.numpy().astype(np.float64),
        "pd_masked": np.asarray(pd_masked, dtype=np.float64),
        "agree": agree,
    }
