"""Issue 25: `smoothsal inspect` says what smoothsal will do to a network before anything runs."""

from __future__ import annotations

import json
import textwrap

import pytest

NET = textwrap.dedent(
    """
    from torch import nn

    def build(num_classes, width=8):
        return nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1, groups=2), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, 1, 1), nn.Sigmoid(), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
        )
    """
)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "net.py").write_text(NET)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_inspect_lists_ops_aliases_and_rules_as_json(cli, workdir):
    """The grouped stride-2 conv is changed by the three methods, the stem and the max-pool by none; layer1 is
    the last module at 1/4 (the SiLU), layer2 the last at 1/8 (the GELU); after layer1 the pool gets Captum's
    max-pool rule, the Sigmoid rescale, the GELU the plain gradient (Captum has no rule for it)."""
    out = cli("inspect", "--arch", "python:net.py:build", "--tile-size", "32", "--json").out
    report = json.loads(out)
    ops = {op["name"]: op for op in report["downsampling"]}
    assert list(ops) == ["0", "2", "4"]  # forward order
    assert ops["0"]["changed_by"] == [] and ops["4"]["kind"] == "pool" and ops["4"]["changed_by"] == []
    assert (
        sorted(ops["2"]["changed_by"]) == ["backward_hook", "forward_hook", "surrogate"]
        and ops["2"]["groups"] == 2
    )
    stages = {s["alias"]: s for s in report["stages"]}
    assert [(s["module"], s["downsampled"], s["shape"]) for s in stages.values()] == [
        ("3", 4, [16, 8, 8]),
        ("7", 8, [16, 4, 4]),
    ]
    rules = {name: (kind, rule) for name, kind, rule in report["deeplift"]}
    assert rules == {"4": ("MaxPool2d", "maxpool"), "6": ("Sigmoid", "rescale"), "7": ("GELU", "gradient")}
    assert report["warnings"] == [] and report["problems"] == []


def test_inspect_prints_tables_and_warns_for_a_pooling_network(cli, workdir):
    """DenseNet downsamples by average pooling after its stem: every op is listed as changed by none, and each
    smoothing method gets one warning line that it changes nothing."""
    out = cli("inspect", "--arch", "torchvision:densenet121", "--tile-size", "64").out
    assert "Downsampling ops (forward order)" in out and "Stage aliases" in out
    assert "features.transition1.pool" in out and "features.denseblock1" in out
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3 and all(
        "changes nothing in arch 'torchvision:densenet121'" in w for w in warnings
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--arch", "python:missing.py:build"], "missing.py is not a file"),
        (
            ["--arch", "python:net.py:build", "--model-kwargs", "{width: 4}"],
            "--model-kwargs '{width: 4}' is not JSON",
        ),
        (["--arch", "torchvision:no_such_net"], "torchvision"),
    ],
)
def test_inspect_bad_input_is_one_line(cli, workdir, args, says):
    err = cli("inspect", *args, expect=1).err
    assert err.count("\n") == 1 and "Traceback" not in err and says in err, err
