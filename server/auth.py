"""Optional bearer-key authentication for every path except the probes, the metrics and the demo page.

It is ASGI middleware rather than a route dependency so that nothing can be added later (docs,
new routes) without being covered. The demo page's HTML, script and samples hold nothing secret
and must load in a browser, which cannot add a header to a page load; the page then sends the key
(typed into its own field) with every API call it makes.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

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
