"""Configuration checks, slide discovery and input functions shared by every stage.

Slides come per dataset from a sample sheet (TSV) or a glob; both are read afresh on every run, so new
slides (rows or files) are picked up and only their jobs run. Everything that changes results goes
into a rule's `params:` (with the smoothsal version), so changing it reruns what it affects.
"""

import glob
import importlib.metadata
import os
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pandas as pd
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


def checked(data, schema, where):
    """`validate` with a one-line error: what is wrong, at which key, where (instead of the schema dump)."""
    try:
        validate(data, schema)
    except WorkflowError as err:
        cause = err.__context__  # snakemake formats the jsonschema error into text; the original is here
        if not isinstance(cause, jsonschema.ValidationError):
            raise
        at = ".".join(map(str, cause.absolute_path)) or "top level"
        row = re.search(r"row (\d+)", str(err))  # data frame rows (0-based) → sheet lines after the header
        at = f"line {int(row.group(1)) + 2}, column {at}" if row else at
        schema = f"workflow/{schema.removeprefix('../')}"
        raise WorkflowError(f"{where}: {cause.message} (at {at}); see {schema}") from None


checked(config, "../schemas/config.schema.yaml", "config")

DATASETS = config["datasets"]
METHODS = config["methods"]
DEMO_SLIDES = {
    "camelyon16": [f"{s}.{ext}" for s in ("tumor_001", "tumor_002", "normal_001", "normal_002",
                                           "test_001", "test_002") for ext in ("tif", "xml")],
    "digipath": [f"{s}.{ext}" for s in ("digi_001", "digi_002", "digi_003") for ext in ("tif", "geojson")],
}  # fmt: skip
SAMPLE_COLUMNS = ("slide_id", "path", "annotation", "split", "mpp")


def smoothsal_version():
    """The installed smoothsal's version (else the checkout's): a params entry of every rule."""
    try:
        return importlib.metadata.version("smoothsal")
    except importlib.metadata.PackageNotFoundError:
        with open(Path(workflow.basedir) / "pyproject.toml", "rb") as f:
            return tomllib.load(f)["project"]["version"]


VERSION = smoothsal_version()


def read_sample_sheet(name, path):
    """A dataset's sample sheet → one row per slide (columns of SAMPLE_COLUMNS, empty strings if absent)."""
    if not os.path.isfile(path):
        raise WorkflowError(
            f"dataset {name}: sample sheet {path} not found (relative to the working directory {os.getcwd()})"
        )
    sheet = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    sheet.columns = sheet.columns.str.strip()
    checked(sheet, "../schemas/samples.schema.yaml", f"dataset {name}: sample sheet {path}")
    for column in SAMPLE_COLUMNS:
        if column not in sheet.columns:
            sheet[column] = ""
    return sheet[list(SAMPLE_COLUMNS)]


def glob_slides(name, settings):
    """Slides matching a dataset's glob; slide id = file name without suffix, annotation where it exists."""
    paths = sorted(glob.glob(settings["slides"]))
    if not paths:
        raise WorkflowError(f"dataset {name}: slides glob {settings['slides']!r} matches no file")
    rows = []
    for path in paths:
        slide_id = Path(path).stem
        pattern = settings["annotations"]
        annotation = pattern.format(slide=slide_id) if pattern else ""
        split = "train" if slide_id in settings["train_slides"] else "eval"
        rows.append((slide_id, path, annotation if os.path.isfile(annotation) else "", split, ""))
    return pd.DataFrame(rows, columns=SAMPLE_COLUMNS)


def read_slides(name, settings):
    """Slides of one dataset, indexed by slide id, without the excluded ones; checks ids and splits."""
    source = settings["slides"]
    table = read_sample_sheet(name, source) if source.endswith(".tsv") else glob_slides(name, settings)
    duplicated = table["slide_id"][table["slide_id"].duplicated()].tolist()
    if duplicated:
        raise WorkflowError(f"dataset {name}: slide ids occur more than once in {source}: {duplicated}")
    table["split"] = table["split"].replace("", "eval")
    mpp = pd.to_numeric(table["mpp"].mask(table["mpp"] == ""))  # empty: the dataset's mpp, else the file's
    table["mpp"] = mpp if settings["mpp"] is None else mpp.fillna(settings["mpp"])
    table = table[~table["slide_id"].isin(settings["exclude"])].set_index("slide_id", drop=False)
    model = settings["model"]
    if model["checkpoint"] and model["train"]:
        raise WorkflowError(f"dataset {name}: model has both checkpoint and train; keep one")
    needs_train = model["train"] or "surrogate" in METHODS
    if needs_train and not (table["split"] == "train").any():
        what = "model" if model["train"] else "surrogate"
        how = "split=train rows in" if source.endswith(".tsv") else "train_slides for the slides of"
        raise WorkflowError(
            f"dataset {name}: no slide in the train split, which trains the {what}; add {how} {source}"
        )
    if settings["task"] == "segmentation" and model["train"]:
        missing = table[(table["split"] == "train") & (table["annotation"] == "")]["slide_id"].tolist()
        if missing:
            raise WorkflowError(
                f"dataset {name}: train slides without the annotation that training needs: {missing}"
            )
    return table


SLIDES = {name: read_slides(name, settings) for name, settings in DATASETS.items()}
if not any((table["split"] == "eval").any() for table in SLIDES.values()):
    raise WorkflowError(
        "no dataset has a slide in the eval split (saliency runs on those): mark some split=eval"
    )


