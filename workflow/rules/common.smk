"""Configuration checks, slide discovery and input functions shared by every stage.

The config is read here and checked before anything runs, each mistake stopping the dry run with one line
that names the key or file and the fix: YAML syntax (with its line), the schema, option combinations, slide
ids in `exclude` / `train_slides` against the slides, and `arch`, `layers` and `class_map` as the installed
smoothsal reads them (one model built per architecture). Slides come per dataset from a sample sheet (TSV)
or a glob; both are read afresh on every run, so new slides (rows or files) are picked up and only their
jobs run. Everything that changes results goes into a rule's `params:` (with the smoothsal version), so
changing it reruns what it affects; a slide's content is such a param too (its fingerprint), while its
modification time decides nothing (slides are `ancient` inputs).
"""

import difflib
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pandas as pd
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

CONFIG_FILE = "config.yaml"


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


def check_syntax(path):
    """A YAML syntax error with its line and column (Snakemake's own message names neither).

    Only the working directory's config.yaml: a --configfile is read by Snakemake before the workflow.
    """
    if not os.path.isfile(path):
        return
    try:
        text = Path(path).read_text(encoding="utf-8")
        json.loads(text)  # Snakemake reads JSON first, then YAML
        return
    except UnicodeDecodeError as err:
        where = f"{err.reason} at byte {err.start}"
        raise WorkflowError(f"{path}: not UTF-8 text ({where}); save it as UTF-8") from None
    except ValueError:
        pass
    try:
        yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark, context = err.problem_mark, err.context_mark
        opened = f" ({err.context} that starts at line {context.line + 1})" if err.context and context else ""
        raise WorkflowError(
            f"{path} line {mark.line + 1}, column {mark.column + 1}: {err.problem}{opened}; fix the YAML "
            "there (indent with spaces, a ':' after each key, close every bracket and quote)"
        ) from None


# Used as a module (`module smoothsal: ... config: config`), the workflow gets the project's config and
# Snakemake skips the configfile statement below; this repository's Snakefile reads config.yaml.
if not getattr(workflow.modifier, "skip_configfile", False):
    check_syntax(CONFIG_FILE)


configfile: CONFIG_FILE


checked(config, "../schemas/config.schema.yaml", "config")

DATASETS = config["datasets"]
METHODS = config["methods"]
DEMO_SLIDES = {
    "camelyon16": [f"{s}.{ext}" for s in ("tumor_001", "tumor_002", "normal_001", "normal_002",
                                           "test_001", "test_002") for ext in ("tif", "xml")],
    "digipath": [f"{s}.{ext}" for s in ("digi_001", "digi_002", "digi_003") for ext in ("tif", "geojson")],
}  # fmt: skip
SAMPLE_COLUMNS = ("slide_id", "path", "annotation", "split", "mpp")
# The one definition of a valid slide id (it names output files): the sample sheet schema's, for globs too.
# Files of the workflow are found relative to this file (workflow.source_path), never workflow.basedir: in a
# module that is the directory of the project's own Snakefile.
with open(workflow.source_path("../schemas/samples.schema.yaml")) as f:
    SLIDE_ID = re.compile(yaml.safe_load(f)["properties"]["slide_id"]["pattern"])


def smoothsal_version():
    """The installed smoothsal's version (else the workflow's own, from its repository's pyproject.toml):
    a params entry of every rule."""
    try:
        return importlib.metadata.version("smoothsal")
    except importlib.metadata.PackageNotFoundError:
        with open(workflow.source_path("../../pyproject.toml"), "rb") as f:
            return tomllib.load(f)["project"]["version"]


VERSION = smoothsal_version()


def is_sheet(settings):
    return settings["slides"].endswith(".tsv")


def check_settings(name, settings):
    """What the schema cannot say: options that exclude each other, keys that only globs use."""
    tiles, model = settings["tiles"], settings["model"]
    if tiles["level"] is not None and tiles["target_mpp"] is not None:
        raise WorkflowError(
            f"dataset {name}: tiles has both level ({tiles['level']}) and target_mpp "
            f"({tiles['target_mpp']}); keep one (level reads tiles at that pyramid level unresized, "
            "target_mpp resamples them to that µm/px)"
        )
    if model["checkpoint"] and model["train"]:
        raise WorkflowError(f"dataset {name}: model has both checkpoint and train; keep one")
    sheet_column = {"train_slides": "split column (train)", "annotations": "annotation column"}
    for key, column in sheet_column.items():
        if is_sheet(settings) and settings[key]:
            raise WorkflowError(
                f"dataset {name}: {key} is for glob datasets, and {settings['slides']} is a sample sheet; "
                f"remove {key} and use the sheet's {column}"
            )


