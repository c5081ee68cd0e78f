"""The workflow's configuration and plumbing on small working directories of their own: config and
sample-sheet errors stop the dry run with one line, what each setting plans, lint, the shipped config,
the system setup, a real single-node SLURM cluster and a seam run (the shared full run:
tests/test_workflow.py). xdist spreads them over both workers; the two that use the machine's SLURM
(its setup, a cluster run) share one worker."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from ngff import assert_valid_ngff
from workflow_runs import (
    ATTRIBUTIONS,
    LAYERS,
    PROFILES,
    ROOT,
    SETUP_SCRIPT,
    TILES,
    add_rows,
    edit_config,
    error_line,
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

pytestmark = pytest.mark.slow


# --- configuration, lint, the shipped config -------------------------------------------------------------


@pytest.fixture
def shipped(tmp_path: Path) -> Path:
    """A working directory with the repo's sample sheets (the shipped config's paths are relative to it)."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    return tmp_path


def test_lint_is_clean(shipped: Path) -> None:
    result = snakemake(shipped, "--configfile", str(ROOT / "config.yaml"), "--lint")
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_shipped_config_is_the_demo(shipped: Path) -> None:
    """The shipped config plans the whole demo: demo data, both models, surrogates, every eval slide."""
    jobs = planned_jobs(shipped, "--configfile", str(ROOT / "config.yaml"))
    counts = pd.Series([rule for rule, _ in jobs]).value_counts().to_dict()
    # and config seams: one slide again at half stride (tiles, 4 methods' saliency, both stitchings)
    assert counts == {"demo_data": 1, "tiles": 9, "train_model": 2, "train_surrogate": 2, "saliency": 3 * 4,
                      "faithfulness": 3 * 4, "heatmaps": 3, "qupath_tiles": 3, "report": 1,
                      "seams_tiles": 1, "seams_saliency": 4, "seams": 1}  # fmt: skip


