"""The tile table and the tile Dataset: several slides, worker processes, whole writes; the slide fingerprint."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from helpers import RecordingReader

from smoothsal import fingerprint, grid, slides, tiles, tiling


def test_dataset_reads_tiles_of_several_slides(cmu, cmu_tissue, slides_dir):
    tables = [
        tiling.label_tiles(tiling.plan_tiles(s, t, grid.TileGridSettings(target_mpp=1.0)), None)
        for s, t in zip(cmu, cmu_tissue)
    ]
    table = pd.concat(tables, ignore_index=True)
    opened: list[str] = []
    spies: list[RecordingReader] = []

    def opener(path: str) -> RecordingReader:
        opened.append(path)
        spies.append(RecordingReader(slides.open_reader(path)))
        return spies[-1]

    dataset = tiles.TileDataset(table, opener=opener)
    items = [dataset[i] for i in range(len(dataset))]
    assert len(opened) == 2  # each slide opened once in this process
    for i, (image, index) in enumerate(items):
        assert index == i and image.shape == (3, 224, 224) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
    assert [len(s.reads) for s in spies] == [len(t) for t in tables]  # one read per tile
    assert {r for r in spies[0].reads} == {(0, (449, 449))} and {r for r in spies[1].reads} == {
        (1, (224, 224))
    }
    row = table.iloc[3]
    direct = tiles.load_tile(row) / 255.0
    np.testing.assert_allclose(items[3][0].permute(1, 2, 0).numpy(), direct, atol=1e-6)
    normalised = tiles.TileDataset(table, transform=lambda t: (t - 0.5) / 0.25)[3][0]
    torch.testing.assert_close(normalised, (items[3][0] - 0.5) / 0.25)


def test_dataset_in_dataloader_workers(cmu, cmu_tissue):
    table = tiling.plan_tiles(cmu[1], cmu_tissue[1])
    loader = torch.utils.data.DataLoader(tiles.TileDataset(table), batch_size=8, num_workers=2)
    seen = []
    for images, index in loader:
        assert images.shape[1:] == (3, 224, 224)
        seen.extend(index.tolist())
    assert sorted(seen) == list(range(len(table)))


def test_outputs_are_written_whole(cmu, cmu_tissue, tmp_path):
    table = tiling.label_tiles(tiling.plan_tiles(cmu[0], cmu_tissue[0]), None)
    tiled = tiling.Tiling(table, cmu_tissue[0], None)
    tiles.write_tile_table(table, tmp_path / "out" / "t.parquet")
    tiling.plot_overview(tiled, tmp_path / "out" / "t.png")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "t.parquet",
        "t.png",
    ]  # no partial files left
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out" / "t.parquet"), table)
    with pytest.raises(ValueError):  # pyarrow cannot store Python objects
        tiles.write_tile_table(table.assign(bad=[object()] * len(table)), tmp_path / "out" / "u.parquet")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t.parquet", "t.png"]


def test_slide_fingerprint_tells_apart_files_of_one_size_and_ignores_the_modification_time(tmp_path):
    """Two uncompressed TIFFs of one size whose first and last 64 KiB are the same (header, first and last
    rows) and whose middle rows differ: the sampled blocks tell them apart. A copy with another
    modification time has the same fingerprint."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    other = image.copy()
    other[256:768] = rng.integers(0, 256, (512, 1024, 3), dtype=np.uint8)
    a, b, copy = tmp_path / "a.tif", tmp_path / "b.tif", tmp_path / "copy.tif"
    tifffile.imwrite(a, image, photometric="rgb", metadata=None)
    tifffile.imwrite(b, other, photometric="rgb", metadata=None)
    ends = fingerprint.ENDS
    data_a, data_b = a.read_bytes(), b.read_bytes()
    assert len(data_a) == len(data_b) and data_a != data_b
    assert data_a[:ends] == data_b[:ends] and data_a[-ends:] == data_b[-ends:]
    assert fingerprint.slide_fingerprint(a) != fingerprint.slide_fingerprint(b)
    shutil.copyfile(a, copy)
    os.utime(copy, ns=(0, 0))
    assert fingerprint.slide_fingerprint(copy) == fingerprint.slide_fingerprint(a)
    assert fingerprint.slide_fingerprint(a).startswith(f"{len(data_a)}-")
