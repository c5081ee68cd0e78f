"""`smoothsal report`: the paper's tables from per-tile tables with known values, the figures, and an
index.html that a real headless Chromium renders with every image loaded."""

from __future__ import annotations

import html
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from ngff import assert_valid_ngff
from ome_zarr.format import FormatV04
from ome_zarr.writer import write_multiscales_metadata

from smoothsal import report
from smoothsal.errors import BadOutput, SmoothsalError
from smoothsal.report.checkerboard import checkerboard_table
from smoothsal.report.tables import label_of
from smoothsal.store import write_results

ATTRIBUTIONS = ("deeplift", "gradient")
# Mean TV per method (before noise); gradient/layer1 makes the backward hook the lowest, as in the
# paper's ResNet34 row, so the marked minimum is not always the same column.
LEVELS = {"original": 2.5, "surrogate": 1.9, "backward_hook": 1.7, "forward_hook": 1.6}
# Mean checkerboard share per method: every smoothing method below the original at every layer.
CHECKERBOARD = {"original": 0.30, "surrogate": 0.05, "backward_hook": 0.12, "forward_hook": 0.08}


def _tile_table(dataset, arch, slide, method, layers, n, task, seed, labels=None, classes=2):
    """A per-tile table as `smoothsal saliency --table` writes it (contracts.md), with random values."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "dataset": dataset, "slide_id": slide, "method": method, "arch": arch, "tile": np.arange(n),
            "x": np.arange(n) * 224, "y": 0, "w": 224, "h": 224, "mpp": 0.5,
            "label": labels if labels is not None else np.full(n, -1), "task": task,
        }
    )  # fmt: skip
    logits = rng.normal(size=(n, classes))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for k in range(classes):
        frame[f"logit_{k}"], frame[f"prob_{k}"] = logits[:, k], probs[:, k]
    frame["pred"] = logits.argmax(1)
    frame["target"] = np.where(frame["label"] >= 0, frame["label"], frame["pred"])
    frame["correct"] = np.where(frame["label"] >= 0, (frame["pred"] == frame["label"]).astype(float), np.nan)
    scale = 0.0 if method in ("original", "backward_hook") else 0.05
    frame["pd_all"] = rng.uniform(0, 2 * scale, n)
    frame["pd_target"] = frame["pd_all"] / 2
    frame["agree"] = (rng.uniform(size=n) > (0.0 if scale == 0 else 0.2)).astype(float)
    if task == "segmentation":
        masked = rng.uniform(0, scale + 0.01, n)
        masked[::3] = np.nan  # all-background tiles: undefined
        frame["pd_masked"] = masked
    for attribution in ATTRIBUTIONS:
        for i, layer in enumerate(layers):
            level = LEVELS[method] - (
                0.3 if (method, attribution, i) == ("backward_hook", "gradient", 0) else 0
            )
            frame[f"tv/{attribution}/{layer}"] = level - 0.1 * i + rng.normal(0, 0.05, n)
            if dataset != "digipath":  # digipath's tables stand for format 1: no checkerboard columns
                share = CHECKERBOARD[method] * (1 - 0.1 * i) + rng.normal(0, 0.01, n)
                frame[f"checkerboard/{attribution}/{layer}"] = share.clip(0, 1)
    return frame


def _write(frame: pd.DataFrame, path: Path) -> Path:
    """The results table as the store module writes it (with its metadata)."""
    write_results(
        frame, path, {"slide_id": str(frame["slide_id"].iloc[0]), "method": str(frame["method"].iloc[0])}
    )
    return path


CAMELYON_LAYERS = ["layer1", "layer2", "layer3"]
DIGIPATH_LAYERS = ["encoder.layer1", "encoder.layer2"]


@pytest.fixture(scope="module")
def frames() -> dict[tuple[str, str, str], pd.DataFrame]:
    """camelyon16/resnet18 (classification, all four methods): tumor_a labelled, normal_b not;
    digipath/unet_resnet34 (segmentation, original and surrogate only)."""
    out = {}
    labels = np.array([0, 1, 1, 0, 1, 0, 0])
    for s, method in enumerate(LEVELS):
        out["camelyon16", "tumor_a", method] = _tile_table(
            "camelyon16", "resnet18", "tumor_a", method, CAMELYON_LAYERS, 7, "classification", 10 + s, labels
        )
        out["camelyon16", "normal_b", method] = _tile_table(
            "camelyon16", "resnet18", "normal_b", method, CAMELYON_LAYERS, 5, "classification", 20 + s
        )
    for s, method in enumerate(("original", "surrogate")):
        out["digipath", "digi_003", method] = _tile_table(
            "digipath",
            "unet_resnet34",
            "digi_003",
            method,
            DIGIPATH_LAYERS,
            9,
            "segmentation",
            30 + s,
            classes=3,
        )
    return out


@pytest.fixture(scope="module")
def table_paths(frames, tmp_path_factory) -> dict[tuple[str, str, str], Path]:
    root = tmp_path_factory.mktemp("results")
    return {
        key: _write(frame, root / key[0] / "saliency" / key[1] / f"{key[2]}.parquet")
        for key, frame in frames.items()
    }


def _image(group: zarr.Group, levels: list[np.ndarray], pixel_um: float, axes: str) -> None:
    """An NGFF 0.4 multiscales image; level k pixel j covers [j·s, (j+1)·s) µm, s = 2^k · pixel_um."""
    datasets = []
    for k, data in enumerate(levels):
        group.create_array(str(k), data=data)
        s, lead = pixel_um * 2**k, [1.0] * (data.ndim - 2)
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": lead + [s, s]},
            {"type": "translation", "translation": [0.0] * len(lead) + [s / 2] * 2}]})  # fmt: skip
    axis = {"c": {"name": "c", "type": "channel"}, "y": {"name": "y", "type": "space", "unit": "micrometer"},
            "x": {"name": "x", "type": "space", "unit": "micrometer"}}  # fmt: skip
    write_multiscales_metadata(group, datasets, fmt=FormatV04(), axes=[axis[a] for a in axes])


def _container(path: Path, slide: str, methods: list[str], layers: list[str], seed: int = 0) -> dict:
    """A tiny heatmap container as contracts.md describes: tissue + one map per method/attribution/layer,
    all over the same 256 × 192 µm."""
    rng = np.random.default_rng(seed)
    root = zarr.open_group(path, mode="w", zarr_format=2)
    tissue = np.full((3, 96, 128), 235, np.uint8)
    tissue[:, 20:80, 10:110] = np.array([200, 120, 170], np.uint8)[:, None, None]  # pink "tissue"
    _image(root.create_group("tissue"), [tissue, tissue[:, ::2, ::2]], 2.0, "cyx")
    images, values = [{"path": "tissue", "kind": "tissue"}], {}
    for method in methods:
        for attribution in ATTRIBUTIONS:
            for i, layer in enumerate(layers):
                side = 48 // 2**i  # layer resolution halves, the physical extent stays
                z = rng.normal(0, 1 + i, (side * 3 // 4, side)).astype(np.float32)
                z[: side // 8] = np.nan  # no tile there
                sub = f"heatmaps/{method}/{attribution}/{layer}"
                _image(root.create_group(sub), [z], 256 / side, "yx")
                images.append({"path": sub, "kind": "heatmap", "method": method, "attribution": attribution,
                               "layer": layer})  # fmt: skip
                values[method, attribution, layer] = z
    root.attrs["smoothsal"] = {"version": "test", "slide_id": slide, "slide_mpp": 0.5,
                               "slide_size_px": [512, 384], "images": images, "tiles": "tiles"}  # fmt: skip
    assert_valid_ngff(path)
    return values


@pytest.fixture(scope="module")
def built(cli, table_paths, tmp_path_factory):
    """The report of every table plus one container, through the real command line."""
    root = tmp_path_factory.mktemp("report")
    container = root / "camelyon16" / "heatmaps" / "tumor_a.ome.zarr"
    values = _container(container, "tumor_a", ["original", "surrogate"], CAMELYON_LAYERS)
    out = root / "report"
    cli("report", "--tables", *table_paths.values(), "--heatmaps", container, "--out", out)
    return out, container, values


def _expected_tv(frames, dataset, measure="tv"):
    """(layer, attribution, method) → (mean, std, n) over the tiles of every slide of a dataset."""
    rows = {}
    for (d, _, method), frame in frames.items():
        if d != dataset:
            continue
        for column in (c for c in frame if c.startswith(f"{measure}/")):
            _, attribution, layer = column.split("/", 2)
            rows.setdefault((layer, attribution, method), []).append(frame[column].to_numpy())
    return {k: (np.concatenate(v).mean(), np.concatenate(v).std(), sum(map(len, v))) for k, v in rows.items()}


def test_tv_table_means_stds_and_marked_minimum(built, frames):
    out, _, _ = built
    tv = pd.read_csv(out / "tables" / "tv.csv")
    for dataset in ("camelyon16", "digipath"):
        expected = _expected_tv(frames, dataset)
        got = tv[tv["dataset"] == dataset].set_index(["layer", "attribution", "method"])
        assert sorted(got.index) == sorted(expected)
        for key, (mean, std, n) in expected.items():
            assert got.at[key, "mean"] == pytest.approx(mean, abs=1e-12)
            assert got.at[key, "std"] == pytest.approx(std, abs=1e-12)
            assert got.at[key, "tiles"] == n
        for (layer, attribution), group in got.groupby(level=["layer", "attribution"]):
            lowest = min((k for k in expected if k[:2] == (layer, attribution)), key=lambda k: expected[k][0])
            assert group.index[group["lowest"]].tolist() == [lowest]
    assert tv.loc[tv["lowest"] & (tv["dataset"] == "camelyon16"), "method"].value_counts().to_dict() == {
        "forward_hook": 5, "backward_hook": 1,
    }  # fmt: skip
    # layers keep forward order (the tv/ column order), not alphabetical order
    assert list(dict.fromkeys(tv.loc[tv["dataset"] == "digipath", "layer"])) == DIGIPATH_LAYERS

    markdown = (out / "tables" / "tv.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("|"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    row = next(line for line in markdown.splitlines() if "camelyon16" in line and "| layer1 " in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    bold = [columns[i] for i, c in enumerate(cells) if c.startswith("**")]
    assert bold == ["DeepLift Forward hook", "Gradient Backward hook"]
    mean, std, _ = _expected_tv(frames, "camelyon16")["layer1", "gradient", "backward_hook"]
    assert cells[columns.index("Gradient Backward hook")] == f"**{mean:.3f} ± {std:.3f}**"
    digipath = next(line for line in markdown.splitlines() if "digipath" in line and "encoder.layer2" in line)
    assert digipath.count("–") == 4  # no hooks run on digipath: empty cells, not a failure


def test_checkerboard_table_beside_tv_with_not_recorded_cells_and_the_verdict(built, frames):
    """Means over tiles as TV's; digipath's tables (no checkerboard columns, as format 1) say "not
    recorded"; the note says, in numbers, whether every smoothing method lowers the share."""
    out, _, _ = built
    table = pd.read_csv(out / "tables" / "checkerboard.csv")
    got = table[table["dataset"] == "camelyon16"].set_index(["layer", "attribution", "method"])
    expected = _expected_tv(frames, "camelyon16", "checkerboard")
    assert sorted(got.index) == sorted(expected) and got["recorded"].all()
    for key, (mean, std, n) in expected.items():
        assert (got.at[key, "mean"], got.at[key, "std"], got.at[key, "tiles"]) == (
            pytest.approx(mean, abs=1e-12),
            pytest.approx(std, abs=1e-12),
            n,
        )
    digipath = table[table["dataset"] == "digipath"]
    tv = pd.read_csv(out / "tables" / "tv.csv")
    keys = ["dataset", "model", "layer", "attribution", "method"]
    assert table[keys].equals(tv[keys])  # every TV cell, in the same order; digipath's none recorded
    assert not digipath["recorded"].any() and digipath["mean"].isna().all() and (digipath["tiles"] == 0).all()
    markdown = (out / "tables" / "checkerboard.md").read_text()
    assert markdown.startswith("## Checkerboard share per method and layer")
    row = next(line for line in markdown.splitlines() if "digipath" in line and "encoder.layer1" in line)
    assert row.count("not recorded") == 4  # original and surrogate × two attributions
    ratios = {
        m: [expected[layer, a, m][0] / expected[layer, a, "original"][0] for layer in CAMELYON_LAYERS
            for a in ATTRIBUTIONS]
        for m in ("surrogate", "backward_hook", "forward_hook")
    }  # fmt: skip
    assert max(max(r) for r in ratios.values()) < 1
    ranges = "; ".join(f"{label_of(m)} {min(r):.2f}–{max(r):.2f}" for m, r in ratios.items())
    sentence = (
        "camelyon16 / resnet18: every smoothing method lowers the checkerboard share at every layer and "
        f"attribution (mean share / the original's: {ranges})."
    )
    assert sentence in markdown and "digipath" not in markdown.split("\n\n")[-1]
    page = (out / "index.html").read_text()
    assert page.index('id="tv_reduction"') < page.index('id="checkerboard"') < page.index('id="prediction')
    assert html.escape(sentence) in page


