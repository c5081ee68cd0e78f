"""`smoothsal saliency`: real tiles of a real slide through a seeded ResNet18 / FlexibleUNet, the
store and table read back and checked against `attribute` and the metrics run directly."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from reference import assert_fp32_within, captum_pair, fp32_bound

import smoothsal as ss
from smoothsal import saliency, store
from smoothsal.checkpoints import weights_sha256
from smoothsal.metrics import masked_prediction_difference, prediction_difference, probabilities
from smoothsal.model_spec import load_with_surrogate
from smoothsal.surrogate import (
    SurrogateMeta,
    TrainSettings,
    model_fingerprint,
    save_surrogate,
)
from smoothsal.tiles import TileDataset, read_tile_table, write_tile_table

LAYERS = ("layer1", "layer2", "layer3")
SAMPLES = 2


@pytest.fixture(scope="module")
def slide(slides_dir: Path) -> Path:
    return slides_dir / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def tiles(cli, slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiles") / "cmu.parquet"
    cli("tiles", slide, "--tile-size", "64", "--max-tiles", "12", "--out", out)
    return out


def saliency_args(
    slide: Path, tiles: Path, out: Path, method: str = "forward_hook", *extra: str
) -> list[str]:
    return [
        "saliency", str(slide), "--tiles", str(tiles), "--arch", "resnet18", "--num-classes", "2",
        "--method", method, "--layers", *LAYERS, "--smoothgrad-samples", str(SAMPLES), "--no-progress",
        "--out", str(out / f"{method}.zarr"), "--table", str(out / f"{method}.parquet"), *extra,
    ]  # fmt: skip


def run(cli, args: list[str]) -> tuple[int, str, str]:
    """The command through the `cli` fixture, whatever its exit status."""
    done = cli(*args, expect=None)
    return done.code, done.out, done.err


def read_store(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    opened = store.open_store(path)
    assert opened.group.metadata.zarr_format == 2
    maps = {f"{a}/{layer}": opened.array(a, layer)[:] for a in opened.attributions for layer in opened.layers}
    return opened.meta, maps


@pytest.fixture(scope="module")
def batch5(cli, slide: Path, tiles: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """forward_hook, batches of 5, one DataLoader worker process."""
    out = tmp_path_factory.mktemp("batch5")
    assert (
        run(cli, saliency_args(slide, tiles, out, "forward_hook", "--batch-size", "5", "--workers", "1"))[0]
        == 0
    )
    return out


def assert_same_outputs(a: Path, b: Path, method: str = "forward_hook") -> None:
    meta_a, maps_a = read_store(a / f"{method}.zarr")
    meta_b, maps_b = read_store(b / f"{method}.zarr")
    assert meta_a == meta_b
    for key in maps_a:
        np.testing.assert_allclose(maps_b[key], maps_a[key], rtol=1e-5, atol=1e-6 * np.abs(maps_a[key]).max())
    pd.testing.assert_frame_equal(
        pd.read_parquet(a / f"{method}.parquet"), pd.read_parquet(b / f"{method}.parquet"), rtol=1e-5
    )


def test_maps_tv_and_prediction_difference_equal_the_library_run_directly(
    batch5: Path, tiles: Path, slide: Path
):
    meta, maps = read_store(batch5 / "forward_hook.zarr")
    table = pd.read_parquet(batch5 / "forward_hook.parquet")
    tile_table = read_tile_table(tiles)
    n = len(tile_table)
    # format: root attrs, arrays, table columns and schema metadata as the contract says
    assert meta["slide_id"] == "CMU-1-Small-Region" and meta["method"] == "forward_hook"
    assert meta["layers"] == list(LAYERS) and meta["attributions"] == ["gradient", "deeplift"]
    assert meta["n_tiles"] == n and meta["settings"]["smoothgrad_samples"] == SAMPLES
    opened = store.open_store(batch5 / "forward_hook.zarr")
    for layer, side in zip(LAYERS, (16, 8, 4), strict=True):
        arr = opened.array("deeplift", layer)
        assert arr.shape == (n, side, side) and arr.dtype == np.float32
        assert dict(arr.attrs) == {"layer": layer, "attribution": "deeplift", "stride": 64 / side}
    assert list(table.columns) == [
        "dataset", "slide_id", "method", "arch", "tile", "x", "y", "w", "h", "mpp", "label", "target", "task",
        "logit_0", "logit_1", "prob_0", "prob_1", "pred", "correct", "pd_all", "pd_target", "pd_masked", "agree",
        *(f"{m}/{a}/{layer}" for m in ("tv", "checkerboard") for a in ("gradient", "deeplift") for layer in LAYERS),
    ]  # fmt: skip
    assert store.results_meta(batch5 / "forward_hook.parquet") == meta
    assert table["tile"].tolist() == list(range(n))
    assert (table[["x", "y", "w", "h"]].to_numpy() == tile_table[["x", "y", "w", "h"]].to_numpy()).all()
    assert not any(np.isnan(m).any() for m in maps.values())  # every tile written

    # the same tiles through the library directly
    model, _, norm = load_with_surrogate("resnet18", num_classes=2)
    method = ss.smooth(model, "forward_hook")
    picked = [0, 6, n - 1]
    x = torch.stack([TileDataset(tile_table, transform=norm)[i][0] for i in picked])
    with torch.no_grad():
        p_orig, p_new = probabilities(model(x)), probabilities(method(x))
    target = p_orig.argmax(1)  # unlabelled tiles: the original's predicted class
    assert table["target"].iloc[picked].tolist() == target.tolist()
    pd_all, pd_target = prediction_difference(p_orig, p_new, target)
    np.testing.assert_allclose(table["pd_all"].iloc[picked], pd_all, rtol=1e-5)
    np.testing.assert_allclose(table["pd_target"].iloc[picked], pd_target, rtol=1e-5)
    assert (table["pd_all"] > 0).all()  # forward_hook changes predictions
    np.testing.assert_allclose(table[["prob_0", "prob_1"]].iloc[picked], p_new, rtol=1e-5)
    for row, i in enumerate(picked):
        seed = saliency.tile_seed(0, "CMU-1-Small-Region", i)
        direct = ss.attribute(
            method, x[row : row + 1], layers=list(LAYERS), target=target[row : row + 1],
            smoothgrad=ss.SmoothGrad(SAMPLES, 0.2), noise_seeds=[seed],
        )  # fmt: skip
        for a in ("gradient", "deeplift"):
            for layer in LAYERS:
                full = direct[a][layer]
                summed = full.sum(1)[0].numpy()
                stored = maps[f"{a}/{layer}"][i]
                assert np.abs(stored - summed).max() <= 1e-5 * np.abs(summed).max(), (i, a, layer)
                tv = float(ss.total_variation(full)[0])
                assert table[f"tv/{a}/{layer}"].iloc[i] == pytest.approx(tv, rel=1e-5)
                share = float(ss.checkerboard_share(full)[0])  # of the full maps, as TV (channels summed)
                assert table[f"checkerboard/{a}/{layer}"].iloc[i] == pytest.approx(share, rel=1e-4, abs=1e-6)
    shares = table[[c for c in table if c.startswith("checkerboard/")]].to_numpy()
    assert ((shares > 0) & (shares < 1)).all()


def test_killed_job_resumes_with_the_results_of_an_uninterrupted_run_whatever_the_batch_size(
    cli,
    batch5: Path,
    slide: Path,
    tiles: Path,
    tmp_path: Path,
    caplog,
    monkeypatch: pytest.MonkeyPatch,
):
    """Killed (SIGKILL) after 2 batches of 3, resumed with batches of 4 in the main process (row files
    merged every 2 batches): the same store and table as batches of 5 in a worker, uninterrupted."""
    args = saliency_args(slide, tiles, tmp_path, "forward_hook", "--workers", "0")
    killed = cli.process(*args, "--batch-size", "3", kill_at="saliency.batch=2")  # SIGKILLs itself
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    out, table = tmp_path / "forward_hook.zarr", tmp_path / "forward_hook.parquet"
    assert not out.exists() and not table.exists()  # nothing that looks complete
    partial = store.partial_dir(out)
    assert json.loads((partial / "progress.json").read_text())["batches"] == [[0, 6]]  # 2 batches of 3
    kept = tmp_path / "kept"
    shutil.copytree(partial, kept / partial.name)

    monkeypatch.setattr(store, "COMPACT_ROWS", 2)
    rc, stdout, _ = run(cli, [*args, "--batch-size", "4"])
    assert rc == 0 and "12 tiles (6 computed, resumed at tile 6" in stdout  # tiles 0-5 not recomputed
    assert not partial.exists()
    assert_same_outputs(batch5, tmp_path)

    # a partial state from other settings is not resumed: the job starts over and says so
    rc, stdout, _ = run(cli, saliency_args(slide, tiles, kept, "forward_hook", "--smoothgrad-samples", "0"))
    assert rc == 0 and "12 computed" in stdout
    assert "other settings or tiles; starting over" in caplog.text


def test_backward_hook_keeps_predictions_and_labels_are_targets(
    cli, slide: Path, tiles: Path, tmp_path: Path, batch5: Path
):
    labelled = tmp_path / "labelled.parquet"
    labels = pd.array([1, 0, 1, None] * 3, dtype="Int64")  # the last of every four unlabelled
    write_tile_table(read_tile_table(tiles).assign(label=labels), labelled)
    assert (
        run(cli, saliency_args(slide, labelled, tmp_path, "backward_hook", "--smoothgrad-samples", "0"))[0]
        == 0
    )
    table = pd.read_parquet(tmp_path / "backward_hook.parquet")
    assert (table["pd_all"] == 0).all() and (table["pd_target"] == 0).all()
    assert table["pd_masked"].isna().all()  # classification
    known = table["label"] >= 0
    assert table["label"].tolist() == [1, 0, 1, -1] * 3
    assert (table["target"][known] == table["label"][known]).all()
    assert (table["target"][~known] == table["pred"][~known]).all()  # unlabelled: predicted (same forward)
    assert (table["correct"][known] == (table["pred"] == table["label"])[known]).all()
    assert table["correct"][~known].isna().all()
    assert (pd.read_parquet(batch5 / "forward_hook.parquet")["pd_all"] > 1e-6).all()


def test_segmentation_targets_majority_class_and_masks_prediction_difference(
    cli, slide: Path, tiles: Path, tmp_path: Path
):
    table = read_tile_table(tiles).head(4).assign(majority_class=[0, 1, 2, 1])
    seg_tiles = tmp_path / "seg-tiles.parquet"  # not --table: saliency never overwrites its input
    write_tile_table(table, seg_tiles)
    args = [
        "saliency", str(slide), "--tiles", str(seg_tiles), "--arch", "unet_resnet34", "--num-classes", "3",
        "--task", "segmentation", "--method", "forward_hook", "--layers", "layer1", "layer2",
        "--smoothgrad-samples", "0", "--batch-size", "2", "--workers", "0", "--no-progress",
        "--out", str(tmp_path / "seg.zarr"), "--table", str(tmp_path / "seg.parquet"),
    ]  # fmt: skip
    assert run(cli, args)[0] == 0
    out = pd.read_parquet(tmp_path / "seg.parquet")
    _, maps = read_store(tmp_path / "seg.zarr")
    assert out["target"].tolist() == [0, 1, 2, 1] and (out["task"] == "segmentation").all()
    assert {f"tv/{a}/{layer}" for a in ("gradient", "deeplift") for layer in ("layer1", "layer2")} <= set(out)
    assert maps["gradient/layer1"].shape == (4, 16, 16) and maps["deeplift/layer2"].shape == (4, 8, 8)

    model, _, norm = load_with_surrogate("unet_resnet34", num_classes=3)
    method = ss.smooth(model, "forward_hook")
    x = torch.stack([TileDataset(table, transform=norm)[i][0] for i in range(4)])
    with torch.no_grad():
        p_orig, p_new = probabilities(model(x)), probabilities(method(x))
    mask = torch.tensor([0, 1, 2, 1]).view(4, 1, 1).expand(4, 64, 64)  # masks whose majorities are these
    expected = masked_prediction_difference(p_orig, p_new, mask).numpy()
    assert np.isnan(out["pd_masked"].iloc[0]) and np.isfinite(expected[1:]).all()
    np.testing.assert_allclose(out["pd_masked"].to_numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(out[["prob_0", "prob_1", "prob_2"]], p_new.mean(dim=(2, 3)), rtol=1e-5)
    # the tile's map from a batch of 2 against its own fp64 twin computed alone (tests/reference.py)
    exact = ss.attribute(
        method, x[2:3], layers=["layer2"], target=[2], attributions=["deeplift"], precision="fp64"
    )
    c32, c64 = captum_pair(method, x[2:3], "layer2", 2, "deeplift")
    assert_fp32_within(
        torch.from_numpy(maps["deeplift/layer2"][2:3]),
        exact["deeplift"]["layer2"].sum(1),
        fp32_bound(c32.sum(1), c64.sum(1)),
    )


def test_empty_tile_table_gives_empty_outputs(cli, slide: Path, tiles: Path, tmp_path: Path):
    empty = tmp_path / "empty.parquet"
    write_tile_table(read_tile_table(tiles).iloc[:0], empty)
    assert run(cli, saliency_args(slide, empty, tmp_path, "original"))[0] == 0
    meta, maps = read_store(tmp_path / "original.zarr")
    assert meta["n_tiles"] == 0 and meta["layers"] == list(LAYERS) and len(maps) == 6
    assert all(m.shape[0] == 0 for m in maps.values())
    table = pd.read_parquet(tmp_path / "original.parquet")
    assert table.empty and "tv/deeplift/layer3" in table and "checkerboard/deeplift/layer3" in table
    assert "pd_all" in table


def fake_surrogate(arch: str, path: Path) -> Path:
    """A surrogate file in the real format (untrained paths) for ``arch``."""
    torch.manual_seed(0)
    model = ss.load_model(arch, num_classes=2)
    paths = ss.SurrogatePaths.for_model(model, torch.zeros(1, 3, 64, 64))
    settings = TrainSettings(arch, 2, "random-init", "-", 1, 64, epochs=1, batch_size=1, patience=0)
    save_surrogate(path, paths, SurrogateMeta(settings, paths.specs, model_fingerprint(model)))
    return path


def test_surrogate_method(cli, slide: Path, tiles: Path, tmp_path: Path):
    surrogate = fake_surrogate("resnet18", tmp_path / "s18.pt")
    three = tmp_path / "three.parquet"
    write_tile_table(read_tile_table(tiles).head(3), three)
    args = saliency_args(
        slide, three, tmp_path, "surrogate", "--surrogate", str(surrogate), "--smoothgrad-samples", "0"
    )
    assert run(cli, args)[0] == 0
    meta, _ = read_store(tmp_path / "surrogate.zarr")
    assert meta["settings"]["surrogate_sha256"] and meta["method"] == "surrogate"
    assert (pd.read_parquet(tmp_path / "surrogate.parquet")["pd_all"] > 0).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("other_slide", "tile table {tiles} belongs to slide 'CMU-1-Small-Region'"),
        ("other_arch", "surrogate {surrogate} was trained for arch 'resnet34', not 'resnet18'"),
        ("no_surrogate", "method 'surrogate' needs a trained surrogate: pass --surrogate FILE"),
        ("layer", "unknown layer 'layer9' for ResNet; allowed"),
        ("flat_layer", "layer 'fc' gives outputs of shape [2] per tile, not maps [C, h, w]"),
        ("method", "unknown method 'smooth'; allowed: original, surrogate, backward_hook, forward_hook"),
        ("attribution", "unknown attributions ['saliency']; allowed: gradient, deeplift"),
        ("missing_tiles", "tile table {tiles} does not exist"),
    ],
)
def test_bad_input_is_one_line_naming_the_file(
    cli, change: str, message: str, slides_dir: Path, slide: Path, tiles: Path, tmp_path: Path
):
    surrogate = tmp_path / "s34.pt"
    method, extra, slide_arg, tiles_arg = "original", [], slide, tiles
    if change == "other_slide":
        slide_arg = slides_dir / "CMU-1-Small-Region-pyramid.tiff"
    elif change == "other_arch":
        method, extra = "surrogate", ["--surrogate", str(fake_surrogate("resnet34", surrogate))]
    elif change == "no_surrogate":
        method = "surrogate"
    elif change == "method":
        method = "smooth"
    elif change == "missing_tiles":
        tiles_arg = tmp_path / "nope.parquet"
    args = saliency_args(slide_arg, tiles_arg, tmp_path, method, *extra)
    if change == "layer":
        args[args.index("layer3")] = "layer9"
    elif change == "flat_layer":
        args[args.index("layer3")] = "fc"
    elif change == "attribution":
        args += ["--attributions", "saliency"]
    rc, _, err = run(cli, args)
    assert rc == 1
    assert err.startswith("smoothsal saliency: error: ") and err.count("\n") == 1
    assert message.format(tiles=tiles_arg, surrogate=surrogate) in err
    assert not list(tmp_path.glob("*.zarr")) and not list(tmp_path.glob(".*partial"))


def test_relabelled_tiles_on_the_same_grid_do_not_resume_batches_of_the_old_targets(
    cli, slide: Path, tiles: Path, tmp_path: Path
):
    """Re-tiling with new annotations keeps the grid (tiles_sha256) but changes the targets: a partial
    state of the old labels must not be resumed."""
    old, new = tmp_path / "old.parquet", tmp_path / "new.parquet"
    write_tile_table(read_tile_table(tiles).assign(label=pd.array([0] * 12, dtype="Int64")), old)
    write_tile_table(read_tile_table(tiles).assign(label=pd.array([1] * 12, dtype="Int64")), new)
    extra = ("--smoothgrad-samples", "0", "--workers", "0", "--batch-size", "3")
    killed = cli.process(*saliency_args(slide, old, tmp_path, "original", *extra), kill_at="saliency.batch=1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    rc, stdout, _ = run(cli, saliency_args(slide, new, tmp_path, "original", *extra))
    assert rc == 0 and "12 computed" in stdout
    assert pd.read_parquet(tmp_path / "original.parquet")["target"].tolist() == [1] * 12


def test_library_run_records_the_checkpoint_it_loads(slide: Path, tiles: Path, tmp_path: Path):
    """``run_saliency`` hashes the checkpoint itself: settings built without ``model_sha256`` must not
    record (and resume under) ``random-init`` for a trained model."""
    torch.manual_seed(1)
    checkpoint = tmp_path / "model.pt"
    torch.save(ss.load_model("resnet18", num_classes=2).state_dict(), checkpoint)
    three = tmp_path / "three.parquet"
    write_tile_table(read_tile_table(tiles).head(3), three)
    settings = saliency.SaliencySettings("resnet18", 2, "original", ("layer1",), smoothgrad_samples=0)
    options = saliency.RunOptions(tmp_path / "o.zarr", tmp_path / "o.parquet", workers=0, progress=False)
    saliency.run_saliency(slide, three, settings, options, checkpoint=checkpoint)
    meta, _ = read_store(tmp_path / "o.zarr")
    assert meta["settings"]["model_sha256"] == weights_sha256(checkpoint) != "random-init"


def test_segmentation_tiles_without_annotation_target_the_originals_predicted_majority(
    cli, slide: Path, tiles: Path, tmp_path: Path
):
    """No annotation (majority_class missing) is no label: the target is the original's predicted
    majority non-background class, as for unlabelled classification tiles, not the background."""
    table = read_tile_table(tiles).head(3).assign(majority_class=pd.array([None, 2, None], dtype="Int64"))
    seg_tiles = tmp_path / "seg-tiles.parquet"  # not --table: saliency never overwrites its input
    write_tile_table(table, seg_tiles)
    model, _, norm = load_with_surrogate("unet_resnet34", num_classes=3)
    with torch.no_grad():  # a model that predicts class 1 (not background) on some pixels
        model.get_submodule("segmentation_head.0").bias.copy_(torch.tensor([0.0, 0.5, -5.0]))
    checkpoint = tmp_path / "seg.pt"
    torch.save(model.state_dict(), checkpoint)
    args = [
        "saliency", str(slide), "--tiles", str(seg_tiles), "--arch", "unet_resnet34", "--num-classes", "3",
        "--checkpoint", str(checkpoint),
        "--task", "segmentation", "--method", "original", "--layers", "layer1", "--attributions", "gradient",
        "--smoothgrad-samples", "0", "--workers", "0", "--no-progress",
        "--out", str(tmp_path / "seg.zarr"), "--table", str(tmp_path / "seg.parquet"),
    ]  # fmt: skip
    assert run(cli, args)[0] == 0
    out = pd.read_parquet(tmp_path / "seg.parquet")
    x = torch.stack([TileDataset(table, transform=norm)[i][0] for i in range(3)])
    with torch.no_grad():
        predicted = ss.metrics.majority_label(model(x).argmax(1))
    assert predicted[[0, 2]].ne(0).any()  # the check can tell predicted from background
    assert out["target"].tolist() == [int(predicted[0]), 2, int(predicted[2])]
    assert out["pd_masked"].isna().all()  # method original; no mask where unannotated


def test_out_that_is_no_store_is_refused_not_deleted(cli, slide: Path, tiles: Path, tmp_path: Path):
    """``--out results/`` (the store name forgotten) must not wipe the folder at the end."""
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    args = saliency_args(slide, tiles, tmp_path, "original", "--smoothgrad-samples", "0")
    args[args.index("--out") + 1] = str(folder)
    rc, _, err = run(cli, args)
    assert (
        rc == 1 and err.count("\n") == 1 and f"{folder} exists and is a folder smoothsal did not write" in err
    )
    assert (folder / "notes.txt").read_text() == "keep me"


def test_precision_is_a_setting_recorded_in_the_store_and_guards_resume(
    cli, batch5: Path, slide: Path, tiles: Path, tmp_path: Path, caplog
):
    """`--precision bf16`: recorded in the store's and the table's metadata, float32 maps near the fp32
    run's, predictions in bf16 (the original's own prediction difference stays exactly 0); a bf16
    partial state is not resumed by an fp32 run, which starts over and gives the fp32 result."""
    bf16 = tmp_path / "bf16"
    args = saliency_args(slide, tiles, bf16, "forward_hook", "--workers", "0", "--precision", "bf16")
    assert run(cli, args)[0] == 0
    meta, maps = read_store(bf16 / "forward_hook.zarr")
    ref_meta, ref_maps = read_store(batch5 / "forward_hook.zarr")
    assert meta["settings"]["precision"] == "bf16" and ref_meta["settings"]["precision"] == "fp32"
    assert store.results_meta(bf16 / "forward_hook.parquet")["settings"]["precision"] == "bf16"
    for key, ref in ref_maps.items():  # random init: bf16 follows DeepLift closely, the gradient loosely
        assert maps[key].dtype == np.float32 and maps[key].shape == ref.shape
        a, b = torch.from_numpy(maps[key]).flatten(1), torch.from_numpy(ref).flatten(1)
        cosine = torch.nn.functional.cosine_similarity(
            a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        )
        assert float(cosine.min()) >= (0.95 if key.startswith("deeplift") else 0.5), (key, cosine)
    table, ref_table = (pd.read_parquet(d / "forward_hook.parquet") for d in (bf16, batch5))
    np.testing.assert_allclose(table["prob_1"], ref_table["prob_1"], atol=0.02)
    np.testing.assert_allclose(table["pd_all"], ref_table["pd_all"], atol=0.02)

    killed = cli.process(*args, "--batch-size", "3", kill_at="saliency.batch=1", timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    fp32 = saliency_args(slide, tiles, bf16, "forward_hook", "--workers", "0", "--batch-size", "5")
    shutil.rmtree(bf16 / "forward_hook.zarr")
    (bf16 / "forward_hook.parquet").unlink()
    rc, stdout, _ = run(cli, fp32)
    assert rc == 0 and "12 computed" in stdout and "resumed" not in stdout
    assert "other settings or tiles; starting over" in caplog.text
    assert_same_outputs(batch5, bf16)


# --- precision that knows the hardware (issue 24) ----------------------------------------------------

NO_NATIVE_BF16 = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}


def test_bf16_without_native_support_warns_and_auto_resolves_to_fp32(
    cli, slide: Path, tiles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """With the CPU's bf16 taken away (or absent), bf16 warns in one line naming the capability and
    records it; auto resolves to fp32 and is recorded as such."""
    for name, value in NO_NATIVE_BF16.items():
        monkeypatch.setenv(name, value)
    few = tmp_path / "few.parquet"
    write_tile_table(read_tile_table(tiles).head(2), few)
    for requested in ("bf16", "auto"):
        out = tmp_path / requested
        args = saliency_args(slide, few, out, "original", "--precision", requested, "--workers", "0")
        done = cli.process(*args)
        assert done.returncode == 0, done.stderr
        meta, _ = read_store(out / "original.zarr")
        assert meta["hardware"]["native_bf16"] is False and meta["hardware"]["capability"] == "AVX2"
        assert meta["precision_requested"] == requested
        assert pd.read_parquet(out / "original.parquet").shape[0] == 2
        lines = [line for line in done.stderr.splitlines() if "without native bf16" in line]
        if requested == "bf16":
            assert meta["settings"]["precision"] == "bf16" and len(lines) == 1
            assert "AVX2" in lines[0] and "slower than fp32" in lines[0], lines
        else:
            assert meta["settings"]["precision"] == "fp32" and not lines
            assert "precision_check" not in meta  # fp32 needs no check against itself


def test_auto_resolves_to_bf16_where_native():
    from smoothsal.hardware import hardware
    from smoothsal.precision import resolve_precision

    if not hardware("cpu").native_bf16:
        pytest.skip(f"this CPU has no native bf16 ({hardware('cpu').model}, {hardware('cpu').capability})")
    assert resolve_precision("auto", "cpu") == "bf16"


def test_bf16_run_checks_itself_and_the_report_flags_cells_beyond_the_gates(
    cli, slide: Path, tiles: Path, tmp_path: Path
):
    """Random weights fail the bf16 gates by design (bf16 follows their gradients poorly): the job
    records its fp32 check per attribution × layer, warns once per missed cell, and the report's
    check table marks exactly those cells."""
    few = tmp_path / "few.parquet"
    write_tile_table(read_tile_table(tiles).head(4), few)
    done = cli.process(
        *saliency_args(slide, few, tmp_path, "original", "--precision", "bf16", "--workers", "0")
    )
    assert done.returncode == 0, done.stderr
    meta, _ = read_store(tmp_path / "original.zarr")
    check = meta["precision_check"]
    assert check["precision"] == "bf16" and check["tiles"] == 4
    assert {(c["attribution"], c["layer"]) for c in check["cells"]} == {
        (a, layer) for a in ("gradient", "deeplift") for layer in LAYERS
    }
    missed = [c for c in check["cells"] if c["missed"]]
    assert missed, check  # random weights: at least one cell misses
    warnings = [line for line in done.stderr.splitlines() if "beyond the gates" in line]
    assert len(warnings) == len(missed)
    assert store.results_meta(tmp_path / "original.parquet")["precision_check"] == check
    cli("report", "--tables", tmp_path / "original.parquet", "--out", tmp_path / "report")
    table = pd.read_csv(tmp_path / "report" / "tables" / "precision_check.csv")
    assert sorted(zip(table["attribution"], table["layer"], strict=True)) == sorted(
        (c["attribution"], c["layer"]) for c in check["cells"]
    )
    flagged = {
        (a, layer)
        for a, layer, m in zip(table["attribution"], table["layer"], table["missed"].fillna(""), strict=True)
        if m
    }
    assert flagged == {(c["attribution"], c["layer"]) for c in missed}
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Low-precision check against fp32" in page and page.count("<strong>✗") == len(missed)
    precision = pd.read_csv(tmp_path / "report" / "tables" / "precision.csv")
    assert precision["precision"].tolist() == ["bf16"] and precision["requested"].tolist() == ["bf16"]


# --- tile tables that look valid but are not (issue 27, cases 2-4) ----------------------------------


def _corrupt(table: pd.DataFrame, kind: str, rng: np.random.Generator, width: int, height: int):
    """(corrupted table, its first bad row) for one seeded corruption of a valid tile table."""
    t = table.copy()
    i = int(rng.integers(len(t)))
    if kind == "duplicated":  # a copy of row j inserted after row i ≥ j: the copy is the first bad row
        j = int(rng.integers(i + 1))
        t = pd.concat([t.iloc[: i + 1], t.iloc[[j]], t.iloc[i + 1 :]], ignore_index=True)
        return t, i + 1
    if kind == "float":
        t["x"] = t["x"].astype(float)
        t.loc[i, "x"] += float(rng.choice([0.5, 0.25, -0.5]))
        return t, i
    t = t.astype({"x": np.int64, "y": np.int64})
    if kind == "shifted":  # half a tile or more past an edge
        column, limit = ("x", width) if rng.integers(2) else ("y", height)
        t.loc[i, column] = limit - int(t.loc[i, "w" if column == "x" else "h"]) // 2
    else:  # "outside": negative or far beyond the slide
        t.loc[i, "x" if rng.integers(2) else "y"] = int(rng.choice([-1, -64, 100000]))
    return t, i


def test_corrupted_tile_tables_are_refused_naming_the_first_bad_row(
    cli, slide: Path, tiles: Path, tmp_path: Path
):
    """Seeded corruptions (duplicated, shifted past an edge, non-integer, outside the slide): saliency
    refuses in one line naming the table and the first bad row, before computing anything."""
    from smoothsal.slides import open_reader

    reader = open_reader(slide)
    width, height = reader.level_dimensions[0]
    reader.close()
    table = read_tile_table(tiles)
    rng = np.random.default_rng(27)
    for case in range(16):
        kind = ("duplicated", "shifted", "float", "outside")[case % 4]
        bad, first = _corrupt(table, kind, rng, width, height)
        path = tmp_path / f"{case}-{kind}.parquet"
        write_tile_table(bad, path)
        code, _, err = run(cli, saliency_args(slide, path, tmp_path / str(case), "original"))
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1, (kind, err)
        assert str(path) in lines[0] and f"row {first} " in lines[0], (kind, first, lines[0])
        leftover = list((tmp_path / str(case)).glob("*original*"))
        assert not leftover, leftover  # nothing computed, no store or table written


def test_valid_tables_including_the_edge_tiles_tiles_emits_still_run(cli, slide: Path, tmp_path: Path):
    """Controls: the whole grid of `tiles` reaches the slide's edges; its edge tiles and a shuffled,
    integral-float copy run."""
    from smoothsal.slides import open_reader

    grid = tmp_path / "grid.parquet"
    cli("tiles", slide, "--tile-size", "64", "--target-mpp", "4", "--min-tissue", "0", "--out", grid)
    table = read_tile_table(grid)
    reader = open_reader(slide)
    width, height = reader.level_dimensions[0]
    reader.close()
    right, bottom = (table["x"] + table["w"]).idxmax(), (table["y"] + table["h"]).idxmax()
    edge = table.loc[[right, bottom]].drop_duplicates(["x", "y"])
    assert (edge["x"] + edge["w"]).max() > width - int(edge["w"].iloc[0])  # the last column of the grid
    assert (edge["y"] + edge["h"]).max() > height - int(edge["h"].iloc[0])
    control = tmp_path / "control.parquet"
    write_tile_table(edge.sample(frac=1, random_state=0).astype({"x": float, "y": float}), control)
    args = saliency_args(slide, control, tmp_path, "original", "--smoothgrad-samples", "0", "--workers", "0")
    assert run(cli, args)[0] == 0
    assert len(pd.read_parquet(tmp_path / "original.parquet")) == len(edge)


def test_non_finite_weights_and_values_are_refused(cli, slide: Path, tiles: Path, tmp_path: Path):
    """Issue 27 case 1: a NaN or Inf weight is refused when the checkpoint is loaded, naming the file and
    the tensor; finite weights that overflow to Inf logits fail the job naming the slide and tile."""
    import torchvision

    few = tmp_path / "few.parquet"
    write_tile_table(read_tile_table(tiles).head(3), few)
    state = torchvision.models.resnet18(num_classes=2).state_dict()
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        broken = {k: v.clone() for k, v in state.items()}
        broken["layer2.0.conv1.weight"][0, 0, 0, 0] = value
        checkpoint = tmp_path / f"{name}.pt"
        torch.save(broken, checkpoint)
        code, _, err = run(
            cli, [*saliency_args(slide, few, tmp_path / name, "original"), "--checkpoint", str(checkpoint)]
        )
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert str(checkpoint) in err and "layer2.0.conv1.weight" in err and "non-finite" in err
        assert not list((tmp_path / name).glob("original*"))
    huge = {k: v.clone() for k, v in state.items()}
    huge["fc.weight"].fill_(3e38)  # finite, but the logits overflow
    checkpoint = tmp_path / "huge.pt"
    torch.save(huge, checkpoint)
    args = [
        *saliency_args(slide, few, tmp_path / "huge", "original", "--batch-size", "1"),
        "--checkpoint",
        str(checkpoint),
    ]
    code, _, err = run(cli, args)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "slide CMU-1-Small-Region tile 0 " in err and "not finite" in err
    assert not (tmp_path / "huge" / "original.parquet").exists()


def test_tiles_too_small_for_a_layer_are_refused_naming_the_smallest_size(cli, slide: Path, tmp_path: Path):
    """Issue 27 case 8: 16-px tiles give 1×1 maps at layer3 (TV 0.0 written as a result before)."""
    small = tmp_path / "t16.parquet"
    cli("tiles", slide, "--tile-size", "16", "--max-tiles", "2", "--out", small)
    code, _, err = run(cli, saliency_args(slide, small, tmp_path, "original"))
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    # ResNet sides with padding 1: 17 → 9 (stem) → 5 (max pool) → 3 (layer2) → 2 (layer3); 16 → … → 1
    assert "layer 'layer3' gives 1×1 maps" in err and "--tile-size 17 or more" in err and str(small) in err
    args = saliency_args(slide, small, tmp_path, "original")
    args[args.index("--layers") + 1 : args.index("--layers") + 4] = ["layer1", "layer2"]
    assert run(cli, args)[0] == 0  # layer2 is 2×2 on 16-px tiles


def test_ctrl_c_keeps_the_finished_batches_and_the_rerun_equals_an_uninterrupted_run(
    cli, slide: Path, tiles: Path, tmp_path: Path
):
    """Issue 27 case 12: Ctrl-C (a real SIGINT after the first batch) prints one line saying what was kept
    and how to resume, exits 130; the rerun resumes and equals an uninterrupted run bit for bit."""
    extra = ("--workers", "0", "--batch-size", "4", "--smoothgrad-samples", "1")
    args = saliency_args(slide, tiles, tmp_path / "a", "original", *extra)
    interrupted = cli.process(*args, kill_at="saliency.batch=1/int")
    lines = interrupted.stderr.strip().splitlines()
    assert interrupted.returncode == 130 and len(lines) == 1, interrupted.stderr
    assert (
        lines[0].startswith("smoothsal saliency: interrupted: the finished batches are kept")
        and "resume" in lines[0]
    )
    out = tmp_path / "a" / "original.zarr"
    assert json.loads((store.partial_dir(out) / "progress.json").read_text())["batches"] == [[0, 4]]
    rc, stdout, _ = run(cli, args)
    assert rc == 0 and "resumed at tile 4" in stdout
    assert run(cli, saliency_args(slide, tiles, tmp_path / "b", "original", *extra))[0] == 0
    (_, resumed), (_, whole) = read_store(out), read_store(tmp_path / "b" / "original.zarr")
    assert resumed.keys() == whole.keys()
    assert all(np.array_equal(resumed[k], whole[k], equal_nan=True) for k in whole)
    a, b = (
        pd.read_parquet(tmp_path / "a" / "original.parquet"),
        pd.read_parquet(tmp_path / "b" / "original.parquet"),
    )
    pd.testing.assert_frame_equal(a, b, check_exact=True)


POOLING_NET = """
from torch import nn

