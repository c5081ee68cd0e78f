"""Deterministic synthetic H&E-like slides for the demo workflow and the tests.

Each slide is a tissue section on white glass: pink stroma with purple nuclei, and (on tumour slides)
tumour regions whose nuclei are larger, darker, denser and irregular while the stroma between them
keeps the same colour, so a model has to look at nuclei to tell tumour from normal tissue. Colours
come from a two-stain Beer–Lambert model (haematoxylin + eosin optical densities).

Written per slide: a pyramidal tiled TIFF at 0.5 µm/px that OpenSlide's generic-tiff reader opens
with `openslide.mpp-x/y`, its annotation (Camelyon16-style ASAP XML with tumour polygons, or a
Digipath-style QuPath GeoJSON with Tumor and Stroma polygons) and `{slide}_nuclei.png`, the
ground-truth nucleus mask at level 0 (1 bit per pixel) for checking where saliency lands.
Everything follows from (seed, size, slide name): the same arguments give the same bytes.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw
from skimage.filters import gaussian
from skimage.measure import points_in_poly
from skimage.transform import resize

from .errors import BadOption, MissingInput
from .files import atomic_path

__all__ = [
    "DEMO_SLIDES",
    "MPP",
    "DemoSettings",
    "Layout",
    "Nuclei",
    "SlideSpec",
    "Style",
    "asap_xml",
    "make_demo_data",
    "make_slide",
    "plan_layout",
    "qupath_geojson",
    "read_nuclei_mask",
    "render_slide",
    "select_slides",
    "slide_paths",
    "write_pyramid_tiff",
]

MPP = 0.5  # µm/px at level 0
DEFAULT_SIZE = 3072  # level-0 px per side: 1.5 mm of tissue section, ~60 tiles of 128 µm per slide
TIFF_TILE = 256  # px per TIFF tile (every level)
MIN_LEVEL_SIDE = 512  # halve the image for further pyramid levels while the side stays ≥ this
NUCLEUS_THRESHOLD = 0.3  # haematoxylin above this = nucleus pixel (half the faintest nucleus)


@dataclass(frozen=True)
class SlideSpec:
    """One demo slide: where it goes, how many tumour regions it has, its annotation format."""

    dataset: str  # sub-folder: "camelyon16" (ASAP XML) or "digipath" (GeoJSON, Tumor + Stroma)
    name: str
    tumours: int  # tumour regions (0 = normal slide)
    split: str  # "train" or "eval" (recorded in the sample sheets; not used here)

    @property
    def annotation_suffix(self) -> str:
        return ".geojson" if self.dataset == "digipath" else ".xml"


DEMO_SLIDES: tuple[SlideSpec, ...] = (
    SlideSpec("camelyon16", "tumor_001", 2, "train"),
    SlideSpec("camelyon16", "tumor_002", 1, "train"),
    SlideSpec("camelyon16", "normal_001", 0, "train"),
    SlideSpec("camelyon16", "normal_002", 0, "train"),
    SlideSpec("camelyon16", "test_001", 2, "eval"),
    SlideSpec("camelyon16", "test_002", 0, "eval"),
    SlideSpec("digipath", "digi_001", 2, "train"),
    SlideSpec("digipath", "digi_002", 1, "train"),
    SlideSpec("digipath", "digi_003", 2, "eval"),
)


@dataclass(frozen=True)
class Style:
    """How the tissue looks; lengths in µm, densities in nuclei per 1000 µm²."""

    haematoxylin: tuple[float, float, float] = (0.56, 0.78, 0.29)  # OD per unit stain (purple)
    eosin: tuple[float, float, float] = (0.13, 0.86, 0.47)  # OD per unit stain (pink)
    glass: tuple[int, int, int] = (242, 242, 244)
    stroma_eosin: float = 0.62  # eosin in stroma (the same on normal and tumour slides)
    fibre_contrast: float = 0.35  # relative eosin variation along the collagen fibres
    normal_radius: tuple[float, float] = (2.2, 3.2)  # nucleus radius range
    tumour_radius: tuple[float, float] = (3.8, 6.0)
    normal_density: float = 3.5  # modulated ×0.5–1.5 over the slide
    tumour_density: float = 6.0
    normal_stain: tuple[float, float] = (0.75, 1.0)  # haematoxylin in a nucleus
    tumour_stain: tuple[float, float] = (1.25, 1.6)
    normal_irregularity: float = 0.04  # amplitude of the boundary's harmonics (× radius)
    tumour_irregularity: float = 0.12
    normal_elongation: tuple[float, float] = (1.0, 1.8)  # long/short axis
    tumour_elongation: tuple[float, float] = (1.0, 1.5)
    background_haematoxylin: float = 0.06  # counterstain in stroma


# --- geometry ------------------------------------------------------------------------------------


def _rng(seed: int, name: str, what: str) -> np.random.Generator:
    """A generator per (seed, slide, purpose): stable across runs and Python versions."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), zlib.crc32(what.encode())])


