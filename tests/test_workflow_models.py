"""Issue 25: the workflow explains a user's own network — a `python:` model written in the test (a grouped
stride-2 conv, SiLU and a squeeze-excitation block) and a `timm:` model — through saliency, heatmaps and the
report; editing the model's file or its kwargs reruns the jobs that build it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd
import pytest
import zarr
from workflow_runs import (
    ATTRIBUTIONS,
    edit_config,
    planned_jobs,
    run_local,
    snakemake,
    tiny_config,
    write_config,
    write_sheet,
)

# its own run, in its own group: xdist puts it beside the "workflow" group, not after it
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("own-models")]

METHODS = ["original", "backward_hook"]
LAYERS = ["layer1", "layer2"]
TILES = {"tile_size": 64, "target_mpp": 1.0, "max_tiles": 3}

OWN_NET = textwrap.dedent(
    """
    from torch import nn


    class SqueezeExcite(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.reduce = nn.Conv2d(channels, channels // 4, 1)
            self.act = nn.SiLU()
            self.expand = nn.Conv2d(channels // 4, channels, 1)
            self.gate = nn.Sigmoid()

        def forward(self, x):
            return x * self.gate(self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True)))))


    def build(num_classes, width=8):
        return nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1, groups=2), nn.BatchNorm2d(2 * width), nn.SiLU(),
            SqueezeExcite(2 * width),
            nn.Conv2d(2 * width, 4 * width, 3, 2, 1), nn.BatchNorm2d(4 * width), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes),
        )
    """
)


@pytest.fixture(scope="module")
def own_models_run(tmp_path_factory, slides_dir: Path) -> Path:
    """One run with two datasets on the real CMU slides: `own` (python: models/net.py:build, width 8) and `tm`
    (timm:tf_efficientnet_b0, whose convs pad dynamically), random weights, the original and the backward hook."""
    workdir = tmp_path_factory.mktemp("own-models")
    (workdir / "models").mkdir()
    (workdir / "models" / "net.py").write_text(OWN_NET)
    rows = [{"slide_id": "cmu", "path": str(slides_dir / "CMU-1-Small-Region.svs"), "split": "eval"}]
    write_sheet(workdir / "sheets" / "cmu.tsv", rows)
    datasets = {
        "own": {
            "slides": "sheets/cmu.tsv",
            "model": {"arch": "python:models/net.py:build", "num_classes": 2, "kwargs": {"width": 8}},
            "tiles": TILES,
        },
        "tm": {
            "slides": "sheets/cmu.tsv",
            "model": {"arch": "timm:tf_efficientnet_b0", "num_classes": 2},
            "tiles": TILES,
        },
    }
    config = tiny_config(datasets, methods=METHODS, layers=LAYERS, faithfulness={"enabled": False})
    write_config(workdir, config)
    run_local(workdir)
    return workdir


def test_a_python_and_a_timm_model_run_through_saliency_heatmaps_and_the_report(own_models_run: Path) -> None:
    results = own_models_run / "results"
    for dataset, arch in (("own", "python:models/net.py:build"), ("tm", "timm:tf_efficientnet_b0")):
        for method in METHODS:
            stem = results / dataset / "saliency" / "cmu" / method
            table = pd.read_parquet(stem.with_suffix(".parquet"))
            tv = table[[f"tv/{a}/{layer}" for a in ATTRIBUTIONS for layer in LAYERS]].to_numpy()
            # gradient at layer1 varies; at the own net's layer2, just before global pooling, it is constant (TV 0)
            assert len(table) == 3 and (tv >= 0).all() and (tv[:, 0] > 0).all(), (dataset, method)
            settings = zarr.open_group(stem.with_suffix(".zarr"), mode="r").attrs["smoothsal"]["settings"]
            assert settings["arch"] == arch  # the model spec, recorded with the maps
            if dataset == "own":
                assert settings["model_kwargs"] == '{"width":8}' and len(settings["model_code_sha256"]) == 64
            else:
                assert settings["model_kwargs"] == "" and settings["model_code_sha256"] is None
        assert_container_has_methods(results / dataset / "heatmaps" / "cmu.ome.zarr")
    tv = pd.read_csv(results / "report" / "tables" / "tv.csv")
    assert set(tv["dataset"]) == {"own", "tm"} and set(tv["method"]) == set(METHODS)
    assert set(tv["layer"]) == set(LAYERS)


def assert_container_has_methods(path: Path) -> None:
    meta = zarr.open_group(path, mode="r").attrs["smoothsal"]
    heatmaps = {(i["method"], i["attribution"], i["layer"]) for i in meta["images"] if i["kind"] == "heatmap"}
    assert heatmaps == {(m, a, layer) for m in METHODS for a in ATTRIBUTIONS for layer in LAYERS}


def test_editing_the_model_file_or_its_kwargs_reruns_what_builds_the_model(own_models_run: Path) -> None:
    """The .py file is an input of every job that builds the model, the kwargs a setting: either change reruns
    the own dataset's saliency (and what follows), never the timm dataset's."""
    assert planned_jobs(own_models_run) == set()  # up to date as run
    net = own_models_run / "models" / "net.py"
    net.write_text(net.read_text() + "\n# edited\n")
    rerun = planned_jobs(own_models_run)
    saliency = {wc for rule, wc in rerun if rule == "saliency"}
    assert saliency == {(("dataset", "own"), ("method", m), ("slide", "cmu")) for m in METHODS}
    snakemake(own_models_run, "--touch", "--cores", "1")  # the edit is taken as done
    edit_config(own_models_run, lambda c: c["datasets"]["own"]["model"].update(kwargs={"width": 4}))
    rerun = planned_jobs(own_models_run)
    assert {wc for rule, wc in rerun if rule == "saliency"} == saliency


def test_a_python_model_that_does_not_import_stops_the_dry_run(own_models_run: Path, tmp_path: Path) -> None:
    (own_models_run / "models" / "broken.py").write_text("import no_such_package_xyz\n")
    edit_config(
        own_models_run, lambda c: c["datasets"]["own"]["model"].update(arch="python:models/broken.py:build")
    )
    result = snakemake(own_models_run, "--dry-run", check=False)
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "broken.py" in line]
    assert (
        lines
        and "does not import (No module named 'no_such_package_xyz'); install what it imports" in lines[0]
    )
