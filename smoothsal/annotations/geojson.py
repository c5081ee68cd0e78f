"""GeoJSON annotations (QuPath exports): Polygon and MultiPolygon features, the classification's
name as the class name. Points, lines and rings of fewer than 3 vertices are refused, naming the
feature: they have no area, and dropping them would label their tiles as background."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import BadAnnotation, one_line
from .regions import Region

__all__ = ["read_geojson"]


def read_geojson(path: Path) -> list[Region]:
    """GeoJSON (QuPath export) polygons; `label` holds the class name until mapped."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadAnnotation(
            f"{path}: malformed GeoJSON ({one_line(err)}); re-export it from QuPath or fix the file"
        ) from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    else:
        features = data  # QuPath < 0.4 writes a bare list of features
    if not isinstance(features, list):
        raise BadAnnotation(
            f"{path}: not GeoJSON features (expected a FeatureCollection); re-export it from QuPath"
        )
    regions = []
    for i, feature in enumerate(features):
        try:
            found = _feature_regions(feature, i)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise BadAnnotation(
                f"{path}: feature {i} is not a valid GeoJSON Polygon/MultiPolygon "
                f"({one_line(err)}); fix or remove it"
            ) from None
        if isinstance(found, str):
            raise BadAnnotation(f"{path}: feature {i} {found}; draw it as a polygon or remove it")
        regions.extend(found)
    return regions


def _feature_regions(feature: dict, index: int) -> list[Region] | str:
    """The feature's polygons, or what makes it unusable (no area)."""
    props = feature.get("properties") or {}
    cls = props.get("classification")
    name = cls.get("name") if isinstance(cls, dict) else cls
    name = name if name else "Unclassified"
    geometry = feature["geometry"]
    kind = geometry["type"]
    if kind == "Polygon":
        polygons = [geometry["coordinates"]]
    elif kind == "MultiPolygon":
        polygons = geometry["coordinates"]
    else:
        return f"({name!r}) is a {kind} (no area)"
    regions = []
    for rings in polygons:
        arrays = [np.asarray(ring, dtype=np.float64)[:, :2] for ring in rings]
        distinct = len(np.unique(arrays[0], axis=0))  # a closed ring repeats its first vertex
        if distinct < 3:
            return f"({name!r}) has a ring of {distinct} distinct vertices (a polygon needs 3)"
        regions.append(Region(str(props.get("name", f"feature {index}")), name, arrays[0], tuple(arrays[1:])))
    return regions
