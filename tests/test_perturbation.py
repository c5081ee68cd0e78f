"""Deletion/insertion curves: known answers on a toy model whose logit is the sum of one region."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
from torch import nn

from smoothsal.metrics import auc
from smoothsal.perturbation import (
    PerturbationSettings,
    baseline_tiles,
    deletion_insertion,
    pixel_ranks,
    random_orders,
    random_ranks,
    upsample_maps,
)

SIZE = 20
REGION = (slice(5, 15), slice(2, 12))  # 10 × 10 = 100 of 400 pixels
SCALE, OFFSET = 10.0, 5.0


class RegionLogit(nn.Module):
    """One logit: SCALE · (mean of channel 0 over REGION) − OFFSET; 1 there gives p = σ(5)."""

    def __init__(self, classes: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)  # unused weights: a model with parameters, as in the stage
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = SCALE * x[:, 0, REGION[0], REGION[1]].mean(dim=(1, 2)) - OFFSET
        if self.classes == 1:
            return logit[:, None]
        return torch.stack([torch.zeros_like(logit), logit], dim=1)  # softmax: class 1 = σ(logit)


def region_mask(batch: int = 1) -> torch.Tensor:
    m = torch.zeros(batch, SIZE, SIZE)
    m[:, REGION[0], REGION[1]] = 1.0
    return m


def tiles(batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, SIZE, SIZE, generator=g)
    x[:, 0, REGION[0], REGION[1]] = 1.0
    return x


def expected_deletion(removed_in_region: np.ndarray) -> np.ndarray:
    """Zero baseline: removing a region pixel lowers the region mean by 1/100."""
    return 1 / (1 + np.exp(-(SCALE * (1 - removed_in_region / 100) - OFFSET)))


ZERO = PerturbationSettings(steps=20, baseline="zero", max_batch=7)


@pytest.mark.parametrize("classes", [1, 2])
def test_region_indicator_curves_are_exact_and_beat_random(classes: int):
    model, x = RegionLogit(classes), tiles(2)
    indicator = region_mask(2)
    curves = deletion_insertion(
        model,
        x,
        {"region": indicator, "negated": -indicator},
        target=[classes - 1] * 2,
        seeds=[3, 4],
        settings=ZERO,
    )
    n = np.arange(21) * 20  # 400 pixels in 20 steps
    fractions = curves.fractions.numpy()
    np.testing.assert_allclose(fractions, n / 400)
    # indicator: the region's 100 pixels go first; negated: last
    np.testing.assert_allclose(curves.deletion["region"][0], expected_deletion(np.minimum(n, 100)), atol=1e-6)
    np.testing.assert_allclose(
        curves.deletion["negated"][0], expected_deletion(np.maximum(n - 300, 0)), atol=1e-6
    )
    # insertion: what is NOT yet inserted is zero
    np.testing.assert_allclose(
        curves.insertion["region"][0], expected_deletion(100 - np.minimum(n, 100)), atol=1e-6
    )
    # random order: exactly the tile's own seeded permutation
    inside = random_ranks([3, 4], SIZE * SIZE).view(2, SIZE, SIZE)[:, REGION[0], REGION[1]].flatten(1)
    removed = np.array([[(inside[b] < c).sum().item() for c in n] for b in range(2)])
    np.testing.assert_allclose(curves.deletion_random, expected_deletion(removed), atol=1e-6)
    np.testing.assert_allclose(curves.insertion_random, expected_deletion(100 - removed), atol=1e-6)

    d, i = curves.deletion_auc, curves.insertion_auc
    assert (d["region"] < curves.deletion_auc_random).all() and (
        i["region"] > curves.insertion_auc_random
    ).all()
    assert (d["negated"] > curves.deletion_auc_random).all() and (
        i["negated"] < curves.insertion_auc_random
    ).all()
    assert torch.allclose(d["region"], auc(curves.deletion["region"], curves.fractions))


def test_coarse_map_upsampled_still_orders_the_region_first():
    coarse = torch.zeros(1, 5, 5)  # a layer at 1/4 resolution: the region covers cells (1..3, 0..2)
    coarse[:, 1:4, 0:3] = 1.0
    up = upsample_maps(coarse, (SIZE, SIZE))
    assert up.shape == (1, SIZE, SIZE) and float(up.max()) == 1.0 and float(up.min()) == 0.0
    curves = deletion_insertion(
        RegionLogit(), tiles(1), {"coarse": coarse}, target=[0], seeds=[0], settings=ZERO
    )
    assert curves.deletion_auc["coarse"] < curves.deletion_auc_random - 0.1
    assert curves.insertion_auc["coarse"] > curves.insertion_auc_random + 0.1


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 3)
        )
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))


def test_curves_do_not_depend_on_batching_or_batch_mates():
    model, x = SmallCNN(), tiles(3)
    maps = {"a": torch.randn(3, 5, 5, generator=torch.Generator().manual_seed(1)), "b": region_mask(3)}
    blur = PerturbationSettings(steps=10, blur_sigma=2.0, max_batch=1000)
    ref = deletion_insertion(model, x, maps, target=[0, 1, 2], seeds=[7, 8, 9], settings=blur)
    small = deletion_insertion(
        model, x, maps, target=[0, 1, 2], seeds=[7, 8, 9], settings=PerturbationSettings(10, "blur", 2.0, 3)
    )
    alone = deletion_insertion(
        model, x[1:2], {k: v[1:2] for k, v in maps.items()}, target=[1], seeds=[8], settings=blur
    )
    for key in maps:
        assert torch.allclose(small.deletion[key], ref.deletion[key], atol=1e-6)
        assert torch.allclose(alone.insertion[key][0], ref.insertion[key][1], atol=1e-6)
    assert torch.allclose(alone.deletion_random[0], ref.deletion_random[1], atol=1e-6)
    # shared end points: deletion ends where insertion starts (the fully replaced tile)
    assert torch.equal(ref.deletion["a"][:, -1], ref.insertion_random[:, 0])
    assert torch.equal(ref.deletion["b"][:, 0], ref.insertion["a"][:, -1])


def test_baselines():
    x = tiles(2)
    sigma = 2.0
    blurred = baseline_tiles(x, PerturbationSettings(blur_sigma=sigma))
    # scipy's Gaussian filter with the same ±3σ kernel and reflect-without-edge padding ("mirror")
    ref = scipy.ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="mirror", truncate=3.0)
    np.testing.assert_allclose(blurred.numpy(), ref, atol=1e-5)
    flat = torch.full((1, 3, 8, 8), 0.7)
    assert torch.allclose(baseline_tiles(flat, PerturbationSettings(blur_sigma=50.0)), flat)  # kernel clipped
    mean = baseline_tiles(x, PerturbationSettings(baseline="mean"))
    assert torch.allclose(mean[:, :, 3, 4], x.mean(dim=(2, 3)))
    assert torch.equal(baseline_tiles(x, PerturbationSettings(baseline="zero")), torch.zeros_like(x))


def test_pixel_ranks_highest_first_ties_in_the_tiebreak_order():
    values = torch.tensor([[[0.5, 2.0], [0.5, -1.0]]])
    assert pixel_ranks(values).tolist() == [[1, 0, 2, 3]]  # raster order among the two 0.5s
    assert pixel_ranks(values, torch.tensor([[3, 2, 1, 0]])).tolist() == [[2, 0, 1, 3]]
    flat = torch.zeros(1, 4, 4)  # all tied: the map's order is the random order itself
    assert torch.equal(pixel_ranks(flat, random_orders([5], 16)), random_ranks([5], 16))
    with pytest.raises(ValueError, match="NaN"):
        pixel_ranks(torch.tensor([[[0.0, float("nan")]]]))


class PixelLogits(nn.Module):
    """Segmentation toy: class-1 logit = 4·(channel 0 − 0.5) per pixel, class-0 logit 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one = 4 * (x[:, :1] - 0.5)
        return torch.cat([torch.zeros_like(one), one], dim=1)


