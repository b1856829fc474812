"""The background re-check of a timing table loaded from the state folder (server/state.py).

A table kept from an earlier process is valid by its key (same model, weights, dtype, hardware,
versions and thread plan), but this machine may still differ from the one that measured it: its
neighbours, its clock, its memory. Once the server is ready, every cell is measured again once, in
the warm-up's order (every r at the largest batch and at batch 1 first: the cells r=auto decides
from most), one batch at a time and only while the lane is idle, within the budget a cold start
would spend (counting only the seconds the batches take). A request that arrives meanwhile waits at
most for the one batch running; the batch goes through r=auto's backlog like any other, so
predictions count it.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .timings import BatchTimer, TimingTable

log = logging.getLogger(__name__)


class Stopped(Exception):
    """The server began shutting down during the re-check."""


class IdleTimer:
    """A :data:`BatchTimer` that runs each batch only once ``idle()`` holds, and whose :meth:`clock`
    counts only the seconds its batches took (the budget of a re-check spread over idle moments)."""

    def __init__(
        self, timer: BatchTimer, idle: Callable[[], bool], stop: threading.Event, poll_s: float = 0.2
    ) -> None:
        self._timer, self._idle, self._stop, self._poll_s = timer, idle, stop, poll_s
        self._busy = 0.0
        self.calls: Counter[tuple[int, int]] = Counter()

    def __call__(self, r: int, batch_size: int) -> float:
        while not self._idle():
            if self._stop.wait(self._poll_s):
                raise Stopped()
        if self._stop.is_set():
            raise Stopped()
        started = time.monotonic()
        try:
            return self._timer(r, batch_size)
        finally:
            self._busy += time.monotonic() - started
            self.calls[(r, batch_size)] += 1

    def clock(self) -> float:
        return self._busy


@dataclass(frozen=True)
class Recheck:
    cells: int
    """Cells measured again."""
    ratios: list[float]
    """Per cell, its seconds now over its seconds as loaded."""
    stopped: bool
    seconds: float = 0.0
    """Batch seconds it spent (of its budget)."""

    def describe(self) -> str:
        if not self.ratios:
            return "no cell re-measured" + (" (shutting down)" if self.stopped else "")
        low, middle, high = min(self.ratios), statistics.median(self.ratios), max(self.ratios)
        return (
            f"{self.cells} cells re-measured while idle: now / saved = {middle:.2f} (median; "
            f"{low:.2f} to {high:.2f})" + (" before shutting down" if self.stopped else "")
        )


def recheck(
    table: TimingTable,
    timer: BatchTimer,
    idle: Callable[[], bool],
    stop: threading.Event,
    budget_s: float,
) -> Recheck:
    """Measure the table's cells again (see the module docstring); the fresh measurements replace
    the loaded ones, as a cold start's would."""
    before = table.snapshot()
    idle_timer = IdleTimer(timer, idle, stop)
    stopped = False
    try:
        table.warm_up(idle_timer, budget_s, repeats=1, clock=idle_timer.clock)
    except Stopped:
        stopped = True
    after = table.snapshot()
    # A cell's first visit is an untimed batch and then a timed one (TimingTable.warm_up).
    measured = sorted(cell for cell, calls in idle_timer.calls.items() if calls >= 2)
    ratios = [after.seconds(*cell) / before.seconds(*cell) for cell in measured]
    return Recheck(len(ratios), ratios, stopped, idle_timer.clock())
