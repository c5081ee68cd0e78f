"""ASAP XML annotations (Camelyon16): polygons with their group (`PartOfGroup`) as the class name."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..errors import BadAnnotation
from .regions import Region

__all__ = ["read_asap"]


def read_asap(path: Path) -> list[Region]:
    """ASAP XML polygons; `label` holds the group name until mapped."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise BadAnnotation(
            f"{path}: malformed ASAP XML ({err}); re-export it from ASAP or fix the file"
        ) from None
    annotations = root.findall("./Annotations/Annotation")
    if root.tag != "ASAP_Annotations" or root.find("Annotations") is None:
        raise BadAnnotation(
            f"{path}: not an ASAP annotation file (root <{root.tag}>, expected "
            "<ASAP_Annotations><Annotations>); give ASAP XML or QuPath GeoJSON"
        )
    regions = []
    for index, ann in enumerate(annotations):
        kind = ann.get("Type", "Polygon")
        if kind in ("Dot", "PointSet"):
            raise BadAnnotation(_no_area(path, index, ann, f"is a {kind} (no area)"))
        try:
            coords = sorted(
                (
                    float(c.get("Order", i)),
                    float(c.attrib["X"].replace(",", ".")),
                    float(c.attrib["Y"].replace(",", ".")),
                )
                for i, c in enumerate(ann.iter("Coordinate"))
            )
        except (KeyError, ValueError):
            raise BadAnnotation(
                f"{path}: annotation {ann.get('Name')!r} has a coordinate without numeric X/Y; "
                "fix or remove it"
            ) from None
        if len(coords) < 3:
            raise BadAnnotation(_no_area(path, index, ann, f"has {len(coords)} vertices (a polygon needs 3)"))
        vertices = np.array([(x, y) for _, x, y in coords], dtype=np.float64)
        group = ann.get("PartOfGroup", "None")
        regions.append(Region(ann.get("Name", ""), group, vertices))
    return regions


def _no_area(path: Path, index: int, ann: ET.Element, what: str) -> str:
    """Dropping it would label its tiles as background: refuse, naming the annotation."""
    return (
        f"{path}: annotation {index} ({ann.get('Name')!r}, group {ann.get('PartOfGroup')!r}) {what}; "
        "draw it as a polygon or remove it"
    )
