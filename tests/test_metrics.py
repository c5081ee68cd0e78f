"""TV and prediction difference against hand-computed values of the paper's formulas; the checkerboard
share against its known values and a least-squares projection; the faithfulness measures (AUC, Spearman, relevance mass, bootstrap) against hand-computed values and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

import smoothsal as ss
from smoothsal.metrics import auc, bootstrap_mean_ci, region_fraction, relevance_mass, spearman


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


def _grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(torch.arange(h).double(), torch.arange(w).double(), indexing="ij")


def test_checkerboard_share_of_period_two_patterns_is_one_and_of_a_flat_map_nan():
    hh, ww = _grid(6, 10)
    board, rows, cols = (-1) ** (hh + ww), (-1) ** hh, (-1) ** ww
    maps = torch.stack([board, 3 * rows + 2, 0.5 * cols - 1, board + rows - 2 * cols + 7]).unsqueeze(1)
    np.testing.assert_allclose(ss.checkerboard_share(maps).numpy(), 1.0, rtol=1e-12)
    odd = ((-1) ** sum(_grid(7, 9))).view(1, 1, 7, 9)  # odd sides: still exactly the pattern
    assert float(ss.checkerboard_share(odd)) == pytest.approx(1.0, rel=1e-12)
    flat = torch.cat([torch.full((1, 2, 8, 8), 0.1), torch.zeros(1, 2, 8, 8)])
    assert ss.checkerboard_share(flat).isnan().all()
    assert ss.checkerboard_share(flat.double()).isnan().all()  # fp64 mean rounding is no structure


@pytest.mark.parametrize(("h", "w", "a", "b"), [(8, 8, 1, 0), (8, 8, 0, 1), (8, 8, 2, 3), (6, 10, 1, -2)])
def test_checkerboard_share_of_a_linear_ramp(h: int, w: int, a: float, b: float):
    """a·h + b·w: ⟨x, (−1)^h⟩ = −a·H·W/2, ⟨x, (−1)^w⟩ = −b·H·W/2, ⟨x, (−1)^(h+w)⟩ = 0 and
    ‖x − x̄‖² = H·W·(a²(H² − 1) + b²(W² − 1))/12, so the share is 3(a² + b²)/(a²(H² − 1) + b²(W² − 1));
    on N × N, 3/(N² − 1) in any direction: 1/21 ≈ 0.048 on 8 × 8."""
    hh, ww = _grid(h, w)
    share = float(ss.checkerboard_share((a * hh + b * ww).view(1, 1, h, w).float()))
    assert share == pytest.approx(3 * (a * a + b * b) / (a * a * (h * h - 1) + b * b * (w * w - 1)), rel=1e-9)
    if h == w == 8:
        assert share == pytest.approx(1 / 21, rel=1e-9)


def test_checkerboard_share_of_a_ramp_along_an_odd_side_is_zero():
    """Centred, h − 3 is odd about the middle row and (−1)^h even about it: no overlap."""
    hh, ww = _grid(7, 9)
    assert float(ss.checkerboard_share(hh.view(1, 1, 7, 9))) == pytest.approx(0.0, abs=1e-15)
    assert float(ss.checkerboard_share((2 * hh - 3 * ww).view(1, 1, 7, 9))) == pytest.approx(0.0, abs=1e-15)


def test_checkerboard_share_under_a_smooth_envelope_is_mean_squared_over_mean_square():
    """x = e·(−1)^(h+w), e > 0 smooth: the pattern alone carries (Σe)²/(H·W) and ‖x − x̄‖² ≤ Σe², so
    share ≥ mean(e)² / mean(e²) = 1 / (1 + var(e)/mean(e)²); the other two patterns add only e's own
    period-2 content, small for a smooth e: the share is that bound to within 0.001 here. The
    envelope's variation moves energy off the period-2 frequencies, so a strongly modulated
    checkerboard scores clearly below 1 (0.79 under this Gaussian bump)."""
    hh, ww = _grid(16, 16)
    for envelope, near in (
        (1 + 0.3 * torch.sin(hh / 4) * torch.cos(ww / 5), 0.981),
        (torch.exp(-((hh - 7) ** 2 + (ww - 9) ** 2) / 50), 0.790),
    ):
        share = float(ss.checkerboard_share((envelope * (-1) ** (hh + ww)).view(1, 1, 16, 16)))
        bound = float(envelope.mean() ** 2 / envelope.square().mean())
        assert bound <= share <= bound + 1e-3
        assert share == pytest.approx(near, abs=1e-3)


def test_checkerboard_share_of_a_mixture_sums_energies_over_channels():
    """a·c + b·s with c a period-2 pattern and s smooth, mean-free and orthogonal to the three patterns:
    share = a²‖c‖² / (a²‖c‖² + b²‖s‖²) exactly, in one channel or spread over channels."""
    h, w = 12, 8
    hh, ww = _grid(h, w)
    c = (-1) ** (hh + ww)
    s = torch.cos(2 * math.pi * hh / h) + torch.sin(2 * math.pi * 2 * ww / w)  # no period-2 component
    a, b = 0.3, 1.7
    expected = a**2 * c.square().sum() / (a**2 * c.square().sum() + b**2 * s.square().sum())
    one = (a * c + b * s).view(1, 1, h, w)
    two = torch.stack([a * c + 5, b * s - 2]).view(1, 2, h, w)  # channel means removed separately
    assert float(ss.checkerboard_share(one)) == pytest.approx(float(expected), rel=1e-12)
    assert float(ss.checkerboard_share(two)) == pytest.approx(float(expected), rel=1e-12)


def test_checkerboard_share_of_white_noise_is_three_over_pixels_minus_one_on_average():
    """Gaussian noise is a uniformly random direction in the (H·W − 1)-dimensional mean-free space,
    3 of whose dimensions are the patterns: E share = 3/(H·W − 1), as for the 8 × 8 ramp. The
    share sees checkerboards, not noise."""
    z = torch.randn(4000, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert float(ss.checkerboard_share(z).mean()) == pytest.approx(3 / 63, abs=0.003)  # ~5 std errors
    assert float(ss.checkerboard_share(z.view(1000, 4, 8, 8)).mean()) == pytest.approx(3 / 63, abs=0.003)


@pytest.mark.parametrize("shape", [(3, 2, 8, 6), (3, 2, 7, 9), (2, 3, 5, 4), (2, 1, 1, 6)])
def test_checkerboard_share_is_the_projection_onto_the_patterns_span(shape: tuple[int, ...]):
    """Against least squares on [1, (−1)^h, (−1)^w, (−1)^(h+w)], per tile, odd sides included."""
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    hh, ww = _grid(*shape[2:])
    design = torch.stack([torch.ones_like(hh), (-1) ** hh, (-1) ** ww, (-1) ** (hh + ww)]).flatten(1).T
    expected = []
    for tile in z.double():
        y = tile.flatten(1).T  # [H·W, C]
        fit = design @ torch.linalg.lstsq(design, y).solution
        expected.append(float((fit - y.mean(0)).square().sum() / (y - y.mean(0)).square().sum()))
    np.testing.assert_allclose(ss.checkerboard_share(z).numpy(), expected, rtol=1e-9)
    assert ss.checkerboard_share(z).dtype == torch.float64


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


# --- faithfulness ----------------------------------------------------------------------------------


def test_auc_of_hand_computed_sequences():
    # K = 4, points at 0, .25, .5, .75, 1: trapezoids .25·(1+.5)/2 + .25·(.5+.5)/2 + .25·(.5+0)/2 + 0
    scores = torch.tensor([[1.0, 0.5, 0.5, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3, 0.3]])
    expected = [0.25 * (1.5 / 2 + 1.0 / 2 + 0.5 / 2), 0.3]
    assert torch.allclose(auc(scores), torch.tensor(expected, dtype=torch.float64))
    # numpy in, numpy out; uneven fractions
    out = auc(np.array([0.0, 1.0, 1.0]), np.array([0.0, 0.1, 1.0]))
    assert isinstance(out, np.ndarray)
    assert math.isclose(float(out), 0.1 * 0.5 + 0.9 * 1.0)
    with pytest.raises(ValueError, match="at least 2 points"):
        auc(torch.ones(3, 1))


@pytest.mark.parametrize("ties", [False, True])
def test_spearman_matches_scipy_batched(ties: bool):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, 6, generator=g)
    b = 0.5 * a + torch.randn(5, 7, 6, generator=g)
    if ties:  # few distinct values: many ties, average ranks matter
        a, b = a.round(), (2 * b).round()
    rho = spearman(a, b)
    ref = [scipy.stats.spearmanr(x.flatten(), y.flatten()).statistic for x, y in zip(a, b, strict=True)]
    assert rho.dtype == torch.float64
    assert torch.allclose(rho, torch.tensor(ref, dtype=torch.float64), atol=1e-12)
    out = spearman(a.numpy(), b.numpy())
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, ref, atol=1e-12)


def test_spearman_known_values_and_undefined():
    x = torch.arange(10.0).view(1, 10)
    assert float(spearman(x, x**3)) == 1.0  # monotone: exactly 1
    assert float(spearman(x, -torch.exp(x))) == -1.0
    nan = spearman(torch.stack([x[0], torch.ones(10)]), torch.stack([x[0], x[0]]))
    assert float(nan[0]) == 1.0 and math.isnan(float(nan[1]))  # a constant map: undefined
    assert math.isnan(float(spearman(torch.tensor([[1.0, float("nan"), 2.0]]), x[:, :3])))
    with pytest.raises(ValueError, match="equal shapes"):
        spearman(torch.ones(2, 3), torch.ones(2, 4))


def test_relevance_mass_by_hand():
    maps = torch.tensor([[[3.0, -5.0], [1.0, 0.0]], [[-1.0, -2.0], [0.0, 0.0]]])
    region = torch.tensor([[[True, True], [False, False]], [[True, False], [False, False]]])
    out = relevance_mass(maps, region)
    # tile 0: positive parts 3, 0, 1, 0 → 3 of 4 inside; tile 1: no positive relevance → NaN
    assert math.isclose(float(out[0]), 0.75)
    assert math.isnan(float(out[1]))
    uniform = relevance_mass(np.ones((1, 4, 4)), np.eye(4, dtype=bool)[None])
    assert math.isclose(float(uniform[0]), 4 / 16)  # an even map scores the region's area


def test_region_fraction():
    mask = torch.tensor([[[0, 1], [1, 1]], [[2, 2], [2, 2]]])
    assert torch.allclose(
        region_fraction(mask, torch.tensor([1, 0])), torch.tensor([0.75, 0.0], dtype=torch.float64)
    )


def test_bootstrap_interval_is_seeded_and_close_to_scipy():
    rng = np.random.default_rng(3)
    values = rng.normal(0.2, 1.0, size=64)
    mean, low, high = bootstrap_mean_ci(values, seed=1)
    assert (mean, low, high) == bootstrap_mean_ci(values, seed=1)  # reproducible
    assert math.isclose(mean, values.mean()) and low < mean < high
    ref = scipy.stats.bootstrap(
        (values,), np.mean, confidence_level=0.95, method="percentile", n_resamples=10_000, rng=0
    ).confidence_interval
    # two independent Monte-Carlo estimates of the same percentiles (each off by ~0.03 SE here);
    # a wrong level (90 %) or spread would move them by > 0.3 SE
    se = values.std(ddof=1) / math.sqrt(values.size)
    assert abs(low - ref.low) < 0.2 * se and abs(high - ref.high) < 0.2 * se
    # the normal-theory interval is the same to within a few percent of its width here
    assert abs((high - low) - 2 * 1.96 * se) < 0.1 * (high - low)


def test_bootstrap_degenerate_cases():
    assert bootstrap_mean_ci(np.full(10, 0.5)) == (0.5, 0.5, 0.5)
    assert bootstrap_mean_ci(torch.tensor([float("nan"), 2.0])) == (2.0, 2.0, 2.0)  # NaN dropped
    assert all(math.isnan(v) for v in bootstrap_mean_ci(np.array([np.nan])))
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean_ci(np.ones(3), level=95)
