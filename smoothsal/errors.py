"""User-facing errors: one family that the command line prints as one line naming the file and the fix.

Raise one of these for anything a user can put right (a bad slide, annotation, checkpoint, table, store
or option, a missing input, a refused output); the CLI prints it as ``smoothsal COMMAND: error: …`` and
exits 1. Anything else that escapes a command is a bug and shows its traceback. Each class also derives
from the builtin a caller would expect (``ValueError``, ``FileNotFoundError``, ``OSError``), so library
users may catch either. Library boundaries wrap third-party errors (OpenSlide, zarr, torch.load, pyarrow)
into this family with the file's name.
"""

from __future__ import annotations

import re

__all__ = [
    "BadAnnotation",
    "BadCheckpoint",
    "BadInput",
    "BadOption",
    "BadOutput",
    "BadSlide",
    "BadStore",
    "BadTable",
    "MissingInput",
    "SmoothsalError",
    "from_worker",
    "one_line",
    "plain",
]


class SmoothsalError(Exception):
    """Bad input or a refused output; the message is one line that names the file and says the fix."""


class BadInput(SmoothsalError, ValueError):
    """Generic bad input."""


class BadOption(BadInput):
    """A command-line option or setting out of range, or one that does not fit the inputs."""


class BadSlide(BadInput):
    """A slide that cannot be read: not a slide, corrupt tile data, no usable µm/px."""


class BadAnnotation(BadInput):
    """An annotation file that cannot be read or does not fit its slide."""


class BadCheckpoint(BadInput):
    """Model weights or a surrogate file that cannot be read or do not fit the model."""


class BadTable(BadInput):
    """A tile table or per-tile table that cannot be read or lacks what is needed."""


class BadStore(BadInput):
    """A saliency store or heatmap container that cannot be read or does not fit the other inputs."""


class MissingInput(SmoothsalError, FileNotFoundError):
    """An input file or directory that does not exist."""


class BadOutput(SmoothsalError, OSError):
    """An output that is refused (not ours to replace), unwritable or locked."""


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # terminal colour and cursor codes (CSI sequences)


def plain(text: str) -> str:
    """``text`` without terminal escape sequences (torch colours parts of its messages)."""
    return _ANSI.sub("", text)


def one_line(err: BaseException) -> str:
    """A third-party error's message on one line, without terminal escapes (its type's name when empty)."""
    return " ".join(plain(str(err)).split()) or type(err).__name__


def from_worker(err: SmoothsalError) -> SmoothsalError:
    """The error as it was raised in a DataLoader worker process.

    torch re-raises a worker's exception in the main process as the same class, but with the worker's
    whole traceback as its message ("Caught BadSlide in DataLoader worker process 0. Original Traceback
    …"); this gives back the original one-line message (the last line of that traceback).
    """
    text = str(err)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return err
    last = text.rstrip().splitlines()[-1]
    cls = type(err)
    for prefix in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
        if last.startswith(prefix):
            last = last[len(prefix) :]
            break
    return cls(last)
