"""The family matrix: every claim of the method checked on eight CNN families and a small U-Net, with
random weights (nothing downloads) at 64 px.

Per family: fp32 gradient and DeepLift at each stage alias (``layer1``…``layer3``: the outputs at 1/4,
1/8, 1/16 of the input) equal Captum's under the fp64-grounded rule (tests/reference.py); the backward
hook keeps the logits bit for bit; each downsampling op that smoothing says it changes really changes
(its output under the forward hook, its input gradient under the backward hook); bf16 stays within the
deviation gates on briefly trained weights (random weights fail them by design).

Today's stage aliases come from name patterns (ResNet's ``layerK``) and one-pass DeepLift refuses a
Sigmoid or MaxPool after the layer: the cases that need resolution-based aliases or those DeepLift rules
are strict xfails, so that the marks must go when the features land. The hand-picked stage modules
(``STAGES``) check the engine itself on every family today.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from helpers import real_tiles, with_real_statistics
from reference import assert_fp32_within, assert_fp64_agrees, captum, captum_pair, fp32_bound, fp64_twin
from torch import nn

import smoothsal as ss
from smoothsal.attribution import target_scalar
from smoothsal.deviation import deviation
from smoothsal.hooks import Hooks
from smoothsal.smoothing import BackwardHookConv2d, ForwardHookConv2d

SIZE = 64  # px: the smallest that every family takes down to 1/32 (2 × 2)
CLASSES = 3
TARGET = torch.tensor([2, 1])
ALIASES = {"layer1": 4, "layer2": 8, "layer3": 16}  # alias → how many times smaller its output is


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class SmallUNet(nn.Module):
    """A U-Net in miniature: an encoder block at full size, then four stride-2 blocks (1/2 … 1/16); a
    decoder that upsamples ×2 (bilinear), concatenates the encoder's output of that size and runs a
    block; a 1×1 head: per-pixel logits."""

    def __init__(self, num_classes: int = CLASSES, width: int = 8):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        self.encoder = nn.ModuleList([_block(3, w[0]), *(_block(w[k - 1], w[k], 2) for k in range(1, 5))])
        self.decoder = nn.ModuleList(_block(w[k + 1] + w[k], w[k]) for k in reversed(range(4)))
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.head = nn.Conv2d(w[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for block, skip in zip(self.decoder, reversed(skips), strict=True):
            x = block(torch.cat([self.up(x), skip], 1))
        return self.head(x)


def _torchvision(name: str, **kw) -> Callable[..., nn.Module]:
    return lambda num_classes=CLASSES: getattr(torchvision.models, name)(
        weights=None, num_classes=num_classes, **kw
    )


def _timm(name: str) -> Callable[..., nn.Module]:
    return lambda num_classes=CLASSES: timm.create_model(name, pretrained=False, num_classes=num_classes)


# The smallest variant of each family, random weights.
FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": _torchvision("resnet18"),
    "resnext50_32x4d": _torchvision("resnext50_32x4d"),
    "densenet121": _torchvision("densenet121"),
    "efficientnet_b0": _torchvision("efficientnet_b0"),
    "mobilenet_v3_small": _torchvision("mobilenet_v3_small"),
    "convnext_tiny": _torchvision("convnext_tiny"),
    "googlenet": _torchvision("googlenet", aux_logits=False, init_weights=True),
    "tf_efficientnet_b0": _timm("tf_efficientnet_b0"),
    "small_unet": SmallUNet,
}
# Hand-picked: the last block (or stage) whose output is at 1/4, 1/8, 1/16 of the input.
STAGES = {
    "resnet18": ("layer1", "layer2", "layer3"),
    "resnext50_32x4d": ("layer1", "layer2", "layer3"),
    "densenet121": ("features.denseblock1", "features.denseblock2", "features.denseblock3"),
    "efficientnet_b0": ("features.2", "features.3", "features.5"),
    "mobilenet_v3_small": ("features.1", "features.3", "features.8"),
    "convnext_tiny": ("features.1", "features.3", "features.5"),
    "googlenet": ("conv3", "inception3b", "inception4e"),
    "tf_efficientnet_b0": ("blocks.1", "blocks.2", "blocks.4"),
    "small_unet": ("encoder.2", "encoder.3", "encoder.4"),
}
NAMED_STAGES = {"resnet18", "resnext50_32x4d"}  # today's name patterns resolve these families' aliases
# A module that Captum's DeepLift has a rule for runs after every stage (one-pass DeepLift refuses it).
NEEDS_RULES = {
    "efficientnet_b0": "Sigmoid (SE)",
    "googlenet": "MaxPool2d",
    "tf_efficientnet_b0": "Sigmoid (SE)",
}
POOLING_ONLY = {"densenet121", "googlenet"}  # downsample by pooling after the stem: nothing to smooth


def alias_module(model: nn.Module, alias: str) -> str:
    """The module a stage alias names: the one place the tests resolve aliases (to become
    ``stages.stage_modules(model, example)[alias]`` when resolution-based aliases land)."""
    return ss.resolve_layer(model, alias)


def changed_ops(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The ops smoothing says it changes (to become what ``inspect`` lists)."""
    return ss.downsampling_convs(model, x[:1])