def test_checkerboard_verdict_names_where_a_method_does_not_lower_it(frames, tmp_path):
    original = frames["camelyon16", "tumor_a", "original"]
    raised = frames["camelyon16", "tumor_a", "forward_hook"].copy()
    raised["checkerboard/gradient/layer3"] = 0.5  # above the original's 0.24
    paths = [
        _write(f, tmp_path / f"{m}.parquet") for f, m in ((original, "original"), (raised, "forward_hook"))
    ]
    note = checkerboard_table(report.collect(paths)).note
    verdict = (
        "camelyon16 / resnet18: not every smoothing method lowers the checkerboard share: not Forward hook "
        "at layer3 (Gradient) (mean share / the original's: Forward hook 0."
    )
    assert verdict in note


def test_report_of_format_1_tables_only_says_not_recorded(frames, table_paths, tmp_path):
    old = [p for (d, _, _), p in table_paths.items() if d == "digipath"]  # no checkerboard columns
    result = report.write_report(old, tmp_path / "report")
    assert "tables/checkerboard.csv" in result.tables
    table = checkerboard_table(report.collect(old))
    assert (table.cells == "not recorded").all().all() and table.cells.shape == (2, 4)
    assert not table.data["recorded"].any() and "every smoothing method" not in table.note


def test_tv_reduction_average_min_and_max_over_layers(built, frames):
    out, _, _ = built
    reduction = pd.read_csv(out / "tables" / "tv_reduction.csv")
    for dataset, layers in (("camelyon16", CAMELYON_LAYERS), ("digipath", DIGIPATH_LAYERS)):
        expected = _expected_tv(frames, dataset)
        per_layer = {
            layer: 100
            * (1 - expected[layer, "deeplift", "surrogate"][0] / expected[layer, "deeplift", "original"][0])
            for layer in layers
        }
        row = reduction[(reduction["dataset"] == dataset) & (reduction["attribution"] == "deeplift")
                        & (reduction["method"] == "surrogate")].iloc[0]  # fmt: skip
        assert row["mean_percent"] == pytest.approx(np.mean(list(per_layer.values())), abs=1e-9)
        assert row["min_percent"] == pytest.approx(min(per_layer.values()), abs=1e-9)
        assert row["max_percent"] == pytest.approx(max(per_layer.values()), abs=1e-9)
        assert row["min_at"] == min(per_layer, key=per_layer.get)
        assert row["max_at"] == max(per_layer, key=per_layer.get)
    overall = reduction[(reduction["dataset"] == "(all)") & (reduction["method"] == "surrogate")]
    assert overall["layers"].tolist() == [5, 5]  # 3 camelyon16 + 2 digipath layers, per attribution
    assert set(reduction["method"]) == {"surrogate", "backward_hook", "forward_hook"}


