"""The inference API: POST /classify, POST /visualize and GET /models."""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from .batching import Job
from .dispatch import Call, dispatch, unavailable
from .errors import ApiError
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
from .service import Answer, InferenceService, Phase, Work

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
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
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
    call = _resolve(request, service, model, r)
    response.headers["X-Request-ID"] = call.request_id
    loaded = call.model
    if not loaded.num_classes:
        detail = f"{loaded.name} has no classifier head; use /visualize"
        raise ApiError(422, detail, request_id=call.request_id)
    top_k = min(DEFAULT_TOP_K, loaded.num_classes) if top_k is None else top_k
    if top_k > loaded.num_classes:
        detail = f"top_k must lie in [1, {loaded.num_classes}], got {top_k}"
        raise ApiError(422, detail, request_id=call.request_id)
    outcome = await dispatch(call, top_k, trace_source=False)
    item, batch = outcome.answer.item, outcome.answer.batch
    return ClassifyResponse(
        model=loaded.name,
        weights=loaded.weights,
        r=call.r,
        predictions=[
            Prediction(index=i, label=loaded.labels[i], score=s)
            for i, s in zip(item.indices[:top_k], item.scores[:top_k], strict=True)
        ],
        tokens=Tokens(input=batch.input_tokens, output=batch.output_tokens, per_layer=batch.token_counts),
        batch_size=outcome.job.batch_size,
        timing_ms=_timing(outcome.job, batch.seconds, call.arrived),
        request_id=call.request_id,
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
    call = _resolve(request, service, model, r)
    outcome = await dispatch(call, top_k=0, trace_source=True)
    batch = outcome.answer.batch
    png = await service.render(call.model, outcome.model_input, outcome.answer.item.source)
    timing = _timing(outcome.job, batch.seconds, call.arrived)
    headers = {
        "X-Request-ID": call.request_id,
        "X-Tome-Model": call.model.name,
        "X-Tome-Weights": quote(call.model.weights, safe="/:()+,._- "),
        "X-Tome-R": str(call.r),
        "X-Tome-Tokens-Input": str(batch.input_tokens),
        "X-Tome-Tokens-Output": str(batch.output_tokens),
        "X-Tome-Batch-Size": str(outcome.job.batch_size),
        "Server-Timing": f"queue;dur={timing.queue:.2f}, inference;dur={timing.inference:.2f}",
    }
    return Response(png, media_type="image/png", headers=headers)


@router.get("/models", response_model=ModelsResponse)
async def models(request: Request, service: Service) -> ModelsResponse:
    """The loaded models, the r each accepts, and the analytical cost of every r."""
    if service.phase in (Phase.LOADING, Phase.FAILED):
        raise unavailable(service, _request_id(request))
    default = service.settings.model_names[0]
    loaded = [worker.model for worker in service.workers.values()]
    return ModelsResponse(models=[_model_info(model, model.name == default) for model in loaded])


# -- helpers ---------------------------------------------------------------------------------------


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _resolve(request: Request, service: InferenceService, name: str | None, r: int | None) -> Call:
    """The validated call: 503 unless ready, 404 for an unknown model, 422 for r out of range."""
    arrived = time.monotonic()
    request_id = _request_id(request)
    if service.phase is not Phase.READY:
        raise unavailable(service, request_id)
    loaded = service.model(name)
    if loaded is None:
        known = ", ".join(service.workers)
        raise ApiError(404, f"no model named {name!r} is loaded (loaded: {known})", request_id=request_id)
    r = loaded.default_r if r is None else r
    if r > loaded.r_max:
        detail = f"r must lie in [0, {loaded.r_max}] for {loaded.name}, got {r}"
        raise ApiError(422, detail, request_id=request_id)
    set_metric_labels(request.scope.setdefault("state", {}), loaded.name, r)
    return Call(request, service, loaded, r, arrived, request_id)


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
        costs=[
            RCostInfo(r=c.r, gmacs=c.gmacs, speedup=c.speedup, output_tokens=c.output_tokens)
            for c in model.costs
        ],
    )
