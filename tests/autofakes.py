"""Fakes shared by the r=auto tests: a clock that only moves when told, and batch times shaped like
this project's CPU (merging costs a fixed overhead per batch and saves time per image, so it does
not pay at batch 1 and pays well at batch 8)."""

from __future__ import annotations

from tome_serve.auto.timings import TimingTable

R_MAX = 24
MAX_BATCH = 8


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def cpu_like(r: int, batch_size: int) -> float:
    """Seconds of one batch: 4 ms + 0.5 ms per unit of r fixed, 10 ms per image at r=0, shrinking
    linearly with r (r=24: 2.5 ms per image). At batch 1 every r > 0 is slower than r=0."""
    return 0.004 + 0.0005 * r + 0.010 * (1 - r / 32) * batch_size


def with_slow_r20(r: int, batch_size: int) -> float:
    """As :func:`cpu_like`, but r=20 hits a slow path (an unlucky shape): dominated at every size."""
    return cpu_like(r, batch_size) + (0.05 if r == 20 else 0.0)


class TimedRunner:
    """A batch timer that advances the fake clock by the time it reports, and logs its calls."""

    def __init__(self, clock: FakeClock, seconds=cpu_like) -> None:
        self.clock, self._seconds = clock, seconds
        self.calls: list[tuple[int, int]] = []

    def __call__(self, r: int, batch_size: int) -> float:
        seconds = self._seconds(r, batch_size)
        self.clock.advance(seconds)
        self.calls.append((r, batch_size))
        return seconds


def warmed_table(
    seconds=cpu_like, r_max: int = R_MAX, max_batch: int = MAX_BATCH, merge: str = "tome"
) -> TimingTable:
    """A timing table of merge rule ``merge`` with every cell measured from ``seconds``."""
    table = TimingTable("fake", r_max, max_batch, merge=merge)
    table.warm_up(TimedRunner(FakeClock(), seconds), budget_s=1e9, clock=FakeClock())
    return table