def check_ids(name, key, ids, known, source):
    """Every slide id listed under `key` names a slide of the dataset (a misspelt id would do nothing)."""
    unknown = [i for i in ids if i not in known]
    if unknown:
        guess = {i: difflib.get_close_matches(i, known, n=1) for i in unknown}
        hint = {i: f" (did you mean {guess[i][0]!r}?)" if guess[i] else "" for i in unknown}
        listed = ", ".join(f"{i!r}{hint[i]}" for i in unknown)
        raise WorkflowError(
            f"dataset {name}: {key} lists slide ids that are not in {source}: {listed}; fix or remove them"
        )


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
    table = pd.DataFrame(rows, columns=SAMPLE_COLUMNS)
    check_ids(name, "train_slides", settings["train_slides"], table["slide_id"].tolist(), settings["slides"])
    return table


def check_glob_ids(name, table):
    """Ids from file names pass the sample sheets' id pattern (an id like `-rf` would read as an option)."""
    for slide_id, path in zip(table["slide_id"], table["path"]):
        if not SLIDE_ID.fullmatch(slide_id):
            raise WorkflowError(
                f"dataset {name}: slide file {path} gives slide id {slide_id!r}, which is not a valid id "
                "(a letter or digit, then letters, digits, '.', '_' or '-'); rename the file, add "
                f"{slide_id!r} to exclude, or list the slides in a sample sheet with valid slide_ids"
            )


def safe_path(path):
    """A relative path that starts with '-' gets './' so that no command reads it as an option."""
    return f"./{path}" if path.startswith("-") else path


def read_slides(name, settings):
    """Slides of one dataset, indexed by slide id, without the excluded ones; checks ids and splits."""
    check_settings(name, settings)
    source = settings["slides"]
    table = read_sample_sheet(name, source) if is_sheet(settings) else glob_slides(name, settings)
    duplicated = table["slide_id"][table["slide_id"].duplicated()].tolist()
    if duplicated:
        raise WorkflowError(f"dataset {name}: slide ids occur more than once in {source}: {duplicated}")
    check_ids(name, "exclude", settings["exclude"], table["slide_id"].tolist(), source)
    table = table[~table["slide_id"].isin(settings["exclude"])].copy()
    if not is_sheet(settings):
        check_glob_ids(name, table)
    table["path"] = table["path"].map(safe_path)
    table["annotation"] = table["annotation"].map(safe_path)
    table["split"] = table["split"].replace("", "eval")
    mpp = pd.to_numeric(table["mpp"].mask(table["mpp"] == ""))  # empty: the dataset's mpp, else the file's
    table["mpp"] = mpp if settings["mpp"] is None else mpp.fillna(settings["mpp"])
    table = table.set_index("slide_id", drop=False)
    model = settings["model"]
    needs_train = model["train"] or "surrogate" in METHODS
    if needs_train and not (table["split"] == "train").any():
        what = "model" if model["train"] else "surrogate"
        how = "split=train rows in" if is_sheet(settings) else "train_slides for the slides of"
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


def annotation_readers():
    """The installed smoothsal's class-map parser and annotation reader."""
    from smoothsal.annotations import parse_class_map, read_annotations

    return parse_class_map, read_annotations


def model_code(arch):
    """The .py file of a `python:MODULE:CALLABLE` arch whose MODULE is a file, as a list; nothing for other
    sources (an installed module changes with its package's version)."""
    source = arch.removeprefix("python:").rpartition(":")[0] if arch.startswith("python:") else ""
    return [source] if source.endswith(".py") else []


def build_model(smoothsal, model):
    """A dataset's model (random weights) for its layer names: on the meta device (no weights; fast), else on
    the CPU."""
    import torch

    options = {"num_classes": model["num_classes"], "kwargs": model["kwargs"]}
    try:
        with torch.device("meta"):
            return smoothsal.load_model(model["arch"], **options)
    except Exception:  # only a shortcut: the CPU build below is what the jobs do, and raises what they would
        return smoothsal.load_model(model["arch"], **options)