def test_shipped_config_trains_surrogates_by_the_rule_and_reports_their_fit(shipped: Path) -> None:
    """Issue 14: the surrogate jobs get the config's convergence settings; the report gets every surrogate."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    out = snakemake(
        shipped, "--configfile", str(ROOT / "config.yaml"), "--dry-run", "--printshellcmds"
    ).stdout
    lines = [line.strip() for line in out.splitlines()]
    for dataset, settings in config["datasets"].items():
        rule = settings["surrogate"]
        train = [
            line for line in lines if "smoothsal train-surrogate" in line and f"results/{dataset}/" in line
        ]
        assert len(train) == 1, lines
        for key in ("patience", "min_delta", "val_fraction", "val_min_tiles", "epochs", "batch_size", "lr"):
            assert f"--{key.replace('_', '-')} {rule[key]} " in train[0], (key, train[0])
    report = next(line for line in lines if line.startswith("Shell command: smoothsal report"))
    assert "--surrogates results/camelyon16/surrogate.pt results/digipath/surrogate.pt --out" in report


@pytest.fixture
def sheet_dataset(tmp_path: Path, slides_dir: Path) -> Path:
    """A working directory with one valid sample-sheet dataset c16: cmu (eval) and cmu_pyramid (train)."""
    write_sheet(tmp_path / "sheets" / "c16.tsv", [
        {"slide_id": "cmu", "path": str(slides_dir / "CMU-1-Small-Region.svs"), "split": "eval"},
        {"slide_id": "cmu_pyramid", "path": str(slides_dir / "CMU-1-Small-Region-pyramid.tiff"), "split": "train"},
    ])  # fmt: skip
    write_config(
        tmp_path,
        tiny_config({"c16": {"slides": "sheets/c16.tsv", "model": {"arch": "resnet18", "num_classes": 2}}}),
    )
    assert len(planned_jobs(tmp_path)) == 2 + 1 + 4 + 4 + 1 + 1  # valid as written
    return tmp_path


def test_faithfulness_jobs_per_slide_and_the_switch(sheet_dataset: Path, slides_dir: Path) -> None:
    """An added eval slide plans its own faithfulness jobs (one per method) with its other jobs; turning the
    stage off removes every faithfulness job and nothing else (the report stays, without their tables)."""
    before = planned_jobs(sheet_dataset)
    assert {j for j in before if j[0] == "faithfulness"} == faithfulness_jobs("c16", "cmu")
    add_rows(
        sheet_dataset / "sheets" / "c16.tsv", [{"slide_id": "small", "path": str(slides_dir / "small.svs")}]
    )
    added = planned_jobs(sheet_dataset) - before
    assert added == slide_jobs("c16", "small")
    with_stage = planned_jobs(sheet_dataset)
    edit_config(sheet_dataset, lambda c: c["faithfulness"].update(enabled=False))
    without = planned_jobs(sheet_dataset)
    assert without == {j for j in with_stage if j[0] != "faithfulness"} and job("report") in without
    out = snakemake(sheet_dataset, "--dry-run", "--printshellcmds", "--forcerun", "report").stdout
    report_cmd = next(line for line in out.splitlines() if "smoothsal report" in line)
    assert "--faithfulness" not in report_cmd


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["datasets"]["c16"].update(tiles={"tile_sise": 64}), "'tile_sise' was unexpected"),
        (lambda c: c["datasets"]["c16"].pop("model"), "'model' is a required property"),
        (lambda c: c.update(methods=["original", "smooth"]), "'smooth' is not one of"),
        (lambda c: c["datasets"]["c16"].update(slides="sheets/missing.tsv"), "sheets/missing.tsv not found"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(sheet_dataset: Path, edit, message: str) -> None:
    edit_config(sheet_dataset, edit)
    result = snakemake(sheet_dataset, "--dry-run", check=False)
    assert result.returncode != 0 and message in result.stdout + result.stderr


def test_sample_sheet_errors_name_the_sheet(tmp_path: Path, slides_dir: Path) -> None:
    write_sheet(tmp_path / "s.tsv", [{"slide_id": "cmu", "path": str(slides_dir / "CMU-1-Small-Region.svs"),
                                      "split": "test"}])  # fmt: skip
    write_config(
        tmp_path, tiny_config({"c16": {"slides": "s.tsv", "model": {"arch": "resnet18", "num_classes": 2}}})
    )
    result = snakemake(tmp_path, "--dry-run", check=False)
    assert result.returncode != 0
    assert "sample sheet s.tsv" in result.stdout + result.stderr
    assert "'test' is not one of" in result.stdout + result.stderr


@pytest.mark.parametrize("mpp", ["0", "0.0", "-0.5", "half"])
def test_sample_sheet_mpp_must_be_a_positive_number(tmp_path: Path, slides_dir: Path, mpp: str) -> None:
    """Issue 27 case 9: mpp 0 passed the dry run and then failed the job naming --mpp, a flag the user
    never typed; now the dry run names the sheet, the line and the column."""
    write_sheet(tmp_path / "s.tsv", [{"slide_id": "cmu", "path": str(slides_dir / "CMU-1-Small-Region.svs"),
                                      "split": "eval", "mpp": mpp}])  # fmt: skip
    write_config(
        tmp_path, tiny_config({"c16": {"slides": "s.tsv", "model": {"arch": "resnet18", "num_classes": 2}}})
    )
    error_line(snakemake(tmp_path, "--dry-run", check=False), "sample sheet s.tsv", f"'{mpp}' does not match",
               "(at line 2, column mpp)")  # fmt: skip


def test_glob_dataset_finds_slides_and_annotations(tmp_path: Path, slides_dir: Path) -> None:
    """A dataset given as a glob: slide id = file name, annotation by pattern where it exists, train split."""
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / f"{name}.svs").symlink_to(slides_dir / "CMU-1-Small-Region.svs")
    shutil.copy(slides_dir.parent / "annotations" / "tumor_081.xml", folder / "b.xml")
    dataset = {"slides": "slides/*.svs", "annotations": "slides/{slide}.xml", "train_slides": ["a"],
               "model": {"arch": "resnet18", "num_classes": 2}}  # fmt: skip
    write_config(tmp_path, tiny_config({"g": dataset}))
    assert planned_jobs(tmp_path) == {job("tiles", dataset="g", slide="a"), job("train_surrogate", dataset="g"),
                                      job("report")} | slide_jobs("g", "b")  # fmt: skip
    commands = snakemake(tmp_path, "--dry-run", "--printshellcmds").stdout
    tiles = [line for line in commands.splitlines() if line.startswith("Shell command: smoothsal tiles")]
    assert len(tiles) == 2 and sum("--annotations slides/b.xml" in line for line in tiles) == 1


# --- what the dry run catches (each with one line naming the key or file and the fix) -------------------


def test_tiles_level_reads_that_level_unresized(sheet_dataset: Path) -> None:
    """`tiles: {level: 0}` runs: no schema default target_mpp rides along (the CLI refuses both)."""
    edit_config(
        sheet_dataset,
        lambda c: c["datasets"]["c16"].update(tiles={"tile_size": 64, "level": 0, "max_tiles": 2}),
    )
    commands = snakemake(sheet_dataset, "--dry-run", "--printshellcmds").stdout
    tiles = [line for line in commands.splitlines() if line.startswith("Shell command: smoothsal tiles")]
    assert len(tiles) == 2 and all("--level 0" in t and "--target-mpp" not in t for t in tiles), tiles
    snakemake(sheet_dataset, "--cores", "1", "results/c16/tiles/cmu.parquet")  # the real job
    table = pd.read_parquet(sheet_dataset / "results" / "c16" / "tiles" / "cmu.parquet")
    assert len(table) == 2 and (table["level"] == 0).all()
    assert (
        (table["w"] == 64).all() and (table["h"] == 64).all() and (table["mpp"] == table["slide_mpp"]).all()
    )


def test_precision_reaches_every_saliency_job(sheet_dataset: Path) -> None:
    """`saliency: {precision: bf16}` is passed to each saliency command (as a setting, beside the
    SmoothGrad ones; the run options stay apart); an unknown precision stops the dry run."""
    edit_config(sheet_dataset, lambda c: c["saliency"].update(precision="bf16"))
    commands = snakemake(sheet_dataset, "--dry-run", "--printshellcmds").stdout
    saliency = [
        line for line in commands.splitlines() if line.startswith("Shell command: smoothsal saliency")
    ]
    assert len(saliency) == 4 and all(line.count("--precision bf16") == 1 for line in saliency), saliency
    edit_config(sheet_dataset, lambda c: c["saliency"].update(precision="fp16"))
    result = snakemake(sheet_dataset, "--dry-run", check=False)
    assert result.returncode != 0 and "'fp16' is not one of" in result.stdout + result.stderr


def c16(**settings):
    return lambda c: c["datasets"]["c16"].update(settings)


def c16_model(**settings):
    return lambda c: c["datasets"]["c16"]["model"].update(settings)


@pytest.mark.parametrize(
    ("edit", "parts"),
    [
        pytest.param(c16(tiles={"level": 0, "target_mpp": 1.0}),
                     ["dataset c16: tiles has both level (0) and target_mpp (1.0); keep one"], id="level-and-target_mpp"),
        pytest.param(c16(exclude=["cmu_pyramd"]),
                     ["dataset c16: exclude lists slide ids that are not in sheets/c16.tsv: 'cmu_pyramd'",
                      "(did you mean 'cmu_pyramid'?); fix or remove them"], id="exclude-misspelt"),
        pytest.param(c16(train_slides=["cmu"]),
                     ["dataset c16: train_slides is for glob datasets", "sheets/c16.tsv is a sample sheet",
                      "split column"], id="train_slides-in-sheet-dataset"),
        pytest.param(c16(annotations="sheets/{slide}.xml"),
                     ["dataset c16: annotations is for glob datasets", "annotation column"],
                     id="annotations-in-sheet-dataset"),
        pytest.param(c16_model(arch="resnet19"),
                     ["dataset c16: model.arch 'resnet19': unknown arch 'resnet19'; give a registered name", "resnet18",
                      "unet_resnet34", "torchvision:NAME, timm:NAME, or python:MODULE:CALLABLE"], id="arch-unknown"),
        pytest.param(lambda c: c.update(methods=["original", "surrogate"]) or c["datasets"]["c16"]["model"].update(
                         arch="torchvision:vgg11"),
                     ["dataset c16: arch 'torchvision:vgg11' has no stride-2 conv after the stem: no surrogate to train;",
                      "leave out method surrogate"], id="surrogate-of-a-pooling-network"),
        pytest.param(lambda c: c.update(layers=["layer1", "layer5"]),
                     ["config layers (dataset c16, arch resnet18): unknown layer 'layer5'", "'blocks'"],
                     id="layer-unknown"),
        pytest.param(lambda c: c.update(layers=["encoder.layer1"]),  # a FlexibleUNet name, not a ResNet's
                     ["config layers (dataset c16, arch resnet18): unknown layer 'encoder.layer1'"],
                     id="layer-of-another-arch"),
        pytest.param(lambda c: c.update(seams={"slides": ["c16/cmu_pyramid"]}),
                     ["dataset c16: seams.slides lists slide ids that are not in its eval slides: 'cmu_pyramid'"],
                     id="seams-train-slide"),
        pytest.param(lambda c: c.update(seams={"slides": ["c17/cmu"]}),
                     ["config seams.slides: 'c17/cmu' names no dataset; use one of c16"], id="seams-no-dataset"),
        pytest.param(c16(class_map="Tumor"),
                     ["dataset c16 (class_map 'Tumor')", "cannot read 'Tumor'", "NAME=ID"], id="class_map-malformed"),
    ],
)  # fmt: skip
def test_dry_run_stops_with_one_line(sheet_dataset: Path, edit, parts: list[str]) -> None:
    edit_config(sheet_dataset, edit)
    error_line(snakemake(sheet_dataset, "--dry-run", check=False), *parts)


def test_layers_are_checked_against_each_datasets_arch(sheet_dataset: Path) -> None:
    """Layer names resolve per dataset: FlexibleUNet's names pass for a unet dataset, not for a ResNet one."""
    unet = {"slides": "sheets/c16.tsv", "model": {"arch": "unet_resnet34", "num_classes": 3}}
    edit_config(
        sheet_dataset,
        lambda c: c.update(layers=["encoder.layer1.0", "layer2", "blocks"]) or c["datasets"].update(c16=unet),
    )
    assert len(planned_jobs(sheet_dataset)) == 2 + 1 + 4 + 4 + 1 + 1  # … saliency, faithfulness per method …
    resnet = {"slides": "sheets/c16.tsv", "model": {"arch": "resnet18", "num_classes": 2}}
    edit_config(sheet_dataset, lambda c: c["datasets"].update(r18=resnet))
    error_line(snakemake(sheet_dataset, "--dry-run", check=False),
               "config layers (dataset r18, arch resnet18): unknown layer 'encoder.layer1.0'")  # fmt: skip


