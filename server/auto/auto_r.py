"""r=auto for one model: its timing tables (one per merge rule), controller, backlog and metrics, behind
the calls its lane makes. The lane keeps one FIFO queue of auto requests per merge rule they name, and
one for those that name none, and calls

- :meth:`AutoR.admit` when an auto request arrives (raises ``Overloaded``: answer 429 with its
  ``retry_after_s``), then queues it;
- :meth:`AutoR.choose` when a batch is formed from the head of a queue of one rule: the batch's r;
  :meth:`AutoR.choose_pair` for the queue that names none: the batch's r and rule (``pareto.py``);
- :meth:`AutoR.handed` for *every* batch of the model, fixed r included: all batches of a model take
  the same inference threads, so r=auto must see each of them to predict when a thread is free. It
  returns the batch's :class:`BatchTicket`, the one hook the inference thread calls;
- :meth:`AutoR.answered` / :meth:`AutoR.timed_out` per auto request, for the metrics.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from . import pareto
from .controller import AutoController, Backlog, Decision, Overloaded, Waiting
from .metrics import AutoMetrics
from .pareto import LowerBound
from .timings import Snapshot, TimingTable


class BatchTicket:
    """One batch on its way through the inference threads: :meth:`started` when its forward pass
    begins and :meth:`finished` with the forward seconds (None if it failed or never ran), which frees
    its place in the backlog and teaches the timing table. ``finished`` acts once: the inference thread
    calls it, and the lane again as a safety net."""

    def __init__(self, auto: AutoR, token: int, r: int, size: int, table: TimingTable | None) -> None:
        """``table``: the timing table it teaches (its merge rule's; None: none)."""
        self._auto, self._token, self.r, self.size, self._table = auto, token, r, size, table
        self._done = threading.Event()

    def started(self) -> None:
        self._auto.backlog.start(self._token)

    def finished(self, seconds: float | None) -> None:
        if self._done.is_set():
            return
        self._done.set()
        self._auto.backlog.finish(self._token)
        if seconds is not None and self._table is not None:
            self._table.observe(self.r, self.size, seconds)


class AutoR:
    def __init__(
        self,
        tables: Sequence[TimingTable],
        auto_max_r: int,
        lanes: int = 1,
        metrics: AutoMetrics | None = None,
        hold_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``tables``: the model's timing table of each merge rule, the default rule's first (warmed
        up, or filling from real batches); ``auto_max_r`` the model's auto ceiling; ``lanes`` its
        inference threads (TOME_INSTANCES)."""
        for table in tables:
            if not table.snapshot().ready:
                raise ValueError(
                    f"{table.model}: warm the timing table up first (merge rule {table.merge}; a budget of "
                    "0 still measures one cell)"
                )
        self.tables = {table.merge: table for table in tables}
        self.table = tables[0]
        """The default merge rule's: the controller plans every queue that names no rule with it."""
        self.metrics = metrics
        self.backlog = Backlog(lanes, clock)
        self.controller = AutoController(
            self.table.snapshot, self.table.max_batch, auto_max_r, lanes=lanes, hold_s=hold_s, clock=clock
        )

    @property
    def model(self) -> str:
        return self.table.model

    def admit(self, queued: Sequence[Waiting], request: Waiting, merge: str | None = None) -> None:
        """``merge``: the rule the request names (None: it names none; planned with the default's)."""
        try:
            self.controller.admit(queued, self.backlog.busy_s(), request, self._timings(merge))
        except Overloaded:
            if self.metrics is not None:
                self.metrics.shed(self.model)
            raise

    def choose(self, queued: Sequence[Waiting], merge: str | None = None) -> Decision:
        """The r of a batch of a queue of rule ``merge`` (None: the default rule)."""
        return self.controller.decide(queued, self.backlog.busy_s(), self._timings(merge))

    def choose_pair(
        self, queued: Sequence[Waiting], ceilings: Mapping[str, int], lower: LowerBound
    ) -> tuple[Decision, str]:
        """The r and merge rule of a batch of the queue that names no rule (``pareto.choose``):
        ``ceilings`` is the batch's auto ceiling per rule, ``lower`` the fidelity of its kind."""
        decision = self.choose(queued)
        timings = {rule: table.snapshot() for rule, table in self.tables.items()}
        pair = pareto.choose(decision.r, decision.batch_size, timings, ceilings, lower, self.table.merge)
        return dataclasses.replace(decision, r=pair.r, predicted_s=pair.seconds), pair.merge

    def handed(self, r: int, batch_size: int, merge: str | None = None) -> BatchTicket:
        """A batch of the model was handed to its inference threads (it may wait for one). Its time
        teaches the timing table of the rule it ran with (``merge``; None: the default rule)."""
        table = self.tables.get(merge or self.table.merge)
        token = self.backlog.add((table or self.table).snapshot().estimate(r, batch_size))
        return BatchTicket(self, token, r, batch_size, table)

    def _timings(self, merge: str | None) -> Snapshot:
        return self.tables[merge or self.table.merge].snapshot()

    def answered(self, r: int, latency_s: float, target_s: float) -> None:
        if self.metrics is not None:
            self.metrics.answered(self.model, r, latency_s, target_s)

    def timed_out(self) -> None:
        if self.metrics is not None:
            self.metrics.timed_out(self.model)
