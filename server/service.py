"""The inference service: the request path, one call, and the life cycle of the served models.

:meth:`InferenceService.infer` is the path every request takes (the routes call it):

1. **admit**: 503 unless ready, 404 for an unknown model; the model's :class:`~.lane.Lane` checks the
   parameters (422) and makes the request's :class:`~.item.Item`;
2. **check room**: 429 now if its queue is full or r=auto cannot meet its target, before the upload is
   read (a refused upload is discarded unread);
3. **read** the upload and reserve the item's place in its queue (its batch waits for it meanwhile);
4. **decode** and preprocess the image in the decoding threads (images.py; between
   batches when one instance takes every core);
5. **queue** it in its (model, r) queue, where the lane's batcher forms batches and its inference
   threads run them (batching.py, inference.py);
6. **await** its :class:`~.item.Result` until the deadline (504) or until the client hangs up.

Every failure is an exception from errors.py. Everything model-specific lives in the model's lane; the
service holds the lanes by name, the shared decoding threads, and the phase (loading, ready, draining).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from typing import Protocol

import torch

from .auto import AutoMetrics
from .config import Settings
from .errors import ClientGone, DeadlineExceeded, QueueFull, Unavailable, UnknownModel
from .hardware import ThreadPlan, plan_threads
from .images import decode_image
from .inference import ForwardGate
from .item import Item, Result, Want
from .lane import Lane
from .loading import StartupError, load_model, resolve_device
from .metrics import Metrics
from .models import LoadedModel
from .params import RChoice

log = logging.getLogger(__name__)

Loader = Callable[[str, Settings], LoadedModel]


class Phase(StrEnum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class Upload(Protocol):
    """A request's image as it arrives (the routes adapt an HTTP request to this)."""

    def admitted(self, model: str, r: RChoice) -> None:
        """The request was admitted for ``model`` at ``r`` (its metric labels)."""

    async def read(self) -> bytes:
        """The image's bytes (4xx errors.ImageError/BadRequest for a bad upload)."""

    async def discard(self) -> None:
        """Read and drop the upload of a request refused before it was used."""

    async def gone(self) -> None:
        """Returns when the client hangs up (after :meth:`read`)."""


class Arrived:
    """An upload that has arrived already (the image's bytes), from a client that stays."""

    def __init__(self, image: bytes) -> None:
        self._image = image

    def admitted(self, model: str, r: RChoice) -> None:
        pass

    async def read(self) -> bytes:
        return self._image

    async def discard(self) -> None:
        pass

    async def gone(self) -> None:
        await asyncio.Event().wait()


