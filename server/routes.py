"""The inference API: POST /classify, POST /visualize and GET /models."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from typing import Annotated
from urllib.parse import quote

import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from .batching import BatchFailedError, ClosedError, DeadlineExceededError, Job, QueueFullError
from .decode import ImageError
from .errors import ApiError, ClientDisconnected
from .middleware import set_metric_labels
from .models import LoadedModel
from .schemas import (
    ClassifyResponse,
    ErrorResponse,
    ModelInfo,
    ModelsResponse,
    Prediction,
    RCostInfo,
    Timing,
    Tokens,
)
from .service import Answer, InferenceService, Key, Phase, Work
from .upload import read_image_bytes

log = logging.getLogger(__name__)
router = APIRouter()

RQuery = Annotated[
    int | None,
    Query(ge=0, description="Tokens to merge per block; 0 = no merging. Default and maximum: see /models"),
]
TopKQuery = Annotated[int | None, Query(ge=1, description="How many predictions to return (default 5)")]
ModelQuery = Annotated[str | None, Query(description="A loaded model's name (default: the first one)")]

_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image as multipart field 'file' or as the raw body (JPEG, PNG, WebP, GIF, ...)",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}},
                           "required": ["file"]}
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_ERRORS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        401: "Missing or wrong API key",
        404: "Unknown model",
        413: "Upload or image too large",
        415: "Not an image",
        422: "Bad image, r or top_k",
        429: "Queue full (see Retry-After)",
        500: "The batch holding this request failed",
        503: "Loading or shutting down",
        504: "No result before TOME_REQUEST_TIMEOUT_MS",
    }.items()
}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
DEFAULT_TOP_K = 5


def get_service(request: Request) -> InferenceService:
    return request.app.state.service


Service = Annotated[InferenceService, Depends(get_service)]


@router.post("/classify", response_model=ClassifyResponse, responses=_ERRORS, openapi_extra=_IMAGE_BODY)
async def classify(
    request: Request,
    response: Response,
    service: Service,
    r: RQuery = None,
    top_k: TopKQuery = None,
    model: ModelQuery = None,
) -> ClassifyResponse:
    """Classify an image with the ToMe-patched model at the given r."""
    arrived = time.monotonic()
    request_id = _request_id(request)
    response.headers["X-Request-ID"] = request_id
    loaded, r = _resolve(request, service, model, r, request_id)
    if not loaded.num_classes:
        raise ApiError(422, f"{loaded.name} has no classifier head; use /visualize", request_id=request_id)
    top_k = min(DEFAULT_TOP_K, loaded.num_classes) if top_k is None else top_k
    if top_k > loaded.num_classes:
        detail = f"top_k must lie in [1, {loaded.num_classes}], got {top_k}"
        raise ApiError(422, detail, request_id=request_id)
    answer, job, _ = await _infer(request, service, loaded, r, top_k, False, arrived, request_id)
    item, batch = answer.item, answer.batch
    return ClassifyResponse(
        model=loaded.name,
        weights=loaded.weights,
        r=r,
        predictions=[
            Prediction(index=i, label=loaded.labels[i], score=s)
            for i, s in zip(item.indices[:top_k], item.scores[:top_k], strict=True)
        ],
        tokens=Tokens(input=batch.input_tokens, output=batch.output_tokens, per_layer=batch.token_counts),
        batch_size=job.batch_size,
        timing_ms=_timing(job, batch.seconds, arrived),
        request_id=request_id,
    )


@router.post(
    "/visualize",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The merge map"}, **_ERRORS},
    openapi_extra=_IMAGE_BODY,
)
async def visualize(
    request: Request, service: Service, r: RQuery = None, model: ModelQuery = None
) -> Response:
    """Draw which patches merged into which token at the given r (PNG, the model's input size)."""
    arrived = time.monotonic()
    request_id = _request_id(request)
    loaded, r = _resolve(request, service, model, r, request_id)
    answer, job, model_input = await _infer(request, service, loaded, r, 0, True, arrived, request_id)
    png = await service.render(loaded, model_input, answer.item.source)
    timing = _timing(job, answer.batch.seconds, arrived)
    headers = {
        "X-Request-ID": request_id,
        "X-Tome-Model": loaded.name,
        "X-Tome-Weights": quote(loaded.weights, safe="/:()+,._- "),
        "X-Tome-R": str(r),
        "X-Tome-Tokens-Input": str(answer.batch.input_tokens),
        "X-Tome-Tokens-Output": str(answer.batch.output_tokens),
        "X-Tome-Batch-Size": str(job.batch_size),
        "Server-Timing": f"queue;dur={timing.queue:.2f}, inference;dur={timing.inference:.2f}",
    }
    return Response(png, media_type="image/png", headers=headers)


@router.get("/models", response_model=ModelsResponse)
async def models(request: Request, service: Service) -> ModelsResponse:
    """The loaded models, the r each accepts, and the analytical cost of every r."""
    if service.phase in (Phase.LOADING, Phase.FAILED):
        raise _unavailable(service, _request_id(request))
    default = service.settings.model_names[0]
    loaded = [worker.model for worker in service.workers.values()]
    return ModelsResponse(models=[_model_info(model, model.name == default) for model in loaded])


# -- helpers ---------------------------------------------------------------------------------------


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _resolve(
    request: Request, service: InferenceService, name: str | None, r: int | None, request_id: str
) -> tuple[LoadedModel, int]:
    if service.phase is not Phase.READY:
        raise _unavailable(service, request_id)
    loaded = service.model(name)
    if loaded is None:
        known = ", ".join(service.workers)
        raise ApiError(404, f"no model named {name!r} is loaded (loaded: {known})", request_id=request_id)
    r = loaded.default_r if r is None else r
    if r > loaded.r_max:
        detail = f"r must lie in [0, {loaded.r_max}] for {loaded.name}, got {r}"
        raise ApiError(422, detail, request_id=request_id)
    set_metric_labels(request.scope.setdefault("state", {}), loaded.name, r)
    return loaded, r


def _unavailable(service: InferenceService, request_id: str) -> ApiError:
    if service.phase is Phase.LOADING:
        return ApiError(503, "the models are still loading", {"Retry-After": "5"}, request_id)
    if service.phase is Phase.FAILED:
        return ApiError(503, f"start-up failed: {service.failure}", request_id=request_id)
    return ApiError(503, "the server is shutting down", {"Connection": "close"}, request_id)


async def _infer(
    request: Request,
    service: InferenceService,
    loaded: LoadedModel,
    r: int,
    top_k: int,
    trace_source: bool,
    arrived: float,
    request_id: str,
) -> tuple[Answer, Job[Work, Answer], torch.Tensor]:
    """Queue one uploaded image and wait for its batch. Returns the answer, the job and the input."""
    settings = service.settings
    key: Key = (loaded.name, r)
    deadline = arrived + settings.request_timeout_s
    try:
        service.batcher.check_room(key)  # refuse before reading and decoding anything
        data = await read_image_bytes(request, settings.max_upload_bytes)
        model_input = await service.prepare(loaded, data)
        job = service.submit(key, Work(model_input, top_k, trace_source), deadline)
    except QueueFullError as exc:
        raise _queue_full(key, exc, request_id) from None
    except ClosedError:
        raise _unavailable(service, request_id) from None
    except ImageError as exc:
        raise ApiError(exc.status_code, exc.detail, request_id=request_id) from None
    except ApiError as exc:
        exc.request_id = request_id
        raise
    answer = await _wait(request, service, key, job, deadline, request_id)
    return answer, job, model_input


async def _wait(
    request: Request,
    service: InferenceService,
    key: Key,
    job: Job[Work, Answer],
    deadline: float,
    request_id: str,
) -> Answer:
    """The job's answer, unless the deadline passes or the client hangs up first (then the job
    leaves the queue and is never computed, or its result is dropped if its batch already runs)."""
    hangup = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait(
            {job.future, hangup}, timeout=max(0.0, deadline - time.monotonic()), return_when="FIRST_COMPLETED"
        )
    finally:
        hangup.cancel()
    if job.future.done() and not job.future.cancelled():
        error = job.future.exception()
        if error is None:
            return job.future.result()
        if isinstance(error, DeadlineExceededError):
            raise _timed_out(service, request_id)
        if isinstance(error, BatchFailedError):
            log.error("request %s failed with its batch: %s", request_id, error)
            raise ApiError(500, f"inference failed for the batch holding this request ({error}); "
                                f"request id {request_id}", request_id=request_id)
        raise error
    service.batcher.withdraw(key, job)
    if hangup in done:
        raise ClientDisconnected()
    raise _timed_out(service, request_id)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _queue_full(key: Key, exc: QueueFullError, request_id: str) -> ApiError:
    return ApiError(
        429,
        f"the queue for model {key[0]} at r={key[1]} is full; retry later",
        {"Retry-After": str(math.ceil(exc.retry_after_s))},
        request_id,
    )


def _timed_out(service: InferenceService, request_id: str) -> ApiError:
    timeout = service.settings.request_timeout_ms
    return ApiError(504, f"no result within {timeout:g} ms (TOME_REQUEST_TIMEOUT_MS)", request_id=request_id)


def _timing(job: Job[Work, Answer], inference_s: float, arrived: float) -> Timing:
    started = job.started_at if job.started_at is not None else job.enqueued_at
    return Timing(
        queue=round((started - job.enqueued_at) * 1000, 3),
        inference=round(inference_s * 1000, 3),
        total=round((time.monotonic() - arrived) * 1000, 3),
    )


def _model_info(model: LoadedModel, default: bool) -> ModelInfo:
    return ModelInfo(
        name=model.name,
        default=default,
        weights=model.weights,
        device=str(model.device),
        dtype=model.dtype_name,
        r_min=0,
        r_max=model.r_max,
        default_r=model.default_r,
        input_size=list(model.preprocessor.input_size),
        patch_size=list(model.patch_size),
        input_tokens=model.num_tokens,
        depth=model.depth,
        num_classes=model.num_classes,
        notes=list(model.notes),
        costs=[RCostInfo(r=c.r, gflops=c.gflops, speedup=c.speedup, output_tokens=c.output_tokens)
               for c in model.costs],
    )
