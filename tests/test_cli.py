"""The command line (smoothsal.cli): bad input is one line naming the file and the fix, exit status 1; a
bug shows its traceback; the defaults come from the settings dataclasses (and equal the config schema's);
a slide with corrupt tile data fails every command with one line naming it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest
import yaml
from helpers import CMU, DEMO_TILE_ARGS, ROOT, TISSUE_TILES, spec

from smoothsal import (
    attribution,
    demo,
    demo_models,
    evaluation,
    faithfulness,
    heatmaps,
    qupath,
    report,
    saliency,
    surrogate,
    tiling,
)
from smoothsal.cli import COMMANDS, build_parser, main
from smoothsal.cli.common import default
from smoothsal.compare import CompareSettings
from smoothsal.errors import BadSlide
from smoothsal.grid import TileGridSettings
from smoothsal.models import IMAGENET_MEAN, IMAGENET_STD
from smoothsal.slides import open_slide
from smoothsal.smoothing import METHODS
from smoothsal.store import StoreWriter
from smoothsal.surrogate_run import RunOptions as TrainRunOptions
from smoothsal.tiles import load_tile, read_tile_table, tiles_sha256, write_tile_table
from smoothsal.tissue import TissueMaskSettings

# --- one line for bad input, a traceback for a bug ------------------------------------------------


def test_output_path_that_is_a_directory(cli, slides_dir, tmp_path):
    err = cli("tiles", slides_dir / CMU, "--out", tmp_path, expect=1).err
    assert err.count("\n") == 1 and err.startswith("smoothsal tiles: error: ")
    assert f"{tmp_path} is a directory; give a file path for --out, e.g. {tmp_path / 'out'}" in err
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_corrupt_checkpoint(cli, tiles_dir, tmp_path):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"not a torch file")
    err = cli(
        "compare", tiles_dir / "no-tissue.png", "--checkpoint", bad, "--out", tmp_path / "f.png", expect=1
    ).err
    assert err.count("\n") == 1
    assert f"checkpoint {bad} could not be read as a torch file" in err and "torch.save" in err


@pytest.mark.parametrize("form", ["torchscript", "pickled module"])
def test_a_torchscript_or_pickled_model_is_one_line_saying_why_and_how_to_save_its_weights(
    cli, tiles_dir, tmp_path, form
):
    """Issue 25: hooks and module replacement need an eager model built by code, and a pickled module runs code
    when loaded: one line each with a fix the user can follow, no torch warnings and no "weights_only=False"."""
    import warnings

    import torch
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=2)
    path = tmp_path / "model.pt"
    with warnings.catch_warnings():  # torch.jit.script is deprecated (FutureWarning), still what users have
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), path) if form == "torchscript" else torch.save(model, path)
    err = cli(
        "compare", tiles_dir / "no-tissue.png", "--checkpoint", path, "--out", tmp_path / "f.png", expect=1
    ).err
    assert err.count("\n") == 1 and "Traceback" not in err and "weights_only" not in err, err
    if form == "torchscript":
        assert f"checkpoint {path} is a TorchScript archive, which cannot be explained" in err
        assert "torch.jit.load(PATH).state_dict()" in err
    else:
        assert f"checkpoint {path} holds a pickled torchvision.models.resnet.ResNet" in err
        assert "runs code from the file: if you trust the file, pass --allow-pickle" in err
    assert "torch.save(model.state_dict(), PATH)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no output written


def test_a_pickled_module_loads_with_the_explicit_opt_in(cli, tiles_dir, tmp_path):
    """--allow-pickle: the whole module's weights go into --arch's model (the same maps as its state dict)."""
    import torch
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=2)
    torch.save(model, tmp_path / "model.pt")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    args = ("compare", tiles_dir / "no-tissue.png", "--size", "64", "--samples", "0")
    pickled = cli(*args, "--checkpoint", tmp_path / "model.pt", "--allow-pickle", "--out", tmp_path / "a.png").out
    plain = cli(*args, "--checkpoint", tmp_path / "weights.pt", "--out", tmp_path / "b.png").out
    assert "TV" in pickled and pickled.splitlines()[:-1] == plain.splitlines()[:-1]


def test_a_tile_too_small_for_the_model_is_one_line_naming_the_option(cli, tiles_dir, tmp_path):
    """The bundle's head pools 7×7: a 64-px tile is too small; said before any forward pass fails."""
    err = cli("compare", tiles_dir / "no-tissue.png", "--arch", "monai_fc_resnet18", "--num-classes", "1",
              "--size", "64", "--samples", "1", "--out", tmp_path / "f.png", expect=1).err  # fmt: skip
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "a 64-px tile is too small for arch 'monai_fc_resnet18'" in err and "use a larger --size" in err
    assert "Output size is too small" in err  # torch's own reason, kept
    assert not (tmp_path / "f.png").exists()


