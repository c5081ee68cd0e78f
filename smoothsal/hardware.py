"""What the machine computes natively: the CPU or GPU, and whether it has bf16 in hardware.

bf16 pays only where the hardware has it: AMX or AVX512-BF16 on a CPU, compute capability ≥ 8.0 on
CUDA. Elsewhere PyTorch emulates it, several times slower than fp32 (6.6× measured for the full
matrix on a 2-core AMD EPYC with AVX2). ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is no guide:
it is true on any AVX-512 CPU, where bf16 may still be emulated. Benchmarks print ``describe()``
first; stores record ``Hardware.as_dict()`` next to the precision they computed in.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from functools import cache

import torch

__all__ = ["BF16_FLAGS", "Hardware", "bf16_cap", "describe", "hardware"]

BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX10")  # prefixes that keep bf16 native
_SLOWDOWN = "several times slower than fp32 (6.6x measured on an AVX2 CPU)"


@dataclass(frozen=True)
class Hardware:
    """One device as smoothsal sees it."""

    device: str  # "cpu" or "cuda"
    model: str  # CPU model name or GPU name
    capability: str  # PyTorch's CPU capability (AVX2, AVX512, …) or the CUDA compute capability
    flags: tuple[str, ...]  # the BF16_FLAGS the CPU reports (empty on CUDA)
    cap: str  # what takes native bf16 away: ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY, else ""
    native_bf16: bool

    def as_dict(self) -> dict[str, object]:
        return asdict(self) | {"flags": list(self.flags)}

    def bf16_warning(self) -> str | None:
        """One line for a bf16 request on hardware without native bf16, else None."""
        if self.native_bf16:
            return None
        why = f"capped by {self.cap}" if self.cap else _missing(self)
        return (
            f"bf16 requested on {self.model} ({self.device}, {self.capability}) without native bf16 ({why}): "
            f"expect it {_SLOWDOWN}; use precision fp32 or auto"
        )


def _missing(h: Hardware) -> str:
    if h.device == "cuda":
        return "compute capability below 8.0"
    return f"no {' or '.join(BF16_FLAGS)} CPU flag"


def _cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and flags (Linux /proc/cpuinfo; elsewhere the platform's name, no flags)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return platform.processor() or platform.machine(), set()
    model, flags = platform.machine(), set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == platform.machine():
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def bf16_cap(capability: str) -> str:
    """The environment settings that keep a bf16-capable CPU from using it ("" when none does)."""
    caps = []
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if onednn and onednn not in ("ALL", "DEFAULT") and not onednn.startswith(_ONEDNN_BF16_ISAS):
        caps.append(f"ONEDNN_MAX_CPU_ISA={onednn}")
    if not capability.upper().startswith("AVX512"):
        caps.append(f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', capability.lower())}")
    return ", ".join(caps)


@cache
def _cpu() -> Hardware:
    model, flags = _cpu_info()
    capability = torch.backends.cpu.get_cpu_capability()
    present = tuple(f for f in BF16_FLAGS if f in flags)
    cap = bf16_cap(capability) if present else ""
    return Hardware("cpu", model, capability, present, cap, bool(present) and not cap)


def hardware(device: torch.device | str = "cpu") -> Hardware:
    """The device's model, capability and native bf16 (the CPU's is read once per process)."""
    device = torch.device(device)
    if device.type != "cuda":
        return _cpu()
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    return Hardware("cuda", name, f"sm_{major}{minor}", (), "", (major, minor) >= (8, 0))


def describe(device: torch.device | str = "cpu") -> str:
    """One line for the head of every benchmark: model, cores, capability, bf16 flags, torch."""
    h = hardware(device)
    flags = (
        ", ".join(f"{f} {'yes' if f in h.flags else 'no'}" for f in BF16_FLAGS) if h.device == "cpu" else ""
    )
    cores = f"{os.cpu_count()} cores, " if h.device == "cpu" else ""
    native = "native bf16" if h.native_bf16 else f"bf16 emulated ({h.cap or _missing(h)})"
    parts = [
        f"{h.device}: {h.model}",
        f"{cores}capability {h.capability}",
        flags,
        native,
        f"torch {torch.__version__}",
    ]
    return "; ".join(p for p in parts if p)
