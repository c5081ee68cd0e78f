"""The `smoothsal` command: one subcommand per workflow stage, one module each.

Each subcommand parses its arguments (defaults from the library's settings dataclasses), calls one
library entry point and prints what it wrote. A user-facing error (`smoothsal.errors.SmoothsalError`)
is printed as one line, ``smoothsal COMMAND: error: …``, with exit status 1; Ctrl-C as one line saying
what was kept and how to go on, exit 130; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from ..errors import SmoothsalError, one_line

__all__ = ["COMMANDS", "build_parser", "command_module", "main"]

# The command modules, in the order `smoothsal --help` lists them (the workflow's order); each is
# imported only when needed, so that a workflow job loads its own stage and not every other one's
# libraries (`smoothsal tiles` starts in ~2 s instead of ~4.4 s).
COMMANDS = (
    "inspect",
    "tiles",
    "train_surrogate",
    "evaluate",
    "compare",
    "saliency",
    "heatmaps",
    "seams",
    "faithfulness",
    "report",
    "view",
    "export",
    "demo_data",
    "train_model",
)


def command_module(name: str) -> ModuleType:
    """The module of one command (``train-surrogate`` or ``train_surrogate``)."""
    return importlib.import_module(f"{__name__}.{name.replace('-', '_')}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand (or of ``only`` that one: what running it needs)."""
    parser = argparse.ArgumentParser(
        prog="smoothsal", description="Smooth hidden-layer saliency maps for whole-slide images."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in map(command_module, COMMANDS if only is None else (only,)):
        p = sub.add_parser(command.COMMAND.name, help=command.COMMAND.help, description=command.__doc__)
        command.arguments(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (1: bad input, printed as one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = {c.replace("_", "-") for c in COMMANDS}
    args = build_parser(argv[0] if argv and argv[0] in names else None).parse_args(argv)
    try:
        args.func(args)
    except SmoothsalError as err:
        print(f"smoothsal {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: what was kept and how to go on, not a traceback
        print(
            f"smoothsal {args.command}: interrupted: {command_module(args.command).COMMAND.interrupted}",
            file=sys.stderr,
        )
        return 130
    return 0
