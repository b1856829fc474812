"""What the hardware computes fast: the ``--dtype auto`` choice, with the reason it was made.

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


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags: x86 ``flags`` or ARM ``Features`` of the first processor listed."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


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