def test_yaml_syntax_error_names_its_line(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(
        "datasets:\n  c16:\n    slides: s.tsv\n    model: {arch: resnet18, num_classes: 2\n    tiles: {level: 0}\n"
    )
    error_line(snakemake(tmp_path, "--dry-run", check=False),
               "config.yaml line 5, column 10: expected ',' or '}', but got ':'",
               "(while parsing a flow mapping that starts at line 4); fix the YAML there")  # fmt: skip


@pytest.fixture
def glob_dataset(tmp_path: Path, slides_dir: Path) -> Path:
    """A glob dataset g over slides/{a,b,-rf}.svs (b annotated), train_slides [a]: valid once -rf is excluded."""
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a", "b", "-rf"):
        (folder / f"{name}.svs").symlink_to(slides_dir / "CMU-1-Small-Region.svs")
    shutil.copy(slides_dir.parent / "annotations" / "tumor_081.xml", folder / "b.xml")
    dataset = {"slides": "slides/*.svs", "annotations": "slides/{slide}.xml", "train_slides": ["a"],
               "model": {"arch": "resnet18", "num_classes": 2}}  # fmt: skip
    write_config(tmp_path, tiny_config({"g": dataset}))
    return tmp_path


def test_glob_slide_ids_pass_the_sample_sheet_id_check(glob_dataset: Path, slides_dir: Path) -> None:
    """A file named -rf.svs would give `--slide-id -rf`: glob ids meet the sheets' id pattern, or are excluded."""
    error_line(snakemake(glob_dataset, "--dry-run", check=False),
               "dataset g: slide file slides/-rf.svs gives slide id '-rf', which is not a valid id",
               "rename the file, add '-rf' to exclude")  # fmt: skip
    edit_config(glob_dataset, lambda c: c["datasets"]["g"].update(exclude=["-rf"]))
    assert planned_jobs(glob_dataset) == {job("tiles", dataset="g", slide="a"), job("train_surrogate", dataset="g"),
                                          job("report")} | slide_jobs("g", "b")  # fmt: skip


def test_glob_dataset_lists_name_existing_slides(glob_dataset: Path) -> None:
    edit_config(glob_dataset, lambda c: c["datasets"]["g"].update(exclude=["-rf"], train_slides=["a", "c"]))
    error_line(
        snakemake(glob_dataset, "--dry-run", check=False),
        "dataset g: train_slides lists slide ids that are not in slides/*.svs: 'c'; fix or remove them",
    )
    edit_config(glob_dataset, lambda c: c["datasets"]["g"].update(exclude=["-rf", "bb"], train_slides=["a"]))
    error_line(
        snakemake(glob_dataset, "--dry-run", check=False),
        "dataset g: exclude lists slide ids that are not in slides/*.svs: 'bb' (did you mean 'b'?)",
    )


def test_slide_paths_starting_with_a_dash_are_not_options(sheet_dataset: Path, slides_dir: Path) -> None:
    (sheet_dataset / "-dash.svs").symlink_to(slides_dir / "CMU-1-Small-Region.svs")
    add_rows(sheet_dataset / "sheets" / "c16.tsv", [{"slide_id": "dash", "path": "-dash.svs"}])
    commands = snakemake(sheet_dataset, "--dry-run", "--printshellcmds").stdout
    assert "Shell command: smoothsal tiles ./-dash.svs --slide-id dash" in commands


def test_class_map_must_cover_the_annotation_classes(glob_dataset: Path) -> None:
    """tumor_081.xml has the groups _0 and None: a map without them fails the dry run, naming the file."""
    edit_config(glob_dataset, lambda c: c["datasets"]["g"].update(exclude=["-rf"], class_map="Tumor=1"))
    error_line(
        snakemake(glob_dataset, "--dry-run", check=False),
        "dataset g (class_map 'Tumor=1'): slides/b.xml: annotation class",
        "has no class id",
    )


def test_smoothsal_checks_are_redone_when_what_they_read_changes(glob_dataset: Path) -> None:
    """Passed checks are remembered (no torch import on the next dry run), but never hide a new mistake."""
    edit_config(glob_dataset, lambda c: c["datasets"]["g"].update(exclude=["-rf"]))
    snakemake(glob_dataset, "--dry-run")
    snakemake(glob_dataset, "--dry-run")
    edit_config(glob_dataset, lambda c: c.update(layers=["layer1", "layer9"]))
    error_line(snakemake(glob_dataset, "--dry-run", check=False), "unknown layer 'layer9'")
    edit_config(glob_dataset, lambda c: c.update(layers=LAYERS))
    snakemake(glob_dataset, "--dry-run")
    annotation = glob_dataset / "slides" / "b.xml"
    annotation.write_text(annotation.read_text().replace('PartOfGroup="_0"', 'PartOfGroup="Mystery"'))
    error_line(
        snakemake(glob_dataset, "--dry-run", check=False),
        "slides/b.xml: annotation class 'Mystery' has no class id",
    )


# --- SLURM ---------------------------------------------------------------------------------------------


def slurm_up() -> None:
    """Fail (not skip) with the fix when no SLURM answers: README's test command starts one (tests/setup-system.sh)."""
    fix = f"start a single-node SLURM on localhost first: {SETUP_SCRIPT.relative_to(ROOT)} (root or sudo)"
    for cmd in (["sinfo", "-h", "-o", "%T"], ["sacct", "-n", "-X", "-S", "now-1minutes"]):
        try:
            result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30)
        except (FileNotFoundError, subprocess.TimeoutExpired) as err:
            pytest.fail(f"SLURM is not up ({cmd[0]}: {err}); {fix}")
        if result.returncode != 0:
            pytest.fail(f"SLURM is not up ({' '.join(cmd)}: {result.stderr.strip()}); {fix}")


