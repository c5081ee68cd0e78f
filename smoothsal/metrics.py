"""The paper's measures (total variation, prediction difference, accuracy), the checkerboard share
and the faithfulness measures: curve AUC, Spearman rank correlation, relevance mass, bootstrap intervals."""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "accuracy",
    "auc",
    "bootstrap_mean_ci",
    "checkerboard_share",
    "dice",
    "masked_prediction_difference",
    "prediction_difference",
    "probabilities",
    "region_fraction",
    "relevance_mass",
    "spearman",
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
    z = z.float()  # fp32 arithmetic, fp64 sums: 3-4x faster than all-fp64, equal after rounding to fp32
    centred = z - z.mean(dim=(2, 3), keepdim=True)
    scale = centred.abs().mean(dim=(2, 3), keepdim=True).clamp_min(_TV_EPS)
    n = centred / scale
    rows = n.diff(dim=2).abs().sum(dim=(2, 3), dtype=torch.float64)
    cols = n.diff(dim=3).abs().sum(dim=(2, 3), dtype=torch.float64)
    return ((rows + cols) / (z.shape[2] * z.shape[3])).mean(dim=1).float()


_FLAT = 1e-24  # centred energy below this share of the raw energy: a flat map (float rounding only)


def checkerboard_share(z: torch.Tensor) -> torch.Tensor:
    """Share of each map's energy in the period-2 patterns: ``[B, C, H, W]`` → ``[B]`` (float64).

    Each channel x minus its mean; its energy in the span of (−1)^h, (−1)^w and (−1)^(h+w) (each minus
    its mean), summed over channels, divided by Σ_c ‖x_c‖². For even H and W the three patterns are
    orthogonal to each other and to the mean, and the energy is Σ_p ⟨x, p⟩² / (H·W). For an odd side
    they are not: the energy is then the orthogonal projection onto their span, cᵀG⁺c with c = ⟨x, p̃⟩
    and G the patterns' Gram matrix, which keeps every pixel and the share within [0, 1].

    1 for any mix of the three patterns (plus a constant); 3 / (N² − 1) for a linear ramp in any
    direction on an even N × N map (1/21 ≈ 0.048 on 8 × 8; 3(a² + b²) / (a²(H² − 1) + b²(W² − 1)) for
    a·h + b·w on an even H × W map); 0 for a ramp along an odd side; 3 / (H·W − 1) on average for white
    noise; NaN for a flat map (centred energy at most 1e-24 of the raw energy: rounding only). Channels
    are weighted by their energy (TV instead weighs each channel the same).
    """
    if z.ndim != 4:
        raise ValueError(f"maps must be [B, C, H, W], got shape {tuple(z.shape)}")
    h, w = z.shape[2:]
    x = z.double()
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = x - mean
    a = 1.0 - 2.0 * (torch.arange(h, device=z.device) % 2).double()  # (−1)^h
    b = 1.0 - 2.0 * (torch.arange(w, device=z.device) % 2).double()  # (−1)^w
    patterns = torch.stack([a[:, None].expand(h, w), b[None, :].expand(h, w), a[:, None] * b[None, :]])
    patterns = (patterns - patterns.mean(dim=(1, 2), keepdim=True)).flatten(1)  # [3, H·W]
    inner = x.flatten(2) @ patterns.T  # [B, C, 3]
    gram_inv = torch.linalg.pinv(patterns @ patterns.T, rtol=1e-9, hermitian=True)  # (H·W)⁻¹ I if even
    periodic = torch.einsum("bci,ij,bcj->b", inner, gram_inv, inner)
    energy = x.square().sum(dim=(1, 2, 3))
    raw = energy + h * w * mean.square().sum(dim=(1, 2, 3))
    share = (periodic / energy).clamp(0.0, 1.0)
    return torch.where(energy > _FLAT * raw, share, torch.nan)


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


# --- faithfulness -----------------------------------------------------------------------------

Array = torch.Tensor | np.ndarray


def _as_tensor(a: Array) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a)) if isinstance(a, np.ndarray) else a


def _like(result: torch.Tensor, *inputs: Array) -> Array:
    """Numpy out when every input was numpy, a tensor otherwise."""
    if all(isinstance(a, np.ndarray) for a in inputs):
        return result.cpu().numpy()
    return result


