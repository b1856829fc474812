"""The API's error type and its JSON rendering: ``{"detail": ..., "request_id": ...}``."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

CLIENT_CLOSED_REQUEST = 499
"""Recorded (never seen by anyone) when a client hung up while its request waited."""


class ApiError(Exception):
    def __init__(
        self,
        status_code: int,
        detail: str,
        headers: dict[str, str] | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers or {}
        self.request_id = request_id


class ClientDisconnected(Exception):
    """The client went away; there is nobody to answer."""


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    body: dict[str, str] = {"detail": exc.detail}
    headers = dict(exc.headers)
    if exc.request_id:
        body["request_id"] = exc.request_id
        headers["X-Request-ID"] = exc.request_id
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


async def disconnected_handler(request: Request, exc: Exception) -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)
