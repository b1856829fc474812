"""Start-up, failure and shutdown: readiness while loading and draining, a failing batch, the
command line, refusing a busy port and impossible settings, failing fast without weights, and a
SIGTERM that finishes the queued requests before the process exits."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from serverutil import (
    REPO_ROOT,
    TINY_MODEL_KWARGS,
    free_port,
    is_ready,
    png,
    server_env,
    start_server,
    wait_until,
)

import tome
from tome_serve.app import create_app
from tome_serve.config import Settings
from tome_serve.loading import LoadedModel, load_model
from tome_serve.threads import SMALL_CPU_CORES, THREADS_PER_INSTANCE, loading_threads

MODEL = "vit_tiny_patch16_224"
TOKENS, DEPTH = 65, 4


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
        wait_until(lambda: is_ready(client), 30, "/readyz 200", poll_s=0.05)
        assert client.post("/classify", content=png()).status_code == 200
        app.state.service.begin_draining()  # what SIGTERM does first
        draining = client.get("/readyz")
        assert (draining.status_code, draining.json()["status"]) == (503, "draining")
        assert client.post("/classify", content=png()).status_code == 503
    assert not fatal


def test_the_loading_thread_ends_once_the_models_are_loaded() -> None:
    """Loading runs torch kernels, so the loading thread gets an OpenMP team, which lives as long as
    the thread. Kept alive (e.g. parked in asyncio's default pool), that idle team counts against
    the cores, and libgomp then makes the inference threads' team sleep between kernels: one
    instance of 2 torch threads on 2 cores left 17 % of the CPU idle at saturation."""
    loaders: list[threading.Thread] = []

    def recording_loader(name: str, settings: Settings) -> LoadedModel:
        loaders.append(threading.current_thread())
        return load_model(name, settings)

    settings = Settings(model=MODEL, weights="random", model_kwargs=TINY_MODEL_KWARGS, device="cpu")
    with TestClient(create_app(settings, loader=recording_loader)) as client:
        wait_until(lambda: is_ready(client), 30, "/readyz 200", poll_s=0.05)
        [loader] = loaders
        loader.join(timeout=10)
        assert not loader.is_alive(), f"the loading thread {loader.name} outlived the loading"
        assert loader is not threading.main_thread()
        assert client.post("/classify", content=png()).status_code == 200


def test_models_load_on_one_instances_torch_threads_and_the_default_is_put_back() -> None:
    """A seeded init on every core's thread crawls when another process takes part of a core (each
    pass waits at a barrier), so loading runs on one instance's count, and threads started later
    still begin with the process's own count."""
    seen: list[int] = []

    def recording_loader(name: str, settings: Settings) -> LoadedModel:
        seen.append(torch.get_num_threads())
        return load_model(name, settings)

    before = torch.get_num_threads()
    settings = Settings(model=MODEL, weights="random", model_kwargs=TINY_MODEL_KWARGS, device="cpu")
    with TestClient(create_app(settings, loader=recording_loader)) as client:
        wait_until(lambda: is_ready(client), 30, "/readyz 200", poll_s=0.05)
        assert seen == [loading_threads()]
        later: list[int] = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [before]
        assert client.post("/classify", content=png()).status_code == 200


def test_loading_threads_follow_the_automatic_plan() -> None:
    assert loading_threads(cores=2) == loading_threads(cores=SMALL_CPU_CORES) == 1
    assert loading_threads(cores=64) == THREADS_PER_INSTANCE


FAIL_R = 3


