"""Shared fixtures: where the real test data lives, the real slides opened once, and the command line
(run one way: the `cli` fixture)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

# `pytest -n 2` on two cores runs two workers, each with torch's two OpenMP threads, beside the Snakemake runs
# the tests start. OpenMP threads that spin while they wait then burn the cores the others need: test_attribution
# plus test_families took 337 s (user 633 s) with spinning threads, 186 s (user 284 s) with sleeping ones (AMD
# EPYC, 2 cores). Set before torch loads; every subprocess inherits it. (Snakemake jobs get OMP_NUM_THREADS =
# their threads, so the workflow itself never oversubscribes.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if "torch" in sys.modules:  # too late for this process (its subprocesses still get it): say so
    warnings.warn(
        "torch was imported before tests/conftest.py set OMP_WAIT_POLICY", RuntimeWarning, stacklevel=1
    )

import numpy as np
import pytest
import tifffile
from helpers import (
    CMU,
    CMU_PYRAMID,
    DEMO_SIZE,
    DEMO_SLIDES,
    SURROGATE_TILES,
    SYNTHETIC_MPP,
    SYNTHETIC_SIZE,
    crops,
    demo_data,
    spec,
    tile,
    train_args,
)
from skimage.transform import downscale_local_mean

from smoothsal import demo, slides, tissue

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


# --- the command line, run one way ----------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """What one `smoothsal` command did: exit status, stdout, stderr."""

    code: int
    out: str
    err: str


class Cli:
    """`cli("tiles", slide, "--out", table)` runs `smoothsal tiles …` in this process (``expect``: the exit
    status it must give, None: any) and returns what it printed. ``process`` and ``popen`` run it as a
    real process, for what needs one: a SIGKILL (``kill_at`` sets SMOOTHSAL_KILL_AT), torchrun
    (``nproc``), a server, several commands at once."""

    def __call__(self, *args: object, expect: int | None = 0) -> Run:
        from smoothsal.cli import main

        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main([str(a) for a in args])
        run = Run(code, out.getvalue(), err.getvalue())
        assert expect is None or code == expect, f"exit {code}, expected {expect}: {run.err[-2000:]}"
        return run

    def command(self, *args: object, nproc: int | None = None) -> list[str]:
        launch = [sys.executable, "-m", "smoothsal.cli"]
        if nproc is not None:
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                      str(nproc), "-m", "smoothsal.cli"]  # fmt: skip
        return [*launch, *map(str, args)]

    def env(self, kill_at: str = "") -> dict[str, str]:
        """This checkout's smoothsal in the child, and its kill switch (empty: none)."""
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
        return dict(os.environ, PYTHONPATH=path, SMOOTHSAL_KILL_AT=kill_at, PYTHONFAULTHANDLER="1")

    def process(
        self, *args: object, kill_at: str = "", nproc: int | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command(*args, nproc=nproc), check=False, capture_output=True, text=True, timeout=timeout,
            env=self.env(kill_at),
        )  # fmt: skip

    def popen(self, *args: object, kill_at: str = "", **kwargs: object) -> subprocess.Popen:
        """A running command; Ctrl-C (SIGINT) reaches it whatever this process blocks or ignores."""
        kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True} | kwargs
        env = self.env(kill_at)
        return subprocess.Popen(self.command(*args), env=env, preexec_fn=_sigint_default, **kwargs)  # noqa: PLW1509 (no threads fork here)


def _sigint_default() -> None:
    """In a child before exec: SIGINT unblocked and default, so Python there turns it into Ctrl-C (a
    signal mask or an ignored SIGINT of the test process, e.g. under pytest-xdist, is inherited)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli()


# --- the surrogate runs that test_surrogate, test_surrogate_run, test_evaluation, test_compare share ---


@pytest.fixture(scope="session")
def surrogate_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("surrogate")


@pytest.fixture(scope="session")
def surrogate_tiles(slides_dir: Path, surrogate_dir: Path) -> Path:
    """32 labelled 64-px tiles of a real slide; "tumour" = a polygon over its left half."""
    import json

    from smoothsal.annotations import read_annotations
    from smoothsal.grid import TileGridSettings
    from smoothsal.tiles import write_tile_table
    from smoothsal.tiling import tile_slide

    annotation = surrogate_dir / "left-half.geojson"
    polygon = [[0, 0], [1100, 0], [1100, 2967], [0, 2967], [0, 0]]
    feature = {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
               "geometry": {"type": "Polygon", "coordinates": [polygon]}}  # fmt: skip
    annotation.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    grid = TileGridSettings(tile_size=64, target_mpp=2.0, max_tiles=SURROGATE_TILES, seed=0)
    with slides.open_slide(slides_dir / CMU) as slide:
        tiling = tile_slide(slide, grid, annotations=read_annotations(annotation))
    assert len(tiling.table) == SURROGATE_TILES and set(tiling.table["label"].tolist()) == {0, 1}
    path = surrogate_dir / "tiles.parquet"
    write_tile_table(tiling.table, path)
    return path


@pytest.fixture(scope="session")
def surrogate_model(surrogate_dir: Path) -> Path:
    import torch
    import torchvision

    torch.manual_seed(0)
    path = surrogate_dir / "model.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=2).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def ddp_surrogate(cli: Cli, surrogate_tiles: Path, surrogate_model: Path, surrogate_dir: Path) -> Path:
    """An uninterrupted 2-process run (torchrun, gloo): the reference for the other tests."""
    out = surrogate_dir / "ddp" / "surrogate.pt"
    run = cli.process(*train_args(surrogate_tiles, surrogate_model, out), nproc=2, timeout=300)
    assert run.returncode == 0 and "2 process(es), stopped: converged" in run.stdout, run.stdout + run.stderr
    return out


# --- the demo slides at reduced size ---------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_dir(cli: Cli, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    demo_data(cli, out, "--size", str(DEMO_SIZE), "--slides", *DEMO_SLIDES, "--processes", "2")
    return out


@pytest.fixture(scope="session")
def demo_tiles(cli: Cli, demo_dir: Path) -> dict[str, Path]:
    """Tile tables of the three demo slides, made by `smoothsal tiles` with their annotations."""
    return {name: tile(cli, demo_dir, name) for name in DEMO_SLIDES}


# --- a classifier trained on the demo slides (test_precision, test_gpu) ---------------------------


@pytest.fixture(scope="session")
def trained(cli: Cli, demo_dir: Path, demo_tiles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """(model, surrogate, x): the demo test's classifier (ResNet18, 2 epochs on tumor_001 + normal_001,
    64-px tiles), a surrogate trained for it, and 4 crops of each slide."""
    import torch

    import smoothsal as ss
    from smoothsal.tiles import read_tile_table

    names = ("tumor_001", "normal_001")
    checkpoint = tmp_path_factory.mktemp("trained") / "model.pt"
    tables = [demo_tiles[n] for n in names]
    cli("train-model", "--arch", "resnet18", "--num-classes", "2", "--tiles", *tables, "--epochs", "2",
        "--batch-size", "16", "--out", checkpoint, "--no-progress")  # fmt: skip
    model = ss.load_model("resnet18", num_classes=2, checkpoint=checkpoint)
    x = []
    for name, table in zip(names, tables, strict=True):
        slide, _, _ = demo.slide_paths(demo_dir, spec(name))
        x.append(crops(slide, read_tile_table(table), 4))
    x = torch.cat(x)
    surrogate = ss.train_surrogate(model, [x[:4], x[4:]], epochs=2)
    return model, surrogate, x