def test_prediction_difference_and_masked(built, frames):
    out, _, _ = built
    pdiff = pd.read_csv(out / "tables" / "prediction_difference.csv").set_index(
        ["dataset", "method", "measure"]
    )
    for (dataset, method, measure), row in pdiff.iterrows():
        values = np.concatenate(
            [f[measure].to_numpy() for (d, _, m), f in frames.items() if (d, m) == (dataset, method)]
        )
        values = values[np.isfinite(values)]
        assert row["mean"] == pytest.approx(100 * values.mean(), abs=1e-9)
        assert row["std"] == pytest.approx(100 * values.std(), abs=1e-9)
        assert row["tiles"] == len(values)
    assert ("digipath", "surrogate", "pd_masked") in pdiff.index and pdiff.at[
        ("digipath", "surrogate", "pd_masked"), "tiles"
    ] == 6
    assert ("camelyon16", "surrogate", "pd_masked") not in pdiff.index
    assert ("digipath", "forward_hook", "pd_all") not in pdiff.index
    assert (
        pdiff.at[("camelyon16", "backward_hook", "pd_all"), "mean"] == 0
    )  # the check row: forward unchanged
    assert "original" not in pdiff.index.get_level_values("method")
    assert pdiff.at[("camelyon16", "backward_hook", "agree"), "mean"] == 100  # the same predictions
    assert "Agreement %" in (out / "tables" / "prediction_difference.md").read_text()