@pytest.mark.xdist_group("system")
def test_slurm_runs_every_job_through_sbatch(tmp_path: Path, slides_dir: Path) -> None:
    slurm_up()
    repo_profile = yaml.safe_load((PROFILES / "slurm" / "profile.yaml").read_text())
    assert (
        repo_profile["executor"] == "slurm" and repo_profile["set-resources"]["train_surrogate"]["gpu"] == 2
    )
    # the repo's profile, sized down for this 2-core node (its GPU requests stay as they are)
    profile = dict(
        repo_profile, **{"latency-wait": 5, "retries": 0, "default-resources": {"mem_mb": 500, "runtime": 10}}
    )
    profile["set-resources"] = {
        rule: dict(r, mem_mb=500) for rule, r in repo_profile["set-resources"].items()
    }
    profile["set-threads"] = {rule: 1 for rule in repo_profile["set-threads"]}
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "profile.yaml").write_text(yaml.safe_dump(profile))

    workdir = tmp_path / "w"
    write_sheet(workdir / "s.tsv", [
        {"slide_id": "cmu", "path": str(slides_dir / "CMU-1-Small-Region.svs"), "split": "eval"},
        {"slide_id": "cmu_pyramid", "path": str(slides_dir / "CMU-1-Small-Region-pyramid.tiff"), "split": "train"},
    ])  # fmt: skip
    dataset = {"slides": "s.tsv", "model": {"arch": "resnet18", "num_classes": 2}, "tiles": dict(TILES, max_tiles=3),
               "surrogate": {"epochs": 1, "batch_size": 4}}  # fmt: skip
    write_config(
        workdir, tiny_config({"c16": dataset}, methods=["original", "surrogate"], layers=["layer1", "layer2"])
    )
    prefix = f"smoothsaltest{uuid.uuid4().hex[:8]}"
    snakemake(workdir, "--workflow-profile", str(tmp_path / "profile"), "--slurm-init-seconds-before-status-checks",
              "1", "--slurm-no-account", "--slurm-jobname-prefix", prefix, timeout=600)  # fmt: skip
    assert (workdir / "results" / "report" / "index.html").is_file()
    # gpu=2 → two torchrun workers (gloo on this GPU-less node)
    assert "2 process(es)" in (workdir / "results" / "logs" / "train_surrogate" / "c16.log").read_text()

    fields = ["JobName", "Comment", "State", "ReqTRES", "AllocTRES", "JobID"]
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-S", "now-1hours", "-o", ",".join(f"{f}%300" for f in fields)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    jobs = [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.startswith(prefix)]
    rules = [re.match(r"rule_(\w+?)(_wildcards_|$)", j["Comment"]).group(1) for j in jobs]
    assert sorted(rules) == sorted(
        [
            "tiles",
            "tiles",
            "train_surrogate",
            "saliency",
            "saliency",
            "faithfulness",
            "faithfulness",
            "heatmaps",
            "report",
        ]
    )
    assert {j["State"] for j in jobs} == {"COMPLETED"}
    # gpu=2 runs as one task (plugin >= 2.7.1, tasks: 1 in the profile): its job step ran once, not per GPU
    (surrogate_job,) = [j["JobID"] for j, rule in zip(jobs, rules, strict=True) if rule == "train_surrogate"]
    steps = subprocess.run(["sacct", "-n", "-P", "-j", surrogate_job, "-o", "JobID,NTasks"],
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    ntasks = {step.split("|")[0]: step.split("|")[1] for step in steps}
    assert ntasks.get(f"{surrogate_job}.0") == "1" and f"{surrogate_job}.1" not in ntasks, ntasks
    for j, rule in zip(jobs, rules):
        gpus = {"train_surrogate": 2, "saliency": 1}.get(rule)
        for tres in ("ReqTRES", "AllocTRES"):
            assert (f"gres/gpu={gpus}" in j[tres]) if gpus else ("gres/gpu" not in j[tres]), (
                rule,
                tres,
                j[tres],
            )


# --- README's test command and its system setup ------------------------------------------------------


def readme_test_command() -> str:
    """The command in the sh block under README's "Run the tests"."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"Run the tests[^\n]*\n+```sh\n(.*?)\n```", readme, re.DOTALL)
    assert block, "README has no sh block under 'Run the tests'"
    return block.group(1).strip()


def test_readme_test_command_is_what_ci_runs() -> None:
    """.ci/run is README's test command and nothing else; the command itself sets up the system first."""
    command = readme_test_command()
    assert command.startswith("tests/setup-system.sh && ") and command.endswith(" && pytest -n 2"), command
    lines = [
        line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")
    ]
    assert lines == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', command], lines
    for script in (ROOT / ".ci" / "run", SETUP_SCRIPT):
        assert os.access(script, os.X_OK), script


def setup_packages() -> list[str]:
    """The Debian package list of tests/setup-system.sh (its one place), as bash reads it."""
    script = f'eval "$(sed -n "/^PACKAGES=(/,/^)/p" {SETUP_SCRIPT})"; printf "%s\\n" "${{PACKAGES[@]}}"'
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()


def run_setup(*user: str) -> subprocess.CompletedProcess:
    """tests/setup-system.sh from another directory, as this user or (runuser) as another without sudo."""
    cmd = ["runuser", "-u", user[0], "--", "env", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"] if user else []
    return subprocess.run(
        [*cmd, str(SETUP_SCRIPT)], check=False, capture_output=True, text=True, timeout=900, cwd="/"
    )


@pytest.mark.xdist_group("system")
def test_system_setup_installs_what_the_tests_need_then_only_looks() -> None:
    packages = setup_packages()
    qt_for_napari = ["libgl1", "libegl1", "libxkbcommon-x11-0", "libxcb-cursor0", "libxcb-icccm4", "libxcb-keysyms1",
                     "libxcb-image0", "libxcb-render-util0", "libxcb-xinerama0", "libxcb-shape0", "libdbus-1-3",
                     "libfontconfig1"]  # fmt: skip
    assert {"chromium", "chromium-driver", "xvfb", "xauth", *qt_for_napari} <= set(packages), packages
    first = run_setup()
    assert first.returncode == 0, first.stderr
    second = run_setup()  # everything is there now: it only looks
    assert second.returncode == 0, second.stderr
    assert "installing" not in second.stderr and "starting SLURM" not in second.stderr, second.stderr
    assert f"ready: {len(packages)} Debian packages present (0 installed now), SLURM up" in second.stderr
    status = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\\n", *packages],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert sorted(status.split("\n")[:-1]) == sorted(f"{p} installed" for p in packages), status
    for program in ("chromium", "chromedriver", "Xvfb", "xvfb-run", "sbatch"):
        assert shutil.which(program), program
    slurm_up()
    if os.geteuid() == 0:  # CI runs as root; a user who cannot become root needs no root when all is there
        nobody = run_setup("nobody")
        assert nobody.returncode == 0 and "(0 installed now)" in nobody.stderr, nobody.stderr


def test_seam_run_stitches_one_half_stride_run_both_ways(sheet_dataset: Path) -> None:
    """config seams: the eval slide tiled again at half stride (rule seams_tiles), every method's saliency
    on those tiles (seams_saliency), both stitchings and their seam scores (seams), in the report."""
    edit_config(sheet_dataset, lambda c: c.update(
        methods=["original", "backward_hook"], seams={"slides": ["c16/cmu"], "roi": [768, 768, 512, 512]},
    ) or c["datasets"]["c16"].update(tiles=TILES))  # fmt: skip
    planned = {rule for rule, _ in planned_jobs(sheet_dataset)}
    assert {"seams_tiles", "seams_saliency", "seams"} <= planned
    run_local(sheet_dataset)
    seams = sheet_dataset / "results" / "c16" / "seams" / "cmu"
    half = pd.read_parquet(seams / "tiles.parquet")
    assert (half["w"] == 128).all() and set(np.diff(np.unique(half["x"]))) == {64}  # stride: half a tile
    table = pd.read_csv(seams / "seams.csv")
    assert len(table) == 2 * len(ATTRIBUTIONS) * len(LAYERS) and set(table["method"]) == {
        "original",
        "backward_hook",
    }
    assert (table["tiles_with"] == len(half)).all() and (0 < table["tiles_without"]).all()
    assert (table["tiles_without"] < table["tiles_with"]).all() and (table["overlap"] == 2).all()
    # 16-px layer1 maps have band and interior at half stride; 4-px layer3 maps have no interior (NaN)
    assert table.loc[table["layer"] == "layer1", ["seams_without", "seams_with"]].notna().all().all()
    for name in ("without", "with"):
        assert_valid_ngff(seams / f"{name}.ome.zarr")
    report = sheet_dataset / "results" / "report"
    assert (report / "tables" / "seams.csv").is_file() and (
        report / "figures" / "seams" / "cmu.png"
    ).is_file()
    assert 'id="seams"' in (report / "index.html").read_text()
