"""Operational endpoints: liveness, readiness and Prometheus metrics (never behind the API key)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .metrics import CONTENT_TYPE
from .schemas import Status
from .service import InferenceService, Phase

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Status, response_model_exclude_none=True)
async def healthz() -> Status:
    """The process is alive and its event loop answers."""
    return Status(status="ok")


@router.get("/readyz", response_model=Status, responses={503: {"model": Status}})
async def readyz(request: Request) -> Response:
    """200 once every model is loaded and warmed; 503 while loading, after a failed start and
    while draining for shutdown."""
    service: InferenceService = request.app.state.service
    body = Status(status=service.phase.value, detail=service.failure)
    code = 200 if service.phase is Phase.READY else 503
    return JSONResponse(body.model_dump(exclude_none=True), status_code=code)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition format."""
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE)
