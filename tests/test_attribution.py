"""attribute() against Captum, for every supported architecture and smoothing method."""

from __future__ import annotations

import pytest
import torch
from helpers import model as build_model
from reference import assert_fp32_within, assert_fp64_agrees, captum_all, captum_pair, fp32_bound, fp32_error
from torch import nn

import smoothsal as ss

# (arch, input size, batch, layers to check: the paper's three plus one inner block, SmoothGrad samples).
# Each case runs Captum in fp32 and fp64 per method × layer × attribution: SmoothGrad (equal for every
# architecture by construction: the same noise, then the same per-input pass) in the smallest case only;
# two inputs with their own targets in the two small cases, one input where the net is big (ResNet-34/50)
# or the input is (MONAI's FC ResNet pools 7 × 7 at the end: 224 px).
CASES = [
    ("resnet18", 64, 2, ["layer1", "layer2", "layer3", "layer2.0"], 3),
    ("resnet34", 64, 1, ["layer1", "layer2", "layer3", "layer3.2"], 0),
    ("resnet50", 64, 1, ["layer1", "layer2", "layer3", "layer1.0"], 0),
    ("monai_fc_resnet18", 224, 1, ["layer1", "layer2", "layer3", "features.5.0"], 0),
    ("unet_resnet34", 64, 2, ["layer1", "layer2", "layer3", "decoder.blocks.1"], 0),
]
STDEV, SEED = 0.2, 7


def both(model, x, **kwargs) -> dict[str, dict]:
    """smoothsal's fp32 result and its fp64 twin."""
    return {p: ss.attribute(model, x, precision=p, **kwargs) for p in ("fp32", "fp64")}


def assert_rule(
    ours: dict[str, dict], model, x, layer, target, attribution, key=None, what="", refs=None, **noise
):
    """The fp64-grounded rule (tests/reference.py) for one layer and attribution (``refs``: Captum's
    fp32 and fp64 results when already computed)."""
    c32, c64 = refs or captum_pair(model, x, layer, target, attribution, **noise)
    o32, o64 = ours["fp32"][attribution][key or layer], ours["fp64"][attribution][key or layer]
    assert o32.shape == c32.shape and o32.dtype == torch.float32
    assert_fp64_agrees(o64, c64, what)
    assert_fp32_within(o32, o64, fp32_bound(c32, c64), what)


@pytest.mark.parametrize("arch,size,batch,layers,samples", CASES, ids=[c[0] for c in CASES])
def test_attribute_equals_captum_for_every_method(arch, size, batch, layers, samples):
    net = build_model(arch)
    torch.manual_seed(1)
    x = torch.randn(batch, 3, size, size)
    target = (torch.tensor([0, 0]) if arch == "monai_fc_resnet18" else torch.tensor([2, 1]))[:batch]
    surrogate = ss.SurrogatePaths.for_model(net, x[:1])
    for p in surrogate.parameters():  # untrained paths with non-trivial weights
        nn.init.normal_(p, std=0.05)
    sg = ss.SmoothGrad(samples, STDEV, seed=SEED) if samples else None
    noise = {"samples": samples, "stdev": STDEV, "seed": SEED}
    for method in ss.METHODS:
        smoothed = ss.smooth(net, method, surrogate=surrogate if method == "surrogate" else None)
        ours = both(smoothed, x, layers=layers, target=target, smoothgrad=sg, max_batch=64)
        refs = captum_all(smoothed, x, layers, target, **noise)
        for layer in layers:
            for a in ss.ATTRIBUTIONS:
                assert_rule(ours, smoothed, x, layer, target, a, what=(method, layer, a), refs=refs[a][layer])


def test_the_fp32_rule_fails_a_result_off_by_1e_4():
    """The bound keeps its teeth: a map perturbed by 1e-4 relative fails it, the real one passes."""
    net = build_model("resnet18")
    torch.manual_seed(2)
    x = torch.randn(2, 3, 64, 64)
    ours = both(net, x, layers="layer2", target=[2, 1])
    for a in ss.ATTRIBUTIONS:
        c32, c64 = captum_pair(net, x, "layer2", [2, 1], a)
        bound = fp32_bound(c32, c64)
        o32, o64 = ours["fp32"][a]["layer2"], ours["fp64"][a]["layer2"]
        assert_fp32_within(o32, o64, bound)
        with pytest.raises(AssertionError, match="fp32 lies"):
            assert_fp32_within(o32 * (1 + 1e-4), o64, bound)
        with pytest.raises(AssertionError):
            assert_fp64_agrees(o64 * (1 + 1e-8), c64)


def test_chunked_samples_match_captum_partitions():
    """Bounded memory: samples in chunks give Captum's nt_samples_batch_size result."""
    net = build_model("resnet18")
    x = torch.randn(1, 3, 48, 48)
    sg = ss.SmoothGrad(6, 0.3, seed=3)
    ours = both(net, x, layers=["layer2"], target=[1], smoothgrad=sg, max_batch=4)
    noise = {"samples": 6, "stdev": 0.3, "seed": 3, "samples_batch": 4}
    assert_rule(ours, net, x, "layer2", 1, "deeplift", **noise)


def test_tile_chunks_do_not_change_results_without_noise():
    """Each fp32 map, whole batch or chunks of 2, within the rule of its own fp64 twin."""
    net = build_model("resnet18")
    x = torch.randn(5, 3, 48, 48)
    target = [0, 1, 2, 0, 1]
    whole = both(net, x, layers=["layer1", "layer3"], target=target)
    parts = both(net, x, layers=["layer1", "layer3"], target=target, max_batch=2)
    for a in ss.ATTRIBUTIONS:
        for layer in ("layer1", "layer3"):
            assert_rule(whole, net, x, layer, target, a, what=(a, layer))
            c32, c64 = captum_pair(net, x, layer, target, a)
            assert_fp32_within(
                parts["fp32"][a][layer], whole["fp64"][a][layer], fp32_bound(c32, c64), (a, layer)
            )
            assert_fp64_agrees(parts["fp64"][a][layer], whole["fp64"][a][layer], (a, layer))


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
    after = both(net, x, layers="layer2", target=0, attributions=("deeplift",))
    assert not torch.allclose(before["deeplift"]["layer2"], after["fp32"]["deeplift"]["layer2"])
    assert_rule(after, net, x, "layer2", 0, "deeplift")  # the fp64 copy is remade too


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
    alone = both(net, x[1:2], layers=["layer2"], target=[0], smoothgrad=sg, noise_seeds=seeds[1:2])
    noise = {"samples": 4, "stdev": 0.3, "seed": 22, "samples_batch": 1}
    assert_rule(alone, net, x[1:2], "layer2", 0, "deeplift", **noise)  # Captum seeded with the tile's seed
    for a in ss.ATTRIBUTIONS:
        c32, c64 = captum_pair(net, x[1:2], "layer2", 0, a, **noise)
        assert_fp32_within(batch[a]["layer2"][1:2], alone["fp64"][a]["layer2"], fp32_bound(c32, c64), a)
    ref = alone["fp64"]["deeplift"]["layer2"]
    other = ss.attribute(net, x[1:2], layers=["layer2"], target=[0], smoothgrad=sg, noise_seeds=[23])
    assert fp32_error(other["deeplift"]["layer2"], ref) > 1e-3 * float(ref.abs().max())  # the seed matters
    with pytest.raises(ValueError, match="noise_seeds has 2 entries for 3 tiles"):
        ss.attribute(net, x, layers=["layer2"], target=0, smoothgrad=sg, noise_seeds=[1, 2])
