"""r=auto for one model: its timing table, controller, backlog and metrics, behind the calls its lane
makes. The lane keeps one FIFO queue of auto requests and calls

- :meth:`AutoR.admit` when an auto request arrives (raises ``Overloaded``: answer 429 with its
  ``retry_after_s``), then queues it;
- :meth:`AutoR.choose` when a batch is formed from the head of that queue: the batch's r;
- :meth:`AutoR.handed` for *every* batch of the model, fixed r included: all batches of a model take
  the same inference threads, so r=auto must see each of them to predict when a thread is free. It
  returns the batch's :class:`BatchTicket`, the one hook the inference thread calls;
- :meth:`AutoR.answered` / :meth:`AutoR.timed_out` per auto request, for the metrics.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from .controller import AutoController, Backlog, Decision, Overloaded, Waiting
from .metrics import AutoMetrics
from .timings import TimingTable


class BatchTicket:
    """One batch on its way through the inference threads: :meth:`started` when its forward pass
    begins and :meth:`finished` with the forward seconds (None if it failed or never ran), which frees
    its place in the backlog and teaches the timing table. ``finished`` acts once: the inference thread
    calls it, and the lane again as a safety net."""

    def __init__(self, auto: AutoR, token: int, r: int, size: int, learn: bool = True) -> None:
        self._auto, self._token, self.r, self.size, self._learn = auto, token, r, size, learn
        self._done = threading.Event()

    def started(self) -> None:
        self._auto.backlog.start(self._token)

    def finished(self, seconds: float | None) -> None:
        if self._done.is_set():
            return
        self._done.set()
        self._auto.backlog.finish(self._token)
        if seconds is not None and self._learn:
            self._auto.table.observe(self.r, self.size, seconds)


class AutoR:
    def __init__(
        self,
        table: TimingTable,
        auto_max_r: int,
        lanes: int = 1,
        metrics: AutoMetrics | None = None,
        hold_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``table`` is the model's timing table (warmed up, or filling from real batches);
        ``auto_max_r`` the model's auto ceiling; ``lanes`` its inference threads (TOME_INSTANCES)."""
        if not table.snapshot().ready:
            raise ValueError(
                f"{table.model}: warm the timing table up first (a budget of 0 still measures one cell)"
            )
        self.table, self.metrics = table, metrics
        self.backlog = Backlog(lanes, clock)
        self.controller = AutoController(
            table.snapshot, table.max_batch, auto_max_r, lanes=lanes, hold_s=hold_s, clock=clock
        )

    @property
    def model(self) -> str:
        return self.table.model

    def admit(self, queued: Sequence[Waiting], request: Waiting) -> None:
        try:
            self.controller.admit(queued, self.backlog.busy_s(), request)
        except Overloaded:
            if self.metrics is not None:
                self.metrics.shed(self.model)
            raise

    def choose(self, queued: Sequence[Waiting]) -> Decision:
        return self.controller.decide(queued, self.backlog.busy_s())

    def handed(self, r: int, batch_size: int, merge: str | None = None) -> BatchTicket:
        """A batch of the model was handed to its inference threads (it may wait for one). Its time
        teaches the timing table only when it ran with the table's merge rule (``merge`` None or equal)."""
        token = self.backlog.add(self.table.snapshot().estimate(r, batch_size))
        return BatchTicket(self, token, r, batch_size, learn=merge in (None, self.table.merge))

    def answered(self, r: int, latency_s: float, target_s: float) -> None:
        if self.metrics is not None:
            self.metrics.answered(self.model, r, latency_s, target_s)

    def timed_out(self) -> None:
        if self.metrics is not None:
            self.metrics.timed_out(self.model)