@dataclass(frozen=True)
class Family:
    """One family's canonical eval-mode model and its input."""

    name: str
    model: nn.Module
    x: torch.Tensor


class Zoo:
    """Each family built once per module, on first use (canonical ReLUs, eval mode, BatchNorms with
    realistic statistics)."""

    def __init__(self) -> None:
        self.built: dict[str, Family] = {}

    def __getitem__(self, name: str) -> Family:
        if name not in self.built:
            torch.manual_seed(0)
            raw = FAMILIES[name]().eval()
            model = with_real_statistics(ss.canonicalise(raw, torch.zeros(1, 3, SIZE, SIZE)))
            self.built[name] = Family(name, model, torch.randn(2, 3, SIZE, SIZE))
        return self.built[name]


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return Zoo()


def output_scale(model: nn.Module, name: str, x: torch.Tensor) -> float:
    """How many times smaller than the input the named module's output is."""
    sizes: list[int] = []
    with Hooks() as hooks, torch.no_grad():
        hooks.forward(model.get_submodule(name), lambda m, i, o: sizes.append(o.shape[-1]))
        model(x[:1])
    return x.shape[-1] / sizes[0]


def assert_equals_captum(fam: Family, ours: dict[str, dict], key: str, module: str, attribution: str) -> None:
    """ours (fp32 and fp64, under ``key``) against Captum at ``module``: the fp64-grounded rule."""
    c32, c64 = captum_pair(fam.model, fam.x, module, TARGET, attribution)
    o32, o64 = ours["fp32"][attribution][key], ours["fp64"][attribution][key]
    what = (fam.name, key, module, attribution)
    assert o32.shape == c32.shape and o32.dtype == torch.float32, what
    assert_fp64_agrees(o64, c64, what)
    assert_fp32_within(o32, o64, fp32_bound(c32, c64), what)


def ours(fam: Family, layers: list[str], attributions: tuple[str, ...]) -> dict[str, dict]:
    return {
        p: ss.attribute(
            fam.model, fam.x, layers=layers, target=TARGET, attributions=attributions, precision=p
        )
        for p in ("fp32", "fp64")
    }


# --- the engine on every family, at the hand-picked stages (today) -------------------------------


def _engine_cases() -> list:
    cases = []
    for name in FAMILIES:
        cases.append(pytest.param(name, "gradient", id=f"{name}-gradient"))
        marks = [pytest.mark.xfail(strict=True, reason="needs DeepLift rules")] if name in NEEDS_RULES else []
        cases.append(pytest.param(name, "deeplift", marks=marks, id=f"{name}-deeplift"))
    return cases