def test_segmentation_score_regions():
    x = torch.zeros(3, 3, 4, 4)
    x[:, 0, :2] = 1.0  # top half: class 1 predicted (p = σ(2)), bottom half: p = σ(−2)
    x[2, 0] = 0.0  # tile 2: class 1 predicted nowhere
    mask = torch.full((3, 4, 4), -1)
    mask[0, 0, 0] = 1  # tile 0: one annotated target pixel; tiles 1, 2: no annotation
    curves = deletion_insertion(
        PixelLogits(), x, {"m": torch.rand(3, 2, 2)}, target=[1, 1, 1], seeds=[0, 1, 2],
        settings=PerturbationSettings(steps=4, baseline="zero"), mask=mask,
    )  # fmt: skip
    assert curves.region == ("mask", "predicted", "all")
    hi, lo = torch.sigmoid(torch.tensor(2.0)).item(), torch.sigmoid(torch.tensor(-2.0)).item()
    # unperturbed: tile 0 over its one pixel, tile 1 over the predicted top half, tile 2 over all
    assert np.allclose(curves.deletion["m"][:, 0], [hi, hi, lo])
    # fully replaced (zero): σ(−2) everywhere, averaged over the same regions
    assert np.allclose(curves.deletion["m"][:, -1], [lo, lo, lo])


def test_bad_input():
    model, x = RegionLogit(), tiles(2)
    with pytest.raises(ValueError, match=r"expected \[2, h, w\]"):
        deletion_insertion(model, x, {"a": torch.ones(3, 4, 4)}, target=[0, 0], seeds=[0, 1])
    with pytest.raises(ValueError, match="one target and one seed"):
        deletion_insertion(model, x, {"a": torch.ones(2, 4, 4)}, target=[0, 0], seeds=[0])
    with pytest.raises(ValueError, match="unknown baseline"):
        PerturbationSettings(baseline="noise")
