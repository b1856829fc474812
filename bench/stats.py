"""The one percentile definition of the project's benchmarks and load tests, and /proc CPU accounting.

Nearest rank: the smallest value with at least q% of the values at or below it. It is always one of
the measured latencies (no interpolation between two requests), it is what most load-testing tools
report, and ``bench/`` and ``loadtest/`` import it from here so their tables agree.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank q-th percentile (0 < q <= 100) of ``values`` (any order); NaN when empty."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendant processes (Linux /proc)."""
    pids = [pid]
    for current in pids:  # grows while it is walked: children, then theirs
        pids += _children(current)
    return pids


def process_cpu_seconds(pid: int, children: bool = True) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc), with its live child processes."""
    return sum(_own_cpu_seconds(each) for each in (process_tree(pid) if children else [pid]))


def _own_cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime 14 and stime 15 (1-based, man 5 proc).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(child) for child in handle.read().split()]
        except OSError:
            continue
    return found


@dataclass(frozen=True)
class MachineTimes:
    """Jiffies since boot summed over all CPUs (/proc/stat): busy and idle (idle + iowait)."""

    busy: int
    idle: int

    @classmethod
    def now(cls) -> MachineTimes:
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal guest guest_nice; guest time is in user already
        idle = values[3] + values[4]
        busy = sum(values[:8]) - idle
        return cls(busy, idle)


@dataclass
class CpuSample:
    """CPU use over an interval: the server, the load generator (this process), the machine."""

    wall: float
    server_s: float
    client_s: float
    machine_busy_s: float
    machine_idle_s: float

    def shares(self, cpus: int) -> dict[str, float]:
        """Fractions of the machine's capacity (cpus x wall) used by each, and idle."""
        capacity = max(self.wall * cpus, 1e-9)
        total = max(self.machine_busy_s + self.machine_idle_s, 1e-9)
        return {
            "server_cores": round(self.server_s / self.wall, 3),
            "load_generator_cores": round(self.client_s / self.wall, 3),
            "server_share": round(self.server_s / capacity, 3),
            "load_generator_share": round(self.client_s / capacity, 3),
            "machine_busy_share": round(self.machine_busy_s / total, 3),
            "machine_idle_share": round(self.machine_idle_s / total, 3),
        }


class CpuMeter:
    """``with CpuMeter(server_pid) as meter: ...`` then ``meter.sample``: CPU use over the block."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.sample: CpuSample | None = None

    def _read(self) -> tuple[float, float, float, MachineTimes]:
        import time

        server = process_cpu_seconds(self.server_pid) if self.server_pid else 0.0
        times = os.times()
        return time.monotonic(), server, times.user + times.system, MachineTimes.now()

    def __enter__(self) -> CpuMeter:
        self._start = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        wall0, server0, client0, machine0 = self._start
        wall1, server1, client1, machine1 = self._read()
        self.sample = CpuSample(
            wall=wall1 - wall0,
            server_s=server1 - server0,
            client_s=client1 - client0,
            machine_busy_s=(machine1.busy - machine0.busy) / CLOCK_TICKS,
            machine_idle_s=(machine1.idle - machine0.idle) / CLOCK_TICKS,
        )


def load_average(path: str = "/proc/loadavg") -> float | None:
    """The machine's 1-minute load average (Linux), None where there is none. A benchmark on a shared
    machine names it at its start and its end, beside its figures."""
    try:
        with open(path) as handle:
            return float(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def cpu_description() -> str:
    """The CPU's model name and its native bfloat16 flags (/proc/cpuinfo), for a figure's caption."""
    from tome_runtime.hardware import CPU_BF16_FLAGS, cpu_flags, cpu_name

    flags = sorted(cpu_flags() & set(CPU_BF16_FLAGS))
    return f"{cpu_name() or 'unknown CPU'} ({', '.join(flags) or 'no bfloat16 flags'})"


def run_facts(load_at_start: float | None) -> dict[str, Any]:
    """What a benchmark's result names beside its figures: the machine, the load average at the
    run's start and now (its end), the date and the command."""
    return {
        "machine": cpu_description(),
        "load_average": {"start": load_at_start, "end": load_average()},
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
    }