wildcard_constraints:
    dataset="|".join(map(re.escape, DATASETS)),
    slide=r"[^/]+",
    method="|".join(METHODS),


# --- command-line options from settings ------------------------------------------------------------


def cli_args(settings):
    """`--key value` for each setting (None left out, lists spread, True as a bare flag, False left out)."""
    args = []
    for key, value in settings.items():
        flag = f"--{key.replace('_', '-')}"
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return shlex.join(args)


def model_args(dataset):
    """Architecture, classes and normalisation of a dataset's model (the checkpoint is an input)."""
    model = DATASETS[dataset]["model"]
    keys = ("arch", "num_classes", "mean", "std")
    return cli_args({k: model[k] for k in keys})


def tiles_settings(wildcards):
    ds = DATASETS[wildcards.dataset]
    return cli_args({**ds["tiles"], "class_map": ds["class_map"]})


def slide_mpp(wildcards):
    """`--mpp X` where the sheet (or the dataset) gives the slide's level-0 µm/px, else nothing."""
    mpp = SLIDES[wildcards.dataset].loc[wildcards.slide, "mpp"]
    return "" if pd.isna(mpp) else cli_args({"mpp": float(mpp)})


def saliency_settings(wildcards):
    ds = DATASETS[wildcards.dataset]
    sg = config["smoothgrad"]
    settings = {
        "layers": config["layers"],
        "attributions": config["attributions"],
        "smoothgrad_samples": sg["samples"],
        "smoothgrad_stdev": sg["stdev"],
        "seed": sg["seed"],
        "target": ds["target"],
        "task": ds["task"],
    }
    return f"{model_args(wildcards.dataset)} {cli_args(settings)}"


def heatmaps_settings(wildcards):
    hm = config["heatmaps"]
    return cli_args({"tissue_mpp": hm["tissue_mpp"], "blend": hm["blend"], "ngff": hm["ngff"],
                     "class_map": DATASETS[wildcards.dataset]["class_map"]})  # fmt: skip


def train_model_settings(wildcards):
    ds = DATASETS[wildcards.dataset]
    train = cli_args({**ds["model"]["train"], "class_map": ds["class_map"]})
    return f"{model_args(wildcards.dataset)} {train}"


def surrogate_settings(wildcards):
    return f"{model_args(wildcards.dataset)} {cli_args(DATASETS[wildcards.dataset]['surrogate'])}"


class RunOptions:
    """Command-line options that change speed or memory, never results (batch size, device, workers).

    Deliberately not a builtin type: Snakemake's params rerun trigger records only builtin values, so
    changing these reruns nothing (tests/test_workflow.py checks it), while the shell still gets them.
    """

    def __init__(self, **options):
        self.args = cli_args(options)

    def __str__(self):
        return self.args


def optional(flag, paths):
    """`flag path...` if there are paths (a rule's optional inputs), else nothing."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    return shlex.join([flag, *paths]) if paths else ""


# --- slides and file names ---------------------------------------------------------------------------


def slides_of(dataset, split):
    table = SLIDES[dataset]
    return table[table["split"] == split]["slide_id"].tolist()


def get_slide(wildcards):
    return SLIDES[wildcards.dataset].loc[wildcards.slide, "path"]


def get_annotation(wildcards):
    """The slide's annotation file as a list (empty where it has none)."""
    annotation = SLIDES[wildcards.dataset].loc[wildcards.slide, "annotation"]
    return [annotation] if annotation else []


def get_model(wildcards):
    """The dataset's model checkpoint as a list: given, trained by rule train_model, or none (random init)."""
    model = DATASETS[wildcards.dataset]["model"]
    if model["train"]:
        return [f"results/{wildcards.dataset}/model.pt"]
    return [model["checkpoint"]] if model["checkpoint"] else []


def get_train_tiles(wildcards):
    """Tile tables of the train split: the only input the model and the surrogate are trained on."""
    return expand("results/{dataset}/tiles/{slide}.parquet", dataset=wildcards.dataset,
                  slide=slides_of(wildcards.dataset, "train"))  # fmt: skip


def get_train_annotations(wildcards):
    """Annotations of the train slides, in tile-table order (segmentation models learn the masks)."""
    if DATASETS[wildcards.dataset]["task"] != "segmentation":
        return []
    table = SLIDES[wildcards.dataset]
    return [table.loc[s, "annotation"] for s in slides_of(wildcards.dataset, "train")]


def get_surrogate(wildcards):
    return [f"results/{wildcards.dataset}/surrogate.pt"] if wildcards.method == "surrogate" else []


def get_saliency_stores(wildcards):
    return expand("results/{dataset}/saliency/{slide}/{method}.zarr", dataset=wildcards.dataset,
                  slide=wildcards.slide, method=METHODS)  # fmt: skip


def eval_outputs(pattern):
    """`pattern` for every eval slide of every dataset (and every method, where it has {method})."""
    return [
        path
        for dataset in DATASETS
        for slide in slides_of(dataset, "eval")
        for path in expand(pattern, dataset=dataset, slide=slide, method=METHODS)
    ]


def get_report_tables(wildcards):
    return eval_outputs("results/{dataset}/saliency/{slide}/{method}.parquet")


def get_report_heatmaps(wildcards):
    return eval_outputs("results/{dataset}/heatmaps/{slide}.ome.zarr")


def get_final_outputs():
    return ["results/report/index.html"]