def star_polygon(
    rng: np.random.Generator, centre: tuple[float, float], radius: float, wobble: float, n: int = 160
) -> np.ndarray:
    """A smooth random blob: vertices (n, 2) of r(θ) = radius·(1 + Σ_k a_k cos(kθ + φ_k)), k = 2..6."""
    theta = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    k = np.arange(2, 7)[:, None]
    amps = rng.uniform(0.3, 1.0, (5, 1)) * wobble / k
    r = radius * (1 + (amps * np.cos(k * theta + rng.uniform(0, 2 * np.pi, (5, 1)))).sum(0))
    return np.stack([centre[0] + r * np.cos(theta), centre[1] + r * np.sin(theta)], axis=1)


@dataclass(frozen=True, eq=False)
class Layout:
    """A slide's regions in level-0 px (x, y): the tissue outline and the tumour outlines in it."""

    size: int
    tissue: np.ndarray  # (N, 2)
    tumours: tuple[np.ndarray, ...]


def plan_layout(spec: SlideSpec, size: int, seed: int) -> Layout:
    """Tissue blob filling ~45% of the square; tumour blobs inside it that do not touch each other."""
    rng = _rng(seed, spec.name, "layout")
    centre = tuple(size / 2 + rng.uniform(-0.03, 0.03, 2) * size)
    tissue = star_polygon(rng, centre, 0.37 * size, 0.35)
    tumours: list[np.ndarray] = []
    radius = 0.24 * size if spec.tumours == 1 else 0.18 * size
    for _ in range(10_000):
        if len(tumours) == spec.tumours:
            break
        c = np.asarray(centre) + rng.uniform(-0.25, 0.25, 2) * size
        blob = star_polygon(rng, tuple(c), radius * rng.uniform(0.85, 1.1), 0.5, n=120)
        inside = points_in_poly(blob, tissue).all()
        apart = all(
            not points_in_poly(blob, other).any() and not points_in_poly(other, blob).any()
            for other in tumours
        )
        if inside and apart:
            tumours.append(blob)
    if len(tumours) < spec.tumours:
        raise BadOption(
            f"could not place {spec.tumours} tumour regions on {spec.name} at --size {size}; "
            "give a larger --size or another --seed"
        )
    return Layout(size, tissue, tuple(tumours))


