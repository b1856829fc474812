"""Dynamic batching: one bounded queue per (model, r, merge rule), each turning its items into batches.

A :class:`BatchQueue` closes a batch when it holds ``max_batch_size`` items or when its oldest item
has waited ``batch_wait_timeout_s`` and no item for it is still on its way (reserved while its
image is decoded, :meth:`Batcher.reserve`), and hands it to the runner (the model's inference worker),
which computes it and resolves each item's future. At most ``max_concurrent_batches`` batches of one
queue run at once; while all run, up to ``ready_batches`` more are formed ahead, but only full ones,
so a runner that finishes starts the next batch at once; a partial batch is only formed when a
runner can take it, so it can still grow meanwhile.

Backpressure: a full queue refuses new items (:class:`~.errors.QueueFull`, with a retry hint);
items on their way count against its room, so decoding never piles up beyond it. An
item whose deadline passes while queued fails with :class:`~.errors.DeadlineExceeded` and never
reaches the runner; an item its caller gave up on (:meth:`Batcher.withdraw`) is dropped the same way.

The queue key and the r and merge rule of a batch are separate: when a batch is formed, a ``plan``
hook sees the queued items and decides the batch's r, its rule and how many items it takes (by
default: the key's r and rule, and up to ``max_batch_size``). A queue whose key's r (and rule) is a
placeholder, with a planner that picks them from the items' deadlines, fits the same loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from .errors import BatchFailed, DeadlineExceeded, QueueFull, Unavailable
from .item import Item, QueueKey

if TYPE_CHECKING:
    from .auto import Waiting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.005
    """Longest time the oldest item of a batch waits for the batch to fill."""
    max_queue_size: int = 64
    """Items one queue holds; more are refused with 429."""
    max_concurrent_batches: int = 1
    """Batches of one queue that may run at once (one per inference thread that can take them)."""
    ready_batches: int = 0
    """Full batches formed ahead while every runner is busy, so a runner that finishes starts the
    next one at once (no round trip through the event loop). Only full ones: a partial batch is
    formed when a runner is free, so it can still grow meanwhile."""

    def __post_init__(self) -> None:
        if (
            self.max_batch_size < 1
            or self.max_queue_size < 1
            or self.batch_wait_timeout_s < 0
            or self.max_concurrent_batches < 1
            or self.ready_batches < 0
        ):
            raise ValueError(f"invalid batch policy {self}")


@dataclass(frozen=True)
class Batch:
    key: QueueKey
    r: int
    """The r this batch runs at."""
    items: list[Item]
    started_at: float
    """``time.monotonic()`` when the batch was formed and handed to the runner."""
    merge: str
    """The merge rule this batch runs with."""


BatchRunner = Callable[[Batch], Awaitable[None]]
"""Computes a batch and resolves every live item's future (with a result or an error)."""


class BatchPlan(NamedTuple):
    r: int
    """The r the batch runs at."""
    size: int | None = None
    """Items to take from the head of the queue; None: as many as ``max_batch_size`` allows."""
    merge: str | None = None
    """The merge rule the batch runs with; None: the key's."""


Planner = Callable[[QueueKey, Sequence[Item]], BatchPlan]
"""Called when a batch is formed, with the live queued items (oldest first)."""


def key_plan(key: QueueKey, queued: Sequence[Item]) -> BatchPlan:
    """The default :data:`Planner`: a batch runs at its queue's r and rule and is as large as allowed."""
    return BatchPlan(key.r)


def _shutting_down() -> Unavailable:
    return Unavailable("the server is shutting down", closing=True)


