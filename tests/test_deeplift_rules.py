"""One-pass DeepLift with Captum's rules for other nonlinearities (smoothsal/deeplift.py) against Captum's
LayerDeepLift and LayerGradientXActivation, under the fp64-grounded rule of tests/reference.py."""

from __future__ import annotations

import pytest
import torch
import torchvision
from reference import assert_fp32_within, assert_fp64_agrees, captum_pair, fp32_bound
from torch import nn

import smoothsal as ss
from smoothsal.deeplift import deeplift_rules
from smoothsal.deviation import centred_cosine

# (module after the requested layer "conv", the rule it gets)
ACTIVATIONS = [
    (nn.Sigmoid(), "rescale"),
    (nn.Tanh(), "rescale"),
    (nn.ELU(inplace=True), "rescale"),
    (nn.LeakyReLU(0.1), "rescale"),
    (nn.Softplus(beta=2.0), "rescale"),
    (nn.MaxPool2d(3, stride=2, padding=1), "maxpool"),  # overlapping windows
    (nn.MaxPool2d(2), "maxpool"),
    (nn.SiLU(), "gradient"),
    (nn.GELU(), "gradient"),
    (nn.Hardswish(), "gradient"),
    (nn.Hardsigmoid(), "gradient"),
    (nn.GroupNorm(1, 8), "gradient"),  # LayerNorm over (C, H, W)
]
TARGET = torch.tensor([1, 3])


class TinyCNN(nn.Module):
    """stem → conv (the requested layer) → ``act`` → conv → ReLU → head, BatchNorm with random statistics."""

    def __init__(self, act: nn.Module):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.act = act
        self.tail = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
        bn = self.stem[1]
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tail(self.act(self.conv(self.stem(x)))))


def assert_equals_captum(
    model, x, layer: str | list[str], attributions=ss.ATTRIBUTIONS, what="", smoothgrad=None, target=TARGET
):
    """smoothsal equals Captum under the fp64-grounded rule at ``layer`` (or at each of several layers, all
    requested in one ``attribute`` call)."""
    layers = [layer] if isinstance(layer, str) else layer
    noise = {"samples": smoothgrad.samples, "stdev": smoothgrad.stdev, "seed": 7} if smoothgrad else {}
    kwargs = {"layers": layers, "target": target, "attributions": attributions, "smoothgrad": smoothgrad}
    ours = {p: ss.attribute(model, x, precision=p, **kwargs) for p in ("fp32", "fp64")}
    for name in layers:
        for a in attributions:
            c32, c64 = captum_pair(model, x, name, target, a, **noise)
            o32, o64 = ours["fp32"][a][name], ours["fp64"][a][name]
            assert o32.shape == c32.shape and o32.dtype == torch.float32
            assert_fp64_agrees(o64, c64, (what, name, a))
            assert_fp32_within(o32, o64, fp32_bound(c32, c64), (what, name, a))


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize("act,rule", ACTIVATIONS, ids=[f"{type(a).__name__}-{r}" for a, r in ACTIVATIONS])
def test_deeplift_and_gradient_equal_captum_after_each_nonlinearity(act, rule, x):
    net = TinyCNN(act)
    assert deeplift_rules(net, "conv", x) == {"act": rule, "tail.1": "rescale"}
    assert_equals_captum(net, x, "conv", what=type(act).__name__)


def test_deeplift_with_smoothgrad_equals_captums_noise_tunnel(x):
    net = TinyCNN(nn.MaxPool2d(3, stride=2, padding=1))
    assert_equals_captum(net, x, "conv", smoothgrad=ss.SmoothGrad(3, 0.2, seed=7), what="smoothgrad")


@pytest.mark.parametrize(
    "act",
    [
        nn.Sequential(nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1)),  # rule module fed by a rule module
        nn.Sequential(nn.MaxPool2d(2), nn.SiLU()),  # the baseline's own gradient reaches the pool
    ],
    ids=["relu-maxpool", "maxpool-silu"],
)
def test_maxpool_combinations_equal_captum(act, x):
    """Captum's hooks: a rule module fed directly by another sees the other's gradient before its rule,
    and MaxPool uses the gradient of the baseline's half: the paired pass reproduces both."""
    assert_equals_captum(TinyCNN(act), x, "conv", attributions=("deeplift",), what=act)


def test_a_subclass_gets_no_rule_as_in_captum(x):
    """Captum matches rules by exact class: a subclass of nn.Sigmoid is differentiated plainly."""

    class MySigmoid(nn.Sigmoid):
        pass

    net = TinyCNN(MySigmoid())
    assert deeplift_rules(net, "conv", x)["act"] == "gradient"
    assert_equals_captum(net, x, "conv", attributions=("deeplift",), what="subclass")


