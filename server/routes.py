"""The inference API: POST /classify, POST /visualize, POST /v1/embeddings and GET /models.

A route makes the one service call (``InferenceService.infer``: admit, check room, read the upload,
decode, queue, await) with its query parameters and the request as the upload, and turns the Result
into the answer. Errors are exceptions (errors.py) that the app's exception handlers answer.
"""

from __future__ import annotations

import base64
import dataclasses
import time
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from tome_runtime import fidelity

from .errors import ServeError
from .item import Result, Want
from .lane import Lane
from .params import Asked
from .schemas import (
    AccuracyDrop,
    AutoInfo,
    ClassifyResponse,
    Embedding,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbeddingTokens,
    EmbeddingUsage,
    ErrorResponse,
    FidelityEstimate,
    FidelityInfo,
    FidelityRow,
    ItemError,
    MeasuredTiming,
    MergeRuleFidelity,
    ModelInfo,
    ModelsResponse,
    Prediction,
    RCostInfo,
    Timing,
    Tokens,
)
from .service import InferenceService
from .upload import HttpUpload, read_embeddings_request

router = APIRouter()

RQuery = Annotated[
    str | None,
    Query(
        description="Tokens to merge per block (0 = no merging), or 'auto': the server picks the least "
        "merging that meets the latency target. Default and maximum: see /models",
        examples=["auto", "8"],
    ),
]
TargetQuery = Annotated[
    str | None,
    Query(description="r=auto only: latency target in ms (default TOME_LATENCY_TARGET_MS, see /models)"),
]
MaxRQuery = Annotated[
    str | None,
    Query(description="r=auto only: the largest r this request accepts (default TOME_AUTO_MAX_R)"),
]
MinFidelityQuery = Annotated[
    str | None,
    Query(
        description="r=auto only: the fidelity floor, 0 to 1: only an r whose measured lower bound of top-1 "
        "agreement with r=0 (of embedding cosine for a model without classifier) is at least this "
        "(default TOME_MIN_FIDELITY; a lower value does not lower it)"
    ),
]
TopKQuery = Annotated[
    str | None, Query(description="How many predictions to return, 1 to the model's classes (default 5)")
]
MergeQuery = Annotated[
    str | None,
    Query(
        description="How merged tokens combine: 'tome' (size-weighted average) or 'mlerp' (ToFu's "
        "norm-preserving average); default TOME_DEFAULT_MERGE"
    ),
]
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
        422: "Bad image, r, target_ms, max_r, min_fidelity or top_k",
        429: "Queue full, or r=auto cannot meet the target even at max_r (see Retry-After)",
        500: "The batch holding this request failed",
        503: "Loading or shutting down",
        504: "No result before TOME_REQUEST_TIMEOUT_MS",
    }.items()
}


def get_service(request: Request) -> InferenceService:
    return request.app.state.service


Service = Annotated[InferenceService, Depends(get_service)]


@router.post("/classify", response_model=ClassifyResponse, responses=_ERRORS, openapi_extra=_IMAGE_BODY)
async def classify(
    request: Request,
    service: Service,
    r: RQuery = None,
    top_k: TopKQuery = None,
    model: ModelQuery = None,
    target_ms: TargetQuery = None,
    max_r: MaxRQuery = None,
    merge: MergeQuery = None,
    min_fidelity: MinFidelityQuery = None,
) -> ClassifyResponse:
    """Classify an image with the ToMe-patched model at the given r (or r=auto)."""
    arrived = time.monotonic()
    upload = HttpUpload(request, service.settings.max_upload_bytes)
    want = Want(top_k=top_k)
    asked = Asked(model, r, merge, target_ms, max_r, min_fidelity)
    result = await service.infer(asked, upload, want, arrived)
    return ClassifyResponse(
        model=result.model,
        weights=result.weights,
        r=result.r,
        merge=result.merge,
        r_auto=result.target_s is not None,
        target_ms=None if result.target_s is None else round(result.target_s * 1000, 3),
        predictions=[Prediction(index=p.index, label=p.label, score=p.score) for p in result.predictions],
        tokens=Tokens(input=result.input_tokens, output=result.output_tokens, per_layer=result.token_counts),
        batch_size=result.batch_size,
        timing_ms=_timing(result, arrived),
        fidelity=_estimate(service, result, "agreement"),
        request_id=request.state.request_id,
    )


