"""Outputs written whole or not at all, and never over what is not ours."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import CMU, TISSUE_TILES

from smoothsal import container, files, report, store
from smoothsal.container import open_container
from smoothsal.errors import BadOutput
from smoothsal.viewer.export import KIND as EXPORT_KIND

KIND = files.OutputKind("test-output", "smoothsal test")


def test_atomic_path_appears_only_when_the_block_completes(tmp_path):
    out = tmp_path / "sub" / "t.txt"
    with pytest.raises(RuntimeError, match="killed"), files.atomic_path(out) as tmp:
        tmp.write_text("half")
        assert files.partial_paths(out) == [tmp]  # the temporary sits beside it, hidden
        raise RuntimeError("killed")
    assert not out.exists() and files.partial_paths(out) == []
    with files.atomic_path(out) as tmp:
        tmp.write_text("whole")
    assert out.read_text() == "whole" and files.partial_paths(out) == []
    with (
        pytest.raises(BadOutput, match=r"is a directory; give a file path for --out, e.g. .*/out"),
        files.atomic_path(tmp_path),
    ):
        pass


def test_an_unwritable_output_is_bad_output_naming_it(tmp_path):
    """The OS refusing the write (here: a parent that is a file, which no permission bit lets one bypass)."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    match = r"notes\.txt/t\.txt: cannot be written .*give an --out you may write to"
    with pytest.raises(BadOutput, match=match), files.atomic_path(blocker / "t.txt") as tmp:
        tmp.write_text("x")
    with (
        pytest.raises(BadOutput, match=r"notes\.txt/d: cannot be written"),
        files.atomic_dir(blocker / "d", print),
    ):
        pass
    assert blocker.read_text() == "mine"


def test_atomic_dir_replaces_only_what_the_check_accepts(tmp_path):
    out = tmp_path / "d"
    with files.atomic_dir(out, lambda p: None) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("1")
    with files.atomic_dir(out, lambda p: None) as tmp:
        tmp.mkdir()
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]  # replaced as a whole

    def refuse(path):
        raise BadOutput(f"{path} is not ours")

    with pytest.raises(BadOutput, match="is not ours"), files.atomic_dir(out, refuse):
        pass
    assert (out / "b").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # the lock file went with the lock


def tree(path):
    """Every file and folder under ``path`` with its bytes (folders: None), to compare byte for byte."""
    return {
        str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))
    }


def test_output_dir_replaces_only_its_own_kind_and_marks_what_it_writes(tmp_path):
    out = tmp_path / "d"
    with files.output_dir(out, KIND) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("1")
    assert KIND.carried_by(files.read_marker(out))
    marker = {"kind": "test-output", "format": 1, "entries": ["a"]}  # the record of what it holds
    assert json.loads((out / files.MARKER_FILE).read_text()) == marker
    with files.output_dir(out, KIND) as tmp:  # ours: replaced as a whole
        tmp.mkdir()
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [files.MARKER_FILE, "b"]

    other = files.OutputKind("test-output", "smoothsal test", format=2)  # same kind, other format
    refused = r"d exists and is a test-output \(format 1\); `smoothsal test` replaces only a test-output \(format 2\) it wrote"
    with pytest.raises(BadOutput, match=refused), files.output_dir(out, other):
        pass
    empty = tmp_path / "empty"
    empty.mkdir()
    with files.output_dir(empty, KIND) as tmp:  # an empty folder holds nothing to lose
        tmp.mkdir()
    assert KIND.carried_by(files.read_marker(empty))
    made = tmp_path / "made"  # what Snakemake leaves before a job: the folders of the rule's outputs
    (made / "figures" / "overview").mkdir(parents=True)
    with files.output_dir(made, KIND) as tmp:
        tmp.mkdir()
    assert KIND.carried_by(files.read_marker(made))
    nested = tmp_path / "nested"  # a file however deep is something to lose
    (nested / "a" / "b").mkdir(parents=True)
    (nested / "a" / "b" / "mine.csv").write_text("x")
    with pytest.raises(BadOutput, match="nested exists"), files.output_dir(nested, KIND):
        pass
    assert (nested / "a" / "b" / "mine.csv").read_text() == "x"


