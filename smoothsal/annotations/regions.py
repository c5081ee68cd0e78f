"""What an annotation file says, read into level-0 polygons: regions with a class id and holes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Annotations", "Region"]


@dataclass(frozen=True, eq=False)
class Region:
    """One annotated polygon in level-0 px, with optional holes."""

    name: str
    label: (
        Any  # class id (0 = exclusion, cut out of every other region); an importer's class name until mapped
    )
    exterior: np.ndarray  # (N, 2) float (x, y)
    holes: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True, eq=False)
class Annotations:
    """A slide's annotated regions, in paint order (exclusions last)."""

    path: Path
    regions: tuple[Region, ...]
