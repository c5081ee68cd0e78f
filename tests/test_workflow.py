"""The Snakemake workflow, run for real on tiny inputs: every stage's outputs and incremental reruns of
one shared run, and a broken slide under --keep-going (config errors, lint and SLURM:
tests/test_workflow_config.py).

Tiny means: 64 px tiles at 1 µm/px, at most 4 tiles per slide, SmoothGrad n = 2, one epoch; the demo
slides at 512 px (`smoothsal demo-data --size 512`) plus the real CMU-1-Small-Region slides.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from ngff import assert_valid_ngff
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from qupath_geojson import load, read_objects
from workflow_runs import (
    ATTRIBUTIONS,
    LAYERS,
    MAX_TILES,
    METHODS,
    TILES,
    add_rows,
    copy_workdir,
    demo,
    edit_config,
    faithfulness_jobs,
    job,
    planned_jobs,
    run_local,
    slide_jobs,
    snakemake,
    tiny_config,
    write_config,
    write_sheet,
)

import smoothsal as ss
from smoothsal.surrogate import read_surrogate

# one worker builds the shared full run once (xdist would otherwise build it in each worker that draws a test)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("workflow")]


# --- the shared full run -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, slides_dir: Path) -> Path:
    """The whole workflow once, on two datasets: a Camelyon16-style classification dataset (demo slides +
    the real CMU-1-Small-Region.svs) and a Digipath-style segmentation dataset (demo slides), both with
    models trained by rule train_model. Tests copy this directory and work on the copy."""
    workdir = tmp_path_factory.mktemp("workflow")
    write_sheet(workdir / "sheets" / "c16.tsv", [
        demo("camelyon16", "tumor_001", "train"),
        demo("camelyon16", "normal_001", "train"),
        demo("camelyon16", "test_001", "eval"),
        {"slide_id": "cmu", "path": str(slides_dir / "CMU-1-Small-Region.svs")},  # split empty = eval
    ])  # fmt: skip
    write_sheet(workdir / "sheets" / "digi.tsv", [demo("digipath", "digi_001", "train"),
                                                  demo("digipath", "digi_003", "eval")])  # fmt: skip
    datasets = {
        "c16": {
            "slides": "sheets/c16.tsv",
            "task": "classification",
            "model": {"arch": "resnet18", "num_classes": 2, "train": {"epochs": 1, "batch_size": 8}},
            "tiles": TILES,
            "surrogate": {"epochs": 1, "batch_size": 8},
        },
        "digi": {
            "slides": "sheets/digi.tsv",
            "task": "segmentation",
            "class_map": "Tumor=1,Stroma=2",
            "model": {"arch": "unet_resnet34", "num_classes": 3, "train": {"epochs": 1, "batch_size": 4}},
            "tiles": TILES,
            "surrogate": {"epochs": 1, "batch_size": 4},
        },
    }
    write_config(workdir, tiny_config(datasets, qupath={"tiles": True}))  # the QuPath objects too
    run_local(workdir)
    return workdir


EVAL_SLIDES = {"c16": ["test_001", "cmu"], "digi": ["digi_003"]}
TRAIN_SLIDES = {"c16": ["tumor_001", "normal_001"], "digi": ["digi_001"]}
ARCH = {"c16": ("resnet18", 2), "digi": ("unet_resnet34", 3)}


def test_full_run_writes_every_output(full_run: Path) -> None:
    results = full_run / "results"
    tiles = {}
    for dataset, slides in EVAL_SLIDES.items():
        for slide in slides + TRAIN_SLIDES[dataset]:
            table = pd.read_parquet(results / dataset / "tiles" / f"{slide}.parquet")
            assert 0 < len(table) <= MAX_TILES, (dataset, slide, len(table))
            assert set(table["slide_id"]) == {slide}
            assert (table["tile_size"] == 64).all()
            assert (results / dataset / "tiles" / f"{slide}.png").stat().st_size > 0
            tiles[dataset, slide] = table

    for dataset, (arch, k) in ARCH.items():
        ss.load_model(
            arch, num_classes=k, checkpoint=results / dataset / "model.pt"
        )  # the trained demo model
        paths, meta = read_surrogate(results / dataset / "surrogate.pt")
        assert meta.arch == arch and len(paths.specs) > 0
        # the surrogate saw exactly the train split's tiles
        assert meta.settings.n_tiles == sum(len(tiles[dataset, s]) for s in TRAIN_SLIDES[dataset])
        losses = pd.read_csv(results / dataset / "surrogate.losses.csv")
        assert len(losses) == 1 and losses["l1_total"].notna().all()

    for dataset, slides in EVAL_SLIDES.items():
        for slide in slides:
            n = len(tiles[dataset, slide])
            for method in METHODS:
                stem = results / dataset / "saliency" / slide / method
                table = pd.read_parquet(stem.with_suffix(".parquet"))
                assert (
                    len(table) == n
                    and set(table["method"]) == {method}
                    and set(table["dataset"]) == {dataset}
                )
                tv = table[[f"tv/{a}/{layer}" for a in ATTRIBUTIONS for layer in LAYERS]]
                assert tv.notna().all().all() and (tv.to_numpy() >= 0).all() and (tv.to_numpy() > 0).any()
                share = table[
                    [f"checkerboard/{a}/{layer}" for a in ATTRIBUTIONS for layer in LAYERS]
                ].to_numpy()
                assert np.isfinite(share).any() and not ((share < 0) | (share > 1)).any()  # NaN: a flat map
                store = zarr.open_group(stem.with_suffix(".zarr"), mode="r")
                assert store.attrs["smoothsal"]["method"] == method
                for a in ATTRIBUTIONS:
                    for layer in LAYERS:
                        assert store[f"{a}/{layer}"].shape[0] == n
            check_container(results / dataset / "heatmaps" / f"{slide}.ome.zarr", slide)

    report = results / "report"
    assert "<html" in (report / "index.html").read_text().lower()
    tv = pd.read_csv(report / "tables" / "tv.csv")
    assert set(tv["dataset"]) == set(EVAL_SLIDES) and set(tv["method"]) == set(METHODS)
    assert set(tv["layer"]) == set(LAYERS) and set(tv["attribution"]) == set(ATTRIBUTIONS)
    checkerboard = pd.read_csv(report / "tables" / "checkerboard.csv")  # beside TV, the same cells
    keys = ["dataset", "layer", "attribution", "method"]
    assert checkerboard[keys].equals(tv[keys]) and checkerboard["recorded"].all()
    fit = pd.read_csv(report / "tables" / "surrogate_fit.csv")  # issue 14: 1 epoch, so the cap stopped it
    assert set(fit["dataset"]) == set(EVAL_SLIDES) and set(fit["stop_reason"]) == {"max_epochs"}
    assert {f"{d}_{ARCH[d][0]}_losses.png" for d in EVAL_SLIDES} <= {
        p.name for p in (report / "figures" / "surrogate_fit").iterdir()
    }

    for log in ["demo_data.log", "report.log", "tiles/c16/cmu.log", "saliency/digi/digi_003/surrogate.log",
                "train_surrogate/c16.log", "train_model/digi.log", "heatmaps/c16/test_001.log"]:  # fmt: skip
        assert (results / "logs" / log).is_file(), log
    assert (
        len(list((results / "benchmarks").rglob("*.tsv"))) == 1 + 6 + 2 + 2 + 12 + 12 + 3 + 1 + 3
    )  # + faithfulness, + QuPath tile objects
    check_qupath_tiles(results)


def test_snakemake_report_holds_the_report_tables_and_figures(full_run: Path, tmp_path: Path) -> None:
    workdir = copy_workdir(full_run, tmp_path / "w")
    snakemake(workdir, "--report", "report.zip")
    with zipfile.ZipFile(workdir / "report.zip") as z:
        names = z.namelist()
    files = {Path(n).name for n in names}  # the zip stores each report() file under a hashed folder
    assert {"tv.csv", "prediction_difference.csv", "tv_reduction.csv", "accuracy.csv"} <= files, names
    overviews = {f"{d}_{s}.png" for d, slides in EVAL_SLIDES.items() for s in slides}
    assert overviews <= files, (overviews, names)
    assert {"c16_resnet18.png", "digi_unet_resnet34.png"} <= files, names  # TV per layer, per dataset/model
    # the report page: every file under its category with its caption, each pointing at a file in the zip
    page = next(n for n in names if n.endswith("report.html"))
    with zipfile.ZipFile(workdir / "report.zip") as z:
        html = z.read(page).decode()
    results = json.loads(re.search(r"var results = (\{.*?\});\n", html, re.DOTALL).group(1))
    categories = json.loads(re.search(r"var categories = (\{.*?\});\n", html, re.DOTALL).group(1))
    assert set(categories) == {"Tables", "Figures"}, categories
    assert set(categories["Figures"]) == {
        "TV per layer",
        "Slide overviews",
        "Surrogate fit",
        "Faithfulness",
    }, categories
    assert {"c16_resnet18_losses.png", "digi_unet_resnet34_losses.png"} <= files, names  # issue 14
    captions = {
        "tables": "Tables over every slide",
        "tv_per_layer": "Total variation of the saliency maps at every evaluated layer",
        "overview": "the tissue thumbnail",
        "surrogate_fit": "Surrogate training per epoch",
        "faithfulness": "Faithfulness of each method's maps to the ORIGINAL model",
    }
    by_file = {Path(path).name: entry for path, entry in results.items()}
    assert {"tv.csv", "c16_resnet18.png", f"c16_{EVAL_SLIDES['c16'][0]}.png"} <= set(by_file), sorted(by_file)
    for path, entry in results.items():
        kind = next(k for k in captions if f"/{k}/" in f"/{path}")
        assert captions[kind] in entry["caption"], (path, entry["caption"][:200])
        assert any(n.endswith(entry["data_uri"]) for n in names), entry["data_uri"]


def check_qupath_tiles(results: Path) -> None:
    """Config qupath.tiles: each eval slide's objects, as QuPath's rules read them, one per stride cell with
    every map's statistics and the tile values."""
    for dataset, slides in EVAL_SLIDES.items():
        for slide in slides:
            objects = read_objects(load(results / dataset / "qupath" / f"{slide}.geojson.gz"))
            tiles = pd.read_parquet(results / dataset / "tiles" / f"{slide}.parquet")
            assert len(objects) == len(tiles) and {o.object_type for o in objects} == {
                "tile"
            }  # stride = size
            names = set().union(*(o.measurements for o in objects))
            assert {
                f"{m} {a} {layer} mean" for m in METHODS for a in ATTRIBUTIONS for layer in LAYERS
            } <= names
            assert {f"{m} PD all ×100" for m in METHODS} | {
                f"{m} TV deeplift layer3" for m in METHODS
            } <= names
    assert (results / "logs" / "qupath" / "c16" / "cmu.log").is_file()


