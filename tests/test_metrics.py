"""TV and prediction difference against hand-computed values of the paper's formulas."""

from __future__ import annotations

import math

import torch

import smoothsal as ss


def test_tv_of_constant_map_is_zero():
    assert torch.equal(ss.total_variation(torch.full((2, 3, 8, 8), 4.2)), torch.zeros(2))


def test_tv_of_checkerboard_matches_the_formula():
    h, w = 6, 10
    board = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(h // 2, w // 2)
    # mean 0, mean |z| 1, every neighbour difference is 2
    expected = 2 * ((h - 1) * w + h * (w - 1)) / (h * w)
    tv = ss.total_variation(board.view(1, 1, h, w))
    assert math.isclose(float(tv), expected, rel_tol=1e-6)


def test_tv_is_scale_and_offset_free_and_averages_channels():
    z = torch.randn(1, 1, 9, 7)
    assert torch.allclose(ss.total_variation(z), ss.total_variation(5 * z + 3), rtol=1e-5)
    ramp = torch.arange(8.0).repeat(8, 1).view(1, 1, 8, 8)  # smooth: TV far below noise
    both = torch.cat([ramp, torch.randn(1, 1, 8, 8)], dim=1)
    assert torch.allclose(
        ss.total_variation(both),
        (ss.total_variation(both[:, :1]) + ss.total_variation(both[:, 1:])) / 2,
    )


def test_tv_reference_loop():
    z = torch.randn(3, 2, 5, 4)
    ref = []
    for tile in z.double():
        per_channel = []
        for c in tile:
            c = c - c.mean()
            c = c / max(float(c.abs().mean()), 1e-6)
            diff = sum(abs(float(c[i + 1, j] - c[i, j])) for i in range(4) for j in range(4))
            diff += sum(abs(float(c[i, j + 1] - c[i, j])) for i in range(5) for j in range(3))
            per_channel.append(diff / 20)
        ref.append(sum(per_channel) / 2)
    assert torch.allclose(ss.total_variation(z), torch.tensor(ref, dtype=torch.float32), rtol=1e-5)


def test_prediction_difference_all_and_target():
    p_orig = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    p_new = torch.tensor([[0.5, 0.4, 0.1], [0.1, 0.3, 0.6]])
    all_classes, target = ss.prediction_difference(p_orig, p_new, torch.tensor([0, 2]))
    assert torch.allclose(all_classes, torch.tensor([0.4, 0.4]))
    assert torch.allclose(target, torch.tensor([0.2, 0.2]))


def test_probabilities_sigmoid_for_one_logit():
    logits = torch.tensor([[0.0], [2.0]])
    assert torch.allclose(ss.probabilities(logits), torch.sigmoid(logits))
    assert torch.allclose(ss.probabilities(torch.zeros(1, 4)), torch.full((1, 4), 0.25))


def test_masked_prediction_difference_by_hand():
    # 2 classes, 1×2 pixels. Tile 0: label 1 on one pixel; tile 1: background only (skipped)
    p_orig = torch.tensor([[[[0.95, 0.5]], [[0.05, 0.5]]], [[[0.9, 0.9]], [[0.1, 0.1]]]])
    p_new = torch.tensor([[[[0.85, 0.3]], [[0.15, 0.7]]], [[[0.5, 0.5]], [[0.5, 0.5]]]])
    mask = torch.tensor([[[0, 1]], [[0, 0]]])
    out = ss.masked_prediction_difference(p_orig, p_new, mask)
    # tile 0: M = [0, 1] (p_orig for class 1 > 0.1 only at pixel 1); Σ_c|diff| there = 0.4
    assert math.isclose(float(out[0]), 0.4, rel_tol=1e-6)
    assert math.isnan(float(out[1]))
    unsure = torch.tensor([[[[0.95, 0.95]], [[0.05, 0.05]]]])  # label 1 never above 0.1
    assert math.isnan(float(ss.masked_prediction_difference(unsure, unsure, mask[:1])[0]))


def test_accuracy_and_dice():
    assert math.isclose(
        ss.accuracy(torch.tensor([[1.0], [-1.0], [2.0]]), torch.tensor([1, 0, 0])), 2 / 3, rel_tol=1e-6
    )
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 0, :] = 1.0  # predicts class 1 on the top row
    mask = torch.tensor([[[1, 0], [1, 0]]])
    assert math.isclose(ss.dice(logits, mask), 2 * 1 / (2 + 2))
