"""The family matrix: every claim of the method checked on nine CNN families and a small U-Net, with
random weights (nothing downloads; BatchNorm statistics taken over random inputs), on one 64-px input.

Per family: the stage aliases (``layer1``…``layer3``) name modules whose outputs are at 1/4, 1/8, 1/16
of the input, and fp32 gradient and DeepLift at each alias (one ``attribute`` call per precision for all
three aliases and both attributions) equal Captum's at the module the alias names, under the
fp64-grounded rule (tests/reference.py); the backward hook keeps the logits bit for bit; each
downsampling op that ``inspect`` says a method changes really changes (its output under the forward hook,
its input gradient under the backward hook). bf16 stays within the deviation gates on briefly trained
weights (random weights fail them by design) for SE-ResNet-18 and for EfficientNet-B0's gradient (ResNet:
tests/test_precision.py). Which module each alias names is tests/test_stages.py's claim; here only the
families it does not build.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from helpers import CPU_SMOOTHGRAD, real_tiles, with_calibrated_statistics, with_real_statistics
from reference import assert_fp32_within, assert_fp64_agrees, captum, fp32_bound, fp64_twin
from torch import nn

import smoothsal as ss
from smoothsal.attribution import target_scalar
from smoothsal.deviation import deviation
from smoothsal.hooks import Hooks
from smoothsal.inspection import Inspection, inspect_model
from smoothsal.smoothing import BackwardHookConv2d, ForwardHookConv2d
from smoothsal.stages import stage_modules

SIZE = 64  # px: the smallest that every family takes down to 1/32 (2 × 2)
CLASSES = 3
TARGET = torch.tensor([2])
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


def _googlenet(num_classes: int = CLASSES) -> nn.Module:
    """GoogLeNet with He-normal convs (as torchvision's ResNet): its own init (normal, std 0.01) leaves
    the logits of two inputs 1e-12 apart, every DeepLift Δ under Captum's 1e-10 and DeepLift the gradient."""
    model = torchvision.models.googlenet(
        weights=None, num_classes=num_classes, aux_logits=False, init_weights=False
    )
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return model


def _timm(name: str) -> Callable[..., nn.Module]:
    return lambda num_classes=CLASSES: timm.create_model(name, pretrained=False, num_classes=num_classes)


def _seresnet18(num_classes: int = CLASSES) -> nn.Module:
    """timm's SE-ResNet-18 with nn.Sigmoid gates, as torchvision's squeeze-excitation has: DeepLift's rescale
    rule then applies in the gates (timm's own Sigmoid class gets the plain derivative, as in Captum)."""
    model = timm.create_model("seresnet18", pretrained=False, num_classes=num_classes)
    gates = [
        n for n, m in model.named_modules() if type(m).__name__ == "Sigmoid" and type(m) is not nn.Sigmoid
    ]
    for name in gates:
        model.set_submodule(name, nn.Sigmoid())
    assert gates
    return model


# The smallest variant of each family, random weights.
FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": _torchvision("resnet18"),
    "resnext50_32x4d": _torchvision("resnext50_32x4d"),
    "densenet121": _torchvision("densenet121"),
    "efficientnet_b0": _torchvision("efficientnet_b0"),
    "mobilenet_v3_small": _torchvision("mobilenet_v3_small"),
    "convnext_tiny": _torchvision("convnext_tiny"),
    "googlenet": _googlenet,
    "tf_efficientnet_b0": _timm("tf_efficientnet_b0"),
    "seresnet18": _seresnet18,
    "small_unet": SmallUNet,
}
# The module each alias names, for the families that tests/test_stages.py does not build.
ALIAS_MODULES = {
    "resnet18": ("layer1", "layer2", "layer3"),
    "googlenet": ("conv3", "inception3b", "inception4e"),
    "tf_efficientnet_b0": ("blocks.1", "blocks.2", "blocks.4"),
    "seresnet18": ("layer1", "layer2", "layer3"),
    "small_unet": ("encoder.2", "encoder.3", "encoder.4"),
}
POOLING_ONLY = {"densenet121", "googlenet"}  # downsample by pooling after the stem: nothing to smooth


