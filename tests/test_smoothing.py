"""Smoothing methods: the paper's Figure 1, what each method does to predictions and noise."""

from __future__ import annotations

import pytest
import torch
from helpers import ROOT, real_tiles
from helpers import model as build_model
from torch import nn

import smoothsal as ss
from smoothsal.smoothing import SHIFTS, ConvSpec, SurrogatePath


class Figure1Net(nn.Module):
    """A 1×1 stem conv (never changed), then the paper's stride-2 conv with [[1, 1], [1, −1]]."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 1, 1, stride=2, bias=False)
        self.down = nn.Conv2d(1, 1, 2, stride=2, bias=False)
        with torch.no_grad():
            self.stem.weight.fill_(1.0)
            self.down.weight.copy_(torch.tensor([[[[1.0, 1.0], [1.0, -1.0]]]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.stem(x))


def gradient_towards_conv_input(net: nn.Module) -> torch.Tensor:
    """∇ₓ Σ (x ∗ k) for the 16×16 input of ones that the stride-2 conv sees."""
    x = torch.ones(1, 1, 32, 32)  # the stride-2 stem turns it into the paper's 16×16 ones
    seen = {}

    def as_leaf(_module: nn.Module, inputs: tuple) -> tuple:
        seen["x"] = inputs[0].detach().requires_grad_()
        return (seen["x"],)

    handle = net.down.register_forward_pre_hook(as_leaf)
    net(x).sum().backward()
    handle.remove()  # a later copy of ``net`` (``smooth``) must not carry it
    return seen["x"].grad[0, 0]


def test_figure1_checkerboard_and_its_removal():
    net = Figure1Net()
    assert ss.downsampling_convs(net, torch.ones(1, 1, 32, 32)) == ["down"]
    grad = gradient_towards_conv_input(net)
    assert grad.shape == (16, 16)
    expected = torch.tensor([[1.0, 1.0], [1.0, -1.0]]).repeat(8, 8)
    assert torch.equal(grad, expected)  # the ±1 checkerboard
    smoothed = gradient_towards_conv_input(ss.smooth(net, "backward_hook"))
    assert torch.allclose(smoothed, torch.full((16, 16), 0.5))  # constant: (1 + 1 + 1 − 1) / 4


def test_downsampling_convs_found_by_tracing():
    names = {arch: ss.downsampling_convs(build_model(arch)) for arch in ss.ARCHITECTURES}
    assert names["resnet18"] == [
        "layer2.0.conv1", "layer2.0.downsample.0", "layer3.0.conv1",
        "layer3.0.downsample.0", "layer4.0.conv1", "layer4.0.downsample.0",
    ]  # fmt: skip
    assert names["resnet50"][:2] == ["layer2.0.conv2", "layer2.0.downsample.0"]
    assert len(names["resnet34"]) == 6
    assert names["monai_fc_resnet18"][0] == "features.5.0.conv1"
    assert names["unet_resnet34"] == [
        "encoder.layer2.0.conv1", "encoder.layer3.0.conv1", "encoder.layer4.0.conv1"
    ]  # fmt: skip


def test_smooth_never_mutates_the_given_model():
    net = build_model("resnet18")
    state = {k: v.clone() for k, v in net.state_dict().items()}
    types = {n: type(m) for n, m in net.named_modules()}
    surrogate = ss.SurrogatePaths.for_model(net)
    for method in ss.METHODS:
        smoothed = ss.smooth(net, method, surrogate=surrogate if method == "surrogate" else None)
        assert smoothed is not net
    assert {n: type(m) for n, m in net.named_modules()} == types
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_forward_hook_is_the_mean_of_four_rolled_convs():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    x = torch.randn(2, 4, 15, 17)
    expected = torch.stack([conv(torch.roll(x, s, (2, 3))) for s in SHIFTS]).mean(0)
    recast = ss.smoothing.ForwardHookConv2d(conv)
    assert torch.allclose(recast(x), expected, atol=1e-6)


class SameConv2d(nn.Conv2d):
    """A conv subclass with its own forward, like timm's ``Conv2dSame``: TF "same" padding computed from the
    input size at each call (asymmetric on odd sizes), then an unpadded conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return nn.functional.conv2d(nn.functional.pad(x, pads), self.weight, self.bias, self.stride)


