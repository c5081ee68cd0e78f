"""ASAP XML and GeoJSON annotations: real Camelyon16 files against NCRF's reading, errors naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import feature_collection, square

from smoothsal import annotations


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