class _Functional(TinyCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tail(torch.sigmoid(self.conv(self.stem(x)))))


def test_functional_calls_are_recorded_as_gradient(x):
    net = _Functional(nn.Identity())
    assert deeplift_rules(net, "conv", x) == {"_Functional:sigmoid": "gradient", "tail.1": "rescale"}
    assert_equals_captum(net, x, "conv", attributions=("deeplift",), what="functional")


def test_what_cannot_match_captum_is_refused_in_one_line(x):
    softmax = TinyCNN(nn.Softmax(dim=1))
    with pytest.raises(ValueError, match="Softmax 'act' runs after layer 'conv'.*whole batch"):
        ss.attribute(softmax, x, layers="conv", target=TARGET)
    ss.attribute(softmax, x, layers="conv", target=TARGET, attributions=("gradient",))  # the gradient is fine
    shared = nn.Sigmoid()
    twice = TinyCNN(nn.Sequential(shared, nn.Conv2d(8, 8, 1), shared))
    with pytest.raises(ValueError, match="Sigmoid 'act.0' runs 2 times in one forward"):
        ss.attribute(twice, x, layers="conv", target=TARGET)


@pytest.mark.parametrize(
    "act", [nn.Sigmoid(), nn.MaxPool2d(3, stride=2, padding=1)], ids=["sigmoid", "maxpool"]
)
def test_bf16_maps_after_sigmoid_and_maxpool_are_close_to_fp32(act, x):
    """Centred cosine of the channel-summed maps >= 0.99 (measured >= 0.9989). Sigmoid then MaxPool in one
    model falls to ~0.94 in the gradient too: bf16 rounds sigmoid outputs near 0.5 to 2⁻⁹ and MaxPool's
    argmax then picks other pixels, which no rule changes."""
    net = TinyCNN(act)
    out = {p: ss.attribute(net, x, layers="conv", target=TARGET, precision=p) for p in ("fp32", "bf16")}
    for a in ss.ATTRIBUTIONS:
        low, ref = out["bf16"][a]["conv"], out["fp32"][a]["conv"]
        assert low.dtype == torch.float32 and torch.isfinite(low).all()
        cosine = centred_cosine(low.sum(1), ref.sum(1))
        assert float(cosine.min()) >= 0.99, (a, cosine)


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2, 2), nn.AvgPool2d(2, 2)], ids=["maxpool", "avgpool"])
@pytest.mark.parametrize("layers", [["1", "3"], ["0", "2"]], ids=["relus", "convs"])
def test_a_deeper_layer_requested_with_a_shallower_one_equals_captum(pool, layers):
    """Regression: a deeper layer whose output feeds a rule module (the MaxPool after ReLU "3", the
    ReLU after conv "2") got its gradient before that rule's hook when a shallower layer was requested
    too (autograd.grad returns a non-leaf's gradient before its hooks when its node also runs)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        pool, nn.Flatten(), nn.Linear(64, 5),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    assert_equals_captum(model, x, layers, what=pool)


# --- real families ----------------------------------------------------------------------------


def test_efficientnet_b0_se_sigmoid_and_silu_equal_captum():
    net = torchvision.models.efficientnet_b0(weights=None, num_classes=5).eval()
    torch.manual_seed(2)
    x = torch.randn(1, 3, 64, 64)
    rules = deeplift_rules(net, "features.3", x)
    assert rules["features.4.0.block.2.scale_activation"] == "rescale"  # the SE block's nn.Sigmoid
    assert rules["features.4.0.block.0.2"] == "gradient"  # nn.SiLU
    assert set(rules.values()) == {"rescale", "gradient"}
    assert_equals_captum(net, x, "features.3", what="efficientnet_b0", target=TARGET[:1])


def test_googlenet_maxpools_equal_captum():
    """Each inception's input feeds a MaxPool branch and three conv branches: Captum's MaxPool hook
    replaces the input's whole gradient. (init_weights=True, std 0.01, leaves maps ~1e-15, below
    DeepLift's eps: He-initialised convs give a real signal.)"""
    torch.manual_seed(3)
    raw = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False, num_classes=5)
    for module in raw.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    x = torch.randn(1, 3, 64, 64)
    net = ss.canonicalise(raw.eval(), x[:1])  # BasicConv2d calls F.relu
    rules = deeplift_rules(net, "inception3b", x)
    assert rules["maxpool3"] == "maxpool" and rules["inception4a.branch4.0"] == "maxpool"
    assert set(rules.values()) == {"rescale", "maxpool"}
    assert_equals_captum(net, x, "inception3b", ("deeplift",), what="googlenet", target=TARGET[:1])
