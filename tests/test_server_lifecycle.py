"""Start-up and shutdown: readiness while loading and draining, failing fast without weights,
and a SIGTERM that finishes the queued requests before the process exits."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import threading
import time

import httpx
from fastapi.testclient import TestClient
from PIL import Image
from serverutil import REPO_ROOT, TINY_MODEL_KWARGS, server_env, start_server

from tome_serve.app import create_app
from tome_serve.config import Settings
from tome_serve.loading import load_model
from tome_serve.models import LoadedModel

MODEL = "vit_tiny_patch16_224"


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 200, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "never became ready"
        time.sleep(0.05)


def test_readyz_is_503_until_loaded_and_while_draining() -> None:
    release = threading.Event()

    def slow_loader(name: str, settings: Settings) -> LoadedModel:
        assert release.wait(30)
        return load_model(name, settings)

    settings = Settings(model=MODEL, weights="random", model_kwargs=TINY_MODEL_KWARGS, device="cpu")
    fatal: list[str] = []
    app = create_app(settings, loader=slow_loader, on_fatal=fatal.append)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200  # alive while loading
        loading = client.get("/readyz")
        assert (loading.status_code, loading.json()["status"]) == (503, "loading")
        refused = client.post("/classify", content=png())
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert client.get("/models").status_code == 503
        release.set()
        wait_ready(client)
        assert client.post("/classify", content=png()).status_code == 200
        app.state.service.begin_draining()  # what SIGTERM does first
        draining = client.get("/readyz")
        assert (draining.status_code, draining.json()["status"]) == (503, "draining")
        assert client.post("/classify", content=png()).status_code == 503
    assert not fatal


def test_backbone_without_classifier_serves_visualize_only() -> None:
    kwargs = {**TINY_MODEL_KWARGS, "num_classes": 0}
    app = create_app(Settings(model=MODEL, weights="random", model_kwargs=kwargs, device="cpu"))
    with TestClient(app) as client:
        wait_ready(client)
        (info,) = client.get("/models").json()["models"]
        assert info["num_classes"] == 0 and "no classifier head" in info["notes"][0]
        refused = client.post("/classify", content=png())
        assert refused.status_code == 422 and "/visualize" in refused.json()["detail"]
        shown = client.post("/visualize", content=png())
        assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"


def test_missing_pretrained_weights_fail_fast_with_advice(tmp_path) -> None:
    # Nothing listens on port 9, so the hub is unreachable; HF_HOME is empty, so nothing is cached.
    env = server_env(
        {
            "TOME_WEIGHTS": "pretrained",
            "HF_HOME": str(tmp_path),
            "HF_HUB_OFFLINE": "",
            "HF_ENDPOINT": "http://127.0.0.1:9",
        }
    )
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(proxy, None)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "tome_serve"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert time.monotonic() - started < 60
    assert "could not obtain pretrained weights" in result.stderr
    assert "--weights random" in result.stderr and "TOME_WEIGHTS" in result.stderr


def test_unsupported_model_fails_start_up() -> None:
    env = server_env({"TOME_MODEL": "resnet18", "TOME_MODEL_KWARGS": "{}"})
    result = subprocess.run(
        [sys.executable, "-m", "tome_serve"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "cannot be served with token merging" in result.stderr


def test_invalid_settings_are_reported() -> None:
    env = {**os.environ, "TOME_MAX_BATCH_SIZE": "0", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "tome_serve"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "max_batch_size" in result.stderr


def test_sigterm_finishes_queued_requests_then_exits() -> None:
    server = start_server({"TOME_MAX_BATCH_SIZE": "64", "TOME_MAX_DELAY_MS": "1500"})
    try:

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as http:
                queued = [
                    asyncio.create_task(http.post("/classify", params={"r": r}, content=png()))
                    for r in (0, 8, 8)
                ]
                await asyncio.sleep(0.5)  # received and queued, waiting for the 1.5 s batch window
                server.process.terminate()  # SIGTERM
                return await asyncio.gather(*queued)

        responses = asyncio.run(scenario())
        assert [response.status_code for response in responses] == [200, 200, 200]
        assert [response.json()["batch_size"] for response in responses] == [1, 2, 2]
        server.process.wait(30)
        assert "Application shutdown complete" in server.log()
    finally:
        server.stop()
        server.log_path.unlink(missing_ok=True)
    try:
        httpx.get(f"{server.url}/healthz", timeout=2)
        raise AssertionError("the server still answers after SIGTERM")
    except httpx.TransportError:
        pass