@router.post(
    "/visualize",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The merge map"}, **_ERRORS},
    openapi_extra=_IMAGE_BODY,
)
async def visualize(
    request: Request,
    service: Service,
    r: RQuery = None,
    model: ModelQuery = None,
    target_ms: TargetQuery = None,
    max_r: MaxRQuery = None,
    merge: MergeQuery = None,
    min_fidelity: MinFidelityQuery = None,
) -> Response:
    """Draw which patches merged into which token at the given r or r=auto (PNG, the model's input
    size); X-Tome-R says the r used, X-Tome-R-Auto whether the server chose it, X-Tome-Fidelity the
    fidelity of that r (agreement for a classifier, else cosine)."""
    arrived = time.monotonic()
    upload = HttpUpload(request, service.settings.max_upload_bytes)
    want = Want(merge_map=True)
    asked = Asked(model, r, merge, target_ms, max_r, min_fidelity)
    result = await service.infer(asked, upload, want, arrived)
    timing = _timing(result, arrived)
    auto = result.target_s is not None
    estimate = _estimate(service, result, service.lanes[result.model].default_kind)
    headers = {
        "X-Tome-Model": result.model,
        "X-Tome-Weights": quote(result.weights, safe="/:()+,._- "),
        "X-Tome-R": str(result.r),
        "X-Tome-Merge": result.merge,
        "X-Tome-R-Auto": "1" if auto else "0",
        **({"X-Tome-Target-Ms": f"{result.target_s * 1000:g}"} if auto else {}),
        "X-Tome-Tokens-Input": str(result.input_tokens),
        "X-Tome-Tokens-Output": str(result.output_tokens),
        "X-Tome-Batch-Size": str(result.batch_size),
        "X-Tome-Fidelity": _fidelity_header(estimate),
        "Server-Timing": f"queue;dur={timing.queue:.2f}, inference;dur={timing.inference:.2f}",
    }
    return Response(result.merge_map_png, media_type="image/png", headers=headers)


