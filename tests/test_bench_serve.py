"""The server benchmark's /v1/embeddings mode (``--endpoint embeddings``): OpenAI's JSON request reaches
the real server's embeddings endpoint in the encoding asked for, and the run reports throughput against
the direct model, every answer's r, and its verdict; ``tome_bench.embed_pairs`` measures every variant in
every round (timings are not asserted)."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from serverutil import TINY_MODEL_KWARGS, metric_value
from tiny import NAME

from tome_bench import serve
from tome_bench.serve import EmbeddingsPost, answer_r, closed_loop, main


def test_the_request_is_openais_with_the_image_as_a_data_uri() -> None:
    _, jpeg = serve.test_image(None, 64)
    body = json.loads(EmbeddingsPost("float").body(jpeg, 8))
    assert (body["encoding_format"], body["r"]) == ("float", 8)
    (uri,) = body["input"]
    assert uri.startswith("data:image/jpeg;base64,") and base64.b64decode(uri.split(",", 1)[1]) == jpeg
    answer = b'{"object": "list", "data": [{"index": 0, "r": 12, "r_auto": true}], "model": "m"}'
    assert answer_r(b"HTTP/1.1 200 OK\r\n\r\n", answer) == 12


def test_each_encoding_is_what_the_server_answers(tiny_server: str) -> None:
    _, jpeg = serve.test_image(None, 64)
    for encoding in ("float", "base64"):
        post = EmbeddingsPost(encoding)
        answer = httpx.post(
            f"{tiny_server}/v1/embeddings",
            content=post.body(jpeg, 4),
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        (item,) = answer.json()["data"]
        vector = item["embedding"]
        if encoding == "base64":
            vector = np.frombuffer(base64.b64decode(vector), dtype="<f4")
        assert len(vector) == TINY_MODEL_KWARGS["embed_dim"] and item["r"] == 4
    outcomes = asyncio.run(closed_loop(tiny_server, jpeg, 4, 2, 0.0, 0.5, {}, embeddings=EmbeddingsPost()))
    assert outcomes and {(o.status, o.r) for o in outcomes} == {(200, 4)}


def test_a_short_run_against_a_real_server_counts_embeddings_requests(
    tiny_server: str, tmp_path: Path
) -> None:
    before = httpx.get(f"{tiny_server}/metrics").text
    out = tmp_path / "embeddings.json"
    argv = ["--url", tiny_server, "--model", NAME, "--model-kwargs", json.dumps(TINY_MODEL_KWARGS)]
    argv += ["--dtype", "float32", "--endpoint", "embeddings", "--r", "4", "--batch-size", "4"]
    argv += ["--concurrency", "4", "--duration", "1", "--warmup", "0.3", "--direct-seconds", "0.3"]
    assert main([*argv, "--out", str(out)]) == 0
    after = httpx.get(f"{tiny_server}/metrics").text

    result = json.loads(out.read_text())
    saturation, overload = result["phases"]
    assert saturation["answered"] > 0 and saturation["other_errors"] == 0 and overload["sent"] > 0
    assert result["direct"]["before"]["throughput_ips"] > 0
    assert result["verdict"]["saturation_over_direct"] > 0
    assert (result["config"]["endpoint"], result["config"]["encoding"]) == ("embeddings", "base64")

    def served(endpoint: str) -> float:
        count = "tome_requests_total"
        labels = {"endpoint": endpoint, "code": "200", "r": "4"}
        return metric_value(after, count, **labels) - metric_value(before, count, **labels)

    assert served("embeddings") >= saturation["answered"] and served("classify") == 0
    assert out.with_suffix(".csv").read_text().startswith("phase,throughput_ips")


def test_interleaved_pairs_measure_each_variant_every_round(tiny_server: str, tmp_path: Path) -> None:
    from tome_bench.embed_pairs import RATIOS, SERVED
    from tome_bench.embed_pairs import main as pairs

    before = httpx.get(f"{tiny_server}/metrics").text
    out = tmp_path / "pairs.json"
    argv = ["--url", tiny_server, "--model", NAME, "--model-kwargs", json.dumps(TINY_MODEL_KWARGS)]
    argv += ["--dtype", "float32", "--r", "4", "--batch-size", "4", "--rounds", "2", "--seconds", "0.5"]
    assert pairs([*argv, "--warmup", "0.2", "--direct-seconds", "0.2", "--out", str(out)]) == 0
    after = httpx.get(f"{tiny_server}/metrics").text

    result = json.loads(out.read_text())
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    for measured in (r["measured"] for r in result["rounds"]):
        assert set(measured) == {"direct", *SERVED}
        assert all(variant["images_per_s"] > 0 for variant in measured.values())
    first = result["rounds"][0]
    expected = (
        first["measured"]["embeddings base64"]["images_per_s"] / first["measured"]["direct"]["images_per_s"]
    )
    assert first["ratios"]["embeddings_over_direct"] == pytest.approx(expected, abs=1e-3)
    assert set(first["ratios"]) == set(RATIOS) and result["verdict"]["failed_requests"] == 0
    served = {
        endpoint: metric_value(after, "tome_requests_total", endpoint=endpoint, r="4", code="200")
        - metric_value(before, "tome_requests_total", endpoint=endpoint, r="4", code="200")
        for endpoint in ("classify", "embeddings")
    }
    assert served["classify"] > 0 and served["embeddings"] > served["classify"] / 4, served
