"""The batching loop on its own, with a fake runner: no HTTP, no model. Items carry an int
payload where the pixels would be; the runner answers ``payload * 10``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from tome_serve.batching import Batch, Batcher, BatchPlan, BatchPolicy
from tome_serve.errors import BatchFailed, DeadlineExceeded, QueueFull, Unavailable
from tome_serve.item import Item, QueueKey, Want

FAR = 60.0  # a deadline nobody reaches


K = QueueKey("m", 0)
BAD = QueueKey("m", 3)


class Recorder:
    """A runner that records each batch (key, payloads, start time), can be held back, and
    resolves every item's future as the inference worker does."""

    def __init__(self, fail_on: QueueKey | None = None) -> None:
        self.batches: list[tuple[QueueKey, list[int], float]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_on = fail_on

    async def __call__(self, batch: Batch) -> None:
        self.batches.append((batch.key, [item.pixels for item in batch.items], time.monotonic()))
        await self.gate.wait()
        if batch.key == self.fail_on:
            raise RuntimeError("boom")
        for item in batch.items:
            if item.live:
                item.future.set_result(item.pixels * 10)


def _item(key: QueueKey, payload: int, timeout: float = FAR) -> Item:
    now = time.monotonic()
    future = asyncio.get_running_loop().create_future()
    return Item(key.model, key.r, payload, Want(top_k=1), now, now + timeout, future, None, key.merge)  # type: ignore[arg-type]


def submit_all(batcher: Batcher, key: QueueKey, payloads: list[int], timeout: float = FAR) -> list[Item]:
    items = []
    for payload in payloads:
        item = _item(key, payload, timeout)
        batcher.submit(item)
        items.append(item)
    return items


def test_batch_closes_when_full_then_after_delay() -> None:
    async def scenario() -> tuple[Recorder, list[int], float]:
        runner = Recorder()
        batcher = Batcher(BatchPolicy(max_batch_size=4, batch_wait_timeout_s=0.3, max_queue_size=100), runner)
        start = time.monotonic()
        items = submit_all(batcher, K, list(range(10)))
        results = await asyncio.gather(*(item.future for item in items))
        await batcher.drain()
        return runner, results, start

    runner, results, start = asyncio.run(scenario())
    assert results == [p * 10 for p in range(10)]
    sizes = [len(payloads) for _, payloads, _ in runner.batches]
    assert sizes == [4, 4, 2]
    # Full batches leave at once; the last, partial one only when its oldest item waited max_delay.
    assert runner.batches[1][2] - start < 0.2
    assert runner.batches[2][2] - start >= 0.3 - 0.01


def test_single_item_waits_max_delay_only() -> None:
    async def scenario() -> float:
        runner = Recorder()
        batcher = Batcher(BatchPolicy(max_batch_size=8, batch_wait_timeout_s=0.05, max_queue_size=8), runner)
        (item,) = submit_all(batcher, K, [1])
        await item.future
        await batcher.drain()
        return runner.batches[0][2] - item.enqueued_at

    waited = asyncio.run(scenario())
    assert 0.05 - 0.01 <= waited < 0.5


def test_batches_never_mix_keys() -> None:
    async def scenario() -> Recorder:
        runner = Recorder()
        batcher = Batcher(
            BatchPolicy(max_batch_size=3, batch_wait_timeout_s=0.02, max_queue_size=100), runner
        )
        rules = ("tome", "mlerp")
        keys = [QueueKey("m", i % 3, rules[i % 2]) for i in range(24)]
        items = [item for i, key in enumerate(keys) for item in submit_all(batcher, key, [i])]
        await asyncio.gather(*(item.future for item in items))
        await batcher.drain()
        return runner

    runner = asyncio.run(scenario())
    assert sum(len(payloads) for _, payloads, _ in runner.batches) == 24
    for key, payloads, _ in runner.batches:  # one r and one merge rule per batch
        assert all(p % 3 == key.r and ("tome", "mlerp")[p % 2] == key.merge for p in payloads)
        assert len(payloads) <= 3


def test_full_queue_refuses_with_retry_hint() -> None:
    async def scenario() -> None:
        runner = Recorder()
        runner.gate.clear()  # the first batch blocks, so later items pile up in the queue
        batcher = Batcher(BatchPolicy(max_batch_size=1, batch_wait_timeout_s=0.0, max_queue_size=2), runner)
        first = submit_all(batcher, K, [0])
        await asyncio.sleep(0.05)
        assert len(runner.batches) == 1
        queued = submit_all(batcher, K, [1, 2])
        assert batcher.depth(K) == 2
        with pytest.raises(QueueFull) as refused:
            batcher.check_room(K)
        assert refused.value.retry_after_s >= 1.0
        with pytest.raises(QueueFull):
            submit_all(batcher, K, [3])
        batcher.check_room(QueueKey("m", 1))  # other keys have queues of their own
        runner.gate.set()
        assert await asyncio.gather(*(item.future for item in first + queued)) == [0, 10, 20]
        await batcher.drain()

    asyncio.run(scenario())


def test_a_batch_waits_past_its_delay_for_an_item_still_being_decoded() -> None:
    async def scenario() -> None:
        runner = Recorder()
        batcher = Batcher(BatchPolicy(max_batch_size=4, batch_wait_timeout_s=0.02, max_queue_size=8), runner)
        batcher.reserve(K)  # an upload whose image is still being decoded
        first = submit_all(batcher, K, [1])
        await asyncio.sleep(0.15)  # well past the 20 ms delay
        assert runner.batches == []
        late = _item(K, 2)
        batcher.submit(late, reserved=True)
        assert await asyncio.gather(first[0].future, late.future) == [10, 20]
        assert [payloads for _, payloads, _ in runner.batches] == [[1, 2]]
        batcher.reserve(K)  # one that failed to decode: the batch goes once its place is released
        alone = submit_all(batcher, K, [3])
        await asyncio.sleep(0.1)
        batcher.release(K)
        assert await alone[0].future == 30
        await batcher.drain()

    asyncio.run(scenario())


def test_reserved_places_count_against_the_queue_and_still_arrive_while_draining() -> None:
    async def scenario() -> None:
        runner = Recorder()
        batcher = Batcher(BatchPolicy(max_batch_size=4, batch_wait_timeout_s=0.01, max_queue_size=2), runner)
        batcher.reserve(K)
        batcher.reserve(K)
        with pytest.raises(QueueFull):
            batcher.check_room(K)
        with pytest.raises(QueueFull):
            batcher.reserve(K)
        draining = asyncio.create_task(batcher.drain())
        await asyncio.sleep(0.05)
        assert not draining.done()  # two images are on their way
        items = [_item(K, 1), _item(K, 2)]
        for item in items:
            batcher.submit(item, reserved=True)
        await draining
        assert [item.future.result() for item in items] == [10, 20]

    asyncio.run(scenario())


def test_expired_item_is_failed_without_being_computed() -> None:
    async def scenario() -> None:
        runner = Recorder()
        runner.gate.clear()
        batcher = Batcher(BatchPolicy(max_batch_size=1, batch_wait_timeout_s=0.0, max_queue_size=8), runner)
        blocker = submit_all(batcher, K, [1])[0]
        await asyncio.sleep(0.02)
        late = submit_all(batcher, K, [2], timeout=0.05)[0]
        await asyncio.sleep(0.1)
        runner.gate.set()
        assert await blocker.future == 10
        with pytest.raises(DeadlineExceeded):
            await late.future
        await batcher.drain()
        assert [payloads for _, payloads, _ in runner.batches] == [[1]]

    asyncio.run(scenario())


def test_withdrawn_item_leaves_the_queue() -> None:
    async def scenario() -> None:
        depths: list[int] = []
        runner = Recorder()
        policy = BatchPolicy(max_batch_size=4, batch_wait_timeout_s=0.1, max_queue_size=8)
        batcher = Batcher(policy, runner, lambda key, depth: depths.append(depth))
        gone, kept = submit_all(batcher, K, [1, 2])
        batcher.withdraw(gone)
        assert batcher.depth(K) == 1
        assert gone.future.cancelled()
        assert await kept.future == 20
        await batcher.drain()
        assert [payloads for _, payloads, _ in runner.batches] == [[2]]
        assert depths[:3] == [1, 2, 1] and depths[-1] == 0

    asyncio.run(scenario())


def test_failing_batch_fails_only_its_items_and_the_loop_goes_on() -> None:
    async def scenario() -> None:
        runner = Recorder(fail_on=BAD)
        batcher = Batcher(BatchPolicy(max_batch_size=4, batch_wait_timeout_s=0.01, max_queue_size=8), runner)
        bad = submit_all(batcher, BAD, [1, 2])
        good = submit_all(batcher, K, [3])
        for item in bad:
            with pytest.raises(BatchFailed, match="boom"):
                await item.future
        assert await good[0].future == 30
        runner.fail_on = None  # the failed key's loop still serves
        again = submit_all(batcher, BAD, [4])
        assert await again[0].future == 40
        await batcher.drain()

    asyncio.run(scenario())


def test_drain_finishes_queued_items_and_refuses_new_ones() -> None:
    async def scenario() -> None:
        runner = Recorder()
        batcher = Batcher(BatchPolicy(max_batch_size=8, batch_wait_timeout_s=5.0, max_queue_size=8), runner)
        items = submit_all(batcher, K, [1, 2, 3])
        started = time.monotonic()
        await batcher.drain()
        assert time.monotonic() - started < 1.0  # draining does not sit out the 5 s batching delay
        assert [item.future.result() for item in items] == [10, 20, 30]
        with pytest.raises(Unavailable):
            submit_all(batcher, K, [4])
        with pytest.raises(Unavailable):
            batcher.check_room(K)

    asyncio.run(scenario())


def test_batches_of_one_key_run_side_by_side_up_to_max_running() -> None:
    async def scenario() -> list[int]:
        runner = Recorder()
        runner.gate.clear()  # every batch runs until the gate opens
        policy = BatchPolicy(
            max_batch_size=2, batch_wait_timeout_s=0.01, max_queue_size=100, max_concurrent_batches=2
        )
        batcher = Batcher(policy, runner)
        items = submit_all(batcher, K, list(range(7)))
        await asyncio.sleep(0.1)
        running = [len(payloads) for _, payloads, _ in runner.batches]
        runner.gate.set()
        await asyncio.gather(*(item.future for item in items))
        await batcher.drain()
        return running + [len(payloads) for _, payloads, _ in runner.batches]

    # Two batches started while the first was still running; the third waited for a free runner.
    assert asyncio.run(scenario()) == [2, 2, 2, 2, 2, 1]


def test_the_planner_sets_r_rule_and_size_when_a_batch_is_formed() -> None:
    async def scenario() -> tuple[list[tuple[int, str, list[int]]], list[list[int]]]:
        runs: list[tuple[int, str, list[int]]] = []
        seen: list[list[int]] = []

        async def runner(batch: Batch) -> None:
            runs.append((batch.r, batch.merge, [item.pixels for item in batch.items]))
            for item in batch.items:
                item.future.set_result(batch.r)

        def plan(key: QueueKey, queued: Sequence[Item]) -> BatchPlan:
            seen.append([item.pixels for item in queued])
            # e.g. a shared queue whose r and rule depend on its load (None: the key's rule)
            return BatchPlan(r=10 + len(queued), size=2, merge="mlerp" if len(queued) > 1 else None)

        policy = BatchPolicy(max_batch_size=3, batch_wait_timeout_s=0.05, max_queue_size=8)
        batcher = Batcher(policy, runner, plan=plan)
        items = submit_all(batcher, QueueKey("m", -1, "auto"), [1, 2, 3, 4, 5])
        assert await asyncio.gather(*(item.future for item in items)) == [15, 15, 13, 13, 11]
        await batcher.drain()
        return runs, seen

    runs, seen = asyncio.run(scenario())
    assert runs == [(15, "mlerp", [1, 2]), (13, "mlerp", [3, 4]), (11, "auto", [5])]
    assert seen == [[1, 2, 3, 4, 5], [3, 4, 5], [5]]


def test_a_full_batch_is_formed_ahead_while_the_runner_is_busy_a_partial_one_is_not() -> None:
    async def scenario() -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        runner = Recorder()
        runner.gate.clear()  # the first batch holds the only runner
        policy = BatchPolicy(max_batch_size=4, batch_wait_timeout_s=0.01, max_queue_size=100, ready_batches=1)
        batcher = Batcher(policy, runner)
        first = submit_all(batcher, K, list(range(4)))
        await asyncio.sleep(0.05)
        partial = submit_all(batcher, K, [10, 11])
        await asyncio.sleep(0.1)  # far past the delay: still not formed, the runner is busy
        while_partial = [payloads for _, payloads, _ in runner.batches]
        full = submit_all(batcher, K, [12, 13])  # now a full batch is queued: formed ahead at once
        await asyncio.sleep(0.05)
        while_full = [payloads for _, payloads, _ in runner.batches]
        runner.gate.set()
        await asyncio.gather(*(item.future for item in first + partial + full))
        await batcher.drain()
        return while_partial, while_full, [payloads for _, payloads, _ in runner.batches]

    while_partial, while_full, every = asyncio.run(scenario())
    assert while_partial == [[0, 1, 2, 3]]
    assert while_full == [[0, 1, 2, 3], [10, 11, 12, 13]]
    assert every == while_full


def test_no_batch_is_formed_ahead_beyond_ready_batches() -> None:
    async def scenario() -> int:
        runner = Recorder()
        runner.gate.clear()
        policy = BatchPolicy(max_batch_size=2, batch_wait_timeout_s=0.01, max_queue_size=100, ready_batches=1)
        batcher = Batcher(policy, runner)
        items = submit_all(batcher, K, list(range(8)))
        await asyncio.sleep(0.1)
        formed = len(runner.batches)  # one running, one ready; the other two full batches wait
        runner.gate.set()
        await asyncio.gather(*(item.future for item in items))
        await batcher.drain()
        return formed

    assert asyncio.run(scenario()) == 2
