"""`smoothsal faithfulness`: real stores of real slides (a demo tumour slide with its annotation, CMU), the
tables read back and checked against `deletion_insertion` and the metrics run directly; bad stores give
one line naming both files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import DEMO_CLASS_MAP, spec

from smoothsal import demo
from smoothsal.annotations import read_annotations
from smoothsal.annotations.masks import tile_label_mask
from smoothsal.faithfulness import FaithfulnessSettings, sample_tiles
from smoothsal.faithfulness_tables import FAITHFULNESS_COLUMNS, RANDOMISATION_COLUMNS, read_faithfulness
from smoothsal.metrics import region_fraction
from smoothsal.model_spec import load_model
from smoothsal.models import Normalize
from smoothsal.perturbation import PerturbationSettings, deletion_insertion
from smoothsal.saliency import tile_seed
from smoothsal.store import open_store
from smoothsal.tiles import TileDataset, read_tile_table
from smoothsal.torch_files import save_torch_file

LAYERS = ("layer1", "layer2", "layer3")
SAMPLE, STEPS = 4, 3


def test_sample_is_seeded_stratified_and_all_means_all():
    table = pd.DataFrame({"label": [0] * 20 + [1] * 3 + [-1] * 5})
    picked = sample_tiles(table, 9, seed=0)
    assert len(picked) == 9 and len(set(picked)) == 9 and (np.diff(picked) > 0).all()
    labels = table["label"].to_numpy()[picked]
    assert (labels == 1).sum() == 3 and (labels == -1).sum() == 3 and (labels == 0).sum() == 3  # turns
    assert np.array_equal(picked, sample_tiles(table, 9, seed=0))
    assert not np.array_equal(picked, sample_tiles(table, 9, seed=1))
    assert np.array_equal(sample_tiles(table, 0, seed=0), np.arange(28))  # 0 = all
    assert np.array_equal(sample_tiles(table, 99, seed=0), np.arange(28))


@pytest.fixture(scope="module")
def tumour(cli, demo_dir: Path, demo_tiles: dict[str, Path], tmp_path_factory) -> dict[str, Path]:
    """The demo tumour slide (annotated, labelled tiles): a seeded ResNet18 checkpoint and its saliency
    stores under two methods."""
    out = tmp_path_factory.mktemp("faith")
    torch.manual_seed(0)
    checkpoint = out / "model.pt"
    save_torch_file(load_model("resnet18", num_classes=2).state_dict(), checkpoint)
    slide, annotation, _ = demo.slide_paths(demo_dir, spec("tumor_001"))
    paths = {"slide": slide, "annotation": annotation, "tiles": demo_tiles["tumor_001"], "checkpoint": checkpoint,
             "out": out}  # fmt: skip
    for method in ("original", "forward_hook"):
        cli("saliency", slide, "--tiles", paths["tiles"], "--arch", "resnet18", "--num-classes", "2",
            "--checkpoint", checkpoint, "--method", method, "--layers", *LAYERS, "--smoothgrad-samples", "2",
            "--no-progress", "--out", out / f"{method}.zarr", "--table", out / f"{method}.parquet")  # fmt: skip
    return paths


def faithfulness_args(p: dict[str, Path], method: str, *extra: object) -> list[object]:
    return ["faithfulness", p["slide"], "--tiles", p["tiles"], "--saliency", p["out"] / f"{method}.zarr",
            "--method", method, "--arch", "resnet18", "--num-classes", "2", "--checkpoint", p["checkpoint"],
            "--sample", SAMPLE, "--steps", STEPS, "--annotations", p["annotation"],
            "--out", p["out"] / f"f_{method}.parquet", "--randomisation-out", p["out"] / f"r_{method}.parquet",
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def faith(cli, tumour: dict[str, Path]):
    for method in ("original", "forward_hook"):
        cli(*faithfulness_args(tumour, method))
    out = tumour["out"]
    return read_faithfulness(
        [out / "f_original.parquet", out / "f_forward_hook.parquet"],
        [out / "r_original.parquet", out / "r_forward_hook.parquet"],
    )


def test_tables_hold_one_row_per_tile_map_and_the_aucs_of_the_stored_maps(tumour, faith):
    tiles, meta = faith.tiles, faith.meta[0]
    assert list(tiles.columns) == list(FAITHFULNESS_COLUMNS)
    assert len(tiles) == 2 * SAMPLE * 2 * len(LAYERS)
    assert meta["settings"] == FaithfulnessSettings(sample=SAMPLE, steps=STEPS).as_dict()
    table = read_tile_table(tumour["tiles"], tumour["slide"])
    picked = sample_tiles(table, SAMPLE, 0)
    assert sorted(set(tiles["tile"])) == picked.tolist()  # the same tiles for every method
    assert (table["label"].to_numpy()[picked] == 1).sum() == SAMPLE // 2  # stratified: both classes
    # the random-order reference does not depend on the method's maps
    ref = tiles.pivot_table(
        index=["tile", "attribution", "layer"], columns="method", values="deletion_auc_random"
    )
    assert np.allclose(ref["original"], ref["forward_hook"])
    # the AUCs are those of deletion_insertion with the stored maps, the store's targets, the tile's seed
    store = open_store(tumour["out"] / "original.zarr")
    s = store.settings
    data = TileDataset(table, transform=Normalize(tuple(s["mean"]), tuple(s["std"])))
    x = torch.stack([data[int(i)][0] for i in picked])
    model = load_model("resnet18", num_classes=2, checkpoint=tumour["checkpoint"]).eval()
    targets = pd.read_parquet(tumour["out"] / "original.parquet")["target"].to_numpy()[picked]
    maps = {
        ("deeplift", "layer2"): torch.from_numpy(
            np.stack([store.maps("deeplift", "layer2")[int(i)] for i in picked])
        )
    }
    seeds = [tile_seed(0, str(table["slide_id"].iloc[0]) + "/order", int(i)) for i in picked]
    sigma = 5.0 / float(table["mpp"].iloc[0])
    curves = deletion_insertion(model, x, maps, target=targets, seeds=seeds,
                                settings=PerturbationSettings(steps=STEPS, blur_sigma=sigma))  # fmt: skip
    got = tiles[
        (tiles["method"] == "original") & (tiles["attribution"] == "deeplift") & (tiles["layer"] == "layer2")
    ]
    got = got.sort_values("tile")
    assert np.allclose(got["deletion_auc"], curves.deletion_auc[("deeplift", "layer2")], atol=1e-6)
    assert np.allclose(got["insertion_auc_random"], curves.insertion_auc_random, atol=1e-6)
    assert (got["target"].to_numpy() == targets).all()
    assert all(len(c) == STEPS + 1 for c in got["deletion_curve"])
    # relevance mass where the annotated target region is 10-90 % of the tile, its share as computed here
    annotations = read_annotations(tumour["annotation"])
    rows = table.iloc[picked]
    masks = torch.from_numpy(np.stack([tile_label_mask(annotations, int(r.x), int(r.y), int(r.w), int(r.tile_size))
                                       for r in rows.itertuples()]).astype(np.int64))  # fmt: skip
    fraction = region_fraction(masks, torch.as_tensor(targets)).numpy()
    assert np.allclose(got["target_fraction"], fraction)
    usable = (fraction >= 0.1) & (fraction <= 0.9)
    assert (got["relevance_mass"].notna().to_numpy() <= usable).all()


def test_randomisation_cascades_from_the_head_to_the_shallowest_layer(faith):
    r = faith.randomisation
    assert list(r.columns) == list(RANDOMISATION_COLUMNS)
    steps = r.drop_duplicates("step").sort_values("step")["randomised"].tolist()
    assert steps == ["head", "layer4", "layer3", "layer2", "layer1"]  # by stage, the default
    assert len(r) == 2 * SAMPLE * 2 * len(LAYERS) * len(steps)
    assert r["spearman"].between(-1, 1).all()
    # destroying the weights changes a gradient map: mean ρ at full randomisation well below 1
    final = r[r["step"] == len(steps)]
    assert final.groupby(["method", "attribution", "layer"])["spearman"].mean().max() < 0.9


def test_no_randomisation_and_all_tiles(cli, tumour, tmp_path):
    args = faithfulness_args(tumour, "original", "--no-randomisation", "--steps", "2")
    args[args.index("--sample") + 1] = "all"
    args[args.index("--out") + 1] = tmp_path / "f.parquet"
    args[args.index("--randomisation-out") + 1] = tmp_path / "r.parquet"
    cli(*args)
    got = read_faithfulness([tmp_path / "f.parquet"], [tmp_path / "r.parquet"])
    n = len(read_tile_table(tumour["tiles"]))
    assert got.tiles["tile"].nunique() == n and got.randomisation.empty


def one_line_error(cli, args) -> str:
    run = cli(*args, expect=1)
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.err, run.err
    return lines[0]


def test_bad_stores_name_both_files(cli, tumour, demo_dir, demo_tiles, tmp_path):
    store, tiles = tumour["out"] / "original.zarr", tumour["tiles"]
    # a store of another slide: the normal slide's tiles
    other, slide = demo_tiles["normal_001"], demo.slide_paths(demo_dir, spec("normal_001"))[0]
    args = faithfulness_args(tumour, "original")
    args[1], args[args.index("--tiles") + 1] = slide, other
    line = one_line_error(cli, args)
    assert str(store) in line and str(other) in line and "slide" in line
    # a store of another method
    args = faithfulness_args(tumour, "original")
    args[args.index("--method") + 1] = "forward_hook"
    line = one_line_error(cli, args)
    assert str(store) in line and "method" in line
    # a store of other settings: another model's weights
    torch.manual_seed(1)
    other_model = tmp_path / "other.pt"
    save_torch_file(load_model("resnet18", num_classes=2).state_dict(), other_model)
    args = faithfulness_args(tumour, "original")
    args[args.index("--checkpoint") + 1] = other_model
    line = one_line_error(cli, args)
    assert str(store) in line and str(other_model) in line
    # a store missing a layer
    line = one_line_error(cli, [*faithfulness_args(tumour, "original"), "--layers", "layer1", "layer4"])
    assert str(store) in line and str(tiles) in line and "layer4" in line
    # a method that needs its surrogate
    args = faithfulness_args(tumour, "original")
    args[args.index("--method") + 1] = "surrogate"
    assert "--surrogate" in one_line_error(cli, args)


def test_segmentation_scores_the_target_pixels(cli, demo_dir, demo_tiles, tmp_path):
    slide, annotation, _ = demo.slide_paths(demo_dir, spec("digi_001"))
    tiles = demo_tiles["digi_001"]
    common = ["--tiles", tiles, "--arch", "unet_resnet34", "--num-classes", "3", "--method", "original"]
    cli("saliency", slide, *common, "--layers", "layer2", "--task", "segmentation", "--smoothgrad-samples", "0",
        "--no-progress", "--out", tmp_path / "s.zarr", "--table", tmp_path / "s.parquet")  # fmt: skip
    cli("faithfulness", slide, *common, "--saliency", tmp_path / "s.zarr", "--sample", "3", "--steps", "2",
        "--annotations", annotation, "--class-map", DEMO_CLASS_MAP, "--out", tmp_path / "f.parquet",
        "--randomisation-out", tmp_path / "r.parquet")  # fmt: skip
    got = read_faithfulness([tmp_path / "f.parquet"], [tmp_path / "r.parquet"])
    assert len(got.tiles) == 3 * 2 and set(got.tiles["region"]) <= {"mask", "predicted", "all"}
    assert got.tiles[["deletion_auc", "insertion_auc"]].stack().between(0, 1).all()
    assert got.randomisation["randomised"].iloc[0] == "head" and got.randomisation["spearman"].notna().any()


def test_ctrl_c_leaves_no_table_and_the_rerun_equals_an_uninterrupted_run(cli, tumour, faith, tmp_path):
    """Issue 27 case 12: a real SIGINT after the first batch of sampled tiles: one line, exit 130, no
    table written; the rerun's tables equal the uninterrupted run's (the module's `faith`) exactly."""
    args = faithfulness_args(tumour, "original", "--batch-size", "1")
    args[args.index("--out") + 1] = tmp_path / "f.parquet"
    args[args.index("--randomisation-out") + 1] = tmp_path / "r.parquet"
    interrupted = cli.process(*args, kill_at="faithfulness.batch=1/int")
    lines = interrupted.stderr.strip().splitlines()
    assert interrupted.returncode == 130 and len(lines) == 1, interrupted.stderr
    assert lines[0].startswith("smoothsal faithfulness: interrupted: nothing is left half-written")
    assert not (tmp_path / "f.parquet").exists() and not (tmp_path / "r.parquet").exists()
    cli(*args)
    for ours, theirs in (("f.parquet", "f_original.parquet"), ("r.parquet", "r_original.parquet")):
        a, b = (pd.read_parquet(p) for p in (tmp_path / ours, tumour["out"] / theirs))
        keys = [c for c in a.columns if not isinstance(a[c].iloc[0], np.ndarray)]  # curves are arrays
        a, b = (t.sort_values(keys, kind="stable").reset_index(drop=True) for t in (a, b))
        pd.testing.assert_frame_equal(a, b, check_exact=True)  # rows come in batch order: sorted
