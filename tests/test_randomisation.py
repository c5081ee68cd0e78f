"""Cascading model randomisation: the steps, the re-initialisation, and the known answers
(a map that ignores the weights stays at correlation 1; a gradient map falls)."""

from __future__ import annotations

import pytest
import torch
from helpers import model as build_model
from torch import nn

import smoothsal as ss
from smoothsal.randomisation import (
    RandomisationSettings,
    attribution_maps,
    cascade,
    cascade_steps,
    randomisation_curves,
)

LAYERS = ["layer1", "layer2", "layer3"]
BLOCKS = ["head", "layer4.1", "layer4.0", "layer3.1", "layer3.0", "layer2.1", "layer2.0", "layer1.1"]

BY_BLOCK = RandomisationSettings(by="block")  # Adebayo's cascade, one step per block (default: by stage)


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return build_model("resnet18")  # random weights, non-trivial BatchNorm statistics


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_steps_from_the_head_down_to_the_shallowest_explained_layer(resnet, x):
    steps = cascade_steps(resnet, LAYERS, example=x[:1])
    assert [s.label for s in steps] == BLOCKS
    assert steps[0].modules == ("fc",) and steps[1].modules == ("layer4.1",)
    assert [s.label for s in cascade_steps(resnet, "layer3", example=x[:1])] == BLOCKS[:4]
    by_stage = cascade_steps(resnet, LAYERS, by="stage", example=x[:1])
    assert [s.label for s in by_stage] == ["head", "layer4", "layer3", "layer2", "layer1"]
    assert by_stage[1].modules == ("layer4.0", "layer4.1")
    with pytest.raises(ValueError, match="before the first block"):
        cascade_steps(resnet, "conv1", example=x[:1])


def test_steps_of_the_monai_models():
    fc = ss.load_model("monai_fc_resnet18", num_classes=1)
    steps = cascade_steps(fc, "layer1", example=torch.zeros(1, 3, 224, 224))
    assert [s.label for s in steps][:3] == ["head", "features.7.1", "features.7.0"]
    assert steps[0].modules == ("fc",) and steps[-1].label == "features.4.1"
    unet = ss.load_model("unet_resnet34", num_classes=3)
    steps = cascade_steps(unet, "layer2", example=torch.zeros(1, 3, 64, 64))
    head = steps[0].modules
    assert steps[0].label == "head" and "segmentation_head.0" in head
    assert any(n.startswith("decoder.") for n in head) and not any(n.startswith("encoder.") for n in head)
    assert [s.label for s in steps[1:4]] == ["encoder.layer4.2", "encoder.layer4.1", "encoder.layer4.0"]
    assert steps[-1].label == "encoder.layer2.3"


def test_cascade_works_on_a_copy_and_reinitialises_as_documented(resnet, x):
    before = state(resnet)
    seen = []
    for step, work in cascade(resnet, LAYERS, BY_BLOCK, example=x[:1]):
        seen.append(step.label)
        if step.label == "layer4.1":  # the head is redrawn, layer4.0 not yet
            assert not torch.equal(work.fc.weight, resnet.fc.weight)
            assert torch.equal(work.layer4[0].conv1.weight, resnet.layer4[0].conv1.weight)
    assert seen == BLOCKS
    assert all(torch.equal(v, resnet.state_dict()[k]) for k, v in before.items())  # caller untouched
    bn, conv = work.layer1[1].bn1, work.layer1[1].conv1
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(
        bn.bias, torch.zeros_like(bn.bias)
    )
    fan_out = conv.out_channels * 9  # Kaiming normal, fan-out: std √(2 / fan_out)
    assert abs(float(conv.weight.detach().std()) / (2 / fan_out) ** 0.5 - 1) < 0.05
    # the stem and the block below the shallowest explained layer stay as trained
    for name in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.bn1.running_var"):
        assert torch.equal(work.state_dict()[name], resnet.state_dict()[name])


