"""The demo page: ``GET /`` and its static assets, shipped inside the package in ``static/``.

The page is plain HTML, CSS and JavaScript with no build step and no third-party assets, so it
works on an offline server. It calls the public API (``/models``, ``/classify``, ``/visualize``)
from the browser like any other client, so it needs no server-side state of its own.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

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


def _asset_index(root: Path) -> MappingProxyType[str, Path]:
    """Map URL paths to the files shipped under ``root``.

    Serving only from this fixed index means a crafted path (``..``, encoded separators, symlinks
    added later) has nothing to resolve to.
    """
    files = {
        path.relative_to(root).as_posix(): path
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.suffix in _MEDIA_TYPES
    }
    return MappingProxyType(files)


_ASSETS = _asset_index(STATIC_DIR)

router = APIRouter(include_in_schema=False)


@router.get("/")
def demo_page() -> FileResponse:
    page = STATIC_DIR / "index.html"
    return FileResponse(page, media_type=_MEDIA_TYPES[".html"], headers=dict(_PAGE_HEADERS))


@router.get("/static/{asset_path:path}")
def static_asset(asset_path: str) -> FileResponse:
    path = _ASSETS.get(asset_path)
    if path is None:
        raise HTTPException(status_code=404, detail=f"no static asset named {asset_path!r}")
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=dict(_ASSET_HEADERS))
