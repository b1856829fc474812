"""TOME_API_KEY: every endpoint but the probes, the metrics and the demo page needs the bearer key."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from serverutil import png, run_server

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with run_server({"TOME_API_KEY": KEY}) as base_url:
        yield base_url


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/classify"),
        ("POST", "/visualize"),
        ("GET", "/models"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/no-such-path"),
        ("POST", "/"),
    ],
)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", f"Basic {KEY}", "Bearer", KEY])
def test_protected_without_the_right_key(url: str, method: str, path: str, authorization: str | None) -> None:
    headers = {"authorization": authorization} if authorization else {}
    body = png() if method == "POST" else None
    response = httpx.request(method, f"{url}{path}", headers=headers, content=body)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "API key" in response.json()["detail"]
    assert response.json()["request_id"] == response.headers["x-request-id"]


def test_right_key_opens_everything(url: str) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
        assert client.post("/classify", params={"r": 2}, content=png()).status_code == 200
        assert client.post("/visualize", content=png()).status_code == 200
        assert client.get("/models").status_code == 200
        assert client.get("/openapi.json").status_code == 200


def test_probes_metrics_and_demo_page_stay_open(url: str) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/"):
        assert httpx.get(f"{url}{path}").status_code == 200
    assert httpx.get(f"{url}/static/no-such-asset.js").status_code == 404  # reached the demo router
    metrics = httpx.get(f"{url}/metrics").text
    assert 'code="401",endpoint="classify"' in metrics
