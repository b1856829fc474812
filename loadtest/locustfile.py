"""Locust load test for tome-serve.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000       # interactive, web UI on :8089
    loadtest/run.sh http://127.0.0.1:8000 60s out/loadtest/run1          # headless, CSV + HTML reports

Each user uploads images of several sizes with r drawn from a mix. Four users in five are TomeUser:
to /classify (multipart form, as browsers and `curl -F` send them), and one request in ten to
/visualize (raw image body). One in five is EmbeddingsUser: OpenAI's JSON request to /v1/embeddings
with a few images as data URIs, answered in base64. Name classes after the file to run only those
(`locust -f loadtest/locustfile.py EmbeddingsUser`).

Outcomes: a 2xx with a well-formed answer is answered; 429 (a full queue, the server shedding load) is
reported under its own request name "<name> [429]" and is NOT a failure; any other status, a
connection error, or a 2xx without predictions (without a PNG, without one well-formed embedding
per image in order) is a failure.

Environment:
  LOADTEST_IMAGES      folder of .jpg/.png/.webp files to upload (default: synthetic images, 5 sizes)
  LOADTEST_R_VALUES    comma-separated r values to mix (default "0,8,16,auto"); integers outside the
                       model's r range (from GET /models) are dropped; "auto" lets the server choose
                       (the answers' r is reported per request name "<endpoint> r=auto")
  LOADTEST_MODEL       model query parameter (default: the server's default model)
  LOADTEST_EMBED_ITEMS images per /v1/embeddings request (default 4; at most the server's
                       TOME_EMBED_MAX_ITEMS)
  LOADTEST_SHAPE=step  add users in steps up to --users (see step_shape.py)
  LOADTEST_REPORT_DIR  write levels.md / levels.json (per user count: req/s, p50/p95/p99, 429 share)
  TOME_API_KEY         sent as "Authorization: Bearer ..." when set
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
from pathlib import Path
from typing import Any

from level_report import ANSWERED, FAILED, SHED, LevelRecorder, markdown_table, write_report
from locust import events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.env import Environment
from locust.runners import STATE_RUNNING, STATE_SPAWNING, Runner
from sample_images import SampleImage, load_sample_images
from urllib3 import encode_multipart_formdata

SAMPLE_IMAGES: tuple[SampleImage, ...] = tuple(load_sample_images(os.environ.get("LOADTEST_IMAGES")))
R_VALUES: tuple[int | str, ...] = tuple(
    "auto" if v.strip().lower() == "auto" else int(v)
    for v in os.environ.get("LOADTEST_R_VALUES", "0,8,16,auto").split(",")
    if v.strip()
)
MODEL: str | None = os.environ.get("LOADTEST_MODEL") or None
EMBED_ITEMS: int = int(os.environ.get("LOADTEST_EMBED_ITEMS", "4"))
API_KEY: str | None = os.environ.get("TOME_API_KEY") or None

SHED_SUFFIX = " [429]"
MEASURED = "tome_measured"
"""Context key that marks the requests the level report counts (not the set-up GET /models)."""

if os.environ.get("LOADTEST_SHAPE", "").lower() == "step":
    # Locust runs any LoadTestShape it finds in this module's namespace.
    from step_shape import StepLoadShape  # noqa: F401


class ApiUser(FastHttpUser):
    """One client that sends requests back to back, with a short random pause in between."""

    abstract = True
    network_timeout = 60.0
    connection_timeout = 10.0

    def wait_time(self) -> float:
        return random.uniform(0.0, 0.1)

    def on_start(self) -> None:
        self.headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
        self.r_values = self._usable_r_values()

    def _usable_r_values(self) -> list[int | str]:
        """The configured r mix, limited to the range the model accepts (GET /models)."""
        with self.client.get(
            "/models", headers=self.headers, name="setup: GET /models", catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"GET /models answered {resp.status_code}")
                return list(R_VALUES)
            entry = _model_entry(resp.json(), MODEL)
            if entry is None:
                resp.failure(f"GET /models lists no model {MODEL!r}")
                return list(R_VALUES)
        usable = [r for r in R_VALUES if r == "auto" or entry["r_min"] <= r <= entry["r_max"]]
        return usable or [entry["default_r"]]

    def _post(self, path: str, name: str, body: bytes, content_type: str, problem_of: Any) -> None:
        headers = {**self.headers, "Content-Type": content_type}
        with self.client.post(
            path,
            data=body,
            headers=headers,
            name=name,
            catch_response=True,
            context={MEASURED: True},
        ) as resp:
            if resp.status_code == 429:
                resp.request_meta["name"] = name + SHED_SUFFIX
                resp.success()
            elif 200 <= resp.status_code < 300:
                problem = problem_of(resp)
                if problem:
                    resp.failure(problem)
                else:
                    resp.success()
            else:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")


class TomeUser(ApiUser):
    """Classifies images, and now and then asks for a merge map."""

    weight = 4

    @task(9)
    def classify(self) -> None:
        image = random.choice(SAMPLE_IMAGES)
        body, content_type = encode_multipart_formdata({"file": image.multipart})
        self._send("/classify", body, content_type, _classify_problem)

    @task(1)
    def visualize(self) -> None:
        image = random.choice(SAMPLE_IMAGES)
        self._send("/visualize", image.data, image.content_type, _visualize_problem)

    def _send(self, endpoint: str, body: bytes, content_type: str, problem_of: Any) -> None:
        r = random.choice(self.r_values)
        params = f"?r={r}" + (f"&model={MODEL}" if MODEL else "")
        self._post(endpoint + params, f"{endpoint} r={r}", body, content_type, problem_of)


class EmbeddingsUser(ApiUser):
    """Embeds a few images per request: OpenAI's JSON request, the images as data URIs, answered in
    base64 as OpenAI's clients ask."""

    weight = 1

    @task
    def embed(self) -> None:
        images = random.choices(SAMPLE_IMAGES, k=EMBED_ITEMS)
        r = random.choice(self.r_values)
        request = {"input": [image.data_uri for image in images], "encoding_format": "base64", "r": r}
        if MODEL:
            request["model"] = MODEL
        body = json.dumps(request).encode()
        self._post("/v1/embeddings", f"/v1/embeddings r={r}", body, "application/json", _embeddings_problem)


