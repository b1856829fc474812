"""The inference service: one call takes (model, r, image bytes, what to return) and gives a Result.

:meth:`InferenceService.infer` checks the request (:meth:`~InferenceService.admit`), decodes and
preprocesses the image in a thread pool (decode.py, preprocess.py), queues it as one
:class:`~.item.Item` by (model, r) (batching.py), and waits for its batch (inference.py) until
the deadline. Every failure is an exception from errors.py. Cancelling the call (the client hung
up) takes the item out of its queue. The service also owns the life cycle: loading, readiness,
draining.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum

import torch

from .batching import Batch, Batcher, BatchPolicy
from .config import Settings
from .decode import decode_image
from .errors import BadRequest, DeadlineExceeded, Unavailable, UnknownModel
from .hardware import ThreadPlan, plan_threads
from .inference import InferenceWorker
from .item import Item, QueueKey, Result, Want
from .loading import StartupError, load_model, resolve_device
from .metrics import Metrics
from .models import LoadedModel

log = logging.getLogger(__name__)

Loader = Callable[[str, Settings], LoadedModel]

DEFAULT_TOP_K = 5


class Phase(StrEnum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass(frozen=True)
class Admitted:
    """A request the service will take: its model, r, and what to compute (top_k resolved)."""

    model: LoadedModel
    r: int
    want: Want

    @property
    def key(self) -> QueueKey:
        return QueueKey(self.model.name, self.r)


class InferenceService:
    def __init__(self, settings: Settings, metrics: Metrics, loader: Loader = load_model) -> None:
        self.settings = settings
        self.metrics = metrics
        self.phase = Phase.LOADING
        self.failure: str | None = None
        self.workers: dict[str, InferenceWorker] = {}
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
        policy = BatchPolicy(
            max_batch_size=settings.max_batch_size,
            batch_wait_timeout_s=settings.max_delay_s,
            max_queue_size=settings.max_queue,
            max_concurrent_batches=self.threads.instances,
            # A full batch waits ready beside those running, so an inference thread starts the
            # next batch the moment it finishes one, without a round trip through the event loop.
            ready_batches=1,
        )
        self.batcher = Batcher(policy, self._run_batch, self._record_depth)
        self._decode_pool = ThreadPoolExecutor(self.threads.preprocess_threads, thread_name_prefix="decode")

    # -- the request path ----------------------------------------------------------------------

    async def infer(
        self, model: str | None, r: int | None, image: bytes, want: Want, arrived: float | None = None
    ) -> Result:
        """The result for one image; raises an errors.ServeError subtype when there is none."""
        arrived = time.monotonic() if arrived is None else arrived
        # A request whose upload was still arriving when the drain began is finished, not refused.
        admitted = self.admit(model, r, want, while_draining=True)
        self.check_room(admitted)
        pixels = await asyncio.get_running_loop().run_in_executor(
            self._decode_pool, self._prepare, admitted.model, image
        )
        item = Item(
            model=admitted.model.name,
            r=admitted.r,
            pixels=pixels,
            want=admitted.want,
            arrived=arrived,
            deadline=arrived + self.settings.request_timeout_s,
            future=asyncio.get_running_loop().create_future(),
        )
        self.batcher.submit(item)
        try:
            async with asyncio.timeout_at(_loop_time(item.deadline)):
                return await asyncio.shield(item.future)
        except TimeoutError:
            raise self._timed_out() from None
        except DeadlineExceeded:
            raise self._timed_out() from None
        finally:
            if item.live:  # timed out or cancelled: leave the queue, drop any late result
                self.batcher.withdraw(item)

    def admit(
        self, model: str | None, r: int | None, want: Want, *, while_draining: bool = False
    ) -> Admitted:
        """Check a request before any work is done on it: 503 unless ready (or, with
        ``while_draining``, draining), 404 for an unknown model, 422 for r or top_k out of range."""
        taking = (Phase.READY, Phase.DRAINING) if while_draining else (Phase.READY,)
        if self.phase not in taking:
            raise self.unavailable()
        name = self.settings.model_names[0] if model is None else model
        worker = self.workers.get(name)
        if worker is None:
            loaded = ", ".join(self.workers)
            raise UnknownModel(f"no model named {name!r} is loaded (loaded: {loaded})")
        loaded_model = worker.model
        r = loaded_model.default_r if r is None else r
        if not 0 <= r <= loaded_model.r_max:
            raise BadRequest(f"r must lie in [0, {loaded_model.r_max}] for {loaded_model.name}, got {r}")
        return Admitted(loaded_model, r, self._resolve_want(loaded_model, want))

    def check_room(self, admitted: Admitted) -> None:
        """429 (or 503 when shutting down) now if the request's queue would refuse it."""
        self.batcher.check_room(admitted.key)

    @staticmethod
    def _resolve_want(model: LoadedModel, want: Want) -> Want:
        if want.top_k == 0:
            return want
        if not model.num_classes:
            raise BadRequest(f"{model.name} has no classifier head; use /visualize")
        top_k = min(DEFAULT_TOP_K, model.num_classes) if want.top_k is None else want.top_k
        if not 1 <= top_k <= model.num_classes:
            raise BadRequest(f"top_k must lie in [1, {model.num_classes}], got {top_k}")
        return Want(top_k=top_k, merge_map=want.merge_map)

    def _prepare(self, model: LoadedModel, image: bytes) -> torch.Tensor:
        """Runs in a decoding thread: bytes -> the uint8 model input; raises errors.ImageError."""
        reduce_to = model.preprocessor.resize_short_side  # JPEGs much larger than that decode at 1/2..1/8
        return model.preprocessor(decode_image(image, self.settings.max_pixels, reduce_to=reduce_to))

    async def _run_batch(self, batch: Batch) -> None:
        await self.workers[batch.key.model].run(batch)

    def _record_depth(self, key: QueueKey, depth: int) -> None:
        self.metrics.set_queue_depth(key.model, key.r, depth)

    def _timed_out(self) -> DeadlineExceeded:
        timeout = self.settings.request_timeout_ms
        return DeadlineExceeded(f"no result within {timeout:g} ms (TOME_REQUEST_TIMEOUT_MS)")

    def unavailable(self) -> Unavailable:
        if self.phase is Phase.LOADING:
            return Unavailable("the models are still loading", retry_after_s=5)
        if self.phase is Phase.FAILED:
            return Unavailable(f"start-up failed: {self.failure}")
        return Unavailable("the server is shutting down", closing=True)

    def models(self) -> list[LoadedModel]:
        """The loaded models, the default first; 503 while none can be listed."""
        if self.phase in (Phase.LOADING, Phase.FAILED):
            raise self.unavailable()
        return [worker.model for worker in self.workers.values()]

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load, patch and warm every model (in a thread, so /healthz answers meanwhile)."""
        try:
            workers = await asyncio.to_thread(self._load_all)
        except StartupError as exc:
            self.phase, self.failure = Phase.FAILED, str(exc)
            raise
        self.workers = workers
        for model in (worker.model for worker in workers.values()):
            self.metrics.model_loaded(model.name, model.weights, str(model.device), model.dtype_name)
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY
            log.info("ready: %s", ", ".join(f"{w.model.name} ({w.model.weights})" for w in workers.values()))

    def _load_all(self) -> dict[str, InferenceWorker]:
        workers: dict[str, InferenceWorker] = {}
        sizes = tuple(sorted({1, self.settings.max_batch_size}))
        for name in self.settings.model_names:
            log.info("loading %s (weights: %s)", name, self.settings.weights)
            worker = InferenceWorker(
                self._loader(name, self.settings),
                self.metrics,
                self.threads.instances,
                self.threads.torch_threads,
            )
            worker.warm(sizes)
            workers[name] = worker
        return workers

    def begin_draining(self) -> None:
        """Stop taking requests (readyz turns 503); queued ones still finish."""
        if self.phase in (Phase.LOADING, Phase.READY):
            self.phase = Phase.DRAINING

    async def stop(self) -> None:
        self.begin_draining()
        await self.batcher.drain()
        for worker in self.workers.values():
            worker.close()
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
