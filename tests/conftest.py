"""Shared fixtures: where the real test data lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