class InferenceService:
    def __init__(self, settings: Settings, metrics: Metrics, loader: Loader = load_model) -> None:
        self.settings = settings
        self.metrics = metrics
        self.phase = Phase.LOADING
        self.failure: str | None = None
        self.lanes: dict[str, Lane] = {}
        """The served models by name, the default first."""
        self._loader = loader
        self.threads = _plan_threads(settings)
        """Instances, torch threads per instance and preprocessing threads, "auto" resolved."""
        log.info(
            "threads: %d instance(s) per model x %d torch thread(s), %d preprocessing thread(s) (%s)",
            self.threads.instances,
            self.threads.torch_threads,
            self.threads.preprocess_threads,
            self.threads.reason,
        )
        self.auto_metrics = AutoMetrics(
            metrics.registry,
            lambda: [lane.auto.table for lane in self.lanes.values() if lane.auto is not None],
            self.threads.instances,
        )
        self._decode_pool = ThreadPoolExecutor(self.threads.preprocess_threads, thread_name_prefix="decode")
        self._gate = ForwardGate(hold=self.threads.decode_between_batches)

    # -- the request path ----------------------------------------------------------------------

    async def infer(
        self,
        model: str | None,
        r: int | str | None,
        upload: Upload | bytes,
        want: Want,
        arrived: float | None = None,
        *,
        target_ms: float | str | None = None,
        max_r: int | str | None = None,
    ) -> Result:
        """The result for one image (see the module docstring); raises an errors.ServeError subtype,
        or ClientGone, when there is none. ``r`` is an integer, "auto", its query text, or None (the
        model's default r); ``target_ms`` and ``max_r`` apply to r=auto only. ``upload`` as bytes is an
        image that has arrived already: such a request is still taken while draining."""
        arrived = time.monotonic() if arrived is None else arrived
        if isinstance(upload, bytes):
            upload, taking = Arrived(upload), (Phase.READY, Phase.DRAINING)
        else:
            taking = (Phase.READY,)
        lane = self._lane(model, taking)
        item = lane.admit(r, want, arrived, target_ms=target_ms, max_r=max_r)
        upload.admitted(lane.name, item.r)
        try:
            lane.check_room(item)
        except QueueFull:
            await upload.discard()
            raise
        image = await upload.read()
        lane.batcher.reserve(item.key, item.waiting)  # its batch waits for it while it decodes
        try:
            item.pixels = await asyncio.get_running_loop().run_in_executor(
                self._decode_pool, self._prepare, lane.model, image
            )
        except BaseException:
            lane.batcher.release(item.key, item.waiting)
            raise
        lane.submit(item)
        return await self._result(lane, item, upload)

    async def _result(self, lane: Lane, item: Item, upload: Upload) -> Result:
        """``item``'s result once its batch ran; DeadlineExceeded at its deadline, ClientGone when the
        client hangs up first. Either way it leaves its queue and any late result is dropped."""
        hangup = asyncio.ensure_future(upload.gone())
        try:
            async with asyncio.timeout_at(_loop_time(item.deadline)):
                await asyncio.wait({item.future, hangup}, return_when=asyncio.FIRST_COMPLETED)
                if not item.future.done():
                    raise ClientGone()
                result = item.future.result()
        except (TimeoutError, DeadlineExceeded):
            lane.answered(item, None)
            raise self._timed_out() from None
        finally:
            hangup.cancel()
            if item.live:
                lane.batcher.withdraw(item)
        lane.answered(item, result)
        return result

    def _lane(self, model: str | None, taking: tuple[Phase, ...]) -> Lane:
        if self.phase not in taking:
            raise self.unavailable()
        name = self.settings.model_names[0] if model is None else model
        lane = self.lanes.get(name)
        if lane is None:
            raise UnknownModel(f"no model named {name!r} is loaded (loaded: {', '.join(self.lanes)})")
        return lane

    def _prepare(self, model: LoadedModel, image: bytes) -> torch.Tensor:
        """Runs in a decoding thread: bytes -> the uint8 model input; raises errors.ImageError."""
        self._gate.wait()
        reduce_to = model.preprocessor.resize_short_side  # JPEGs much larger than that decode at 1/2..1/8
        return model.preprocessor(decode_image(image, self.settings.max_pixels, reduce_to=reduce_to))

    def _timed_out(self) -> DeadlineExceeded:
        timeout = self.settings.request_timeout_ms
        return DeadlineExceeded(f"no result within {timeout:g} ms (TOME_REQUEST_TIMEOUT_MS)")

    def unavailable(self) -> Unavailable:
        if self.phase is Phase.LOADING:
            return Unavailable("the models are still loading", retry_after_s=5)
        if self.phase is Phase.FAILED:
            return Unavailable(f"start-up failed: {self.failure}")
        return Unavailable("the server is shutting down", closing=True)

    def served(self) -> list[Lane]:
        """The served models' lanes, the default first; 503 while none can be listed."""
        if self.phase in (Phase.LOADING, Phase.FAILED):
            raise self.unavailable()
        return list(self.lanes.values())

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load, patch and warm every model (in a thread, so /healthz answers meanwhile)."""
        # Loading runs torch kernels, which give the loading thread an OpenMP team of its own, and
        # that team lives as long as its thread. A pooled thread (asyncio.to_thread) would keep it
        # for good, and while libgomp manages more threads than there are cores it makes every
        # team sleep between kernels instead of spinning (2 torch threads on 2 cores, no server:
        # 50 -> 41.5 img/s beside one idle team). So the loader gets a thread that then ends.
        loading = ThreadPoolExecutor(1, thread_name_prefix="load")
        try:
            lanes = await asyncio.get_running_loop().run_in_executor(loading, self._load_all)
        except StartupError as exc:
            self.phase, self.failure = Phase.FAILED, str(exc)
            raise
        finally:
            loading.shutdown(wait=False)
        self.lanes = lanes
        for model in (lane.model for lane in lanes.values()):
            self.metrics.model_loaded(model.name, model.weights, str(model.device), model.dtype_name)
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY
            log.info("ready: %s", ", ".join(f"{lane.name} ({lane.model.weights})" for lane in lanes.values()))

    def _load_all(self) -> dict[str, Lane]:
        lanes: dict[str, Lane] = {}
        for name in self.settings.model_names:
            log.info("loading %s (weights: %s)", name, self.settings.weights)
            model = self._loader(name, self.settings)
            lane = Lane(model, self.settings, self.threads, self.metrics, self.auto_metrics, self._gate)
            lane.warm()
            lanes[name] = lane
        return lanes

    def begin_draining(self) -> None:
        """Stop taking requests (readyz turns 503); queued ones still finish."""
        if self.phase in (Phase.LOADING, Phase.READY):
            self.phase = Phase.DRAINING

    async def stop(self) -> None:
        self.begin_draining()
        await asyncio.gather(*(lane.drain() for lane in self.lanes.values()))
        self._decode_pool.shutdown(wait=True)


def _plan_threads(settings: Settings) -> ThreadPlan:
    try:
        device = resolve_device(settings.device)
    except StartupError:  # reported when the models load
        device = torch.device("cpu")
    return plan_threads(settings.instances, settings.torch_threads, settings.preprocess_threads, device)


def _loop_time(monotonic_deadline: float) -> float:
    """asyncio's clock for a ``time.monotonic()`` instant (the loop's clock may differ)."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())
