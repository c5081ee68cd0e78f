"""Figures: the smoothing methods side by side on one tile (the README picture, `smoothsal compare`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from .attribution import ATTRIBUTIONS, SmoothGrad, attribute  # noqa: E402
from .metrics import total_variation  # noqa: E402
from .smoothing import SurrogatePaths, smooth  # noqa: E402

__all__ = ["compare_methods", "comparison_figure"]

def compare_methods(
    model: nn.Module,
    x: torch.Tensor,
    *,
    layer: str,
    target: int,
    methods: Sequence[str],
    surrogate: SurrogatePaths | None = None,
    smoothgrad: SmoothGrad | None = None,
) -> dict[tuple[str, str], tuple[np.ndarray, float]]:
    """(method, attribution) → (channel-summed saliency map of tile 0, its TV)."""
    out = {}
    for method in methods:
        smoothed = smooth(model, method, surrogate=surrogate if method == "surrogate" else None)
        maps = attribute(smoothed, x, layers=[layer], target=target, smoothgrad=smoothgrad)
        for attribution in ATTRIBUTIONS:
            z = maps[attribution][layer]
            out[method, attribution] = (z[0].sum(0).numpy(), float(total_variation(z)[0]))
    return out


def comparison_figure(
    rgb: np.ndarray, maps: dict[tuple[str, str], tuple[np.ndarray, float]], title: str, path: Path
) -> None:
    """Tile, then one saliency map per method; one row per attribution; TV in each title."""
    methods = list(dict.fromkeys(m for m, _ in maps))
    fig, axes = plt.subplots(
        len(ATTRIBUTIONS), len(methods) + 1, figsize=(2.6 * (len(methods) + 1), 2.7 * len(ATTRIBUTIONS))
    )
    for row, attribution in enumerate(ATTRIBUTIONS):
        axes[row, 0].imshow(rgb)
        axes[row, 0].set_title("tile" if row == 0 else "", fontsize=9)
        axes[row, 0].set_ylabel(attribution)
        for col, method in enumerate(methods, start=1):
            z, tv = maps[method, attribution]
            limit = float(np.abs(z).max()) or 1.0
            axes[row, col].imshow(z, cmap="coolwarm", vmin=-limit, vmax=limit, interpolation="nearest")
            axes[row, col].set_title(f"{method}\nTV {tv:.2f}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