def check_dataset(smoothsal, name, ds, slides, models):
    """One dataset's model (`arch` from any source, its `kwargs`), `layers` and `class_map` (with its
    annotation files) as its jobs read them."""
    model = ds["model"]
    key = json.dumps([model["arch"], model["num_classes"], model["kwargs"]], sort_keys=True)
    try:
        if key not in models:  # layer names depend on the architecture only: one model per arch
            models[key] = build_model(smoothsal, model)
    except ValueError as err:  # smoothsal's one-line BadOption: an unknown arch, a python: file that fails
        raise WorkflowError(f"dataset {name}: model.arch {model['arch']!r}: {err}") from None
    try:
        smoothsal.resolve_layers(models[key], config["layers"])
    except ValueError as err:
        raise WorkflowError(f"config layers (dataset {name}, arch {model['arch']}): {err}") from None
    from smoothsal.inspection import check_explainable

    try:  # what `smoothsal inspect` checks: maps under 2×2, a surrogate with nothing to replace, DeepLift rules
        warnings = check_explainable(models[key], model["arch"], ds["tiles"]["tile_size"], config["layers"],
                                     METHODS, config["attributions"])  # fmt: skip
    except ValueError as err:
        raise WorkflowError(f"dataset {name}: {err}") from None
    for warning in warnings:
        logger.warning(f"dataset {name}: {warning}")
    parse_class_map, read_annotations = annotation_readers()
    try:
        mapping = None if ds["class_map"] is None else parse_class_map(ds["class_map"])
        for path in filter(os.path.isfile, slides["annotation"]):
            read_annotations(path, mapping)
    except ValueError as err:
        raise WorkflowError(f"dataset {name} (class_map {ds['class_map']!r}): {err}") from None


CHECKED = Path(".snakemake") / "smoothsal-checked.json"  # keys of dataset checks that passed, newest last


def check_key(name, ds, slides):
    """What a dataset's smoothsal check depends on: the installed package's files, the settings, and the
    annotation files (size, mtime). An unchanged key skips the check, and with it importing torch."""
    spec = importlib.util.find_spec("smoothsal")  # finds, does not import
    root = Path(next(iter(spec.submodule_search_locations))) if spec else None
    package = max((p.stat().st_mtime_ns for p in root.rglob("*.py")), default=0) if root else None
    stats = {p: os.stat(p) for p in filter(os.path.isfile, slides["annotation"])}
    files = [(p, st.st_size, st.st_mtime_ns) for p, st in stats.items()]
    model = ds["model"]
    code = [(p, os.stat(p).st_mtime_ns) for p in model_code(model["arch"]) if os.path.isfile(p)]
    settings = [model["arch"], model["num_classes"], model["kwargs"], code, config["layers"], ds["class_map"],
                METHODS, config["attributions"], ds["tiles"]["tile_size"]]  # fmt: skip
    key = json.dumps([VERSION, str(root), package, settings, files], default=str)
    return hashlib.sha256(key.encode()).hexdigest()


def read_checked():
    try:
        return json.loads(CHECKED.read_text())
    except (OSError, ValueError):
        return []


def write_checked(keys):
    """Remember passed checks (at most 256); where .snakemake/ is not writable, they just run again."""
    partial = CHECKED.with_name(f".{CHECKED.name}.{os.getpid()}")
    try:
        CHECKED.parent.mkdir(exist_ok=True)
        partial.write_text(json.dumps(keys[-256:]))
        partial.replace(CHECKED)
    except OSError:
        partial.unlink(missing_ok=True)


def check_with_smoothsal(slides):
    """`arch`, `layers` and `class_map` by the installed smoothsal: its architecture registry, the layer
    names of one model per architecture, its class-map parser on every annotation file that exists. Only in
    the run that plans the jobs (cluster jobs re-read this file), and only what changed since it passed."""
    if not workflow.is_main_process:
        return
    checked_keys = read_checked()
    keys = {name: check_key(name, ds, slides[name]) for name, ds in DATASETS.items()}
    todo = [name for name, key in keys.items() if key not in checked_keys]
    if not todo:
        return
    try:
        import smoothsal
    except ImportError as err:
        logger.warning(f"smoothsal is not importable here ({err}): arch, layers and class_map are checked by "
                       "the jobs only")  # fmt: skip
        return
    models = {}
    for name in todo:
        check_dataset(smoothsal, name, DATASETS[name], slides[name], models)
    write_checked([k for k in checked_keys if k not in keys.values()] + list(dict.fromkeys(keys.values())))


