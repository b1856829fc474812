"""POST /v1/embeddings: OpenAI's and Infinity's shape for images, each pooling against timm itself at
r=0, dense patch features from a merged model, bad items both ways, limits, URL inputs, shared
batching with /classify, and OpenAI's own Python client against the real server."""

from __future__ import annotations

import asyncio
import base64
import http.server
import threading
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import timm
import torch
from fastapi.testclient import TestClient
from serverutil import TINY_MODEL_KWARGS, is_ready, lane_of, metric_value, png, wait_until
from tiny import NAME

import tome
from tome_serve.app import create_app
from tome_serve.config import Settings
from tome_serve.images import decode_image

DEPTH, WIDTH, PATCHES = 4, 64, 64  # TINY_MODEL_KWARGS: 64x64 input, 8x8 patches, one class token


def data_uri(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


IMAGES = [png((200, 30, 30)), png((30, 200, 30)), png((30, 30, 200)), png("white")]
URIS = [data_uri(image) for image in IMAGES]


def app_client(**settings: object) -> Iterator[TestClient]:
    options = dict(
        model=NAME,
        weights="random",
        model_kwargs=TINY_MODEL_KWARGS,
        device="cpu",
        dtype="float32",
        auto_warmup_s=0,
    )
    with TestClient(create_app(Settings(**{**options, **settings}))) as client:
        wait_until(lambda: is_ready(client), 60, "the embeddings test app ready")
        yield client


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    yield from app_client(max_delay_ms=50, embed_url_hosts="127.0.0.1", embed_max_items=8)


def embed(client: TestClient, **body: object) -> httpx.Response:
    return client.post("/v1/embeddings", json={"input": URIS, "r": 0, **body})


def vectors(response: httpx.Response) -> list[np.ndarray]:
    assert response.status_code == 200, response.text
    return [np.asarray(item["embedding"], dtype=np.float32) for item in response.json()["data"]]


def direct(client: TestClient, images: list[bytes]) -> tuple[torch.nn.Module, torch.Tensor]:
    """An unpatched timm model with the served weights, and the images as the server feeds them."""
    model = lane_of(client, NAME).model
    plain = timm.create_model(
        NAME, pretrained=False, **model.module.pretrained_cfg.get("kwargs", {}), **TINY_MODEL_KWARGS
    ).eval()
    plain.load_state_dict(model.module.state_dict())
    pixels = torch.stack([model.preprocessor(decode_image(image, 10**7)) for image in images])
    return plain, model.preprocessor.normalize(pixels, torch.float32)


def test_openai_shape_order_usage_and_the_r_of_each_image(client: TestClient) -> None:
    response = embed(client, r=4)
    body = response.json()
    assert (body["object"], body["model"], body["pooling"], body["normalize"]) == (
        "list",
        NAME,
        "model",
        True,
    )
    assert [item["index"] for item in body["data"]] == [0, 1, 2, 3]
    for item in body["data"]:
        assert item["object"] == "embedding" and item["shape"] == [WIDTH] and len(item["embedding"]) == WIDTH
        assert (item["r"], item["r_auto"]) == (4, False)
        assert item["tokens"] == {"input": 65, "output": tome.token_counts(65, DEPTH, 4)[-1]}
    assert body["usage"] == {"prompt_tokens": 4 * 65, "total_tokens": 4 * 65}
    same = vectors(embed(client, input=[URIS[2], URIS[0]], r=4))
    first = vectors(response)
    np.testing.assert_allclose(same[0], first[2], atol=1e-5)  # the answer keeps the input order
    np.testing.assert_allclose(same[1], first[0], atol=1e-5)
    auto = embed(client, input=URIS[0], r=None).json()["data"][0]  # one string; r=auto by default
    assert auto["r_auto"] is True


def test_each_pooling_equals_timm_at_r0(client: TestClient) -> None:
    plain, x = direct(client, IMAGES)
    with torch.inference_mode():
        features = plain.forward_features(x)
        expected = {
            "model": plain.forward_head(features, pre_logits=True),
            "cls": features[:, 0],
            "mean": features[:, 1:].mean(dim=1),
            "patch": features[:, 1:],
        }
    for pooling, want in expected.items():
        got = torch.from_numpy(np.stack(vectors(embed(client, pooling=pooling, normalize=False))))
        assert got.shape == want.shape, pooling
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=pooling)