def _model_entry(payload: dict[str, Any], name: str | None) -> dict[str, Any] | None:
    """The entry of model ``name``, or of the server's default model, in a GET /models answer."""
    for model in payload["models"]:
        if model["name"] == name or (name is None and model["default"]):
            return model
    return None


def _classify_problem(resp: Any) -> str | None:
    try:
        predictions = resp.json().get("predictions")
    except ValueError:
        return "classify answered 2xx without JSON"
    return None if predictions else "classify answered 2xx without predictions"


def _embeddings_problem(resp: Any) -> str | None:
    """One base64 float32 embedding of its shape per image, in the request's order."""
    try:
        data = resp.json()["data"]
        sizes = [len(base64.b64decode(item["embedding"])) for item in data]
        expected = [4 * math.prod(item["shape"]) for item in data]
        order = [item["index"] for item in data]
    except (ValueError, KeyError, TypeError):
        return "embeddings answered 2xx without OpenAI's embeddings list"
    if order != list(range(EMBED_ITEMS)) or sizes != expected:
        return f"embeddings answered indices {order} of sizes {sizes} for {EMBED_ITEMS} images"
    return None


def _visualize_problem(resp: Any) -> str | None:
    if not (resp.content or b"").startswith(b"\x89PNG"):
        return f"visualize answered 2xx without a PNG ({resp.headers.get('content-type')})"
    return None


def _outcome(name: str, exception: BaseException | None) -> str:
    if exception is not None:
        return FAILED
    return SHED if name.endswith(SHED_SUFFIX) else ANSWERED


@events.init.add_listener
def _attach_level_report(environment: Environment, runner: Runner | None = None, **_: Any) -> None:
    """Per user-count statistics for this run, printed and written to LOADTEST_REPORT_DIR at the end."""
    if runner is None:
        return
    recorder = LevelRecorder(
        user_count=lambda: runner.user_count,
        active=lambda: runner.state in (STATE_SPAWNING, STATE_RUNNING),
    )

    def on_request(
        name: str,
        response_time: float,
        exception: BaseException | None = None,
        context: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        if context and context.get(MEASURED):
            recorder.record(_outcome(name, exception), response_time)

    def on_test_stop(**_: Any) -> None:
        rows = recorder.rows()
        print("\nPer user count (answered requests only in the latency columns):\n" + markdown_table(rows))
        folder = os.environ.get("LOADTEST_REPORT_DIR")
        if folder:
            write_report(rows, Path(folder))

    environment.events.request.add_listener(on_request)
    environment.events.test_stop.add_listener(on_test_stop)
