"""Server throughput and latency against the model's own throughput, measured in the same run.

    python -m tome_bench.serve --model vit_small_patch16_224 --weights random --batch-size 8 --r 16
    python -m tome_bench.serve ... --endpoint embeddings [--encoding float]

1. Starts ``python -m tome_serve`` (or uses ``--url``) with the given model and batching knobs.
2. Direct: the same model, loaded and patched in this process the same way, timed on a ready-made
   batch of ``--batch-size`` preprocessed images (no HTTP, no decoding): the ceiling. With
   ``--endpoint embeddings`` the direct model computes what an embedding needs, ``forward_features``
   then ``forward_head(pre_logits=True)``, and no classifier.
3. Saturation: ``--concurrency`` closed-loop clients (default 3 x batch size) post a JPEG back to
   back for ``--duration`` s; throughput and p50/p95/p99 latency of the answers. With ``--endpoint
   embeddings`` each request is OpenAI's JSON embeddings request of that one JPEG as a data URI,
   answered in ``--encoding`` (default base64, what OpenAI's clients ask for).
4. Overload: open-loop arrivals at ``--overload`` (default 2) x the saturation throughput; a server
   that sheds answers the excess with 429 and keeps the latency of what it accepts bounded.
5. Direct again (drift check), then results to ``--out`` (JSON) and the same name with .csv.

Targets (issue 11): saturation throughput >= 90% of direct; under overload every request answered
(200, or 429 with Retry-After) and no latency growth from the first to the last third of the phase.
Clients run in this process, on the same machine as the server, and their CPU time counts against
the server's, so each phase also reports, over its measured window (from /proc): the server
process's CPU ms per answered image (with its child processes) beside the direct model's CPU ms per
image, the cores used by the server and by the load generator, and how busy the machine was.
Percentiles are nearest-rank (``tome_bench.stats.percentile``, the same as loadtest/).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import io
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import torch

import tome
from tome_runtime.hardware import cpu_name

from .extras import exit_for_missing
from .stats import CpuMeter, percentile
from .timing import interleaved_seconds

try:
    import aiohttp
    import httpx
    import numpy as np
    from PIL import Image

    from tome_serve.config import Settings
    from tome_serve.loading import load_model
except ModuleNotFoundError as missing:
    exit_for_missing(missing)


@dataclass
class PhaseResult:
    phase: str
    seconds: float
    offered_rps: float | None
    sent: int
    answered: int
    shed_429: int
    timed_out_504: int
    other_errors: int
    throughput_ips: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    p95_first_third_ms: float | None = None
    p95_last_third_ms: float | None = None
    mean_batch_size: float | None = None
    errors: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    """Over the measured window: cores used by the server and the load generator, their shares of
    the machine, the machine's busy and idle shares, and CPU ms per answered image."""


@dataclass
class Outcome:
    sent_at: float
    latency_s: float
    status: int
    r: int | None = None
    """The r the server used (X-Tome-R, or the JSON answer's "r")."""


