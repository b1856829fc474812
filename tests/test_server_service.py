"""The one service call on its own, without HTTP: (model, r, image bytes, what to return) -> Result."""

from __future__ import annotations

import asyncio
import io
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serverutil import TINY_MODEL_KWARGS

from tome_serve.app import create_app
from tome_serve.config import Settings
from tome_serve.errors import BadRequest, DeadlineExceeded, ImageError, Unavailable, UnknownModel
from tome_serve.item import Result, Want
from tome_serve.service import InferenceService

MODEL = "vit_tiny_patch16_224"


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client() -> TestClient:
    settings = Settings(
        model=MODEL, weights="random", model_kwargs=TINY_MODEL_KWARGS, device="cpu", max_delay_ms=300
    )
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield client


def test_each_result_holds_only_its_own_image(client: TestClient) -> None:
    service: InferenceService = client.app.state.service

    async def together() -> tuple[Result, Result]:
        return await asyncio.gather(
            service.infer(None, 4, png((200, 10, 10)), Want(top_k=3)),
            service.infer(MODEL, 4, png((10, 10, 200)), Want(merge_map=True)),
        )

    classified, drawn = client.portal.call(together)
    assert classified.batch_size == drawn.batch_size == 2  # one batch, two different asks
    assert len(classified.predictions) == 3 and classified.merge_map_png is None
    assert drawn.predictions == [] and drawn.merge_map_png.startswith(b"\x89PNG")
    for result in (classified, drawn):
        assert (result.model, result.r, result.input_tokens) == (MODEL, 4, 65)
        assert result.output_tokens == result.token_counts[-1] == 49
        assert result.queue_s >= 0 and result.inference_s > 0


def test_errors_are_domain_exceptions(client: TestClient) -> None:
    service: InferenceService = client.app.state.service
    image = png((1, 2, 3))
    cases = [
        ((None, 99, image, Want(top_k=1)), BadRequest),
        ((None, 4, image, Want(top_k=1001)), BadRequest),
        (("vit_nope", 4, image, Want(top_k=1)), UnknownModel),
        ((None, 4, b"not an image", Want(top_k=1)), ImageError),
    ]
    for args, error in cases:
        with pytest.raises(error):
            client.portal.call(service.infer, *args)
    with pytest.raises(DeadlineExceeded):  # arrived long ago: the deadline has passed
        client.portal.call(service.infer, None, 4, image, Want(top_k=1), time.monotonic() - 60)


def test_a_request_admitted_before_the_drain_still_finishes(client: TestClient) -> None:
    service: InferenceService = client.app.state.service
    service.begin_draining()
    with pytest.raises(Unavailable):
        service.admit(None, 4, Want(top_k=1))  # a new request is refused...
    result = client.portal.call(service.infer, None, 4, png((5, 5, 5)), Want(top_k=1))
    assert len(result.predictions) == 1  # ...one whose upload was still arriving is answered