@pytest.mark.parametrize("family,attribution", _engine_cases())
def test_hand_picked_stages_equal_captum(zoo, family, attribution):
    """Gradient (one Captum call for the three stages) and DeepLift (one per stage) at 1/4, 1/8, 1/16."""
    fam = zoo[family]
    stages = list(STAGES[family])
    assert [output_scale(fam.model, s, fam.x) for s in stages] == list(ALIASES.values())
    mine = ours(fam, stages, (attribution,))
    if attribution == "gradient":
        c32s = captum(fam.model, fam.x, stages, TARGET, "gradient")
        c64s = captum(fp64_twin(fam.model), fam.x.double(), stages, TARGET, "gradient")
        for stage, c32, c64 in zip(stages, c32s, c64s, strict=True):
            assert_fp64_agrees(mine["fp64"]["gradient"][stage], c64, (family, stage))
            assert_fp32_within(
                mine["fp32"]["gradient"][stage],
                mine["fp64"]["gradient"][stage],
                fp32_bound(c32, c64),
                (family, stage),
            )
    else:
        for stage in stages:
            assert_equals_captum(fam, mine, stage, stage, attribution)


# --- the stage aliases (resolution-based: strict xfails until they land) ----------------------------


def _alias_cases() -> list:
    cases = []
    for name in FAMILIES:
        for alias in ALIASES:
            for attribution in ss.ATTRIBUTIONS:
                reasons = [] if name in NAMED_STAGES else ["needs resolution-based aliases"]
                if attribution == "deeplift" and name in NEEDS_RULES:
                    reasons.append("needs DeepLift rules")
                marks = [pytest.mark.xfail(strict=True, reason=" and ".join(reasons))] if reasons else []
                cases.append(
                    pytest.param(name, alias, attribution, marks=marks, id=f"{name}-{alias}-{attribution}")
                )
    return cases


@pytest.mark.parametrize("family,alias,attribution", _alias_cases())
def test_stage_alias_is_its_resolution_and_equals_captum(zoo, family, alias, attribution):
    fam = zoo[family]
    module = alias_module(fam.model, alias)
    assert output_scale(fam.model, module, fam.x) == ALIASES[alias], (family, alias, module)
    mine = ours(fam, [alias], (attribution,))
    assert_equals_captum(fam, mine, alias, module, attribution)


# --- what smoothing changes ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_hook_keeps_the_logits_bit_for_bit(zoo, family):
    fam = zoo[family]
    smoothed = ss.smooth(fam.model, "backward_hook", example=fam.x[:1])
    wrapped = [m for m in smoothed.modules() if isinstance(m, BackwardHookConv2d)]
    assert len(wrapped) == len(changed_ops(fam.model, fam.x))
    assert bool(wrapped) != (family in POOLING_ONLY)
    with torch.no_grad():
        assert torch.equal(smoothed(fam.x), fam.model(fam.x))


def op_traffic(
    model: nn.Module, names: list[str], x: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per named module: its output, and the gradient of the target logit that reaches its input
    through this module alone (it gets a copy of its input that nothing else uses)."""
    seen: dict[str, list[torch.Tensor]] = {}

    def own_copy(_m: nn.Module, inputs: tuple, name: str) -> tuple:
        copy = inputs[0].clone()
        copy.retain_grad()
        seen[name] = [copy]
        return (copy, *inputs[1:])

    with Hooks() as hooks:
        for n in names:
            hooks.forward_pre(model.get_submodule(n), lambda m, i, n=n: own_copy(m, i, n))
            hooks.forward(model.get_submodule(n), lambda m, i, o, n=n: seen[n].append(o.detach()))
        target_scalar(model(x.clone().requires_grad_()), TARGET).sum().backward()
    return {n: (seen[n][1], seen[n][0].grad) for n in names}


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Beyond rounding: by more than 1e-3 of the larger magnitude."""
    return float((a - b).abs().max()) > 1e-3 * max(float(a.abs().max()), float(b.abs().max()))


@pytest.mark.parametrize("method", ["backward_hook", "forward_hook"])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in POOLING_ONLY])
def test_every_op_said_to_change_does(zoo, family, method):
    """Each listed op, with and without the method: its input gradient (backward hook; its output stays
    bit for bit) or its output (forward hook) differs."""
    fam = zoo[family]
    names = changed_ops(fam.model, fam.x)
    assert names
    smoothed = ss.smooth(fam.model, method, example=fam.x[:1])
    kind = BackwardHookConv2d if method == "backward_hook" else ForwardHookConv2d
    assert all(isinstance(smoothed.get_submodule(n), kind) for n in names)
    before, after = op_traffic(fam.model, names, fam.x), op_traffic(smoothed, names, fam.x)
    for n in names:
        (out0, grad0), (out1, grad1) = before[n], after[n]
        if method == "backward_hook":
            assert torch.equal(out1, out0) and differs(grad1, grad0), (family, n)
        else:
            assert differs(out1, out0), (family, n)


