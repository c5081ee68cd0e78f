"""The `smoothsal` command: one subcommand per workflow stage.

Each subcommand parses its arguments and calls one library function; logic lives in the modules.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smoothsal",
        description="Smooth hidden-layer saliency maps for whole-slide images.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_tiles, _add_train_surrogate, _add_evaluate):
        add(sub)
    return parser


# --- tiles (smoothsal.slides) -------------------------------------------------------------------


def _add_tiles(sub: argparse._SubParsersAction) -> None:
    pass


# --- train-surrogate / evaluate (smoothsal.training) ---------------------------------------------


def _add_train_surrogate(sub: argparse._SubParsersAction) -> None:
    pass


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    pass


# --- entry point ----------------------------------------------------------------------------------


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CommandError, ValueError, FileNotFoundError) as err:
        print(f"smoothsal {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
