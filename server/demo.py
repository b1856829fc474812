"""The demo page: ``GET /`` and its static assets under ``/static/``, shipped inside the package.

The page is plain HTML, CSS and JavaScript with no build step and no third-party assets, so it
works on an offline server. It calls the public API (``/models``, ``/classify``, ``/visualize``)
from the browser like any other client, so it needs no server-side state of its own. The assets
are served by Starlette's ``StaticFiles`` (which refuses paths that resolve outside the folder),
limited to the web asset types below and sent with fixed media types and headers.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.staticfiles import NotModifiedResponse, StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).with_name("static")

_MEDIA_TYPES = MappingProxyType(
    {
        ".html": "text/html; charset=utf-8",
        ".css": "text/css; charset=utf-8",
        ".js": "text/javascript; charset=utf-8",
        ".jpg": "image/jpeg",
        ".png": "image/png",
        ".svg": "image/svg+xml",
    }
)

# The page loads nothing from other origins; saying so in a CSP also keeps a future edit from
# quietly adding a CDN dependency. blob: is needed for the merge map and the local image preview.
_PAGE_HEADERS = MappingProxyType(
    {
        "Content-Security-Policy": (
            "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
        ),
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }
)
_ASSET_HEADERS = MappingProxyType({"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})


class DemoAssets(StaticFiles):
    """``StaticFiles`` that serves only web assets (not, say, ``samples/SOURCES.md``), with the
    media types above rather than the platform's guesses, and the asset headers."""

    def lookup_path(self, path: str) -> tuple[str, os.stat_result | None]:
        if Path(path).suffix not in _MEDIA_TYPES:
            return "", None
        return super().lookup_path(path)

    def file_response(
        self,
        full_path: os.PathLike[str] | str,
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        media_type = _MEDIA_TYPES[Path(full_path).suffix]
        response = FileResponse(
            full_path, status_code, dict(_ASSET_HEADERS), media_type, stat_result=stat_result
        )
        if self.is_not_modified(response.headers, Headers(scope=scope)):
            return NotModifiedResponse(response.headers)
        return response


def demo_page() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html", media_type=_MEDIA_TYPES[".html"], headers=dict(_PAGE_HEADERS)
    )


def install(app: FastAPI) -> None:
    """Add ``GET /`` and mount the assets at ``/static``."""
    app.add_api_route("/", demo_page, methods=["GET"], include_in_schema=False)
    app.mount("/static", DemoAssets(directory=STATIC_DIR), name="static")
