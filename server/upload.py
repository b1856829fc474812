"""The request body -> the images' bytes, never holding more than the upload limit (plus a little
multipart framing) in memory: the body is counted while it arrives and refused once too large.

:class:`HttpUpload` is a request of one image (/classify, /visualize) as the service's ``Upload``;
:class:`EmbeddingInputs` the images of an embeddings request: base64 data URIs or plain base64 from its
JSON body, http(s) URLs of hosts the operator allows (fetched within a time and size limit), or files of
a multipart body."""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import httpx
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.types import Message

from .config import Settings
from .errors import BadRequest, ImageError, ServeError
from .middleware import set_metric_labels
from .schemas import EmbeddingsRequest

MULTIPART_ALLOWANCE = 64 * 1024
"""Bytes of multipart framing (boundaries, part headers, small fields) allowed on top of the image."""

FIELD = "file"


class HttpUpload:
    """The image of one HTTP request, read within ``limit`` bytes."""

    count = 1

    def __init__(self, request: Request, limit: int) -> None:
        self._request, self._limit = request, limit

    def admitted(self, model: str, r: int | str) -> None:
        set_metric_labels(self._request.scope.setdefault("state", {}), model, r)

    async def read(self) -> list[bytes | ServeError]:
        return [await read_image_bytes(self._request, self._limit)]

    async def discard(self) -> None:
        await discard_body(self._request, self._limit)

    async def gone(self) -> None:
        await _disconnected(self._request)


class EmbeddingInputs:
    """The images of an embeddings request, one per input string or file, each within the upload
    limit; an image that cannot be had is its own 4xx, so one bad image need not fail the rest."""

    def __init__(self, request: Request, sources: list[str] | list[bytes], settings: Settings) -> None:
        self._request, self._sources, self._settings = request, sources, settings
        self.count = len(sources)

    def admitted(self, model: str, r: int | str) -> None:
        set_metric_labels(self._request.scope.setdefault("state", {}), model, r)

    async def read(self) -> list[bytes | ServeError]:
        return await asyncio.gather(*(self._one(source) for source in self._sources))

    async def discard(self) -> None:
        pass  # the body has been read: the parameters are in it

    async def gone(self) -> None:
        await _disconnected(self._request)

    async def _one(self, source: str | bytes) -> bytes | ServeError:
        limit = self._settings.max_upload_bytes
        try:
            if isinstance(source, bytes):
                data = source
            elif source.startswith(("http://", "https://")):
                data = await self._fetch(source)
            else:
                data = _base64_image(source, limit)
        except ServeError as error:
            return error
        return _too_large(limit) if len(data) > limit else data

    async def _fetch(self, url: str) -> bytes:
        settings = self._settings
        host = (urlsplit(url).hostname or "").lower()
        if host not in settings.embed_url_hosts:
            allowed = ", ".join(settings.embed_url_hosts) or "none"
            raise BadRequest(
                f"images are not fetched from {host or url!r}: only hosts listed in TOME_EMBED_URL_HOSTS are "
                f"(allowed: {allowed}); send the image as a base64 data: URI instead"
            )
        data = bytearray()
        try:
            async with (
                httpx.AsyncClient(timeout=settings.embed_url_timeout_s, follow_redirects=False) as client,
                client.stream("GET", url) as response,
            ):
                if response.status_code != 200:
                    raise BadRequest(f"fetching {url} answered HTTP {response.status_code}")
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > settings.max_upload_bytes:
                        raise _too_large(settings.max_upload_bytes)
        except httpx.HTTPError as exc:
            raise BadRequest(f"could not fetch {url}: {type(exc).__name__}") from None
        return bytes(data)