def check_container(path: Path, slide: str) -> None:
    """Every method × attribution × layer heatmap opens with ome-zarr-py as a µm-scaled 2-D pyramid."""
    assert_valid_ngff(path)
    meta = zarr.open_group(path, mode="r").attrs["smoothsal"]
    assert meta["slide_id"] == slide
    heatmaps = {
        (i["method"], i["attribution"], i["layer"]): i["path"]
        for i in meta["images"]
        if i["kind"] == "heatmap"
    }
    assert set(heatmaps) == {(m, a, layer) for m in METHODS for a in ATTRIBUTIONS for layer in LAYERS}
    for image in [heatmaps["surrogate", "deeplift", "layer3"], "tissue"]:
        node = next(iter(Reader(parse_url(path / image))()))
        assert node.data and all(level.ndim == (3 if image == "tissue" else 2) for level in node.data)
        scale = node.metadata["coordinateTransformations"][0][0]["scale"]
        extent_um = node.data[0].shape[-1] * scale[-1]
        slide_um = meta["slide_size_px"][0] * meta["slide_mpp"]
        assert abs(extent_um - slide_um) <= 0.05 * slide_um, (image, extent_um, slide_um)


def test_a_slides_content_decides_what_reruns_not_its_modification_time(
    full_run: Path, tmp_path: Path
) -> None:
    """Issue 27 case 6: a touched but unchanged slide reruns nothing; a slide replaced by other content
    with an older modification time (`cp -p`, `rsync -a`) reruns its tiles and all after them, for that
    slide only, and the report (its fingerprint is a param of the tiles job; slides are `ancient`)."""
    workdir = copy_workdir(full_run, tmp_path / "w")
    slide = workdir / "demo" / "camelyon16" / "test_001.tif"
    # Snakemake compares the checksums of inputs up to 1 MB (these demo slides) instead of their
    # modification times; real slides are larger, so no checksums here
    real_size = ("--max-checksum-file-size", "0")
    os.utime(slide)  # newer than every output, same content
    assert planned_jobs(workdir, *real_size) == set()
    older = slide.stat().st_mtime_ns - 86_400 * 10**9
    shutil.copyfile(workdir / "demo" / "camelyon16" / "test_002.tif", slide)
    os.utime(slide, ns=(older, older))
    assert older < (workdir / "results" / "c16" / "tiles" / "test_001.parquet").stat().st_mtime_ns
    assert planned_jobs(workdir, *real_size) == slide_jobs("c16", "test_001", qupath=True) | {job("report")}


