"""Temporary hooks: they act inside the block and are gone after it, also when the forward raises."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smoothsal.hooks import Hooks


def ones_model() -> nn.Sequential:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    nn.init.ones_(model[0].weight)
    nn.init.zeros_(model[0].bias)
    return model  # ones in → 9 everywhere out


def test_hooks_act_inside_the_block_and_are_removed_after_it():
    model, x = ones_model(), torch.ones(1, 1, 5, 5)
    seen = []
    with Hooks() as hooks:
        hooks.forward_pre(model[0], lambda m, i: seen.append(tuple(i[0].shape)))
        hooks.forward(model[1], lambda m, i, o: o * 0)  # a forward hook may replace the output
        assert len(hooks) == 2
        assert torch.equal(model(x), torch.zeros(1, 2, 3, 3)) and seen == [(1, 1, 5, 5)]
    assert len(hooks) == 0
    assert torch.equal(model(x), torch.full((1, 2, 3, 3), 9.0)) and seen == [(1, 1, 5, 5)]  # both gone


def test_hooks_are_removed_when_the_block_raises():
    model, x = ones_model(), torch.ones(1, 1, 5, 5)

    def fail(_m, _i, _o):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"), Hooks() as hooks:
        hooks.forward(model[0], fail)
        model(x)
    assert len(hooks) == 0 and torch.equal(model(x), torch.full((1, 2, 3, 3), 9.0))
