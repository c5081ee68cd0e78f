"""`smoothsal compare`: the smoothing methods side by side on one tile image, with their TV — a quick
look before a slide-scale run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from .attribution import ATTRIBUTIONS, SmoothGrad, attribute
from .errors import BadInput, BadOption, one_line
from .files import atomic_path, check_file_out
from .metrics import total_variation
from .model_spec import ModelSpec
from .models import check_input_size
from .precision import check_precision, chosen_precision
from .smoothing import METHODS, SurrogatePaths, method_info, smooth

__all__ = [
    "DEFAULT_MODEL",
    "CompareResult",
    "CompareSettings",
    "compare_methods",
    "comparison_figure",
    "read_tile_image",
    "run_compare",
]

DEFAULT_MODEL = ModelSpec("resnet18", 2)  # a seeded random-init ResNet18 unless told otherwise


@dataclass(frozen=True)
class CompareSettings:
    """What `smoothsal compare` computes: one layer, one target class, SmoothGrad (samples 0: off)."""

    layer: str = "layer2"
    target: int = 0
    size: int = 224  # tile side fed to the model, px
    samples: int = 20
    stdev: float = 0.2
    precision: str = "fp32"  # arithmetic of the maps (see smoothsal.precision)

    def __post_init__(self) -> None:
        if self.size < 1 or self.samples < 0:
            raise BadOption(f"--size must be >= 1 and --samples >= 0, got {self.size} and {self.samples}")
        check_precision(self.precision)

    @property
    def smoothgrad(self) -> SmoothGrad | None:
        return SmoothGrad(self.samples, self.stdev, seed=0) if self.samples else None


@dataclass(frozen=True)
class CompareResult:
    """(method, attribution) → (channel-summed map of the tile, its TV), and the figure written."""

    maps: dict[tuple[str, str], tuple[np.ndarray, float]]
    out: Path


def compare_methods(
    model: nn.Module,
    x: torch.Tensor,
    *,
    layer: str,
    target: int,
    methods: Sequence[str],
    surrogate: SurrogatePaths | None = None,
    smoothgrad: SmoothGrad | None = None,
    precision: str = "fp32",
) -> dict[tuple[str, str], tuple[np.ndarray, float]]:
    """(method, attribution) → (channel-summed saliency map of tile 0, its TV)."""
    out = {}
    for method in methods:
        smoothed = smooth(model, method, surrogate=surrogate if method == "surrogate" else None)
        maps = attribute(
            smoothed, x, layers=[layer], target=target, smoothgrad=smoothgrad, precision=precision
        )
        for attribution in ATTRIBUTIONS:
            z = maps[attribution][layer]
            out[method, attribution] = (z[0].sum(0).numpy(), float(total_variation(z)[0]))
    return out


def comparison_figure(
    rgb: np.ndarray, maps: dict[tuple[str, str], tuple[np.ndarray, float]], title: str
) -> Figure:
    """Tile, then one saliency map per method; one row per attribution; TV in each title."""
    methods = list(dict.fromkeys(m for m, _ in maps))
    fig = Figure(figsize=(2.6 * (len(methods) + 1), 2.7 * len(ATTRIBUTIONS)))
    axes = fig.subplots(len(ATTRIBUTIONS), len(methods) + 1, squeeze=False)
    for row, attribution in enumerate(ATTRIBUTIONS):
        axes[row, 0].imshow(rgb)
        axes[row, 0].set_title("tile" if row == 0 else "", fontsize=9)
        axes[row, 0].set_ylabel(attribution)
        for col, method in enumerate(methods, start=1):
            z, tv = maps[method, attribution]
            limit = float(np.abs(z).max()) or 1.0
            axes[row, col].imshow(z, cmap="coolwarm", vmin=-limit, vmax=limit, interpolation="nearest")
            axes[row, col].set_title(f"{method_info(method).label}\nTV {tv:.2f}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def read_tile_image(path: Path, size: int) -> np.ndarray:
    """An RGB(A) image file as RGB uint8 (size, size, 3); a one-line error naming it if it is none."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB").resize((size, size)))
    except (OSError, UnidentifiedImageError) as err:
        raise BadInput(f"{path}: not a readable image ({one_line(err)}); give a PNG or JPEG tile") from None


def run_compare(
    tile: str | Path, out: str | Path, model: ModelSpec, settings: CompareSettings = CompareSettings()
) -> CompareResult:
    """The `compare` stage: every method (the surrogate with ``model.surrogate``) on one tile image,
    written as a figure (PNG, atomically)."""
    tile, out = Path(tile), Path(out)
    kind = out.suffix.lstrip(".").lower() or "png"
    supported = Figure().canvas.get_supported_filetypes()
    if kind not in supported:
        raise BadOption(
            f"--out {out}: unknown figure format {kind!r}; give a file ending in .png, .svg or .pdf"
        )
    check_file_out(out)
    rgb = read_tile_image(tile, settings.size)
    network, surrogate, norm = model.load()
    check_input_size(network, settings.size, model.arch, "--size")
    x = norm(torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0).unsqueeze(0)
    methods = [m for m in METHODS if m != "surrogate" or surrogate is not None]
    precision = chosen_precision(settings.precision, x.device)
    maps = compare_methods(
        network, x, layer=settings.layer, target=settings.target, methods=methods, surrogate=surrogate,
        smoothgrad=settings.smoothgrad, precision=precision,
    )  # fmt: skip
    weights = model.checkpoint.name if model.checkpoint else "random weights"
    title = f"{model.arch} ({weights}), {settings.layer}, target {settings.target}, {precision}, {tile.name}"
    fig = comparison_figure(rgb, maps, title)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format=kind)
    return CompareResult(maps, out)