def percentile_ms(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (tome_bench.stats, shared with loadtest/) of seconds, in ms."""
    return round(percentile(values, q) * 1000, 2) if values else None


def summarize(name: str, outcomes: list[Outcome], seconds: float, offered: float | None) -> PhaseResult:
    ok = sorted((o for o in outcomes if o.status == 200), key=lambda o: o.sent_at)
    latencies = [o.latency_s for o in ok]
    third = len(ok) // 3
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.status not in (200, 429, 504):
            errors[str(o.status)] = errors.get(str(o.status), 0) + 1
    return PhaseResult(
        phase=name,
        seconds=round(seconds, 2),
        offered_rps=None if offered is None else round(offered, 2),
        sent=len(outcomes),
        answered=len(ok),
        shed_429=sum(o.status == 429 for o in outcomes),
        timed_out_504=sum(o.status == 504 for o in outcomes),
        other_errors=sum(errors.values()),
        throughput_ips=round(len(ok) / seconds, 2),
        p50_ms=percentile_ms(latencies, 50),
        p95_ms=percentile_ms(latencies, 95),
        p99_ms=percentile_ms(latencies, 99),
        p95_first_third_ms=percentile_ms([o.latency_s for o in ok[:third]], 95) if third else None,
        p95_last_third_ms=percentile_ms([o.latency_s for o in ok[-third:]], 95) if third else None,
        errors=errors,
    )


class PhaseMeter(CpuMeter):
    """CPU use over a load phase's measured window, and every request finished during the phase."""

    def __init__(self, server_pid: int | None) -> None:
        super().__init__(server_pid)
        self.window = (0.0, 0.0)
        self.completed: list[tuple[float, int]] = []
        """(monotonic time, status) of every finished request, warm-up included."""


@dataclass(frozen=True)
class EmbeddingsPost:
    """Post OpenAI's embeddings request to /v1/embeddings instead of the image to /classify: one image
    per request, as a data URI, with its answer in ``encoding`` ("base64" or "float")."""

    encoding: str = "base64"

    def body(self, image: bytes, r: int | str) -> bytes:
        uri = "data:image/jpeg;base64," + base64.b64encode(image).decode("ascii")
        return json.dumps({"input": [uri], "encoding_format": self.encoding, "r": r}).encode()


class Client:
    """The load generator's HTTP client: aiohttp with a keep-alive connection pool.

    The clients share the machine with the server, so their CPU counts against it. Measured on the
    AMD EPYC 2-vCPU machine (16 concurrent keep-alive connections, 15 kB POSTs to a trivial uvicorn
    app; notes/speed.md of issue 11): aiohttp 3.14 used 0.10 ms of CPU per request, httpx 0.28
    1.4 ms, a hand-written raw HTTP/1.1 client 0.03 ms. Each phase reports the client's measured
    share of the machine beside the server's.
    """

    multipart = False
    """Post the image as multipart field ``file`` (LitServe reads forms only) instead of a raw body."""

    def __init__(
        self,
        url: str,
        payload: bytes,
        r: int | str,
        headers: dict[str, str],
        connections: int,
        params: str = "",
        completed: list[tuple[float, int]] | None = None,
        embeddings: EmbeddingsPost | None = None,
    ) -> None:
        self._url = f"{url.rstrip('/')}/classify?r={r}&top_k=1{params}"
        self._payload = payload
        self._headers = headers if self.multipart else {"Content-Type": "image/jpeg", **headers}
        if embeddings is not None:
            if params or self.multipart:
                raise ValueError("an embeddings request carries its parameters in its JSON body")
            self._url = f"{url.rstrip('/')}/v1/embeddings"
            self._payload = embeddings.body(payload, r)
            self._headers = {"Content-Type": "application/json", **headers}
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        self.completed = completed if completed is not None else []

    async def __aenter__(self) -> Client:
        connector = aiohttp.TCPConnector(limit=self._connections)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self) -> tuple[int, int | None]:
        """One POST: its HTTP status (-1 when the connection failed: reset, closed, refused) and the
        r the server used."""
        assert self._session is not None
        data: bytes | aiohttp.FormData = self._payload
        if self.multipart:
            data = aiohttp.FormData()
            data.add_field("file", self._payload, filename="image.jpg", content_type="image/jpeg")
        used_r = None
        try:
            async with self._session.post(self._url, data=data, headers=self._headers) as response:
                body = await response.read()
                status = response.status
                used_r = _used_r(status, response.headers.get("x-tome-r"), body)
        except (TimeoutError, aiohttp.ClientError, OSError):
            status = -1
        self.completed.append((time.monotonic(), status))
        return status, used_r


def _used_r(status: int, header: str | None, body: bytes) -> int | None:
    if header is not None and header.strip().isdigit():
        return int(header)
    if status != 200 or not body.startswith(b"{"):
        return None
    answer = json.loads(body)
    r = answer.get("r")
    if r is None and answer.get("data"):  # an embeddings answer: each image has its r
        r = answer["data"][0].get("r")
    return r if isinstance(r, int) else None


def answer_r(head: bytes, body: bytes) -> int | None:
    """The r the server used, from a raw response: its X-Tome-R header, or the "r" of a JSON answer."""
    found = re.search(rb"(?im)^x-tome-r:\s*(\d+)", head)
    status = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return _used_r(int(status.group(1)) if status else 0, found.group(1).decode() if found else None, body)


