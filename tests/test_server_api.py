"""The real server (uvicorn subprocess, tiny random ViT): every endpoint, bad input, batching."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from serverutil import TINY_MODEL_ENV, TINY_MODEL_KWARGS, encode, metric_value, run_server
from timm.data import create_transform

import tome
from tome_serve.config import Settings
from tome_serve.loading import load_model

MODEL = TINY_MODEL_ENV["TOME_MODEL"]
TOKENS, DEPTH = 65, 4  # 8x8 patches + class token, 4 blocks
UPLOAD_LIMIT = 300_000
PIXEL_LIMIT = 1_000_000
ENV = {
    "TOME_MAX_DELAY_MS": "50",  # long enough for concurrent requests to share batches
    "TOME_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
    "TOME_MAX_PIXELS": str(PIXEL_LIMIT),
    # Two inference threads share the model, so mixed-r batches also run side by side.
    "TOME_INSTANCES": "2",
}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with run_server(ENV) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30.0) as http:
        yield http


def photo(seed: int, size: tuple[int, int] = (96, 80), mode: str = "RGB") -> Image.Image:
    """A smooth random image (noise upsampled), so different seeds give clearly different inputs."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return small.resize(size, Image.Resampling.BICUBIC).convert(mode)


def classify(client: httpx.Client, data: bytes, **params: object) -> httpx.Response:
    return client.post("/classify", params=params, files={"file": ("image.png", data, "image/png")})


def scores(body: dict) -> dict[int, float]:
    return {p["index"]: p["score"] for p in body["predictions"]}


def expected_probabilities(image: Image.Image, r: int) -> torch.Tensor:
    """The same seeded random model, in this process, on the same image: what the server must say."""
    settings = Settings(
        model=MODEL, weights="random", model_kwargs=TINY_MODEL_KWARGS, device="cpu", dtype="float32"
    )
    loaded = load_model(MODEL, settings)
    timm_transform = create_transform(**loaded.preprocessor.data_config, is_training=False)
    with torch.inference_mode(), tome.merging(r=r):
        return loaded.module(timm_transform(image)[None]).softmax(-1)[0]


# -- operations -------------------------------------------------------------------------------------


