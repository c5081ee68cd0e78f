"""The paper's measures: total variation of saliency maps, prediction difference, accuracy."""

from __future__ import annotations

import torch

__all__ = [
    "accuracy",
    "dice",
    "masked_prediction_difference",
    "prediction_difference",
    "probabilities",
    "total_variation",
]

_TV_EPS = 1e-6


def total_variation(z: torch.Tensor) -> torch.Tensor:
    """Noise of saliency maps ``[B, C, H, W]`` → ``[B]`` (paper Eq. 2).

    Per channel: subtract the mean, divide by max(mean |·|, 1e-6), anisotropic TV (sum of absolute
    neighbour differences) divided by H·W; then the mean over channels.
    """
    if z.ndim != 4:
        raise ValueError(f"saliency maps must be [B, C, H, W], got shape {tuple(z.shape)}")
    z = z.double()
    centred = z - z.mean(dim=(2, 3), keepdim=True)
    scale = centred.abs().mean(dim=(2, 3), keepdim=True).clamp_min(_TV_EPS)
    n = centred / scale
    tv = (n.diff(dim=2).abs().sum(dim=(2, 3)) + n.diff(dim=3).abs().sum(dim=(2, 3))) / (
        z.shape[2] * z.shape[3]
    )
    return tv.mean(dim=1).float()


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over classes; sigmoid for a single-logit model (shape ``[B, C, ...]`` kept)."""
    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)


def prediction_difference(
    p_original: torch.Tensor, p_new: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: Σ_c |ỹ_c − ŷ_c| (all classes) and |ỹ_t − ŷ_t| (target class).

    Inputs are probabilities ``[B, C]`` (see ``probabilities``); multiply by 100 for the tables.
    """
    if p_original.shape != p_new.shape or p_original.ndim != 2:
        raise ValueError(
            f"prediction shapes must be equal [B, C], got {tuple(p_original.shape)} and {tuple(p_new.shape)}"
        )
    diff = (p_original - p_new).abs()
    return diff.sum(dim=1), diff.gather(1, target.long().view(-1, 1)).squeeze(1)


def majority_label(mask: torch.Tensor, background: int = 0) -> torch.Tensor:
    """Per tile ``[B, H, W]``: the most frequent non-background label, or background if none."""
    out = torch.full((mask.shape[0],), background, dtype=torch.long)
    for b, tile in enumerate(mask):
        labels, counts = tile[tile != background].unique(return_counts=True)
        if labels.numel():
            out[b] = labels[counts.argmax()]
    return out


def masked_prediction_difference(
    p_original: torch.Tensor,
    p_new: torch.Tensor,
    mask: torch.Tensor,
    *,
    background: int = 0,
    threshold: float = 0.1,
) -> torch.Tensor:
    """Segmentation prediction difference per tile (NaN where there is nothing to compare).

    M = 1 where the original's probability for the tile's majority non-background label exceeds
    ``threshold``; value = Σ (M · Σ_c |ỹ_c − ŷ_c|) / Σ M. NaN for all-background tiles and where
    Σ M = 0 (skipped, as the authors' evaluation does). Probabilities are ``[B, C, H, W]``,
    the label mask ``[B, H, W]``.
    """
    labels = majority_label(mask, background)
    diff = (p_original - p_new).abs().sum(dim=1)
    out = torch.full((mask.shape[0],), float("nan"), dtype=p_original.dtype)
    for b, label in enumerate(labels.tolist()):
        if label == background:
            continue
        m = (p_original[b, label] > threshold).to(diff.dtype)
        if m.sum() > 0:  # no confident pixel: nothing to compare, like an all-background tile
            out[b] = (diff[b] * m).sum() / m.sum()
    return out


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of correct predictions; a single logit is positive above 0."""
    if logits.shape[1] == 1:
        predicted = (logits[:, 0] > 0).long()
    else:
        predicted = logits.argmax(dim=1)
    return float((predicted == labels.long()).float().mean())


def dice(logits: torch.Tensor, mask: torch.Tensor, *, background: int = 0) -> float:
    """Mean Dice over the non-background classes present in prediction or mask."""
    predicted = logits.argmax(dim=1)
    scores = []
    for c in range(logits.shape[1]):
        if c == background:
            continue
        p, t = predicted == c, mask == c
        total = p.sum() + t.sum()
        if total > 0:
            scores.append(float(2 * (p & t).sum() / total))
    return sum(scores) / len(scores) if scores else float("nan")
