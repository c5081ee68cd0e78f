"""attribute() against Captum, for every supported architecture and smoothing method."""

from __future__ import annotations

import pytest
import torch
from captum.attr import LayerDeepLift, LayerGradientXActivation, NoiseTunnel
from helpers import model as build_model
from torch import nn

import smoothsal as ss

# (arch, input size, layers to check: the paper's three plus one inner block)
CASES = [
    ("resnet18", 64, ["layer1", "layer2", "layer3", "layer2.0"]),
    ("resnet34", 64, ["layer1", "layer2", "layer3", "layer3.2"]),
    ("resnet50", 64, ["layer1", "layer2", "layer3", "layer1.0"]),
    ("monai_fc_resnet18", 224, ["layer1", "layer2", "layer3", "features.5.0"]),
    ("unet_resnet34", 64, ["layer1", "layer2", "layer3", "decoder.blocks.1"]),
]
SAMPLES, STDEV, SEED = 3, 0.2, 7


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.detach() - ref.detach()).abs().max() / ref.detach().abs().max().clamp_min(1e-30))


class PerClassLogits(nn.Module):
    """Captum needs ``[B, classes]``: segmentation logits summed over pixels (1×1 maps squeezed)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out.flatten(2).sum(-1) if out.ndim > 2 else out


def captum_reference(model, x, layer, target):
    """The plain Captum call for one layer and attribution, with NoiseTunnel's own noise."""
    forward = PerClassLogits(model)

    module = model.get_submodule(ss.resolve_layer(model, layer))
    torch.manual_seed(SEED)
    grad = NoiseTunnel(LayerGradientXActivation(forward, module, multiply_by_inputs=False))
    g = grad.attribute(x, nt_type="smoothgrad", nt_samples=SAMPLES, stdevs=STDEV, target=target)
    torch.manual_seed(SEED)
    dl = NoiseTunnel(LayerDeepLift(forward, module, multiply_by_inputs=True))
    d = dl.attribute(
        x, nt_type="smoothgrad", nt_samples=SAMPLES, stdevs=STDEV, target=target,
        baselines=torch.zeros_like(x),
    )  # fmt: skip
    return g, d


@pytest.mark.parametrize("arch,size,layers", CASES, ids=[c[0] for c in CASES])
def test_attribute_equals_captum_for_every_method(arch, size, layers):
    net = build_model(arch)
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    target = torch.tensor([0, 0]) if arch == "monai_fc_resnet18" else torch.tensor([2, 1])
    surrogate = ss.SurrogatePaths.for_model(net, x[:1])
    for p in surrogate.parameters():  # untrained paths with non-trivial weights
        nn.init.normal_(p, std=0.05)
    for method in ss.METHODS:
        smoothed = ss.smooth(net, method, surrogate=surrogate if method == "surrogate" else None)
        ours = ss.attribute(
            smoothed, x, layers=layers, target=target,
            smoothgrad=ss.SmoothGrad(SAMPLES, STDEV, seed=SEED), max_batch=64,
        )  # fmt: skip
        for layer in layers:
            g, d = captum_reference(smoothed, x, layer, target)
            assert ours["gradient"][layer].shape == g.shape
            assert relative_error(ours["gradient"][layer], g) <= 1e-5, (method, layer)
            assert relative_error(ours["deeplift"][layer], d) <= 1e-5, (method, layer)


def test_chunked_samples_match_captum_partitions():
    """Bounded memory: samples in chunks give Captum's nt_samples_batch_size result."""
    net = build_model("resnet18")
    x = torch.randn(1, 3, 48, 48)
    ours = ss.attribute(
        net, x, layers=["layer2"], target=[1], smoothgrad=ss.SmoothGrad(6, 0.3, seed=3),
        max_batch=4,
    )  # fmt: skip
    torch.manual_seed(3)
    module = net.get_submodule(ss.resolve_layer(net, "layer2"))
    ref = NoiseTunnel(LayerDeepLift(net, module, multiply_by_inputs=True)).attribute(
        x, nt_type="smoothgrad", nt_samples=6, nt_samples_batch_size=4, stdevs=0.3, target=1,
        baselines=torch.zeros_like(x),
    )  # fmt: skip
    assert relative_error(ours["deeplift"]["layer2"], ref) <= 1e-5


def test_tile_chunks_do_not_change_results_without_noise():
    net = build_model("resnet18")
    x = torch.randn(5, 3, 48, 48)
    whole = ss.attribute(net, x, layers=["layer1", "layer3"], target=[0, 1, 2, 0, 1])
    parts = ss.attribute(net, x, layers=["layer1", "layer3"], target=[0, 1, 2, 0, 1], max_batch=2)
    for a in ss.ATTRIBUTIONS:
        for layer in ("layer1", "layer3"):
            assert relative_error(parts[a][layer], whole[a][layer]) <= 1e-5