def test_a_conv_subclass_keeps_its_own_forward_under_every_hook_method():
    """Issue 25: the methods wrap a downsampling conv instead of recasting its class, so a subclass's own
    forward (dynamic padding) still runs: the backward hook's logits equal the original's bit for bit, at an
    even and an odd input size, and the forward hook is the mean of the subclass conv over the four rolls."""
    torch.manual_seed(0)
    net = nn.Sequential(SameConv2d(3, 4, 3, stride=2), nn.ReLU(), SameConv2d(4, 5, 3, stride=2), nn.ReLU(),
                        SameConv2d(5, 6, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()  # fmt: skip
    assert ss.downsampling_convs(net, torch.zeros(1, 3, 64, 64)) == ["2", "4"]
    for size in (64, 45):
        x = torch.randn(2, 3, size, size)
        backward = ss.smooth(net, "backward_hook", example=x)
        assert type(backward[2].conv) is SameConv2d and torch.equal(backward(x), net(x))
        forward = ss.smooth(net, "forward_hook", example=x)
        inner = forward[:4](x)  # what the conv "4" sees in the smoothed model
        expected = torch.stack([net[4](torch.roll(inner, s, (2, 3))) for s in SHIFTS]).mean(0)
        assert torch.allclose(forward[:5](x), expected, atol=1e-6)


def test_a_network_that_downsamples_by_pooling_is_told_that_the_hooks_change_nothing(caplog):
    """Issue 25: a VGG-like net (stride-1 convs, max pooling) has nothing for a method to change: the hook
    methods say so in one warning line and return the original's function; the surrogate is refused."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()  # fmt: skip
    x = torch.randn(1, 3, 32, 32)
    for method in ("backward_hook", "forward_hook"):
        caplog.clear()
        smoothed = ss.smooth(net, method, example=x)
        assert torch.equal(smoothed(x), net(x))
        lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        expected = (
            f"{method} changes nothing in Sequential: it has no stride-2 conv after the stem (it downsamples "
            "by pooling or not at all), so its maps equal the original's"
        )
        assert lines == [expected]
    caplog.clear()
    ss.smooth(net, "original", example=x)
    assert not caplog.records  # the original is meant to change nothing
    with pytest.raises(ValueError, match="Sequential has no downsampling convs to replace"):
        ss.SurrogatePaths.for_model(net, x)


def test_backward_hook_gradient_is_the_roll_mean():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    weights = torch.randn(2, 6, 8, 8)
    (conv(x) * weights).sum().backward()
    plain = x.grad.clone()
    x.grad = None
    (ss.smoothing.BackwardHookConv2d(conv)(x) * weights).sum().backward()
    expected = torch.stack([torch.roll(plain, s, (2, 3)) for s in SHIFTS]).mean(0)
    assert torch.allclose(x.grad, expected, atol=1e-6)


@pytest.mark.parametrize("size", [(15, 17), (16, 16), (33, 8)])
def test_surrogate_output_size_equals_the_conv(size):
    for conv in (nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.Conv2d(3, 5, 1, stride=2)):
        x = torch.randn(1, 3, *size)
        assert SurrogatePath(ConvSpec.of(conv))(x).shape == conv(x).shape


def test_unknown_method_and_missing_surrogate_are_clear_errors():
    net = build_model("resnet18")
    with pytest.raises(
        ValueError, match="unknown method 'blur'; allowed: original, surrogate, backward_hook, forward_hook"
    ):
        ss.smooth(net, "blur")
    with pytest.raises(ValueError, match="surrogate"):
        ss.smooth(net, "surrogate")


def test_surrogate_for_another_model_is_refused():
    paths = ss.SurrogatePaths.for_model(build_model("resnet18"))
    with pytest.raises(ValueError, match="does not fit"):
        ss.smooth(build_model("resnet50"), "surrogate", surrogate=paths)


def test_predictions_and_total_variation_per_method(tiles_dir):
    """backward_hook keeps predictions exactly; forward_hook changes them; both lower TV."""
    net = build_model("resnet18", seed=3)
    x = real_tiles(tiles_dir, 112)
    layers = ["layer1", "layer2", "layer3"]
    target = torch.zeros(len(x), dtype=torch.long)
    outputs, tv = {}, {}
    for method in ("original", "backward_hook", "forward_hook"):
        smoothed = ss.smooth(net, method)
        with torch.no_grad():
            outputs[method] = smoothed(x)
        maps = ss.attribute(smoothed, x, layers=layers, target=target)
        tv[method] = {(a, l): float(ss.total_variation(maps[a][l]).mean()) for a in maps for l in layers}
    assert torch.equal(outputs["backward_hook"], outputs["original"])
    assert not torch.allclose(outputs["forward_hook"], outputs["original"], atol=1e-4)
    for key, original in tv["original"].items():
        assert tv["backward_hook"][key] < original, key
        assert tv["forward_hook"][key] < original, key


def test_train_surrogate_on_real_tiles(tiles_dir):
    """Each path's L1 error falls; the surrogate predicts closer to the original than forward_hook."""
    torch.manual_seed(0)
    net = build_model("resnet18", seed=1)
    x = real_tiles(tiles_dir, 64, per_tile=9)  # 36 real tiles
    batches = [x[i : i + 12] for i in range(0, len(x), 12)]
    losses: dict[str, list[float]] = {}

    def record(_epoch: int, _step: int, step_losses: dict[str, float]) -> None:
        for name, value in step_losses.items():
            losses.setdefault(name, []).append(value)

    paths = ss.train_surrogate(net, batches, epochs=8, on_step=record)
    assert set(losses) == set(ss.downsampling_convs(net))
    for name, values in losses.items():
        assert sum(values[-3:]) < 0.6 * sum(values[:3]), name
    with torch.no_grad():
        p = {m: ss.probabilities(ss.smooth(net, m, surrogate=paths if m == "surrogate" else None)(x))
             for m in ("original", "surrogate", "forward_hook")}  # fmt: skip
    target = p["original"].argmax(1)
    diff_sur, _ = ss.prediction_difference(p["original"], p["surrogate"], target)
    diff_fwd, _ = ss.prediction_difference(p["original"], p["forward_hook"], target)
    assert diff_sur.mean() < diff_fwd.mean()
    assert not paths.training


def test_a_path_started_at_its_conv_is_that_conv_averaged_2x2():
    """``start_from``: pre = the conv's weights at stride 1, post = identity; a bias-free 1×1 shortcut
    and a conv with a bias too; convs ``pre`` cannot hold (7×7, reflect padding) keep their random
    init and are not named (with a warning)."""
    torch.manual_seed(0)
    net = build_model("resnet18", seed=2)
    paths = ss.SurrogatePaths.for_model(net)
    started = paths.start_from(net)
    assert started == ss.downsampling_convs(net)  # layer{2,3,4}.0.conv1 (3×3) and .downsample.0 (1×1)
    for name in ("layer2.0.conv1", "layer2.0.downsample.0"):
        conv = net.get_submodule(name)
        x = torch.randn(2, conv.in_channels, 16, 16)
        stride1 = nn.functional.conv2d(x, conv.weight, conv.bias, padding=conv.padding)
        with torch.no_grad():
            torch.testing.assert_close(paths.path(name)(x), nn.functional.avg_pool2d(stride1, 2))
    biased = nn.Conv2d(8, 16, 3, stride=2, padding=1)  # with a bias; an odd size: resampled, not averaged
    path = SurrogatePath(ConvSpec.of(biased))
    assert path.start_from(biased)
    x = torch.randn(2, 8, 15, 15)
    stride1 = nn.functional.conv2d(x, biased.weight, biased.bias, padding=1)
    with torch.no_grad():
        started = path(x)
        resampled = nn.functional.interpolate(stride1, size=(8, 8), mode="bilinear", align_corners=False)
        torch.testing.assert_close(started, resampled)
        assert started.shape == biased(x).shape
    for conv in (net.conv1, nn.Conv2d(8, 16, 3, stride=2, padding=1, padding_mode="reflect")):
        path = SurrogatePath(ConvSpec.of(conv))  # 7×7 (padding 3), reflect padding: not a 3×3 path's
        before = [t.clone() for t in path.parameters()]
        assert not path.start_from(conv)
        assert all(torch.equal(a, b) for a, b in zip(before, path.parameters(), strict=True))
    wide = build_model("resnet18")
    wide.layer2[0].conv1 = nn.Conv2d(64, 128, 5, stride=2, padding=2, bias=False)
    wide_paths = ss.SurrogatePaths.for_model(wide)
    with pytest.warns(UserWarning, match="^layer2.0.conv1: kept a random init"):
        started = wide_paths.start_from(wide)
    assert started == ss.downsampling_convs(wide)[1:]


@pytest.mark.parametrize("groups", [4, 16])
def test_a_grouped_or_depthwise_conv_starts_as_its_block_diagonal_dense_path(groups):
    """Issue 25: the surrogate path is dense; a grouped conv (and a depthwise one, groups = channels) starts
    as the same conv at stride 1 averaged 2×2, exactly, with zeros between the groups."""
    conv = nn.Conv2d(16, 16 if groups == 16 else 32, 3, stride=2, padding=1, groups=groups)
    path = SurrogatePath(ConvSpec.of(conv))
    assert path.start_from(conv)
    x = torch.randn(2, 16, 16, 16)
    stride1 = nn.functional.conv2d(x, conv.weight, conv.bias, padding=1, groups=groups)
    with torch.no_grad():
        torch.testing.assert_close(path(x), nn.functional.avg_pool2d(stride1, 2))
    per_out, per_in = conv.out_channels // groups, 16 // groups
    assert not path.pre.weight[:per_out, per_in:].any()  # no cross-group term at the start


def test_train_surrogate_refuses_a_one_shot_iterator():
    net = build_model("resnet18")
    with pytest.raises(ValueError, match="one-shot iterator"):
        ss.train_surrogate(net, (torch.randn(2, 3, 32, 32) for _ in range(3)), epochs=2)


def test_the_method_registry_is_the_config_schemas_list():
    """Every stage, table and figure takes names, labels and colours from one registry; the workflow's
    config accepts exactly these methods, in this order."""
    import yaml
    from matplotlib.colors import is_color_like

    from smoothsal.smoothing import method_info

    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert list(ss.METHODS) == schema["properties"]["methods"]["items"]["enum"]
    infos = [method_info(m) for m in ss.METHODS]
    assert [i.name for i in infos] == list(ss.METHODS) and len({i.label for i in infos}) == len(infos)
    assert all(is_color_like(i.colour) for i in infos) and len({i.colour for i in infos}) == len(infos)
    net = build_model("resnet18")
    paths = ss.SurrogatePaths.for_model(net)
    for info in infos:
        built = info.build(net, paths if info.needs_surrogate else None)
        kinds = {type(built.get_submodule(n)).__name__ for n in ss.downsampling_convs(net)}
        assert kinds == {
            "original": {"Conv2d"}, "surrogate": {"SurrogatePath"},
            "backward_hook": {"BackwardHookConv2d"}, "forward_hook": {"ForwardHookConv2d"},
        }[info.name]  # fmt: skip
    with pytest.raises(ValueError, match="unknown methods \\['a', 'b'\\]; allowed: original"):
        ss.smoothing.check_methods(["a", "original", "b"])


def test_a_conv_that_pads_itself_to_same_gets_a_path_of_its_output_size():
    """Issue 25: timm's Conv2dSame (all tf_* models) pads dynamically, so its output is ceil(n / 2) where
    nn.Conv2d's rule gives less; the spec measures that, and the path's output fits the conv's at every size."""
    layers = pytest.importorskip("timm.layers")
    conv = layers.Conv2dSame(8, 16, 3, stride=2)
    spec = ConvSpec.of(conv)
    assert spec.same and not ConvSpec.of(nn.Conv2d(8, 16, 3, stride=2)).same
    path = SurrogatePath(spec)
    for n in (15, 16, 31, 64):
        x = torch.randn(1, 8, n, n)
        with torch.no_grad():
            assert path(x).shape == conv(x).shape, n


def test_backward_hook_keeps_a_channels_last_batch_of_one_bit_for_bit():
    """A batch of one in channels_last strides (ConvNeXt's LayerNorm2d gives one): the conv sees the same
    strides, so it takes the same kernel and its output keeps every bit."""
    torch.manual_seed(0)
    conv = nn.Conv2d(96, 192, 2, 2)
    x = torch.randn(1, 16, 16, 96).permute(0, 3, 1, 2)  # channels_last, batch stride 24576
    with torch.no_grad():
        assert torch.equal(ss.smoothing.BackwardHookConv2d(conv)(x), conv(x))