def test_batchnorm_keep_and_seeding(resnet, x):
    *_, (_, kept) = cascade(resnet, "layer3", RandomisationSettings(batchnorm="keep"), example=x[:1])
    assert torch.equal(kept.layer4[0].bn1.running_mean, resnet.layer4[0].bn1.running_mean)
    assert torch.equal(kept.layer4[0].bn1.weight, torch.ones_like(kept.layer4[0].bn1.weight))
    *_, (_, again) = cascade(resnet, "layer3", RandomisationSettings(batchnorm="keep"), example=x[:1])
    *_, (_, other) = cascade(resnet, "layer3", RandomisationSettings(seed=1), example=x[:1])
    assert torch.equal(kept.layer4[0].conv1.weight, again.layer4[0].conv1.weight)
    assert not torch.equal(kept.layer4[0].conv1.weight, other.layer4[0].conv1.weight)
    # per module seeds: the same weights whether stepping by block or by stage
    *_, (_, staged) = cascade(
        resnet, "layer3", RandomisationSettings(by="stage", batchnorm="keep"), example=x[:1]
    )
    assert torch.equal(staged.layer3[1].conv2.weight, kept.layer3[1].conv2.weight)


def test_surrogate_paths_of_randomised_blocks_are_redrawn(resnet, x):
    paths = ss.SurrogatePaths.for_model(resnet, x[:1])
    smoothed = ss.smooth(resnet, "surrogate", surrogate=paths)
    for step, work in cascade(smoothed, LAYERS, BY_BLOCK, example=x[:1]):
        path = work.get_submodule("layer2.0.conv1")
        intact = smoothed.get_submodule("layer2.0.conv1")
        assert type(path).__name__ == "SurrogatePath"
        redrawn = not torch.equal(path.pre.weight, intact.pre.weight)
        assert redrawn == (step.label in ("layer2.0", "layer1.1")), step.label
        assert redrawn == (not torch.equal(path.post.weight, intact.post.weight))
        down = "layer2.0.downsample.0"
        assert redrawn == (
            not torch.equal(work.get_submodule(down).pre.weight, smoothed.get_submodule(down).pre.weight)
        )
    # the method's maps come out of the randomised surrogate model as from any other
    maps = attribution_maps(x, layers=LAYERS, target=[0, 1, 2], attributions=("gradient",))
    curves = randomisation_curves(
        smoothed, maps, layers=LAYERS, settings=RandomisationSettings(by="stage"), example=x[:1]
    )
    assert curves.spearman[("gradient", "layer2")].shape == (3, 5)
    assert float(curves.spearman[("gradient", "layer2")][:, -1].mean()) < 0.5


def test_a_map_that_ignores_the_weights_keeps_correlation_one(resnet, x):
    edges = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().sum(1)[:, :, :-1]  # an edge detector of the tile

    def input_only(_model: nn.Module) -> dict:
        return {"edges": edges}

    curves = randomisation_curves(resnet, input_only, layers=LAYERS, settings=BY_BLOCK, example=x[:1])
    assert [s.label for s in curves.steps] == BLOCKS
    assert curves.spearman["edges"].shape == (3, len(BLOCKS))
    assert torch.equal(curves.spearman["edges"], torch.ones(3, len(BLOCKS), dtype=torch.float64))


def test_a_gradient_map_falls_and_recomputation_alone_does_not(resnet, x):
    maps = attribution_maps(
        x, layers=LAYERS, target=[0, 1, 2], smoothgrad=ss.SmoothGrad(samples=2), noise_seeds=[5, 6, 7]
    )
    intact = maps(resnet)
    # same seeds: the intact model's maps are reproduced exactly (correlation 1)
    again = maps(resnet)
    assert all(torch.equal(intact[k], again[k]) for k in intact)
    curves = randomisation_curves(
        resnet, maps, layers=LAYERS, settings=BY_BLOCK, before=intact, example=x[:1]
    )
    assert set(curves.spearman) == {(a, layer) for a in ss.ATTRIBUTIONS for layer in LAYERS}
    for layer in LAYERS:
        rho = curves.spearman[("gradient", layer)]
        assert rho.shape == (3, len(BLOCKS)) and not rho.isnan().any()
        assert float(rho[:, -1].mean()) < 0.5, (layer, rho)  # measured ≈ 0.2 on these tiles
        assert float(rho.mean()) < 0.5


class Scale(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, n, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def test_unknown_parameterised_module_is_refused(resnet, x):
    odd = build_model("resnet18")
    odd.layer4[1].bn2 = Scale(512)
    with pytest.raises(ValueError, match=r"cannot re-initialise 'layer4.1.bn2' \(Scale\)"):
        list(cascade(odd, "layer3", example=x[:1]))
    with pytest.raises(ValueError, match="unknown grouping"):
        RandomisationSettings(by="layer")