def rasterise(polygons: Sequence[np.ndarray], shape: tuple[int, int], scale: float = 1.0) -> np.ndarray:
    """Boolean mask of the union of polygons (level-0 px), on a grid of `scale` px per level-0 px."""
    canvas = Image.new("1", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for p in polygons:  # PIL puts pixel centres at integers; level-0 pixel i spans [i, i + 1)
        draw.polygon([(float(x), float(y)) for x, y in p * scale - 0.5], fill=1)
    return np.asarray(canvas, dtype=bool)


# --- rendering ------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Nuclei:
    """Nucleus parameters (one entry per nucleus), level-0 px."""

    x: np.ndarray
    y: np.ndarray
    radius: np.ndarray
    elongation: np.ndarray
    angle: np.ndarray
    stain: np.ndarray
    irregularity: np.ndarray
    tumour: np.ndarray  # bool


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian noise blurred by `sigma` px (made at a coarser grid when sigma is large)."""
    step = max(1, int(sigma // 4))
    small = (math.ceil(shape[0] / step), math.ceil(shape[1] / step))
    field = gaussian(rng.standard_normal(small).astype(np.float32), sigma / step, preserve_range=True)
    if step > 1:
        field = resize(field, shape, order=1, preserve_range=True, anti_aliasing=False)
    field = field.astype(np.float32)
    return (field - field.mean()) / (field.std() + 1e-8)


def place_nuclei(layout: Layout, spec: SlideSpec, seed: int, style: Style) -> Nuclei:
    """Poisson-scattered nuclei: normal ones over the tissue (density varying smoothly), tumour ones
    (larger, darker, denser, irregular) inside the tumour regions."""
    rng = _rng(seed, spec.name, "nuclei")
    size, px_um2 = layout.size, MPP * MPP
    coarse = 64  # density map grid
    scale = coarse / size
    tissue = rasterise([layout.tissue], (coarse, coarse), scale)
    tumour = rasterise(layout.tumours, (coarse, coarse), scale)
    modulation = 1.0 + 0.5 * np.tanh(_smooth_noise(rng, (coarse, coarse), 6.0))
    density = np.where(tumour, style.tumour_density, style.normal_density * modulation) * tissue
    peak = float(density.max())
    n = rng.poisson(peak / 1000 * size * size * px_um2)
    x, y = rng.uniform(0, size, n), rng.uniform(0, size, n)
    cell = np.minimum((np.stack([y, x]) * scale).astype(int), coarse - 1)
    keep = rng.uniform(0, peak, n) < density[cell[0], cell[1]]
    x, y = x[keep], y[keep]
    inside = points_in_poly(np.stack([x, y], 1), layout.tissue)
    x, y = x[inside], y[inside]
    is_tumour = np.zeros(len(x), bool)
    for t in layout.tumours:
        is_tumour |= points_in_poly(np.stack([x, y], 1), t)
    m = len(x)

    def pick(normal: tuple[float, float], tumour: tuple[float, float]) -> np.ndarray:
        return np.where(is_tumour, rng.uniform(*tumour, m), rng.uniform(*normal, m))

    radius = pick(style.normal_radius, style.tumour_radius) / MPP
    elongation = pick(style.normal_elongation, style.tumour_elongation)
    stain = pick(style.normal_stain, style.tumour_stain)
    irregularity = np.where(is_tumour, style.tumour_irregularity, style.normal_irregularity)
    angle = rng.uniform(0, np.pi, m)
    return Nuclei(x, y, radius, elongation, angle, stain, irregularity, is_tumour)


def draw_nuclei(nuclei: Nuclei, shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin concentration (float32) and nucleus mask (bool) of all nuclei on a level-0 grid.

    Each nucleus is an ellipse with a wavy boundary (harmonics 2–4 of random phase) and a 1 px soft
    edge; overlapping nuclei take the darker value.
    """
    conc = np.zeros(shape, np.float32)
    rng = np.random.default_rng([seed, 7])
    harmonics = np.arange(2, 5)[:, None, None]
    for i in range(len(nuclei.x)):
        cx, cy, r, e = nuclei.x[i], nuclei.y[i], nuclei.radius[i], nuclei.elongation[i]
        a, b = r * math.sqrt(e), r / math.sqrt(e)  # same area as a circle of radius r
        reach = a * (1 + 3 * nuclei.irregularity[i]) + 2
        x0, x1 = max(0, int(cx - reach)), min(shape[1], int(cx + reach) + 2)
        y0, y1 = max(0, int(cy - reach)), min(shape[0], int(cy + reach) + 2)
        if x1 <= x0 or y1 <= y0:
            continue
        dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dx, dy = dx + 0.5 - cx, dy + 0.5 - cy
        c, s = math.cos(nuclei.angle[i]), math.sin(nuclei.angle[i])
        u, v = c * dx + s * dy, -s * dx + c * dy
        rho = np.hypot(u / a, v / b)
        theta = np.arctan2(v / b, u / a)
        amps = rng.uniform(0.4, 1.0, (3, 1, 1)) * nuclei.irregularity[i]
        phases = rng.uniform(0, 2 * np.pi, (3, 1, 1))
        boundary = 1 + (amps * np.cos(harmonics * theta + phases)).sum(0)
        edge = np.clip((boundary - rho) * b + 0.5, 0.0, 1.0)  # ~1 px ramp at the boundary
        region = conc[y0:y1, x0:x1]
        np.maximum(region, nuclei.stain[i] * edge, out=region)
    return conc, conc > NUCLEUS_THRESHOLD


def render_slide(
    spec: SlideSpec, size: int, seed: int = 0, style: Style = Style()
) -> tuple[np.ndarray, np.ndarray, Layout]:
    """Level-0 RGB uint8 (size, size, 3), nucleus mask (bool) and region layout of one demo slide."""
    layout = plan_layout(spec, size, seed)
    rng = _rng(seed, spec.name, "texture")
    shape = (size, size)
    tissue = gaussian(rasterise([layout.tissue], shape).astype(np.float32), 2.0, preserve_range=True)
    nuclei = place_nuclei(layout, spec, seed, style)
    haem, nucleus_mask = draw_nuclei(nuclei, shape, seed)
    chromatin = 1 + 0.18 * _smooth_noise(rng, shape, 0.8)
    fibres = _smooth_noise(rng, shape, 3.0) * 0.6 + _smooth_noise(rng, shape, 12.0) * 0.4
    eosin = style.stroma_eosin * (1 + style.fibre_contrast * fibres) * tissue
    haem = (haem * chromatin + style.background_haematoxylin * tissue).clip(0, None)
    eosin = eosin.clip(0, None) * (1 - 0.6 * np.minimum(haem, 1.0))  # nuclei displace cytoplasm
    od = haem[..., None] * np.asarray(style.haematoxylin, np.float32) + eosin[..., None] * np.asarray(
        style.eosin, np.float32
    )
    glass = np.asarray(style.glass, np.float32) + rng.normal(0, 1.5, (*shape, 1)).astype(np.float32)
    rgb = glass * np.exp(-od)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8), nucleus_mask, layout


