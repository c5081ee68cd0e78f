"""`smoothsal compare`: the methods side by side on a real tile, through the real command line."""

from __future__ import annotations

import subprocess

from PIL import Image


def test_compare_writes_the_figure(tiles_dir, tmp_path):
    out = tmp_path / "methods.png"
    tile = tiles_dir / "high-nuclei-score-level2.png"
    cmd = ["smoothsal", "compare", str(tile), "--out", str(out), "--size", "64", "--samples", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "wrote" in done.stdout
    width, height = Image.open(out).size
    assert width > height > 200  # one column per method plus the tile, two attribution rows


def test_compare_rejects_a_file_that_is_no_image(slides_dir, tmp_path):
    bad = slides_dir / "broken.svs"
    cmd = ["smoothsal", "compare", str(bad), "--out", str(tmp_path / "x.png")]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert done.returncode == 1
    assert "broken.svs: not a readable image" in done.stderr
    assert not (tmp_path / "x.png").exists()
