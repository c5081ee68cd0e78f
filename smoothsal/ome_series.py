"""The heatmap container's image list for readers of multi-image OME-Zarr (napari-ome-zarr, Bio-Formats):
the NGFF "bioformats2raw.layout" (transitional, NGFF 0.4 and 0.5), written by `container.write_series`.

- the root attribute ``bioformats2raw.layout: 3`` (NGFF 0.5: inside the root's ``ome`` attribute);
- a group ``OME`` whose attribute ``series`` lists the image groups by their paths (``tissue``,
  ``heatmaps/{method}/{attribution}/{layer}``: the spec lets ``series`` name any image group, so the
  images keep the paths smoothsal has always used);
- ``OME/METADATA.ome.xml``: one OME-XML ``Image`` per series entry, in the same order, ID ``Image:{path}``
  (napari-ome-zarr opens the group named by the ID after ``Image:``), Name = the path, ``Pixels`` sizes of
  level 0 and PhysicalSizeX/Y = level 0's µm scale, ``<MetadataOnly/>`` (no pixel data in the XML).

Everything is read back from the images' own NGFF metadata and level-0 arrays, so the list cannot disagree
with the images. The XML is plain ElementTree (no run-time dependency); tests validate it against the OME
schema with ome-types.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr

__all__ = ["LAYOUT", "OME_NS", "XML_KEY", "ome_xml", "write_series"]

LAYOUT = 3  # the only bioformats2raw.layout version the spec defines
OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
XML_KEY = "OME/METADATA.ome.xml"
_XSI = "http://www.w3.org/2001/XMLSchema-instance"
_TYPES = {"uint8": "uint8", "uint16": "uint16", "int8": "int8", "int16": "int16", "int32": "int32",
          "uint32": "uint32", "float32": "float", "float64": "double"}  # fmt: skip
_UNITS = {"micrometer": "µm", "nanometer": "nm", "millimeter": "mm", "centimeter": "cm", "meter": "m"}


def _ome_attrs(group: zarr.Group) -> dict[str, Any]:
    attrs = dict(group.attrs)
    return dict(attrs.get("ome", attrs))


def _colour(hex_rgb: str | None) -> int | None:
    """An omero channel colour ("RRGGBB") as OME-XML's Color: RGBA packed in a signed 32-bit integer."""
    if not hex_rgb or len(hex_rgb) != 6:
        return None
    value = (int(hex_rgb, 16) << 8) | 0xFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _image(path: str, group: zarr.Group) -> ET.Element:
    """One OME-XML Image (with its Pixels and Channels) from an NGFF image group."""
    ms = _ome_attrs(group)["multiscales"][0]
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms["axes"]]
    units = [a.get("unit") if isinstance(a, dict) else None for a in ms["axes"]]
    level0 = ms["datasets"][0]
    array = group[level0["path"]]
    scale = next(t["scale"] for t in level0["coordinateTransformations"] if t["type"] == "scale")
    iy, ix = axes.index("y"), axes.index("x")
    n_channels = int(array.shape[axes.index("c")]) if "c" in axes else 1
    dtype = str(np.dtype(array.dtype))
    if dtype not in _TYPES:
        raise ValueError(f"{path}: no OME-XML pixel type for {dtype}")  # a bug: smoothsal writes none such
    image = ET.Element(f"{{{OME_NS}}}Image", ID=f"Image:{path}", Name=path)
    pixels = ET.SubElement(
        image, f"{{{OME_NS}}}Pixels",
        ID=f"Pixels:{path}", DimensionOrder="XYCZT", Type=_TYPES[dtype], Interleaved="false",
        SizeX=str(array.shape[ix]), SizeY=str(array.shape[iy]), SizeC=str(n_channels), SizeZ="1", SizeT="1",
        PhysicalSizeX=repr(float(scale[ix])), PhysicalSizeXUnit=_UNITS.get(units[ix] or "micrometer", "µm"),
        PhysicalSizeY=repr(float(scale[iy])), PhysicalSizeYUnit=_UNITS.get(units[iy] or "micrometer", "µm"),
    )  # fmt: skip
    channels = (_ome_attrs(group).get("omero") or {}).get("channels") or []
    for c in range(n_channels):
        info = channels[c] if c < len(channels) else {}
        channel = ET.SubElement(pixels, f"{{{OME_NS}}}Channel", ID=f"Channel:{path}:{c}", SamplesPerPixel="1")
        if info.get("label"):
            channel.set("Name", str(info["label"]))
        colour = _colour(info.get("color"))
        if colour is not None:
            channel.set("Color", str(colour))
    ET.SubElement(pixels, f"{{{OME_NS}}}MetadataOnly")
    return image


def ome_xml(root: zarr.Group, paths: Sequence[str], creator: str) -> bytes:
    """OME-XML (2016-06 schema) listing the images at ``paths`` of ``root``, in that order."""
    ET.register_namespace("", OME_NS)
    ET.register_namespace("xsi", _XSI)
    ome = ET.Element(f"{{{OME_NS}}}OME", {"Creator": creator,
                     f"{{{_XSI}}}schemaLocation": f"{OME_NS} {OME_NS}/ome.xsd"})  # fmt: skip
    for path in paths:
        ome.append(_image(path, root[path]))
    ET.indent(ome)
    return ET.tostring(ome, encoding="utf-8", xml_declaration=True)


def write_series(root: zarr.Group, paths: Sequence[str], creator: str) -> None:
    """Make ``root`` a bioformats2raw-layout collection of the NGFF images at ``paths`` (see module doc):
    the root attribute, the ``OME`` group with ``series`` and ``OME/METADATA.ome.xml``."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    paths = [str(p) for p in paths]
    xml = ome_xml(root, paths, creator)
    group = root.create_group("OME")
    if root.metadata.zarr_format == 2:  # NGFF 0.4: plain attributes
        root.attrs["bioformats2raw.layout"] = LAYOUT
        group.attrs["series"] = paths
    else:  # NGFF 0.5: inside "ome", with the version
        root.attrs["ome"] = {"version": "0.5", "bioformats2raw.layout": LAYOUT}
        group.attrs["ome"] = {"version": "0.5", "series": paths}
    buffer = default_buffer_prototype().buffer.from_bytes(xml)
    sync(root.store.set(f"{root.path}/{XML_KEY}" if root.path else XML_KEY, buffer))