_EMBEDDINGS_BODY = {
    "requestBody": {
        "required": True,
        "description": "OpenAI's embeddings request (JSON), or the same fields as multipart form fields with "
        "the images as files",
        "content": {
            "application/json": {"schema": EmbeddingsRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
        },
    }
}


@router.post(
    "/v1/embeddings", response_model=EmbeddingsResponse, responses=_ERRORS, openapi_extra=_EMBEDDINGS_BODY
)
@router.post("/embeddings", response_model=EmbeddingsResponse, include_in_schema=False)
async def embeddings(request: Request, service: Service) -> EmbeddingsResponse:
    """Embed images with the ToMe-patched model at the given r (or r=auto): OpenAI's and Infinity's
    request and answer, plus the r and tokens of each image. ``/embeddings`` is the same (Infinity's path)."""
    arrived = time.monotonic()
    params, inputs = await read_embeddings_request(request, service.settings)
    want = Want(pooling=params.pooling, dimensions=params.dimensions, normalize=params.normalize)
    skip = params.on_error == "skip"
    asked = Asked(params.model, params.r, params.merge, params.target_ms, params.max_r, params.min_fidelity)
    answers = await service.infer_all(asked, inputs, want, arrived, each_on_its_own=skip)
    failed = [(i, answer) for i, answer in enumerate(answers) if isinstance(answer, ServeError)]
    if failed and (not skip or len(failed) == len(answers)):
        index, error = failed[0]
        raise error.at(index)
    results = [(i, answer) for i, answer in enumerate(answers) if isinstance(answer, Result)]
    first = results[0][1]
    return EmbeddingsResponse(
        data=[
            _embedding(i, result, params.encoding_format, _estimate(service, result, "cosine"))
            for i, result in results
        ],
        model=first.model,
        weights=first.weights,
        pooling=params.pooling,
        normalize=params.normalize,
        usage=EmbeddingUsage(
            prompt_tokens=sum(result.input_tokens for _, result in results),
            total_tokens=sum(result.input_tokens for _, result in results),
        ),
        errors=[ItemError(index=i, status=error.status_code, message=error.detail) for i, error in failed],
        request_id=request.state.request_id,
    )


def _embedding(index: int, result: Result, encoding: str, fidelity: FidelityEstimate | None) -> Embedding:
    vector = result.embedding
    assert vector is not None
    if encoding == "base64":  # what OpenAI's clients decode: little-endian float32
        encoded = base64.b64encode(vector.numpy().astype("<f4", copy=False).tobytes()).decode("ascii")
    else:
        encoded = vector.tolist()
    return Embedding(
        index=index,
        embedding=encoded,
        shape=list(vector.shape),
        r=result.r,
        merge=result.merge,
        r_auto=result.target_s is not None,
        tokens=EmbeddingTokens(input=result.input_tokens, output=result.output_tokens),
        fidelity=fidelity,
    )


@router.get("/models", response_model=ModelsResponse)
async def models(service: Service) -> ModelsResponse:
    """The served models, the r each accepts, the analytical GMACs of every r, and r=auto's target and
    measured timing table."""
    default = service.settings.model_names[0]
    return ModelsResponse(
        models=[_model_info(lane, lane.name == default, service) for lane in service.served()]
    )


def _model_info(lane: Lane, default: bool, service: InferenceService) -> ModelInfo:
    model, limits = lane.model, lane.model.limits
    return ModelInfo(
        name=model.name,
        default=default,
        weights=model.weights,
        device=str(model.device),
        dtype=model.dtype_name,
        dtype_reason=model.dtype_reason,
        instances=lane.worker.instances,
        torch_threads=lane.worker.torch_threads,
        preprocess_threads=service.threads.preprocess_threads,
        decode_between_batches=service.threads.decode_between_batches,
        r_min=0,
        r_max=limits.ceiling,
        useful_r=limits.useful,
        default_r=limits.default,
        default_merge=lane.settings.default_merge,
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
        auto=_auto_info(lane),
        fidelity=_fidelity_info(lane),
    )


def _auto_info(lane: Lane) -> AutoInfo | None:
    if lane.auto is None:
        return None
    gmacs = {c.r: c.gmacs for c in lane.model.costs}
    by_merge = {
        rule: [MeasuredTiming(**row) for row in table.describe(gmacs)]
        for rule, table in lane.auto.tables.items()
    }
    return AutoInfo(
        target_ms=lane.target_ms,
        max_r=lane.model.limits.auto_ceiling,
        timings=by_merge[lane.settings.default_merge],
        timings_source=lane.timings_source,
        timings_by_merge=by_merge,
    )


def _fidelity_info(lane: Lane) -> FidelityInfo | None:
    if lane.fidelity is None:
        return None
    by_merge = {rule: _merge_rule_fidelity(lane, rule) for rule in lane.fidelity}
    return FidelityInfo(
        **by_merge[lane.settings.default_merge].model_dump(),
        floor=lane.settings.min_fidelity,
        min_samples=lane.settings.fidelity_min_samples,
        bounds=fidelity.BOUNDS,
        shadow_rate=lane.settings.shadow_rate,
        by_merge=by_merge,
    )


def _merge_rule_fidelity(lane: Lane, rule: str) -> MergeRuleFidelity:
    table, floor = lane.fidelity[rule], lane.settings.min_fidelity
    ceilings = None
    if floor is not None:
        ceilings = {kind: lane.fidelity_ceiling(kind, floor, rule) for kind in table.kinds}
    return MergeRuleFidelity(
        sources=table.sources,
        max_r_at_floor=ceilings,
        rows=[_fidelity_row(lane, table, entry, floor) for entry in table.rows()],
    )


def _fidelity_row(
    lane: Lane, table: fidelity.FidelityTable, entry: fidelity.FidelityRow, floor: float | None
) -> FidelityRow:
    drop = entry.accuracy_drop
    meets = None
    if floor is not None:
        meets = table.meets(entry.r, entry.kind, floor, lane.settings.fidelity_min_samples)
    return FidelityRow(
        r=entry.r,
        kind=entry.kind,
        samples=entry.samples,
        mean=entry.mean,
        lower=entry.lower,
        top5_overlap=entry.top5_overlap,
        accuracy_drop=None if drop is None else AccuracyDrop(**dataclasses.asdict(drop)),
        meets_floor=meets,
    )


def _estimate(service: InferenceService, result: Result, kind: str) -> FidelityEstimate | None:
    """The fidelity of the r and merge rule ``result`` was computed at; None while unmeasured."""
    tables = service.lanes[result.model].fidelity
    row = None if tables is None else tables[result.merge].estimate(result.r, kind)
    if row is None or row.mean is None or row.lower is None:
        return None
    return FidelityEstimate(r=row.r, kind=row.kind, samples=row.samples, mean=row.mean, lower=row.lower)


def _fidelity_header(estimate: FidelityEstimate | None) -> str:
    if estimate is None:
        return "unmeasured"
    bounds = f"mean={estimate.mean:.4f}; lower={estimate.lower:.4f}"
    return f"kind={estimate.kind}; {bounds}; samples={estimate.samples}"


def _timing(result: Result, arrived: float) -> Timing:
    return Timing(
        queue=round(result.queue_s * 1000, 3),
        inference=round(result.inference_s * 1000, 3),
        total=round((time.monotonic() - arrived) * 1000, 3),
    )
