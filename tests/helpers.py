"""Small builders shared by the core-library tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import smoothsal as ss
from smoothsal import demo
from smoothsal.deviation import Deviation, deviation
from smoothsal.hooks import Hooks

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
TISSUE_TILES = (
    "high-nuclei-score-level2.png",
    "low-nuclei-score-level1.png",
    "medium-nuclei-score-level0.png",
    "tissue-level0-4302-10273-4814-10785.png",
)


def module_calls(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """How often each named module runs for ``example``."""
    counts: dict[str, int] = {}

    def count(name: str) -> None:
        counts[name] = counts.get(name, 0) + 1

    with Hooks() as hooks, torch.no_grad():
        for n, m in model.named_modules():
            hooks.forward(m, lambda *_, n=n: count(n))
        model(example)
    return counts


def conv_io(model: nn.Module, names, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Input and output of each named module in one no-grad forward of ``x`` (hooks removed after)."""
    io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with Hooks() as hooks, torch.no_grad():
        for n in names:
            hooks.forward(model.get_submodule(n), lambda m, i, o, n=n: io.__setitem__(n, (i[0], o)))
        model(x)
    return io


def num_classes(arch: str) -> int:
    return 1 if arch == "monai_fc_resnet18" else 3


def with_real_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine terms, as trained nets have."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return model


def with_calibrated_statistics(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Every BatchNorm's running statistics recomputed exactly over ``x`` (a cumulative average over one
    batch), the model in eval mode after: each BatchNorm then normalises what really reaches it, as in a
    trained net. Random statistics can leave a deep net insensitive to its input: torchvision's
    EfficientNet, whose depthwise convs are initialised for a fan-out C times too large (PyTorch counts
    C·k²), gives two inputs logits equal to four places and DeepLift maps of 1e-13, all rounding."""
    model.eval()  # dropout and stochastic depth off while the statistics are taken
    for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return with_real_statistics(ss.load_model(arch, num_classes=num_classes(arch)), seed)


def real_tiles(tiles_dir: Path, size: int, per_tile: int = 1) -> torch.Tensor:
    """Normalised RGB crops ``[N, 3, size, size]`` from the real H&E tiles (a grid per tile)."""
    crops = []
    for name in TISSUE_TILES:
        rgb = np.asarray(Image.open(tiles_dir / name).convert("RGB"), dtype=np.float32) / 255.0
        t = torch.from_numpy(rgb).permute(2, 0, 1)
        side = int(per_tile**0.5)
        step = (t.shape[1] - size) // max(1, side - 1) if side > 1 else 0
        for i in range(side):
            for j in range(side):
                crops.append(t[:, i * step : i * step + size, j * step : j * step + size])
    x = torch.stack(crops)
    return (x - IMAGENET_MEAN) / IMAGENET_STD


CMU, CMU_PYRAMID, TCGA = (
    "CMU-1-Small-Region.svs",
    "CMU-1-Small-Region-pyramid.tiff",
    "TCGA-CR-7395-01A-01-TS1.svs",
)
SYNTHETIC_SIZE, SYNTHETIC_MPP = 2048, 0.5  # the synthetic slide: a 224-px grid of 9 × 9 tiles at level 0


class RecordingReader:
    """A real OpenSlide handle that records every read_region (level, size): a spy, not a mock."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.reads: list[tuple[int, tuple[int, int]]] = []

    def read_region(self, location, level, size):
        self.reads.append((level, tuple(size)))
        return self.inner.read_region(location, level, size)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def square(x0, y0, x1, y1=None):
    y1 = x1 if y1 is None else y1
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def feature_collection(items):
    return {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": rings if isinstance(rings[0][0], list) else [rings],
                },
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": name, "color": [255, 0, 0]},
                },
            }
            for name, rings in items
        ],
    }


def asap_xml(polygons):
    annotations = "".join(
        f'<Annotation Name="A{i}" Type="Polygon" PartOfGroup="{group}"><Coordinates>'
        + "".join(f'<Coordinate Order="{k}" X="{x}" Y="{y}"/>' for k, (x, y) in enumerate(points))
        + "</Coordinates></Annotation>"
        for i, (group, points) in enumerate(polygons)
    )
    return (
        f'<?xml version="1.0"?><ASAP_Annotations><Annotations>{annotations}</Annotations></ASAP_Annotations>'
    )


# One tiny setting throughout: resnet18 (2 classes, seeded random weights saved as a checkpoint),
# 32 tiles of 64 px from CMU-1-Small-Region.svs, global batch 8 (4 per process), 3 epochs = 12 steps.
# 32 tiles, 8 held out for validation, global batch 8 = 3 steps an epoch; the convergence rule (patience 1,
# an improvement = 10 % below the last one) stops it after a few epochs of at most 8.
SURROGATE_EPOCHS, SURROGATE_BATCH, SURROGATE_TILES, SURROGATE_VALIDATION = 8, 8, 32, 8
SURROGATE_PATIENCE, SURROGATE_MIN_DELTA = 1, 0.1


def train_args(tiles: Path, model: Path, out: Path, *extra: object) -> list[object]:
    """`smoothsal train-surrogate` in the tiny setting (``extra`` flags given later win): the paper's
    random init and lr 1e-3, whose steep and rising losses the convergence-rule tests are built on."""
    return ["train-surrogate", "--arch", "resnet18", "--num-classes", "2", "--checkpoint", model,
            "--tiles", tiles, "--out", out, "--epochs", SURROGATE_EPOCHS, "--batch-size", SURROGATE_BATCH,
            "--init", "random", "--lr", "0.001",
            "--patience", SURROGATE_PATIENCE, "--min-delta", SURROGATE_MIN_DELTA,
            "--val-min-tiles", SURROGATE_VALIDATION, "--workers", "0", "--checkpoint-every", "2",
            "--no-progress", *extra]  # fmt: skip


