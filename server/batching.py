"""Dynamic batching: one bounded queue per key (here: (model, r)), each drained by its own loop.

Nothing here knows about HTTP or models. A :class:`Batcher` takes payloads with a deadline and
hands lists of them to a runner coroutine. A batch closes when it holds ``max_batch_size`` jobs
or when its oldest job has waited ``max_delay_s``; it only ever holds jobs of one key, so for the
server every batch has one model and one r and therefore one static shape.

Backpressure: a full queue refuses new jobs (:class:`QueueFullError`, with a retry hint). A job
whose deadline passes while queued is failed with :class:`DeadlineExceededError` and never reaches
the runner; a job its caller gave up on (:meth:`Batcher.withdraw`) is dropped the same way.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
P = TypeVar("P")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 8
    max_delay_s: float = 0.005
    max_queue: int = 64
    max_running: int = 1
    """Batches of one key that may run at once (one per inference thread that can take them)."""

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 1 or self.max_delay_s < 0 or self.max_running < 1:
            raise ValueError(f"invalid batch policy {self}")


class QueueFullError(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"queue full, retry in {retry_after_s:.1f}s")
        self.retry_after_s = retry_after_s


class DeadlineExceededError(Exception):
    """The job's deadline passed before it was computed."""


class ClosedError(Exception):
    """The batcher is shutting down and takes no new jobs."""


class BatchFailedError(Exception):
    """The runner raised while computing the batch that held this job."""


@dataclass(eq=False)
class Job(Generic[P, R]):
    payload: P
    deadline: float
    """``time.monotonic()`` after which the job is not worth computing."""
    future: asyncio.Future[R]
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    """When the batch holding this job was handed to the runner."""
    batch_size: int = 0

    @property
    def live(self) -> bool:
        return not self.future.done()


Runner = Callable[[K, list[Job[P, R]]], Awaitable[list[R]]]
"""Computes one batch; returns one result per job, in order. Runs at most ``max_running`` batches
of one key at a time."""


class _KeyQueue(Generic[K, P, R]):
    """The bounded queue of one key and the loop that turns it into batches."""

    def __init__(
        self, key: K, policy: BatchPolicy, runner: Runner, on_depth: Callable[[K, int], None]
    ) -> None:
        self.key = key
        self._policy = policy
        self._runner = runner
        self._on_depth = on_depth
        self._jobs: deque[Job[P, R]] = deque()
        self._arrived = asyncio.Event()
        self._closing = False
        self._batch_seconds = 0.0  # moving average, for the retry hint
        self.task = asyncio.get_running_loop().create_task(self._loop(), name=f"batch-loop-{key}")

    @property
    def depth(self) -> int:
        return len(self._jobs)

    def put(self, job: Job[P, R]) -> None:
        if self._closing:
            raise ClosedError("shutting down")
        if len(self._jobs) >= self._policy.max_queue:
            raise QueueFullError(self.retry_after_s())
        self._jobs.append(job)
        self._changed()

    def remove(self, job: Job[P, R]) -> None:
        try:
            self._jobs.remove(job)
        except ValueError:
            return  # already taken into a batch
        self._changed()

    def close(self) -> None:
        self._closing = True
        self._arrived.set()

    def retry_after_s(self) -> float:
        """Roughly how long until the queue has room: the batches ahead of a new job, times a batch."""
        batches_ahead = math.ceil(len(self._jobs) / self._policy.max_batch_size)
        return max(1.0, batches_ahead * self._batch_seconds)

    def _changed(self) -> None:
        self._arrived.set()
        self._on_depth(self.key, len(self._jobs))

    async def _loop(self) -> None:
        running: set[asyncio.Task[None]] = set()
        while True:
            # A batch is formed only when a runner can take it, so it can still grow meanwhile.
            while len(running) >= self._policy.max_running:
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            batch = await self._next_batch()
            if batch is None:
                break
            if batch:
                task = asyncio.get_running_loop().create_task(self._run(batch))
                running.add(task)
                task.add_done_callback(running.discard)
        await asyncio.gather(*running)

    async def _next_batch(self) -> list[Job[P, R]] | None:
        """Wait for the oldest job, then for more until the batch is full or the oldest's delay is up.
        Returns None once closing and empty; an empty list if every job taken had expired."""
        while not self._jobs:
            if self._closing:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        close_at = self._jobs[0].enqueued_at + self._policy.max_delay_s
        while len(self._jobs) < self._policy.max_batch_size and not self._closing:
            remaining = close_at - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
            if not self._jobs:  # every job was withdrawn while we waited
                return []
        return self._take()

    def _take(self) -> list[Job[P, R]]:
        now = time.monotonic()
        batch: list[Job[P, R]] = []
        while self._jobs and len(batch) < self._policy.max_batch_size:
            job = self._jobs.popleft()
            if not job.live:
                continue
            if job.deadline <= now:
                job.future.set_exception(DeadlineExceededError("deadline passed while queued"))
                continue
            batch.append(job)
        self._on_depth(self.key, len(self._jobs))
        for job in batch:
            job.started_at = now
            job.batch_size = len(batch)
        return batch

    async def _run(self, batch: list[Job[P, R]]) -> None:
        started = time.monotonic()
        try:
            results = await self._runner(self.key, batch)
            if len(results) != len(batch):
                raise RuntimeError(f"runner returned {len(results)} results for {len(batch)} jobs")
        except Exception as exc:  # one failed batch must not stop the loop
            log.exception("batch of %d for %s failed", len(batch), self.key)
            for job in batch:
                if job.live:
                    job.future.set_exception(BatchFailedError(f"{type(exc).__name__}: {exc}"))
            return
        finally:
            elapsed = time.monotonic() - started
            previous = self._batch_seconds or elapsed
            self._batch_seconds = 0.8 * previous + 0.2 * elapsed
        for job, result in zip(batch, results, strict=True):
            if job.live:  # its caller may have given up meanwhile
                job.future.set_result(result)


