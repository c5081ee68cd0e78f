"""Latency of a burst of parallel tile requests to `smoothsal view` (what a browser sends when a view
opens): N requests at once, each on its own connection, for the container's tiles (cycled when fewer).

Each checkout given is served in its own process (`python -m smoothsal.cli view C --port 0` with that
checkout on PYTHONPATH); rounds alternate between the checkouts (interleaved, so machine load hits both
alike) and the table shows, per checkout, the median over rounds of each round's median / p95 / max
latency and the failed requests summed over rounds, plus the ratio of each to the first checkout's.

    python benchmarks/viewer_latency.py CONTAINER --checkouts /work/main /work/wt-safe [--parallel 64]
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from smoothsal.hardware import describe


def start(checkout: Path, container: Path) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    proc = subprocess.Popen(
        [sys.executable, "-m", "smoothsal.cli", "view", str(container), "--port", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    port = int(re.search(r":(\d+)/", proc.stdout.readline()).group(1))
    return proc, port


def get(port: int, path: str) -> float | None:
    """Seconds for one request on a new connection (None: refused, reset or timed out)."""
    began = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        conn.close()
        return time.perf_counter() - began if response.status in (200, 204) else None
    except OSError:
        return None


def burst(port: int, paths: list[str]) -> tuple[list[float], int]:
    with ThreadPoolExecutor(len(paths)) as pool:
        times = list(pool.map(lambda p: get(port, p), paths))
    ok = [t for t in times if t is not None]
    return ok, len(times) - len(ok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("container", type=Path)
    parser.add_argument("--checkouts", type=Path, nargs="+", required=True)
    parser.add_argument("--parallel", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(describe("cpu"), flush=True)  # the machine every figure below was measured on
    from smoothsal.viewer.page import Page

    page = Page(args.container)
    keys = list(page.tile_keys())  # tissue and heatmap tiles; repeated (other ?v=) if fewer than asked
    ext = {im.index: "jpg" if im.kind == "tissue" else "f32" for im in page.images}
    paths = [
        f"/tiles/{i}/{lv}/{r}/{c}.{ext[i]}?v={n}"
        for n, (i, lv, r, c) in enumerate(keys[k % len(keys)] for k in range(args.parallel))
    ]
    servers = {c: start(c, args.container) for c in args.checkouts}
    results: dict[Path, list[tuple[float, float, float, int]]] = {c: [] for c in args.checkouts}
    try:
        for _ in range(args.rounds):
            for checkout, (_, port) in servers.items():
                ok, failed = burst(port, paths)
                ok.sort()
                p95 = ok[int(0.95 * (len(ok) - 1))] if ok else float("nan")
                med = statistics.median(ok) if ok else float("nan")
                results[checkout].append((med, p95, ok[-1] if ok else float("nan"), failed))
                time.sleep(0.5)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    print(f"{len(paths)} parallel tile requests, {args.rounds} rounds, container {args.container}")
    print("| checkout | median s | p95 s | max s | failed | max / first's |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    first_max = None
    for checkout, rows in results.items():
        med, p95, worst = (statistics.median(r[i] for r in rows) for i in range(3))
        first_max = first_max or worst
        failed = sum(r[3] for r in rows)
        print(f"| {checkout} | {med:.3f} | {p95:.3f} | {worst:.3f} | {failed} | {worst / first_max:.2f} |")


if __name__ == "__main__":
    main()
