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
import os
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


@dataclass(frozen=True)
class ThreadPlan:
    """How a model's CPU work is split: inference threads (instances), torch threads in each, and
    the threads that decode and preprocess uploads; with the reason for the automatic values."""

    instances: int
    torch_threads: int
    preprocess_threads: int
    reason: str
    decode_between_batches: bool = False
    """Decoding waits while a forward pass runs (see ``inference.ForwardGate``): set when one
    instance's torch threads take every core."""


SMALL_CPU_CORES = 4
"""Up to this many cores, each instance runs one torch thread: no OpenMP barrier to stall."""
THREADS_PER_INSTANCE = 4
"""On larger CPUs, torch threads per instance."""


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may use: its affinity mask (a container's cpuset, taskset), capped by a
    cgroup v2 CPU quota (a container's or pod's CPU limit, rounded up)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def plan_threads(
    instances: int | str,
    torch_threads: int | str,
    preprocess_threads: int | str,
    device: torch.device | str = "cpu",
    cores: int | None = None,
) -> ThreadPlan:
    """Resolve each "auto" from the cores (explicit integers are kept).

    On a CPU the cores are shared out so that instances x torch threads = cores: on up to
    :data:`SMALL_CPU_CORES` cores one instance per core with one torch thread each (a forward
    spread over two cores stalls at every barrier when anything else takes part of a core; two
    single-threaded batches side by side do not), on more cores instances of
    :data:`THREADS_PER_INSTANCE` threads. Preprocessing gets a quarter of the cores (at least one):
    decoding and resizing a typical upload costs 2-5 % of the model's time per image. On a GPU one
    instance feeds the device and the CPU threads decode.

    One CPU instance whose torch threads take every core (``TOME_INSTANCES=1`` on a small CPU) has
    its images decoded between its batches instead of beside them, by as many preprocessing
    threads as torch threads.
    """
    cores = usable_cores() if cores is None else max(1, cores)
    why: list[str] = []
    if torch.device(device).type != "cpu":
        n = 1 if instances == "auto" else int(instances)
        t = max(1, cores // n) if torch_threads == "auto" else int(torch_threads)
        p = max(1, min(4, cores // 2)) if preprocess_threads == "auto" else int(preprocess_threads)
        return ThreadPlan(n, t, p, f"{torch.device(device).type}: one instance per model; {cores} CPU cores")
    if instances == "auto" and torch_threads == "auto":
        t = 1 if cores <= SMALL_CPU_CORES else THREADS_PER_INSTANCE
        n = max(1, cores // t)
        why.append(f"{cores} cores: {n} instance(s) x {t} torch thread(s)")
    elif instances == "auto":
        t = int(torch_threads)
        n = max(1, cores // t)
        why.append(f"{cores} cores / {t} torch threads: {n} instance(s)")
    else:
        n = int(instances)
        t = max(1, cores // n) if torch_threads == "auto" else int(torch_threads)
        if torch_threads == "auto":
            why.append(f"{cores} cores / {n} instance(s): {t} torch thread(s) each")
    between = n == 1 and t > 1 and cores <= t  # no core is left for decoding beside the pass
    p = (t if between else max(1, cores // 4)) if preprocess_threads == "auto" else int(preprocess_threads)
    if preprocess_threads == "auto":
        why.append(f"{p} preprocessing thread(s)")
    if between:
        why.append("one instance takes every core: images are decoded between its batches")
    return ThreadPlan(n, t, p, "; ".join(why) or "set explicitly", between)