@pytest.mark.parametrize(
    "option,message",
    [(["--mask-mpp", "0"], "--mask-mpp 8"), (["--max-tiles", "-1"], "--max-tiles must be >= 0")],
)
def test_tiles_settings_out_of_range(cli, slides_dir, tmp_path, option, message):
    err = cli("tiles", slides_dir / CMU, "--out", tmp_path / "t.parquet", *option, expect=1).err
    assert err.count("\n") == 1 and message in err


def test_a_bug_inside_a_stage_shows_its_traceback(cli, slides_dir, tmp_path, monkeypatch):
    """Only user-facing errors become one line: anything else (here an IndexError inside the tiles
    stage) propagates with its traceback, in the process and from the real command."""

    def broken(*args, **kwargs):
        raise IndexError("list index out of range (a bug)")

    monkeypatch.setattr(tiling, "label_tiles", broken)
    with pytest.raises(IndexError, match="a bug"):
        cli("tiles", slides_dir / CMU, "--out", tmp_path / "t.parquet")
    assert not (tmp_path / "t.parquet").exists()
    done = cli.process("train-surrogate", "--arch", "resnet18", "--num-classes", "2", "--tiles",
                       tmp_path / "none.parquet", "--out", tmp_path / "s.pt", "--batch-size", "0")  # fmt: skip
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize("name", [c.replace("_", "-") for c in COMMANDS])
def test_every_command_prints_its_help(name, capsys):
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: smoothsal {name} ")


