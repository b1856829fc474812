"""Start the real tome-serve server in a subprocess for tests, and the helpers every server test shares.

``with run_server() as base_url: ...`` runs ``python -m tome_serve`` on a free loopback port with a tiny
randomly initialised ViT (:data:`TINY_MODEL_ENV`), waits until ``/readyz`` answers 200, and stops the
server with SIGTERM on exit (the same graceful drain a container runtime triggers). The helpers: request
bodies (:func:`encode`, :func:`png`), readiness (:func:`is_ready`, :func:`wait_until`) and metric values
read from an exposition (:func:`metric_value`).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tiny import NAME, TINY

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL_KWARGS = {**TINY, "img_size": 64, "patch_size": 8}
"""A 4-block ViT on 64x64 inputs with 8x8 patches: 64 patches + 1 class token = 65 tokens."""

TINY_MODEL_ENV: dict[str, str] = {
    "TOME_MODEL": NAME,
    "TOME_MODEL_KWARGS": json.dumps(TINY_MODEL_KWARGS),
    "TOME_WEIGHTS": "random",
    "TOME_DEVICE": "cpu",
    "TOME_DTYPE": "float32",
    "TOME_AUTO_WARMUP_S": "2",  # r=auto's cost table: the tiny model's grid takes well under this
}

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A running server: its base URL, the process, and the file its output goes to."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then wait for the graceful drain; SIGKILL if it does not end in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise RuntimeError(f"server ignored SIGTERM for {timeout}s\n{self.log()[-4000:]}") from None
        return self.process.returncode


def server_env(env: dict[str, str] | None = None, port: int | None = None) -> dict[str, str]:
    """The environment for a test server: this process's, the tiny model, then ``env`` on top."""
    full = {**os.environ, **TINY_MODEL_ENV, **(env or {})}
    full["TOME_HOST"] = "127.0.0.1"
    full["TOME_PORT"] = str(port or free_port())
    full.setdefault("PYTHONUNBUFFERED", "1")
    return full


def start_server(
    env: dict[str, str] | None = None,
    port: int | None = None,
    args: list[str] | None = None,
    wait_ready: bool = True,
) -> ServerProcess:
    """Start ``python -m tome_serve``; with ``wait_ready`` return once ``/readyz`` is 200."""
    full_env = server_env(env, port)
    url = f"http://127.0.0.1:{full_env['TOME_PORT']}"
    log = tempfile.NamedTemporaryFile(prefix="tome-serve-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "tome_serve", *(args or [])],
        cwd=REPO_ROOT,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    server = ServerProcess(url=url, process=process, log_path=Path(log.name))
    if wait_ready:
        try:
            wait_until_ready(server)
        except BaseException:
            if process.poll() is None:
                process.kill()
                process.wait()
            raise
    return server


def wait_until_ready(server: ServerProcess, timeout: float = START_TIMEOUT_S) -> None:
    """Until ``/readyz`` is 200; a server process that exits first fails at once, with its log."""

    def ready() -> bool:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}\n{server.log()[-4000:]}")
        with httpx.Client(base_url=server.url, timeout=2.0) as client:
            return is_ready(client)

    wait_until(ready, timeout, "/readyz 200", server.log)


def is_ready(client: httpx.Client) -> bool:
    """``/readyz`` answers 200. A server not listening yet counts as not ready. Starlette's TestClient is
    an ``httpx.Client`` too, so in-process apps are asked the same way."""
    try:
        return client.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


def wait_until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    log: Callable[[], str] = lambda: "",
    poll_s: float = 0.1,
) -> None:
    """Poll ``condition`` until it holds; past ``timeout``, fail naming ``what``, with ``log()``'s tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll_s)
    raise TimeoutError(f"{what} not within {timeout:.0f} s\n{log()[-4000:]}")


def lane_of(client: Any, model: str) -> Any:
    """The lane (server/lane.py) serving ``model`` in an in-process server's TestClient."""
    return client.app.state.service.lanes[model]


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    """``image`` as the bytes of a file in ``fmt`` (Pillow's save options passed on)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png(colour: tuple[int, int, int] | str = (90, 140, 200), size: tuple[int, int] = (64, 64)) -> bytes:
    """A one-colour PNG: a valid upload whose content does not matter to the test."""
    return encode(Image.new("RGB", size, colour))


def metric_value(exposition: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``, in a Prometheus text
    exposition (0 when none match, as for a series not created yet)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


@contextmanager
def run_server(env: dict[str, str] | None = None, port: int | None = None) -> Iterator[str]:
    """Run a tiny-model server for the duration of the block; yields its base URL."""
    server = start_server(env, port)
    try:
        yield server.url
    finally:
        server.stop()
        server.log_path.unlink(missing_ok=True)
