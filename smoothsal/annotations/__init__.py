"""Annotations of a slide: read ASAP XML or GeoJSON into level-0 polygons, map class names to ids,
check they fit the slide, rasterise them into tile label masks.

One importer per format (`asap.py`, `geojson.py`); class id 0 is an exclusion (cut out of the other
regions), a negative id means "ignore these annotations".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import BadAnnotation, BadOption, MissingInput, one_line
from ..slides import Slide
from .asap import read_asap
from .geojson import read_geojson
from .masks import tile_label_mask
from .regions import Annotations, Region

__all__ = [
    "DEFAULT_CLASS_MAP",
    "Annotations",
    "Region",
    "check_annotations_within",
    "n_classes",
    "parse_class_map",
    "read_annotations",
    "tile_label_mask",
]

# Class names (case-insensitive) → class id. 0 = exclusion: cut out of the other regions.
# A negative id means "ignore these annotations".
DEFAULT_CLASS_MAP: dict[str, int] = {
    "_0": 1, "_1": 1, "tumor": 1, "tumour": 1, "metastases": 1,
    "_2": 0, "exclusion": 0, "normal": 0,
}  # fmt: skip


def parse_class_map(text: str) -> dict[str, int]:
    """`"Tumor=1,Stroma=2,Exclusion=0"` → {"tumor": 1, …} (names case-insensitive)."""
    mapping: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.rpartition("=")
        if not name.strip() or not value.strip().lstrip("-").isdigit():
            raise BadOption(
                f"--class-map: cannot read {item!r}; write NAME=ID pairs separated by commas, e.g. "
                "Tumor=1,Stroma=2,Exclusion=0 (0 = exclusion, negative = ignore)"
            )
        mapping[name.strip().lower()] = int(value)
    return mapping


def n_classes(class_map: Mapping[str, int]) -> int:
    """Number of foreground classes: the largest class id in the map."""
    return max([0, *class_map.values()])


def read_annotations(path: str | Path, class_map: Mapping[str, int] | None = None) -> Annotations:
    """Read ASAP XML (`.xml`) or GeoJSON (`.geojson`/`.json`) annotations in level-0 px.

    Errors name the file and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path}: annotation file not found; check --annotations")
    mapping = {k.lower(): v for k, v in (DEFAULT_CLASS_MAP if class_map is None else class_map).items()}
    importers = {".xml": read_asap, ".geojson": read_geojson, ".json": read_geojson}
    importer = importers.get(path.suffix.lower())
    if importer is not None:
        try:
            raw = importer(path)
        except OSError as err:  # permissions, an unreadable disk
            raise BadAnnotation(f"{path}: cannot be read ({one_line(err)}); check the file") from None
    else:
        raise BadAnnotation(f"{path}: unknown annotation format; give ASAP XML (.xml) or GeoJSON (.geojson)")
    regions = [replace(r, label=_class_id(path, r.label, mapping)) for r in raw]
    regions = [r for r in regions if r.label >= 0]
    return Annotations(path, tuple(sorted(regions, key=lambda r: r.label == 0)))


def _class_id(path: Path, name: Any, mapping: Mapping[str, int]) -> int:
    key = str(name).lower()
    if key not in mapping:
        raise BadAnnotation(
            f"{path}: annotation class {name!r} has no class id; map it with --class-map "
            f"'{name}=ID' (0 = exclusion, negative = ignore; known: {', '.join(sorted(mapping))})"
        )
    return mapping[key]


def check_annotations_within(annotations: Annotations, slide: Slide, tolerance: float = 0.01) -> None:
    """Raise when a region reaches outside the slide (by more than `tolerance` × its size)."""
    width, height = slide.dimensions
    for region in annotations.regions:
        (x0, y0), (x1, y1) = region.exterior.min(0), region.exterior.max(0)
        if (
            x0 < -tolerance * width
            or y0 < -tolerance * height
            or x1 > (1 + tolerance) * width
            or y1 > (1 + tolerance) * height
        ):
            raise BadAnnotation(
                f"{annotations.path}: region {region.name!r} spans x {x0:.0f}–{x1:.0f}, "
                f"y {y0:.0f}–{y1:.0f} but {slide.path.name} is {width}×{height} px at level 0; "
                "give the annotation file of this slide"
            )
