"""The `smoothsal` command: one subcommand per workflow stage, one module each.

Each subcommand parses its arguments (defaults from the library's settings dataclasses), calls one
library entry point and prints what it wrote. A user-facing error (`smoothsal.errors.SmoothsalError`)
is printed as one line, ``smoothsal COMMAND: error: …``, with exit status 1; anything else is a bug and
shows its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import SmoothsalError, one_line
from . import (
    compare,
    demo_data,
    evaluate,
    export,
    heatmaps,
    report,
    saliency,
    seams,
    tiles,
    train_model,
    train_surrogate,
    view,
)

__all__ = ["COMMANDS", "build_parser", "main"]

# In the order `smoothsal --help` lists them (the workflow's order).
COMMANDS = (
    tiles,
    train_surrogate,
    evaluate,
    compare,
    saliency,
    heatmaps,
    seams,
    report,
    view,
    export,
    demo_data,
    train_model,
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="smoothsal", description="Smooth hidden-layer saliency maps for whole-slide images."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.COMMAND.name, help=command.COMMAND.help, description=command.__doc__)
        command.arguments(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (1: bad input, printed as one line)."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SmoothsalError as err:
        print(f"smoothsal {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 1
    return 0
