"""Stitching known answers: where tiles land in map pixels, the Hann window, blended blocks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from smoothsal.errors import BadStore
from smoothsal.stitching import blend_weights, blocks_of_tiles, place_tiles, stitch_block


def test_tiles_land_at_their_level0_position_divided_by_the_map_stride():
    table = pd.DataFrame({"x": [0, 128, 66], "y": [0, 64, 130], "w": 128, "h": 128})
    p = place_tiles(table, (32, 32), (1000, 600))  # 4 level-0 px per map px
    assert (
        p.downsample == 4.0 and p.left.tolist() == [0, 32, 17] and p.top.tolist() == [0, 16, 33]
    )  # 16.5 → 17
    assert p.shape == (150, 250)  # the slide's extent in map px
    with pytest.raises(BadStore, match="not square"):
        place_tiles(table, (32, 16), (1000, 600))
    assert blocks_of_tiles(p, 32) == {
        (0, 0): [0],
        (0, 1): [1],
        (1, 0): [2],
        (1, 1): [1, 2],
        (0, 0 + 0): [0],
    } | {k: v for k, v in blocks_of_tiles(p, 32).items() if k not in {(0, 0), (0, 1), (1, 0), (1, 1)}}


def test_the_hann_window_never_vanishes_and_blends_overlaps_without_seams():
    w = blend_weights(8, 8, "window")
    assert w.min() > 0 and np.allclose(w, w.T) and w[3:5, 3:5].min() == w.max()
    assert np.array_equal(blend_weights(4, 4, "mean"), np.ones((4, 4)))
    table = pd.DataFrame({"x": [0, 8], "y": [0, 0], "w": 16, "h": 16})
    p = place_tiles(table, (16, 16), (24, 16))  # two tiles overlapping by half
    maps = {0: np.zeros((16, 16)), 1: np.ones((16, 16))}
    for blend, middle in (("none", 1.0), ("mean", 0.5)):
        block = stitch_block(maps, p, [0, 1], (0, 0, 16, 24), blend, blend_weights(16, 16, blend))
        assert block[0, :8].tolist() == [0.0] * 8 and block[0, 16:].tolist() == [1.0] * 8
        assert np.allclose(block[:, 8:16], middle)
    window = stitch_block(maps, p, [0, 1], (0, 0, 16, 24), "window", blend_weights(16, 16, "window"))
    assert np.all(np.diff(window[4]) >= 0) and window[4, 8] < 0.5 < window[4, 15]  # a smooth ramp
    empty = stitch_block(maps, p, [], (0, 0, 4, 4), "mean", blend_weights(16, 16, "mean"))
    assert np.isnan(empty).all()
