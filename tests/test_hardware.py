"""What the machine computes natively (smoothsal.hardware), precision auto, and the bf16 gates
(smoothsal.deviation): known answers."""

from __future__ import annotations

import math
import os

import pytest
import torch

from smoothsal.deviation import GATES, Deviation, deviation
from smoothsal.hardware import Hardware, bf16_cap, describe, hardware
from smoothsal.precision import CHOICES, resolve_precision


@pytest.mark.parametrize(
    "onednn,capability,cap",
    [
        ("", "AVX512", ""),
        ("ALL", "AVX512", ""),
        ("avx512_core_amx", "AVX512", ""),
        ("AVX512_CORE_BF16", "AVX512", ""),
        ("AVX2", "AVX512", "ONEDNN_MAX_CPU_ISA=AVX2"),
        ("AVX512_CORE", "AVX512", "ONEDNN_MAX_CPU_ISA=AVX512_CORE"),
        ("", "AVX2", "ATEN_CPU_CAPABILITY=avx2"),
        ("AVX2", "AVX2", "ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2"),
    ],
)
def test_what_takes_native_bf16_away(monkeypatch, onednn, capability, cap):
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    if onednn:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn)
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert bf16_cap(capability) == cap


def test_the_warning_names_the_hardware_and_the_slowdown():
    native = Hardware("cpu", "Xeon", "AVX512", ("amx_bf16",), "", True)
    capped = Hardware("cpu", "Xeon", "AVX2", ("amx_bf16",), "ONEDNN_MAX_CPU_ISA=AVX2", False)
    absent = Hardware("cpu", "AMD EPYC", "AVX2", (), "", False)
    old_gpu = Hardware("cuda", "Tesla V100", "sm_70", (), "", False)
    assert native.bf16_warning() is None
    assert "capped by ONEDNN_MAX_CPU_ISA=AVX2" in capped.bf16_warning()
    line = absent.bf16_warning()
    assert "\n" not in line and "AMD EPYC" in line and "AVX2" in line and "slower than fp32" in line
    assert "no amx_bf16 or avx512_bf16 CPU flag" in line
    assert "compute capability below 8.0" in old_gpu.bf16_warning()


def test_this_machine_is_described_in_one_line():
    h = hardware("cpu")
    line = describe("cpu")
    assert "\n" not in line and h.model in line and f"capability {h.capability}" in line
    assert f"{os.cpu_count()} cores" in line and "amx_bf16" in line and torch.__version__ in line
    assert h.native_bf16 == (bool(h.flags) and not h.cap)
    assert h.as_dict()["flags"] == list(h.flags)


def test_auto_follows_the_hardware_and_other_choices_stay():
    assert "auto" in CHOICES
    assert resolve_precision("auto", "cpu") == ("bf16" if hardware("cpu").native_bf16 else "fp32")
    for p in ("fp32", "bf16"):
        assert resolve_precision(p, "cpu") == p
    with pytest.raises(ValueError, match="allowed: fp32, tf32, bf16, auto"):
        resolve_precision("fp16", "cpu")


def _cell(**kw) -> Deviation:
    values = {"attribution": "deeplift", "layer": "layer1", "tiles": 8, "cosine_min": 0.99,
              "cosine_median": 0.995, "relative_error_median": 0.01, "relative_error_max": 0.05,
              "tv_change": 0.001} | kw  # fmt: skip
    return Deviation(**values)


def test_the_gates_known_answers():
    assert _cell().missed() == []
    assert _cell(cosine_median=0.97).missed() == [f"cosine median 0.9700 < {GATES.cosine_median}"]
    assert _cell(cosine_min=0.9).missed() == ["cosine min 0.9000 < 0.95"]
    assert _cell(tv_change=-0.03).missed() == ["TV change -3.00% beyond ±2%"]
    assert _cell(relative_error_median=0.05).missed() == ["relative error median 0.0500 > 0.03"]
    assert _cell(attribution="gradient", relative_error_median=0.05).missed() == []  # gradient: not gated
    assert len(_cell(cosine_median=math.nan).missed()) == 1  # NaN fails, never passes


def test_deviation_known_answers():
    torch.manual_seed(0)
    ref = torch.randn(3, 4, 8, 8)
    same = deviation("gradient", "layer1", ref, ref)
    assert same.cosine_min == pytest.approx(1.0) and same.relative_error_max == 0 and same.tv_change == 0
    scaled = deviation("gradient", "layer1", 1.1 * ref, ref)  # a scale: same picture, same TV
    assert scaled.cosine_min == pytest.approx(1.0) and scaled.relative_error_median == pytest.approx(0.1)
    assert scaled.tv_change == pytest.approx(0.0, abs=1e-6) and scaled.tiles == 3
    flipped = deviation("deeplift", "layer1", -ref, ref)
    assert flipped.cosine_median == pytest.approx(-1.0) and len(flipped.missed()) >= 3