def test_patch_features_of_a_merged_model_spread_each_token_over_its_patches(client: TestClient) -> None:
    r = 12
    body = embed(client, pooling="patch", normalize=False, r=r).json()
    module, (_, x) = lane_of(client, NAME).model.module, direct(client, IMAGES)
    with torch.inference_mode(), tome.merging(r=r, trace_source=True) as info:
        features = module.forward_features(x)
    for i, item in enumerate(body["data"]):
        grid = np.asarray(item["embedding"], dtype=np.float32)
        assert grid.shape == (PATCHES, WIDTH)
        source = info.source[i, 1:]  # the final token each input patch ended up in
        np.testing.assert_allclose(grid, features[i, source].numpy(), atol=1e-4)
        assert len(np.unique(grid.round(5), axis=0)) == item["tokens"]["output"] - 1  # every token but cls


def test_normalize_and_dimensions(client: TestClient) -> None:
    raw = vectors(embed(client, normalize=False))
    unit = vectors(embed(client))
    short = vectors(embed(client, dimensions=16))
    for plain, normed, cut in zip(raw, unit, short, strict=True):
        assert abs(np.linalg.norm(plain) - 1) > 1e-3
        np.testing.assert_allclose(normed, plain / np.linalg.norm(plain), atol=1e-5)
        assert cut.shape == (16,) and abs(np.linalg.norm(cut) - 1) < 1e-5
        np.testing.assert_allclose(cut, plain[:16] / np.linalg.norm(plain[:16]), atol=1e-5)
    assert embed(client, dimensions=WIDTH + 1).status_code == 422
    assert "dimensions must be an integer from 1 to 64" in embed(client, dimensions=0).json()["detail"]


def test_base64_is_little_endian_float32(client: TestClient) -> None:
    floats = vectors(embed(client, pooling="patch"))
    encoded = embed(client, pooling="patch", encoding_format="base64").json()["data"]
    for item, expected in zip(encoded, floats, strict=True):
        decoded = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4").reshape(item["shape"])
        np.testing.assert_array_equal(decoded, expected)


def test_a_bad_item_fails_the_request_by_default_and_is_listed_with_skip(client: TestClient) -> None:
    mixed = [URIS[0], "not base64 at all!", URIS[1], base64.b64encode(b"not an image").decode()]
    failed = client.post("/v1/embeddings", json={"input": mixed, "r": 0})
    assert failed.status_code == 422 and failed.json()["detail"].startswith("input[1]: not an image")
    skipped = client.post("/v1/embeddings", json={"input": mixed, "r": 0, "on_error": "skip"})
    assert skipped.status_code == 200, skipped.text
    body = skipped.json()
    assert [item["index"] for item in body["data"]] == [0, 2]
    assert [(e["index"], e["status"]) for e in body["errors"]] == [(1, 422), (3, 415)]
    np.testing.assert_allclose(vectors(skipped)[1], vectors(embed(client))[1], atol=1e-5)
    every = client.post("/v1/embeddings", json={"input": mixed[1:2], "on_error": "skip"})
    assert every.status_code == 422  # nothing to answer with
    assert client.get("/readyz").status_code == 200  # and the server serves on


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"input": URIS * 3}, 422, "input must hold 1 to 8 images (TOME_EMBED_MAX_ITEMS), got 12"),
        ({"input": []}, 422, "input must hold 1 to 8 images"),
        ({"input": URIS[0], "modality": "text"}, 422, "modality"),
        ({"input": URIS[0], "pooling": "max"}, 422, "pooling"),
        ({"input": URIS[0], "r": 99}, 422, "r must be 'auto' or an integer from 0 to 32"),
        ({"input": URIS[0], "r": 4, "target_ms": 50}, 422, "apply to r=auto only"),
        ({"input": URIS[0], "model": "vit_nope"}, 404, "no model named 'vit_nope'"),
        ({"input": "data:image/png,abc"}, 422, "must be base64-encoded"),
        ({"input": "http://192.0.2.1/cat.png"}, 422, "only hosts listed in TOME_EMBED_URL_HOSTS"),
    ],
)
def test_bad_requests_say_what_is_wrong(client: TestClient, body: dict, status: int, words: str) -> None:
    response = client.post("/v1/embeddings", json=body)
    assert response.status_code == status, response.text
    assert words in str(response.json()["detail"])


def test_size_limits() -> None:
    for client in app_client(max_upload_bytes=2_000, embed_max_request_bytes=20_000):
        big = data_uri(np.random.default_rng(0).bytes(3_000))
        response = client.post("/v1/embeddings", json={"input": [URIS[0], big]})
        assert response.status_code == 413 and response.json()["detail"].startswith("input[1]: the upload is")
        response = client.post("/v1/embeddings", json={"input": [big] * 8})  # 32 kB
        assert response.status_code == 413 and "TOME_EMBED_MAX_REQUEST_BYTES" in response.json()["detail"]


