"""The batching loop on its own, with a fake runner: no HTTP, no model."""

from __future__ import annotations

import asyncio
import time

import pytest

from tome_serve.batching import (
    Batcher,
    BatchFailedError,
    BatchPolicy,
    ClosedError,
    DeadlineExceededError,
    Job,
    QueueFullError,
)

FAR = 60.0  # a deadline nobody reaches


class Recorder:
    """A runner that records each batch (key, payloads, start time) and can be held back."""

    def __init__(self, fail_on: object = None) -> None:
        self.batches: list[tuple[object, list[int], float]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_on = fail_on

    async def __call__(self, key: object, jobs: list[Job]) -> list[int]:
        self.batches.append((key, [job.payload for job in jobs], time.monotonic()))
        await self.gate.wait()
        if key == self.fail_on:
            raise RuntimeError("boom")
        return [job.payload * 10 for job in jobs]


def submit_all(batcher: Batcher, key: object, payloads: list[int], timeout: float = FAR) -> list[Job]:
    return [batcher.submit(key, p, time.monotonic() + timeout) for p in payloads]


def test_batch_closes_when_full_then_after_delay() -> None:
    async def scenario() -> tuple[Recorder, list[int], float]:
        runner = Recorder()
        batcher = Batcher(BatchPolicy(max_batch_size=4, max_delay_s=0.3, max_queue=100), runner)
        start = time.monotonic()
        jobs = submit_all(batcher, "k", list(range(10)))
        results = await asyncio.gather(*(job.future for job in jobs))
        await batcher.drain()
        return runner, results, start

    runner, results, start = asyncio.run(scenario())
    assert results == [p * 10 for p in range(10)]
    sizes = [len(payloads) for _, payloads, _ in runner.batches]
    assert sizes == [4, 4, 2]
    # Full batches leave at once; the last, partial one only when its oldest job waited max_delay.
    assert runner.batches[1][2] - start < 0.2
    assert runner.batches[2][2] - start >= 0.3 - 0.01


def test_single_job_waits_max_delay_only() -> None:
    async def scenario() -> float:
        runner = Recorder()
        batcher = Batcher(BatchPolicy(max_batch_size=8, max_delay_s=0.05, max_queue=8), runner)
        (job,) = submit_all(batcher, "k", [1])
        await job.future
        await batcher.drain()
        return runner.batches[0][2] - job.enqueued_at

    waited = asyncio.run(scenario())
    assert 0.05 - 0.01 <= waited < 0.5


def test_batches_never_mix_keys() -> None:
    async def scenario() -> Recorder:
        runner = Recorder()
        batcher = Batcher(BatchPolicy(max_batch_size=3, max_delay_s=0.02, max_queue=100), runner)
        jobs = [batcher.submit(("m", i % 3), i, time.monotonic() + FAR) for i in range(20)]
        await asyncio.gather(*(job.future for job in jobs))
        await batcher.drain()
        return runner

    runner = asyncio.run(scenario())
    assert sum(len(payloads) for _, payloads, _ in runner.batches) == 20
    for (_, r), payloads, _ in runner.batches:
        assert all(p % 3 == r for p in payloads)
        assert len(payloads) <= 3


def test_full_queue_refuses_with_retry_hint() -> None:
    async def scenario() -> None:
        runner = Recorder()
        runner.gate.clear()  # the first batch blocks, so later jobs pile up in the queue
        batcher = Batcher(BatchPolicy(max_batch_size=1, max_delay_s=0.0, max_queue=2), runner)
        first = submit_all(batcher, "k", [0])
        await asyncio.sleep(0.05)
        assert len(runner.batches) == 1
        queued = submit_all(batcher, "k", [1, 2])
        assert batcher.depth("k") == 2
        with pytest.raises(QueueFullError) as refused:
            batcher.check_room("k")
        assert refused.value.retry_after_s >= 1.0
        with pytest.raises(QueueFullError):
            submit_all(batcher, "k", [3])
        batcher.check_room("other")  # other keys have queues of their own
        runner.gate.set()
        assert await asyncio.gather(*(job.future for job in first + queued)) == [0, 10, 20]
        await batcher.drain()

    asyncio.run(scenario())


def test_expired_job_is_failed_without_being_computed() -> None:
    async def scenario() -> None:
        runner = Recorder()
        runner.gate.clear()
        batcher = Batcher(BatchPolicy(max_batch_size=1, max_delay_s=0.0, max_queue=8), runner)
        blocker = submit_all(batcher, "k", [1])[0]
        await asyncio.sleep(0.02)
        late = submit_all(batcher, "k", [2], timeout=0.05)[0]
        await asyncio.sleep(0.1)
        runner.gate.set()
        assert await blocker.future == 10
        with pytest.raises(DeadlineExceededError):
            await late.future
        await batcher.drain()
        assert [payloads for _, payloads, _ in runner.batches] == [[1]]

    asyncio.run(scenario())


def test_withdrawn_job_leaves_the_queue() -> None:
    async def scenario() -> None:
        depths: list[int] = []
        runner = Recorder()
        policy = BatchPolicy(max_batch_size=4, max_delay_s=0.1, max_queue=8)
        batcher = Batcher(policy, runner, lambda key, depth: depths.append(depth))
        gone, kept = submit_all(batcher, "k", [1, 2])
        batcher.withdraw("k", gone)
        assert batcher.depth("k") == 1
        assert gone.future.cancelled()
        assert await kept.future == 20
        await batcher.drain()
        assert [payloads for _, payloads, _ in runner.batches] == [[2]]
        assert depths[:3] == [1, 2, 1] and depths[-1] == 0

    asyncio.run(scenario())


def test_failing_batch_fails_only_its_jobs_and_the_loop_goes_on() -> None:
    async def scenario() -> None:
        runner = Recorder(fail_on="bad")
        batcher = Batcher(BatchPolicy(max_batch_size=4, max_delay_s=0.01, max_queue=8), runner)
        bad = submit_all(batcher, "bad", [1, 2])
        good = submit_all(batcher, "good", [3])
        for job in bad:
            with pytest.raises(BatchFailedError, match="boom"):
                await job.future
        assert await good[0].future == 30
        runner.fail_on = None  # the failed key's loop still serves
        again = submit_all(batcher, "bad", [4])
        assert await again[0].future == 40
        await batcher.drain()

    asyncio.run(scenario())


def test_drain_finishes_queued_jobs_and_refuses_new_ones() -> None:
    async def scenario() -> None:
        runner = Recorder()
        batcher = Batcher(BatchPolicy(max_batch_size=8, max_delay_s=5.0, max_queue=8), runner)
        jobs = submit_all(batcher, "k", [1, 2, 3])
        started = time.monotonic()
        await batcher.drain()
        assert time.monotonic() - started < 1.0  # draining does not sit out the 5 s batching delay
        assert [job.future.result() for job in jobs] == [10, 20, 30]
        with pytest.raises(ClosedError):
            submit_all(batcher, "k", [4])
        with pytest.raises(ClosedError):
            batcher.check_room("k")

    asyncio.run(scenario())


def test_batches_of_one_key_run_side_by_side_up_to_max_running() -> None:
    async def scenario() -> list[int]:
        runner = Recorder()
        runner.gate.clear()  # every batch runs until the gate opens
        policy = BatchPolicy(max_batch_size=2, max_delay_s=0.01, max_queue=100, max_running=2)
        batcher = Batcher(policy, runner)
        jobs = submit_all(batcher, "k", list(range(7)))
        await asyncio.sleep(0.1)
        running = [len(payloads) for _, payloads, _ in runner.batches]
        runner.gate.set()
        await asyncio.gather(*(job.future for job in jobs))
        await batcher.drain()
        return running + [len(payloads) for _, payloads, _ in runner.batches]

    # Two batches started while the first was still running; the third waited for a free runner.
    assert asyncio.run(scenario()) == [2, 2, 2, 2, 2, 1]
