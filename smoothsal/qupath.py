"""Heatmaps for QuPath: hot-spot polygons as GeoJSON objects, and the map as a pyramidal OME-TIFF.

`export` (the `smoothsal export` command) writes, for one heatmap of a container:

1. GeoJSON (a FeatureCollection, RFC 7946 layout, QuPath's object properties): one polygon per connected
   region whose values reach a threshold, for each threshold. The thresholds are percentiles (default
   the 95th and 99th) of the map's values over tissue, i.e. over its defined pixels (the tiles of
   `smoothsal tiles`, which were selected on tissue). Coordinates are the slide's level-0 pixels, which
   is what QuPath's File > Import objects expects. Each feature carries
   ``classification`` {name "smoothsal p95", colour} per threshold and ``measurements``: mean and max
   attribution over the region's pixels, its area in µm², its pixel count, the threshold (the property
   names QuPath ≥ 0.4 reads: objectType, name, classification, isLocked, measurements, metadata).
2. optionally the map itself as a pyramidal OME-TIFF (`heatmaps.export_ome_tiff`): physical pixel size
   in µm, so its extent equals the slide's (within one map pixel).

Polygon method: the regions are 4-connected components of ``value >= threshold`` (skimage's `label`); each
is outlined by marching squares (`skimage.measure.find_contours` at 0.5 on the component's 0/1 mask,
padded, so every outline closes). The outline runs along pixel edges with each corner cut diagonally
by half a pixel (area = pixel count − ½ per ring's outside, + ½ per hole); the largest ring is the
exterior, the others its holes (shapely), collinear vertices are dropped, then pixel indices go through
the level's NGFF scale and translation (µm, pixel centres) and the slide's µm/px to level-0 pixels, and
are clipped to the slide. Vectorisation uses the finest pyramid level with at most `max_pixels` pixels
(level 0 unless the map is very large), so memory stays bounded; the level used is recorded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .container import Container, ImageInfo, Level, open_container
from .errors import BadOption, BadOutput, BadStore
from .files import atomic_path, check_file_out
from .heatmaps import export_ome_tiff

__all__ = ["CLASS_COLOURS", "ExportSettings", "ExportSummary", "export", "hot_spots"]

# QuPath classification colours (RGB), one per threshold in order; the last repeats
CLASS_COLOURS = ((255, 170, 0), (220, 20, 60), (150, 0, 90))


@dataclass(frozen=True)
class ExportSettings:
    """How hot spots are found."""

    percentiles: tuple[float, ...] = (95.0, 99.0)  # of the values over tissue (the defined pixels)
    min_pixels: int = 4  # regions smaller than this (map pixels at the level used) are left out
    max_pixels: int = 32_000_000  # vectorise the finest pyramid level with at most this many pixels
    object_type: str = "annotation"  # QuPath object type: annotation (editable) or detection

    def __post_init__(self) -> None:
        if not self.percentiles or any(not 0 <= p < 100 for p in self.percentiles):
            raise BadOption(f"--percentiles must lie in [0, 100), got {list(self.percentiles)}")
        if self.min_pixels < 1:
            raise BadOption(f"--min-pixels must be >= 1, got {self.min_pixels}")
        if self.max_pixels < 1:
            raise BadOption(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.object_type not in ("annotation", "detection"):
            raise BadOption(f"--object-type must be annotation or detection, got {self.object_type!r}")


@dataclass(frozen=True)
class ExportSummary:
    geojson: Path
    image: str
    level: int  # pyramid level vectorised
    thresholds: dict[str, float]  # class name → threshold value
    regions: dict[str, int]  # class name → number of polygons
    ome_tiff: Path | None


def _find_image(c: Container, image: str) -> ImageInfo:
    """A heatmap by its container path (heatmaps/M/A/L) or by its napari name (M/A/L)."""
    for im in c.images:
        if im.kind != "tissue" and image in (im.path, f"{im.method}/{im.attribution}/{im.layer}"):
            return im
    names = ", ".join(f"{im.method}/{im.attribution}/{im.layer}" for im in c.images if im.kind != "tissue")
    raise BadOption(f"{c.path}: no heatmap {image!r}; choose one of {names}")


def _level(im: ImageInfo, max_pixels: int) -> int:
    for k, lv in enumerate(im.levels):
        if lv.shape[0] * lv.shape[1] <= max_pixels:
            return k
    return len(im.levels) - 1


def _polygon(mask: np.ndarray, row0: int, col0: int) -> Any:
    """The outline of one 4-connected component (bool crop at row0, col0) in pixel-index (x, y) coords."""
    import shapely
    from skimage.measure import find_contours

    rings = [
        shapely.Polygon(np.column_stack([c[:, 1] + col0 - 1, c[:, 0] + row0 - 1]))
        for c in find_contours(np.pad(mask, 1).astype(np.float32), 0.5)
        if len(c) >= 4
    ]
    rings.sort(key=lambda p: p.area, reverse=True)
    polygon = shapely.Polygon(rings[0].exterior, [r.exterior for r in rings[1:]])
    return shapely.simplify(polygon, 0.0)


def _to_level0(polygon: Any, level: Level, mpp: float) -> Any:
    """Pixel-index coordinates (pixel centres at integers) → slide level-0 px via the NGFF transforms."""
    from shapely import affinity

    (sy, sx), (ty, tx) = level.scale, level.translation
    return affinity.affine_transform(polygon, [sx / mpp, 0.0, 0.0, sy / mpp, tx / mpp, ty / mpp])


def hot_spots(
    container: str | Path, image: str, settings: ExportSettings = ExportSettings()
) -> tuple[dict[str, Any], ExportSummary]:
    """The GeoJSON FeatureCollection of one heatmap's hot spots, and what it holds."""
    import shapely
    from shapely.geometry import mapping
    from shapely.geometry.polygon import orient
    from skimage.measure import label, regionprops

    c = open_container(container)
    im = _find_image(c, image)
    mpp, size = c.meta.get("slide_mpp"), c.meta.get("slide_size_px")
    if not mpp or not size:
        raise BadStore(
            f"{c.path}: no slide_mpp / slide_size_px in its metadata; rewrite it with `smoothsal heatmaps`"
        )
    k = _level(im, settings.max_pixels)
    h, w = im.levels[k].shape
    values = c.region(im.index, k, slice(0, h), slice(0, w)).astype(np.float32)
    finite = np.isfinite(values)
    if not finite.any():
        raise BadStore(f"{c.path}: heatmap {im.path} has no defined values; nothing to export")
    thresholds = np.percentile(values[finite], settings.percentiles)
    slide = shapely.box(0.0, 0.0, float(size[0]), float(size[1]))
    name = f"{im.method}/{im.attribution}/{im.layer}"
    features, counts, classes = [], {}, {}
    for i, (pct, t) in enumerate(zip(settings.percentiles, thresholds.tolist(), strict=True)):
        cls = f"smoothsal p{pct:g}"
        colour = list(CLASS_COLOURS[min(i, len(CLASS_COLOURS) - 1)])
        classes[cls], counts[cls] = float(t), 0
        labels = label(finite & (values >= t), connectivity=1)
        for region in regionprops(labels, intensity_image=np.where(finite, values, 0.0)):
            if region.area < settings.min_pixels:
                continue
            r0, c0 = region.bbox[:2]
            geometry = _to_level0(_polygon(region.image, r0, c0), im.levels[k], float(mpp)).intersection(
                slide
            )
            if geometry.is_empty:
                continue
            counts[cls] += 1
            features.append({
                "type": "Feature",
                "geometry": mapping(orient(geometry) if geometry.geom_type == "Polygon" else geometry),
                "properties": {
                    "objectType": settings.object_type,
                    "name": f"{name} >= p{pct:g}",
                    "classification": {"name": cls, "color": colour},
                    "isLocked": False,
                    "metadata": {"smoothsal image": im.path, "smoothsal percentile": f"{pct:g}"},
                    "measurements": {
                        "Mean attribution": float(region.intensity_mean),
                        "Max attribution": float(region.intensity_max),
                        "Area µm^2": float(geometry.area * float(mpp) ** 2),
                        "Pixels": int(region.area),
                        "Threshold": float(t),
                    },
                },
            })  # fmt: skip
    collection = {
        "type": "FeatureCollection",
        "features": features,
        "smoothsal": {  # a foreign member (RFC 7946 §6.1): where the objects came from
            "container": str(c.path), "image": im.path, "level": k, "pixel_size_um": list(im.levels[k].scale),
            "slide_mpp": float(mpp), "slide_size_px": list(size), "thresholds": classes,
            "settings": asdict(settings),
        },
    }  # fmt: skip
    summary = ExportSummary(Path(), im.path, k, classes, counts, None)
    return collection, summary