def auc(scores: Array, fractions: Array | None = None) -> Array:
    """Area under curves ``[..., K+1]`` over the removed/inserted fraction by the trapezoid rule.

    The points lie at ``fractions`` (default: k/K, k = 0…K, i.e. evenly over [0, 1]); a constant
    score s has AUC s. Float64; torch or numpy as given.
    """
    y = _as_tensor(scores).double()
    if y.shape[-1] < 2:
        raise ValueError(f"a curve needs at least 2 points, got shape {tuple(y.shape)}")
    if fractions is None:
        return _like(torch.trapezoid(y, dx=1.0 / (y.shape[-1] - 1), dim=-1), scores)
    x = _as_tensor(fractions).double().to(y.device)
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"{x.shape[-1]} fractions for curves of {y.shape[-1]} points")
    return _like(torch.trapezoid(y, x, dim=-1), scores)


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dim, 0-based; tied values share the mean of their ranks."""
    ordered = x.sort(dim=-1).values.contiguous()
    low = torch.searchsorted(ordered, x.contiguous(), right=False)
    high = torch.searchsorted(ordered, x.contiguous(), right=True)
    return (low + high - 1).double() / 2


def spearman(a: Array, b: Array) -> Array:
    """Spearman rank correlation per tile: ``a``, ``b`` of shape ``[B, ...]`` → ``[B]``.

    The Pearson correlation of average ranks (ties share their mean rank), as
    ``scipy.stats.spearmanr``; NaN where either tile is constant or holds a NaN.
    """
    x, y = _as_tensor(a), _as_tensor(b)
    if x.shape != y.shape or x.ndim < 2:
        raise ValueError(f"maps must have equal shapes [B, ...], got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.flatten(1).double(), y.flatten(1).double().to(x.device)
    bad = x.isnan().any(1) | y.isnan().any(1)
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(1, keepdim=True), ry - ry.mean(1, keepdim=True)
    denom = (rx.square().sum(1) * ry.square().sum(1)).sqrt()
    rho = (rx * ry).sum(1) / denom  # 0/0 = NaN for a constant tile
    rho = torch.where(bad, torch.nan, rho).clamp(-1.0, 1.0)
    return _like(rho, a, b)


def relevance_mass(maps: Array, region: Array) -> Array:
    """Share of the positive map inside a region, per tile (Arras et al.'s relevance mass accuracy).

    ``maps`` ``[B, H, W]`` (already at the region's resolution), ``region`` a boolean ``[B, H, W]``.
    Σ_region max(m, 0) / Σ max(m, 0); NaN where the map has no positive value. A map spread evenly
    scores the region's area fraction (``region_fraction``), the chance level to compare with.
    """
    m, r = _as_tensor(maps).double(), _as_tensor(region).to(torch.bool)
    if m.shape != r.shape or m.ndim != 3:
        raise ValueError(f"maps and region must both be [B, H, W], got {tuple(m.shape)} and {tuple(r.shape)}")
    positive = m.clamp_min(0)
    total = positive.flatten(1).sum(1)
    inside = (positive * r.to(m.device)).flatten(1).sum(1)
    return _like(torch.where(total > 0, inside / total, torch.nan), maps, region)


def region_fraction(mask: Array, target: Array) -> Array:
    """Per tile, the share of a label mask ``[B, H, W]`` equal to that tile's ``target`` class ``[B]``.

    The stage computes relevance mass only where it lies between 10 % and 90 %.
    """
    m, t = _as_tensor(mask), _as_tensor(target).long().view(-1, 1, 1)
    if m.ndim != 3 or t.shape[0] != m.shape[0]:
        raise ValueError(
            f"mask must be [B, H, W] with one target per tile, got {tuple(m.shape)}, {t.shape[0]}"
        )
    return _like((m == t.to(m.device)).flatten(1).double().mean(1), mask, target)


def bootstrap_mean_ci(
    values: Array, *, level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """The mean of ``values`` and its percentile bootstrap interval (e.g. per-tile AUC gaps).

    NaNs are dropped first; resampling is seeded, so the interval is reproducible. All NaN
    where nothing is left; a single value gives a zero-width interval.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    v = _as_tensor(values).double().flatten().cpu().numpy()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    step = max(1, 2_000_000 // v.size)  # bounded memory for large samples
    for start in range(0, resamples, step):
        n = min(step, resamples - start)
        means[start : start + n] = v[rng.integers(0, v.size, size=(n, v.size))].mean(1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(v.mean()), float(low), float(high)
