"""The request body -> the image's bytes, never holding more than the upload limit (plus a little
multipart framing) in memory: the body is counted while it arrives and refused once too large.
:class:`HttpUpload` is an HTTP request as the service's ``Upload``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.types import Message

from .errors import BadRequest, ImageError, ServeError
from .middleware import set_metric_labels

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
        # The body has been read, so the only message left to receive is the disconnect.
        while (await self._request.receive())["type"] != "http.disconnect":
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