def alias_module(model: nn.Module, x: torch.Tensor, alias: str) -> str:
    """The module a stage alias names on ``x``: the one place the tests resolve aliases."""
    return stage_modules(model, x)[alias]


def changed_ops(report: Inspection, method: str) -> list[str]:
    """The downsampling ops that ``inspect`` says ``method`` changes."""
    return [op.name for op in report.downsampling if method in op.changed_by]


@dataclass
class Family:
    """One family's canonical eval-mode model, its input, and what is computed once per module: its
    inspection and smoothsal's fp32 and fp64 attributions at the aliases."""

    name: str
    model: nn.Module
    x: torch.Tensor
    cache: dict[str, object] = field(default_factory=dict)

    @property
    def report(self) -> Inspection:
        if "report" not in self.cache:
            self.cache["report"] = inspect_model(self.model, self.name, SIZE)
        return self.cache["report"]  # type: ignore[return-value]

    @property
    def ours(self) -> dict[str, dict]:
        """precision → attribution → alias → map: one ``attribute`` call per precision."""
        if "ours" not in self.cache:
            self.cache["ours"] = {
                p: ss.attribute(
                    self.model, self.x, layers=list(ALIASES), target=TARGET, attributions=ss.ATTRIBUTIONS,
                    precision=p,
                )
                for p in ("fp32", "fp64")
            }  # fmt: skip
        return self.cache["ours"]  # type: ignore[return-value]


class Zoo:
    """Each family built once per module, on first use (canonical ReLUs, eval mode, BatchNorms with
    non-trivial affine terms and running statistics taken over 8 random inputs, as a trained net's
    match its data)."""

    def __init__(self) -> None:
        self.built: dict[str, Family] = {}

    def __getitem__(self, name: str) -> Family:
        if name not in self.built:
            torch.manual_seed(0)
            raw = FAMILIES[name]().eval()
            # with_real_statistics for the affine terms; the running statistics are then taken over inputs
            model = with_real_statistics(ss.canonicalise(raw, torch.zeros(1, 3, SIZE, SIZE)))
            x = torch.randn(1, 3, SIZE, SIZE)
            calibration = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
            self.built[name] = Family(name, with_calibrated_statistics(model, calibration), x)
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