@pytest.mark.parametrize(
    "case", ["hidden files", "zarr of another program", "zarr of another kind", "a file"]
)
def test_output_dir_refuses_and_leaves_untouched_what_it_did_not_write(tmp_path, case):
    out = tmp_path / "out"
    if case == "hidden files":
        (out / ".git").mkdir(parents=True)
        (out / ".env").write_text("secret")
        (out / "tables").mkdir()
        (out / "tables" / "mine.csv").write_text("a,b")
    elif case == "a file":
        out.write_text("notes")
    else:
        group = zarr.open_group(out, mode="w", zarr_format=2)
        if case == "zarr of another kind":
            group.attrs[files.MARKER_KEY] = {"kind": "saliency-store", "format": 1}
    before = tree(tmp_path)
    refused = r"^\S*out exists and is .*give a new --out or remove it yourself$"
    with pytest.raises(BadOutput, match=refused), files.output_dir(out, KIND) as tmp:
        tmp.mkdir()
    assert tree(tmp_path) == before


def test_a_second_writer_fails_at_once_and_the_lock_dies_with_the_first(tmp_path):
    out = tmp_path / "locked"
    script = (
        "import sys, time; from smoothsal import files\n"
        "with files.output_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        began = time.monotonic()
        locked = r"locked is being written by another process \(it holds \.locked\.lock\)"
        with pytest.raises(BadOutput, match=locked), files.output_dir(out, KIND):
            pass
        assert time.monotonic() - began < 1  # no waiting
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs, the OS drops the lock
        holder.wait()
    with files.output_dir(out, KIND) as tmp:
        tmp.mkdir()
    assert KIND.carried_by(files.read_marker(out))


def test_partials_of_killed_writers_are_cleared_by_the_next_writer(tmp_path):
    out = tmp_path / "o"
    stale = tmp_path / ".o.partial-99999"
    stale.mkdir()
    (stale / "half").write_text("x")
    with files.output_dir(out, KIND) as tmp:
        assert tmp.name == f".o.partial-{__import__('os').getpid()}" and not stale.exists()
        tmp.mkdir()


# --- the rule through every command: real slides, real outputs ----------------------------------------


@pytest.fixture(scope="module")
def made(cli, slides_dir, tmp_path_factory) -> dict[str, Path]:
    """One real output of each directory-writing command on 6 tiles of a real slide (random ResNet18,
    SmoothGrad 1), and the inputs they were made from."""
    d = tmp_path_factory.mktemp("made")
    paths = {"slide": slides_dir / CMU, "tiles": d / "tiles.parquet", "store": d / "original.zarr",
             "table": d / "original.parquet", "container": d / "cmu.ome.zarr", "report": d / "report",
             "export": d / "export", "tile_png": slides_dir.parent / "tiles" / TISSUE_TILES[0]}  # fmt: skip
    cli("tiles", paths["slide"], "--tile-size", "64", "--target-mpp", "2.0", "--max-tiles", "6",
        "--out", paths["tiles"])  # fmt: skip
    for name in ("saliency", "heatmaps", "report", "export"):
        cli(*command(name, paths, paths[OUT_OF[name]]))
    return paths


OUT_OF = {"saliency": "store", "heatmaps": "container", "report": "report", "export": "export"}


def command(name: str, p: dict[str, Path], out: Path) -> list[object]:
    """``smoothsal NAME …`` writing ``out`` from the inputs in ``p`` (cheap settings)."""
    model = ["--arch", "resnet18", "--num-classes", "2"]
    return {
        "saliency": ["saliency", p["slide"], "--tiles", p["tiles"], *model, "--method", "original",
                     "--layers", "layer1", "--attributions", "gradient", "--smoothgrad-samples", "1",
                     "--workers", "0", "--no-progress", "--out", out,
                     "--table", out.with_suffix(".parquet")],
        "heatmaps": ["heatmaps", p["slide"], "--saliency", p["store"], "--tiles", p["tiles"],
                     "--tissue-mpp", "8", "--no-progress", "--out", out],
        "report": ["report", "--tables", p["table"], "--heatmaps", p["container"], "--out", out],
        "export": ["view", p["container"], "--export", out, "--no-progress"],
        "tiles": ["tiles", p["slide"], "--tile-size", "64", "--max-tiles", "2", "--out", out],
        "evaluate": ["evaluate", *model, "--tiles", p["tiles"], "--out", out],
        "compare": ["compare", p["tile_png"], *model, "--size", "64", "--out", out],
        "train-model": ["train-model", *model, "--tiles", p["tiles"], "--epochs", "1", "--out", out],
        "train-surrogate": ["train-surrogate", *model, "--tiles", p["tiles"], "--epochs", "1",
                            "--workers", "0", "--no-progress", "--out", out],
    }[name]  # fmt: skip


def check_made(name: str, out: Path) -> None:
    """``out`` is a complete, valid output of command ``name``."""
    assert files.read_marker(out) is not None and files.partial_paths(out) == []
    if name == "saliency":
        opened = store.open_store(out)
        assert opened.meta["n_tiles"] == 6 and np.isfinite(opened.array("gradient", "layer1")[:]).all()
        assert len(store.read_results(out.with_suffix(".parquet")).table) == 6
    elif name == "heatmaps":
        c = open_container(out)
        assert [i.path for i in c.images] == ["tissue", "heatmaps/original/gradient/layer1"]
        h, w = c.images[1].levels[-1].shape
        assert np.isfinite(c.region(1, len(c.images[1].levels) - 1, slice(0, h), slice(0, w))).any()
    elif name == "report":
        assert (out / "index.html").is_file() and (out / "tables" / "tv.csv").is_file()
        assert list((out / "figures" / "overview").glob("*.png"))
    else:
        assert json.loads((out / "manifest.json").read_text())["images"] and list(out.glob("tiles/*/*/*/*"))


def stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (state T in /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


@pytest.mark.parametrize("name", list(OUT_OF))
def test_two_writers_of_one_output_the_second_fails_at_once_the_first_completes(cli, made, tmp_path, name):
    """The first writer freezes itself (SIGSTOP, the test kill switch) right after taking its output's
    lock; the second, started then, must fail by itself with one line naming the output; the first,
    resumed (SIGCONT), completes a valid output."""
    out = tmp_path / OUT_OF[name]
    args = command(name, made, out)
    first = cli.popen(*args, kill_at="files.locked=1/stop")
    try:
        deadline = time.monotonic() + 300
        while not stopped(first.pid):
            assert first.poll() is None, (
                f"the first writer ended before it took the lock: {first.communicate()}"
            )
            assert time.monotonic() < deadline
            time.sleep(0.01)
        second = cli.process(*args, timeout=120)  # a hang here (waiting for the lock) is a failure
        os.kill(first.pid, signal.SIGCONT)
        err = second.stderr.strip()
        assert second.returncode == 1 and len(err.splitlines()) == 1, err
        assert f"{out} is being written by another process" in err, err
        _, first_err = first.communicate(timeout=300)
        assert first.returncode == 0, first_err
    finally:
        first.kill()
        first.wait()
    check_made(name, out)


def user_folder(out: Path, made: dict[str, Path]) -> None:
    """A user's folder: a git checkout with hidden files and names a report or export would use."""
    (out / ".git").mkdir(parents=True)
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / ".env").write_text("TOKEN=secret\n")
    (out / "tables").mkdir()
    (out / "tables" / "mine.csv").write_text("a,b\n1,2\n")
    (out / "manifest.json").write_text('{"name": "web project"}\n')
    (out / "index.html").write_text("<p>mine</p>\n")


def other_zarr(out: Path, made: dict[str, Path]) -> None:
    group = zarr.open_group(out, mode="w", zarr_format=2)
    group.create_array("data", shape=(4,), dtype="int32")[:] = np.arange(4)
    group.attrs["project"] = "not smoothsal"


def other_output(name: str):
    """A copy of another command's output (a container for saliency, a store for everything else)."""

    def make(out: Path, made: dict[str, Path]) -> None:
        shutil.copytree(made["container" if name == "saliency" else "store"], out)

    return make


COMMANDS = [*OUT_OF, "tiles", "evaluate", "compare", "train-model", "train-surrogate"]


@pytest.mark.parametrize("kind", ["user folder", "another command's output", "unrelated zarr"])
@pytest.mark.parametrize("name", COMMANDS)
def test_an_out_the_command_did_not_write_is_refused_and_left_byte_identical(cli, made, tmp_path, name, kind):
    out = tmp_path / "out"
    {"user folder": user_folder, "unrelated zarr": other_zarr}.get(kind, other_output(name))(out, made)
    before = tree(tmp_path)
    err = cli(*command(name, made, out), expect=1).err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err, err
    after = tree(tmp_path)
    assert after == before


NESTED = {
    "saliency": "gradient",
    "heatmaps": "tissue",
    "report": "tables",
    "export": "tiles",
}  # a folder each writes


def refused_naming(cli, args: list[object], out: Path, *names: str) -> None:
    """``args`` exits 1 with one line naming ``out`` and each of ``names``, and changes nothing."""
    before = tree(out.parent)
    err = cli(*args, expect=1).err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and all(n in err for n in names), err
    assert "move them out of it, or give another --out" in err, err
    assert tree(out.parent) == before


@pytest.mark.parametrize("name", list(OUT_OF))
def test_case_11_an_output_holding_files_it_did_not_write_is_not_replaced(cli, made, tmp_path, name):
    """Issue 27 case 11: `heatmaps --out C.ome.zarr` over a container into which the user had put files
    replaced it, and the files were gone. Every marked output records what its writer put at its top
    level; a rewrite over one holding anything else (at any depth) is refused naming it; one holding only
    its own entries (and Snakemake's flags) is replaced as before."""
    out = tmp_path / made[OUT_OF[name]].name
    shutil.copytree(made[OUT_OF[name]], out)
    args = command(name, made, out)
    (out / "mine.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    refused_naming(cli, args, out, "holds 1 entry", "(mine.geojson)")
    (out / "mine.geojson").unlink()
    (out / "notes").mkdir()  # a folder of the user's, and a file deep inside one of the writer's
    (out / NESTED[name] / "notes.txt").write_text("mine")
    refused_naming(cli, args, out, "holds 2 entries", "notes/", f"{NESTED[name]}/notes.txt")
    (out / "notes").rmdir()
    (out / NESTED[name] / "notes.txt").unlink()
    for flag in (out / ".snakemake_timestamp", out / NESTED[name] / ".snakemake_timestamp"):
        flag.touch()  # what Snakemake adds to the directory outputs it made
    cli(*args)
    check_made(name, out)
    assert files.foreign_entries(out, KINDS[name]) == [] and not (out / ".snakemake_timestamp").exists()


KINDS = {
    "saliency": store.STORE_KIND,
    "heatmaps": container.KIND,
    "report": report.KIND,
    "export": EXPORT_KIND,
}


@pytest.mark.parametrize("name", ["heatmaps", "report"])
def test_case_11_outputs_from_before_the_record_are_judged_by_the_names_their_writer_gives(
    cli, made, tmp_path, name
):
    """An output written before markers recorded their entries: any file whose path the writer never
    makes (a Zarr key; a report's index, tables and figures) is foreign; else it is replaced."""
    out = tmp_path / made[OUT_OF[name]].name
    shutil.copytree(made[OUT_OF[name]], out)
    holder = out / (".zattrs" if name == "heatmaps" else files.MARKER_FILE)
    meta = json.loads(holder.read_text())
    marker = meta[files.MARKER_KEY] if name == "heatmaps" else meta
    marker.pop("entries", None)  # the record, which older versions did not write
    holder.write_text(json.dumps(meta))
    assert files.read_marker(out) == KINDS[name].marker  # as older versions wrote it
    args = command(name, made, out)
    (out / "mine.geojson").write_text("{}")
    (out / NESTED[name] / "notes.txt").write_text("mine")
    refused_naming(cli, args, out, "holds 2 entries", "mine.geojson", f"{NESTED[name]}/notes.txt")
    (out / "mine.geojson").unlink()
    (out / NESTED[name] / "notes.txt").unlink()
    cli(*args)
    check_made(name, out)
    assert "entries" in files.read_marker(out)


def test_case_11_no_file_output_goes_inside_a_smoothsal_output(cli, made, tmp_path):
    """`export --out C.ome.zarr/mine.geojson` (or --ome-tiff there, or in a store, or through a link into
    one, or inside the container `heatmaps` is writing) is refused before any work, naming the output."""
    c, s = made["container"], made["store"]
    link = tmp_path / "link"
    link.symlink_to(c)
    export = ["export", c, "--map", "original/gradient/layer1", "--out"]
    cases = [
        ([*export, c / "mine.geojson"], c, "a heatmap-container"),
        ([*export, link / "mine.geojson"], link, "a heatmap-container"),  # a link to it, named as given
        ([*export, tmp_path / "h.geojson", "--ome-tiff", s / "h.ome.tif"], s, "a saliency-store"),
        (
            [*export, tmp_path / "h.geojson", "--ome-tiff", c / "heatmaps" / "h.ome.tif"],
            c,
            "a heatmap-container",
        ),
    ]
    new = tmp_path / "new.ome.zarr"
    own = [*command("heatmaps", made, new), "--ome-tiff", "tissue", new / "tissue.ome.tif"]
    cases.append((own, new, "the output this command writes"))
    for args, inside, what in cases:
        made_before = {k: tree(made[k]) for k in ("container", "store")}
        err = cli(*args, expect=1).err.strip()
        assert len(err.splitlines()) == 1 and f"lies inside {inside}, {what}" in err, err
        assert "outside it, e.g." in err, err
        assert {k: tree(made[k]) for k in ("container", "store")} == made_before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]  # nothing written


def test_case_1_heatmaps_never_deletes_its_own_saliency_input(cli, made, tmp_path):
    own = tmp_path / "self.zarr"
    shutil.copytree(made["store"], own)
    before = tree(own)
    p = {**made, "store": own}
    err = cli(*command("heatmaps", p, own), expect=1).err
    assert (
        "self.zarr exists and is a saliency-store (format 2); `smoothsal heatmaps` replaces only a heatmap-container"
        in err
    ), err
    assert tree(own) == before and store.open_store(own).meta["n_tiles"] == 6


def test_case_6_a_table_that_cannot_be_written_is_refused_before_any_work(cli, made, tmp_path):
    out = tmp_path / "original.zarr"
    args = command("saliency", made, out)
    table = tmp_path / "table-dir"
    (table / "x").mkdir(parents=True)
    args[args.index("--table") + 1] = table
    err = cli(*args, expect=1).err.strip()
    assert err == (
        f"smoothsal saliency: error: {table} is a directory or a link; give a new file path for --table "
        "(METHOD.parquet)"
    )
    assert not out.exists() and not store.partial_dir(out).exists()  # nothing computed, nothing moved
    (tmp_path / "mine.parquet").write_bytes(made["tiles"].read_bytes())  # a Parquet file, not our table
    args[args.index("--table") + 1] = tmp_path / "mine.parquet"
    err = cli(*args, expect=1).err
    assert "mine.parquet exists and is not a per-tile table that `smoothsal saliency` wrote" in err, err


def test_case_6_store_and_table_appear_together_even_when_killed_between(cli, made, tmp_path):
    out = tmp_path / "original.zarr"
    args = command("saliency", made, out)
    killed = cli.process(*args, kill_at="saliency.finish=1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    table = out.with_suffix(".parquet")
    assert out.is_dir() and not table.exists()  # the one moment two renames cannot cover…
    rerun = cli.process(*args)  # …is completed by the rerun, without computing anything again
    assert rerun.returncode == 0 and "at tile 6 of 6" in rerun.stderr, rerun.stderr
    check_made("saliency", out)
    assert store.results_meta(table) == store.open_store(out).meta


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("name", ["tiles", "train-surrogate"])
def test_case_14_a_full_disk_is_one_line_naming_the_output_not_a_hidden_temporary(cli, made, tmp_path, name):
    """A file-size limit (RLIMIT_FSIZE) stands in for a full disk: the same failed write(2). torch.save's
    own writer (train-surrogate) would say "unexpected pos …" instead."""
    out = tmp_path / ("t.parquet" if name == "tiles" else "s.pt")
    args = command(name, made, out)
    run = subprocess.run(cli.command(*args), check=False, env=cli.env(), capture_output=True, text=True,
                         timeout=600, preexec_fn=_file_size_limit(4000))  # fmt: skip
    err = run.stderr.strip()
    assert run.returncode == 1 and len(err.splitlines()) == 1, err
    assert re.fullmatch(
        rf"smoothsal {name}: error: {tmp_path}/[^/ ]+: cannot be written \(File too large\); .*", err
    )
    assert ".partial" not in err and [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_names_too_long_for_the_file_system_are_refused_before_any_work(cli, slides_dir, tmp_path):
    """Issue 27 case 13: an output name whose hidden temporary (.NAME.partial-PID) passes 255 bytes gave
    21-59-line OSError tracebacks; now one line naming the path and the limit, before any work."""
    slide = slides_dir / "CMU-1-Small-Region.svs"
    for length in (250, 240):  # too long itself / fine itself but not with the temporary's 17 more bytes
        out = tmp_path / ("t" * (length - len(".parquet")) + ".parquet")
        err = cli("tiles", slide, "--tile-size", "64", "--max-tiles", "2", "--out", out, expect=1).err.strip()
        assert len(err.splitlines()) == 1 and str(out) in err and "limit of 255 bytes" in err, err
        assert not list(tmp_path.iterdir())
    fits = tmp_path / ("t" * (255 - 17 - len(".parquet")) + ".parquet")  # 238 + 17 = 255 bytes
    cli(
        "tiles",
        slide,
        "--tile-size",
        "64",
        "--max-tiles",
        "2",
        "--out",
        fits,
        "--overview",
        tmp_path / "o.png",
    )
    assert fits.is_file()
    store = tmp_path / ("s" * 245 + ".zarr")  # directory outputs and their locks: the same check
    with pytest.raises(BadOutput, match="limit of 255 bytes"):
        files.check_replaceable(
            store, files.OutputKind("saliency-store", "smoothsal saliency", format=1, zarr=True)
        )
    with pytest.raises(BadOutput, match="limit of 255 bytes"), files.output_lock(store):
        pass
    assert not store.exists() and not list(tmp_path.glob(".s*"))