# --- files ----------------------------------------------------------------------------------------


def pyramid(rgb: np.ndarray, min_side: int = MIN_LEVEL_SIDE) -> list[np.ndarray]:
    """Level 0 and its ×2 reductions (2×2 means) while both sides stay even and ≥ 2·`min_side`."""
    levels = [rgb]
    while all(s % 2 == 0 and s >= 2 * min_side for s in levels[-1].shape[:2]):
        h, w = levels[-1].shape[:2]
        blocks = levels[-1].reshape(h // 2, 2, w // 2, 2, 3).astype(np.float32)
        levels.append((blocks.mean(axis=(1, 3)) + 0.5).astype(np.uint8))
    return levels


def write_pyramid_tiff(path: str | Path, rgb: np.ndarray, mpp: float = MPP) -> None:
    """A generic tiled pyramidal TIFF OpenSlide reads, with µm/px: one page per level (reduced pages
    marked as such), 256 px deflate tiles, resolution in pixels per centimetre. Written atomically."""
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tif:
        for i, level in enumerate(pyramid(rgb)):
            px_per_cm = 1e4 / (mpp * 2**i)
            tif.write(
                level,
                photometric="rgb",
                tile=(TIFF_TILE, TIFF_TILE),
                compression="zlib",
                predictor=True,
                subfiletype=1 if i else 0,
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                description=f"smoothsal demo slide, level {i}, {mpp * 2**i} um/px" if i == 0 else None,
                metadata=None,
                software="smoothsal",
            )


def _round_vertices(vertices: np.ndarray) -> list[list[float]]:
    return np.round(vertices, 1).tolist()


def asap_xml(tumours: Sequence[np.ndarray]) -> str:
    """Camelyon16-style ASAP XML: tumour polygons in group `_0` (none on a normal slide)."""
    lines = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "\t<Annotations>"]
    for i, polygon in enumerate(tumours):
        lines += [
            f'\t\t<Annotation Name="Annotation {i}" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">',
            "\t\t\t<Coordinates>",
            *(
                f'\t\t\t\t<Coordinate Order="{k}" X="{x:g}" Y="{y:g}" />'
                for k, (x, y) in enumerate(_round_vertices(polygon))
            ),
            "\t\t\t</Coordinates>",
            "\t\t</Annotation>",
        ]
    lines += ["\t</Annotations>", "\t<AnnotationGroups>"]
    for group, colour in (("_0", "#ff0000"), ("_1", "#ff0000"), ("_2", "#00ff00")):
        lines += [f'\t\t<Group Name="{group}" PartOfGroup="None" Color="{colour}">', "\t\t\t<Attributes />"]
        lines += ["\t\t</Group>"]
    return "\n".join([*lines, "\t</AnnotationGroups>", "</ASAP_Annotations>", ""])


def _ring(vertices: np.ndarray) -> list[list[float]]:
    ring = _round_vertices(vertices)
    return [*ring, ring[0]]  # GeoJSON rings are closed