# --- the demo slides at reduced size (test_demo, test_demo_models) ----------------------------------

DEMO_SIZE = 1024  # level-0 px per side: ~30 tiles of 64 px at 1 µm/px
DEMO_SLIDES = ("tumor_001", "normal_001", "digi_001")
DEMO_TILE_ARGS = ["--tile-size", "64", "--target-mpp", "1.0"]
DEMO_CLASS_MAP = "Tumor=1,Stroma=2"


def spec(name: str) -> demo.SlideSpec:
    return next(s for s in demo.DEMO_SLIDES if s.name == name)


def demo_data(cli, out: Path, *args: str, expect: int = 0) -> str:
    """`smoothsal demo-data --out OUT ARGS`; its stderr."""
    return cli("demo-data", "--out", out, "--no-progress", *args, expect=expect).err


def tile(cli, out: Path, name: str) -> Path:
    """`smoothsal tiles` of a demo slide under `out`, with its annotations → the table's path."""
    slide, annotation, _ = demo.slide_paths(out, spec(name))
    table = out / "tiles" / f"{name}.parquet"
    extra = ["--class-map", DEMO_CLASS_MAP] if name.startswith("digi") else []
    cli("tiles", slide, "--annotations", annotation, "--out", table, *DEMO_TILE_ARGS, *extra)
    return table


# --- bf16 against fp32 on a trained classifier (test_precision, test_gpu) ----------------------------

PRECISION_LAYERS = ("layer1", "layer2", "layer3")
PRECISION_CROP = 128  # px at 1 µm/px (slide level 1 of a demo slide): layer3 maps of 8 × 8
PRECISION_SMOOTHGRAD = ss.SmoothGrad(10, 0.2)  # the paper's σ; half its samples (20), to keep tests short
CPU_SMOOTHGRAD = ss.SmoothGrad(4, 0.2)  # fewer samples: bf16 is emulated (~6.6x slower) on CPUs without AMX


def crops(slide: Path, table, n: int) -> torch.Tensor:
    """``n`` normalised PRECISION_CROP-px crops at level 1, spread over the tiles of ``table`` (tumour
    first)."""
    import openslide

    size = PRECISION_CROP
    rows = table.sort_values("label", ascending=False, kind="stable")
    rows = rows.iloc[np.linspace(0, len(rows) - 1, n).round().astype(int)]
    out = []
    with openslide.OpenSlide(slide) as reader:
        assert abs(reader.level_downsamples[1] - 2.0) < 1e-6
        width, height = reader.dimensions
        for x, y in rows[["x", "y"]].to_numpy(int):
            x, y = min(x, width - 2 * size), min(y, height - 2 * size)
            rgb = np.asarray(reader.read_region((int(x), int(y)), 1, (size, size)).convert("RGB"))
            out.append(torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1))
    return (torch.stack(out) - IMAGENET_MEAN) / IMAGENET_STD


_SMOOTHED: dict[tuple, tuple[nn.Module, nn.Module]] = {}


def smoothed(model: nn.Module, surrogate, method: str, device: str) -> nn.Module:
    """``model`` smoothed by ``method`` on ``device``, made once (attribute caches its converted copies
    and baselines with it, so the tests after the first do not pay for them again)."""
    key = (id(model), method, device)
    if key not in _SMOOTHED:
        net = ss.smooth(model, method, surrogate=surrogate if method == "surrogate" else None).to(device)
        _SMOOTHED[key] = (model, net)  # the model kept alive: its id stays its own
    return _SMOOTHED[key][1]


def agreement(
    model, surrogate, x, smoothgrad, attributions=ss.ATTRIBUTIONS, device="cpu", low="bf16"
) -> list[tuple[str, Deviation]]:
    """(method, the library's Deviation) of precision ``low`` against fp32 on ``device``, per
    attribution and layer over the tiles of ``x``."""
    rows = []
    seeds = list(range(len(x))) if smoothgrad else None
    for method in ss.METHODS:
        net = smoothed(model, surrogate, method, device)
        args = {
            "layers": PRECISION_LAYERS,
            "target": 1,
            "attributions": attributions,
            "smoothgrad": smoothgrad,
        }
        maps = {
            p: ss.attribute(net, x.to(device), **args, noise_seeds=seeds, precision=p) for p in ("fp32", low)
        }
        for a in attributions:
            for layer in PRECISION_LAYERS:
                ref, lower = maps["fp32"][a][layer], maps[low][a][layer]
                assert lower.dtype == torch.float32 and lower.shape == ref.shape
                rows.append((method, deviation(a, layer, lower, ref)))
    print(
        *(
            f"{m:14s} {d.attribution:9s} {d.layer}: cosine min {d.cosine_min:.4f} median {d.cosine_median:.4f}, "
            f"relative error median {d.relative_error_median:.4f} max {d.relative_error_max:.4f}, "
            f"TV {d.tv_change:+.2%}"
            for m, d in rows
        ),
        sep="\n",
    )
    return rows


def missed(rows: list[tuple[str, Deviation]]) -> list[tuple[str, Deviation, list[str]]]:
    """The rows that miss one of the library's bf16 gates (smoothsal.deviation.GATES)."""
    return [(m, d, d.missed()) for m, d in rows if d.missed()]
