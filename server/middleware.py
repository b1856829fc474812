"""ASGI middleware: the request id (set once, here), the request metrics and the API key.

:class:`RequestIdMiddleware` takes the client's ``X-Request-ID`` when it is a sane token, or makes
one, and puts it where everything else reads it: ``request.state.request_id`` for handlers and
routes, the :data:`request_id` context variable for logging (:class:`RequestIdLogFilter`), and the
``X-Request-ID`` header of the answer.

:class:`RequestMetricsMiddleware` sees every answer of the inference endpoints, including the 422s
FastAPI produces before a route runs and the 401s of the auth layer. Routes put the validated
(model, r) into the request state with :func:`set_metric_labels`; until then both are "none".

:class:`BearerAuthMiddleware` is the optional bearer-key authentication, for every path except the
probes, the metrics and the demo page. It is ASGI middleware rather than a route dependency so that
nothing can be added later (docs, new routes) without being covered. The demo page's HTML, script
and samples hold nothing secret and must load in a browser, which cannot add a header to a page
load; the page then sends the key (typed into its own field) with every API call it makes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
import uuid
from contextvars import ContextVar

from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import UNLABELLED, Metrics

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

request_id: ContextVar[str] = ContextVar("tome_request_id", default="-")
"""The id of the request being handled in this task ("-" outside any request)."""


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _VALID_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


class RequestIdLogFilter(logging.Filter):
    """Adds ``request_id`` to every log record, and ``request`` (`` [<id>]`` inside a request,
    empty outside), for the log format."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        record.request_id = rid
        record.request = f" [{rid}]" if rid != "-" else ""
        return True


ENDPOINTS = {
    "/classify": "classify",
    "/visualize": "visualize",
    "/v1/embeddings": "embeddings",
    "/embeddings": "embeddings",
}
_LABELS_KEY = "tome_metric_labels"


def set_metric_labels(state: dict, model: str, r: int | str) -> None:
    state[_LABELS_KEY] = (model, str(r))


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = ENDPOINTS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            model, r = state.get(_LABELS_KEY, (UNLABELLED, UNLABELLED))
            self.metrics.observe_request(model, r, endpoint, status, time.perf_counter() - started)


OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
DEMO_PATHS = frozenset({"/"})
DEMO_PREFIX = "/static/"


def is_open(scope: Scope) -> bool:
    path = scope.get("path", "")
    if path in OPEN_PATHS:
        return True
    reads = scope.get("method") in ("GET", "HEAD")
    return reads and (path in DEMO_PATHS or path.startswith(DEMO_PREFIX))


class BearerAuthMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key_digest = hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        body = {"detail": "missing or wrong API key: send 'Authorization: Bearer <key>'"}
        request_id = scope.get("state", {}).get("request_id")
        response = JSONResponse(
            {**body, "request_id": request_id} if request_id else body,
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope.get("headers", [])).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # Comparing digests keeps the comparison constant-time and independent of the key's length.
        given = hashlib.sha256(token.strip()).digest()
        return scheme.lower() == b"bearer" and hmac.compare_digest(given, self._key_digest)
