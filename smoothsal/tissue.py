"""The tissue mask of a slide: HSV saturation above Otsu's threshold (with a floor), cleaned up.

Computed on a low-resolution read of the whole slide (`slides.read_low_res`), so tiling never reads
level 0; `box_fractions` gives the tissue fraction of any level-0 box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.filters import threshold_otsu
from skimage.morphology import isotropic_closing, remove_small_holes, remove_small_objects

from .errors import BadOption
from .slides import LowRes, Slide, read_low_res

__all__ = ["Tissue", "TissueMaskSettings", "box_fractions", "find_tissue", "hsv_saturation", "tissue_mask"]


@dataclass(frozen=True)
class TissueMaskSettings:
    """Tissue = HSV saturation above Otsu's threshold (at least `min_saturation`), cleaned up."""

    mask_mpp: float = 8.0  # resolution of the mask, µm/px (read from a low pyramid level)
    min_saturation: float = 0.08  # floor on the threshold: blank glass (S ≈ 0–0.05) stays background
    closing_um: float = 16.0  # closing radius: joins tissue split by thin gaps
    min_object_um2: float = 20_000.0  # tissue specks up to this area are dropped (dust, debris)
    min_hole_um2: float = 20_000.0  # holes up to this area inside tissue are filled

    def __post_init__(self) -> None:
        if self.mask_mpp <= 0:
            raise BadOption(f"mask resolution must be > 0 µm/px, got {self.mask_mpp} (e.g. --mask-mpp 8)")


def tissue_mask(
    rgb: np.ndarray, mpp: float, settings: TissueMaskSettings = TissueMaskSettings()
) -> np.ndarray:
    """Boolean tissue mask of an RGB image at `mpp` µm/px: saturation, Otsu with a floor, morphology."""
    saturation = hsv_saturation(rgb)
    threshold = settings.min_saturation
    if np.ptp(saturation) > 0:
        threshold = max(threshold, float(threshold_otsu(saturation)))
    mask = saturation > threshold
    radius = round(settings.closing_um / mpp)
    if radius >= 1:
        mask = isotropic_closing(mask, radius)
    px_area = mpp * mpp
    mask = remove_small_objects(mask, max_size=int(settings.min_object_um2 / px_area))
    return remove_small_holes(mask, max_size=int(settings.min_hole_um2 / px_area))


def hsv_saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (max − min) / max in float32: `skimage.color.rgb2hsv(rgb)[..., 1]` without its
    float64 H×W×3 copies (a whole Camelyon16 slide at 8 µm/px is ~21 Mpx)."""
    high, low = rgb.max(axis=-1).astype(np.float32), rgb.min(axis=-1).astype(np.float32)
    return np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)


@dataclass(frozen=True, eq=False)
class Tissue:
    """A slide's tissue mask with the low-resolution image it was computed from."""

    overview: LowRes
    mask: np.ndarray  # bool, same grid as overview.image


def find_tissue(slide: Slide, settings: TissueMaskSettings = TissueMaskSettings()) -> Tissue:
    """Read the slide at `settings.mask_mpp` and threshold it."""
    low = read_low_res(slide, settings.mask_mpp)
    return Tissue(low, tissue_mask(low.image, slide.mpp * low.downsample, settings))


def box_fractions(
    mask: np.ndarray, downsample: float, xs: np.ndarray, ys: np.ndarray, w: int, h: int
) -> np.ndarray:
    """Fraction of mask pixels (by pixel centre) inside each level-0 box (x, y, w, h); vectorised.

    A box smaller than a mask pixel takes the pixel under its centre.
    """
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def span(start: np.ndarray, length: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.ceil(start / downsample - 0.5).astype(np.int64)
        hi = np.ceil((start + length) / downsample - 0.5).astype(np.int64)
        centre = np.floor((start + length / 2) / downsample).astype(np.int64)
        lo, hi = np.where(hi > lo, lo, centre), np.where(hi > lo, hi, centre + 1)
        return np.clip(lo, 0, n), np.clip(hi, 0, n)

    r0, r1 = span(np.asarray(ys, float), h, mask.shape[0])
    c0, c1 = span(np.asarray(xs, float), w, mask.shape[1])
    total = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    area = (r1 - r0) * (c1 - c0)
    return np.where(area > 0, total / np.maximum(area, 1), 0.0)