class BatchQueue:
    """The bounded queue of one key and the loop that turns it into batches."""

    def __init__(
        self,
        key: QueueKey,
        policy: BatchPolicy,
        runner: BatchRunner,
        on_depth: Callable[[QueueKey, int], None],
        plan: Planner = key_plan,
    ) -> None:
        self.key = key
        self._policy = policy
        self._runner = runner
        self._on_depth = on_depth
        self._plan = plan
        self._items: deque[Item] = deque()
        self._coming: list[Waiting | None] = []
        """The ``waiting`` of each reserved item on its way (its image is being decoded)."""
        self._arrived = asyncio.Event()
        self._closing = False
        self._batch_seconds = 0.0  # moving average, for the retry hint
        self._last_done = 0.0
        self.task = asyncio.get_running_loop().create_task(self._loop(), name=f"batch-loop-{key}")

    @property
    def depth(self) -> int:
        return len(self._items)

    @property
    def items(self) -> tuple[Item, ...]:
        return tuple(self._items)

    def check_room(self, count: int = 1) -> None:
        if self._closing:
            raise _shutting_down()
        if len(self._items) + len(self._coming) + count > self._policy.max_queue_size:
            model, r, merge = self.key
            detail = f"the queue for model {model} at r={r} (merge {merge}) is full; retry later"
            raise QueueFull(detail, self.retry_after_s())

    @property
    def coming(self) -> tuple[Waiting | None, ...]:
        return tuple(self._coming)

    def reserve(self, waiting: Waiting | None) -> None:
        self.check_room()
        self._coming.append(waiting)

    def release(self, waiting: Waiting | None) -> None:
        self._coming.remove(waiting)
        self._changed()

    def put(self, item: Item, reserved: bool = False) -> None:
        if reserved:
            self._coming.remove(item.waiting)
        else:
            self.check_room()
        item.enqueued_at = time.monotonic()
        self._items.append(item)
        self._changed()

    def remove(self, item: Item) -> None:
        try:
            self._items.remove(item)
        except ValueError:
            return  # already taken into a batch
        self._changed()

    def close(self) -> None:
        self._closing = True
        self._arrived.set()

    def retry_after_s(self) -> float:
        """Roughly how long until the queue has room: the batches ahead of a new item, times a batch."""
        batches_ahead = math.ceil(len(self._items) / self._policy.max_batch_size)
        return max(1.0, batches_ahead * self._batch_seconds)

    def _changed(self) -> None:
        self._arrived.set()
        self._on_depth(self.key, len(self._items))

    async def _loop(self) -> None:
        running: set[asyncio.Task[None]] = set()
        policy = self._policy
        while True:
            while len(running) >= policy.max_concurrent_batches + policy.ready_batches:
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            if len(running) >= policy.max_concurrent_batches:
                await self._full_or_free(running)
            batch = await self._next_batch()
            if batch is None:
                break
            if batch.items:
                task = asyncio.get_running_loop().create_task(self._run(batch))
                running.add(task)
                task.add_done_callback(running.discard)
        await asyncio.gather(*running)

    async def _full_or_free(self, running: set[asyncio.Task[None]]) -> None:
        """Every runner is busy: wait until a full batch is queued (formed ahead, ready) or a
        runner is free (then the usual rule applies)."""
        policy = self._policy
        while len(self._items) < policy.max_batch_size and not self._closing:
            if len(running) < policy.max_concurrent_batches:
                return
            self._arrived.clear()
            arrived = asyncio.ensure_future(self._arrived.wait())
            try:
                await asyncio.wait({arrived, *running}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                arrived.cancel()

    async def _next_batch(self) -> Batch | None:
        """Wait for the oldest item, then for more until the batch is full or the oldest's wait is
        up and nothing is on its way. None once closing and empty; a batch without items if every
        item taken had expired."""
        while not self._items:
            if self._closing and not self._coming:  # a reserved item still comes while draining
                return None
            self._arrived.clear()
            await self._arrived.wait()
        close_at = self._items[0].enqueued_at + self._policy.batch_wait_timeout_s
        while len(self._items) < self._policy.max_batch_size and not self._closing:
            remaining = close_at - time.monotonic()
            # An item still being decoded arrives within a decode's time: closing the batch
            # without it would run a partial batch and leave it for the next one.
            if remaining <= 0 and not self._coming:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining if remaining > 0 else None)
            except TimeoutError:
                continue  # the wait is up: the batch closes unless an item is on its way
            if not self._items:  # every item was withdrawn while we waited
                break
        return self._take()

    def _take(self) -> Batch:
        now = time.monotonic()
        live: deque[Item] = deque()
        for item in self._items:  # drop what nobody waits for, failing the expired
            if item.live and item.deadline <= now:
                item.future.set_exception(DeadlineExceeded("the deadline passed while queued"))
            if item.live:
                live.append(item)
        self._items = live
        items: list[Item] = []
        r, merge = self.key.r, self.key.merge
        if live:
            r, size, planned = self._plan(self.key, tuple(live))
            merge = planned or merge
            limit = self._policy.max_batch_size if size is None else min(size, self._policy.max_batch_size)
            items = [live.popleft() for _ in range(min(max(limit, 1), len(live)))]
        self._on_depth(self.key, len(self._items))
        return Batch(self.key, r, items, now, merge)

    async def _run(self, batch: Batch) -> None:
        # A batch formed while another ran waited ready for it: it starts when the previous ends.
        started = max(time.monotonic(), self._last_done)
        try:
            await self._runner(batch)
        except Exception as exc:  # the runner resolves its items; this is the safety net
            log.exception("batch of %d for %s failed", len(batch.items), self.key)
            for item in batch.items:
                if item.live:
                    item.future.set_exception(BatchFailed(f"{type(exc).__name__}: {exc}"))
        finally:
            self._last_done = time.monotonic()
            elapsed = max(0.0, self._last_done - started)
            previous = self._batch_seconds or elapsed
            self._batch_seconds = 0.8 * previous + 0.2 * elapsed


