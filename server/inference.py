"""The inference worker: runs a formed batch through the patched model and answers each item.

Each model gets its own inference threads (``TOME_INSTANCES``), so batches never wait behind
the decoding threads or the event loop. Several threads may call the same model at
once: the weights are only read, and every batch runs under ``tome.merging(r=...)``, which keeps
the merge schedule and token bookkeeping in context variables of that call, never on the model.
On a CPU the threads split torch's intra-op threads between them: two single-threaded batches
side by side lose less to synchronisation, and to a core briefly taken by other work, than one
batch spread over both cores. Where one instance does take every core, :class:`ForwardGate` keeps
the decoding out of its forward passes.

A batch's thread also draws the merge maps its items asked for, so the pixels never travel back
up; each item's future gets a :class:`~.item.Result` holding only its own image's data.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

import tome
from tome_runtime.fidelity import Outputs

from . import pooling
from .batching import Batch
from .errors import BatchFailed
from .item import Prediction, Result, Want
from .loading import LoadedModel
from .metrics import Metrics
from .params import AUTO

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Forward:
    """What one forward pass over a batch gave."""

    logits: torch.Tensor | None
    """None unless predictions were asked for."""
    embeddings: dict[str, torch.Tensor]
    """Per pooling asked for, the batch's embeddings (on the CPU)."""
    info: tome.MergeInfo
    seconds: float


@dataclass(frozen=True)
class Kept:
    """An image of a live batch kept for a shadow run: its pixels and its answers at the batch's r."""

    pixels: torch.Tensor
    outputs: Outputs


class BatchObserver(Protocol):
    """Told when a batch's forward pass starts (in the inference thread) and how long it took
    (None if it raised): r=auto's backlog and timing table follow every batch this way
    (``auto.BatchTicket``)."""

    def started(self) -> None: ...

    def finished(self, seconds: float | None) -> None: ...


class ForwardGate:
    """Lets decoding wait while a forward pass runs, where one instance's torch threads take
    every core (``ThreadPlan.decode_between_batches``).

    Such a pass is an OpenMP team that synchronises at every kernel, hundreds of times per batch:
    a decode that takes one of its cores for a moment stalls the whole team meanwhile, so the same
    decode costs less between batches than beside them. A decode waits at most ``max_wait_s``
    (the passes of several models may follow each other without a gap). With ``hold`` False
    nothing ever waits."""

    def __init__(self, hold: bool, max_wait_s: float = 1.0) -> None:
        self.hold = hold
        self._max_wait_s = max_wait_s
        self._lock = threading.Lock()
        self._running = 0
        self._idle = threading.Event()
        self._idle.set()

    @contextmanager
    def forward(self) -> Iterator[None]:
        """Around a forward pass (in an inference thread)."""
        if not self.hold:
            yield
            return
        with self._lock:
            self._running += 1
            self._idle.clear()
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                if not self._running:
                    self._idle.set()

    def wait(self) -> None:
        """Before decoding (in a decoding thread): until no forward pass runs, or the wait is up."""
        if self.hold:
            self._idle.wait(self._max_wait_s)


