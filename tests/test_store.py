"""The saliency store and its results table: written by `StoreWriter` (resumably), read back by
`open_store` / `read_results`; damaged or foreign stores and tables are one-line errors naming them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from smoothsal import store
from smoothsal.errors import BadOutput, BadStore, BadTable, MissingInput
from smoothsal.files import MARKER_KEY

N, SHAPE = 10, (4, 6)


def meta(n: int = N, **changes) -> dict:
    return {"version": "test", "slide_id": "s", "slide_path": "s.svs", "method": "original",
            "layers": ["layer1"], "attributions": ["gradient", "deeplift"], "settings": {"seed": 0},
            "tiles_sha256": "abc", "n_tiles": n} | changes  # fmt: skip


def maps(start: int, stop: int) -> dict:
    return {
        (a, "layer1"): np.full((stop - start, *SHAPE), k + 0.01 * np.arange(start, stop)[:, None, None], "f4")
        for k, a in enumerate(("gradient", "deeplift"))
    }


def rows(start: int, stop: int) -> pd.DataFrame:
    return pd.DataFrame({"tile": np.arange(start, stop), "tv/gradient/layer1": np.arange(start, stop) * 0.5})


def test_write_resume_and_read_back(tmp_path):
    out, results = tmp_path / "original.zarr", tmp_path / "original.parquet"
    first = store.StoreWriter(out, results, meta())
    assert first.open({"layer1": SHAPE}, 64) == 0
    first.write_batch(0, 4, maps(0, 4), rows(0, 4))  # then "killed": a second writer takes over
    assert not out.exists() and store.partial_dir(out).is_dir()
    second = store.StoreWriter(out, results, meta())
    assert second.open({"layer1": SHAPE}, 64) == 4  # the done tiles are kept
    second.write_batch(4, N, maps(4, N), rows(4, N))
    second.finish(["tile", "tv/gradient/layer1"])
    assert not store.partial_dir(out).exists()

    opened = store.open_store(out)
    assert opened.meta == meta() and opened.method == "original" and opened.settings == {"seed": 0}
    assert opened.layers == ["layer1"] and opened.attributions == ["gradient", "deeplift"]
    for a in opened.attributions:
        np.testing.assert_array_equal(opened.array(a, "layer1")[:], maps(0, N)[a, "layer1"])
    tile_maps = opened.maps("deeplift", "layer1")
    np.testing.assert_array_equal(tile_maps[7], maps(7, 8)["deeplift", "layer1"][0])
    assert opened.array("gradient", "layer1").attrs["stride"] == 16  # 64-px tiles, 4-px maps
    assert store.results_meta(results) == meta()
    table = pd.read_parquet(results)
    assert table["tile"].tolist() == list(range(N)) and table.columns.tolist() == [
        "tile",
        "tv/gradient/layer1",
    ]


def test_another_meta_starts_over(tmp_path, caplog):
    out, results = tmp_path / "m.zarr", tmp_path / "m.parquet"
    writer = store.StoreWriter(out, results, meta())
    writer.open({"layer1": SHAPE}, 64)
    writer.write_batch(0, 4, maps(0, 4), rows(0, 4))
    changed = store.StoreWriter(out, results, meta(settings={"seed": 1}))
    assert (
        changed.open({"layer1": SHAPE}, 64) == 0 and "other settings or tiles; starting over" in caplog.text
    )
    relabelled = store.StoreWriter(out, results, meta(settings={"seed": 1}))
    assert relabelled.open({"layer1": SHAPE}, 64, labels_sha256="other labels") == 0


def test_case_11_a_damaged_or_deleted_chunk_is_one_line_naming_store_array_and_file(tmp_path):
    out, results = tmp_path / "m.zarr", tmp_path / "m.parquet"
    writer = store.StoreWriter(out, results, meta(n=70))
    writer.open({"layer1": SHAPE}, 64)
    values = {
        key: np.full((70, *SHAPE), np.nan, "f4") for key in maps(0, 1)
    }  # NaN maps: chunks still written
    writer.write_batch(0, 70, values, rows(0, 70))
    writer.finish()
    chunks = out / "deeplift" / "layer1"
    assert sorted(p.name for p in chunks.iterdir() if not p.name.startswith(".")) == ["0.0.0", "1.0.0"]
    (chunks / "0.0.0").write_bytes(b"\x00garbage" * 10)
    (chunks / "1.0.0").unlink()
    tile_maps = store.open_store(out).maps("deeplift", "layer1")
    damaged = r"m\.zarr/deeplift/layer1/0\.0\.0: cannot be read \(.*\), a chunk \(tiles 0…\) of array deeplift/layer1 in store .*m\.zarr; the store is damaged, rerun"
    with pytest.raises(BadStore, match=damaged):
        tile_maps[0]
    missing = r"m\.zarr/deeplift/layer1/1\.0\.0: missing, a chunk \(tiles 64…\) of array deeplift/layer1 in store .*m\.zarr; .*rerun `smoothsal saliency`$"
    with pytest.raises(BadStore, match=missing):  # no longer a silent NaN
        tile_maps[65]


def test_what_is_not_a_store_or_results_table_is_named(tmp_path):
    with pytest.raises(MissingInput, match="saliency store not found"):
        store.open_store(tmp_path / "none.zarr")
    zarr.open_group(tmp_path / "plain.zarr", mode="w", zarr_format=2)
    with pytest.raises(BadStore, match=r"plain\.zarr: no smoothsal saliency metadata"):
        store.open_store(tmp_path / "plain.zarr")
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(BadTable, match=r"x\.parquet: not a readable Parquet table"):
        store.read_results(tmp_path / "x.parquet")
    store.write_results(pd.DataFrame({"tile": [0], "tv/gradient": [1.0]}), tmp_path / "y.parquet", {})
    with pytest.raises(BadTable, match=r"column 'tv/gradient' is not tv/\{attribution\}/\{layer\}"):
        store.read_results(tmp_path / "y.parquet")
    with pytest.raises(BadStore, match="no array gradient/layer9"):
        writer = store.StoreWriter(tmp_path / "s.zarr", tmp_path / "s.parquet", meta(n=0))
        writer.open({}, 64)
        writer.finish()
        store.open_store(tmp_path / "s.zarr").array("gradient", "layer9")


def test_format_1_tables_are_read_and_replaced_and_older_partial_state_is_not_resumed(tmp_path, caplog):
    """Format 2 added the checkerboard columns: a format 1 table (none) still reads, with no
    checkerboard columns, and a rerun may replace it; row files of an older job are not resumed."""
    old = pd.DataFrame({c: ["x"] for c in store.RESULT_COLUMNS} | {"tv/gradient/layer1": [1.0]})
    arrow = pa.Table.from_pandas(old, preserve_index=False)
    marker = {MARKER_KEY.encode(): json.dumps({"kind": "saliency-table", "format": 1})}
    pq.write_table(arrow.replace_schema_metadata(marker), tmp_path / "old.parquet")
    read = store.read_results(tmp_path / "old.parquet")
    assert read.tv == [("tv/gradient/layer1", "gradient", "layer1")] and read.checkerboard == []
    store.check_out(tmp_path / "m.zarr", tmp_path / "old.parquet")  # replaceable: no error
    pq.write_table(arrow.replace_schema_metadata({MARKER_KEY.encode(): b'{"kind": "saliency-table", "format": 9}'}),
                   tmp_path / "new.parquet")  # fmt: skip
    with pytest.raises(BadOutput, match=r"new\.parquet exists and is not a per-tile table"):
        store.check_out(tmp_path / "m.zarr", tmp_path / "new.parquet")

    out, results = tmp_path / "m.zarr", tmp_path / "m.parquet"
    writer = store.StoreWriter(out, results, meta())
    writer.open({"layer1": SHAPE}, 64)
    writer.write_batch(0, 4, maps(0, 4), rows(0, 4))
    progress = store.partial_dir(out) / "progress.json"
    state = json.loads(progress.read_text())
    assert store.StoreWriter(out, results, meta()).open({"layer1": SHAPE}, 64) == 4  # same format: resumed
    progress.write_text(json.dumps(state | {"format": "smoothsal-saliency-progress/1"}))
    assert store.StoreWriter(out, results, meta()).open({"layer1": SHAPE}, 64) == 0
    assert "starting over" in caplog.text
