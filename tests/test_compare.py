"""`smoothsal compare`: the methods side by side on a real tile, through the real command line, checked
against the library run directly: the printed TV values, the maps in the figure, the paper's effect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smoothsal.compare import CompareSettings, compare_methods, comparison_figure, read_tile_image
from smoothsal.model_spec import ModelSpec

TILE = "high-nuclei-score-level2.png"


def test_compare_prints_each_methods_tv_and_draws_its_map(cli, tiles_dir, tmp_path):
    out = tmp_path / "methods.png"
    done = cli("compare", tiles_dir / TILE, "--out", out, "--size", "64", "--samples", "2")
    assert done.out.splitlines()[-1] == f"wrote {out}"
    printed = {}
    for line in done.out.splitlines()[:-1]:
        method, attribution, _, value = line.split()
        printed[method, attribution] = float(value)

    # the same tile through the library directly: the same TV values
    settings = CompareSettings(size=64, samples=2)
    model, _, norm = ModelSpec("resnet18", 2).load()
    rgb = read_tile_image(tiles_dir / TILE, 64)
    x = norm(torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0).unsqueeze(0)
    methods = ["original", "backward_hook", "forward_hook"]
    maps = compare_methods(
        model, x, layer="layer2", target=0, methods=methods, smoothgrad=settings.smoothgrad
    )
    assert set(printed) == {(m, a) for m in methods for a in ("gradient", "deeplift")}
    for key, (_, tv) in maps.items():
        assert printed[key] == pytest.approx(tv, abs=1e-4), key
    for attribution in ("gradient", "deeplift"):  # the hooks remove the checkerboard: lower TV
        for method in ("backward_hook", "forward_hook"):
            assert printed[method, attribution] < printed["original", attribution], (method, attribution)

    # the figure: the tile, then each method's map with its TV in the title, one row per attribution
    fig = comparison_figure(rgb, maps, "title")
    axes = np.array(fig.axes).reshape(2, 1 + len(methods))
    for row, attribution in enumerate(("gradient", "deeplift")):
        np.testing.assert_array_equal(axes[row, 0].images[0].get_array(), rgb)
        for col, method in enumerate(methods, start=1):
            z, tv = maps[method, attribution]
            np.testing.assert_array_equal(axes[row, col].images[0].get_array(), z)
            assert f"TV {tv:.2f}" in axes[row, col].get_title()
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape[1] > png.shape[0] > 200 and png.std() > 20  # drawn, not blank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["methods.png"]  # written whole


def test_compare_rejects_a_file_that_is_no_image(cli, slides_dir, tmp_path):
    bad = slides_dir / "broken.svs"
    err = cli("compare", bad, "--out", tmp_path / "x.png", expect=1).err
    assert err.count("\n") == 1 and "broken.svs: not a readable image" in err
    assert not (tmp_path / "x.png").exists()


def test_compare_refuses_a_surrogate_without_its_checkpoint(
    cli, ddp_surrogate: Path, surrogate_model: Path, tiles_dir: Path, surrogate_dir: Path
) -> None:
    tile = str(tiles_dir / "high-nuclei-score-level2.png")
    out = surrogate_dir / "compare.png"
    args = ["compare", tile, "--arch", "resnet18", "--num-classes", "2", "--surrogate", str(ddp_surrogate),
            "--out", str(out), "--size", "64", "--samples", "2"]  # fmt: skip
    assert "was trained on a model checkpoint; pass it with --checkpoint" in cli(*args, expect=1).err
    assert not out.exists()
    cli(*args, "--checkpoint", surrogate_model)
    assert out.exists()


def test_compare_precision_reaches_the_maps(cli, tiles_dir, tmp_path):
    """--precision bf16: the printed TVs are those of bf16 maps (the library at bf16), not fp32's."""
    out = tmp_path / "bf16.png"
    done = cli(
        "compare", tiles_dir / TILE, "--out", out, "--size", "64", "--samples", "0", "--precision", "bf16"
    )
    printed = {tuple(line.split()[:2]): float(line.split()[-1]) for line in done.out.splitlines()[:-1]}
    model, _, norm = ModelSpec("resnet18", 2).load()
    rgb = read_tile_image(tiles_dir / TILE, 64)
    x = norm(torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0).unsqueeze(0)
    methods = ["original", "backward_hook", "forward_hook"]
    per = {
        p: compare_methods(model, x, layer="layer2", target=0, methods=methods, precision=p)
        for p in ("fp32", "bf16")
    }
    for key, (_, tv) in per["bf16"].items():
        assert printed[key] == pytest.approx(tv, abs=1e-4), key
    assert any(abs(per["bf16"][k][1] - per["fp32"][k][1]) > 1e-4 for k in per["fp32"])  # bf16 is not fp32
    with pytest.raises(Exception, match="unknown precision 'fp16'"):
        CompareSettings(precision="fp16")
