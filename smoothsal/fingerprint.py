"""A slide file's fingerprint: a cheap identity of its content, recorded in the tile table by `smoothsal
tiles` and checked by every stage that reads the slide again (`tiles.read_tile_table`); the workflow
computes it at planning time, so that a slide whose content changed reruns its jobs whatever its
modification time, and a touched but unchanged one reruns nothing.

Standard library only: the workflow loads this file by path, without importing the package (and torch).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["slide_fingerprint"]

ENDS = 1 << 16  # bytes read at the start (the header: dimensions, tile offsets) and at the end
SAMPLES = 32  # blocks read at evenly spaced offsets between them
BLOCK = 1 << 12  # bytes per block: about 256 KiB in all, however large the file


def slide_fingerprint(path: str | Path) -> str:
    """``SIZE-HASH``: the file's size in bytes and a SHA-256 (128 bits) of its first and last 64 KiB and
    32 blocks of 4 KiB spread over it. Another image of the same size differs in its header or its
    pixels; reading the whole file (GBs) in every stage would not be cheap, so an edit of a few bytes
    between the sampled blocks goes unnoticed."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        step = size / (SAMPLES + 1)
        reads = [(0, ENDS), *((round(step * i), BLOCK) for i in range(1, SAMPLES + 1)), (size - ENDS, ENDS)]
        digest = hashlib.sha256(str(size).encode())
        for offset, n in reads:
            f.seek(max(0, offset))
            digest.update(f.read(n))
    return f"{size}-{digest.hexdigest()[:32]}"
