"""The inference worker: the threads that run a model, one batch per thread at a time.

Each model gets its own inference threads (``TOME_INSTANCES``, default one), so batches never
wait behind the decoding threads or the event loop. Several threads may call the same model at
once: the weights are only read, and every batch runs under ``tome.merging(r=...)``, which keeps
the merge schedule and token bookkeeping in context variables of that call, never on the model.
On a CPU the threads split torch's intra-op threads between them: two single-threaded batches
side by side lose less to synchronisation, and to a core briefly taken by other work, than one
batch spread over both cores.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

import tome

from .models import LoadedModel


@dataclass(frozen=True)
class ItemOutput:
    """One image's share of a batch's output."""

    indices: list[int]
    """Class indices, best first (as many as the batch's largest top_k asked for)."""
    scores: list[float]
    source: torch.Tensor | None
    """[N_in] final token of every input token, when the batch traced sources."""


@dataclass(frozen=True)
class BatchOutput:
    items: list[ItemOutput]
    input_tokens: int
    token_counts: list[int]
    seconds: float
    """Wall time of the forward pass (including moving the batch to the device)."""

    @property
    def output_tokens(self) -> int:
        return self.token_counts[-1] if self.token_counts else self.input_tokens


class InjectedFault(RuntimeError):
    """Raised on purpose by the test-only TOME_TEST_FAIL_R setting."""


class InferenceWorker:
    """Owns one :class:`LoadedModel` and the ``instances`` threads that call it."""

    def __init__(self, model: LoadedModel, fail_r: int | None = None, instances: int = 1) -> None:
        self.model = model
        self._fail_r = fail_r
        torch_threads = max(1, torch.get_num_threads() // instances)
        self._thread = ThreadPoolExecutor(
            max_workers=instances,
            thread_name_prefix=f"infer-{model.name}",
            initializer=_use_torch_threads if model.device.type == "cpu" and instances > 1 else None,
            initargs=(torch_threads,),
        )

    async def run(self, r: int, inputs: list[torch.Tensor], top_k: int, trace_source: bool) -> BatchOutput:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self.forward, r, inputs, top_k, trace_source)

    def warm(self, batch_sizes: tuple[int, ...]) -> None:
        """Run dummy batches of every size at the default r (and one traced), so the first real
        requests do not pay for lazy initialisation; blocks until done."""
        shape = self.model.preprocessor.input_size
        calls = [(size, False) for size in batch_sizes] + [(1, True)]
        for size, trace in calls:
            inputs = [torch.zeros(shape, dtype=torch.uint8)] * size
            self._thread.submit(self.forward, self.model.default_r, inputs, 1, trace).result()

    def forward(self, r: int, inputs: list[torch.Tensor], top_k: int, trace_source: bool) -> BatchOutput:
        """Runs in the worker thread: one forward pass over the stacked batch."""
        if self._fail_r is not None and r == self._fail_r:
            raise InjectedFault(f"TOME_TEST_FAIL_R={self._fail_r}: this batch fails on purpose (tests only)")
        model = self.model
        started = time.perf_counter()
        with torch.inference_mode(), tome.merging(r=r, trace_source=trace_source) as info:
            pixels = torch.stack(inputs).to(device=model.device, non_blocking=True)
            batch = model.preprocessor.normalize(pixels, model.dtype)
            outputs = model.module(batch)
            indices, scores = _top_k(outputs, top_k if model.num_classes else 0)
            source = info.source.cpu() if trace_source and info.source is not None else None
        seconds = time.perf_counter() - started
        items = [
            ItemOutput(indices=indices[i], scores=scores[i], source=None if source is None else source[i])
            for i in range(len(inputs))
        ]
        return BatchOutput(items, info.input_tokens, list(info.token_counts), seconds)

    def close(self) -> None:
        self._thread.shutdown(wait=True)


def _use_torch_threads(count: int) -> None:
    torch.set_num_threads(count)


def _top_k(logits: torch.Tensor, k: int) -> tuple[list[list[int]], list[list[float]]]:
    if k <= 0:
        return [[] for _ in range(logits.shape[0])], [[] for _ in range(logits.shape[0])]
    probabilities = logits.float().softmax(dim=-1)
    scores, indices = probabilities.topk(min(k, probabilities.shape[-1]), dim=-1)
    return indices.cpu().tolist(), scores.cpu().tolist()
