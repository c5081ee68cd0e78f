"""Shared fixtures: where the real test data lives."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from helpers import CMU, CMU_PYRAMID, SYNTHETIC_MPP, SYNTHETIC_SIZE
from skimage.transform import downscale_local_mean

from smoothsal import slides, tissue

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SMOOTHSAL_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"test data not found at {SHARED_DATA}; set SMOOTHSAL_DATA to ../shared/data")
    return SHARED_DATA


@pytest.fixture(scope="session")
def slides_dir(data_dir: Path) -> Path:
    return data_dir / "slides"


@pytest.fixture(scope="session")
def tiles_dir(data_dir: Path) -> Path:
    return data_dir / "tiles"


@pytest.fixture(scope="session")
def annotations_dir(data_dir: Path) -> Path:
    return data_dir / "annotations"


@pytest.fixture(scope="session")
def cmu(slides_dir: Path):
    """The real CMU slide as an SVS and as a pyramidal TIFF, open for the session."""
    with slides.open_slide(slides_dir / CMU) as svs, slides.open_slide(slides_dir / CMU_PYRAMID) as tiff:
        yield svs, tiff


@pytest.fixture(scope="session")
def cmu_tissue(cmu):
    return tuple(tissue.find_tissue(s) for s in cmu)


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory) -> Path:
    """A 4-level tiled TIFF (downsamples exactly 1, 2, 4, 8) with resolution metadata (OpenSlide reads
    0.5 µm/px): noisy pink 'tissue' on the left three quarters, white glass on the right."""
    path = tmp_path_factory.mktemp("synthetic") / "synthetic.tiff"
    image = np.full((SYNTHETIC_SIZE, SYNTHETIC_SIZE, 3), 245, np.uint8)
    noise = np.random.default_rng(0).integers(-20, 21, (SYNTHETIC_SIZE, SYNTHETIC_SIZE * 3 // 4, 3))
    image[:, : SYNTHETIC_SIZE * 3 // 4] = np.array([200, 120, 170]) + noise  # textured, so resampling shows
    with tifffile.TiffWriter(path) as tif:
        for i in range(4):
            level = image if i == 0 else downscale_local_mean(image, (2**i, 2**i, 1)).astype(np.uint8)
            res = 1e4 / (SYNTHETIC_MPP * 2**i)
            tif.write(level, tile=(256, 256), photometric="rgb", compression="zlib", resolution=(res, res),
                      resolutionunit="CENTIMETER", subfiletype=int(i > 0), metadata=None)  # fmt: skip
    return path
