"""How the server shares out the CPU: inference instances, torch threads in each, preprocessing threads.

Only the server runs several model instances beside its decoding threads; the CPU facts it starts
from (name, flags, dtype) are in :mod:`tome_runtime.hardware`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


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


def loading_threads(cores: int | None = None) -> int:
    """torch threads for creating and loading a model: as many as one instance of the automatic plan
    runs with (1 on up to :data:`SMALL_CPU_CORES` cores).

    Creating a model is dozens of elementwise passes over every weight (timm's seeded init, a file's
    copy, a dtype cast), and with one torch thread per core each pass waits at an OpenMP barrier for
    the busiest core. On the 2-vCPU VM shared with other work (docs/r-auto.md), ViT-S/16's seeded
    init took 2.0 s on 2 threads and 0.46 s on 1, with the same tensors."""
    cores = usable_cores() if cores is None else max(1, cores)
    return 1 if cores <= SMALL_CPU_CORES else THREADS_PER_INSTANCE


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch runs on ``count`` threads in the calling thread meanwhile. The count is put back after:
    ``torch.set_num_threads`` also sets the count that threads started later begin with."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
