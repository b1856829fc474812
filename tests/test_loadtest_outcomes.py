"""The Locust load test's bookkeeping, against a stub server whose answers are known in advance:
429 is counted apart and is not a failure, other errors are failures, the r mix respects the model's
r range, the API key is sent, embeddings requests are OpenAI's with data-URI images and their answers
are checked, and the step shape walks through its user counts and stops by itself.

Locust monkey-patches the standard library with gevent when imported, so it only ever runs in a
subprocess here; the modules without Locust (images, level report) are imported directly."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
LOADTEST = REPO / "loadtest"
sys.path.insert(0, str(LOADTEST))

from level_report import ANSWERED, FAILED, SHED, LevelRecorder, percentile  # noqa: E402
from sample_images import folder_images, load_sample_images, synthetic_images  # noqa: E402

API_KEY = "stub-key"
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


class StubHandler(BaseHTTPRequestHandler):
    """r=0 answers, r=8 sheds (429), r=16 errors (500); anything else is a 400 the test would see."""

    seen: Counter  # set per server, see stub_server()

    def log_message(self, *args: object) -> None:
        pass

    def reply(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        models = {"models": [{"name": "stub", "default": True, "r_min": 0, "r_max": 16, "default_r": 8}]}
        self.reply(200, json.dumps(models).encode())

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        url = urlsplit(self.path)
        request = json.loads(body) if url.path == "/v1/embeddings" else {}
        r = int(request["r"] if request else parse_qs(url.query)["r"][0])
        content_type = self.headers.get("Content-Type", "")
        self.seen[(url.path, r, content_type.split(";")[0])] += 1
        if self.headers.get("Authorization") != f"Bearer {API_KEY}":
            return self.reply(401, b'{"detail": "missing key"}')
        if r == 8:
            return self.reply(429, b'{"detail": "queue full"}')
        if r != 0:
            return self.reply(500, b'{"detail": "boom"}')
        if url.path == "/visualize":
            return self.reply(200, PNG, "image/png")
        if request:
            return self.reply(200, json.dumps(embeddings_answer(request)).encode())
        self.reply(200, json.dumps({"predictions": [{"index": 1, "label": "x", "score": 0.9}]}).encode())


def embeddings_answer(request: dict) -> dict:
    """OpenAI's answer to an embeddings request of data-URI images, or a malformed one (a list one
    item short) when the request is not what the locustfile should send."""
    images = request["input"]
    decoded = [base64.b64decode(uri.split(",", 1)[1]) for uri in images if uri.startswith("data:image/")]
    valid = (
        request["encoding_format"] == "base64" and decoded and all(Image.open(io.BytesIO(d)) for d in decoded)
    )
    vector = base64.b64encode(bytes(4 * 3)).decode()
    count = len(images) if valid and len(decoded) == len(images) else len(images) - 1
    return {"object": "list", "data": [{"index": i, "embedding": vector, "shape": [3]} for i in range(count)]}


@pytest.fixture
def stub_server() -> Iterator[tuple[str, Counter]]:
    seen: Counter = Counter()
    handler = type("Handler", (StubHandler,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def read_stats(path: Path) -> dict[str, dict[str, str]]:
    return {row["Name"]: row for row in csv.DictReader(io.StringIO(path.read_text()))}


@pytest.mark.timeout(120)
def test_step_run_counts_429_apart_from_failures(stub_server, tmp_path):
    url, seen = stub_server
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "USERS": "4",
        "LOADTEST_SHAPE": "step",
        "LOADTEST_STEP_USERS": "2",
        "LOADTEST_STEP_SECONDS": "4",
        "LOADTEST_R_VALUES": "0,8,16,32",  # 32 is beyond the stub model's r_max
        "LOADTEST_EMBED_ITEMS": "3",
        "TOME_API_KEY": API_KEY,
    }
    # A long run time: the step shape must end the test itself after its two steps (about 8 s).
    result = subprocess.run(
        [str(LOADTEST / "run.sh"), url, "60s", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    log = result.stdout + result.stderr + (tmp_path / "locust.log").read_text()
    assert result.returncode != 0, "the r=16 errors are failures, so Locust must exit non-zero"

    stats = read_stats(tmp_path / "locust_stats.csv")
    for endpoint in ("/classify", "/visualize", "/v1/embeddings"):
        answered, shed, errored = (
            stats[f"{endpoint} r=0"],
            stats[f"{endpoint} r=8 [429]"],
            stats[f"{endpoint} r=16"],
        )
        assert int(answered["Request Count"]) > 0 and answered["Failure Count"] == "0", log
        assert int(shed["Request Count"]) > 0 and shed["Failure Count"] == "0", "429 must not be a failure"
        assert errored["Failure Count"] == errored["Request Count"] != "0", "500 must be a failure"
        assert f"{endpoint} r=8" not in stats, "429s must not be mixed into the answered rows"
    assert not [name for name in stats if "r=32" in name], "r beyond r_max must not be sent"
    assert {key[2] for key in seen if key[0] == "/classify"} == {"multipart/form-data"}
    assert {key[2] for key in seen if key[0] == "/visualize"} <= {"image/png", "image/jpeg"}
    assert {key[2] for key in seen if key[0] == "/v1/embeddings"} == {"application/json"}

    levels = json.loads((tmp_path / "levels.json").read_text())
    assert [level["users"] for level in levels] == [2, 4], "one row per step"
    for level in levels:
        assert 0.1 < level["shed_share"] < 0.6 and level["failures"] > 0
        assert level["answered_per_s"] > 0 and level["p50_ms"] <= level["p95_ms"] <= level["p99_ms"]
    assert "| users |" in (tmp_path / "levels.md").read_text()
    assert (tmp_path / "report.html").stat().st_size > 0


def test_level_recorder_splits_by_user_count_and_outcome():
    # (time s, users, active, outcome, response ms): 2 users from t=0 to t=5, 4 users from t=5 to t=15,
    # then the test stops and a straggler finishes while the users are being killed.
    events = [
        (0.0, 2, True, ANSWERED, 10),
        (1.0, 2, True, SHED, 1),
        (4.0, 2, True, ANSWERED, 30),
        (5.0, 4, True, ANSWERED, 50),
        (6.0, 4, True, FAILED, 5),
        (10.0, 4, True, ANSWERED, 70),
        (15.0, 4, True, ANSWERED, 90),
        (15.5, 2, False, ANSWERED, 999),
    ]
    state = {}
    recorder = LevelRecorder(
        user_count=lambda: state["users"], active=lambda: state["active"], clock=lambda: state["now"]
    )
    for now, users, active, outcome, ms in events:
        state.update(now=now, users=users, active=active)
        recorder.record(outcome, ms)
    two, four = recorder.rows()
    assert (two.users, two.seconds, two.requests, two.failures) == (2, 5.0, 3, 0)
    assert two.answered_per_s == pytest.approx(2 / 5.0) and two.shed_share == pytest.approx(1 / 3)
    assert (two.p50_ms, two.p99_ms) == (10, 30), "the straggler after the stop is not counted"
    assert (four.users, four.seconds, four.requests, four.failures) == (4, 10.0, 4, 1)
    assert four.answered_per_s == pytest.approx(3 / 10.0) and four.shed_share == 0
    assert (four.p50_ms, four.p95_ms) == (70, 90)


def test_level_recorder_leaves_out_short_levels():
    state = {"users": 1, "now": 0.0}
    recorder = LevelRecorder(user_count=lambda: state["users"], clock=lambda: state["now"])
    for now, users in [(0.0, 1), (0.5, 2), (1.0, 3), (9.0, 3)]:
        state.update(now=now, users=users)
        recorder.record(ANSWERED, 10)
    assert [row.users for row in recorder.rows()] == [3], "ramp-up counts held under 3 s are dropped"


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99)) == (50, 95, 99)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_synthetic_images_have_several_sizes_and_decode():
    images = synthetic_images()
    sizes = {Image.open(io.BytesIO(image.data)).size for image in images}
    assert len(sizes) == len(images) >= 4
    assert {image.content_type for image in images} == {"image/png", "image/jpeg"}
    assert max(len(image.data) for image in images) > 20_000, "large photos should be large uploads"


def test_images_from_a_folder(tmp_path):
    Image.new("RGB", (32, 24), "red").save(tmp_path / "b.png")
    Image.new("RGB", (24, 32), "blue").save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_sample_images(str(tmp_path))
    assert [(image.name, image.content_type) for image in images] == [
        ("a.jpg", "image/jpeg"),
        ("b.png", "image/png"),
    ]
    with pytest.raises(FileNotFoundError, match="not a directory"):
        folder_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .jpg"):
        folder_images(tmp_path / "empty")