SLIDES = {name: read_slides(name, settings) for name, settings in DATASETS.items()}
if not any((table["split"] == "eval").any() for table in SLIDES.values()):
    raise WorkflowError(
        "no dataset has a slide in the eval split (saliency runs on those): mark some split=eval"
    )
check_with_smoothsal(SLIDES)


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


def model_args(dataset, keys=("arch", "num_classes", "mean", "std"), loads=True):
    """Architecture, classes, constructor options (JSON) and normalisation of a dataset's model, and where a job
    loads its checkpoint (``loads``) the pickle opt-in; the checkpoint and a python: model's file are inputs."""
    model = DATASETS[dataset]["model"]
    kwargs = json.dumps(model["kwargs"], sort_keys=True) if model["kwargs"] else None
    pickle = model["allow_pickle"] and loads
    return cli_args({k: model[k] for k in keys} | {"model_kwargs": kwargs, "allow_pickle": pickle})


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
        "precision": config["saliency"]["precision"],  # changes results: a param, reruns when changed
    }
    return f"{model_args(wildcards.dataset)} {cli_args(settings)}"


def threads_up_to(most):
    """A job's threads: ``most``, but at most half the cores snakemake was given, so that on a small
    machine two jobs run side by side (a job's start-up, reading and writing run on one core; another
    job's compute fills the other). Without --cores (a cluster executor, --report, --lint) it is
    ``most``: cluster profiles set threads per rule (set-threads)."""
    try:
        cores = workflow.cores
    except WorkflowError:
        return most
    return max(1, min(most, cores // 2))


def saliency_run_options(threads):
    """The saliency jobs' speed-only options (config saliency without precision, which is a setting)."""
    options = {k: v for k, v in config["saliency"].items() if k != "precision"}
    return RunOptions(**options, workers=threads - 1)


def heatmaps_settings(wildcards):
    hm = config["heatmaps"]
    return cli_args({"tissue_mpp": hm["tissue_mpp"], "blend": hm["blend"], "ngff": hm["ngff"],
                     "class_map": DATASETS[wildcards.dataset]["class_map"]})  # fmt: skip


def qupath_settings(wildcards):
    """Config qupath: what the tile objects carry (`smoothsal export --qupath-tiles`); every map of the
    container (the config's methods, attributions and layers)."""
    qp = config["qupath"]
    settings = {"qupath_subdivide": qp["subdivide"], "qupath_statistics": qp["statistics"]}
    measures = shlex.join(["--qupath-tile-measures", *qp["tile_measures"]])
    return f"{cli_args(settings)} {measures}"


def train_model_settings(wildcards):
    ds = DATASETS[wildcards.dataset]
    train = cli_args({**ds["model"]["train"], "class_map": ds["class_map"]})
    return f"{model_args(wildcards.dataset, loads=False)} {train}"


def surrogate_settings(wildcards):
    return f"{model_args(wildcards.dataset)} {cli_args(DATASETS[wildcards.dataset]['surrogate'])}"


# --- faithfulness (issue 15) --------------------------------------------------------------------------

FAITHFULNESS_RUN = ("enabled", "batch_size", "device")  # keys that are no setting of the numbers


def faithfulness_settings(wildcards):
    """Model, layers and the stage's settings (everything that changes its numbers)."""
    ds = DATASETS[wildcards.dataset]
    settings = {k: v for k, v in config["faithfulness"].items() if k not in FAITHFULNESS_RUN}
    if not settings.pop("randomisation"):
        settings["no_randomisation"] = True
    model = model_args(wildcards.dataset, ("arch", "num_classes"))
    extra = {"layers": config["layers"], "class_map": ds["class_map"]}
    return f"{model} {cli_args(settings | extra)}"


def faithfulness_run_options(wildcards):
    fa = config["faithfulness"]
    return RunOptions(batch_size=fa["batch_size"], device=fa["device"])


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


def load_slide_fingerprint():
    """smoothsal's `slide_fingerprint` (standard library only): from the installed smoothsal, which loads its
    names lazily (no torch), as in a deployed module; where smoothsal is not importable in Snakemake's own
    environment (its jobs run in the conda env), from the file in the workflow's repository, beside it."""
    try:
        from smoothsal.fingerprint import slide_fingerprint
    except ImportError:
        pass
    else:
        return slide_fingerprint
    path = workflow.source_path("../../smoothsal/fingerprint.py")
    spec = importlib.util.spec_from_file_location("smoothsal_fingerprint", path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded.slide_fingerprint


SLIDE_FINGERPRINT = load_slide_fingerprint()


def get_slide(wildcards):
    """The slide as an `ancient` input: its modification time decides nothing (a replacement may be older,
    `cp -p`; a touched slide is unchanged); its content does, through `slide_fingerprint`."""
    return ancient(SLIDES[wildcards.dataset].loc[wildcards.slide, "path"])


def slide_fingerprint(wildcards):
    """The slide's fingerprint now (size and sampled bytes, what `smoothsal tiles` records in the table): a
    param of the rules that tile it, so that new content reruns them and all that follows. Empty for a
    slide that a job has yet to write (the demo's): the job's params are read again when it runs."""
    path = SLIDES[wildcards.dataset].loc[wildcards.slide, "path"]
    return SLIDE_FINGERPRINT(path) if os.path.isfile(path) else ""


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


def get_model_code(wildcards):
    """A `python:` model's .py file as a list (an input: editing it reruns the jobs that build the model)."""
    return model_code(DATASETS[wildcards.dataset]["model"]["arch"])


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


def saliency_outputs(wildcards, suffix):
    """The slide's saliency outputs, one per method: stores (``zarr``) or per-tile tables (``parquet``)."""
    return expand("results/{dataset}/saliency/{slide}/{method}.{suffix}", dataset=wildcards.dataset,
                  slide=wildcards.slide, method=METHODS, suffix=suffix)  # fmt: skip


def get_saliency_stores(wildcards):
    return saliency_outputs(wildcards, "zarr")


def get_saliency_tables(wildcards):
    """The slide's per-tile tables (their probabilities, labels, TV, prediction difference)."""
    return saliency_outputs(wildcards, "parquet")


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


def get_report_faithfulness(wildcards):
    """The faithfulness tables of every eval slide × method (none when the stage is off)."""
    if not config["faithfulness"]["enabled"]:
        return []
    return eval_outputs("results/{dataset}/faithfulness/{slide}/{method}.parquet")


def get_report_randomisation(wildcards):
    if not config["faithfulness"]["enabled"]:
        return []
    return eval_outputs("results/{dataset}/faithfulness/{slide}/{method}.randomisation.parquet")


def get_report_surrogates(wildcards):
    """Issue 14: the surrogate files whose fit the report shows (those the surrogate method's saliency uses)."""
    if "surrogate" not in METHODS:
        return []
    return [f"results/{dataset}/surrogate.pt" for dataset in DATASETS if slides_of(dataset, "eval")]


def get_qupath_outputs():
    """Config qupath.tiles: every eval slide's QuPath tile objects (none when off)."""
    if not config["qupath"]["tiles"]:
        return []
    return list(dict.fromkeys(eval_outputs("results/{dataset}/qupath/{slide}.geojson.gz")))


def get_final_outputs():
    return ["results/report/index.html", *get_qupath_outputs()]


# --- seams: eval slides tiled again at half stride (rule seams) --------------------------------------


def read_seam_slides():
    """(dataset, slide id) of config seams.slides; each must be an eval slide of that dataset."""
    pairs = []
    for entry in config["seams"]["slides"]:
        dataset, slide = entry.split("/", 1)
        if dataset not in DATASETS:
            raise WorkflowError(f"config seams.slides: {entry!r} names no dataset; use one of {', '.join(DATASETS)}")
        check_ids(dataset, "seams.slides", [slide], slides_of(dataset, "eval"), "its eval slides")
        pairs.append((dataset, slide))
    return pairs


SEAM_SLIDES = read_seam_slides()


def seams_tiles_settings(wildcards):
    """The dataset's tiling at half stride, on config seams.roi, every tile (no sample)."""
    ds = DATASETS[wildcards.dataset]
    tiles = {**ds["tiles"], "stride": ds["tiles"]["tile_size"] // 2, "roi": config["seams"]["roi"], "max_tiles": None}
    return cli_args({**tiles, "class_map": ds["class_map"]})


def get_seam_stores(wildcards):
    return expand("results/{dataset}/seams/{slide}/saliency/{method}.zarr", dataset=wildcards.dataset,
                  slide=wildcards.slide, method=METHODS)  # fmt: skip


def get_report_seams(wildcards):
    return [f"results/{dataset}/seams/{slide}/seams.csv" for dataset, slide in SEAM_SLIDES]