def test_a_command_loads_its_own_stage_only():
    """`smoothsal tiles` (10 jobs of the demo) does not import the maps' or the report's libraries."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom smoothsal.cli import main\ntry:\n    main(['tiles', '--help'])\nexcept SystemExit:\n"
        "    pass\nprint(sorted(m for m in ('matplotlib', 'torchvision', 'zarr', 'smoothsal.saliency', "
        "'smoothsal.report', 'smoothsal.faithfulness') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.splitlines()[-1] == "[]"
    done = subprocess.run(
        [sys.executable, "-c", code.replace("main(['tiles', '--help'])", "main(['--help'])")],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    assert "smoothsal.report" in done.stdout.splitlines()[-1]  # the full help loads every command


# --- defaults: the settings dataclasses, and the config schema ------------------------------------


def parsed(*args: str) -> dict:
    return vars(build_parser().parse_args(list(args)))


def test_every_default_comes_from_a_settings_dataclass():
    g, m, s, o = TileGridSettings, TissueMaskSettings, saliency.SaliencySettings, saliency.RunOptions
    t, h, r, e = (
        surrogate.TrainSettings,
        heatmaps.HeatmapSettings,
        report.ReportSettings,
        evaluation.EvalSettings,
    )
    expected = {
        ("tiles", "s.svs", "--out", "t"): {
            "tile_size": default(g, "tile_size"), "stride": default(g, "stride"),
            "target_mpp": default(g, "target_mpp"), "level": default(g, "level"),
            "min_tissue": default(g, "min_tissue"), "max_tiles": default(g, "max_tiles"), "seed": default(g, "seed"),
            "label_threshold": default(tiling.LabelSettings, "threshold"), "mask_mpp": default(m, "mask_mpp"),
            "min_saturation": default(m, "min_saturation"), "closing_um": default(m, "closing_um"),
            "min_object_um2": default(m, "min_object_um2"), "min_hole_um2": default(m, "min_hole_um2"),
        },
        ("train-surrogate", "--arch", "a", "--num-classes", "2", "--tiles", "t", "--out", "o"): {
            "epochs": default(t, "epochs"), "batch_size": default(t, "batch_size"), "lr": default(t, "lr"),
            "seed": default(t, "seed"), "amp": default(t, "amp"),
            **{k: default(t, k) for k in ("patience", "min_delta", "val_fraction", "val_min_tiles")},
            "checkpoint_every": default(TrainRunOptions, "checkpoint_every"),
            "resume": default(TrainRunOptions, "resume"), "progress": default(TrainRunOptions, "progress"),
        },
        ("evaluate", "--arch", "a", "--num-classes", "2", "--tiles", "t", "--out", "o"): {
            "methods": list(default(e, "methods")), "target": default(e, "target"),
            "batch_size": default(e, "batch_size"),
        },
        ("compare", "t.png", "--out", "o"): {
            "layer": default(CompareSettings, "layer"), "target": default(CompareSettings, "target"),
            "size": default(CompareSettings, "size"), "samples": default(CompareSettings, "samples"),
            "stdev": default(CompareSettings, "stdev"),
        },
        ("saliency", "s", "--arch", "a", "--num-classes", "2", "--tiles", "t", "--method", "original",
         "--layers", "layer1", "--out", "o", "--table", "t"): {
            "attributions": list(default(s, "attributions")), "smoothgrad_samples": default(s, "smoothgrad_samples"),
            "smoothgrad_stdev": default(s, "smoothgrad_stdev"), "seed": default(s, "seed"),
            "target": default(s, "target"), "task": default(s, "task"), "dataset": default(s, "dataset"),
            "precision": default(s, "precision"), "batch_size": default(o, "batch_size"), "device": default(o, "device"), "progress": default(o, "progress"),
        },
        ("heatmaps", "s", "--saliency", "m", "--tiles", "t", "--out", "o"): {
            "tissue_mpp": default(h, "tissue_mpp"), "tissue": default(h, "tissue"), "blend": default(h, "blend"),
            "ngff": default(h, "ngff"), "chunk": default(h, "chunk"),
        },
        ("report", "--tables", "t", "--out", "o"): {
            "title": default(r, "title"), "percentile": default(r, "percentile"), "alpha": default(r, "alpha"),
            "thumbnail_px": default(r, "thumbnail_px"),
        },
        ("demo-data", "--out", "o"): {"size": default(demo.DemoSettings, "size"), "seed": default(demo.DemoSettings, "seed")},
        ("faithfulness", "s", "--tiles", "t", "--saliency", "m", "--method", "original", "--arch", "a",
         "--num-classes", "2", "--out", "o", "--randomisation-out", "r"): {
            k: default(faithfulness.FaithfulnessSettings, k)
            for k in ("sample", "steps", "baseline", "blur_um", "randomisation", "by", "batchnorm", "seed")
        } | {k: default(faithfulness.FaithfulnessOptions, k) for k in ("batch_size", "device", "dataset")},
        ("train-model", "--arch", "a", "--num-classes", "2", "--tiles", "t", "--out", "o"): {
            k: default(demo_models.ModelSettings, k) for k in ("epochs", "batch_size", "lr", "seed")
        },
    }  # fmt: skip
    for args, defaults in expected.items():
        got = parsed(*args)
        assert {k: got[k] for k in defaults} == defaults, args[0]
    # and they are what the settings are when built with no arguments
    assert default(g, "tile_size") == g().tile_size == 224 and default(s, "smoothgrad_samples") == 20
    # the commands of issue 17: QuPath export, seams
    x = qupath.ExportSettings
    assert {k: parsed("export", "c.ome.zarr", "--map", "m/a/l", "--out", "o")[k] for k in
            ("percentiles", "min_pixels", "object_type")} == {"percentiles": list(default(x, "percentiles")),
            "min_pixels": default(x, "min_pixels"), "object_type": default(x, "object_type")}  # fmt: skip
    got = parsed(
        "seams", "s", "--saliency", "m", "--tiles", "t", "--without", "w", "--with", "o", "--table", "t"
    )
    assert (got["tissue_mpp"], got["ngff"]) == (default(h, "tissue_mpp"), default(h, "ngff"))


def test_the_config_schemas_defaults_are_the_settings_defaults():
    """The workflow passes the config's settings to the commands: the schema's defaults (what a config
    leaves out) must be the library's, or a workflow run and a plain command would differ."""
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    top, dataset = schema["properties"], schema["$defs"]["dataset"]["properties"]

    def defaults(node: dict) -> dict:
        return {k: v["default"] for k, v in node["properties"].items() if "default" in v}

    g, m, s, o = TileGridSettings, TissueMaskSettings, saliency.SaliencySettings, saliency.RunOptions
    tiles = {
        k: default(g, k)
        for k in ("tile_size", "target_mpp", "level", "stride", "min_tissue", "max_tiles", "seed")
    }
    tiles |= {
        k: default(m, k)
        for k in ("mask_mpp", "min_saturation", "closing_um", "min_object_um2", "min_hole_um2")
    }
    tiles |= {"label_threshold": default(tiling.LabelSettings, "threshold")}
    # target_mpp and level exclude each other: the schema leaves target_mpp null so that `level` alone
    # works, and the rule passes neither flag then, so the command's own default applies
    assert tiles.pop("target_mpp") == 0.5
    tiles["target_mpp"] = None
    assert defaults(dataset["tiles"]) == tiles
    assert defaults(dataset["surrogate"]) == {
        k: default(surrogate.TrainSettings, k)
        for k in ("epochs", "batch_size", "lr", "seed", "amp")
        + ("patience", "min_delta", "val_fraction", "val_min_tiles", "init")  # issue 14
    }
    assert defaults(schema["$defs"]["train"]) == {
        k: default(demo_models.ModelSettings, k) for k in ("epochs", "batch_size", "lr", "seed")
    }
    assert defaults(top["smoothgrad"]) == {
        "samples": default(s, "smoothgrad_samples"),
        "stdev": default(s, "smoothgrad_stdev"),
        "seed": default(s, "seed"),
    }
    assert defaults(top["saliency"]) == {
        "batch_size": default(o, "batch_size"),
        "device": default(o, "device"),
        "precision": default(s, "precision"),
    }
    assert defaults(top["heatmaps"]) == {
        k: default(heatmaps.HeatmapSettings, k) for k in ("blend", "tissue_mpp", "ngff")
    }
    fa = faithfulness.FaithfulnessSettings, faithfulness.FaithfulnessOptions
    assert defaults(top["faithfulness"]) == {"enabled": True} | {
        k: default(fa[0], k)
        for k in ("sample", "steps", "baseline", "blur_um", "randomisation", "by", "batchnorm", "seed")
    } | {k: default(fa[1], k) for k in ("batch_size", "device")}
    assert {k: v for k, v in defaults(top["demo"]).items() if k != "out"} == {
        k: default(demo.DemoSettings, k) for k in ("size", "seed")
    }
    assert dataset["target"]["default"] == default(s, "target") and dataset["task"]["default"] == default(
        s, "task"
    )
    model = dataset["model"]["properties"]
    assert (tuple(model["mean"]["default"]), tuple(model["std"]["default"])) == (IMAGENET_MEAN, IMAGENET_STD)
    assert top["methods"]["default"] == list(METHODS) and top["attributions"]["default"] == list(
        attribution.ATTRIBUTIONS
    )


