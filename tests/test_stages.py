"""Stage aliases from a traced forward pass (smoothsal.stages) and the listing of downsampling ops
(smoothsal.downsampling), across the CNN families: random weights, 64-px inputs (Inception v3: 128 px,
its smallest size with a map at every stage), each model built once per module."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import smoothsal as ss
from smoothsal.downsampling import downsampling_ops
from smoothsal.hooks import Hooks
from smoothsal.stages import stage_blocks, stage_modules, trace

SIZE = 64
METHODS = ("backward_hook", "forward_hook", "surrogate")


def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU())


class TinyUNet(nn.Module):
    """Encoder to 1/16, decoder back to full size with skips: its decoder runs at 1/8 and 1/4 again."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.stem = conv(3, c, 2)
        self.down1 = nn.Sequential(conv(c, c, 2), conv(c, c))
        self.down2 = nn.Sequential(conv(c, c, 2), conv(c, c))
        self.down3 = nn.Sequential(conv(c, c, 2), conv(c, c))
        self.up3, self.dec2 = nn.Upsample(scale_factor=2), conv(2 * c, c)
        self.up2, self.dec1 = nn.Upsample(scale_factor=2), conv(2 * c, c)
        self.up1 = nn.Sequential(nn.Upsample(scale_factor=4), nn.Conv2d(c, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.down1(self.stem(x))
        s2 = self.down2(s1)
        d2 = self.dec2(torch.cat([self.up3(self.down3(s2)), s2], 1))
        return self.up1(self.dec1(torch.cat([self.up2(d2), s1], 1)))


def _tv(name: str, **kw):
    return lambda: getattr(torchvision.models, name)(weights=None, **kw)


FAMILIES = {  # builder, layer1…layer3 (layer4 where the family has one stage module for it)
    "resnet50": (_tv("resnet50"), ["layer1", "layer2", "layer3", "layer4"]),
    "resnext50_32x4d": (_tv("resnext50_32x4d"), ["layer1", "layer2", "layer3", "layer4"]),
    "densenet121": (
        _tv("densenet121"),
        ["features.denseblock1", "features.denseblock2", "features.denseblock3"],
    ),
    "efficientnet_b0": (_tv("efficientnet_b0"), ["features.2", "features.3", "features.5"]),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), ["features.1", "features.3", "features.8"]),
    "convnext_tiny": (_tv("convnext_tiny"), ["features.1", "features.3", "features.5", "features.7"]),
    "googlenet": (
        _tv("googlenet", aux_logits=False, init_weights=True),
        ["conv3", "inception3b", "inception4e", "inception5b"],
    ),
    "tf_efficientnet_b0": (
        lambda: timm.create_model("tf_efficientnet_b0", pretrained=False),
        ["blocks.1", "blocks.2", "blocks.4"],
    ),
    "tiny_unet": (TinyUNet, ["down1", "down2", "down3"]),
}


@pytest.fixture(scope="module")
def built():
    cache: dict[str, nn.Module] = {}

    def get(family: str) -> nn.Module:
        if family not in cache:
            torch.manual_seed(0)
            cache[family] = FAMILIES[family][0]().eval()
        return cache[family]

    return get


def _outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    with Hooks() as hooks, torch.no_grad():
        for name in names:
            hooks.forward(model.get_submodule(name), lambda m, i, o, n=name: found.setdefault(n, o))
        model(x)
    return found


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_alias_names_the_stage_module_at_its_resolution(built, family):
    model, expected = built(family), FAMILIES[family][1]
    x = torch.zeros(1, 3, SIZE, SIZE)
    stages = stage_modules(model, x)
    assert [stages[f"layer{k}"] for k in range(1, len(expected) + 1)] == expected
    outputs = _outputs(model, [stages[f"layer{k}"] for k in (1, 2, 3)], x)
    for k in (1, 2, 3):
        assert tuple(outputs[stages[f"layer{k}"]].shape[-2:]) == (SIZE >> (k + 1),) * 2, (family, k)


def test_encoder_decoder_counts_the_encoder_only(built):
    unet = built("tiny_unet")
    x = torch.zeros(1, 3, SIZE, SIZE)
    # not dec1/dec2, which finish later at 1/4 and 1/8
    assert stage_modules(unet, x) == {"layer1": "down1", "layer2": "down2", "layer3": "down3"}
    assert stage_blocks(unet, x)["layer1"] == ["down1.0", "down1.1"]


def test_blocks_are_the_children_of_the_stage_modules(built):
    x = torch.zeros(1, 3, SIZE, SIZE)
    assert stage_blocks(built("resnet50"), x)["layer1"] == ["layer1.0", "layer1.1", "layer1.2"]
    assert stage_blocks(built("convnext_tiny"), x)["layer2"] == [
        "features.3.0",
        "features.3.1",
        "features.3.2",
    ]
    assert stage_blocks(built("densenet121"), x)["layer1"][0] == "features.denseblock1.denselayer1"