async def read_embeddings_request(
    request: Request, settings: Settings
) -> tuple[EmbeddingsRequest, EmbeddingInputs]:
    """The parameters and images of an embeddings request: a JSON body (OpenAI's and Infinity's shape)
    or a multipart body with the same fields and the images as files (any field name). The body is
    read within TOME_EMBED_MAX_REQUEST_BYTES."""
    limit = settings.embed_max_request_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _request_too_large(limit)
    counted = Request(request.scope, _counting_receive(request.receive, limit))
    try:
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            params, sources = await _from_form(counted, settings)
        else:
            params = EmbeddingsRequest.model_validate_json(await counted.body())
            sources = [params.input] if isinstance(params.input, str) else params.input
    except _TooLarge:
        raise _request_too_large(limit) from None
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    if not 1 <= len(sources) <= settings.embed_max_items:
        raise BadRequest(
            f"input must hold 1 to {settings.embed_max_items} images (TOME_EMBED_MAX_ITEMS), "
            f"got {len(sources)}"
        )
    return params, EmbeddingInputs(request, sources, settings)


async def _from_form(request: Request, settings: Settings) -> tuple[EmbeddingsRequest, list[bytes]]:
    form = await request.form(max_files=settings.embed_max_items, max_fields=32)
    try:
        fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
        files = [await value.read() for _, value in form.multi_items() if isinstance(value, UploadFile)]
    finally:
        await form.close()
    return EmbeddingsRequest.model_validate({**fields, "input": []}), files


def _base64_image(text: str, limit: int) -> bytes:
    """A ``data:image/...;base64,`` URI or plain base64 -> bytes (422 when it is neither)."""
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise BadRequest("a data: URI must be base64-encoded ('data:image/png;base64,...')")
    if len(text) > (limit + 2) // 3 * 4 + 4:  # refuse before decoding what would be too large
        raise _too_large(limit)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(
            "not an image: expected a base64 data: URI, plain base64 or an http(s) URL"
        ) from None


def _request_too_large(limit: int) -> ImageError:
    return ImageError(
        413, f"the request is larger than the limit of {limit} bytes (TOME_EMBED_MAX_REQUEST_BYTES)"
    )


async def _disconnected(request: Request) -> None:
    # The body has been read, so the only message left to receive is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _TooLarge(Exception):
    pass


def _too_large(limit: int) -> ImageError:
    return ImageError(413, f"the upload is larger than the limit of {limit} bytes (TOME_MAX_UPLOAD_BYTES)")


async def read_image_bytes(request: Request, limit: int) -> bytes:
    """The uploaded image: multipart field ``file``, or else the raw body (any content type; the
    image format is recognised from the bytes themselves)."""
    multipart = request.headers.get("content-type", "").lower().startswith("multipart/form-data")
    allowance = MULTIPART_ALLOWANCE if multipart else 0
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + allowance:
        raise _too_large(limit)  # refuse before reading a byte
    if multipart:
        return await _from_multipart(request, limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


async def discard_body(request: Request, limit: int) -> None:
    """Read and drop the body of a request that is refused before its upload is used (429).

    Answering without reading it would make the server close a socket that still holds unread
    bytes, which the kernel turns into a reset, and the client never sees the 429. Reading costs
    only the transfer: nothing is kept or decoded. A body over the upload limit is abandoned."""
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit + MULTIPART_ALLOWANCE:
            return


async def _from_multipart(request: Request, limit: int) -> bytes:
    counted = Request(request.scope, _counting_receive(request.receive, limit + MULTIPART_ALLOWANCE))
    try:
        form = await counted.form(max_files=1, max_fields=16)
    except _TooLarge:
        raise _too_large(limit) from None
    try:
        part = form.get(FIELD)
        if part is None:
            raise BadRequest(f"the multipart body has no field {FIELD!r} (curl -F {FIELD}=@photo.jpg)")
        if not isinstance(part, UploadFile):
            raise BadRequest(f"the multipart field {FIELD!r} must be a file, not a text value")
        data = await part.read(limit + 1)
        if len(data) > limit:
            raise _too_large(limit)
        return data
    finally:
        await form.close()


Receive = Callable[[], Awaitable[Message]]


def _counting_receive(receive: Receive, limit: int) -> Receive:
    received = 0

    async def wrapped() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _TooLarge()
        return message

    return wrapped