class Batcher(Generic[K, P, R]):
    """Queues keyed by ``K``, created on first use, each with its own batching loop."""

    def __init__(
        self, policy: BatchPolicy, runner: Runner, on_depth: Callable[[K, int], None] | None = None
    ) -> None:
        self.policy = policy
        self._runner = runner
        self._on_depth = on_depth or (lambda key, depth: None)
        self._queues: dict[K, _KeyQueue[K, P, R]] = {}
        self._closed = False

    def _queue(self, key: K) -> _KeyQueue[K, P, R]:
        queue = self._queues.get(key)
        if queue is None:
            if self._closed:
                raise ClosedError("shutting down")
            queue = self._queues[key] = _KeyQueue(key, self.policy, self._runner, self._on_depth)
        return queue

    def depth(self, key: K) -> int:
        queue = self._queues.get(key)
        return queue.depth if queue else 0

    def check_room(self, key: K) -> None:
        """Raise :class:`QueueFullError` or :class:`ClosedError` now if a job for ``key`` would be
        refused, so callers can refuse before doing any expensive work."""
        if self._closed:
            raise ClosedError("shutting down")
        queue = self._queues.get(key)
        if queue is not None and queue.depth >= self.policy.max_queue:
            raise QueueFullError(queue.retry_after_s())

    def submit(self, key: K, payload: P, deadline: float) -> Job[P, R]:
        job: Job[P, R] = Job(payload, deadline, asyncio.get_running_loop().create_future())
        self._queue(key).put(job)
        return job

    def withdraw(self, key: K, job: Job[P, R]) -> None:
        """The caller gave up on ``job``: drop it from its queue and never deliver its result."""
        queue = self._queues.get(key)
        if queue is not None:
            queue.remove(job)
        job.future.cancel()

    async def drain(self) -> None:
        """Refuse new jobs, finish every queued one, and stop the loops."""
        self._closed = True
        for queue in self._queues.values():
            queue.close()
        await asyncio.gather(*(queue.task for queue in self._queues.values()), return_exceptions=True)
