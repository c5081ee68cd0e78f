"""The test-only kill switch: a real SIGKILL at the N-th hit of a named point, nothing without it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from smoothsal import killpoints
from smoothsal.errors import BadOption

SCRIPT = (
    "from smoothsal.killpoints import kill_point\n"
    "for i in range(1, 4):\n"
    "    kill_point('other')\n"
    "    kill_point('stage.step')\n"
    "    print(i, flush=True)\n"
)


def run(spec: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != killpoints.ENV}
    if spec is not None:
        env[killpoints.ENV] = spec
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], check=False, env=env, capture_output=True, text=True, timeout=60
    )


def test_sigkill_at_the_nth_hit_of_the_named_point():
    killed = run("stage.step=2,unused=1")
    assert killed.returncode == -signal.SIGKILL and killed.stdout.split() == ["1"]
    assert run(None).stdout.split() == ["1", "2", "3"]
    assert run("elsewhere=1").returncode == 0


def test_a_malformed_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(killpoints.ENV, "stage.step")
    with pytest.raises(BadOption, match="SMOOTHSAL_KILL_AT='stage.step'.*NAME=N"):
        killpoints.kill_point("stage.step")
