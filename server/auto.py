"""r=auto for one model: its cost table, controller, backlog and metrics behind the calls a batcher
makes. The batcher keeps one FIFO queue of auto requests per model and calls

- :meth:`AutoR.admit` when an auto request arrives (raises ``Overloaded``: answer 429 with its
  ``retry_after_s``), then queues it;
- :meth:`AutoR.choose` when a batch is formed from the head of that queue: the batch's r;
- :meth:`AutoR.handed`, :meth:`AutoR.running` and :meth:`AutoR.finished` around *every* batch of the
  model, fixed r included, since they all take the same inference threads (``finished`` may be called
  on an inference thread);
- :meth:`AutoR.answered` / :meth:`AutoR.timed_out` per auto request, for the metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from .auto_metrics import AutoMetrics
from .controller import AutoController, Backlog, Decision, Overloaded, Waiting
from .costs import CostTable


class AutoR:
    def __init__(
        self,
        table: CostTable,
        auto_max_r: int,
        lanes: int = 1,
        metrics: AutoMetrics | None = None,
        hold_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``table`` is the model's cost table (warmed up, or filling from real batches);
        ``auto_max_r`` the server's cap for it; ``lanes`` its inference threads (TOME_INSTANCES)."""
        if not table.snapshot().ready:
            raise ValueError(
                f"{table.model}: warm the cost table up first (a budget of 0 still measures one cell)"
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

    def handed(self, r: int, batch_size: int) -> int:
        """A batch of the model was handed to its inference threads; returns its backlog token."""
        return self.backlog.add(self.table.snapshot().estimate(r, batch_size))

    def running(self, token: int) -> None:
        self.backlog.start(token)

    def finished(self, token: int, r: int, batch_size: int, seconds: float | None) -> None:
        """The batch is done; ``seconds`` its forward time (None if it failed: nothing learnt)."""
        self.backlog.finish(token)
        if seconds is not None:
            self.table.observe(r, batch_size, seconds)

    def answered(self, r: int, latency_s: float, target_s: float) -> None:
        if self.metrics is not None:
            self.metrics.answered(self.model, r, latency_s, target_s)

    def timed_out(self) -> None:
        if self.metrics is not None:
            self.metrics.timed_out(self.model)
