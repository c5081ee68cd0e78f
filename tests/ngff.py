"""Test helper: validate a heatmap container against the OME-Zarr (NGFF) specification.

Uses ome-zarr-models (pydantic models of the NGFF 0.4 and 0.5 schemas, which also check that the
arrays exist and fit the axes and transforms). The version follows the Zarr format: Zarr v2 → NGFF 0.4,
Zarr v3 → NGFF 0.5 (what `smoothsal heatmaps --ngff` writes). Every image the container lists must
validate as an NGFF Image of that version, and so must any other group in it that carries NGFF
multiscales metadata; the root itself carries no multiscales (its images are its subgroups).

A container of format 2 is also a multi-image collection ("bioformats2raw.layout", `assert_valid_series`):
its root validates as ome-zarr-models' BioFormats2Raw, ``OME/series`` lists exactly the images the
container lists, and ``OME/METADATA.ome.xml`` validates against the OME 2016-06 schema (ome-types, with
lxml) with one Image per series entry, in order: ID ``Image:{path}``, Name = the path, SizeX/SizeY/SizeC
= level 0's shape, PhysicalSizeX/Y = level 0's µm scale.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import zarr


def ngff_version(group: zarr.Group) -> str:
    return "0.4" if group.metadata.zarr_format == 2 else "0.5"


def _multiscales_groups(group: zarr.Group, prefix: str = "") -> list[str]:
    """Paths of every group below `group` whose attributes carry NGFF multiscales."""
    out = []
    with warnings.catch_warnings():  # OME/METADATA.ome.xml is a file, not a Zarr node: zarr warns, rightly
        warnings.filterwarnings("ignore", "Object at .* is not recognized", UserWarning)
        children = list(group.groups())
    for name, child in children:
        path = f"{prefix}{name}"
        attrs = dict(child.attrs)
        if "multiscales" in attrs or "multiscales" in (attrs.get("ome") or {}):
            out.append(path)
        out += _multiscales_groups(child, f"{path}/")
    return out


def assert_valid_ngff(container: str | Path) -> list[str]:
    """Assert that every image of `container` validates against its NGFF version; returns their paths."""
    from ome_zarr_models import v04, v05

    root = zarr.open_group(str(container), mode="r")
    version = ngff_version(root)
    model = v04.Image if version == "0.4" else v05.Image
    listed = [str(i["path"]) for i in dict(root.attrs).get("smoothsal", {}).get("images", [])]
    found = _multiscales_groups(root)
    assert set(listed) <= set(found), (
        f"{container}: listed images without NGFF metadata: {set(listed) - set(found)}"
    )
    for path in found:
        try:
            model.from_zarr(root[path])
        except Exception as err:  # pydantic's ValidationError and the models' ValueErrors
            raise AssertionError(f"{container}/{path} is not a valid NGFF {version} image: {err}") from err
    root_attrs = dict(root.attrs)
    assert "multiscales" not in root_attrs and "multiscales" not in (root_attrs.get("ome") or {}), container
    if "bioformats2raw.layout" in root_attrs or "bioformats2raw.layout" in (root_attrs.get("ome") or {}):
        assert_valid_series(container)
    return found


def _ome(group: zarr.Group) -> dict:
    attrs = dict(group.attrs)
    return dict(attrs.get("ome", attrs))


def assert_valid_series(container: str | Path) -> list[str]:
    """Assert that `container` is a valid bioformats2raw-layout collection of exactly its listed images
    (see the module doc); returns the series paths."""
    import ome_types
    from ome_zarr_models import v04, v05

    root = zarr.open_group(str(container), mode="r")
    version = ngff_version(root)
    model = v04.BioFormats2Raw if version == "0.4" else v05.BioFormats2Raw
    try:
        model.from_zarr(root)
    except Exception as err:
        raise AssertionError(
            f"{container} is not a valid NGFF {version} bioformats2raw group: {err}"
        ) from err
    assert _ome(root).get("bioformats2raw.layout") == 3, container
    if version == "0.5":
        assert _ome(root)["version"] == _ome(root["OME"])["version"] == "0.5", container
    series = _ome(root["OME"])["series"]
    listed = [str(i["path"]) for i in dict(root.attrs).get("smoothsal", {}).get("images", [])]
    assert series == listed, (container, series, listed)
    xml = (Path(container) / "OME" / "METADATA.ome.xml").read_bytes()
    try:
        ome = ome_types.from_xml(xml, validate=True)
    except Exception as err:
        raise AssertionError(f"{container}/OME/METADATA.ome.xml is not valid OME-XML: {err}") from err
    ids, names = [im.id for im in ome.images], [im.name for im in ome.images]
    assert ids == [f"Image:{p}" for p in series], (container, "Image IDs", ids)
    assert names == series, (container, "Image names", names)
    for image, path in zip(ome.images, series, strict=True):
        ms = _ome(root[path])["multiscales"][0]
        axes = [a["name"] for a in ms["axes"]]
        level0 = root[path][ms["datasets"][0]["path"]]
        (scale,) = [
            t["scale"] for t in ms["datasets"][0]["coordinateTransformations"] if t["type"] == "scale"
        ]
        px = image.pixels
        assert (px.size_x, px.size_y) == (level0.shape[axes.index("x")], level0.shape[axes.index("y")]), path
        assert px.size_c == (level0.shape[axes.index("c")] if "c" in axes else 1) == len(px.channels), path
        assert (px.size_z, px.size_t) == (1, 1) and px.metadata_only is not None, path
        assert (px.physical_size_x, px.physical_size_y) == (scale[axes.index("x")], scale[axes.index("y")]), (
            path
        )
        assert px.physical_size_x_unit.value == px.physical_size_y_unit.value == "µm", path
    return series