def build(num_classes):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU(),
        nn.AvgPool2d(2), nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )
"""


def test_a_hook_method_that_changes_nothing_warns_and_the_store_says_so(
    cli, slide, tiles, tmp_path, monkeypatch, caplog
):
    """Issue 25: a network that downsamples only by pooling (a python: model) runs under the backward hook with
    one warning line, and its store records the warning, the ops changed (none) and the DeepLift rules."""
    (tmp_path / "pool.py").write_text(POOLING_NET)
    monkeypatch.chdir(tmp_path)
    args = saliency_args(slide, tiles, tmp_path, "backward_hook")
    args[args.index("resnet18")] = "python:pool.py:build"
    at = args.index("--layers") + 1
    args[at : at + len(LAYERS)] = ["layer1", "layer2"]  # 1/4 and 1/8: the net has no 1/16
    code, _, err = run(cli, args)
    assert code == 0, err
    warned = [
        line for line in (err + caplog.text).splitlines() if "changes nothing" in line
    ]  # in-process: logged
    assert len(warned) == 1 and "backward_hook changes nothing in" in warned[0]
    meta, _ = read_store(tmp_path / "backward_hook.zarr")
    assert meta["changed_ops"] == [] and len(meta["warnings"]) == 1
    assert "backward_hook changes nothing in arch 'python:pool.py:build'" in meta["warnings"][0]
    assert (
        meta["settings"]["arch"] == "python:pool.py:build"
        and len(meta["settings"]["model_code_sha256"]) == 64
    )
    assert meta["deeplift_rules"] == {
        "7": "rescale"
    }  # after layer1 (the ReLU "4"): the average pool is linear
