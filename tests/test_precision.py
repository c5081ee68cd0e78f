"""attribute(precision="bf16") against fp32: on a classifier trained on demo tiles the maps look the same
(centred cosine, relative error, TV of the channel-summed maps per tile); known answers for the bf16
DeepLift rule; the given model is never changed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest
import torch
from helpers import model as build_model
from torch import nn

import smoothsal as ss
from smoothsal import demo
from smoothsal.attribution import CPU_MAX_BATCH
from smoothsal.cli import main
from smoothsal.metrics import total_variation
from smoothsal.precision import forward

LAYERS = ("layer1", "layer2", "layer3")
SLIDE_SIZE = 1024  # level-0 px (0.5 µm/px): ~30 tiles of 64 px at 1 µm/px per slide
CROP = 128  # px at 1 µm/px (slide level 1): layer3 maps of 8 × 8
TILES_PER_SLIDE = 4
SMOOTHGRAD = ss.SmoothGrad(10, 0.2)  # the paper's σ; half its samples (20), to keep the test short
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def crops(slide: Path, table: pd.DataFrame, n: int) -> torch.Tensor:
    """``n`` normalised CROP-px crops at level 1, spread over the tiles of ``table`` (tumour first)."""
    rows = table.sort_values("label", ascending=False, kind="stable")
    rows = rows.iloc[np.linspace(0, len(rows) - 1, n).round().astype(int)]
    out = []
    with openslide.OpenSlide(slide) as reader:
        assert reader.level_downsamples[1] == pytest.approx(2.0)
        width, height = reader.dimensions
        for x, y in rows[["x", "y"]].to_numpy(int):
            x, y = min(x, width - 2 * CROP), min(y, height - 2 * CROP)
            rgb = np.asarray(reader.read_region((int(x), int(y)), 1, (CROP, CROP)).convert("RGB"))
            out.append(torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1))
    return (torch.stack(out) - MEAN) / STD


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, ss.SurrogatePaths, torch.Tensor]:
    """The demo test's classifier (ResNet18, 2 epochs on tumor_001 + normal_001, 64-px tiles), a surrogate
    trained for it, and crops of both slides."""
    out = tmp_path_factory.mktemp("precision")
    names = ("tumor_001", "normal_001")
    data = ["demo-data", "--out", str(out), "--size", str(SLIDE_SIZE), "--no-progress"]
    assert main([*data, "--slides", *names]) == 0
    tables, x = [], []
    for name in names:
        slide, annotation, _ = demo.slide_paths(out, next(s for s in demo.DEMO_SLIDES if s.name == name))
        table = out / f"{name}.parquet"
        args = ["tiles", str(slide), "--annotations", str(annotation), "--out", str(table)]
        assert main([*args, "--tile-size", "64", "--target-mpp", "1.0"]) == 0
        tables.append(str(table))
        x.append(crops(slide, pd.read_parquet(table), TILES_PER_SLIDE))
    checkpoint = out / "model.pt"
    args = ["train-model", "--arch", "resnet18", "--num-classes", "2", "--tiles", *tables, "--epochs", "2"]
    assert main([*args, "--batch-size", "16", "--out", str(checkpoint), "--no-progress"]) == 0
    model = ss.load_model("resnet18", num_classes=2, checkpoint=checkpoint)
    x = torch.cat(x)
    surrogate = ss.train_surrogate(model, [x[:4], x[4:]], epochs=2)
    return model, surrogate, x


def centred_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per tile: cosine of the mean-free maps (1 = the same picture up to a positive scale)."""
    a, b = a.flatten(1), b.flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per tile: ‖ours − ref‖₂ / ‖ref‖₂."""
    return (ours - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-30)


def test_measures_known_answers():
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert float(centred_cosine(a, 3 * a + 7)) == pytest.approx(1.0)  # scale and offset do not count
    assert float(centred_cosine(a, -a)) == pytest.approx(-1.0)
    assert float(centred_cosine(a, a.flip(-1).flip(-2))) == pytest.approx(-1.0)
    assert float(relative_error(a * 1.1, a)) == pytest.approx(0.1)


_SMOOTHED: dict[tuple, tuple[nn.Module, nn.Module]] = {}


def smoothed(model: nn.Module, surrogate: ss.SurrogatePaths, method: str, device: str) -> nn.Module:
    """``model`` smoothed by ``method`` on ``device``, made once (attribute caches its converted copies
    and baselines with it, so the tests after the first do not pay for them again)."""
    key = (id(model), method, device)
    if key not in _SMOOTHED:
        net = ss.smooth(model, method, surrogate=surrogate if method == "surrogate" else None).to(device)
        _SMOOTHED[key] = (model, net)  # the model kept alive: its id stays its own
    return _SMOOTHED[key][1]


def agreement(
    model, surrogate, x, smoothgrad, attributions=ss.ATTRIBUTIONS, device="cpu", low="bf16"
) -> list[tuple]:
    """(method, attribution, layer, cosine min, median, relative error median, max, TV change) of
    precision ``low`` against fp32 on ``device``, per tile on the channel-summed maps (TV on the maps,
    mean over tiles)."""
    rows = []
    seeds = list(range(len(x))) if smoothgrad else None
    for method in ss.METHODS:
        net = smoothed(model, surrogate, method, device)
        args = {"layers": LAYERS, "target": 1, "attributions": attributions, "smoothgrad": smoothgrad}
        maps = {
            p: ss.attribute(net, x.to(device), **args, noise_seeds=seeds, precision=p) for p in ("fp32", low)
        }
        for a in attributions:
            for layer in LAYERS:
                ref, lower = maps["fp32"][a][layer].cpu(), maps[low][a][layer]
                assert lower.dtype == torch.float32 and lower.shape == ref.shape
                lower = lower.cpu()
                cos = centred_cosine(lower.sum(1), ref.sum(1))
                rel = relative_error(lower.sum(1), ref.sum(1))
                tv = float(total_variation(lower).mean() / total_variation(ref).mean() - 1)
                rows.append((method, a, layer, cos.min(), cos.median(), rel.median(), rel.max(), tv))
    print(
        *(
            f"{m:14s} {a:9s} {l}: cosine min {c:.4f} median {cm:.4f}, relative error median {r:.4f} "
            f"max {rm:.4f}, TV {tv:+.2%}"
            for m, a, l, c, cm, r, rm, tv in rows
        ),
        sep="\n",
    )
    return rows


def missed(rows: list[tuple]) -> list[tuple]:
    """The rows that miss a gate: cosine median >= 0.98 and min >= 0.95, mean TV within 2 %, and for
    DeepLift a median relative error <= 3 %."""
    return [
        r
        for r in rows
        if not (r[4] >= 0.98 and r[3] >= 0.95 and abs(r[7]) <= 0.02 and (r[1] != "deeplift" or r[5] <= 0.03))
    ]


def test_bf16_maps_look_like_fp32_on_a_trained_classifier(trained):
    """SmoothGrad maps, both attributions, every method at layer1-3. Measured here: cosine >= 0.985
    (gradient, layer1) and >= 0.9999 (DeepLift); relative error median <= 1 % (DeepLift) and <= 12 %
    (gradient); TV within 0.2 %."""
    rows = agreement(*trained, SMOOTHGRAD)
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


def test_bad_precision_and_max_batch_name_the_allowed_values():
    net = build_model("resnet18")
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="allowed: fp32, tf32, bf16"):
        ss.attribute(net, x, layers="layer1", target=0, precision="fp16")
    with pytest.raises(ValueError, match="'tf32' needs a CUDA device"):
        ss.attribute(net, x, layers="layer1", target=0, precision="tf32")
    for bad in (0, "big", 2.5):
        with pytest.raises(ValueError, match="max_batch must be an integer >= 1 or 'auto'"):
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
