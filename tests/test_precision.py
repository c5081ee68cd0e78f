"""attribute(precision="bf16") against fp32: on a classifier trained on demo tiles the maps look the same
(centred cosine, relative error, TV of the channel-summed maps per tile); known answers for the bf16
DeepLift rule; the given model is never changed."""

from __future__ import annotations

import pytest
import torch
from helpers import CPU_SMOOTHGRAD, agreement, missed
from helpers import model as build_model
from torch import nn

import smoothsal as ss
from smoothsal.attribution import CPU_MAX_BATCH
from smoothsal.deviation import centred_cosine, relative_error
from smoothsal.errors import BadOption
from smoothsal.metrics import prediction_difference, probabilities
from smoothsal.precision import forward


def test_measures_known_answers():
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert float(centred_cosine(a, 3 * a + 7)) == pytest.approx(1.0)  # scale and offset do not count
    assert float(centred_cosine(a, -a)) == pytest.approx(-1.0)
    assert float(centred_cosine(a, a.flip(-1).flip(-2))) == pytest.approx(-1.0)
    assert float(relative_error(a * 1.1, a)) == pytest.approx(0.1)


def test_bf16_maps_look_like_fp32_on_a_trained_classifier(trained):
    """SmoothGrad maps with n = 4 (on CPUs without AMX bf16 is emulated and the test costs
    minutes; the GPU test uses n = 10), both attributions, every method at layer1-3. Measured with n = 10:
    cosine >= 0.985 (gradient, layer1) and >= 0.9999 (DeepLift); relative error median <= 1 % (DeepLift)
    and <= 12 % (gradient); TV within 0.2 %. n = 4 met the gates on an AVX2 EPYC too."""
    rows = agreement(*trained, CPU_SMOOTHGRAD)
    assert not missed(rows)


def test_bf16_deeplift_without_smoothgrad_looks_like_fp32(trained):
    """One pass per tile, no noise to average over: DeepLift still meets the gates (measured: cosine
    >= 0.9998, relative error median <= 1.5 %). The plain gradient of this classifier does not (cosine
    down to 0.95, relative error ~25 % at layer1): rounding only the stem's weights to bf16, in fp32
    arithmetic, moves it by 19 %, so no arithmetic short of fp32 weights can follow it."""
    rows = agreement(*trained, None, attributions=("deeplift",))
    assert not missed(rows)


def test_bf16_leaves_the_model_alone_and_follows_its_weights(trained):
    model, _, x = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    hooks = [
        (dict(m._forward_hooks), dict(m._forward_pre_hooks), vars(m).get("forward")) for m in model.modules()
    ]
    first = ss.attribute(model, x[:2], layers="layer2", target=1, precision="bf16")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) and state[k].dtype == v.dtype for k, v in before.items())
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(p.is_contiguous() for p in model.parameters())  # no channels_last left behind
    assert [
        (dict(m._forward_hooks), dict(m._forward_pre_hooks), vars(m).get("forward")) for m in model.modules()
    ] == hooks
    changed = build_model("resnet18")  # a model of the same shape, then trained weights loaded in place
    changed.fc = nn.Linear(512, 2)
    changed.eval()
    ss.attribute(changed, x[:1], layers="layer2", target=1, precision="bf16")  # caches its own copy
    changed.load_state_dict(model.state_dict())
    again = ss.attribute(changed, x[:2], layers="layer2", target=1, precision="bf16")
    for a in ss.ATTRIBUTIONS:
        assert torch.equal(first[a]["layer2"], again[a]["layer2"])


class _Difference(nn.Module):
    """x (2 channels) → a = x (1×1 conv) → z = a₀ − a₁ + b → relu → 3 · sum: DeepLift's answer is known."""

    def __init__(self, bias: float):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 1, bias=False)
        self.b = nn.Conv2d(2, 1, 1)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(1, 1, 1, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            self.b.weight.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))
            self.b.bias.fill_(bias)
            self.head.weight.fill_(3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.b(self.a(x))))


@pytest.mark.parametrize("bias", [0.5, -0.5, 0.0])
def test_bf16_deeplift_rule_known_answers(bias):
    """At layer a, DeepLift = a · 3 · m · (1, −1) with m = (relu(z) − relu(z₀)) / (z − z₀), and the plain
    derivative relu'(z₀) where z = z₀ (here also where a ≠ 0): both signs, across zero, at zero. The
    inputs are exact in bf16, so bf16 must give these to the rounding of the multiplier."""
    net = _Difference(bias).eval()
    x0 = torch.tensor([-6.0, -2.0, -1.0, -0.25, 0.0, 0.25, 1.0, 2.0, 6.0])
    x1 = torch.tensor([-6.0, 0.0, -1.0, 0.5, 0.0, 0.25, 0.0, 2.0, 0.0])
    x = torch.stack([x0, x1]).view(1, 2, 3, 3)
    z0 = torch.tensor(bias)
    delta = (x0 - x1).view(1, 1, 3, 3)
    z = delta + bias
    rescale = (torch.relu(z) - torch.relu(z0)) / delta.where(delta != 0, 1)
    m = torch.where(delta == 0, (z0 > 0).float(), rescale)
    expected = x * 3 * m * torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)
    assert (x[:, :1] != 0)[delta == 0].any() and (bias == 0 or ((m > 0) & (m < 1)).any())
    for precision, tol in (("fp32", 1e-6), ("bf16", 2**-7)):
        out = ss.attribute(net, x, layers="a", target=0, attributions=("deeplift",), precision=precision)
        got = out["deeplift"]["a"]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol * float(expected.abs().max()))


