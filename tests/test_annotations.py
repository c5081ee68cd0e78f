"""ASAP XML and GeoJSON annotations: real Camelyon16 files against NCRF's reading, errors naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import feature_collection, square

from smoothsal import annotations
from smoothsal.errors import BadAnnotation


@pytest.mark.parametrize("name", ["tumor_001", "tumor_081"])
def test_asap_xml_matches_ncrf_json(annotations_dir, name):
    regions = annotations.read_annotations(annotations_dir / f"{name}.xml")
    ncrf = json.loads((annotations_dir / f"{name}.ncrf.json").read_text())
    for label, key in ((1, "positive"), (0, "negative")):
        ours = [r.exterior for r in regions.regions if r.label == label]
        theirs = [np.asarray(p["vertices"], float) for p in ncrf[key]]
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b)
    assert sum(len(r.exterior) for r in regions.regions) > 80


def test_malformed_annotations_name_the_file(tmp_path):
    cases = {
        "cut.xml": '<?xml version="1.0"?><ASAP_Annotations><Annotations><Annotation',
        "other.xml": "<svg><g/></svg>",
        "nan.xml": '<ASAP_Annotations><Annotations><Annotation Name="A" PartOfGroup="_0"><Coordinates>'
        '<Coordinate Order="0" X="1" Y="abc"/></Coordinates></Annotation></Annotations></ASAP_Annotations>',
        "cut.geojson": '{"type": "FeatureCollection", "features": [',
        "bad.geojson": '{"type": "FeatureCollection", "features": '
        '[{"type": "Feature", "geometry": {"type": "Polygon"}}]}',  # no coordinates
        "notes.txt": "tumour in the top left",
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError) as err:
            annotations.read_annotations(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value), name
    with pytest.raises(FileNotFoundError, match="missing.xml"):
        annotations.read_annotations(tmp_path / "missing.xml")


def test_unknown_class_name_asks_for_a_class_map(tmp_path):
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps(feature_collection([("Necrosis", square(0, 0, 10))])))
    with pytest.raises(ValueError, match=r"qupath\.geojson.*'Necrosis'.*--class-map"):
        annotations.read_annotations(path)
    assert len(annotations.read_annotations(path, {"Necrosis": 2}).regions) == 1
    assert annotations.read_annotations(path, {"necrosis": -1}).regions == ()  # negative id: ignored
    assert annotations.parse_class_map("Tumor=1, Stroma=2,Exclusion=0") == {
        "tumor": 1,
        "stroma": 2,
        "exclusion": 0,
    }
    with pytest.raises(ValueError, match="NAME=ID"):
        annotations.parse_class_map("Tumor:1")


def test_annotation_outside_the_slide_is_an_error(annotations_dir, cmu):
    regions = annotations.read_annotations(annotations_dir / "tumor_081.xml")
    with pytest.raises(
        ValueError,
        match=r"tumor_081\.xml.*CMU-1-Small-Region\.svs is 2220×2967.*annotation file of this slide",
    ):
        annotations.check_annotations_within(regions, cmu[0])


def _asap_with(real: str, extra: str) -> str:
    """A real Camelyon16 ASAP file with one more annotation appended."""
    return real.replace("</Annotations>", extra + "</Annotations>", 1)


ASAP_DEGENERATE = {
    "a Dot": (('<Annotation Name="spot" Type="Dot" PartOfGroup="_0"><Coordinates>'
              '<Coordinate Order="0" X="10" Y="10"/></Coordinates></Annotation>'), "is a Dot"),
    "a 2-vertex polygon": (('<Annotation Name="sliver" Type="Polygon" PartOfGroup="_0"><Coordinates>'
                           '<Coordinate Order="0" X="10" Y="10"/><Coordinate Order="1" X="90" Y="10"/>'
                           "</Coordinates></Annotation>"), "has 2 vertices"),
}  # fmt: skip
GEOJSON_DEGENERATE = {
    "a Point": ({"type": "Point", "coordinates": [10, 10]}, "is a Point"),
    "a LineString": ({"type": "LineString", "coordinates": [[10, 10], [90, 90]]}, "is a LineString"),
    "a 2-vertex ring": ({"type": "Polygon", "coordinates": [[[10, 10], [90, 10], [10, 10]]]}, "2 distinct"),
}


@pytest.mark.parametrize("case", list(ASAP_DEGENERATE))
def test_case_7_asap_annotations_without_area_are_refused_naming_them(annotations_dir, tmp_path, case):
    """Dropped, they would label their tiles background (0) instead of leaving them unlabelled; the real
    files (../shared/data) hold none, so refusing breaks nothing there."""
    extra, words = ASAP_DEGENERATE[case]
    real = (annotations_dir / "tumor_001.xml").read_text()
    count = real.count("<Annotation ")
    path = tmp_path / "tumor_001.xml"
    path.write_text(_asap_with(real, extra))
    with pytest.raises(BadAnnotation) as err:
        annotations.read_annotations(path)
    message = str(err.value)
    assert message.startswith(f"{path}: annotation {count} (") and words in message and "\n" not in message
    assert message.endswith("draw it as a polygon or remove it")


@pytest.mark.parametrize("case", list(GEOJSON_DEGENERATE))
def test_case_7_geojson_features_without_area_are_refused_naming_them(tmp_path, case):
    geometry, words = GEOJSON_DEGENERATE[case]
    data = feature_collection([("Tumor", square(0, 0, 500))])
    data["features"].append({"type": "Feature", "geometry": geometry,
                             "properties": {"classification": {"name": "Tumor"}}})  # fmt: skip
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps(data))
    with pytest.raises(BadAnnotation, match=rf"^{path}: feature 1 \('Tumor'\) .*{words}"):
        annotations.read_annotations(path)
