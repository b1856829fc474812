"""Every way a request can fail, as exception types, and the one place they become HTTP answers.

The service and the batcher raise these without knowing about HTTP; :func:`install` registers a
FastAPI exception handler that turns each into ``{"detail": ..., "request_id": ...}`` with its
status code and headers. The request id comes from the request (set once by the middleware), never
from the exception.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499
"""Recorded (never seen by anyone) when a client hung up while its request waited."""


class ServeError(Exception):
    """A request cannot be answered with a result; ``status_code`` says why in HTTP terms."""

    status_code = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def headers(self) -> dict[str, str]:
        return {}

    def at(self, index: int) -> ServeError:
        """The same error, its message naming the request's input ``index`` it is about."""
        error = type(self).__new__(type(self))  # subclasses' __init__ take other arguments
        error.__dict__.update(self.__dict__, detail=f"input[{index}]: {self.detail}")
        error.args = (error.detail,)
        return error


class BadRequest(ServeError):
    """A parameter or the upload's framing is wrong (422), e.g. r out of range."""

    status_code = 422


class ImageError(ServeError):
    """The upload is not a usable image: too large (413), not an image (415) or broken (422)."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code


class UnknownModel(ServeError):
    status_code = 404


class QueueFull(ServeError):
    """The (model, r) queue has no room; retry after ``retry_after_s``."""

    status_code = 429

    def __init__(self, detail: str, retry_after_s: float) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class Unavailable(ServeError):
    """Loading (retry soon), start-up failed, or shutting down: no request is taken."""

    status_code = 503

    def __init__(self, detail: str, retry_after_s: int | None = None, closing: bool = False) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s
        self.closing = closing

    def headers(self) -> dict[str, str]:
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}
        return {**headers, "Connection": "close"} if self.closing else headers


class DeadlineExceeded(ServeError):
    status_code = 504


class BatchFailed(ServeError):
    """The model raised while computing the batch that held this request."""

    status_code = 500


class ClientGone(Exception):
    """The client hung up before its answer was ready; nobody is left to answer."""


def install(app: FastAPI) -> None:
    """Answer every error as ``{"detail": ..., "request_id": ...}``: ours, FastAPI's parameter
    validation (422) and Starlette's HTTP errors (unknown path, wrong method)."""
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


def error_body(request: Request, detail: object) -> dict[str, object]:
    request_id: str = getattr(request.state, "request_id", "")
    return {"detail": detail, "request_id": request_id} if request_id else {"detail": detail}


async def _serve_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServeError)
    detail = exc.detail
    if isinstance(exc, BatchFailed):
        request_id = getattr(request.state, "request_id", "")
        log.error("request %s failed with its batch: %s", request_id, exc.detail)
        detail = f"inference failed for the batch holding this request ({exc.detail}); id {request_id}"
    return JSONResponse(error_body(request, detail), status_code=exc.status_code, headers=exc.headers())


_ALLOWED = MappingProxyType(
    {
        "int_parsing": "an integer",
        "int_from_float": "an integer",
        "float_parsing": "a number",
        "bool_parsing": "true or false",
        "greater_than_equal": "at least {ge}",
        "greater_than": "above {gt}",
        "less_than_equal": "at most {le}",
        "less_than": "below {lt}",
    }
)
"""What a parameter must be, for each kind of pydantic validation error the API's parameters raise."""


def validation_sentence(errors: Sequence[Any]) -> str:
    """FastAPI's list of validation errors as the one sentence every other 422 has, e.g.
    "top_k must be at least 1, got '0'"."""
    return "; ".join(_error_sentence(error) for error in errors) or "the request is not valid"


def _error_sentence(error: Mapping[str, Any]) -> str:
    kind, *path = error.get("loc") or ("request",)
    name = ".".join(map(str, path)) or str(kind)
    if kind not in ("query", "path"):
        name = f"{kind} {name}" if path else name
    if error.get("type") == "missing":
        return f"{name} is required"
    template = _ALLOWED.get(error.get("type", ""))
    allowed = template.format(**error.get("ctx", {})) if template else str(error.get("msg", "invalid"))
    got = f", got {error['input']!r}" if isinstance(error.get("input"), str | int | float) else ""
    return f"{name} must be {allowed}{got}" if template else f"{name}: {allowed}{got}"


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(error_body(request, validation_sentence(exc.errors())), status_code=422)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code in (204, 304):  # no body allowed
        return await http_exception_handler(request, exc)
    return JSONResponse(error_body(request, exc.detail), status_code=exc.status_code, headers=exc.headers)


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)