def test_settings_rerun_what_they_affect(full_run: Path, tmp_path: Path) -> None:
    workdir = copy_workdir(full_run, tmp_path / "w")
    eval_slides = {(d, s) for d, slides in EVAL_SLIDES.items() for s in slides}

    def planned_after(edit) -> set:
        edit_config(workdir, edit)
        return planned_jobs(workdir)

    # speed-only options: nothing reruns
    assert planned_after(lambda c: c["saliency"].update(batch_size=1, device="auto")) == set()
    # SmoothGrad: every saliency job, heatmaps and report; no tiles, no training
    expected = {job("saliency", dataset=d, slide=s, method=m) for d, s in eval_slides for m in METHODS}
    expected |= {j for d, s in eval_slides for j in faithfulness_jobs(d, s)}
    expected |= {job(r, dataset=d, slide=s) for d, s in eval_slides for r in ("heatmaps", "qupath_tiles")}
    expected |= {job("report")}
    assert planned_after(lambda c: c["smoothgrad"].update(samples=3)) == expected
    # precision (a saliency option that changes results): the same jobs
    edit_config(workdir, lambda c: c["smoothgrad"].update(samples=2))
    assert planned_after(lambda c: c["saliency"].update(precision="bf16")) == expected
    # one dataset's surrogate epochs: its surrogate and its surrogate saliency maps only
    edit_config(workdir, lambda c: c["saliency"].update(precision="fp32"))
    expected = {job("train_surrogate", dataset="c16")}
    expected |= {job("saliency", dataset="c16", slide=s, method="surrogate") for s in EVAL_SLIDES["c16"]}
    expected |= {j for s in EVAL_SLIDES["c16"] for j in faithfulness_jobs("c16", s, ["surrogate"])}
    expected |= {
        job(r, dataset="c16", slide=s) for s in EVAL_SLIDES["c16"] for r in ("heatmaps", "qupath_tiles")
    }
    expected |= {job("report")}
    assert planned_after(lambda c: c["datasets"]["c16"]["surrogate"].update(epochs=2)) == expected
    # the faithfulness settings: its jobs and the report only; its run options: nothing
    edit_config(workdir, lambda c: c["datasets"]["c16"]["surrogate"].update(epochs=1))
    assert planned_after(lambda c: c["faithfulness"].update(batch_size=1, device="cpu")) == set()
    expected = {j for d, s in eval_slides for j in faithfulness_jobs(d, s)} | {job("report")}
    assert planned_after(lambda c: c["faithfulness"].update(steps=3)) == expected


