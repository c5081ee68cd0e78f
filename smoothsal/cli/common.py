"""What several subcommands share: defaults read from the settings dataclasses, the model options."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..model_spec import ModelSpec

__all__ = ["Command", "arch_args", "default", "model_args", "model_spec", "rgb", "stitch_inputs", "tuple_or_none"]

ARCH_HELP = (
    "model architecture: a registered name (resnet18, resnet34, resnet50, monai_fc_resnet18, unet_resnet34), "
    "torchvision:NAME, timm:NAME, or python:MODULE:CALLABLE (a dotted module or a .py file; see `smoothsal inspect`)"
)


@dataclass(frozen=True)
class Command:
    """A subcommand: its name and one-line help (its module's docstring is its description), and what a
    Ctrl-C keeps and how to go on (printed on one line, exit 130)."""

    name: str
    help: str
    interrupted: str = "nothing is left half-written (outputs appear only when complete); rerun the same command to start over"


def default(cls: type, name: str) -> Any:
    """The default of field ``name`` of the settings dataclass ``cls``: the one source of defaults."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def tuple_or_none(values: list[float] | None) -> tuple[float, ...] | None:
    return tuple(values) if values else None


def rgb(p: argparse.ArgumentParser, what: str) -> None:
    """--mean and --std: the input normalisation, three numbers each."""
    for name in ("mean", "std"):
        p.add_argument(
            f"--{name}", type=float, nargs=3, metavar=("R", "G", "B"),
            help=f"input normalisation {name} (default: {what})",
        )  # fmt: skip


def model_args(p: argparse.ArgumentParser, *, tiles: str | None = "+") -> None:
    """--arch / --num-classes / --checkpoint / --tiles / normalisation / --workers, shared by the model commands.

    ``tiles="+"``: any number of tile tables (training, evaluation); ``None``: one table (one slide).
    """
    arch_args(p)
    p.add_argument(
        "--tiles", type=Path, nargs=tiles, required=True, metavar="TABLE", help="tile tables (.parquet)"
    )
    rgb(p, "the surrogate's if given, else ImageNet")
    p.add_argument(
        "--workers",
        type=int,
        help="DataLoader workers per process (default: 0 on <= 2 cores, else min(4, cores - 1))",
    )


def arch_args(p: argparse.ArgumentParser, *, arch: str | None = None, num_classes: int | None = None) -> None:
    """--arch / --num-classes / --model-kwargs / --checkpoint / --allow-pickle: the model to explain
    (``arch``/``num_classes``: defaults, else the options are required)."""
    what = f" (default {arch})" if arch else ""
    p.add_argument("--arch", required=arch is None, default=arch, help=ARCH_HELP + what)
    p.add_argument(
        "--num-classes", type=int, required=num_classes is None, default=num_classes,
        help="outputs of the model (1 = one logit)",
    )  # fmt: skip
    p.add_argument(
        "--model-kwargs", default="", metavar="JSON",
        help="the architecture's constructor options as a JSON object, e.g. '{\"drop_rate\": 0.0}'",
    )  # fmt: skip
    p.add_argument("--checkpoint", type=Path, help="model weights (.pt); without it a seeded random init")
    p.add_argument(
        "--allow-pickle", action="store_true",
        help="accept a checkpoint that is a whole pickled model (torch.save(model)); loading it runs code from "
        "the file, so only for files you trust",
    )  # fmt: skip


def model_spec(args: argparse.Namespace, surrogate: Path | None = None) -> ModelSpec:
    """The ``ModelSpec`` of a command's model options."""
    from ..model_spec import ModelSpec  # torch: only for the commands that load a model

    return ModelSpec(
        args.arch, args.num_classes, args.checkpoint, surrogate, tuple_or_none(getattr(args, "mean", None)),
        tuple_or_none(getattr(args, "std", None)), args.model_kwargs, args.allow_pickle,
    )  # fmt: skip


def stitch_inputs(p: argparse.ArgumentParser, stores: str, tiles: str) -> None:
    """SLIDE, --saliency, --tiles and --mpp: what a command stitching one slide's saliency stores reads."""
    p.add_argument("slide", type=Path, help="whole-slide image the tiles were made from")
    p.add_argument("--saliency", type=Path, nargs="+", required=True, metavar="STORE", help=stores)
    p.add_argument("--tiles", type=Path, required=True, help=tiles)
    p.add_argument(
        "--mpp", type=float, help="µm/px at level 0, as given to `smoothsal tiles` (for slides without it)"
    )