def classify_request(
    url: str, payload: bytes, r: int | str, headers: dict[str, str], params: str = ""
) -> tuple[str, int, bytes]:
    """One raw HTTP/1.1 request (host, port, bytes); ``params`` are more query parameters ("&name=value")."""
    parts = urlsplit(url)
    lines = [
        f"POST /classify?r={r}&top_k=1{params} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Content-Type: image/jpeg",
        f"Content-Length: {len(payload)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return (
        parts.hostname or "127.0.0.1",
        parts.port or 80,
        ("\r\n".join(lines) + "\r\n\r\n").encode() + payload,
    )


def poisson_schedule(rate: float, seconds: float, seed: int = 0) -> list[float]:
    """Arrival offsets in [0, seconds) of a Poisson process at ``rate`` per second (the first at 0),
    seeded so every run and every variant of a comparison sees the same arrivals."""
    rng = np.random.default_rng(seed)
    offsets, at = [], 0.0
    while at < seconds:
        offsets.append(at)
        at += rng.exponential(1.0 / rate)
    return offsets


async def metered(meter: PhaseMeter | None, window: tuple[float, float]) -> None:
    """Start ``meter`` at the window's start and stop it at its end."""
    if meter is None:
        return
    meter.window = window
    await asyncio.sleep(max(0.0, window[0] - time.monotonic()))
    meter.__enter__()
    await asyncio.sleep(max(0.0, window[1] - time.monotonic()))
    meter.__exit__(None, None, None)


async def closed_loop(
    url: str,
    payload: bytes,
    r: int | str,
    clients: int,
    warmup: float,
    seconds: float,
    headers: dict[str, str],
    params: str = "",
    meter: PhaseMeter | None = None,
    embeddings: EmbeddingsPost | None = None,
) -> list[Outcome]:
    """``clients`` workers, each sending its next request as soon as the last is answered."""
    outcomes: list[Outcome] = []
    start = time.monotonic()
    window = (start + warmup, start + warmup + seconds)
    completed = meter.completed if meter is not None else None
    async with Client(url, payload, r, headers, clients, params, completed, embeddings) as client:

        async def worker() -> None:
            while time.monotonic() < window[1]:
                sent = time.monotonic()
                status, used_r = await client.send()
                done = time.monotonic()
                if window[0] <= sent and done <= window[1]:
                    outcomes.append(Outcome(sent, done - sent, status, used_r))

        await asyncio.gather(metered(meter, window), *(worker() for _ in range(clients)))
    return outcomes


async def open_loop(
    url: str,
    payload: bytes,
    r: int | str,
    rate: float,
    warmup: float,
    seconds: float,
    headers: dict[str, str],
    params: str = "",
    meter: PhaseMeter | None = None,
    embeddings: EmbeddingsPost | None = None,
) -> list[Outcome]:
    """Requests arrive at ``rate`` per second whatever the server does (seeded Poisson arrivals)."""
    outcomes: list[Outcome] = []
    start = time.monotonic()
    window = (start + warmup, start + warmup + seconds)
    completed = meter.completed if meter is not None else None
    # At most 256 connections, so the client cannot drown itself; an arrival that finds every
    # connection busy waits in the client's pool, and that wait counts in its latency.
    async with Client(url, payload, r, headers, 256, params, completed, embeddings) as client:

        async def arrival() -> None:
            sent = time.monotonic()
            status, used_r = await client.send()
            if window[0] <= sent:
                outcomes.append(Outcome(sent, time.monotonic() - sent, status, used_r))

        tasks = [asyncio.create_task(metered(meter, window))]
        for offset in poisson_schedule(rate, warmup + seconds):
            await asyncio.sleep(max(0.0, start + offset - time.monotonic()))
            tasks.append(asyncio.create_task(arrival()))
        await asyncio.gather(*tasks)
    return [o for o in outcomes if o.sent_at <= window[1]]


def cpu_report(meter: PhaseMeter) -> dict:
    """The phase's CPU figures; per image over the 200 answers that completed inside the window."""
    sample = meter.sample
    if sample is None:
        return {}
    start, end = meter.window
    finished = [status for at, status in meter.completed if start <= at <= end]
    images = sum(status == 200 for status in finished)
    report: dict[str, float] = sample.shares(os.cpu_count() or 1)
    report["answered_in_window"] = images
    report["server_cpu_ms_per_image"] = round(1000 * sample.server_s / max(images, 1), 2)
    report["load_generator_cpu_ms_per_request"] = round(1000 * sample.client_s / max(len(finished), 1), 3)
    return report