def _old_rule(arch: str, k: int, model: nn.Module) -> str:
    """The name-pattern rule this module replaced: the last block of the stage container."""
    container = {"monai_fc_resnet18": f"features.{k + 3}", "unet_resnet34": f"encoder.layer{k}"}.get(
        arch, f"layer{k}"
    )
    last = list(dict(model.get_submodule(container).named_children()))[-1]
    return f"{container}.{last}"


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "monai_fc_resnet18", "unet_resnet34"])
def test_registered_archs_keep_the_tensors_of_the_old_names(arch):
    model = ss.load_model(arch, num_classes=2)
    size = 224 if arch == "monai_fc_resnet18" else SIZE
    new = [ss.resolve_layer(model, f"layer{k}") for k in range(1, 5)]
    old = [_old_rule(arch, k, model) for k in range(1, 5)]
    outputs = _outputs(
        model, new + old, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    )
    for k, (n, o) in enumerate(zip(new, old, strict=True), 1):
        assert n != o and n == o.rsplit(".", 1)[0], (arch, k)  # the stage container itself
        assert torch.equal(outputs[n], outputs[o]), (arch, k)
    blocks = ss.resolve_layers(model, "blocks")
    assert [b for b in blocks if b in old] == old  # each stage's last block is among the blocks


def test_trace_is_cached_and_leaves_the_model_as_it_was():
    model = torchvision.models.resnet18(weights=None).train()
    before = model.bn1.running_mean.clone()
    x = torch.randn(1, 3, SIZE, SIZE)
    assert trace(model, x) is trace(model, x)
    assert model.training and model.bn1.training and torch.equal(model.bn1.running_mean, before)


# --- downsampling ops -------------------------------------------------------------------------


def _ops(model: nn.Module, size: int = SIZE) -> dict[str, object]:
    return {op.name: op for op in downsampling_ops(model, torch.zeros(1, 3, size, size))}


def test_googlenet_lists_its_max_pools_unchanged(built):
    ops = _ops(built("googlenet"))
    pools = [n for n, op in ops.items() if op.kind == "pool"]
    # the inception branches' pools have stride 1
    assert pools == ["maxpool1", "maxpool2", "maxpool3", "maxpool4"]
    assert all(ops[n].op == "MaxPool2d" and ops[n].changed_by == () for n in pools)
    assert ops["conv1.conv"].changed_by == ()  # the stem


def test_inception_functional_max_pools_are_found():
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
    ops = _ops(model, 128)
    functional = {n: op for n, op in ops.items() if op.kind == "functional"}
    assert list(functional) == ["Mixed_6a:F.max_pool2d#1", "Mixed_7a:F.max_pool2d#1"]
    first = functional["Mixed_6a:F.max_pool2d#1"]
    assert (first.op, first.kernel, first.stride, first.changed_by) == ("F.max_pool2d", (3, 3), (2, 2), ())
    assert ops["Mixed_6a.branch3x3.conv"].changed_by == METHODS


def test_convnext_patchify_convs_are_changed(built):
    ops = _ops(built("convnext_tiny"))
    assert list(ops) == ["features.0.0", "features.2.1", "features.4.1", "features.6.1"]
    assert ops["features.0.0"].kernel == (4, 4) and ops["features.0.0"].changed_by == ()  # the stem
    for name in ("features.2.1", "features.4.1", "features.6.1"):
        assert ops[name].kernel == (2, 2) and ops[name].changed_by == METHODS
        assert ops[name].out_class == ops[name].in_class + 1


def test_densenet_transition_pools_are_unchanged_pools(built):
    ops = _ops(built("densenet121"))
    for k in (1, 2, 3):
        op = ops[f"features.transition{k}.pool"]
        assert (op.kind, op.op, op.changed_by, op.out_class) == ("pool", "AvgPool2d", (), k + 2)


def test_timm_same_padding_depthwise_convs_are_changed(built):
    ops = _ops(built("tf_efficientnet_b0"))
    op = ops["blocks.1.0.conv_dw"]
    assert (op.op, op.groups > 1, op.changed_by) == ("Conv2dSame", True, METHODS)


class _Odd(nn.Module):
    """Dilated and grouped stride-2 convs, and functional pools with and without a stride."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.dilated = nn.Conv2d(8, 8, 3, 2, 2, dilation=2)
        self.grouped = nn.Conv2d(8, 8, 3, 2, 1, groups=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(self.grouped(self.dilated(self.stem(x))), 3, stride=1, padding=1)
        return torch.max_pool2d(x, 2)


def test_dilated_grouped_and_torch_namespace_pools():
    ops = _ops(_Odd())
    # the stride-1 avg pool is no downsampler
    assert list(ops) == ["stem", "dilated", "grouped", ":torch.max_pool2d#1"]
    assert ops["dilated"].dilation == (2, 2) and ops["grouped"].groups == 4
    assert ops[":torch.max_pool2d#1"].stride == (2, 2) and ops[":torch.max_pool2d#1"].out_class == 4
