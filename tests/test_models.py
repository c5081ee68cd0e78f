"""The model registry: canonical ReLUs, checkpoints, layer names."""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import module_calls, num_classes, with_real_statistics
from torch import nn

import smoothsal as ss
from smoothsal.architectures import ARCHITECTURES
from smoothsal.errors import BadCheckpoint


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_canonical_model_equals_the_original(arch, tmp_path):
    torch.manual_seed(0)
    raw = with_real_statistics(ARCHITECTURES[arch](num_classes=num_classes(arch))).eval()
    torch.save(raw.state_dict(), tmp_path / "model.pt")
    model = ss.load_model(arch, num_classes=num_classes(arch), checkpoint=tmp_path / "model.pt")
    assert not model.training
    x = torch.randn(2, 3, 224, 224)
    calls = module_calls(model, x)
    relus = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    assert relus and all(calls[n] == 1 for n in relus)
    assert not any(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    with torch.no_grad():
        assert torch.equal(model(x), raw(x))


def test_unet_shortcuts_match_monai_and_pass_gradients(tmp_path):
    """MONAI's type-A shortcut detaches (``.data``); ours gives the same outputs with gradients."""
    from monai.networks.nets import FlexibleUNet

    torch.manual_seed(0)
    monai_net = FlexibleUNet(3, 3, backbone="resnet34", pretrained=False, spatial_dims=2).eval()
    torch.save(monai_net.state_dict(), tmp_path / "model.pt")
    model = ss.load_model("unet_resnet34", num_classes=3, checkpoint=tmp_path / "model.pt")
    shortcuts = [n for n, m in model.named_modules() if isinstance(m, ss.architectures.ZeroPadShortcut)]
    assert shortcuts == [f"encoder.layer{k}.0.downsample" for k in (2, 3, 4)]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), monai_net(x))
    for net in (monai_net, model):  # a block whose residual branch is zero: all that remains is the shortcut
        block = net.encoder.layer2[0]
        nn.init.zeros_(block.bn2.weight)
        nn.init.zeros_(block.bn2.bias)
    z = torch.randn(1, 64, 16, 16, requires_grad=True)
    grads = [torch.autograd.grad(net.encoder.layer2[0](z).sum(), z)[0] for net in (monai_net, model)]
    assert grads[0].abs().max() == 0  # MONAI's: the shortcut is cut from autograd
    expected = torch.zeros_like(z)  # the block is relu(kept pixels, zero-padded channels)
    expected[:, :, ::2, ::2] = (z[:, :, ::2, ::2] > 0).to(z.dtype)
    torch.testing.assert_close(grads[1], expected)


def test_functional_relu_gets_its_own_module():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Conv2d(4, 2, 3, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.head(nn.functional.relu(self.conv(x)))).mean((2, 3))

    net = Functional()
    x = torch.randn(1, 3, 16, 16)
    canonical = ss.canonicalise(net, x)
    assert sum(isinstance(m, nn.ReLU) for m in canonical.modules()) == 2
    assert torch.equal(canonical(x), net(x))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"state_dict": {f"model.{k}": v for k, v in s.items()}, "epoch": 3},
        lambda s: {f"module.{k}": v for k, v in s.items()},
        lambda s: {"model": s},
    ],
    ids=["plain", "lightning", "ddp", "model-key"],
)
def test_checkpoint_layouts(wrap, tmp_path):
    raw = torchvision.models.resnet18(weights=None, num_classes=2)
    torch.save(wrap(raw.state_dict()), tmp_path / "ckpt.pt")
    model = ss.load_model("resnet18", num_classes=2, checkpoint=tmp_path / "ckpt.pt")
    assert torch.equal(model.fc.weight, raw.fc.weight)


def test_checkpoint_that_does_not_fit_names_the_keys(tmp_path):
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pt")
    with pytest.raises(ValueError, match=r"r34\.pt does not fit arch 'resnet18'.*unexpected keys layer1\.2"):
        ss.load_model("resnet18", num_classes=1000, checkpoint=tmp_path / "r34.pt")


def test_unknown_arch_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"give a registered name \(monai_fc_resnet18, resnet18, resnet34"):
        ss.load_model("vgg16", num_classes=2)


@pytest.mark.parametrize(
    "arch,expected",
    [
        ("resnet18", ["layer1", "layer2", "layer3", "layer4"]),
        ("resnet50", ["layer1", "layer2", "layer3", "layer4"]),
        ("monai_fc_resnet18", ["features.4", "features.5", "features.6", "features.7"]),
        ("unet_resnet34", ["encoder.layer1", "encoder.layer2", "encoder.layer3", "encoder.layer4"]),
    ],
)
def test_stage_aliases(arch, expected):
    model = ss.load_model(arch, num_classes=num_classes(arch))
    assert [ss.resolve_layer(model, f"layer{k}") for k in range(1, 5)] == expected
    assert ss.resolve_layer(model, expected[0]) == expected[0]


def test_unknown_layer_names_the_allowed_values():
    model = ss.load_model("resnet18", num_classes=2)
    with pytest.raises(ValueError, match="unknown layer 'layer7'.*aliases layer1, layer2, layer3, layer4"):
        ss.resolve_layer(model, "layer7")


def test_case_13_weights_of_another_class_count_name_each_tensor_shape_and_the_option(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None, num_classes=5).state_dict(), tmp_path / "r5.pt")
    with pytest.raises(BadCheckpoint) as err:
        ss.load_model("resnet18", num_classes=2, checkpoint=tmp_path / "r5.pt")
    assert str(err.value) == (
        f"checkpoint {tmp_path / 'r5.pt'} does not fit arch 'resnet18': tensors of other shapes: fc.weight "
        "(5, 512) (model: (2, 512)), fc.bias (5,) (model: (2,)); check --num-classes (the last layer's "
        "outputs) and --arch"
    )