class InferenceWorker:
    """Owns one :class:`LoadedModel` and the ``instances`` threads that call it."""

    def __init__(
        self,
        model: LoadedModel,
        metrics: Metrics,
        instances: int = 1,
        torch_threads: int | None = None,
        gate: ForwardGate | None = None,
    ) -> None:
        self.model = model
        self._metrics = metrics
        self._gate = gate or ForwardGate(hold=False)
        self.instances = instances
        self.torch_threads = torch_threads or max(1, torch.get_num_threads() // instances)
        # Each thread sets its own torch thread count (OpenMP's is per thread) and so owns its
        # own OpenMP team; torch never runs in the decoding threads.
        self._threads = ThreadPoolExecutor(
            max_workers=instances,
            thread_name_prefix=f"infer-{model.name}",
            initializer=_use_torch_threads if model.device.type == "cpu" else None,
            initargs=(self.torch_threads,),
        )

    async def run(
        self, batch: Batch, observer: BatchObserver | None = None, keep: frozenset[int] = frozenset()
    ) -> list[Kept]:
        """Compute ``batch`` in an inference thread and resolve each live item's future; return the
        items at the positions in ``keep`` with their answers (for shadow runs)."""
        loop = asyncio.get_running_loop()
        try:
            results, kept = await loop.run_in_executor(self._threads, self._compute, batch, observer, keep)
        except Exception as exc:  # one failed batch fails its items only; the loop goes on
            log.exception("batch of %d for %s at r=%d failed", len(batch.items), self.model.name, batch.r)
            for item in batch.items:
                if item.live:
                    item.future.set_exception(BatchFailed(f"{type(exc).__name__}: {exc}"))
            return []
        for item, result in zip(batch.items, results, strict=True):
            if item.live:  # its caller may have given up meanwhile
                item.future.set_result(result)
        first = results[0]
        self._metrics.observe_batch(
            self.model.name,
            batch.r,
            [result.queue_s for result in results],
            first.inference_s,
            first.input_tokens - first.output_tokens,
            batch.merge,
        )
        return kept

    def _compute(
        self, batch: Batch, observer: BatchObserver | None = None, keep: frozenset[int] = frozenset()
    ) -> tuple[list[Result], list[Kept]]:
        """Runs in an inference thread."""
        model, items = self.model, batch.items
        top_k = max(item.want.top_k for item in items) if model.num_classes else 0
        poolings = {item.want.pooling for item in items} - {None} | ({"model"} if keep else set())
        trace = any(item.want.merge_map for item in items) or "patch" in poolings
        logits = top_k > 0 or bool(keep and model.num_classes)
        if observer is not None:
            observer.started()
        try:
            pixels = [item.pixels for item in items]
            out = self._forward(batch.r, pixels, trace, logits, poolings, batch.merge)
        except BaseException:
            if observer is not None:
                observer.finished(None)
            raise
        if observer is not None:
            observer.finished(out.seconds)
        indices, scores = _top_k(out.logits, top_k) if top_k else ([[]] * len(items), [[]] * len(items))
        results = []
        for i, item in enumerate(items):
            k = item.want.top_k
            predictions = [
                Prediction(index, model.labels[index], score)
                for index, score in zip(indices[i][:k], scores[i][:k], strict=True)
            ]
            png = None
            if item.want.merge_map and out.info.source is not None:
                png = merge_map_png(item.pixels, out.info.source[i].cpu(), model.patch_size)
            results.append(
                Result(
                    model=model.name,
                    weights=model.weights,
                    r=batch.r,
                    merge=batch.merge,
                    target_s=None if item.auto is None else item.auto.target_s,
                    predictions=predictions,
                    merge_map_png=png,
                    embedding=_embedding(out, item.want, i),
                    input_tokens=out.info.input_tokens,
                    token_counts=list(out.info.token_counts),
                    batch_size=len(items),
                    queue_s=batch.started_at - item.enqueued_at,
                    inference_s=out.seconds,
                )
            )
        return results, [Kept(items[i].pixels, self._outputs_of(out).row(i)) for i in sorted(keep)]

    @staticmethod
    def _outputs_of(out: _Forward) -> Outputs:
        logits = None if out.logits is None else out.logits.float().cpu()
        return Outputs(logits, out.embeddings["model"])

    def _forward(
        self,
        r: int,
        pixels: list[torch.Tensor],
        trace_source: bool,
        logits: bool = True,
        poolings: set[str] | frozenset[str] = frozenset(),
        merge: str | None = None,
    ) -> _Forward:
        """One forward pass over ``pixels`` at ``r``: the logits (the model's ``forward`` is
        ``head(forward_head(forward_features(x), pre_logits=True))``) and the embeddings pooled each
        way in ``poolings``, merging with rule ``merge`` (None: the model's default, ``merge_rule``)."""
        model, module = self.model, self.model.module
        started = time.perf_counter()
        merging = tome.merging(r=r, trace_source=trace_source, merge=merge)
        with self._gate.forward(), torch.inference_mode(), merging as info:
            batch = torch.stack(pixels).to(device=model.device, non_blocking=True)
            features = module.forward_features(model.preprocessor.normalize(batch, model.dtype))
            pre_logits = (
                module.forward_head(features, pre_logits=True) if logits or "model" in poolings else None
            )
            out = module.head(pre_logits) if logits else None
            embeddings = {
                p: pooling.pool(module, features, p, pre_logits, info.source).cpu() for p in poolings
            }
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
        return _Forward(out, embeddings, info, time.perf_counter() - started)

    def warm(self, batch_sizes: tuple[int, ...]) -> None:
        """Run dummy batches of every size at the default r (0 for auto; and one traced at an r > 0), so
        the first real requests do not pay for lazy initialisation; blocks until done.

        Each size is needed: a shape's first batch builds its kernels (bfloat16 on an AMX CPU: a first
        batch of 8 after one of 1 took 570 ms against 295 ms, and a first batch of 1 after one of 8
        about 12 ms more than the next). At r=0 a traced batch is the untraced one (nothing merges),
        so it would only run batch 1 twice."""
        shape = self.model.preprocessor.input_size
        r = 0 if self.model.limits.default == AUTO else self.model.limits.default
        plan = [([torch.zeros(shape, dtype=torch.uint8)] * size, False) for size in batch_sizes]
        if r > 0:
            plan.append(([torch.zeros(shape, dtype=torch.uint8)], True))
        # Every instance's thread warms (a barrier keeps one thread from taking two turns), so
        # each thread's OpenMP team and lazily built kernels exist before the first request.
        barrier = threading.Barrier(self.instances)

        def warm_one() -> None:
            barrier.wait(timeout=600)
            for pixels, trace in plan:
                self._forward(r, pixels, trace)

        for future in [self._threads.submit(warm_one) for _ in range(self.instances)]:
            future.result()

    def time_batch(self, r: int, batch_size: int, merge: str | None = None) -> float:
        """Forward seconds of one dummy batch at ``r`` with rule ``merge`` (None: the model's default)
        on an inference thread (r=auto's cost table warm-up, so it measures with the threads' own
        torch thread count); blocks until done."""
        pixels = [torch.zeros(self.model.preprocessor.input_size, dtype=torch.uint8)] * batch_size
        return self._threads.submit(self._forward, r, pixels, False, merge=merge).result().seconds

    def outputs(self, r: int, pixels: list[torch.Tensor], merge: str | None = None) -> Outputs:
        """The logits and pooled "model" embedding of ``pixels`` at ``r`` with rule ``merge``, computed
        on an inference thread (fidelity calibration); blocks until done. No metrics: no request asked
        for it."""
        return self._threads.submit(self._outputs, r, pixels, merge).result()

    async def outputs_async(self, r: int, pixels: list[torch.Tensor]) -> Outputs:
        """:meth:`outputs` from the event loop (shadow runs, at r=0: the same for every rule)."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, self._outputs, r, pixels)

    def _outputs(self, r: int, pixels: list[torch.Tensor], merge: str | None = None) -> Outputs:
        out = self._forward(r, pixels, False, bool(self.model.num_classes), {"model"}, merge)
        return self._outputs_of(out)

    def close(self) -> None:
        self._threads.shutdown(wait=True)


def _embedding(out: _Forward, want: Want, index: int) -> torch.Tensor | None:
    if want.pooling is None:
        return None
    return pooling.finish(out.embeddings[want.pooling][index], want.dimensions, want.normalize)


def _use_torch_threads(count: int) -> None:
    torch.set_num_threads(count)


def _top_k(logits: torch.Tensor, k: int) -> tuple[list[list[int]], list[list[float]]]:
    if k <= 0:
        return [[] for _ in range(logits.shape[0])], [[] for _ in range(logits.shape[0])]
    probabilities = logits.float().softmax(dim=-1)
    scores, indices = probabilities.topk(min(k, probabilities.shape[-1]), dim=-1)
    return indices.cpu().tolist(), scores.cpu().tolist()


def merge_map_png(pixels: torch.Tensor, source: torch.Tensor, patch_size: tuple[int, int]) -> bytes:
    """Draw which patches of ``pixels`` (the resized, cropped uint8 [3, H, W] model input) merged
    into which token; ``source`` is the final token of every input token."""
    image = tome.visualize(pixels.permute(1, 2, 0).numpy(), source, patch_size)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
