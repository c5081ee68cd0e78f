"""What several subcommands share: defaults read from the settings dataclasses, the model options."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["Command", "default", "model_args", "rgb", "stitch_inputs", "tuple_or_none"]


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
    p.add_argument("--arch", required=True, help="model architecture (see smoothsal.ARCHITECTURES)")
    p.add_argument("--num-classes", type=int, required=True, help="outputs of the model (1 = one logit)")
    p.add_argument("--checkpoint", type=Path, help="model weights (.pt); without it a seeded random init")
    p.add_argument(
        "--tiles", type=Path, nargs=tiles, required=True, metavar="TABLE", help="tile tables (.parquet)"
    )
    rgb(p, "the surrogate's if given, else ImageNet")
    p.add_argument(
        "--workers",
        type=int,
        help="DataLoader workers per process (default: 0 on <= 2 cores, else min(4, cores - 1))",
    )


def stitch_inputs(p: argparse.ArgumentParser, stores: str, tiles: str) -> None:
    """SLIDE, --saliency, --tiles and --mpp: what a command stitching one slide's saliency stores reads."""
    p.add_argument("slide", type=Path, help="whole-slide image the tiles were made from")
    p.add_argument("--saliency", type=Path, nargs="+", required=True, metavar="STORE", help=stores)
    p.add_argument("--tiles", type=Path, required=True, help=tiles)
    p.add_argument(
        "--mpp", type=float, help="µm/px at level 0, as given to `smoothsal tiles` (for slides without it)"
    )
