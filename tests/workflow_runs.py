"""Running the workflow in tests: Snakemake on a working directory (a local run, a dry run's job list,
one error line), and the sample sheets and configs the tests write there."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"
PROFILES = ROOT / "workflow" / "profiles"
SLURM_SCRIPT = ROOT / "workflow" / "scripts" / "slurm-localhost.sh"
SETUP_SCRIPT = ROOT / "tests" / "setup-system.sh"
METHODS = ["original", "surrogate", "backward_hook", "forward_hook"]
ATTRIBUTIONS = ["gradient", "deeplift"]
LAYERS = ["layer1", "layer2", "layer3"]
MAX_TILES = 4
TILES = {"tile_size": 64, "target_mpp": 1.0, "max_tiles": MAX_TILES}
SHEET_COLUMNS = ("slide_id", "path", "annotation", "split", "mpp")


def snakemake(
    workdir: Path, *args: str, check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess:
    """`snakemake -s Snakefile --directory WORKDIR ARGS` in a subprocess (output captured, text)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir), *args]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


def run_local(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """A real local run with the repo's default profile (keep-going) on 2 cores."""
    return snakemake(
        workdir, "--workflow-profile", str(PROFILES / "default"), "--cores", "2", *args, check=check
    )


def planned_jobs(workdir: Path, *args: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Snakemake's own dry-run job list: {(rule, ((wildcard, value), ...))}, without the target rule `all`."""
    out = snakemake(workdir, "--dry-run", *args).stdout
    jobs, rule, wildcards = set(), None, ()
    for line in out.splitlines() + ["rule end:"]:
        header = re.match(r"^(?:local)?rule (\w+):$", line)
        if header:
            if rule not in (None, "all"):
                jobs.add((rule, wildcards))
            rule, wildcards = header.group(1), ()
        elif rule and line.strip().startswith("wildcards:"):
            items = line.split(":", 1)[1].split(",")
            wildcards = tuple(sorted(tuple(item.strip().split("=", 1)) for item in items))
    return jobs


def job(rule: str, **wildcards: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return rule, tuple(sorted(wildcards.items()))


def slide_jobs(dataset: str, slide: str, qupath: bool = False) -> set:
    """The jobs one new eval slide adds: its tiles, saliency and faithfulness per method, and heatmaps (and
    its QuPath tile objects where config qupath.tiles is on)."""
    return {
        job("tiles", dataset=dataset, slide=slide),
        *(job("saliency", dataset=dataset, slide=slide, method=m) for m in METHODS),
        *faithfulness_jobs(dataset, slide),
        job("heatmaps", dataset=dataset, slide=slide),
        *([job("qupath_tiles", dataset=dataset, slide=slide)] if qupath else []),
    }


def faithfulness_jobs(dataset: str, slide: str, methods: list[str] = METHODS) -> set:
    return {job("faithfulness", dataset=dataset, slide=slide, method=m) for m in methods}


def write_sheet(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, SHEET_COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in SHEET_COLUMNS} for row in rows)


def add_rows(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open() as f:
        old = list(csv.DictReader(f, delimiter="\t"))
    write_sheet(path, old + rows)


def write_config(workdir: Path, config: dict) -> Path:
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def edit_config(workdir: Path, edit) -> None:
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    edit(config)
    write_config(workdir, config)


def demo(dataset: str, name: str, split: str) -> dict[str, str]:
    suffix = "xml" if dataset == "camelyon16" else "geojson"
    return {"slide_id": name, "path": f"demo/{dataset}/{name}.tif", "annotation": f"demo/{dataset}/{name}.{suffix}",
            "split": split}  # fmt: skip


def copy_workdir(src: Path, dst: Path) -> Path:
    """A copy with modification times and Snakemake's metadata, so it is as up to date as the original."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("locks", "incomplete"))
    return dst


def tiny_config(datasets: dict, **overrides) -> dict:
    config = {
        "methods": METHODS,
        "attributions": ATTRIBUTIONS,
        "layers": LAYERS,
        "smoothgrad": {"samples": 2, "stdev": 0.2, "seed": 0},
        "saliency": {"batch_size": 4, "device": "cpu"},
        "heatmaps": {"tissue_mpp": 4.0},
        "faithfulness": {"sample": 2, "steps": 2},
        "demo": {"out": "demo", "size": 512, "seed": 0},
        "datasets": datasets,
    }
    config.update(overrides)
    return config


def error_line(result: subprocess.CompletedProcess, *parts: str) -> str:
    """The one output line that holds every part (the dry run failed, and without a traceback)."""
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if all(part in line for part in parts)]
    assert len(lines) == 1, (parts, out[-3000:])
    return lines[0]
