"""Test helper: validate a heatmap container against the OME-Zarr (NGFF) specification.

Uses ome-zarr-models (pydantic models of the NGFF 0.4 and 0.5 schemas, which also check that the
arrays exist and fit the axes and transforms). The version follows the Zarr format: Zarr v2 → NGFF 0.4,
Zarr v3 → NGFF 0.5 (what `smoothsal heatmaps --ngff` writes). Every image the container lists must
validate as an NGFF Image of that version, and so must any other group in it that carries NGFF
multiscales metadata; the root itself is a plain group (its images are its subgroups).
"""

from __future__ import annotations

from pathlib import Path

import zarr


def ngff_version(group: zarr.Group) -> str:
    return "0.4" if group.metadata.zarr_format == 2 else "0.5"


def _multiscales_groups(group: zarr.Group, prefix: str = "") -> list[str]:
    """Paths of every group below `group` whose attributes carry NGFF multiscales."""
    out = []
    for name, child in group.groups():
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
    return found
