"""A GeoJSON object reader that follows QuPath's own rules, to check what QuPath would import.

Rules read from QuPath's source (qupath/qupath, v0.5.1 to v0.7.0 and main, August 2026; read for facts,
no code taken), and what this reader does with each:

- `qupath-core/.../io/GsonTools.java` `addPathObjects`: a JSON array, a "Feature" or a "FeatureCollection"
  (its "features" array, `QuPathTypeAdapters.PathObjectCollectionTypeAdapter`); other members of the
  collection are ignored. `PathIO.readObjects`: a name ending in ".gz" is gunzipped, then ".json" or
  ".geojson" is read as GeoJSON.
- `QuPathTypeAdapters.PathObjectTypeAdapter.parseObject`: the type from properties "objectType" (else
  the legacy "object_type", else "type"): tile, cell, detection, annotation, tmaCore/tma_core, root, or
  the v0.2 class names given as the feature's "id"; no type → annotation; an unknown type → annotation
  (with a warning). "isLocked" counts when it is a JSON primitive. "id" is a UUID since v0.4.
- `GsonTools.PathClassTypeAdapter.read`: "classification" may be null, a string (a class without a
  colour), the pre-v0.4 form (an empty object, or one with "colorRGB" or "parentClass"), or an object
  with "name" (or "names") AND "color"; anything else throws `JsonParseException` (the import fails).
  `arrayToRgb`: "color" is an int array of length 0, 1 (packed), 3 (RGB) or 4 (RGBA, alpha last);
  another length throws.
- `QuPathTypeAdapters.MeasurementListTypeAdapter.read`: "measurements" is read only if it is an object
  (a name → value map, since v0.4) or an array (the legacy list of {"name", "value"}); otherwise it is
  silently dropped. Map values: a number; a string "NaN"/"Inf"/"-Inf" (any case) or one that Java's
  `Double.parseDouble` reads (v0.5 on: v0.4.4 casts every value to a number and fails on a string);
  another string throws (the import fails); null or another type is skipped with a warning. QuPath
  writes NaN as the string "NaN" (v0.5 on). `MeasurementList.get`: a missing measurement reads as NaN.
- `qupath-gui-fx/.../panes/MeasurementMapPane.java`: measurement maps colour the detection objects
  (`hierarchy.getDetectionObjects()`); `PathTileObject` and `PathCellObject` extend `PathDetectionObject`.

Where QuPath silently loses data (a "measurements" that is no map or list, a null measurement) this
reader refuses instead (`QuPathFormatError`), so that a test catches it.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import shapely
from shapely.geometry import shape

OBJECT_TYPES = {
    "tile": "tile", "PathTileObject": "tile", "cell": "cell", "PathCellObject": "cell",
    "detection": "detection", "PathDetectionObject": "detection", "annotation": "annotation",
    "PathAnnotationObject": "annotation", "tmaCore": "tmaCore", "tma_core": "tmaCore",
    "TMACoreObject": "tmaCore", "root": "root", "PathRootObject": "root",
}  # fmt: skip
DETECTIONS = {"tile", "cell", "detection"}  # what Show measurement maps colours
_JAVA_DOUBLE = re.compile(r"[+-]?(NaN|Infinity|((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?)[fFdD]?)")


class QuPathFormatError(ValueError):
    """Something QuPath would refuse (or silently drop) when importing."""


@dataclass
class QuPathObject:
    object_type: str
    geometry: Any  # shapely
    classification: tuple[str, tuple[int, ...] | None] | None  # (name, colour)
    measurements: dict[str, float] = field(default_factory=dict)
    locked: bool = False
    name: str | None = None
    id: uuid.UUID | None = None


def load(path: str | Path) -> Any:
    """The JSON of a .geojson / .json file, gunzipped when its name ends in .gz (as QuPath picks)."""
    path = Path(path)
    base = path.name.lower().removesuffix(".gz")
    if not base.endswith((".geojson", ".json")):
        raise QuPathFormatError(f"{path.name}: QuPath reads objects from .json/.geojson(.gz) names only")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def read_objects(data: Any, *, collection: bool = True) -> list[QuPathObject]:
    """The objects QuPath would create from parsed GeoJSON; ``collection``: require a FeatureCollection."""
    if collection and not (isinstance(data, dict) and data.get("type") == "FeatureCollection"):
        raise QuPathFormatError("not a GeoJSON FeatureCollection")
    if isinstance(data, list):
        return [o for item in data for o in read_objects(item, collection=False)]
    if not isinstance(data, dict) or "type" not in data:
        return []
    if data["type"] == "FeatureCollection":
        features = data.get("features")
        return [feature(f) for f in features] if isinstance(features, list) else []
    if data["type"] == "Feature":
        return [feature(data)]
    return []


def _primitive(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool))


def _colour(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise QuPathFormatError(f"classification color {value!r} is not an int array")
    if len(value) not in (0, 1, 3, 4):
        raise QuPathFormatError(f"classification color has {len(value)} values, not 0, 1, 3 or 4")
    return tuple(value) or None


def classification(value: Any) -> tuple[str, tuple[int, ...] | None] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict):
        if not value or "colorRGB" in value or "parentClass" in value:  # before v0.4
            return (str(value.get("name")) if value.get("name") else "", None) if value else None
        if ("name" in value or "names" in value) and "color" in value:
            name = value.get("name") or ": ".join(value.get("names") or [])
            return str(name), _colour(value["color"])
    raise QuPathFormatError(f"classification {value!r}: QuPath needs a name (or names) and a color")


def _number(name: str, value: Any) -> float | None:
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        raise QuPathFormatError(f"measurement {name!r} = {value!r} is not a number (QuPath skips it)")
    if isinstance(value, (int, float)):
        return float(value)
    special = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
    if value.lower() in special:
        return special[value.lower()]
    if not _JAVA_DOUBLE.fullmatch(value.strip()):
        raise QuPathFormatError(f"measurement {name!r} = {value!r}: not a number (QuPath's import fails)")
    return float(value.strip().rstrip("fFdD").replace("Infinity", "inf"))


def measurements(value: Any) -> dict[str, float]:
    if isinstance(value, dict):
        return {str(k): _number(k, v) for k, v in value.items()}
    if isinstance(value, list):  # before v0.4: [{"name": …, "value": …}]
        out = {}
        for item in value:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise QuPathFormatError(f"legacy measurement {item!r} has no name")
            out[item["name"]] = _number(item["name"], item.get("value"))
        return out
    raise QuPathFormatError(f"measurements {value!r} is neither a map nor a list (QuPath drops it)")


def feature(data: Any) -> QuPathObject:
    if not isinstance(data, dict) or data.get("type") != "Feature":
        raise QuPathFormatError(f"not a GeoJSON Feature: {str(data)[:80]}")
    try:
        geometry = shape(data["geometry"])
    except (KeyError, TypeError, ValueError, AttributeError, shapely.errors.GeometryTypeError) as err:
        raise QuPathFormatError(f"feature without a readable geometry ({err})") from None
    props = data.get("properties") or {}
    object_id, kind = data.get("id"), "annotation"
    if object_id in OBJECT_TYPES and object_id[0] == "P" or object_id == "TMACoreObject":
        kind, object_id = OBJECT_TYPES[object_id], None
    for key in ("objectType", "object_type", "type"):
        if key in props:
            kind = OBJECT_TYPES.get(str(props[key]), "annotation")
            break
    parsed_id = None
    if isinstance(object_id, str):
        try:
            parsed_id = uuid.UUID(object_id)
        except ValueError:
            pass
    has = "measurements" in props and props["measurements"] is not None
    return QuPathObject(
        object_type=kind,
        geometry=geometry,
        classification=classification(props.get("classification")),
        measurements=measurements(props["measurements"]) if has else {},
        locked=_primitive(props.get("isLocked")) and str(props["isLocked"]).lower() == "true",
        name=props.get("name"),
        id=parsed_id,
    )
