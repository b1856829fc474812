"""The one service call on its own, without HTTP: (model, r, image bytes, what to return) -> Result."""

from __future__ import annotations

import asyncio
import time

import pytest
from fastapi.testclient import TestClient
from serverutil import TINY_MODEL_KWARGS, png

from tome_serve.app import create_app
from tome_serve.config import Settings
from tome_serve.errors import BadRequest, DeadlineExceeded, ImageError, Unavailable, UnknownModel
from tome_serve.item import Result, Want
from tome_serve.params import Asked
from tome_serve.service import Arrived, InferenceService
from tome_serve.threads import usable_cores

MODEL = "vit_tiny_patch16_224"


class NotReadYet(Arrived):
    """An upload whose bytes are still to come: reading it fails the test."""

    def __init__(self) -> None:
        super().__init__(b"")

    async def read(self) -> bytes:
        raise AssertionError("the upload of a refused request was read")


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
            service.infer(Asked(None, 4), png((200, 10, 10)), Want(top_k=3)),
            service.infer(Asked(MODEL, 4), png((10, 10, 200)), Want(merge_map=True)),
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
        ((Asked(None, 99), image, Want(top_k=1)), BadRequest),
        ((Asked(None, 4), image, Want(top_k=1001)), BadRequest),
        ((Asked("vit_nope", 4), image, Want(top_k=1)), UnknownModel),
        ((Asked(None, 4), b"not an image", Want(top_k=1)), ImageError),
    ]
    for args, error in cases:
        with pytest.raises(error):
            client.portal.call(service.infer, *args)
    with pytest.raises(DeadlineExceeded):  # arrived long ago: the deadline has passed
        client.portal.call(service.infer, Asked(None, 4), image, Want(top_k=1), time.monotonic() - 60)


def test_a_request_admitted_before_the_drain_still_finishes(client: TestClient) -> None:
    service: InferenceService = client.app.state.service
    service.begin_draining()
    with pytest.raises(Unavailable):  # a new request, its upload still to be read, is refused...
        client.portal.call(service.infer, Asked(None, 4), NotReadYet(), Want(top_k=1))
    result = client.portal.call(service.infer, Asked(None, 4), png((5, 5, 5)), Want(top_k=1))
    assert len(result.predictions) == 1  # ...one whose upload was still arriving is answered


def test_one_instance_on_every_core_decodes_between_batches_and_still_fills_them() -> None:
    """With one instance whose torch threads take every core, uploads are decoded while no forward
    pass runs; the batcher waits for images still being decoded, so a burst still runs as full
    batches, and an image that fails to decode gives up its place without holding up the rest."""
    settings = Settings(
        model=MODEL,
        weights="random",
        model_kwargs=TINY_MODEL_KWARGS,
        device="cpu",
        instances=1,
        torch_threads=max(2, usable_cores()),
        max_delay_ms=1,  # shorter than the burst takes to decode
    )
    with TestClient(create_app(settings)) as client:
        service: InferenceService = client.app.state.service
        assert service.threads.decode_between_batches
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)

        async def burst() -> list[Result | BaseException]:
            images = [png((i * 15, 40, 90)) for i in range(16)]
            images[11] = b"\xff\xd8 not really a jpeg"
            calls = [service.infer(Asked(None, 4), image, Want(top_k=1)) for image in images]
            return await asyncio.gather(*calls, return_exceptions=True)

        results = client.portal.call(burst)
    assert isinstance(results[11], ImageError)
    answered = [result for i, result in enumerate(results) if i != 11]
    assert all(isinstance(result, Result) for result in answered)
    assert sorted({result.batch_size for result in answered}) == [7, 8]