def test_accuracy_only_where_tiles_are_labelled(built, frames):
    out, _, _ = built
    accuracy = pd.read_csv(out / "tables" / "accuracy.csv")
    assert set(accuracy["dataset"]) == {"camelyon16"}  # segmentation and unlabelled tiles: left out
    for method in LEVELS:
        correct = frames["camelyon16", "tumor_a", method]["correct"]
        row = accuracy[accuracy["method"] == method].iloc[0]
        assert row["accuracy_percent"] == pytest.approx(100 * correct.mean())
        assert row["labelled_tiles"] == 7
    per_slide = pd.read_csv(out / "tables" / "accuracy_per_slide.csv")
    assert set(per_slide["slide_id"]) == {"tumor_a"}
    per_slide_tv = pd.read_csv(out / "tables" / "tv_per_slide.csv")
    one = per_slide_tv.set_index(["slide_id", "layer", "attribution", "method"]).loc[
        ("normal_b", "layer2", "deeplift", "surrogate")
    ]
    values = frames["camelyon16", "normal_b", "surrogate"]["tv/deeplift/layer2"].to_numpy()
    assert (one["mean"], one["std"], one["tiles"]) == (
        pytest.approx(values.mean()),
        pytest.approx(values.std()),
        5,
    )


def test_every_table_and_figure_is_written(built):
    out, _, _ = built
    names = {"tv", "tv_reduction", "checkerboard", "prediction_difference", "accuracy", "inputs", "tv_per_slide",
             "prediction_difference_per_slide", "accuracy_per_slide", "precision"}  # fmt: skip
    assert {p.stem for p in (out / "tables").glob("*.csv")} == names
    assert {p.stem for p in (out / "tables").glob("*.md")} == names
    figures = {p.relative_to(out).as_posix() for p in (out / "figures").rglob("*.*")}
    assert figures == {
        f"figures/{kind}/{stem}.{ext}"
        for kind, stem in (("tv_per_layer", "camelyon16_resnet18"),
                           ("tv_per_layer", "digipath_unet_resnet34"), ("overview", "camelyon16_tumor_a"))
        for ext in ("png", "svg")
    }  # fmt: skip
    assert not list(out.parent.glob(".report*")), "temporary directories left behind"