def qupath_geojson(layout: Layout) -> str:
    """QuPath-style GeoJSON: one Stroma polygon (the tissue, tumours cut out as holes) and one Tumor
    polygon per tumour region."""

    def feature(i: int, name: str, colour: list[int], rings: list[list[list[float]]]) -> dict:
        return {
            "type": "Feature",
            "id": f"demo-{i}",
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": colour}},
        }

    stroma = feature(0, "Stroma", [150, 200, 150], [_ring(layout.tissue), *map(_ring, layout.tumours)])
    tumours = [feature(i + 1, "Tumor", [200, 0, 0], [_ring(t)]) for i, t in enumerate(layout.tumours)]
    return json.dumps({"type": "FeatureCollection", "features": [stroma, *tumours]}, indent=1) + "\n"


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_nuclei_mask(path: Path, mask: np.ndarray) -> None:
    """The level-0 nucleus mask as a 1-bit PNG (small: one bit per pixel, compressed)."""
    with atomic_path(path) as tmp:
        Image.fromarray(mask).save(tmp, format="PNG", optimize=False)


def read_nuclei_mask(slide_path: str | Path) -> np.ndarray:
    """The ground-truth nucleus mask (bool, level-0 px) written beside a demo slide."""
    path = nuclei_mask_path(slide_path)
    if not path.is_file():
        raise MissingInput(f"{path}: no nucleus mask; regenerate the demo with `smoothsal demo-data`")
    return np.asarray(Image.open(path).convert("1"), dtype=bool)


def nuclei_mask_path(slide_path: str | Path) -> Path:
    slide_path = Path(slide_path)
    return slide_path.with_name(f"{slide_path.stem}_nuclei.png")


@dataclass(frozen=True)
class DemoSettings:
    """What `smoothsal demo-data` makes: every slide follows from (seed, size, its name)."""

    size: int = DEFAULT_SIZE  # level-0 px per side (0.5 µm/px)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size < MIN_LEVEL_SIDE or self.size % TIFF_TILE:
            raise BadOption(
                f"--size must be a multiple of {TIFF_TILE} px and at least {MIN_LEVEL_SIDE}, got {self.size}"
            )


def slide_paths(out: str | Path, spec: SlideSpec) -> tuple[Path, Path, Path]:
    """(slide .tif, annotation, nucleus mask) of one demo slide under `out`."""
    base = Path(out) / spec.dataset / spec.name
    return (
        base.with_suffix(".tif"),
        base.with_suffix(spec.annotation_suffix),
        nuclei_mask_path(base.with_suffix(".tif")),
    )


def make_slide(out: str | Path, spec: SlideSpec, settings: DemoSettings = DemoSettings()) -> tuple[Path, ...]:
    """Render and write one demo slide with its annotation and nucleus mask (annotation and mask first,
    so the slide's presence marks a finished set)."""
    slide, annotation, nuclei = slide_paths(out, spec)
    rgb, mask, layout = render_slide(spec, settings.size, settings.seed)
    text = qupath_geojson(layout) if spec.dataset == "digipath" else asap_xml(layout.tumours)
    _write_text(annotation, text)
    write_nuclei_mask(nuclei, mask)
    write_pyramid_tiff(slide, rgb)
    return slide, annotation, nuclei


def select_slides(names: Sequence[str] | None) -> tuple[SlideSpec, ...]:
    """The demo slides with these names (all of them for None), in the standard order."""
    if not names:
        return DEMO_SLIDES
    known = {s.name for s in DEMO_SLIDES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BadOption(f"unknown demo slides {unknown}; choose from {', '.join(sorted(known))}")
    return tuple(s for s in DEMO_SLIDES if s.name in set(names))


def make_demo_data(
    out: str | Path,
    settings: DemoSettings = DemoSettings(),
    slides: Sequence[SlideSpec] = DEMO_SLIDES,
    progress: bool = False,
    processes: int = 1,
) -> list[Path]:
    """Write every demo slide under `out` (`{dataset}/{name}.tif` + annotation + `_nuclei.png`);
    ``processes`` > 1 renders slides side by side (the same bytes: each slide is its own seed)."""
    from tqdm import tqdm

    if processes < 1:
        raise BadOption(f"--processes must be >= 1, got {processes}")
    work = partial(make_slide, out, settings=settings)
    bar = partial(tqdm, total=len(slides), desc="demo slides", unit="slide", disable=not progress)
    if processes == 1 or len(slides) < 2:
        made = [work(spec) for spec in bar(slides)]
    else:
        with ProcessPoolExecutor(min(processes, len(slides))) as pool:
            made = list(bar(pool.map(work, slides)))
    return [path for files in made for path in files]
