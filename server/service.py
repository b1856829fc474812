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
from .errors import BadRequest, ClientGone, DeadlineExceeded, QueueFull, ServeError, Unavailable, UnknownModel
from .fidelity_metrics import FidelityMetrics
from .images import decode_image
from .inference import ForwardGate
from .item import Item, Result, Want
from .lane import Lane
from .loading import LoadedModel, StartupError, load_model, resolve_device
from .metrics import Metrics
from .params import Asked, RChoice
from .threads import ThreadPlan, loading_threads, plan_threads, torch_threads

log = logging.getLogger(__name__)

Loader = Callable[[str, Settings], LoadedModel]


class Phase(StrEnum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class Upload(Protocol):
    """A request's images as they arrive (the routes adapt an HTTP request to this)."""

    count: int
    """How many images the request holds (known before they are read)."""

    def admitted(self, model: str, r: RChoice) -> None:
        """The request was admitted for ``model`` at ``r`` (its metric labels)."""

    async def read(self) -> list[bytes | ServeError]:
        """Each image's bytes, or the 4xx error of an image that cannot be read; raises a ServeError
        when the request as a whole is malformed."""

    async def discard(self) -> None:
        """Read and drop the upload of a request refused before it was used."""

    async def gone(self) -> None:
        """Returns when the client hangs up (after :meth:`read`)."""


class Arrived:
    """An upload that has arrived already (the image's bytes), from a client that stays."""

    count = 1

    def __init__(self, image: bytes) -> None:
        self._image = image

    def admitted(self, model: str, r: RChoice) -> None:
        pass

    async def read(self) -> list[bytes | ServeError]:
        return [self._image]

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
        self.fidelity_metrics = FidelityMetrics(
            metrics.registry,
            # The metrics show the default merge rule's tables (labels model, r, kind: one table each).
            lambda: [
                lane.fidelity[settings.default_merge]
                for lane in self.lanes.values()
                if lane.fidelity is not None
            ],
            settings.min_fidelity,
        )
        self._decode_pool = ThreadPoolExecutor(self.threads.preprocess_threads, thread_name_prefix="decode")
        self._gate = ForwardGate(hold=self.threads.decode_between_batches)

    # -- the request path ----------------------------------------------------------------------

    async def infer(
        self, asked: Asked, upload: Upload | bytes, want: Want, arrived: float | None = None
    ) -> Result:
        """The result for a request of one image; raises its errors.ServeError (or ClientGone)."""
        (answer,) = await self.infer_all(asked, upload, want, arrived)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def infer_all(
        self,
        asked: Asked,
        upload: Upload | bytes,
        want: Want,
        arrived: float | None = None,
        *,
        each_on_its_own: bool = False,
    ) -> list[Result | ServeError]:
        """The request path (see the module docstring): a result per image of ``upload``, in order,
        for the parameters ``asked`` (checked by the model's lane: r, merge rule, and for r=auto its
        target, auto ceiling and fidelity floor).
        ``upload`` as bytes is one image that has arrived already: such a request is still taken while
        draining.

        An image that cannot be read or decoded fails the whole request before any is queued (its
        error names its index), unless ``each_on_its_own``: then its error takes its place in the list
        and the other images are still answered. Errors of the request as a whole (admission, room,
        deadline, the client hanging up) are raised."""
        arrived = time.monotonic() if arrived is None else arrived
        if isinstance(upload, bytes):
            upload, taking = Arrived(upload), (Phase.READY, Phase.DRAINING)
        else:
            taking = (Phase.READY,)
        lane = self._lane(asked.model, taking)
        if upload.count > self.settings.max_queue:
            queue = self.settings.max_queue
            raise BadRequest(f"{upload.count} images are more than a queue holds (TOME_MAX_QUEUE={queue})")
        items = lane.admit(asked, want, arrived, upload.count)
        upload.admitted(lane.name, items[0].r)
        try:
            lane.check_room(items)
        except QueueFull:
            await upload.discard()
            raise
        images = await upload.read()
        lane.reserve(items)  # their batches wait for them while they decode
        answers: list[Result | ServeError] = await asyncio.gather(
            *(self._decode(lane, item, image) for item, image in zip(items, images, strict=True))
        )
        failed = [(i, error) for i, error in enumerate(answers) if isinstance(error, ServeError)]
        if failed and not each_on_its_own:
            for item, answer in zip(items, answers, strict=True):
                if answer is None:
                    lane.release(item)
            index, error = failed[0]
            raise error.at(index) if len(items) > 1 else error
        queued = [item for item, answer in zip(items, answers, strict=True) if answer is None]
        for item in queued:
            lane.submit(item)
        results = iter(await self._results(lane, queued, upload))
        return [next(results) if answer is None else answer for answer in answers]

    async def _decode(self, lane: Lane, item: Item, image: bytes | ServeError) -> ServeError | None:
        """Decode ``image`` into ``item.pixels`` in a decoding thread; its error, which gives up the
        item's place, or None."""
        if isinstance(image, ServeError):
            lane.release(item)
            return image
        try:
            item.pixels = await asyncio.get_running_loop().run_in_executor(
                self._decode_pool, self._prepare, lane.model, image
            )
        except ServeError as error:
            lane.release(item)
            return error
        except BaseException:
            lane.release(item)
            raise
        return None

    async def _results(self, lane: Lane, items: list[Item], upload: Upload) -> list[Result | ServeError]:
        """The result (or error) of each of ``items`` once its batch ran. DeadlineExceeded at their
        deadline and ClientGone when the client hangs up first are the whole request's; either way
        every item leaves its queue and any late result is dropped."""
        hangup = asyncio.ensure_future(upload.gone())
        pending = {item.future for item in items}
        try:
            async with asyncio.timeout_at(_loop_time(items[0].deadline) if items else None):
                while pending:
                    done, _ = await asyncio.wait(pending | {hangup}, return_when=asyncio.FIRST_COMPLETED)
                    if hangup in done:
                        raise ClientGone()
                    pending -= done
        except TimeoutError:
            for item in items:
                lane.answered(item, None)
            raise self._timed_out() from None
        finally:
            hangup.cancel()
            for item in items:
                if item.live:
                    lane.batcher.withdraw(item)
        answers: list[Result | ServeError] = []
        for item in items:
            error = item.future.exception()
            if error is None:
                answers.append(item.future.result())
                lane.answered(item, answers[-1])
            elif isinstance(error, ServeError):
                answers.append(error)
                if isinstance(error, DeadlineExceeded):  # expired while queued
                    lane.answered(item, None)
            else:
                raise error
        return answers

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
            for lane in lanes.values():  # after ready: a re-check must not slow another model's warm-up
                lane.keep_state()

    def _load_all(self) -> dict[str, Lane]:
        with torch_threads(loading_threads()):  # the inference threads set their own count
            return self._load_each()

    def _load_each(self) -> dict[str, Lane]:
        lanes: dict[str, Lane] = {}
        for name in self.settings.model_names:
            log.info("loading %s (weights: %s)", name, self.settings.weights)
            model = self._loader(name, self.settings)
            lane = Lane(
                model,
                self.settings,
                self.threads,
                self.metrics,
                self.auto_metrics,
                self._gate,
                self.fidelity_metrics,
            )
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