def test_overview_shares_one_robust_colour_scale_per_row(built):
    _, container, values = built
    overview = report.read_overview(container, min_px=16)
    fig = report.overview_figure(
        overview, report.ReportSettings(), layers=CAMELYON_LAYERS, attributions=ATTRIBUTIONS
    )
    rows = fig.axes[0].get_subplotspec().get_gridspec().nrows
    assert rows == len(ATTRIBUTIONS) * len(CAMELYON_LAYERS)
    heatmaps = [ax.images[1] for ax in fig.axes if len(ax.images) == 2]  # tissue, then the heatmap
    assert len(heatmaps) == rows * 2
    for image in heatmaps:
        spec = image.axes.get_subplotspec()
        attribution, layer = ATTRIBUTIONS[spec.rowspan.start // 3], CAMELYON_LAYERS[spec.rowspan.start % 3]
        z = np.concatenate([np.abs(values[m, attribution, layer]).ravel() for m in ("original", "surrogate")])
        limit = np.percentile(z[np.isfinite(z)], 99)
        assert image.get_clim() == pytest.approx((-limit, limit), rel=1e-5)
    # the heatmap covers the tissue's physical extent (µm), whatever its layer resolution
    assert overview.heatmaps["original", "deeplift", "layer3"].extent == pytest.approx(overview.tissue.extent)
    assert report.read_overview(container, min_px=100).tissue.data.shape == (96, 128, 3)  # level 0: ≥ 100 px
    assert report.read_overview(container, min_px=16).tissue.data.shape == (48, 64, 3)  # the lower level


def test_index_html_renders_in_headless_chromium(built):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    out, _, _ = built
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail(
            "install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(driver))
    try:
        browser.get((out / "index.html").resolve().as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
        )
        links = browser.execute_script("return Array.from(document.links).map(a => a.getAttribute('href'))")
        tables = browser.execute_script("return document.querySelectorAll('table.results').length")
        bold = browser.execute_script("return document.querySelectorAll('#tv + p + table strong').length")
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        browser.quit()
    assert len(images) == 3 and all(complete and width > 0 for _, complete, width in images), images
    assert not errors, errors  # no failed request, no script error
    assert tables == 10 and bold == 2 * 3 + 2 * 2  # the lowest TV per row and attribution
    assert all(not link.startswith(("http:", "https:", "/")) for link in links)
    missing = [link for link in links if not (out / link).is_file()]
    assert not missing and len(links) == 10 * 2 + 3 * 2


def test_slide_without_labels_leaves_accuracy_out(table_paths, tmp_path):
    unlabelled = [p for (d, slide, _), p in table_paths.items() if slide == "normal_b"]
    result = report.write_report(unlabelled, tmp_path / "report")
    assert "tables/accuracy.csv" not in result.tables and "tables/tv.csv" in result.tables
    assert not (tmp_path / "report" / "tables" / "accuracy.csv").exists()
    assert "accuracy is left out" in (tmp_path / "report" / "index.html").read_text()


def test_table_without_required_columns_is_one_line_naming_the_file(cli, frames, table_paths, tmp_path):
    bad = _write(
        frames["camelyon16", "tumor_a", "surrogate"].drop(columns=["pd_target"]), tmp_path / "bad.parquet"
    )
    err = cli("report", "--tables", table_paths["camelyon16", "tumor_a", "original"], bad,
              "--out", tmp_path / "report", expect=1).err  # fmt: skip
    assert err.count("\n") == 1
    assert f"{bad}: missing columns pd_target" in err and "smoothsal saliency --table" in err
    assert not (tmp_path / "report").exists()


def test_out_with_other_files_is_refused(table_paths, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(
        BadOutput, match="is a folder smoothsal did not write; `smoothsal report` replaces only a report"
    ):
        report.write_report(list(table_paths.values())[:1], tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_container_that_is_no_heatmap_container_names_the_file(tmp_path):
    plain = tmp_path / "plain.ome.zarr"
    zarr.open_group(plain, mode="w", zarr_format=2)
    for path, message in (
        (tmp_path / "none.ome.zarr", "heatmap container not found"),
        (plain, "no 'smoothsal' root"),
    ):
        with pytest.raises(SmoothsalError, match=message) as err:
            report.read_overview(path)
        assert str(err.value).startswith(f"{path}: ") and "smoothsal heatmaps" in str(err.value)


def test_table_without_dataset_name_takes_it_from_the_results_layout(frames, tmp_path):
    frame = frames["camelyon16", "normal_b", "original"].assign(dataset="")
    path = _write(frame, tmp_path / "results" / "camelyon16" / "saliency" / "normal_b" / "original.parquet")
    collected = report.collect([path])
    assert collected.tiles["dataset"].tolist() == ["camelyon16"]
    assert collected.layers == {("camelyon16", "resnet18"): CAMELYON_LAYERS}


def _run_meta(frame: pd.DataFrame, tiles: str = "abc", **settings: object) -> dict:
    """The metadata `smoothsal saliency` writes with a per-tile table (store.results_meta)."""
    return {"version": "test", "slide_id": str(frame["slide_id"].iloc[0]), "method": str(frame["method"].iloc[0]),
            "layers": CAMELYON_LAYERS, "attributions": list(ATTRIBUTIONS), "tiles_sha256": tiles,
            "n_tiles": len(frame), "settings": {"arch": "resnet18", "smoothgrad_samples": 1, **settings}}  # fmt: skip


@pytest.mark.parametrize("change", ["tile set", "settings"])
def test_case_10_tables_of_one_slide_from_different_runs_are_refused_naming_both(frames, tmp_path, change):
    a = frames["camelyon16", "tumor_a", "original"]
    b = frames["camelyon16", "tumor_a", "backward_hook"]
    first, second = tmp_path / "original.parquet", tmp_path / "backward_hook.parquet"
    write_results(a, first, _run_meta(a))
    if change == "tile set":  # 6 of the 7 tiles: another tile table
        b = b.iloc[:6]
        write_results(b, second, _run_meta(b, tiles="def"))
        word = "tile set"
    else:
        write_results(b, second, _run_meta(b, smoothgrad_samples=2))
        word = "smoothgrad_samples (2 vs 1)"
    with pytest.raises(SmoothsalError, match="different") as err:
        report.write_report([first, second], tmp_path / "report")
    assert str(second) in str(err.value) and str(first) in str(err.value) and word in str(err.value)
    assert not (tmp_path / "report").exists()
    write_results(b, second, _run_meta(b, tiles="abc" if change == "settings" else "def"))  # same run: fine
    if change == "settings":
        report.write_report([first, second], tmp_path / "report")


def test_case_9_a_slide_without_tissue_gives_an_empty_container_and_a_report_line(
    cli, slides_dir, table_paths, tmp_path
):
    """A real slide region with no tissue: 0 tiles → saliency → heatmaps (a valid container without
    heatmaps) → report (a "no tissue" line; the other slides as before)."""
    from smoothsal.container import open_container

    slide = slides_dir / "CMU-1-Small-Region.svs"
    tiles, store_path = tmp_path / "empty.parquet", tmp_path / "original.zarr"
    cli("tiles", slide, "--tile-size", "64", "--target-mpp", "2.0", "--roi", "0", "0", "600", "600",
        "--min-tissue", "0.5", "--out", tiles)  # fmt: skip
    cli("saliency", slide, "--tiles", tiles, "--arch", "resnet18", "--num-classes", "2", "--method", "original",
        "--layers", "layer1", "--smoothgrad-samples", "1", "--no-progress", "--out", store_path,
        "--table", tmp_path / "original.parquet")  # fmt: skip
    container = tmp_path / "CMU-1-Small-Region.ome.zarr"
    cli("heatmaps", slide, "--saliency", store_path, "--tiles", tiles, "--tissue-mpp", "8", "--no-progress",
        "--out", container)  # fmt: skip
    opened = open_container(container)
    assert [i.path for i in opened.images] == ["tissue"] and opened.tile_boxes().shape == (0, 4)
    assert opened.meta["n_tiles"] == 0 and opened.meta["slide_id"] == "CMU-1-Small-Region"
    run = cli("report", "--tables", *table_paths.values(), tmp_path / "original.parquet",
              "--heatmaps", container, "--out", tmp_path / "report")  # fmt: skip
    assert "CMU-1-Small-Region: no tissue (0 tiles)" in run.out
    assert "CMU-1-Small-Region: no tissue (0 tiles)" in (tmp_path / "report" / "index.html").read_text()


def test_seam_section_shows_both_scores_and_the_maps_side_by_side(cli, table_paths, slides_dir, tmp_path):
    """`--seams`: the table of `smoothsal seams` (synthetic falloff maps on a real slide's half-stride
    tiles) comes back as the report's seam table (CSV, Markdown, HTML) and one figure per slide."""
    from test_overlap import seam_run

    (tmp_path / "seams").mkdir()
    run = seam_run(cli, slides_dir, tmp_path / "seams")
    out = tmp_path / "report"
    cli("report", "--tables", *table_paths.values(), "--seams", run["table"], "--out", out)
    written = pd.read_csv(out / "tables" / "seams.csv")
    source = pd.read_csv(run["table"])
    assert sorted(written["method"]) == sorted(source["method"])
    merged = written.merge(source, on=["method", "attribution", "layer"], suffixes=("", "_src"))
    np.testing.assert_allclose(merged["seams_without"], merged["seams_without_src"])
    np.testing.assert_allclose(merged["seams_with"], merged["seams_with_src"])
    np.testing.assert_allclose(merged["ratio"], merged["seams_with"] / merged["seams_without"])
    original = merged.set_index("method").loc["original"]
    cell = f"{original['seams_without']:.3f} → {original['seams_with']:.3f} ({original['ratio']:.2f})"
    assert cell in (out / "tables" / "seams.md").read_text()
    page = (out / "index.html").read_text()
    assert 'id="seams"' in page and cell in page and "figures/seams/CMU-1-Small-Region.png" in page
    from PIL import Image

    figure = np.asarray(Image.open(out / "figures" / "seams" / "CMU-1-Small-Region.png").convert("RGB"))
    assert figure.shape[0] > 300 and figure.std() > 10  # a real figure, not an empty canvas


def test_a_dataset_computed_in_mixed_precisions_is_flagged(frames, tmp_path):
    """precision: auto on a cluster of mixed CPUs: the report shows each slide's resolved precision and
    device, and says which dataset mixes them."""
    runs = {
        "tumor_a": ("fp32", {"model": "AMD EPYC", "native_bf16": False}),
        "normal_b": ("bf16", {"model": "Intel Xeon", "native_bf16": True}),
    }
    paths = []
    for slide, (precision, hardware) in runs.items():
        frame = frames["camelyon16", slide, "original"]
        meta = {"slide_id": slide, "method": "original", "settings": {"precision": precision},
                "precision_requested": "auto", "hardware": hardware}  # fmt: skip
        paths.append(tmp_path / "camelyon16" / "saliency" / slide / "original.parquet")
        write_results(frame, paths[-1], meta)
    result = report.write_report(paths, tmp_path / "report")
    mixed = [n for n in result.notes if "mixes precisions" in n]
    assert mixed == [
        (
            "camelyon16 / resnet18 mixes precisions (fp32: 1 slide(s), bf16: 1 slide(s); see the precision "
            "table): its slides' maps and TV differ by that arithmetic too; on a cluster of mixed CPUs set "
            "saliency.precision to fp32 or bf16 instead of auto."
        )
    ]
    table = pd.read_csv(tmp_path / "report" / "tables" / "precision.csv").set_index("slide_id")
    assert table.loc["tumor_a", ["precision", "requested", "device"]].tolist() == ["fp32", "auto", "AMD EPYC"]
    assert table.loc["normal_b", ["precision", "native_bf16"]].tolist() == ["bf16", True]
    assert html.escape(mixed[0]) in (tmp_path / "report" / "index.html").read_text()
    alone = report.write_report(paths[:1], tmp_path / "one")
    assert not [n for n in alone.notes if "mixes" in n]


def test_the_surrogate_sentence_follows_the_runs_own_numbers(frames, tmp_path):
    """The prediction-difference note compares the surrogate with the forward hook in this run's numbers:
    less when it is lower, more when it exceeds it — never a fixed claim."""
    sentences = {}
    for case, scale in (("lower", 0.25), ("higher", 4.0)):
        paths = []
        for method in ("original", "forward_hook", "surrogate"):
            frame = frames["camelyon16", "tumor_a", method].copy()
            if method == "forward_hook":
                frame["pd_all"] = 0.04
            elif method == "surrogate":
                frame["pd_all"] = 0.04 * scale
            paths.append(
                _write(frame, tmp_path / case / "camelyon16" / "saliency" / "tumor_a" / f"{method}.parquet")
            )
        out = tmp_path / case / "report"
        report.write_report(paths, out)
        md = (out / "tables" / "prediction_difference.md").read_text()
        sentences[case] = [line for line in md.splitlines() if "surrogate's all-class" in line]
    assert (
        "the surrogate's all-class prediction difference (1.00) is 0.25 of the forward hook's (4.00): the "
        "surrogate changes the predictions less" in sentences["lower"][0]
    )
    assert (
        "(16.00) is above the forward hook's (4.00): here the surrogate changes the predictions more"
        in (sentences["higher"][0])
    )
