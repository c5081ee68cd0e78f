"""The report's faithfulness section from hand-made faithfulness tables: known means and bootstrap
intervals, the pairing with the original method's maps, the randomisation summary, and the note when the
stage was not run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from smoothsal.faithfulness_tables import read_faithfulness, write_faithfulness
from smoothsal.metrics import bootstrap_mean_ci
from smoothsal.report.faithfulness import NOT_RUN, faithfulness_section

FRACTIONS = [0.0, 0.5, 1.0]


def rows(method: str, deletion: list[float], insertion: list[float]) -> list[dict]:
    out = []
    for tile, (d, i) in enumerate(zip(deletion, insertion, strict=True)):
        out.append({
            "tile": tile, "attribution": "gradient", "layer": "layer1", "target": 1, "label": 1,
            "deletion_auc": d, "insertion_auc": i, "deletion_auc_random": 0.5, "insertion_auc_random": 0.5,
            "relevance_mass": 0.8 if tile == 0 else np.nan, "target_fraction": 0.5, "region": "tile",
            "deletion_curve": [1.0, d, 0.0], "insertion_curve": [0.0, i, 1.0],
            "deletion_curve_random": [1.0, 0.5, 0.0], "insertion_curve_random": [0.0, 0.5, 1.0],
        })  # fmt: skip
    return out


def randomisation_rows(spearman: list[float]) -> list[dict]:
    return [
        {"tile": t, "attribution": "gradient", "layer": "layer1", "step": s + 1, "randomised": name,
         "spearman": spearman[s] + 0.01 * t}
        for t in range(3) for s, name in enumerate(("head", "layer1"))
    ]  # fmt: skip


def write(tmp: Path, method: str, deletion, insertion, spearman) -> tuple[Path, Path]:
    common = {"dataset": "d", "slide_id": "s1", "method": method, "arch": "resnet18"}
    meta = {"dataset": "d", "arch": "resnet18", "fractions": FRACTIONS}
    out, rand = tmp / f"{method}.parquet", tmp / f"{method}.randomisation.parquet"
    write_faithfulness(
        rows(method, deletion, insertion), randomisation_rows(spearman), common, out, rand, meta
    )
    return out, rand


def test_section_means_intervals_and_pairing(tmp_path: Path) -> None:
    o = write(tmp_path, "original", [0.2, 0.3, 0.1], [0.7, 0.8, 0.9], [0.5, 0.1])
    s = write(tmp_path, "surrogate", [0.3, 0.3, 0.4], [0.6, 0.8, 0.7], [0.9, 0.8])
    data = read_faithfulness([o[0], s[0]], [o[1], s[1]])
    section = faithfulness_section(data, lambda *p: "_".join(p))
    summary = section.tables[0].data.set_index("method")
    assert np.isclose(summary.loc["original", "deletion_auc"], 0.2)
    assert np.isclose(summary.loc["surrogate", "deletion_auc"], (0.3 + 0.3 + 0.4) / 3)
    mean, low, high = bootstrap_mean_ci(np.array([0.2, 0.3, 0.1]) - 0.5)
    assert np.isclose(summary.loc["original", "deletion_vs_random"], mean)
    assert np.isclose(summary.loc["original", "deletion_vs_random_low"], low)
    assert np.isclose(summary.loc["original", "deletion_vs_random_high"], high)
    # against the original's maps on the same tiles: paired differences, NaN for the original itself
    assert np.isclose(summary.loc["surrogate", "deletion_vs_original"], np.mean([0.1, 0.0, 0.3]))
    assert np.isclose(summary.loc["surrogate", "insertion_vs_original"], np.mean([-0.1, 0.0, -0.2]))
    assert np.isnan(summary.loc["original", "deletion_vs_original"])
    assert (
        summary.loc["original", "relevance_mass"] == 0.8 and summary.loc["original", "relevance_tiles"] == 1
    )
    # ρ at full randomisation: the last step's mean over tiles
    assert np.isclose(summary.loc["original", "spearman_full"], 0.1 + 0.01)
    assert np.isclose(summary.loc["surrogate", "spearman_full"], 0.8 + 0.01)
    random = section.tables[1].data
    assert len(random) == 2 * 2 and set(random["randomised"]) == {"head", "layer1"}
    assert [stem for stem, _, _ in section.figures] == [
        "figures/faithfulness/curves_d_resnet18",
        "figures/faithfulness/randomisation_d_resnet18",
    ]
    assert "Faithfulness" in section.tables[0].markdown()


def test_no_tables_says_the_stage_was_not_run() -> None:
    section = faithfulness_section(None, lambda *p: "_".join(p))
    assert section.tables == [] and section.figures == [] and section.note == NOT_RUN


def test_tables_of_another_kind_are_refused(tmp_path: Path) -> None:
    o = write(tmp_path, "original", [0.2], [0.7], [0.5, 0.1])
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "other.parquet")
    for bad in (tmp_path / "other.parquet", o[1]):
        try:
            read_faithfulness([bad])
        except ValueError as err:
            assert str(bad) in str(err) and "smoothsal faithfulness" in str(err)
        else:
            raise AssertionError(f"{bad} was read as a faithfulness table")