@pytest.fixture
def image_host() -> Iterator[str]:
    """A loopback HTTP server with /cat.png (an image), /big.png (too large) and /gone (404)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = {"/cat.png": IMAGES[0], "/big.png": b"\x89PNG" + bytes(11 * 1024 * 1024)}.get(self.path)
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_urls_of_allowed_hosts_are_fetched_within_limits(client: TestClient, image_host: str) -> None:
    inputs = [f"{image_host}/cat.png", f"{image_host}/gone", f"{image_host}/big.png", URIS[0]]
    body = client.post("/v1/embeddings", json={"input": inputs, "r": 0, "on_error": "skip"}).json()
    assert [item["index"] for item in body["data"]] == [0, 3]
    assert [(e["index"], e["status"]) for e in body["errors"]] == [(1, 422), (2, 413)]
    assert "answered HTTP 404" in body["errors"][0]["message"]
    np.testing.assert_allclose(body["data"][0]["embedding"], body["data"][1]["embedding"], atol=1e-5)


def test_multipart_files_with_form_fields(client: TestClient) -> None:
    files = [("file", (f"{i}.png", image, "image/png")) for i, image in enumerate(IMAGES[:2])]
    response = client.post("/v1/embeddings", files=files, data={"r": "0", "pooling": "mean"})
    np.testing.assert_allclose(
        vectors(response), vectors(embed(client, input=URIS[:2], pooling="mean")), atol=1e-5
    )


def test_embeddings_share_batches_with_classify(client: TestClient) -> None:
    async def together() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            classify = [http.post("/classify", params={"r": 8}, content=image) for image in IMAGES]
            embeddings = http.post("/v1/embeddings", json={"input": URIS, "r": 8})
            return await asyncio.gather(*classify, embeddings)

    *classified, embedded = client.portal.call(together)
    assert embedded.status_code == 200, embedded.text
    assert [answer.json()["batch_size"] for answer in classified] == [8] * 4  # 4 + 4 images, one batch


def test_openai_client_against_the_real_server(tiny_server: str) -> None:
    openai = pytest.importorskip("openai", reason="OpenAI's client is in the [dev] extra")
    client = openai.OpenAI(base_url=f"{tiny_server}/v1", api_key="unused", max_retries=0)
    answer = client.embeddings.create(model=NAME, input=URIS[:3])  # asks for base64 by default
    assert [item.index for item in answer.data] == [0, 1, 2]
    assert all(len(item.embedding) == WIDTH for item in answer.data)
    assert abs(np.linalg.norm(answer.data[0].embedding) - 1) < 1e-5
    assert answer.usage.prompt_tokens == 3 * 65
    floats = client.embeddings.create(model=NAME, input=URIS[0], encoding_format="float", extra_body={"r": 8})
    assert len(floats.data[0].embedding) == WIDTH


def test_the_merge_rule_is_a_request_parameter_on_every_endpoint(client: TestClient) -> None:
    rules = {rule: vectors(embed(client, r=12, merge=rule, normalize=False)) for rule in ("tome", "mlerp")}
    assert embed(client, merge="mlerp").json()["data"][0]["merge"] == "mlerp"
    assert embed(client).json()["data"][0]["merge"] == "tome"  # TOME_DEFAULT_MERGE
    for tome_vector, mlerp_vector in zip(rules["tome"], rules["mlerp"], strict=True):
        assert not np.allclose(tome_vector, mlerp_vector, atol=1e-4)  # a different computation at r > 0
    at_zero = [vectors(embed(client, r=0, merge=rule)) for rule in ("tome", "mlerp")]
    np.testing.assert_allclose(at_zero[0], at_zero[1], atol=1e-6)  # and none at r=0
    classified = client.post("/classify", params={"r": 8, "merge": "mlerp"}, content=IMAGES[0])
    assert classified.json()["merge"] == "mlerp"
    drawn = client.post("/visualize", params={"r": 8, "merge": "mlerp"}, content=IMAGES[0])
    assert drawn.headers["x-tome-merge"] == "mlerp"
    refused = client.post("/classify", params={"merge": "average"}, content=IMAGES[0])
    assert refused.status_code == 422 and refused.json()["detail"] == (
        "merge must be one of tome, mlerp, got 'average'"
    )
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "tome_merge_rule_images_total", model=NAME, merge="mlerp") >= 3
