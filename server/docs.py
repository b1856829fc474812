"""The API documentation page, ``GET /docs``: Swagger UI served by this server, so it works offline.

FastAPI's own page loads Swagger UI's script and stylesheet from a CDN; on a server whose users
cannot reach it (offline, firewalled) the page stays white. Here they come from the
``openapi-ui-bundles`` package ([serve] extra; Swagger UI 5, which reads the OpenAPI 3.1 that
FastAPI writes), mounted at :data:`ASSETS_PATH`. The page keeps a Content-Security-Policy like the
demo page's: everything from this origin, plus Swagger UI's one inline set-up script, allowed by its
hash, so nothing else can run.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from functools import lru_cache

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from openapi_ui_bundles import swagger_ui
from starlette.staticfiles import StaticFiles

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"

_ASSETS = frozenset({"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"})
"""What the page loads; the package's other files (its own index.html, for one) are not served."""

_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def content_security_policy(page: str) -> str:
    """Same-origin only, as the demo page; the page's inline scripts are allowed by their SHA-256.
    ``data:`` images are Swagger UI's own icons, inlined in its stylesheet."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(page)
    )
    return (
        f"default-src 'self'; img-src 'self' data:; script-src 'self' {hashes}; style-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    )


@lru_cache(maxsize=8)
def docs_page(root_path: str, openapi_url: str, title: str) -> tuple[bytes, dict[str, str]]:
    """The page's HTML and headers for a server mounted at ``root_path`` (behind a proxy)."""
    page = get_swagger_ui_html(
        openapi_url=root_path + openapi_url,
        title=f"{title} - API documentation",
        swagger_js_url=f"{root_path}{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{root_path}{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{root_path}{ASSETS_PATH}/favicon-32x32.png",
    )
    body = bytes(page.body)
    headers = {
        "Content-Security-Policy": content_security_policy(body.decode()),
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }
    return body, headers


class SwaggerAssets(StaticFiles):
    def lookup_path(self, path: str) -> tuple[str, os.stat_result | None]:
        return super().lookup_path(path) if path in _ASSETS else ("", None)


def install(app: FastAPI) -> None:
    """Add ``GET /docs`` and mount Swagger UI's files; the app must be made with ``docs_url=None``."""
    if app.docs_url is not None:
        raise ValueError("create the FastAPI app with docs_url=None: this module serves /docs")
    openapi_url = app.openapi_url or "/openapi.json"

    async def docs(request: Request) -> HTMLResponse:
        root_path = request.scope.get("root_path", "").rstrip("/")
        body, headers = docs_page(root_path, openapi_url, app.title)
        return HTMLResponse(body, headers=headers)

    app.add_api_route(DOCS_PATH, docs, methods=["GET"], include_in_schema=False)
    app.mount(ASSETS_PATH, SwaggerAssets(directory=swagger_ui.static_path), name="swagger-ui")