def test_probes_and_docs(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/classify", "/visualize", "/models", "/healthz", "/readyz", "/metrics"} <= set(paths)
    assert "multipart/form-data" in paths["/classify"]["post"]["requestBody"]["content"]
    assert "swagger" in client.get("/docs").text.lower()


def test_models_lists_r_range_and_costs(client: httpx.Client) -> None:
    (info,) = client.get("/models").json()["models"]
    assert info["name"] == MODEL and info["default"] is True
    assert (info["weights"], info["device"], info["dtype"]) == ("random", "cpu", "float32")
    assert info["dtype_reason"] == "set explicitly"
    assert info["instances"] == 2 and info["torch_threads"] >= 1  # TOME_INSTANCES=2
    assert info["preprocess_threads"] >= 1 and info["decode_between_batches"] is False
    assert (info["r_min"], info["r_max"], info["default_r"]) == (0, 32, "auto")
    assert info["input_size"] == [3, 64, 64] and info["patch_size"] == [8, 8]
    assert info["input_tokens"] == TOKENS and info["num_classes"] == 1000
    costs = info["costs"]
    assert [c["r"] for c in costs] == list(range(33))
    model = tome.patch(
        load_model(
            MODEL,
            Settings(
                model=MODEL, weights="random", model_kwargs=TINY_MODEL_KWARGS, device="cpu", dtype="float32"
            ),
        ).module
    )
    for cost in costs[::8]:
        assert cost["gmacs"] == pytest.approx(tome.gmacs(model, r=cost["r"]))
        assert cost["output_tokens"] == tome.token_counts(TOKENS, DEPTH, cost["r"])[-1]
    speedups = [c["speedup"] for c in costs]
    assert speedups[0] == 1.0 and speedups == sorted(speedups) and speedups[-1] > 2
    # r=auto: the measured table on the cost grid, beside the analytical GMACs.
    auto = info["auto"]
    assert auto["max_r"] == 32 and 0 < auto["target_ms"] <= 10_000
    assert auto["timings_source"] == "measured"  # no TOME_STATE_DIR: measured at this start
    assert [row["r"] for row in auto["timings"]] == list(range(0, 33, 4))
    for row in auto["timings"]:
        assert row["gmacs"] == pytest.approx(costs[row["r"]]["gmacs"])
        assert sorted(int(b) for b in row["images_per_s"]) == [1, 2, 4, 8]
        assert all(speed > 0 for speed in row["images_per_s"].values())
        assert set(row["dominated_at"]) <= {1, 2, 4, 8}
    assert auto["timings"][0]["dominated_at"] == []  # r=0 is never dominated


# -- classify ---------------------------------------------------------------------------------------


def test_classify_multipart(client: httpx.Client) -> None:
    response = classify(client, encode(photo(1)), r=8, top_k=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["weights"], body["r"]) == (MODEL, "random", 8)
    assert len(body["predictions"]) == 3
    assert [p["score"] for p in body["predictions"]] == sorted(
        (p["score"] for p in body["predictions"]), reverse=True
    )
    assert all(p["label"] and not p["label"].startswith("class ") for p in body["predictions"])
    assert body["tokens"] == {
        "input": TOKENS,
        "output": tome.token_counts(TOKENS, DEPTH, 8)[-1],
        "per_layer": tome.token_counts(TOKENS, DEPTH, 8),
    }
    assert body["batch_size"] == 1
    timing = body["timing_ms"]
    assert 0 <= timing["queue"] <= timing["total"] and 0 < timing["inference"] <= timing["total"]
    assert response.headers["x-request-id"] == body["request_id"]


def test_classify_raw_body_default_r_and_given_request_id(client: httpx.Client) -> None:
    response = client.post(
        "/classify",
        content=encode(photo(2), "JPEG"),
        headers={"content-type": "image/jpeg", "x-request-id": "trace-123"},
    )
    body = response.json()
    assert response.status_code == 200, body
    # The default r is auto: the answer says which r the server chose, and its target.
    assert body["r_auto"] is True and body["target_ms"] > 0 and 0 <= body["r"] <= 32
    assert body["tokens"]["per_layer"] == tome.token_counts(TOKENS, DEPTH, body["r"])
    assert len(body["predictions"]) == 5 and body["request_id"] == "trace-123"


@pytest.mark.parametrize("r", [0, 8])
def test_predictions_match_the_model_run_directly(client: httpx.Client, r: int) -> None:
    image = photo(3)
    body = classify(client, encode(image), r=r, top_k=1000).json()
    served = torch.zeros(1000)
    for index, score in scores(body).items():
        served[index] = score
    assert served.sum().item() == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(served, expected_probabilities(image, r), rtol=1e-4, atol=1e-6)


def test_concurrent_mixed_r_batches_match_single_calls(client: httpx.Client, url: str) -> None:
    requests = [(seed, r) for seed in range(6) for r in (0, 4, 8, 16)]
    images = {seed: encode(photo(100 + seed)) for seed in range(6)}
    single = {}
    for seed, r in requests:  # one at a time: every batch holds exactly this request
        body = classify(client, images[seed], r=r, top_k=1000).json()
        assert body["batch_size"] == 1
        single[seed, r] = body

    async def together() -> list[dict]:
        async with httpx.AsyncClient(base_url=url, timeout=30.0) as http:
            responses = await asyncio.gather(
                *(
                    http.post(
                        "/classify",
                        params={"r": r, "top_k": 1000},
                        files={"file": ("x.png", images[seed], "image/png")},
                    )
                    for seed, r in requests
                )
            )
        assert all(resp.status_code == 200 for resp in responses), [resp.text for resp in responses]
        return [resp.json() for resp in responses]

    batched = asyncio.run(together())
    assert max(body["batch_size"] for body in batched) > 1, "concurrent requests were never batched"
    for (seed, r), body in zip(requests, batched, strict=True):
        assert body["r"] == r
        assert body["tokens"]["per_layer"] == tome.token_counts(TOKENS, DEPTH, r)
        expected, got = scores(single[seed, r]), scores(body)
        assert expected.keys() == got.keys()
        assert max(abs(expected[i] - got[i]) for i in got) < 1e-6


def test_converted_images_are_served(client: httpx.Client) -> None:
    rgb = photo(4, (64, 64))
    cmyk, grey16 = rgb.convert("CMYK"), Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = 3  # upside down
    uploads = {
        "palette": encode(rgb.quantize(16), "GIF"),
        "greyscale": encode(rgb.convert("L")),
        "cmyk": encode(cmyk, "JPEG"),
        "16-bit": encode(grey16),
        "alpha": encode(rgb.convert("RGBA")),
        "exif": encode(rgb, "JPEG", exif=exif),
    }
    for kind, data in uploads.items():
        response = classify(client, data, r=4)
        assert response.status_code == 200, (kind, response.text)
    # EXIF orientation really is applied: the rotated upload classifies like the upright image.
    upright = classify(client, encode(rgb.rotate(180), "JPEG", quality=95), r=0, top_k=1000).json()
    rotated = classify(client, encode(rgb, "JPEG", exif=exif, quality=95), r=0, top_k=1000).json()
    assert upright["predictions"][0]["index"] == rotated["predictions"][0]["index"]


# -- visualize --------------------------------------------------------------------------------------


def test_visualize_returns_the_merge_map(client: httpx.Client) -> None:
    maps = {}
    for r in (0, 16):
        response = client.post("/visualize", params={"r": r}, files={"file": ("a.png", encode(photo(5)))})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        assert response.headers["x-tome-r"] == str(r) and response.headers["x-tome-weights"] == "random"
        assert int(response.headers["x-tome-tokens-output"]) == tome.token_counts(TOKENS, DEPTH, r)[-1]
        image = Image.open(io.BytesIO(response.content))
        assert image.size == (64, 64) and image.mode == "RGB"
        maps[r] = np.asarray(image)
        assert response.headers["x-tome-r-auto"] == "0" and "x-tome-target-ms" not in response.headers
    assert not np.array_equal(maps[0], maps[16])
    auto = client.post("/visualize", params={"r": "auto", "target_ms": 5000}, content=encode(photo(5)))
    assert auto.status_code == 200, auto.text
    assert auto.headers["x-tome-r-auto"] == "1" and auto.headers["x-tome-target-ms"] == "5000"
    assert 0 <= int(auto.headers["x-tome-r"]) <= 32


# -- bad input --------------------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, words: str = "") -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str), detail  # one shape for every error: a sentence, also FastAPI's own 422s
    assert words.lower() in detail.lower(), detail
    assert response.json()["request_id"] == response.headers["x-request-id"]  # FastAPI's own 422s too


def test_bad_uploads_get_clear_4xx(client: httpx.Client) -> None:
    png = encode(photo(6))
    assert_error(client.post("/classify", content=b"", headers={"content-type": "image/png"}), 422, "empty")
    assert_error(client.post("/classify"), 422, "empty")
    assert_error(client.post("/classify", files={"other": ("a.png", png)}), 422, "no field 'file'")
    assert_error(client.post("/classify", files={"file": (None, "text")}), 422, "must be a file")
    assert_error(client.post("/classify", data={"file": "text"}), 415, "not an image")
    assert_error(classify(client, b"<html>not an image</html>"), 415, "not an image")
    assert_error(classify(client, png[: len(png) // 2]), 422, "truncated")
    jpeg = encode(photo(6), "JPEG")
    assert_error(client.post("/visualize", content=jpeg[: len(jpeg) // 3]), 422, "truncated")


def test_oversized_uploads_are_refused(client: httpx.Client) -> None:
    noise = Image.effect_noise((400, 400), 100).convert("RGB")
    big = encode(noise)
    assert len(big) > UPLOAD_LIMIT
    assert_error(client.post("/classify", content=big, headers={"content-type": "image/png"}), 413, "limit")
    assert_error(classify(client, big), 413, "limit")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while reading
        for start in range(0, len(big), 16384):
            yield big[start : start + 16384]

    assert_error(client.post("/classify", content=chunks()), 413, "limit")
    huge = encode(Image.new("RGB", (1001, 1000)))  # small file, too many pixels
    assert len(huge) < UPLOAD_LIMIT
    assert_error(classify(client, huge), 413, "pixels")


@pytest.mark.parametrize(
    ("params", "status", "words"),
    [
        ({"r": -1}, 422, "r must be 'auto' or an integer from 0 to 32 for this model, got '-1'"),
        ({"r": 33}, 422, "r must be 'auto' or an integer from 0 to 32 for this model, got '33'"),
        ({"r": "abc"}, 422, "r must be 'auto' or an integer from 0 to 32 for this model, got 'abc'"),
        ({"r": "2.5"}, 422, "r must be 'auto' or an integer from 0 to 32 for this model, got '2.5'"),
        (
            {"r": "auto", "target_ms": "soon"},
            422,
            "target_ms must be a number above 0 and at most the request",
        ),
        ({"r": "auto", "target_ms": 0}, 422, "target_ms must be a number above 0"),
        ({"r": "auto", "target_ms": 10_001}, 422, "at most the request timeout (10000 ms"),
        ({"r": "auto", "max_r": 33}, 422, "max_r must be an integer from 0 to 32 for this model, got '33'"),
        ({"r": "auto", "max_r": -1}, 422, "max_r must be an integer from 0 to 32"),
        ({"r": "auto", "max_r": "x"}, 422, "max_r must be an integer from 0 to 32 for this model, got 'x'"),
        (
            {"r": 8, "target_ms": 100},
            422,
            "target_ms, max_r and min_fidelity apply to r=auto only; this request asks for r=8",
        ),
        ({"r": 8, "max_r": 4}, 422, "apply to r=auto only"),
        ({"top_k": 0}, 422, "top_k must be an integer from 1 to 1000 for this model, got '0'"),
        ({"top_k": 1001}, 422, "top_k must be an integer from 1 to 1000 for this model, got '1001'"),
        ({"top_k": "many"}, 422, "top_k must be an integer from 1 to 1000 for this model, got 'many'"),
        ({"top_k": "1.5"}, 422, "top_k must be an integer from 1 to 1000 for this model, got '1.5'"),
        ({"model": "vit_nope"}, 404, "vit_nope"),
    ],
)
def test_bad_parameters(client: httpx.Client, params: dict, status: int, words: str) -> None:
    assert_error(classify(client, encode(photo(7)), **params), status, words)


def test_visualize_checks_parameters_too(client: httpx.Client) -> None:
    assert_error(client.post("/visualize", params={"r": 99}, content=encode(photo(8))), 422, "0 to 32")
    bad_target = {"r": "auto", "target_ms": "-5"}
    assert_error(client.post("/visualize", params=bad_target, content=encode(photo(8))), 422, "target_ms")
    assert_error(client.post("/visualize", params={"model": "x"}, content=encode(photo(8))), 404, "x")


# -- metrics ---------------------------------------------------------------------------------------


def exposition(client: httpx.Client) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return response.text


def test_metrics_exposition(client: httpx.Client) -> None:
    before = exposition(client)
    for _ in range(3):
        assert classify(client, encode(photo(10)), r=12).status_code == 200
    assert classify(client, encode(photo(10)), r=999).status_code == 422
    after = exposition(client)
    types = {family.name: family.type for family in text_string_to_metric_families(after)}

    expected_types = {
        "tome_request_duration_seconds": "histogram",
        "tome_queue_wait_seconds": "histogram",
        "tome_inference_seconds": "histogram",
        "tome_batch_size": "histogram",
        "tome_queue_depth": "gauge",
        "tome_requests": "counter",
        "tome_images": "counter",
        "tome_tokens_merged": "counter",
        "tome_model_info": "gauge",
    }
    for name, kind in expected_types.items():
        assert types[name] == kind, name
    labels = {"model": MODEL, "r": "12"}

    def delta(sample: str, **extra: str) -> float:
        wanted = {**labels, **extra}
        return metric_value(after, sample, **wanted) - metric_value(before, sample, **wanted)

    assert delta("tome_requests_total", endpoint="classify", code="200") == 3
    assert delta("tome_request_duration_seconds_count", endpoint="classify") == 3
    assert delta("tome_images_total") == 3
    merged = TOKENS - tome.token_counts(TOKENS, DEPTH, 12)[-1]
    assert delta("tome_tokens_merged_total") == 3 * merged
    assert delta("tome_queue_wait_seconds_count") == 3
    assert delta("tome_batch_size_sum") == 3
    assert delta("tome_inference_seconds_count") >= 1
    assert metric_value(after, "tome_queue_depth", **labels) == 0
    refused = {"model": "none", "r": "none", "endpoint": "classify", "code": "422"}
    assert metric_value(after, "tome_requests_total", **refused) >= 1
    info = {"model": MODEL, "weights": "random", "device": "cpu", "dtype": "float32"}
    assert metric_value(after, "tome_model_info", **info) == 1
