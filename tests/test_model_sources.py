"""Issue 25: the model to explain from any source (registered, torchvision:, timm:, python:), one loader, and a
line naming the fix for each way a source can be wrong."""

from __future__ import annotations

import json
import re
import textwrap

import pytest
import torch
import torchvision
from torch import nn

import smoothsal as ss
from smoothsal.errors import BadCheckpoint, BadOption
from smoothsal.model_sources import DictOutput, parse_arch
from smoothsal.model_spec import ModelSpec, load_model

NET = textwrap.dedent(
    """
    from torch import nn

    def build(num_classes, width=8):
        return nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, 2, 1, groups=2), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
        )

    def not_a_model(num_classes):
        return "a string"
    """
)


@pytest.fixture
def net_file(tmp_path, monkeypatch):
    """A user's model file, named relative to the working directory as a config would."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "net.py").write_text(NET)
    monkeypatch.chdir(tmp_path)
    return "models/net.py"


def test_a_python_builder_is_called_with_num_classes_and_the_kwargs(net_file):
    model = load_model(f"python:{net_file}:build", num_classes=3, kwargs='{"width": 4}')
    assert model[0].out_channels == 4 and model[-1].out_features == 3 and not model.training
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    spec = ModelSpec(f"python:{net_file}:build", 3, kwargs={"width": 4})
    record = spec.record()
    assert record["kwargs"] == {"width": 4} and spec.kwargs == '{"width":4}'
    assert record["code_sha256"] is not None and len(record["code_sha256"]) == 64


def test_editing_the_python_file_changes_the_recorded_code_hash(net_file):
    arch = parse_arch(f"python:{net_file}:build")
    before = arch.code_sha256()
    with open(net_file, "a") as f:
        f.write("\n# edited\n")
    assert arch.code_sha256() != before


@pytest.mark.parametrize(
    ("arch", "kwargs", "says"),
    [
        (
            "python:models/none.py:build",
            None,
            "models/none.py is not a file (paths are relative to the working directory",
        ),
        (
            "python:no_such_module_xyz:build",
            None,
            "module 'no_such_module_xyz' does not import (No module named",
        ),
        (
            "python:models/net.py:missing",
            None,
            "models/net.py has no callable 'missing'; define missing(num_classes",
        ),
        (
            "python:models/net.py:not_a_model",
            None,
            "returned a str, not a torch.nn.Module; make not_a_model return",
        ),
        ("python:models/net.py", None, "names no callable; give python:MODULE:CALLABLE"),
        (
            "python:models/net.py:build",
            {"depth": 2},
            "does not take num_classes=2 with model kwargs {'depth': 2}",
        ),
        ("torchvision:no_such_net", None, "has no model 'no_such_net'; see torchvision.models.list_models()"),
        ("timm:no_such_net", None, "has no model 'no_such_net'; see timm.list_models()"),
        ("vgg17", None, "unknown arch 'vgg17'; give a registered name (monai_fc_resnet18, resnet18"),
        ("python:models/net.py:build", "[1, 2]", "is not a JSON object; give one"),
        ("python:models/net.py:build", "{width: 4}", "is not JSON"),
    ],
)
def test_each_wrong_source_is_one_line_naming_the_fix(net_file, arch, kwargs, says):
    with pytest.raises(BadOption) as err:
        load_model(arch, num_classes=2, kwargs=kwargs)
    message = str(err.value)
    assert says in message and "\n" not in message, message


def test_a_torchvision_segmentation_model_downloads_nothing_and_gives_its_out_map():
    """weights=None and weights_backbone=None: nothing downloads; the dict output is read at ["out"]."""
    model = load_model("torchvision:lraspp_mobilenet_v3_large", num_classes=3)
    assert isinstance(model, DictOutput)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_a_torchvision_segmentation_checkpoint_without_the_wrapper_prefix_loads(tmp_path):
    raw = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3
    )
    torch.save(raw.state_dict(), tmp_path / "seg.pt")
    model = load_model("torchvision:lraspp_mobilenet_v3_large", num_classes=3, checkpoint=tmp_path / "seg.pt")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), raw.eval()(x)["out"])


def test_a_timm_model_takes_its_pretrained_configs_normalisation():
    pytest.importorskip("timm")
    _, _, norm = ModelSpec("timm:inception_v3", 2).load()
    assert norm.mean == (0.5, 0.5, 0.5) and norm.std == (0.5, 0.5, 0.5)
    _, _, given = ModelSpec("timm:inception_v3", 2, mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0)).load()
    assert given.mean == (0.1, 0.2, 0.3)  # what the user gives wins


def test_a_timm_checkpoint_with_its_trainer_wrapping_loads(tmp_path):
    """timm's train.py writes {"arch", "epoch", "state_dict", "state_dict_ema", ...}: the state dict is found."""
    timm = pytest.importorskip("timm")
    raw = timm.create_model("resnet10t", pretrained=False, num_classes=2)
    ckpt = {"arch": "resnet10t", "epoch": 3, "state_dict": raw.state_dict(), "optimizer": {}, "version": 2}
    torch.save(ckpt, tmp_path / "model_best.pth.tar")
    model = load_model("timm:resnet10t", num_classes=2, checkpoint=tmp_path / "model_best.pth.tar")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), raw.eval()(x))


def test_a_pickled_module_needs_the_opt_in(tmp_path):
    model = torchvision.models.resnet18(weights=None, num_classes=2)
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(BadCheckpoint, match="pass --allow-pickle"):
        load_model("resnet18", num_classes=2, checkpoint=tmp_path / "whole.pt")
    loaded = load_model("resnet18", num_classes=2, checkpoint=tmp_path / "whole.pt", allow_pickle=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_registered_names_build_what_they_did():
    torch.manual_seed(0)
    via_loader = load_model("resnet18", num_classes=2)
    torch.manual_seed(0)
    direct = ss.ARCHITECTURES["resnet18"](num_classes=2).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(via_loader(x), direct(x))


def test_the_kwargs_are_recorded_canonically():
    a = ModelSpec("resnet18", 2, kwargs='{"b": 1, "a": 2}')
    b = ModelSpec("resnet18", 2, kwargs={"a": 2, "b": 1})
    assert a.kwargs == b.kwargs == json.dumps({"a": 2, "b": 1}, separators=(",", ":"))
    assert ModelSpec("resnet18", 2).kwargs == ""


def test_the_loader_is_the_one_place_that_builds_a_model_for_a_stage():
    """Every stage loads through model_spec: no module but model_sources calls an architecture builder, and no
    module but checkpoints reads a model checkpoint."""
    import pathlib

    root = pathlib.Path(ss.__file__).parent
    builders = [p.name for p in root.rglob("*.py") if "ARCHITECTURES[" in p.read_text()]
    call = re.compile(r'load_torch_file\([^)]*"checkpoint"')
    readers = [p.name for p in root.rglob("*.py") if call.search(p.read_text())]
    assert builders == ["model_sources.py"], builders
    assert readers == ["checkpoints.py"], readers
    assert isinstance(load_model("resnet18", num_classes=2), nn.Module)
