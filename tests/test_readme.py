"""README's library example runs as written, and its public names import."""

from __future__ import annotations

import re

import torch
from helpers import ROOT

import smoothsal


def library_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## The library", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_library_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(library_example(), "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    tv, maps = namespace["tv"], namespace["maps"]
    assert tv.shape == (2,) and torch.isfinite(tv).all() and (tv > 0).all()
    assert set(maps) == {"gradient", "deeplift"} and set(maps["deeplift"]) == {"layer1", "layer2", "layer3"}


# smoothsal.__all__ before the package was split into one module per concern: all of it stays.
PUBLIC = [
    "ARCHITECTURES", "ATTRIBUTIONS", "METHODS", "SmoothGrad", "SurrogatePaths", "accuracy", "attribute",
    "canonicalise", "dice", "downsampling_convs", "load_model", "masked_prediction_difference",
    "prediction_difference", "probabilities", "resolve_layer", "resolve_layers", "smooth", "total_variation",
    "train_surrogate",
]  # fmt: skip


def test_every_public_name_still_imports():
    assert set(PUBLIC) <= set(smoothsal.__all__)
    assert all(getattr(smoothsal, name) is not None for name in smoothsal.__all__)