def test_new_slides_run_only_their_jobs_and_a_broken_one_fails_alone(
    full_run: Path, tmp_path: Path, slides_dir: Path
) -> None:
    """One run covers both (each new slide costs a full set of jobs): a good and a broken new eval slide."""
    workdir = copy_workdir(full_run, tmp_path / "w")
    assert planned_jobs(workdir) == set()
    broken = slides_dir / "broken.svs"
    add_rows(workdir / "sheets" / "c16.tsv", [
        {"slide_id": "broken", "path": str(broken), "split": "eval"},
        {"slide_id": "tcga", "path": str(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs"), "mpp": "0.5"},  # no µm/px in file
    ])  # fmt: skip
    # eval slides: no model or surrogate training, only their own jobs and the report
    new = slide_jobs("c16", "broken", qupath=True) | slide_jobs("c16", "tcga", qupath=True)
    assert planned_jobs(workdir) == new | {job("report")}
    result = run_local(workdir, check=False)
    assert result.returncode != 0
    results = workdir / "results"
    log = (results / "logs" / "tiles" / "c16" / "broken.log").read_text()
    assert str(broken) in log and "error" in log.lower()
    # the good new slide finished every stage under --keep-going
    check_container(results / "c16" / "heatmaps" / "tcga.ome.zarr", "tcga")
    for method in METHODS:
        assert len(pd.read_parquet(results / "c16" / "saliency" / "tcga" / f"{method}.parquet")) > 0
    # the report waits for every slide: excluding the broken one lets it run, and nothing else
    edit_config(workdir, lambda c: c["datasets"]["c16"].update(exclude=["broken"]))
    assert planned_jobs(workdir) == {job("report")}
    run_local(workdir)
    tv = pd.read_csv(results / "report" / "tables" / "tv_per_slide.csv")
    assert "tcga" in set(tv["slide_id"]) and "broken" not in set(tv["slide_id"])
    assert planned_jobs(workdir) == set()