@pytest.mark.parametrize("family", sorted(POOLING_ONLY))
def test_a_family_that_downsamples_by_pooling_lists_nothing_and_nothing_changes(zoo, family):
    fam = zoo[family]
    assert changed_ops(fam.model, fam.x) == []
    with torch.no_grad():
        logits = fam.model(fam.x)
        for method in ("backward_hook", "forward_hook"):
            assert torch.equal(ss.smooth(fam.model, method, example=fam.x[:1])(fam.x), logits), method


# --- bf16 on briefly trained weights ---------------------------------------------------------------

BF16_SIZE, BF16_STEPS, BF16_PER_TILE = 96, 40, 16  # 64 real 96-px crops of 4 H&E tiles (the classes)


def train_briefly(family: str, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """Adam on the real crops (class = source tile, horizontal flips on odd steps), then each BatchNorm's
    statistics recomputed exactly over the crops (a short run leaves them lagging), eval mode."""
    torch.manual_seed(0)
    model = ss.canonicalise(FAMILIES[family](num_classes=int(y.max()) + 1).eval(), x[:1]).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(BF16_STEPS):
        idx = torch.randperm(len(x), generator=g)[:16]
        batch = x[idx].flip(-1) if step % 2 else x[idx]
        loss = F.cross_entropy(model(batch), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()  # dropout and stochastic depth off while the statistics are taken
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average
        bn.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def _bf16_cases() -> list:
    measured = "measured: DeepLift relative error median 7-14 %, gradient cosine min 0.75 (gates 3 %, 0.95)"
    return [
        pytest.param("resnet18", ss.ATTRIBUTIONS, id="resnet18"),
        pytest.param(
            "efficientnet_b0",
            ("gradient",),
            id="efficientnet_b0-gradient",
            marks=pytest.mark.xfail(
                strict=True,
                reason="bf16 misses one gate; measured: backward_hook features.2 cosine min 0.9465",
            ),
        ),
        pytest.param(
            "efficientnet_b0",
            ("deeplift",),
            id="efficientnet_b0-deeplift",
            marks=pytest.mark.xfail(strict=True, reason="needs DeepLift rules"),
        ),
        pytest.param(
            "mobilenet_v3_small",
            ss.ATTRIBUTIONS,
            id="mobilenet_v3_small",
            marks=pytest.mark.xfail(strict=True, reason=f"bf16 misses the gates; {measured}"),
        ),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("family,attributions", _bf16_cases())
def test_bf16_within_the_deviation_gates_on_briefly_trained_weights(tiles_dir, family, attributions):
    """fp32 against bf16 at the three stages, without SmoothGrad, for the original and both hooks: every
    attribution × stage × method meets smoothsal.deviation.GATES on 8 of the crops (two per tile)."""
    x = real_tiles(tiles_dir, BF16_SIZE, per_tile=BF16_PER_TILE)
    y = torch.arange(4).repeat_interleave(BF16_PER_TILE)
    model = train_briefly(family, x, y)
    tiles = x[:: BF16_PER_TILE // 2]  # two per source tile
    missed = []
    for method in ("original", "backward_hook", "forward_hook"):
        net = ss.smooth(model, method, example=x[:1])
        maps = {
            p: ss.attribute(
                net, tiles, layers=list(STAGES[family]), target=1, attributions=attributions, precision=p
            )
            for p in ("fp32", "bf16")
        }
        for a in attributions:
            for stage in STAGES[family]:
                d = deviation(a, stage, maps["bf16"][a][stage], maps["fp32"][a][stage])
                missed += [(method, a, stage, m) for m in d.missed()]
    assert not missed, missed
