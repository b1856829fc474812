"""Request metrics for the inference endpoints, as plain ASGI middleware.

It sees every answer, including the 422s FastAPI produces before a route runs and the 401s of the
auth layer. Routes put the validated (model, r) into the request state; until then both are "none".
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import UNLABELLED, Metrics

ENDPOINTS = {"/classify": "classify", "/visualize": "visualize"}
LABELS_KEY = "tome_metric_labels"


def set_metric_labels(state: dict, model: str, r: int) -> None:
    state[LABELS_KEY] = (model, str(r))


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
            model, r = state.get(LABELS_KEY, (UNLABELLED, UNLABELLED))
            self.metrics.requests.labels(model, r, endpoint, str(status)).inc()
            self.metrics.request_duration.labels(model, r, endpoint).observe(time.perf_counter() - started)
