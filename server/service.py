"""The inference service: loaded models, their workers, the (model, r) batcher and the thread pool
for decoding. It holds everything a request needs and nothing of any one request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum

import torch

from .batching import Batcher, BatchPolicy, Job
from .config import Settings
from .decode import decode_image
from .inference import BatchOutput, InferenceWorker, ItemOutput
from .loading import StartupError, load_model
from .metrics import Metrics
from .models import LoadedModel
from .render import merge_map_png

log = logging.getLogger(__name__)

Key = tuple[str, int]
"""(model name, r): the batching key. Batches never mix models or r."""

Loader = Callable[[str, Settings], LoadedModel]


class Phase(StrEnum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass(frozen=True)
class Work:
    """One queued image."""

    model_input: torch.Tensor
    top_k: int
    trace_source: bool


@dataclass(frozen=True)
class Answer:
    item: ItemOutput
    batch: BatchOutput


class InferenceService:
    def __init__(self, settings: Settings, metrics: Metrics, loader: Loader = load_model) -> None:
        self.settings = settings
        self.metrics = metrics
        self.phase = Phase.LOADING
        self.failure: str | None = None
        self.workers: dict[str, InferenceWorker] = {}
        self._loader = loader
        policy = BatchPolicy(
            settings.max_batch_size, settings.max_delay_s, settings.max_queue, max_running=settings.instances
        )
        self.batcher: Batcher[Key, Work, Answer] = Batcher(policy, self._run_batch, self._record_depth)
        self._prepare_pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="prepare")

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
            info = self.metrics.model_info
            info.labels(model.name, model.weights, str(model.device), model.dtype_name).set(1)
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY
            log.info("ready: %s", ", ".join(f"{w.model.name} ({w.model.weights})" for w in workers.values()))

    def _load_all(self) -> dict[str, InferenceWorker]:
        workers: dict[str, InferenceWorker] = {}
        sizes = tuple(sorted({1, self.settings.max_batch_size}))
        for name in self.settings.model_names:
            log.info("loading %s (weights: %s)", name, self.settings.weights)
            model = self._loader(name, self.settings)
            worker = InferenceWorker(model, self.settings.test_fail_r, self.settings.instances)
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
        self._prepare_pool.shutdown(wait=True)

    # -- per request -------------------------------------------------------------------------------

    def model(self, name: str | None) -> LoadedModel | None:
        """The model called ``name`` (the default model for None), or None if none is loaded so."""
        if name is None:
            name = self.settings.model_names[0]
        worker = self.workers.get(name)
        return worker.model if worker else None

    async def prepare(self, model: LoadedModel, data: bytes) -> torch.Tensor:
        """Decode and preprocess off the event loop; raises decode.ImageError for bad images."""

        def work() -> torch.Tensor:
            return model.preprocessor(decode_image(data, self.settings.max_pixels))

        return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, work)

    async def render(self, model: LoadedModel, model_input: torch.Tensor, source: torch.Tensor) -> bytes:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prepare_pool, merge_map_png, model, model_input, source)

    def submit(self, key: Key, work: Work, deadline: float) -> Job[Work, Answer]:
        return self.batcher.submit(key, work, deadline)

    # -- batches -----------------------------------------------------------------------------------

    async def _run_batch(self, key: Key, jobs: list[Job[Work, Answer]]) -> list[Answer]:
        name, r = key
        output = await self.workers[name].run(
            r,
            [job.payload.model_input for job in jobs],
            top_k=max(job.payload.top_k for job in jobs),
            trace_source=any(job.payload.trace_source for job in jobs),
        )
        self._record_batch(key, jobs, output)
        return [Answer(item, output) for item in output.items]

    def _record_batch(self, key: Key, jobs: list[Job[Work, Answer]], output: BatchOutput) -> None:
        labels = (key[0], str(key[1]))
        metrics = self.metrics
        metrics.batch_size.labels(*labels).observe(len(jobs))
        metrics.inference.labels(*labels).observe(output.seconds)
        for job in jobs:
            metrics.queue_wait.labels(*labels).observe((job.started_at or job.enqueued_at) - job.enqueued_at)
        metrics.images.labels(*labels).inc(len(jobs))
        metrics.tokens_merged.labels(*labels).inc(len(jobs) * (output.input_tokens - output.output_tokens))

    def _record_depth(self, key: Key, depth: int) -> None:
        self.metrics.queue_depth.labels(key[0], str(key[1])).set(depth)
