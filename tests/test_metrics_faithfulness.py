"""The faithfulness measures of smoothsal.metrics against hand-computed values and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from smoothsal.metrics import auc, bootstrap_mean_ci, region_fraction, relevance_mass, spearman


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
