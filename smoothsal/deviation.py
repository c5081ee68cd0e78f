"""How far maps computed in a low precision (bf16, tf32) lie from the same maps in fp32, and the gates
they must pass.

A bf16 map is judged as a picture, on trained weights: the centred cosine of the channel-summed maps
(1 = the same picture up to a positive scale), their relative error (DeepLift's values are read as
values, so its error is gated too), and the change of mean TV (the paper's noise measure must not move).
Random weights fail the gates by design: bf16 follows their gradients poorly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .metrics import total_variation

__all__ = ["GATES", "Deviation", "Gates", "centred_cosine", "deviation", "relative_error"]


@dataclass(frozen=True)
class Gates:
    """The deviation a low-precision map may have from fp32 (per attribution × layer, over tiles)."""

    cosine_median: float = 0.98  # centred cosine of the channel-summed maps, median over tiles, at least
    cosine_min: float = 0.95  # … and its minimum, at least
    tv_change: float = 0.02  # |mean TV / mean TV in fp32 − 1|, at most
    deeplift_relative_error: float = 0.03  # DeepLift's median relative error, at most


GATES = Gates()


def centred_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per tile: cosine of the mean-free maps (1 = the same picture up to a positive scale)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per tile: ‖ours − ref‖₂ / ‖ref‖₂."""
    ours, ref = ours.flatten(1).double(), ref.flatten(1).double()
    return (ours - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)


@dataclass(frozen=True)
class Deviation:
    """One attribution × layer of a low-precision run against fp32, over a sample of tiles."""

    attribution: str
    layer: str
    tiles: int
    cosine_min: float
    cosine_median: float
    relative_error_median: float
    relative_error_max: float
    tv_change: float  # mean TV / mean TV in fp32 − 1

    def missed(self, gates: Gates = GATES) -> list[str]:
        """The gates this cell misses, as readable conditions (empty: it passes)."""
        misses = []
        if not self.cosine_median >= gates.cosine_median:  # NaN misses too
            misses.append(f"cosine median {self.cosine_median:.4f} < {gates.cosine_median}")
        if not self.cosine_min >= gates.cosine_min:
            misses.append(f"cosine min {self.cosine_min:.4f} < {gates.cosine_min}")
        if not abs(self.tv_change) <= gates.tv_change:
            misses.append(f"TV change {self.tv_change:+.2%} beyond ±{gates.tv_change:.0%}")
        if self.attribution == "deeplift" and not self.relative_error_median <= gates.deeplift_relative_error:
            misses.append(
                f"relative error median {self.relative_error_median:.4f} > {gates.deeplift_relative_error}"
            )
        return misses

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def deviation(attribution: str, layer: str, low: torch.Tensor, ref: torch.Tensor) -> Deviation:
    """``low`` against ``ref`` (fp32), both [B, C, h, w] maps of the same tiles."""
    low, ref = low.detach().cpu().float(), ref.detach().cpu().float()
    cos = centred_cosine(low.sum(1), ref.sum(1))
    rel = relative_error(low.sum(1), ref.sum(1))
    tv = float(total_variation(low).mean() / total_variation(ref).mean() - 1)
    return Deviation(
        attribution, layer, int(low.shape[0]), float(cos.min()), float(cos.median()), float(rel.median()),
        float(rel.max()), tv,
    )  # fmt: skip
