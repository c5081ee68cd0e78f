"""The workflow as a deployable module: a project of its own, outside this repository, in the shape that
`snakedeploy deploy-workflow` writes (the repository's config/ folder copied, workflow/Snakefile declaring
the module), with a local `snakefile:` path instead of `github(...)` (no network). It lints clean with the
deployable default config as shipped, and runs through the report on two real slides without writing a file
inside the repository."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

# snakedeploy's template (use_module.smk.jinja), with a local path where it writes github("owner/repo", ...)
MODULE_SNAKEFILE = """\
from snakemake.utils import min_version


min_version("6.10.0")


configfile: "config/config.yaml"


# declare smoothsal as a module
module smoothsal:
    snakefile:
        "{snakefile}"
    config:
        config


# use all rules from smoothsal
use rule * from smoothsal
"""


def snakemake(project: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`snakemake ARGS` run in the project folder, as its user would (Snakemake finds workflow/Snakefile)."""
    cmd = [sys.executable, "-m", "snakemake", *args]
    result = subprocess.run(cmd, cwd=project, check=False, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


def repository_files() -> dict[str, tuple[int, int]]:
    """Every file of the repository (path → size, mtime), without .git and Python's bytecode caches."""
    files = {}
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in (".git", "__pycache__")]
        for name in names:
            stat = os.lstat(os.path.join(folder, name))
            files[os.path.relpath(os.path.join(folder, name), ROOT)] = (stat.st_size, stat.st_mtime_ns)
    return files


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An empty folder outside the repository with what snakedeploy deploys into it."""
    project = tmp_path / "project"
    assert not project.resolve().is_relative_to(ROOT)
    shutil.copytree(ROOT / "config", project / "config")
    (project / "workflow").mkdir()
    module = os.path.relpath(ROOT / "workflow" / "Snakefile", project / "workflow")  # relative: lint-clean
    (project / "workflow" / "Snakefile").write_text(MODULE_SNAKEFILE.format(snakefile=module))
    return project


@pytest.mark.slow
def test_module_project_lints_clean_with_the_default_config(project: Path) -> None:
    """The deployable config/config.yaml as shipped passes the schema and every check; the rules lint clean
    from the project (the top-level Snakefile's lint: tests/test_workflow_config.py::test_lint_is_clean)."""
    result = snakemake(project, "--lint")
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


@pytest.mark.slow
def test_module_runs_through_the_report_outside_the_repository(project: Path, slides_dir: Path) -> None:
    with (project / "config" / "samples.tsv").open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerows([("slide_id", "path", "split"),
                          ("cmu", slides_dir / "CMU-1-Small-Region.svs", "eval"),
                          ("cmu_pyramid", slides_dir / "CMU-1-Small-Region-pyramid.tiff", "train")])  # fmt: skip
    config = yaml.safe_load((project / "config" / "config.yaml").read_text())
    config.update(methods=["original", "surrogate"], attributions=["gradient"], layers=["layer1", "layer2"],
                  smoothgrad={"samples": 0}, saliency={"batch_size": 4, "device": "cpu"},
                  faithfulness={"enabled": False}, heatmaps={"tissue_mpp": 4.0})  # fmt: skip
    dataset = config["datasets"]["my_slides"]
    dataset["model"]["checkpoint"] = None  # a tiny run: seeded random weights
    dataset["tiles"] = {"tile_size": 64, "target_mpp": 1.0, "max_tiles": 3}
    dataset["surrogate"] = {"epochs": 1, "batch_size": 4}
    (project / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    before = repository_files()

    snakemake(project, "--cores", "2")

    report = project / "results" / "report"
    assert "<html" in (report / "index.html").read_text().lower()
    assert (report / "tables" / "tv_per_slide.csv").is_file()
    assert (project / "results" / "my_slides" / "heatmaps" / "cmu.ome.zarr").is_dir()
    snakemake(project, "--report", "report.zip")  # the captions come from the module (catalog: report: true)
    with zipfile.ZipFile(project / "report.zip") as archive:
        assert any(name.endswith("tv_per_slide.csv") for name in archive.namelist())
    assert repository_files() == before, "the module run wrote inside the repository"


def test_conda_env_installs_the_pinned_release_and_pyprojects_dependencies() -> None:
    """envs/smoothsal.yaml needs no repository beside it: smoothsal from the repository at tag v<version>
    (the repository that README's deploy command names), and the same dependencies as pyproject.toml."""
    env = yaml.safe_load((ROOT / "envs" / "smoothsal.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    package = [p for p in pip if p.startswith("smoothsal")]
    assert sorted(p for p in pip if p not in package) == sorted(project["dependencies"])
    assert not any(p.startswith("-e") or "../" in p for p in pip), pip
    extra = r"\[timm\]"  # the optional extra that timm: models need
    match = re.fullmatch(
        rf"smoothsal{extra} @ git\+(https://github\.com/[^/]+/smoothsal)\.git@v([\w.]+)", package[0]
    )
    assert match and match.group(2) == project["version"], package
    readme = (ROOT / "README.md").read_text()
    assert f"snakedeploy deploy-workflow {match.group(1)} . --tag v{project['version']}" in readme


def test_catalog_file_and_deployable_config() -> None:
    """The workflow catalog's usage file in its documented shape; config/config.yaml reads the sample sheet
    that snakedeploy copies with it (paths relative to the project folder)."""
    usage = yaml.safe_load((ROOT / ".snakemake-workflow-catalog.yml").read_text())["usage"]
    assert set(usage) == {"mandatory-flags", "software-stack-deployment"}
    assert set(usage["mandatory-flags"]) == {"desc", "flags"}
    assert set(usage["software-stack-deployment"]) <= {"conda", "apptainer", "apptainer+conda", "report"}
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    sheets = [d["slides"] for d in config["datasets"].values()]
    assert sheets and all(s.startswith("config/") and (ROOT / s).is_file() for s in sheets), sheets
    assert (ROOT / "config" / "README.md").is_file() and (ROOT / "workflow" / "Snakefile").is_file()