class Batcher:
    """The queues, one per key, created on first use."""

    def __init__(
        self,
        policy: BatchPolicy,
        runner: BatchRunner,
        on_depth: Callable[[QueueKey, int], None] | None = None,
        plan: Planner = key_plan,
    ) -> None:
        self.policy = policy
        self._runner = runner
        self._on_depth = on_depth or (lambda key, depth: None)
        self._plan = plan
        self._queues: dict[QueueKey, BatchQueue] = {}
        self._closed = False

    def _queue(self, key: QueueKey) -> BatchQueue:
        queue = self._queues.get(key)
        if queue is None:
            if self._closed:
                raise _shutting_down()
            queue = BatchQueue(key, self.policy, self._runner, self._on_depth, self._plan)
            self._queues[key] = queue
        return queue

    def depth(self, key: QueueKey) -> int:
        queue = self._queues.get(key)
        return queue.depth if queue else 0

    def queued(self, key: QueueKey) -> tuple[Item, ...]:
        """The items waiting in ``key``'s queue, oldest first (for r=auto's admission)."""
        queue = self._queues.get(key)
        return queue.items if queue else ()

    def pending(self) -> int:
        """Items queued or on their way, over every queue."""
        return sum(queue.depth + len(queue.coming) for queue in self._queues.values())

    def check_room(self, key: QueueKey, count: int = 1) -> None:
        """Raise now if ``count`` items for ``key`` would be refused, so callers can refuse before
        doing any expensive work."""
        if self._closed:
            raise _shutting_down()
        queue = self._queues.get(key)
        if queue is not None:
            queue.check_room(count)

    def coming(self, key: QueueKey) -> tuple[Waiting | None, ...]:
        """The ``waiting`` of each item reserved in ``key``'s queue and still on its way."""
        queue = self._queues.get(key)
        return queue.coming if queue else ()

    def reserve(self, key: QueueKey, waiting: Waiting | None = None) -> None:
        """Hold a place in ``key``'s queue for an item on its way (its image is being decoded),
        with the item's ``waiting``: raises like :meth:`check_room` if there is none. Then
        :meth:`submit` the item with ``reserved=True``, or :meth:`release` the place if it will not
        come."""
        self._queue(key).reserve(waiting)

    def release(self, key: QueueKey, waiting: Waiting | None = None) -> None:
        self._queues[key].release(waiting)

    def submit(self, item: Item, reserved: bool = False) -> None:
        self._queue(item.key).put(item, reserved)

    def withdraw(self, item: Item) -> None:
        """The caller gave up on ``item``: drop it from its queue and never deliver its result."""
        queue = self._queues.get(item.key)
        if queue is not None:
            queue.remove(item)
        item.future.cancel()

    async def drain(self) -> None:
        """Refuse new items, finish every queued one, and stop the loops."""
        self._closed = True
        for queue in self._queues.values():
            queue.close()
        await asyncio.gather(*(queue.task for queue in self._queues.values()), return_exceptions=True)
