"""What the hardware computes fast: the CPU's name and flags, the device, and the ``--dtype auto``
choice with the reason it was made. The server, ``tome-eval`` and ``tome-bench`` all ask here.

bfloat16 halves the bytes of every weight and activation, and on hardware with bfloat16 arithmetic
it is 1.3-3x faster than float32 for a ViT (measured in notes of issue 11: AMD EPYC with
AVX-512-BF16, ViT-S/16 at r=16). Without native support torch emulates it and it is slower than
float32, so ``auto`` picks bfloat16 only where the hardware has it:

- CPU: the ``avx512_bf16`` or ``amx_bf16`` flag in /proc/cpuinfo (x86; Intel Cooper Lake and later,
  Sapphire Rapids AMX, AMD Zen 4 and later), or ``bf16`` in the Features line on ARM (Armv8.6 BF16,
  e.g. Graviton 3 and later).
- CUDA: ``torch.cuda.is_bf16_supported()`` on a GPU of compute capability 8.0 or later (Ampere+);
  older GPUs emulate it.
- Anything else (MPS, unknown): float32.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""x86 /proc/cpuinfo flags for native bfloat16 arithmetic, the stronger first."""


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def _field(names: tuple[str, ...], cpuinfo: str | None) -> str | None:
    """The first value of any of ``names`` in /proc/cpuinfo (or in the ``cpuinfo`` text)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in names:
            return value.strip()
    return None


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags: x86 ``flags`` or ARM ``Features`` of the first processor listed."""
    return set((_field(("flags", "Features"), cpuinfo) or "").split())


def cpu_name(cpuinfo: str | None = None) -> str | None:
    """The CPU's model name as the kernel gives it (``platform.processor()`` is often empty on Linux)."""
    return _field(("model name",), cpuinfo) or platform.processor() or None


def cpu_bf16_reason(flags: set[str]) -> str | None:
    """Why this CPU has native bfloat16 (the flag that says so), or None."""
    for flag in CPU_BF16_FLAGS:
        if flag in flags:
            return f"the CPU has native bfloat16 ({flag})"
    if "bf16" in flags:  # ARM: FEAT_BF16
        return "the CPU has native bfloat16 (bf16)"
    return None


def auto_dtype(device: torch.device | str, cpuinfo: str | None = None) -> DtypeChoice:
    """bfloat16 where ``device`` computes it natively, else float32; with the reason."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        major, minor = torch.cuda.get_device_capability(index)
        if major >= 8 and torch.cuda.is_bf16_supported(including_emulation=False):
            return DtypeChoice(torch.bfloat16, f"{name} (compute capability {major}.{minor}) has bfloat16")
        return DtypeChoice(
            torch.float32, f"{name} (compute capability {major}.{minor}) has no native bfloat16"
        )
    if device.type == "cpu":
        reason = cpu_bf16_reason(cpu_flags(cpuinfo))
        if reason is not None:
            return DtypeChoice(torch.bfloat16, reason)
        capability = torch.backends.cpu.get_cpu_capability()
        return DtypeChoice(
            torch.float32, f"the CPU has no native bfloat16 (torch's CPU capability: {capability})"
        )
    return DtypeChoice(torch.float32, f"no bfloat16 detection for {device.type} devices: float32")


def resolve_dtype(requested: str, device: torch.device | str) -> DtypeChoice:
    """``requested`` ("auto", "float32", "bfloat16", "float16") -> the dtype to run, and why."""
    if requested == "auto":
        choice = auto_dtype(device)
        log.info("dtype auto -> %s: %s", choice.name, choice.reason)
        return choice
    dtype = getattr(torch, requested, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unknown dtype {requested!r}: use auto, float32, bfloat16 or float16")
    return DtypeChoice(dtype, "set explicitly")


class DeviceError(RuntimeError):
    """The device that was asked for does not exist here; the message says what to use instead."""


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA if PyTorch sees a GPU, else CPU), ``cpu`` or ``cuda``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but PyTorch sees no CUDA device; use --device cpu")
    return torch.device(name)