def failing_at_r(r: int):
    """A loader whose model raises inside its forward pass at ``r`` (and only there)."""
    tokens_out = tome.token_counts(TOKENS, DEPTH, r)[-1]
    assert all(tome.token_counts(TOKENS, DEPTH, other)[-1] != tokens_out for other in range(33) if other != r)

    def fail(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if output.shape[1] == tokens_out:
            raise RuntimeError(f"simulated failure at r={r}")

    def loader(name: str, settings: Settings) -> LoadedModel:
        loaded = load_model(name, settings)
        loaded.module.blocks[-1].register_forward_hook(fail)
        return loaded

    return loader


def test_failing_batch_answers_500_with_request_id_and_server_keeps_serving(caplog) -> None:
    settings = Settings(model=MODEL, weights="random", model_kwargs=TINY_MODEL_KWARGS, device="cpu")
    with TestClient(create_app(settings, loader=failing_at_r(FAIL_R))) as client:
        wait_until(lambda: is_ready(client), 30, "/readyz 200", poll_s=0.05)
        response = client.post(
            "/classify", params={"r": FAIL_R}, content=png(), headers={"x-request-id": "r-42"}
        )
        assert response.status_code == 500
        body = response.json()
        assert body["request_id"] == "r-42" == response.headers["x-request-id"]
        assert "inference failed" in body["detail"] and "simulated failure" in body["detail"]
        assert "r-42" in body["detail"]
        assert any("r-42" in record.getMessage() for record in caplog.records if record.levelname == "ERROR")
        visualized = client.post("/visualize", params={"r": FAIL_R}, content=png())
        assert (
            visualized.status_code == 500 and visualized.json()["request_id"] in visualized.json()["detail"]
        )
        assert client.post("/classify", params={"r": FAIL_R + 1}, content=png()).status_code == 200
        assert client.post("/classify", params={"r": FAIL_R}, content=png()).status_code == 500
        assert client.get("/readyz").status_code == 200
        metrics = client.get("/metrics").text
        assert (
            f'tome_requests_total{{code="500",endpoint="classify",model="{MODEL}",r="{FAIL_R}"}} 2.0'
            in metrics
        )


def test_every_setting_is_a_flag_and_the_command_line_wins(monkeypatch, capsys) -> None:
    monkeypatch.setenv("TOME_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("TOME_DEFAULT_R", "5")
    settings = Settings(
        _cli_parse_args=["--max-batch-size", "3", "--access-log", "--model-kwargs", '{"a": 1}']
    )
    assert (settings.max_batch_size, settings.default_r, settings.access_log) == (3, 5, True)
    assert settings.model_kwargs == {"a": 1}
    with pytest.raises(SystemExit) as exit_:
        Settings(_cli_parse_args=["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, field in Settings.model_fields.items():
        assert f"--{name.replace('_', '-')}" in text, name
        assert field.description and " ".join(field.description.split()) in text, name


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tome_serve", *args],
        cwd=REPO_ROOT,
        env=env or server_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_busy_port_is_refused_before_loading_models() -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = run_cli("--port", str(port))
    assert result.returncode == 3, result.stderr[-3000:]
    assert f"127.0.0.1:{port}" in result.stderr and "--port or TOME_PORT" in result.stderr
    assert "loading" not in result.stderr  # refused before any model was loaded


def test_impossible_r_settings_are_refused_or_reported() -> None:
    result = run_cli("--default-r", "20", "--max-r", "10")
    assert result.returncode == 2 and "above --max-r" in result.stderr
    loaded = load_model(
        MODEL,
        Settings(model=MODEL, weights="random", model_kwargs=TINY_MODEL_KWARGS, default_r=999, max_r=999),
    )
    assert (loaded.limits.ceiling, loaded.limits.default) == (32, 32)
    assert any("TOME_MAX_R is 999" in note for note in loaded.notes)
    assert any("TOME_DEFAULT_R is 999" in note for note in loaded.notes)


def test_backbone_without_classifier_serves_visualize_only() -> None:
    kwargs = {**TINY_MODEL_KWARGS, "num_classes": 0}
    app = create_app(Settings(model=MODEL, weights="random", model_kwargs=kwargs, device="cpu"))
    with TestClient(app) as client:
        wait_until(lambda: is_ready(client), 30, "/readyz 200", poll_s=0.05)
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
    result = run_cli(env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert time.monotonic() - started < 60
    assert result.stderr.count("could not obtain pretrained weights") == 1  # said once
    assert "Uvicorn running" not in result.stderr  # and nothing claims the server runs
    assert "--weights random" in result.stderr and "TOME_WEIGHTS" in result.stderr


def test_unsupported_model_fails_start_up() -> None:
    result = run_cli(env=server_env({"TOME_MODEL": "resnet18", "TOME_MODEL_KWARGS": "{}"}))
    assert result.returncode == 1
    assert "cannot be served with token merging" in result.stderr


def test_invalid_settings_are_reported() -> None:
    env = {**os.environ, "TOME_MAX_BATCH_SIZE": "0"}
    result = run_cli(env=env, timeout=60)
    assert result.returncode == 2 and "max_batch_size" in result.stderr
    result = run_cli("--port", "not-a-port", timeout=60)
    assert result.returncode == 2 and "port" in result.stderr


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_finishes_queued_requests_then_exits_0(stop: signal.Signals) -> None:
    server = start_server({"TOME_MAX_BATCH_SIZE": "64", "TOME_MAX_DELAY_MS": "1500"})
    try:

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as http:
                queued = [
                    asyncio.create_task(http.post("/classify", params={"r": r}, content=png()))
                    for r in (0, 8, 8)
                ]
                await asyncio.sleep(0.5)  # received and queued, waiting for the 1.5 s batch window
                server.process.send_signal(stop)
                return await asyncio.gather(*queued)

        responses = asyncio.run(scenario())
        assert [response.status_code for response in responses] == [200, 200, 200]
        assert [response.json()["batch_size"] for response in responses] == [1, 2, 2]
        # A clean drain is a normal exit: not 143 (killed by SIGTERM), not -2 and a KeyboardInterrupt.
        assert server.process.wait(30) == 0, server.log()[-3000:]
        assert "Application shutdown complete" in server.log()
        assert "Traceback" not in server.log() and "KeyboardInterrupt" not in server.log()
    finally:
        server.stop()
        server.log_path.unlink(missing_ok=True)
    try:
        httpx.get(f"{server.url}/healthz", timeout=2)
        raise AssertionError("the server still answers after SIGTERM")
    except httpx.TransportError:
        pass


def test_a_second_ctrl_c_stops_before_the_drain_and_exits_non_zero() -> None:
    server = start_server({"TOME_MAX_BATCH_SIZE": "64", "TOME_MAX_DELAY_MS": "5000"})
    try:

        async def scenario() -> BaseException | httpx.Response:
            async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as http:
                queued = asyncio.create_task(http.post("/classify", content=png()))
                await asyncio.sleep(0.5)  # queued, waiting for the 5 s batch window
                server.process.send_signal(signal.SIGINT)
                await asyncio.sleep(0.5)
                server.process.send_signal(signal.SIGINT)  # do not wait for the queued request
                (outcome,) = await asyncio.gather(queued, return_exceptions=True)
                return outcome

        outcome = asyncio.run(scenario())
        assert not isinstance(outcome, httpx.Response) or outcome.status_code != 200
        assert server.process.wait(30) == 4, server.log()[-3000:]
        assert "stopped before every request was answered" in server.log()
    finally:
        server.stop()
        server.log_path.unlink(missing_ok=True)


def test_auto_settings_are_checked_at_start_up() -> None:
    assert Settings().default_r == "auto" and Settings(default_r=" AUTO ").default_r == "auto"
    assert Settings(default_r="12").default_r == 12
    result = run_cli("--default-r", "fast", timeout=60)
    assert result.returncode == 2
    assert "TOME_DEFAULT_R must be 'auto' or a non-negative integer, got 'fast'" in result.stderr
    result = run_cli("--latency-target-ms", "20000", "--request-timeout-ms", "5000", timeout=60)
    assert result.returncode == 2
    assert "TOME_LATENCY_TARGET_MS must be above 0 and at most TOME_REQUEST_TIMEOUT_MS (5000)" in (
        result.stderr
    )
    result = run_cli("--auto-max-r", "-1", timeout=60)
    assert result.returncode == 2 and "auto_max_r" in result.stderr
