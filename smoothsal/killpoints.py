"""A test-only kill switch: ``kill_point(name)`` SIGKILLs this process at the N-th time it is reached
when the environment says ``SMOOTHSAL_KILL_AT="name=N"`` (several as ``a=2,b=5``); ``name=N/stop``
sends SIGSTOP instead, freezing the process there until a SIGCONT (the concurrency tests freeze a
first writer holding its lock, run a second, then let the first finish); ``name=N/int`` sends SIGINT
once, a real Ctrl-C at a known moment.

The resume tests need a real, uncatchable interruption at a known moment (after a checkpoint, mid-way
through the saliency batches or the stitched blocks); an environment variable gives them that without
threading debug parameters through public signatures. Without the variable a kill point does nothing.

Kill points: ``surrogate.step`` (after each optimiser step, every process), ``saliency.batch`` (after a
batch is recorded), ``saliency.finish`` (between moving the store and the table into place),
``heatmaps.block`` (after a stitched block is written), ``faithfulness.batch`` (after a batch of sampled
tiles), ``files.locked`` (an output's lock just taken).
"""

from __future__ import annotations

import functools
import os
import signal
from collections import Counter

from .errors import BadOption

__all__ = ["ENV", "kill_point"]

ENV = "SMOOTHSAL_KILL_AT"
_hits: Counter[str] = Counter()
_SIGNALS = {"": signal.SIGKILL, "stop": signal.SIGSTOP, "int": signal.SIGINT}


@functools.cache
def _limits(spec: str) -> dict[str, tuple[int, signal.Signals]]:
    limits = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, count = item.partition("=")
        count, _, how = count.strip().partition("/")
        if not name or not count.isdigit() or int(count) < 1 or how not in _SIGNALS:
            raise BadOption(
                f"{ENV}={spec!r}: cannot read {item!r}; write NAME=N, NAME=N/stop or NAME=N/int (N >= 1), "
                "e.g. saliency.batch=2"
            )
        limits[name.strip()] = (int(count), _SIGNALS[how])
    return limits


def kill_point(name: str) -> None:
    """SIGKILL (SIGSTOP, SIGINT) this process at the N-th call with ``name`` if ``SMOOTHSAL_KILL_AT`` asks."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    limit = _limits(spec).get(name)
    if limit is None:
        return
    _hits[name] += 1
    if _hits[name] == limit[0] or (_hits[name] > limit[0] and limit[1] == signal.SIGKILL):
        os.kill(os.getpid(), limit[1])
