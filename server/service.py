"""The inference service: one call takes (model, r, image bytes, what to return) and gives a Result.

:meth:`InferenceService.infer` checks the request (:meth:`~InferenceService.admit`), reserves its
place in the queue of (model, r), decodes and preprocesses the image in a thread pool (decode.py,
preprocess.py; between batches when one instance takes every core), queues it as one
:class:`~.item.Item` in its place (batching.py), and waits for its batch (inference.py) until
the deadline. r=auto requests of a model share the queue (model, "auto"): admission asks the
model's :class:`~.auto.AutoR` whether even the request's floor can meet its latency target (429
otherwise), and the batcher's planner asks it for each batch's r when the batch is formed. Every
batch of a model, fixed r too, reports to it (backlog, measured cost). Every failure is an
exception from errors.py. Cancelling the call (the client hung up) takes the item out of its
queue. The service also owns the life cycle: loading, readiness, draining.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

import torch

from .auto import AutoR
from .auto_metrics import AutoMetrics
from .auto_params import AutoParams, ParamError, auto_params, parse_r
from .batching import Batch, Batcher, BatchPlan, BatchPolicy
from .config import Settings
from .controller import Overloaded, Waiting
from .costs import CostTable
from .decode import decode_image
from .errors import BadRequest, DeadlineExceeded, QueueFull, Unavailable, UnknownModel
from .inference import ForwardGate, InferenceWorker
from .item import AUTO, Item, QueueKey, Result, Want
from .loading import StartupError, load_model, resolve_device
from .metrics import Metrics
from .models import LoadedModel
from .threads import ThreadPlan, plan_threads

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
    """A request the service will take: its model, r (an integer or AUTO), what to compute (top_k
    resolved), and for r=auto its latency target and floor."""

    model: LoadedModel
    r: int | Literal["auto"]
    want: Want
    auto: AutoParams | None = None

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
        self.autos: dict[str, AutoR] = {}
        """r=auto of every loaded model (its cost table, controller and backlog)."""
        self.targets_ms: dict[str, float] = {}
        """The server-wide latency target of r=auto requests, per model (TOME_LATENCY_TARGET_MS)."""
        self.auto_metrics = AutoMetrics(
            metrics.registry, lambda: [auto.table for auto in self.autos.values()], self.threads.instances
        )
        self.batcher = Batcher(policy, self._run_batch, self._record_depth, self._plan)
        self._decode_pool = ThreadPoolExecutor(self.threads.preprocess_threads, thread_name_prefix="decode")
        self._gate = ForwardGate(hold=self.threads.decode_between_batches)

    # -- the request path ----------------------------------------------------------------------

    async def infer(
        self,
        model: str | None,
        r: int | str | None,
        image: bytes,
        want: Want,
        arrived: float | None = None,
        *,
        target_ms: float | str | None = None,
        max_r: int | str | None = None,
    ) -> Result:
        """The result for one image; raises an errors.ServeError subtype when there is none.
        ``r`` is an integer, "auto" or None (the model's default r); ``target_ms`` and ``max_r``
        apply to r=auto only."""
        arrived = time.monotonic() if arrived is None else arrived
        # A request whose upload was still arriving when the drain began is finished, not refused.
        admitted = self.admit(model, r, want, target_ms=target_ms, max_r=max_r, while_draining=True)
        waiting = self.check_room(admitted, arrived)
        return await self.run(admitted, image, arrived, waiting)

    async def run(
        self, admitted: Admitted, image: bytes, arrived: float, waiting: Waiting | None = None
    ) -> Result:
        """The rest of :meth:`infer` for a request already admitted and checked (``waiting`` is
        what :meth:`check_room` returned): decode, queue, wait for the batch."""
        self.batcher.reserve(admitted.key, waiting)  # its batch waits for it while it decodes
        try:
            pixels = await asyncio.get_running_loop().run_in_executor(
                self._decode_pool, self._prepare, admitted.model, image
            )
        except BaseException:
            self.batcher.release(admitted.key, waiting)
            raise
        item = Item(
            model=admitted.model.name,
            r=admitted.r,
            pixels=pixels,
            want=admitted.want,
            arrived=arrived,
            deadline=arrived + self.settings.request_timeout_s,
            future=asyncio.get_running_loop().create_future(),
            waiting=waiting,
        )
        self.batcher.submit(item, reserved=True)
        auto = self.autos.get(item.model) if admitted.auto is not None else None
        try:
            async with asyncio.timeout_at(_loop_time(item.deadline)):
                result = await asyncio.shield(item.future)
        except (TimeoutError, DeadlineExceeded):
            if auto is not None:
                auto.timed_out()
            raise self._timed_out() from None
        finally:
            if item.live:  # timed out or cancelled: leave the queue, drop any late result
                self.batcher.withdraw(item)
        if auto is not None and admitted.auto is not None:
            auto.answered(result.r, time.monotonic() - arrived, admitted.auto.target_s)
        return result

    def admit(
        self,
        model: str | None,
        r: int | str | None,
        want: Want,
        *,
        target_ms: float | str | None = None,
        max_r: int | str | None = None,
        while_draining: bool = False,
    ) -> Admitted:
        """Check a request before any work is done on it: 503 unless ready (or, with
        ``while_draining``, draining), 404 for an unknown model, 422 for r, target_ms, max_r or
        top_k out of range (the message says what is allowed). ``r``: an integer, "auto" or its
        text as the query gave it, or None for the model's default."""
        taking = (Phase.READY, Phase.DRAINING) if while_draining else (Phase.READY,)
        if self.phase not in taking:
            raise self.unavailable()
        name = self.settings.model_names[0] if model is None else model
        worker = self.workers.get(name)
        if worker is None:
            loaded = ", ".join(self.workers)
            raise UnknownModel(f"no model named {name!r} is loaded (loaded: {loaded})")
        loaded_model = worker.model
        r_max = loaded_model.r_max
        try:
            chosen = parse_r(None if r is None else str(r), loaded_model.default_r, r_max)
            params = auto_params(
                chosen,
                _number("target_ms", target_ms),
                _integer("max_r", max_r, r_max),
                default_target_ms=self.targets_ms.get(name, self.settings.request_timeout_ms),
                timeout_ms=self.settings.request_timeout_ms,
                r_max=r_max,
                auto_max_r=self.auto_max_r(loaded_model),
            )
        except ParamError as exc:
            raise BadRequest(str(exc)) from None
        return Admitted(loaded_model, chosen, self._resolve_want(loaded_model, want), params)

    def check_room(self, admitted: Admitted, arrived: float | None = None) -> Waiting | None:
        """429 (or 503 when shutting down) now if the request's queue would refuse it; for r=auto
        also 429 when even the request's floor cannot meet its latency target behind the queue
        (Retry-After from the same prediction). Returns an auto request's :class:`Waiting`."""
        self.batcher.check_room(admitted.key)
        if admitted.auto is None:
            return None
        waiting = Waiting(
            time.monotonic() if arrived is None else arrived, admitted.auto.target_s, admitted.auto.max_r
        )
        queued = self._backlog(admitted.key, self.batcher.queued(admitted.key))
        try:
            self.autos[admitted.model.name].admit(queued, waiting)
        except Overloaded as exc:
            raise QueueFull(
                f"r=auto cannot answer {admitted.model.name} within {waiting.target_s * 1000:g} ms even at "
                f"r={waiting.max_r}: {exc}",
                exc.retry_after_s,
            ) from None
        return waiting

    def auto_max_r(self, model: LoadedModel) -> int:
        """The largest r r=auto may choose for ``model`` (TOME_AUTO_MAX_R, at most its r_max)."""
        cap = self.settings.auto_max_r
        return model.r_max if cap is None else min(cap, model.r_max)

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
        self._gate.wait()
        reduce_to = model.preprocessor.resize_short_side  # JPEGs much larger than that decode at 1/2..1/8
        return model.preprocessor(decode_image(image, self.settings.max_pixels, reduce_to=reduce_to))

    def _plan(self, key: QueueKey, queued: Sequence[Item]) -> BatchPlan:
        """The batcher's planner: a fixed-r queue's batch runs at its r; an auto queue's batch at
        the r its model's controller chooses for the queued requests, and takes as many as it says."""
        if key.r != AUTO:
            return BatchPlan(key.r)
        waiting = self._backlog(key, queued)
        decision = self.autos[key.model].choose(waiting)
        return BatchPlan(decision.r, decision.batch_size)

    def _backlog(self, key: QueueKey, queued: Sequence[Item]) -> list[Waiting]:
        """What r=auto plans for: the queued requests of ``key``, oldest first, then those still
        being decoded (with one instance on every core they decode only between batches, so the
        queue alone would hide most of a burst)."""
        waiting = [item.waiting for item in queued] + list(self.batcher.coming(key))
        return [w for w in waiting if w is not None]

    async def _run_batch(self, batch: Batch) -> None:
        auto = self.autos.get(batch.key.model)
        if auto is None:
            await self.workers[batch.key.model].run(batch)
            return
        observer = _AutoObserver(auto, auto.handed(batch.r, len(batch.items)), batch.r, len(batch.items))
        try:
            await self.workers[batch.key.model].run(batch, observer)
        finally:
            observer.finished(None)  # no-op unless the batch never reached the model

    def _record_depth(self, key: QueueKey, depth: int) -> None:
        self.metrics.set_queue_depth(key.model, key.r, depth)  # r label "auto" for the auto queue

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
        # Loading runs torch kernels, which give the loading thread an OpenMP team of its own, and
        # that team lives as long as its thread. A pooled thread (asyncio.to_thread) would keep it
        # for good, and while libgomp manages more threads than there are cores it makes every
        # team sleep between kernels instead of spinning (2 torch threads on 2 cores, no server:
        # 50 -> 41.5 img/s beside one idle team). So the loader gets a thread that then ends.
        loading = ThreadPoolExecutor(1, thread_name_prefix="load")
        try:
            workers = await asyncio.get_running_loop().run_in_executor(loading, self._load_all)
        except StartupError as exc:
            self.phase, self.failure = Phase.FAILED, str(exc)
            raise
        finally:
            loading.shutdown(wait=False)
        self.workers = workers
        for model in (worker.model for worker in workers.values()):
            self.metrics.model_loaded(model.name, model.weights, str(model.device), model.dtype_name)
            self.auto_metrics.target.labels(model.name).set(self.targets_ms[model.name] / 1000.0)
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
                self._gate,
            )
            worker.warm(sizes)
            self._warm_auto(worker)
            workers[name] = worker
        return workers

    def _warm_auto(self, worker: InferenceWorker) -> None:
        """Measure the model's cost table on its inference threads within TOME_AUTO_WARMUP_S, set
        its latency target, and set up its r=auto. Runs before /readyz turns 200."""
        model, settings = worker.model, self.settings
        cap = self.auto_max_r(model)
        table = CostTable(model.name, cap, settings.max_batch_size)
        started = time.monotonic()
        cells = table.warm_up(worker.time_batch, budget_s=settings.auto_warmup_s)
        full = table.snapshot().seconds(0, settings.max_batch_size)
        if settings.latency_target_ms is not None:
            target_ms = settings.latency_target_ms
        else:  # two full batches at r=0: one running plus one's own (see the README's r=auto section)
            target_ms = min(math.ceil(2 * full * 1000 / 10) * 10, settings.request_timeout_ms)
        self.targets_ms[model.name] = target_ms
        self.autos[model.name] = AutoR(table, cap, lanes=self.threads.instances, metrics=self.auto_metrics)
        log.info(
            "%s: r=auto cost table: %d cells measured in %.1f s (r=0, batch %d: %.0f ms); latency target "
            "%g ms%s; auto max r %d",
            model.name,
            cells,
            time.monotonic() - started,
            settings.max_batch_size,
            full * 1000,
            target_ms,
            "" if settings.latency_target_ms is not None else " (derived: 2 full batches at r=0)",
            cap,
        )

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


class _AutoObserver:
    """Reports one batch to its model's r=auto: started (backlog), finished (backlog, cost table).
    ``finished`` acts once: the inference thread calls it, the batch's task again as a safety net."""

    def __init__(self, auto: AutoR, token: int, r: int, size: int) -> None:
        self._auto, self._token, self._r, self._size = auto, token, r, size
        self._done = False

    def started(self) -> None:
        self._auto.running(self._token)

    def finished(self, seconds: float | None) -> None:
        if not self._done:
            self._done = True
            self._auto.finished(self._token, self._r, self._size, seconds)


def _number(name: str, value: float | str | None) -> float | None:
    """A query's number; text that is not one becomes NaN, which the range check refuses by name."""
    if value is None or isinstance(value, float | int):
        return value
    try:
        return float(value)
    except ValueError:
        return math.nan


def _integer(name: str, value: int | str | None, r_max: int) -> int | None:
    if value is None or isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        allowed = f"an integer from 0 to {r_max} for this model"
        raise ParamError(f"{name} must be {allowed}, got {value!r}") from None


def _loop_time(monotonic_deadline: float) -> float:
    """asyncio's clock for a ``time.monotonic()`` instant (the loop's clock may differ)."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())