def test_every_block_alias_covers_all_stages():
    net = build_model("resnet34")
    x = torch.randn(1, 3, 48, 48)
    blocks = ss.resolve_layers(net, "blocks")
    assert len(blocks) == 3 + 4 + 6 + 3
    out = ss.attribute(net, x, layers=["layer2", "blocks"], target=0, attributions=("gradient",))
    assert list(out["gradient"]) == ["layer2", *blocks]
    assert torch.equal(out["gradient"]["layer2"], out["gradient"]["layer2.3"])


def test_baseline_is_recomputed_when_weights_change():
    net = build_model("resnet18")
    x = torch.randn(1, 3, 48, 48)
    before = ss.attribute(net, x, layers="layer2", target=0, attributions=("deeplift",))
    with torch.no_grad():
        net.layer1[0].bn1.bias.add_(0.5)
    after = ss.attribute(net, x, layers="layer2", target=0, attributions=("deeplift",))
    module = net.get_submodule("layer2.1")
    ref = LayerDeepLift(net, module, multiply_by_inputs=True).attribute(
        x, target=0, baselines=torch.zeros_like(x)
    )
    assert not torch.allclose(before["deeplift"]["layer2"], after["deeplift"]["layer2"])
    assert relative_error(after["deeplift"]["layer2"], ref) <= 1e-5


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"layers": ["layer9"]}, "allowed"),
        ({"target": [5]}, "allowed: 0..2"),
        ({"attributions": ("saliency",)}, "allowed: gradient, deeplift"),
    ],
)
def test_bad_arguments_name_the_allowed_values(kwargs, message):
    net = build_model("resnet18")
    args = {"layers": ["layer1"], "target": [0]} | kwargs
    with pytest.raises(ValueError, match=message):
        ss.attribute(net, torch.randn(1, 3, 32, 32), **args)


def test_wrong_channel_count_is_a_clear_error():
    net = build_model("resnet18")
    with pytest.raises(ValueError, match=r"allowed: \[B, 3, H, W\]"):
        ss.attribute(net, torch.randn(1, 4, 32, 32), layers="layer1", target=0)


def test_non_canonical_model_is_refused():
    import torchvision

    raw = torchvision.models.resnet18(weights=None).eval()  # one ReLU module used twice per block
    with pytest.raises(ValueError, match="canonical"):
        ss.attribute(raw, torch.randn(1, 3, 32, 32), layers="layer1", target=0)


def test_interrupted_forward_does_not_shift_relu_uses():
    """A forward that fails half-way through a block (e.g. out of memory) changes nothing after."""
    net = build_model("resnet18")
    x = torch.randn(1, 3, 48, 48)
    before = ss.attribute(net, x, layers="layer2", target=0, attributions=("deeplift",))

    def fail(_m, _i, _o):
        raise RuntimeError("interrupted")

    handle = net.layer3[1].conv2.register_forward_hook(fail)  # after that block's first ReLU use
    with pytest.raises(RuntimeError, match="interrupted"):
        net(x)
    handle.remove()
    after = ss.attribute(net, x, layers="layer2", target=0, attributions=("deeplift",))
    assert torch.equal(before["deeplift"]["layer2"], after["deeplift"]["layer2"])


def test_noise_seeds_give_each_tile_its_own_noise_whatever_its_batch():
    """Per-tile seeds: a tile's SmoothGrad result does not depend on the other tiles in its batch nor
    on how samples are chunked, and equals Captum's NoiseTunnel seeded with that tile's seed."""
    net = build_model("resnet18")
    x = torch.randn(3, 3, 48, 48)
    sg = ss.SmoothGrad(4, 0.3)
    seeds = [11, 22, 33]
    batch = ss.attribute(
        net, x, layers=["layer2"], target=[1, 0, 1], smoothgrad=sg, noise_seeds=seeds, max_batch=6
    )
    alone = ss.attribute(net, x[1:2], layers=["layer2"], target=[0], smoothgrad=sg, noise_seeds=seeds[1:2])
    for a in ss.ATTRIBUTIONS:
        assert relative_error(batch[a]["layer2"][1:2], alone[a]["layer2"]) <= 1e-5
    torch.manual_seed(22)
    module = net.get_submodule(ss.resolve_layer(net, "layer2"))
    ref = NoiseTunnel(LayerDeepLift(net, module, multiply_by_inputs=True)).attribute(
        x[1:2], nt_type="smoothgrad", nt_samples=4, nt_samples_batch_size=1, stdevs=0.3, target=0,
        baselines=torch.zeros_like(x[1:2]),
    )  # fmt: skip
    assert relative_error(alone["deeplift"]["layer2"], ref) <= 1e-5
    other = ss.attribute(net, x[1:2], layers=["layer2"], target=[0], smoothgrad=sg, noise_seeds=[23])
    assert relative_error(other["deeplift"]["layer2"], ref) > 1e-3  # the seed matters
    with pytest.raises(ValueError, match="noise_seeds has 2 entries for 3 tiles"):
        ss.attribute(net, x, layers=["layer2"], target=0, smoothgrad=sg, noise_seeds=[1, 2])