def captum_at(fam: Family, modules: list[str], attribution: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Captum's (fp32, fp64) result at each module: gradient in one call per dtype, DeepLift (one layer
    per call) one call per module and dtype."""
    twin, x64 = fp64_twin(fam.model), fam.x.double()
    if attribution == "gradient":
        pairs = zip(captum(fam.model, fam.x, modules, TARGET, "gradient"),
                    captum(twin, x64, modules, TARGET, "gradient"), strict=True)  # fmt: skip
        return list(pairs)
    return [
        (captum(fam.model, fam.x, m, TARGET, attribution), captum(twin, x64, m, TARGET, attribution))
        for m in modules
    ]


# --- the stage aliases: their resolution and Captum equality ----------------------------------------


@pytest.mark.parametrize("attribution", ss.ATTRIBUTIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_stage_aliases_are_their_resolution_and_equal_captum_there(zoo, family, attribution):
    """Each alias names a module at its resolution, and smoothsal at the alias equals Captum at that
    module (fp64 agreement, fp32 as exact as Captum's)."""
    fam = zoo[family]
    modules = [alias_module(fam.model, fam.x, alias) for alias in ALIASES]
    assert [output_scale(fam.model, m, fam.x) for m in modules] == list(ALIASES.values()), modules
    for alias, module, (c32, c64) in zip(ALIASES, modules, captum_at(fam, modules, attribution), strict=True):
        o32, o64 = fam.ours["fp32"][attribution][alias], fam.ours["fp64"][attribution][alias]
        what = (family, alias, module, attribution)
        assert o32.shape == c32.shape and o32.dtype == torch.float32, what
        assert_fp64_agrees(o64, c64, what)
        assert_fp32_within(o32, o64, fp32_bound(c32, c64), what)


@pytest.mark.parametrize("family", ALIAS_MODULES)
def test_each_alias_names_the_last_module_at_its_resolution(zoo, family):
    fam = zoo[family]
    assert tuple(alias_module(fam.model, fam.x, a) for a in ALIASES) == ALIAS_MODULES[family]


# --- what smoothing changes ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_hook_keeps_the_logits_bit_for_bit(zoo, family):
    fam = zoo[family]
    smoothed = ss.smooth(fam.model, "backward_hook", example=fam.x[:1])
    wrapped = sorted(n for n, m in smoothed.named_modules() if isinstance(m, BackwardHookConv2d))
    assert wrapped == sorted(changed_ops(fam.report, "backward_hook"))
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
    names = changed_ops(fam.report, method)
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
    assert [op.changed_by for op in fam.report.downsampling if op.changed_by] == []
    with torch.no_grad():
        logits = fam.model(fam.x)
        for method in ("backward_hook", "forward_hook"):
            assert torch.equal(ss.smooth(fam.model, method, example=fam.x[:1])(fam.x), logits), method


# --- bf16 on briefly trained weights ---------------------------------------------------------------

BF16_SIZE, BF16_PER_TILE = 96, 16  # 64 real 96-px crops of 4 H&E tiles (the classes)
# Adam steps: efficientnet_b0 after 40 missed one cell (backward_hook layer1 gradient cosine min 0.9465)
BF16_STEPS = {"seresnet18": 40, "efficientnet_b0": 80}


def train_briefly(family: str, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """Adam on the real crops (class = source tile, horizontal flips on odd steps), then each BatchNorm's
    statistics recomputed exactly over the crops (a short run leaves them lagging), eval mode."""
    torch.manual_seed(0)
    model = ss.canonicalise(FAMILIES[family](num_classes=int(y.max()) + 1).eval(), x[:1]).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(BF16_STEPS[family]):
        idx = torch.randperm(len(x), generator=g)[:16]
        batch = x[idx].flip(-1) if step % 2 else x[idx]
        loss = F.cross_entropy(model(batch), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return with_calibrated_statistics(model, x)


def _bf16_cases() -> list:
    """(family, attributions, SmoothGrad). ResNet is tests/test_precision.py's trained classifier. The
    squeeze-excitation family, SE-ResNet-18, under the same conditions as that test (SmoothGrad n = 4: a
    ReLU net's plain gradient flips with rounding at single inputs). EfficientNet-B0 (SE and SiLU), one
    pass per tile, gradient only: its DeepLift misses the relative-error gate at layer1 (median 5.3 %
    against 3 % after 80 steps, cosine min 0.994; 5.2 % after 240; 8.8 % with SmoothGrad), and no arithmetic with bf16
    weights meets it: the weights rounded to bf16 alone, in fp32 arithmetic, give 3.0 %."""
    return [
        pytest.param("seresnet18", ss.ATTRIBUTIONS, CPU_SMOOTHGRAD, id="seresnet18"),
        pytest.param("efficientnet_b0", ("gradient",), None, id="efficientnet_b0-gradient"),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("family,attributions,smoothgrad", _bf16_cases())
def test_bf16_within_the_deviation_gates_on_briefly_trained_weights(
    tiles_dir, family, attributions, smoothgrad
):
    """fp32 against bf16 at the three stages for the original and both hooks: every attribution × stage ×
    method meets smoothsal.deviation.GATES on 8 of the crops (two per tile)."""
    x = real_tiles(tiles_dir, BF16_SIZE, per_tile=BF16_PER_TILE)
    y = torch.arange(4).repeat_interleave(BF16_PER_TILE)
    model = train_briefly(family, x, y)
    tiles = x[:: BF16_PER_TILE // 2]  # two per source tile
    seeds = list(range(len(tiles))) if smoothgrad else None
    missed = []
    for method in ("original", "backward_hook", "forward_hook"):
        net = ss.smooth(model, method, example=x[:1])
        maps = {
            p: ss.attribute(
                net, tiles, layers=list(ALIASES), target=1, attributions=attributions, precision=p,
                smoothgrad=smoothgrad, noise_seeds=seeds,
            )
            for p in ("fp32", "bf16")
        }  # fmt: skip
        for a in attributions:
            for stage in ALIASES:
                d = deviation(a, stage, maps["bf16"][a][stage], maps["fp32"][a][stage])
                missed += [(method, a, stage, m) for m in d.missed()]
    assert not missed, missed