def test_the_seams_schema_defaults_are_the_tilings():
    """config seams: no slide unless listed; the whole slide unless a region is given (the tiling's default)."""
    seams = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())["properties"][
        "seams"
    ]
    assert {k: v["default"] for k, v in seams["properties"].items()} == {
        "slides": [],
        "roi": default(TileGridSettings, "roi"),
    }


# --- a slide whose tile data is corrupt -----------------------------------------------------------


@pytest.fixture(scope="module")
def corrupt(slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A copy of CMU-1-Small-Region.svs with 45 % of its bytes, after the header and before the TIFF
    directories, overwritten with seeded random bytes: OpenSlide opens it, its tiles' JPEGs are damaged.
    Beside it: a tile table of it (the grid of the intact slide) and a saliency store of those tiles."""
    d = tmp_path_factory.mktemp("corrupt")
    good, bad = d / "good" / CMU, d / "bad" / CMU
    for path in (good, bad):
        path.parent.mkdir()
        shutil.copyfile(slides_dir / CMU, path)
    size = bad.stat().st_size
    with open(bad, "r+b") as f:
        f.seek(200_000)  # level 0's tile data runs from byte 16 to 1,275,950; its directory follows
        f.write(np.random.default_rng(0).integers(0, 256, int(0.45 * size), dtype=np.uint8).tobytes())
    with openslide.OpenSlide(bad) as reader:
        assert reader.dimensions == (2220, 2967)  # the header and directory still read
    with openslide.OpenSlide(bad) as reader, pytest.raises(openslide.OpenSlideError, match="JPEG"):
        reader.read_region((1000, 1500), 0, (240, 240))
    table_path = d / "tiles.parquet"
    write_tile_table(tiling.make_tiles(good, d / "good.parquet", tiling.TilingSettings(
        TileGridSettings(tile_size=64, target_mpp=2.0, max_tiles=8, seed=0))).table.assign(
        slide_path=str(bad), label=pd.array([0, 1] * 4, dtype="Int64")), table_path)  # fmt: skip
    table = read_tile_table(table_path, bad)
    damaged = 0
    for _, row in table.iterrows():
        try:
            load_tile(row)
        except BadSlide:
            damaged += 1
    assert 0 < damaged < len(table)
    meta = {"version": "test", "slide_id": str(table["slide_id"].iloc[0]), "slide_path": str(bad),
            "method": "original", "layers": ["layer1"], "attributions": ["gradient"], "settings": {},
            "tiles_sha256": tiles_sha256(table), "n_tiles": len(table)}  # fmt: skip
    writer = StoreWriter(d / "original.zarr", d / "original.parquet", meta)
    writer.open({"layer1": (16, 16)}, 64)
    maps = {("gradient", "layer1"): np.ones((len(table), 16, 16), np.float32)}
    writer.write_batch(0, len(table), maps, pd.DataFrame({"tile": np.arange(len(table))}))
    writer.finish()
    return {"slide": bad, "tiles": table_path, "store": d / "original.zarr", "dir": d}


def corrupt_commands(c: dict[str, Path]) -> dict[str, list[object]]:
    model = ["--arch", "resnet18", "--num-classes", "2", "--tiles", c["tiles"], "--workers", "1"]
    out = c["dir"] / "out"
    return {
        "tiles": ["tiles", c["slide"], "--out", out / "t.parquet"],
        "saliency": ["saliency", c["slide"], *model, "--method", "original", "--layers", "layer1",
                     "--smoothgrad-samples", "0", "--no-progress", "--out", out / "m.zarr", "--table", out / "m.parquet"],
        "heatmaps": ["heatmaps", c["slide"], "--saliency", c["store"], "--tiles", c["tiles"], "--no-progress",
                     "--out", out / "h.ome.zarr"],
        "train-surrogate": ["train-surrogate", *model, "--epochs", "1", "--batch-size", "4", "--no-progress",
                            "--out", out / "s.pt"],
        "evaluate": ["evaluate", *model, "--out", out / "e.csv"],
    }  # fmt: skip


@pytest.mark.parametrize("command", ["tiles", "saliency", "heatmaps", "train-surrogate", "evaluate"])
def test_corrupt_tile_data_is_one_line_naming_the_slide_in_every_command(cli, corrupt, command):
    """Tile reads in DataLoader worker processes (saliency, train-surrogate, evaluate: --workers 1)
    included: the error crosses the worker boundary as itself."""
    err = cli(*corrupt_commands(corrupt)[command], expect=1).err
    assert err.count("\n") == 1 and err.startswith(f"smoothsal {command}: error: {corrupt['slide']}: ")
    assert "cannot be read (Not a JPEG file" in err and "the file is damaged" in err
    assert "Traceback" not in err and "DataLoader worker" not in err
    out = corrupt["dir"] / "out"  # nothing that looks finished (saliency keeps its hidden work state)
    assert not out.exists() or not [p.name for p in out.iterdir() if not p.name.startswith(".")]


# --- a slide replaced after `tiles` (issue 27, case 5) ------------------------------------------------


def replace_slide(slide: Path, by: Path) -> None:
    """``by``'s content at ``slide``, with an older modification time than before (as `cp -p` may give)."""
    before = slide.stat().st_mtime_ns
    shutil.copyfile(by, slide)
    os.utime(slide, ns=(before - 86_400 * 10**9,) * 2)


def tiled_copy(cli, demo_dir: Path, d: Path) -> tuple[Path, Path]:
    """A copy of a demo slide and its tile table (4 tiles), made by `smoothsal tiles`."""
    slide, tiles = d / "slide.tif", d / "tiles.parquet"
    shutil.copyfile(demo.slide_paths(demo_dir, spec("tumor_001"))[0], slide)
    cli("tiles", slide, "--out", tiles, *DEMO_TILE_ARGS, "--max-tiles", "4")
    return slide, tiles


def saliency_of(slide: Path, tiles: Path, out: Path) -> list[object]:
    return ["saliency", slide, "--tiles", tiles, "--arch", "resnet18", "--num-classes", "2", "--method",
            "original", "--layers", "layer1", "--smoothgrad-samples", "0", "--no-progress",
            "--out", out / "original.zarr", "--table", out / "original.parquet"]  # fmt: skip


@pytest.fixture(scope="module")
def replaced(cli, demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A demo slide's copy, its tile table and a saliency store made from it (touched first: a newer
    modification time alone changes nothing); then its content replaced by another demo slide of the same
    size, with an older modification time."""
    d = tmp_path_factory.mktemp("replaced")
    slide, tiles = tiled_copy(cli, demo_dir, d)
    os.utime(slide)
    cli(*saliency_of(slide, tiles, d))  # the unchanged slide runs as before
    other = demo.slide_paths(demo_dir, spec("normal_001"))[0]
    with open_slide(slide) as a, open_slide(other) as b:
        assert a.dimensions == b.dimensions
    replace_slide(slide, other)
    return {"slide": slide, "tiles": tiles, "store": d / "original.zarr", "dir": d}


def replaced_commands(slide: Path, tiles: Path, store: Path, out: Path) -> dict[str, list[object]]:
    """Every command that reads the slide again, writing under ``out``."""
    model = ["--arch", "resnet18", "--num-classes", "2"]
    return {
        "saliency": saliency_of(slide, tiles, out),
        "heatmaps": ["heatmaps", slide, "--saliency", store, "--tiles", tiles, "--no-progress", "--out",
                     out / "h.ome.zarr"],
        "seams": ["seams", slide, "--saliency", store, "--tiles", tiles, "--without", out / "w.ome.zarr",
                  "--with", out / "o.ome.zarr", "--table", out / "s.csv"],
        "faithfulness": ["faithfulness", slide, "--tiles", tiles, "--saliency", store, "--method", "original",
                         *model, "--out", out / "f.parquet", "--randomisation-out", out / "r.parquet"],
        "train-surrogate": ["train-surrogate", *model, "--tiles", tiles, "--epochs", "1", "--no-progress",
                            "--out", out / "s.pt"],
        "evaluate": ["evaluate", *model, "--tiles", tiles, "--out", out / "e.csv"],
    }  # fmt: skip


@pytest.mark.parametrize(
    "command", ["saliency", "heatmaps", "seams", "faithfulness", "train-surrogate", "evaluate"]
)
def test_a_slide_replaced_after_tiles_is_refused_by_every_command_that_reads_it(cli, replaced, command):
    """Issue 27 case 5: another image of the same size at the slide's path, older than before, was read
    under the old grid and labels (exit 0); now one line names the slide, the table and the fix."""
    r = replaced
    err = cli(*replaced_commands(r["slide"], r["tiles"], r["store"], r["dir"] / "out")[command], expect=1).err
    assert err.count("\n") == 1 and err.startswith(f"smoothsal {command}: error: slide {replaced['slide']} ")
    assert f"is not the file that tile table {replaced['tiles']} was made from" in err
    assert f"smoothsal tiles {replaced['slide']} --out {replaced['tiles']}" in err
    out = r["dir"] / "out"  # nothing that looks finished (hidden locks and work state aside)
    assert not out.exists() or not [p.name for p in out.iterdir() if not p.name.startswith(".")]


def test_a_slide_replaced_by_one_of_another_size_is_one_line_not_an_index_error(
    cli, demo_dir, slides_dir, tmp_path
):
    """Issue 27 case 5: a one-level slide at the path of a table of level-1 tiles was an IndexError."""
    slide, tiles = tiled_copy(cli, demo_dir, tmp_path)
    replace_slide(slide, slides_dir / CMU)
    commands = replaced_commands(slide, tiles, tmp_path / "none.zarr", tmp_path / "out")
    for command in ("saliency", "train-surrogate"):  # a table read with its slide, and as one of many
        err = cli(*commands[command], expect=1).err
        assert err.count("\n") == 1 and "Traceback" not in err and "IndexError" not in err, err
        assert f"slide {slide} is not the file that tile table {tiles} was made from" in err


def test_tile_tables_from_before_the_fingerprint_are_read_with_one_warning(
    cli, demo_dir, slides_dir, tmp_path, caplog
):
    """A table of format 1 (no fingerprint, as `smoothsal tiles` wrote before) still runs, with one warning
    naming it; a slide of another size replaced under it is still one line (the slide has no such level)."""
    slide, tiles = tiled_copy(cli, demo_dir, tmp_path)
    old = tmp_path / "old.parquet"
    read_tile_table(tiles).to_parquet(old, index=False)  # how tile tables were written before format 2
    cli(*saliency_of(slide, old, tmp_path / "a"))
    warned = [r.getMessage() for r in caplog.records if r.name == "smoothsal.tiles"]
    assert len(warned) == 1 and str(old) in warned[0] and "predates slide fingerprints" in warned[0], warned
    replace_slide(slide, slides_dir / CMU)
    err = cli(*saliency_of(slide, old, tmp_path / "b"), expect=1).err
    assert err.count("\n") == 1 and "Traceback" not in err and str(old) in err, err
    assert "slide slide.tif has no level 1 (levels 0 to 0)" in err


# --- issue 18, case 14: each a message naming the file or option and the fix -------------------------


def case_14_args(name: str, slides_dir: Path, tiles_dir: Path, tmp_path: Path) -> tuple[list[object], str]:
    slide = slides_dir / CMU
    tiles = tmp_path / "t.parquet"
    if name in ("layers fc", "smoothgrad stdev nan"):
        with open_slide(slide) as opened:
            table = tiling.tile_slide(
                opened, TileGridSettings(tile_size=64, target_mpp=2.0, max_tiles=2)
            ).table
        write_tile_table(table, tiles)
    sal = ["saliency", slide, "--tiles", tiles, "--arch", "resnet18", "--num-classes", "2", "--method",
           "original", "--no-progress", "--out", tmp_path / "m.zarr", "--table", tmp_path / "m.parquet"]  # fmt: skip
    (tmp_path / "dir.svs").mkdir()
    (tmp_path / "figures").mkdir()
    return {
        "layers fc": ([*sal, "--layers", "fc"], "layer 'fc' gives outputs of shape [2] per tile, not maps"),
        "smoothgrad stdev nan": ([*sal, "--layers", "layer1", "--smoothgrad-stdev", "nan"],
                                 "--smoothgrad-stdev must be a finite number >= 0, got nan"),
        "min tissue 2": (["tiles", slide, "--min-tissue", "2", "--out", tiles],
                         "--min-tissue is a tissue fraction in [0, 1], got 2.0"),
        "directory as slide": (["tiles", tmp_path / "dir.svs", "--out", tiles],
                               f"{tmp_path / 'dir.svs'}: is a directory, not a slide file"),
        "compare --out DIR": (["compare", tiles_dir / TISSUE_TILES[0], "--size", "64", "--out",
                               tmp_path / "figures"],
                              f"{tmp_path / 'figures'} is a directory; give a file path for --out"),
    }[name]  # fmt: skip


@pytest.mark.parametrize(
    "name", ["layers fc", "smoothgrad stdev nan", "min tissue 2", "directory as slide", "compare --out DIR"]
)
def test_case_14_bad_options_and_paths_are_one_line_naming_them(cli, slides_dir, tiles_dir, tmp_path, name):
    args, message = case_14_args(name, slides_dir, tiles_dir, tmp_path)
    err = cli(*args, expect=1).err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
