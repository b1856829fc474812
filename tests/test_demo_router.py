"""The demo page on its own: the page, its assets (StaticFiles), and what it must never serve."""

from __future__ import annotations

import base64
import hashlib
import re
from html.parser import HTMLParser

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tome_serve import demo, docs


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    demo.install(app)
    return TestClient(app)


class _References(HTMLParser):
    """Collects the URLs the page loads and the accessibility facts the smoke check needs."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.label_for: set[str] = set()
        self.controls: list[dict[str, str | None]] = []
        self.images: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        for name in ("src", "href", "data-src"):
            if attributes.get(name):
                self.urls.append(attributes[name] or "")
        if tag == "label" and attributes.get("for"):
            self.label_for.add(attributes["for"] or "")
        if tag in {"input", "select", "textarea"}:
            self.controls.append(attributes)
        if tag == "img":
            self.images.append(attributes)


def _parse(html: str) -> _References:
    parser = _References()
    parser.feed(html)
    return parser


def test_page_is_html_with_a_same_origin_policy(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "connect-src 'self'" in policy
    assert "<title>" in response.text and 'id="r-slider"' in response.text


def test_every_local_reference_is_served_with_its_type(client: TestClient) -> None:
    page = _parse(client.get("/").text)
    local = [url for url in page.urls if url.startswith("static/")]
    assert {"static/app.js", "static/style.css"} <= set(local)
    expected_types = {".js": "text/javascript", ".css": "text/css", ".jpg": "image/jpeg", ".png": "image/png"}
    for url in local:
        response = client.get("/" + url)
        assert response.status_code == 200, url
        suffix = url[url.rfind(".") :]
        assert response.headers["content-type"].startswith(expected_types[suffix]), url
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-cache"


def test_nothing_is_loaded_from_another_origin(client: TestClient) -> None:
    page = client.get("/").text
    assets = [client.get(f"/static/{name}").text for name in ("app.js", "style.css")]
    for text in [page, *assets]:
        # Links to documentation are fine in prose, but nothing may fetch from elsewhere.
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
        assert not re.search(r"""(url\(|@import|fetch\()\s*["']?(https?:)?//""", text)


def test_bundled_samples_stay_small() -> None:
    samples = list((demo.STATIC_DIR / "samples").glob("*.jpg"))
    assert len(samples) >= 3
    assert sum(path.stat().st_size for path in samples) < 200_000


@pytest.mark.parametrize(
    "path",
    [
        "/static/../demo.py",
        "/static/%2e%2e/demo.py",
        "/static/..%2fdemo.py",
        "/static/samples/SOURCES.md",  # shipped, but not a web asset
        "/static/missing.js",
        "/static/",
    ],
)
def test_only_shipped_web_assets_are_served(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert "import" not in response.text


def test_accessibility_basics_in_markup(client: TestClient) -> None:
    page = _parse(client.get("/").text)
    for control in page.controls:
        assert control.get("id") in page.label_for or control.get("aria-label"), control
    for image in page.images:
        assert image.get("alt"), image


@pytest.mark.parametrize("root_path", ["", "/behind/a/proxy"])
def test_api_docs_load_only_from_this_server(root_path: str) -> None:
    """/docs references Swagger UI's files on this server (under a proxy's prefix, if any), each served
    with its type, and its policy allows the page's one inline set-up script and nothing else."""
    app = FastAPI(title="t", docs_url=None)
    docs.install(app)
    response = TestClient(app, root_path=root_path).get("/docs")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = _parse(response.text)
    assert page.urls and all(url.startswith(f"{root_path}/docs/assets/") for url in page.urls), page.urls
    assert f"url: '{root_path}/openapi.json'" in response.text
    types = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    for url in page.urls:
        asset = TestClient(app).get(url.removeprefix(root_path))
        assert asset.status_code == 200, url
        assert asset.headers["content-type"].startswith(types[url[url.rfind(".") :]]), url
    (script,) = re.findall(r"<script>(.*?)</script>", response.text, flags=re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = response.headers["content-security-policy"]
    assert f"script-src 'self' 'sha256-{digest}';" in policy and "default-src 'self'" in policy
    assert TestClient(app).get("/docs/assets/index.html").status_code == 404  # the package's own page