def _ours(path: Path) -> bool:
    """Whether an existing file is an earlier output of `export` (GeoJSON from here, OME-TIFF from
    `heatmaps.export_ome_tiff`): only those are replaced."""
    import tifffile

    try:
        if path.suffix.lower() in (".geojson", ".json"):
            return "smoothsal" in json.loads(path.read_text())
        with tifffile.TiffFile(path) as tif:
            name = (
                tifffile.xml2dict(tif.ome_metadata or "<OME/>")
                .get("OME", {})
                .get("Image", {})
                .get("Name", "")
            )
        return str(name) == "tissue" or str(name).startswith("heatmaps/")
    except (OSError, ValueError, AttributeError, tifffile.TiffFileError):
        return False


def _check_replaceable(*paths: str | Path | None) -> None:
    for path in (Path(p) for p in paths if p is not None):
        if path.exists() and not (path.is_file() and _ours(path)):
            raise BadOutput(
                f"{path} exists and is not an earlier `smoothsal export` output; give another path"
            )


def export(
    container: str | Path,
    image: str,
    out_geojson: str | Path,
    settings: ExportSettings = ExportSettings(),
    ome_tiff: str | Path | None = None,
) -> ExportSummary:
    """Write the hot-spot GeoJSON of `image` (and its OME-TIFF when `ome_tiff` is given), atomically."""
    out_geojson = Path(out_geojson)
    check_file_out(out_geojson)
    check_file_out(ome_tiff, option="--ome-tiff")
    _check_replaceable(out_geojson, ome_tiff)
    collection, summary = hot_spots(container, image, settings)
    with atomic_path(out_geojson) as tmp:
        Path(tmp).write_text(json.dumps(collection, allow_nan=False))
    if ome_tiff is not None:
        export_ome_tiff(container, summary.image, ome_tiff)
    return ExportSummary(
        out_geojson, summary.image, summary.level, summary.thresholds, summary.regions,
        None if ome_tiff is None else Path(ome_tiff),
    )  # fmt: skip
