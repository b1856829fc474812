"""One validated request through its (model, r) queue: room check, upload, decode, queue, wait.

Everything a client can cause on the way becomes an :class:`ApiError` with the request's id:
429 when the queue is full (checked before the upload is even read), 4xx for bad uploads,
504 at the deadline, 500 when the batch failed; a hang-up ends in :class:`ClientDisconnected`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

import torch
from fastapi import Request

from .batching import BatchFailedError, ClosedError, DeadlineExceededError, Job, QueueFullError
from .decode import ImageError
from .errors import ApiError, ClientDisconnected
from .models import LoadedModel
from .service import Answer, InferenceService, Key, Phase, Work
from .upload import read_image_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Call:
    """An inference request whose model and r the route has validated."""

    request: Request
    service: InferenceService
    model: LoadedModel
    r: int
    arrived: float
    """``time.monotonic()`` at arrival: the deadline counts from here."""
    request_id: str

    @property
    def key(self) -> Key:
        return (self.model.name, self.r)

    @property
    def deadline(self) -> float:
        return self.arrived + self.service.settings.request_timeout_s


@dataclass(frozen=True)
class Outcome:
    answer: Answer
    job: Job[Work, Answer]
    model_input: torch.Tensor
    """The resized, cropped uint8 image the model saw."""


async def dispatch(call: Call, top_k: int, trace_source: bool) -> Outcome:
    service = call.service
    try:
        service.batcher.check_room(call.key)  # refuse before reading and decoding anything
        data = await read_image_bytes(call.request, service.settings.max_upload_bytes)
        model_input = await service.prepare(call.model, data)
        job = service.submit(call.key, Work(model_input, top_k, trace_source), call.deadline)
    except QueueFullError as exc:
        raise _queue_full(call, exc) from None
    except ClosedError:
        raise unavailable(service, call.request_id) from None
    except ImageError as exc:
        raise ApiError(exc.status_code, exc.detail, request_id=call.request_id) from None
    except ApiError as exc:
        exc.request_id = call.request_id
        raise
    return Outcome(await _wait(call, job), job, model_input)


async def _wait(call: Call, job: Job[Work, Answer]) -> Answer:
    """The job's answer, unless the deadline passes or the client hangs up first (then the job
    leaves the queue and is never computed, or its result is dropped if its batch already runs)."""
    hangup = asyncio.ensure_future(_client_gone(call.request))
    try:
        timeout = max(0.0, call.deadline - time.monotonic())
        done, _ = await asyncio.wait({job.future, hangup}, timeout=timeout, return_when="FIRST_COMPLETED")
    finally:
        hangup.cancel()
    if job.future.done() and not job.future.cancelled():
        error = job.future.exception()
        if error is None:
            return job.future.result()
        if isinstance(error, DeadlineExceededError):
            raise _timed_out(call)
        if isinstance(error, BatchFailedError):
            log.error("request %s failed with its batch: %s", call.request_id, error)
            detail = f"inference failed for the batch holding this request ({error}); id {call.request_id}"
            raise ApiError(500, detail, request_id=call.request_id)
        raise error
    call.service.batcher.withdraw(call.key, job)
    if hangup in done:
        raise ClientDisconnected()
    raise _timed_out(call)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def unavailable(service: InferenceService, request_id: str) -> ApiError:
    if service.phase is Phase.LOADING:
        return ApiError(503, "the models are still loading", {"Retry-After": "5"}, request_id)
    if service.phase is Phase.FAILED:
        return ApiError(503, f"start-up failed: {service.failure}", request_id=request_id)
    return ApiError(503, "the server is shutting down", {"Connection": "close"}, request_id)


def _queue_full(call: Call, exc: QueueFullError) -> ApiError:
    detail = f"the queue for model {call.model.name} at r={call.r} is full; retry later"
    return ApiError(429, detail, {"Retry-After": str(math.ceil(exc.retry_after_s))}, call.request_id)


def _timed_out(call: Call) -> ApiError:
    timeout = call.service.settings.request_timeout_ms
    detail = f"no result within {timeout:g} ms (TOME_REQUEST_TIMEOUT_MS)"
    return ApiError(504, detail, request_id=call.request_id)
