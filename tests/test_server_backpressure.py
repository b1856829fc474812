"""Backpressure on the real server: full queue -> 429, deadline -> 504, hang-up -> dropped.

The server batches up to 64 images but waits up to 3 s for a batch to fill, so requests sit in
their queue long enough to observe: the queue holds 2, and the deadline (1.2 s) passes first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from serverutil import TINY_MODEL_ENV, metric_value, png, run_server

MODEL = TINY_MODEL_ENV["TOME_MODEL"]
DEADLINE_S = 1.2
ENV = {
    "TOME_MAX_BATCH_SIZE": "64",
    "TOME_MAX_DELAY_MS": "3000",
    "TOME_MAX_QUEUE": "2",
    "TOME_REQUEST_TIMEOUT_MS": str(int(DEADLINE_S * 1000)),
}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with run_server(ENV) as base_url:
        yield base_url


def metric(url: str, name: str, **labels: str) -> float:
    return metric_value(httpx.get(f"{url}/metrics").text, name, **labels)


async def wait_for_depth(url: str, r: int, depth: int, timeout: float = 5.0) -> float:
    """Poll the queue-depth gauge until it shows ``depth``; returns when (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(url, "tome_queue_depth", model=MODEL, r=str(r)) == depth:
            return time.monotonic()
        await asyncio.sleep(0.02)
    raise AssertionError(f"queue depth for r={r} never reached {depth}")


def test_full_queue_429_then_deadline_504_without_computing(url: str) -> None:
    r = 4

    async def scenario() -> tuple[list[httpx.Response], httpx.Response, float]:
        async with httpx.AsyncClient(base_url=url, timeout=30.0) as http:
            started = time.monotonic()
            queued = [
                asyncio.create_task(http.post("/classify", params={"r": r}, content=png())) for _ in range(2)
            ]
            await wait_for_depth(url, r, 2)
            refused = await http.post("/classify", params={"r": r}, content=png())
            # Refused before the upload is read: a body that is not an image still gets 429, not 415.
            unread = await http.post("/classify", params={"r": r}, content=b"not an image")
            assert unread.status_code == 429 and unread.headers["retry-after"]
            other_r = await http.post("/classify", params={"r": r + 1, "top_k": 1}, content=png())
            assert other_r.status_code == 504  # its own queue had room; it then timed out as well
            return await asyncio.gather(*queued), refused, time.monotonic() - started

    timed_out, refused, elapsed = asyncio.run(scenario())
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert "full" in refused.json()["detail"]
    for response in timed_out:
        assert response.status_code == 504
        assert "TOME_REQUEST_TIMEOUT_MS" in response.json()["detail"]
    assert elapsed < 3.0  # answered at the deadline, not when the 3 s batch window closed
    time.sleep(3.2)  # past the batch window: had the jobs stayed queued, they would run now
    assert metric(url, "tome_images_total", model=MODEL, r=str(r)) == 0
    assert metric(url, "tome_batch_size_count", model=MODEL, r=str(r)) == 0
    assert metric(url, "tome_queue_depth", model=MODEL, r=str(r)) == 0
    assert metric(url, "tome_requests_total", model=MODEL, r=str(r), code="429") == 2
    assert metric(url, "tome_requests_total", model=MODEL, r=str(r), code="504") == 2


def test_client_that_hangs_up_is_dropped_from_the_queue(url: str) -> None:
    r = 7

    async def scenario() -> float:
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0, read=0.3)) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/classify", params={"r": r}, content=png())
            hung_up = time.monotonic()
        dropped = await wait_for_depth(url, r, 0, timeout=DEADLINE_S)
        return dropped - hung_up

    # The deadline alone would remove it about 0.9 s after the hang-up; the hang-up removes it at once.
    assert asyncio.run(scenario()) < 0.5
    time.sleep(0.2)
    assert metric(url, "tome_requests_total", model=MODEL, r=str(r), code="499") == 1
    assert metric(url, "tome_images_total", model=MODEL, r=str(r)) == 0