def direct_throughput(
    settings: Settings, r: int, batch_size: int, seconds: float, image: Image.Image, embeddings: bool = False
) -> dict:
    """Images per second of the patched model itself on a ready batch (median batch time); with
    ``embeddings``, of the features and the pooled pre-logits an embedding needs (no classifier)."""
    loaded = load_model(settings.model_names[0], settings)
    pixels = torch.stack([loaded.preprocessor(image)] * batch_size).to(loaded.device)
    batch = loaded.preprocessor.normalize(pixels, loaded.dtype)  # ready input: the model's time alone
    module = loaded.module

    calls = 0

    def forward() -> None:
        nonlocal calls
        calls += 1
        with tome.merging(r=r):
            if embeddings:
                module.forward_head(module.forward_features(batch), pre_logits=True)
            else:
                module(batch)

    probe = interleaved_seconds({"direct": forward}, rounds=2, warmup=2, device=loaded.device)["direct"]
    rounds = max(5, int(seconds / max(probe, 1e-4)))
    calls = 0
    with CpuMeter(None) as meter:  # this process alone: the model's own CPU per image
        per_batch = interleaved_seconds({"direct": forward}, rounds=rounds, warmup=1, device=loaded.device)[
            "direct"
        ]
    sample = meter.sample
    assert sample is not None
    return {
        "batch_seconds": round(per_batch, 5),
        "throughput_ips": round(batch_size / per_batch, 2),
        "rounds": rounds,
        "torch_threads": torch.get_num_threads(),
        "cpu_ms_per_image": round(1000 * sample.client_s / max(calls * batch_size, 1), 2),
        "machine_busy_share": sample.shares(os.cpu_count() or 1)["machine_busy_share"],
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    args: argparse.Namespace, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """``python -m tome_serve`` configured from ``args`` (and ``extra_env``); returns it once ready."""
    port = free_port()
    env = {
        **os.environ,
        "TOME_MODEL": args.model,
        "TOME_WEIGHTS": args.weights,
        "TOME_MODEL_KWARGS": args.model_kwargs,
        "TOME_DEVICE": args.device,
        "TOME_DTYPE": args.dtype,
        "TOME_HOST": "127.0.0.1",
        "TOME_PORT": str(port),
        "TOME_MAX_BATCH_SIZE": str(args.batch_size),
        "TOME_MAX_DELAY_MS": str(args.max_delay_ms),
        "TOME_MAX_QUEUE": str(args.max_queue),
        "TOME_REQUEST_TIMEOUT_MS": str(args.request_timeout_ms),
        "TOME_INSTANCES": str(args.instances),
        "TOME_LOG_LEVEL": "warning",
        **(extra_env or {}),
    }
    process = subprocess.Popen([sys.executable, "-m", "tome_serve"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ok(process, f"{url}/readyz", "the server")
    except SystemExit:
        process.kill()
        raise
    return process, url


def wait_until_ok(process: subprocess.Popen, url: str, what: str, timeout_s: float = 600) -> None:
    """Poll ``url`` until it answers 200; SystemExit if ``process`` (``what``) exits first or
    ``timeout_s`` pass."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} did not become ready")


def batch_totals(url: str, model: str, r: int, headers: dict[str, str]) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram for (model, r)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = {"tome_batch_size_sum": 0.0, "tome_batch_size_count": 0.0}
    response = httpx.get(f"{url}/metrics", headers=headers)
    if response.status_code != 200:  # a peer server without our metrics
        return 0.0, 0.0
    text = response.text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name in totals and labels.get("model") == model and labels.get("r") == str(r):
                totals[sample.name] += sample.value
    return totals["tome_batch_size_sum"], totals["tome_batch_size_count"]


def run_phase(
    name: str,
    load,
    meter: PhaseMeter,
    args: argparse.Namespace,
    url: str,
    model: str,
    headers: dict[str, str],
    offered: float | None,
) -> PhaseResult:
    """Run one load coroutine; summarise it with the server's mean batch size and the CPU figures."""
    sum_before, count_before = batch_totals(url, model, args.r, headers)
    outcomes = asyncio.run(load)
    sum_after, count_after = batch_totals(url, model, args.r, headers)
    result = summarize(name, outcomes, args.duration, offered)
    result.cpu = cpu_report(meter)
    if count_after > count_before:
        result.mean_batch_size = round((sum_after - sum_before) / (count_after - count_before), 2)
    print(f"{name}: {asdict(result)}", flush=True)
    return result


def test_image(path: str | None, size: int) -> tuple[Image.Image, bytes]:
    if path:
        image = Image.open(path).convert("RGB")
    else:  # smooth colour noise: JPEG-compresses like a photo, not like a flat colour
        noise = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
        image = Image.fromarray(noise).resize((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return image, buffer.getvalue()


def add_server_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model options every benchmark that starts a server passes on to it."""
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--weights", default="random", help="as the server's --weights")
    parser.add_argument("--model-kwargs", default="{}", help="JSON, as the server's --model-kwargs")
    parser.add_argument("--device", default="cpu")


def model_settings(args: argparse.Namespace, **more: object) -> Settings:
    """The server's settings for the model options of :func:`add_server_model_arguments` and --dtype
    (``more`` overrides or adds), so the direct model loads as the served one does."""
    options = {
        "model": args.model,
        "weights": args.weights,
        "model_kwargs": args.model_kwargs,
        "device": args.device,
        "dtype": args.dtype,
    }
    return Settings(**{**options, **more})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_server_model_arguments(parser)
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["float32", "bfloat16", "float16", "auto"],
        help="the server's TOME_DTYPE and the direct model's dtype (auto: as the server resolves it)",
    )
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument(
        "--batch-size", type=int, default=8, help="server TOME_MAX_BATCH_SIZE and direct batch"
    )
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument(
        "--instances",
        default="auto",
        help="server TOME_INSTANCES, a number or auto (the direct baseline is one batch at a time with "
        "all of torch's threads)",
    )
    parser.add_argument("--request-timeout-ms", type=float, default=10_000)
    parser.add_argument(
        "--concurrency", type=int, default=None, help="saturation clients (default 3 x batch)"
    )
    parser.add_argument("--overload", type=float, default=2.0, help="overload rate / saturation throughput")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds measured per phase")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each phase")
    parser.add_argument(
        "--direct-seconds", type=float, default=15.0, help="seconds of direct timing, each time"
    )
    parser.add_argument("--image", default=None, help="image to send (default: synthetic)")
    parser.add_argument("--image-size", type=int, default=320, help="side of the synthetic image")
    parser.add_argument("--url", default=None, help="use this running server instead of starting one")
    parser.add_argument(
        "--server-pid", type=int, default=None, help="with --url: the server's process, for its CPU figures"
    )
    parser.add_argument(
        "--peer",
        action="store_true",
        help="--url is a peer (bench/litserve_peer.py): no /models or /metrics",
    )
    parser.add_argument("--multipart", action="store_true", help="post the image as multipart field 'file'")
    parser.add_argument(
        "--endpoint",
        default="classify",
        choices=["classify", "embeddings"],
        help="embeddings: OpenAI's JSON request to /v1/embeddings, one data URI image per request",
    )
    parser.add_argument(
        "--encoding",
        default="base64",
        choices=["base64", "float"],
        help="--endpoint embeddings: the encoding_format asked for",
    )
    parser.add_argument("--out", default="artifacts/serve_bench.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.endpoint == "embeddings" and (args.multipart or args.peer):
        raise SystemExit("--endpoint embeddings posts JSON to this project's server: no --multipart, --peer")
    embeddings = EmbeddingsPost(args.encoding) if args.endpoint == "embeddings" else None
    concurrency = args.concurrency or 3 * args.batch_size
    key = os.environ.get("TOME_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    settings = model_settings(args, max_batch_size=args.batch_size)
    image, payload = test_image(args.image, args.image_size)
    process, url = (None, args.url) if args.url else start_server(args)
    Client.multipart = args.multipart
    try:
        if args.peer:
            info = {"name": args.model, "weights": args.weights, "peer": True}
        else:
            info = httpx.get(f"{url}/models", headers=headers).json()["models"][0]
        model = info["name"]
        what = f"/{args.endpoint}" + (f" ({args.encoding})" if embeddings else "")
        print(
            f"server {url}: {model} ({info['weights']}), {what}, r={args.r}, batch {args.batch_size}",
            flush=True,
        )
        direct = (settings, args.r, args.batch_size, args.direct_seconds, image, embeddings is not None)
        direct_before = direct_throughput(*direct)
        print(f"direct (before): {direct_before}", flush=True)
        server_pid = process.pid if process is not None else args.server_pid
        meter = PhaseMeter(server_pid)
        phase = (args.warmup, args.duration, headers)
        saturated = closed_loop(url, payload, args.r, concurrency, *phase, meter=meter, embeddings=embeddings)
        saturation = run_phase("saturation", saturated, meter, args, url, model, headers, None)
        rate = args.overload * max(saturation.throughput_ips, 1.0)
        meter = PhaseMeter(server_pid)
        overloaded = open_loop(url, payload, args.r, rate, *phase, meter=meter, embeddings=embeddings)
        overload = run_phase("overload", overloaded, meter, args, url, model, headers, rate)
        direct_after = direct_throughput(*direct)
        print(f"direct (after): {direct_after}", flush=True)
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    info.pop("costs", None)
    result = report(args, concurrency, len(payload), info, direct_before, direct_after, saturation, overload)
    write(Path(args.out), result, [saturation, overload])
    print(json.dumps(result["verdict"], indent=2))
    return 0


def report(
    args: argparse.Namespace,
    concurrency: int,
    payload_bytes: int,
    server_model: dict,
    direct_before: dict,
    direct_after: dict,
    saturation: PhaseResult,
    overload: PhaseResult,
) -> dict:
    direct = (direct_before["throughput_ips"] + direct_after["throughput_ips"]) / 2
    ratio = saturation.throughput_ips / direct
    first, last = overload.p95_first_third_ms, overload.p95_last_third_ms
    growth = last / first if first and last else None
    return {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cpu_model": cpu_name(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "config": {
            **vars(args),
            "concurrency": concurrency,
            "payload_bytes": payload_bytes,
            "server_model": server_model,
        },
        "direct": {"before": direct_before, "after": direct_after, "mean_throughput_ips": round(direct, 2)},
        "phases": [asdict(saturation), asdict(overload)],
        "verdict": {
            "saturation_over_direct": round(ratio, 3),
            "meets_90_percent": ratio >= 0.9,
            "overload_shed_share": round(overload.shed_429 / max(overload.sent, 1), 3),
            "overload_p95_growth": None if growth is None else round(growth, 2),
            "sheds_instead_of_queueing": overload.shed_429 > 0 and (growth is None or growth < 1.5),
            "overload_without_http_answer": overload.errors.get("-1", 0),
            "server_cpu_per_image_over_direct": _cpu_ratio(saturation, direct_before, direct_after),
            "saturation_machine_busy_share": saturation.cpu.get("machine_busy_share"),
            "saturation_load_generator_share": saturation.cpu.get("load_generator_share"),
        },
    }


def _cpu_ratio(saturation: PhaseResult, *directs: dict) -> float | None:
    server = saturation.cpu.get("server_cpu_ms_per_image")
    direct = [d["cpu_ms_per_image"] for d in directs if d.get("cpu_ms_per_image")]
    return round(server / (sum(direct) / len(direct)), 3) if server and direct else None


def write(out: Path, result: dict, phases: list[PhaseResult]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    columns = [
        "phase",
        "throughput_ips",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "sent",
        "answered",
        "shed_429",
        "timed_out_504",
        "other_errors",
        "offered_rps",
        "mean_batch_size",
    ]
    cpu_columns = [
        "server_cpu_ms_per_image",
        "server_cores",
        "load_generator_cores",
        "machine_busy_share",
        "load_generator_cpu_ms_per_request",
    ]
    with out.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*columns, *cpu_columns, "direct_ips"])
        for phase in phases:
            row = asdict(phase)
            writer.writerow(
                [
                    *(row[c] for c in columns),
                    *(phase.cpu.get(c) for c in cpu_columns),
                    result["direct"]["mean_throughput_ips"],
                ]
            )
    print(f"wrote {out} and {out.with_suffix('.csv')}")


if __name__ == "__main__":
    sys.exit(main())