class _ConvBatchNorm(nn.Module):
    """x → y = conv(x) = x → z = bn(y) = 4y (+ y if ``shared``) → relu → 3 · sum: exact in bf16."""

    def __init__(self, shared: bool):
        super().__init__()
        self.shared = shared
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=0.0)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(1, 1, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.bn.running_var.fill_(0.25)
            self.bn.weight.fill_(2.0)
            self.head.weight.fill_(3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.bn(y) + y if self.shared else self.bn(y)
        return self.head(self.relu(z))


def test_batchnorm_folding_never_changes_what_is_asked_for():
    """bf16 folds each BatchNorm into the conv before it, except where that would change the answer: a
    conv that is itself a layer (its gradient is 4× the BatchNorm output's), and a conv whose output is
    also used beside the BatchNorm."""
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 2, 3)
    for precision in ("fp32", "bf16"):
        conv = ss.attribute(_ConvBatchNorm(False).eval(), x, layers="conv", target=0, precision=precision)
        torch.testing.assert_close(conv["gradient"]["conv"], 12.0 * (x > 0), rtol=0, atol=0)
        shared = ss.attribute(_ConvBatchNorm(True).eval(), x, layers="relu", target=0, precision=precision)
        torch.testing.assert_close(shared["deeplift"]["relu"], 3.0 * torch.relu(5 * x), rtol=0, atol=0)


def test_forward_in_a_precision_is_the_models_output_to_its_rounding(trained):
    model, _, x = trained
    with torch.no_grad():
        ref = model(x)
    assert torch.equal(forward(model, x), ref)
    low = forward(model, x, "bf16")
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))
    assert (low.argmax(1) == ref.argmax(1)).float().mean() >= 0.75


def test_bf16_prediction_difference_noise_floor(trained):
    """What bf16 predictions add to the prediction difference (DESIGN §1, all classes): the trained
    classifier against its own bf16 forward (the floor), and each smoothing method's difference to the
    original in bf16 against the same in fp32 (both printed; bounds: floor <= 0.01, shift <= 0.02)."""
    model, surrogate, x = trained
    ref = forward(model, x)
    floor = prediction_difference(
        probabilities(ref), probabilities(forward(model, x, "bf16")), ref.argmax(1)
    )[0]
    print(
        f"bf16 prediction-difference floor: median {float(floor.median()):.5f}, max {float(floor.max()):.5f}"
    )
    assert float(floor.max()) <= 0.01
    for method in ss.METHODS[1:]:
        net = ss.smooth(model, method, surrogate=surrogate if method == "surrogate" else None)
        pds = {}
        for p in ("fp32", "bf16"):
            original = probabilities(forward(model, x, p))
            pds[p] = prediction_difference(original, probabilities(forward(net, x, p)), ref.argmax(1))[0]
        shift = (pds["bf16"] - pds["fp32"]).abs()
        print(
            f"{method}: pd fp32 median {float(pds['fp32'].median()):.4f}, bf16 − fp32 max {float(shift.max()):.5f}"
        )
        assert float(shift.max()) <= 0.02


def test_bad_precision_and_max_batch_name_the_allowed_values():
    net = build_model("resnet18")
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(BadOption, match="allowed: fp32, tf32, bf16"):
        ss.attribute(net, x, layers="layer1", target=0, precision="fp16")
    with pytest.raises(BadOption, match="'tf32' needs a CUDA device"):
        ss.attribute(net, x, layers="layer1", target=0, precision="tf32")
    for bad in (0, "big", 2.5):
        with pytest.raises(BadOption, match="max_batch must be an integer >= 1 or 'auto'"):
            ss.attribute(net, x, layers="layer1", target=0, max_batch=bad)


def test_auto_max_batch_on_cpu_is_the_fixed_default():
    net = build_model("resnet18")
    x = torch.randn(3, 3, 32, 32)
    sg = ss.SmoothGrad(12, 0.2)
    auto = ss.attribute(net, x, layers="layer2", target=0, smoothgrad=sg, noise_seeds=[1, 2, 3])
    fixed = ss.attribute(
        net, x, layers="layer2", target=0, smoothgrad=sg, noise_seeds=[1, 2, 3], max_batch=CPU_MAX_BATCH
    )
    for a in ss.ATTRIBUTIONS:
        assert torch.equal(auto[a]["layer2"], fixed[a]["layer2"])
