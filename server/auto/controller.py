"""The r=auto controller: per batch, the least merging that keeps every queued auto request on time.

Pure decision logic over an injected clock and an injected time model (``timings.py``); it neither
queues nor runs anything. Auto requests of one model share one FIFO queue; whoever forms batches calls

- :meth:`AutoController.admit` when an auto request arrives: it raises :class:`Overloaded`, with a
  Retry-After from the same prediction, only when even the request's auto ceiling (its largest acceptable
  r) cannot finish it within its target behind the work already queued;
- :meth:`AutoController.decide` when a batch is about to be formed from the head of the queue: it
  returns the batch's r.

Prediction. Batches of the queue run in FIFO order at one r, each on the inference thread that frees
first, after the work already handed to the threads (``busy_s``: seconds until each is free, from
:class:`Backlog`), and take the timing table's time for their size. A request is on time if its batch
finishes by ``arrived + target``.

Choice. Requests that would be late even at the strongest allowed r have lost their target; they
count with a fresh target from now (done within one target from now), so they neither force the
strongest merge (which would hurt everyone else) nor are ignored (a backlog of them would then run
at r=0 and only grow), and those late even so are left out of the criterion.
The *needed* r is the smallest usable r (see ``timings``: never a dominated one) that gets every other
queued request done on time, and whose full batches keep up with the auto arrival rate of the last
``rate_window_s`` (counted at admission). The rate term matters under a steady load between two r's
capacities: the queue alone would say "the larger r emptied me, a smaller one will do" after every
drain, and r would cycle. The batch's r is then capped by the smallest auto ceiling among its
requests and the server-wide one (later batches are planned uncapped: their own ceilings apply when
they are formed).

Hysteresis (why r does not oscillate). The chosen r is the largest r needed by any decision in the
last ``hold_s`` seconds (a sliding-window maximum), snapped to the fastest usable r at or below it:

- r rises at once, in the very decision that needs more (rising late would cost deadlines);
- r falls only after a smaller r has sufficed for ``hold_s`` seconds in a row, and then only to the
  largest r still needed within the window, so it steps down through the levels the load needed;
- after ``hold_s`` without any batch (idle), the window is empty and the next request gets r=0.

A load whose need flips between two levels faster than ``hold_s`` therefore sees one r, the larger.

Not thread-safe by design: admission and batch formation both happen on the event loop. The only
state shared with inference threads is :class:`Backlog` (locked) and the timing table (locked).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


class TimeModel(Protocol):
    """What the controller reads from the timing table (``timings.Snapshot``)."""

    def seconds(self, r: int, batch_size: int) -> float: ...

    def usable(self, batch_size: int) -> tuple[int, ...]: ...

    def fastest_up_to(self, r: int, batch_size: int) -> int: ...


@dataclass(frozen=True)
class Waiting:
    """One queued (or arriving) auto request."""

    arrived: float
    """Clock time of its arrival (the controller's clock)."""
    target_s: float
    max_r: int
    """Its auto ceiling: the largest r it accepts."""

    @property
    def deadline(self) -> float:
        return self.arrived + self.target_s


@dataclass(frozen=True)
class Decision:
    r: int
    """The batch's r."""
    needed_r: int
    """The smallest usable r that met every target this time, before hysteresis."""
    batch_size: int
    predicted_s: float
    """Predicted forward seconds of this batch at ``r``."""
    late: int
    """Queued requests predicted to miss their target even so."""


class Overloaded(Exception):
    """Even the auto ceiling cannot meet the target: refuse now (429) rather than answer late."""

    def __init__(self, retry_after_s: float, predicted_s: float, target_s: float) -> None:
        super().__init__(
            f"predicted {predicted_s * 1000:.0f} ms at the largest acceptable r, target "
            f"{target_s * 1000:.0f} ms; retry in {retry_after_s:.1f} s"
        )
        self.retry_after_s = retry_after_s


class AutoController:
    def __init__(
        self,
        timings: Callable[[], TimeModel],
        max_batch: int,
        max_r: int,
        lanes: int = 1,
        hold_s: float = 1.0,
        rate_window_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``timings`` returns the current timings (``TimingTable.snapshot``); ``max_r`` is the
        server-wide cap (TOME_AUTO_MAX_R); ``lanes`` the batches that run side by side
        (TOME_INSTANCES); ``hold_s`` the hysteresis window; ``rate_window_s`` the window over which
        the arrival rate is counted."""
        if max_batch < 1 or lanes < 1 or hold_s < 0 or max_r < 0 or rate_window_s <= 0:
            raise ValueError("max_batch and lanes must be >= 1, hold_s and max_r >= 0, rate_window_s > 0")
        self._costs, self._clock = timings, clock
        self.max_batch, self.max_r, self.lanes, self.hold_s = max_batch, max_r, lanes, hold_s
        self.rate_window_s = rate_window_s
        self._needs: deque[tuple[float, int]] = deque()  # (time, needed r), needed r decreasing
        self._arrivals: deque[float] = deque()

    def admit(
        self,
        queue: Sequence[Waiting],
        busy_s: Sequence[float],
        request: Waiting,
        timings: TimeModel | None = None,
    ) -> None:
        """Count the arrival, and raise :class:`Overloaded` if ``request``, queued behind ``queue``,
        would miss its target even at its auto ceiling, although it would meet it on an idle server (when
        not even an idle server can meet a target, refusing cannot help: it is served as fast as its
        auto ceiling allows). Batches are assumed full (under load, later arrivals fill them), unless one full
        batch alone misses the target: then the queue's own batches count, else every request would be
        refused, even on an idle server (seen when the timing table followed a loaded machine). ``busy_s``:
        seconds until each inference thread is free (``Backlog.busy_s``; threads not listed are free).
        ``timings``: those of the request's merge rule (None: the ones the controller was made with)."""
        timings, now = self._costs() if timings is None else timings, self._clock()
        self._arrivals.append(now)
        self.arrival_rate()  # drops arrivals older than the window, so the deque stays bounded
        r = timings.fastest_up_to(min(self.max_r, request.max_r), self.max_batch)
        if now + timings.seconds(r, 1) > request.deadline:
            return
        if now + timings.seconds(r, self.max_batch) <= request.deadline:
            sizes = [self.max_batch] * (len(queue) // self.max_batch + 1)
        else:  # not even one full batch meets the target: judge by the queue's own batches
            waiting = len(queue) + 1
            sizes = [min(self.max_batch, waiting - start) for start in range(0, waiting, self.max_batch)]
        finish = now + self._batch_ends(timings, busy_s, r, sizes)[-1]
        if finish > request.deadline:
            raise Overloaded(finish - request.deadline, finish - request.arrived, request.target_s)

    def arrival_rate(self) -> float:
        """Auto requests offered per second (admitted or not) over the last ``rate_window_s``."""
        while self._arrivals and self._arrivals[0] <= self._clock() - self.rate_window_s:
            self._arrivals.popleft()
        return len(self._arrivals) / self.rate_window_s

    def decide(
        self, queue: Sequence[Waiting], busy_s: Sequence[float], timings: TimeModel | None = None
    ) -> Decision:
        """The r of the batch about to be formed from the head of ``queue`` (not empty); ``busy_s`` and
        ``timings`` as for :meth:`admit`."""
        if not queue:
            raise ValueError("no batch to decide for: the queue is empty")
        timings, now = self._costs() if timings is None else timings, self._clock()
        size = min(len(queue), self.max_batch)
        cap = min(self.max_r, *(waiting.max_r for waiting in queue[:size]))
        needed = max(self._needed_for_targets(timings, now, queue, busy_s), self._needed_for_rate(timings))
        r = timings.fastest_up_to(min(self._hold(now, needed), cap), size)
        late = self._on_time(timings, now, queue, busy_s, r).count(False)
        return Decision(r, needed, size, timings.seconds(r, size), late)

    def _needed_for_targets(
        self, timings: TimeModel, now: float, queue: Sequence[Waiting], busy_s: Sequence[float]
    ) -> int:
        """The smallest usable r that gets every savable queued request done on time. A request
        late even at the strongest r has lost its target; it must not force the strongest r, but
        neither may it be ignored (a backlog of such requests, e.g. after a burst that waited in
        decoding, would otherwise run at r=0 and grow): it counts with a fresh target from now."""
        size = min(len(queue), self.max_batch)
        strongest = timings.fastest_up_to(self.max_r, size)
        lost = self._on_time(timings, now, queue, busy_s, strongest)
        queue = [w if ok else Waiting(now, w.target_s, w.max_r) for w, ok in zip(queue, lost, strict=True)]
        savable = self._on_time(timings, now, queue, busy_s, strongest)
        for r in timings.usable(size):
            if r >= strongest:
                break
            if all(map(_implies, savable, self._on_time(timings, now, queue, busy_s, r))):
                return r
        return strongest

    def _needed_for_rate(self, timings: TimeModel) -> int:
        """The smallest usable r whose full batches keep up with the arrival rate. Without this, a
        load between two r's capacities cycles: the larger r empties the queue, the targets then
        need less, r steps down after the hold, the queue grows again, and so on."""
        rate = self.arrival_rate()
        usable = [r for r in timings.usable(self.max_batch) if r <= self.max_r]
        for r in usable:
            if self.lanes * self.max_batch / timings.seconds(r, self.max_batch) >= rate:
                return r
        return usable[-1]

    def _on_time(
        self, timings: TimeModel, now: float, queue: Sequence[Waiting], busy_s: Sequence[float], r: int
    ) -> list[bool]:
        """Whether each of the FIFO ``queue`` finishes by its deadline if all its batches run at ``r``."""
        sizes = [min(self.max_batch, len(queue) - start) for start in range(0, len(queue), self.max_batch)]
        ends = self._batch_ends(timings, busy_s, r, sizes)
        return [now + ends[index // self.max_batch] <= w.deadline for index, w in enumerate(queue)]

    def _batch_ends(
        self, timings: TimeModel, busy_s: Sequence[float], r: int, sizes: list[int]
    ) -> list[float]:
        """Seconds from now until each batch (FIFO, at ``r``) ends, each started on the inference
        thread that frees first."""
        if len(busy_s) > self.lanes:
            raise ValueError(f"{len(busy_s)} busy times for {self.lanes} inference threads")
        free = sorted([*busy_s, *[0.0] * (self.lanes - len(busy_s))])
        ends = []
        for size in sizes:
            end = heapq.heappop(free) + timings.seconds(r, size)
            heapq.heappush(free, end)
            ends.append(end)
        return ends

    def _hold(self, now: float, needed: int) -> int:
        """Record ``needed`` and return the largest r needed within the last ``hold_s``."""
        while self._needs and self._needs[0][0] <= now - self.hold_s:
            self._needs.popleft()
        while self._needs and self._needs[-1][1] <= needed:
            self._needs.pop()  # outlived by a later, larger need: can never be the maximum again
        self._needs.append((now, needed))
        return self._needs[0][1]


def _implies(a: bool, b: bool) -> bool:
    return b or not a


class Backlog:
    """Predicted work already handed to a model's inference threads, so the controller knows how long
    the next batch waits for a thread (``ahead_s``). Thread-safe: batches may start and finish on the
    inference threads."""

    def __init__(self, lanes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.lanes, self._clock = lanes, clock
        self._lock = threading.Lock()
        self._tokens = itertools.count()
        self._batches: dict[int, tuple[float, float | None]] = {}  # token -> (predicted s, started)

    def add(self, predicted_s: float) -> int:
        """A batch was handed to the worker (it may wait for a thread); returns its token."""
        with self._lock:
            token = next(self._tokens)
            self._batches[token] = (predicted_s, None)
            return token

    def start(self, token: int) -> None:
        with self._lock:
            predicted, _ = self._batches[token]
            self._batches[token] = (predicted, self._clock())

    def finish(self, token: int) -> None:
        with self._lock:
            self._batches.pop(token, None)

    def ahead_s(self) -> float:
        """Seconds until some thread is free for a new batch."""
        return self.busy_s()[0]

    def busy_s(self) -> list[float]:
        """Seconds until each thread is free, ascending: running batches' predicted remainders, then
        waiting batches in order, each on the thread that frees first."""
        now = self._clock()
        with self._lock:
            batches = sorted(self._batches.items())
        free = [0.0] * self.lanes
        waiting = []
        for _, (predicted, started) in batches:
            if started is None:
                waiting.append(predicted)
            else:
                heapq.heapreplace(free, free[0] + max(0.0, predicted - (now - started)))
        for predicted in waiting:
            heapq.heapreplace(free, free[0] + predicted)
        return sorted(free)
