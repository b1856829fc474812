"""Shadow runs: fidelity measured on live traffic, in spare capacity only.

A sampled share (TOME_SHADOW_RATE) of the images a model serves at r > 0 keep their pixels and their
answers at that r (``inference.Kept``). When their batch ends, the lane offers them here; they are run
again at r=0 (the same reference for every merge rule: r=0 merges nothing), one image at a time, and
compared (``fidelity.Comparison``) into the fidelity table of the rule their batch ran with, but only
while the model is idle: nothing queued, nothing on its way, no batch running, checked
before every image. Offered while busy, or still waiting when work arrives, they are dropped and
counted (``tome_shadow_runs_total{outcome="dropped"}``).

So shadow work never sheds a request (r=auto's admission does not see it) and never waits in front of
one that was already there; a request that arrives while a shadow image runs waits at most for that
one image at r=0.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence

import torch
from prometheus_client import Counter

from tome_runtime.fidelity import Comparison, FidelityTable, Outputs

from .inference import Kept

log = logging.getLogger(__name__)

RUN, DROPPED = "run", "dropped"

Reference = Callable[[list[torch.Tensor]], Awaitable[Outputs]]
"""Runs images at r=0 on an inference thread (``InferenceWorker.outputs_async`` at r=0)."""


class Shadow:
    def __init__(
        self,
        model: str,
        rate: float,
        tables: Mapping[str, FidelityTable],
        reference: Reference,
        busy: Callable[[], bool],
        runs: Counter,
        rng: random.Random | None = None,
    ) -> None:
        """``tables``: the model's fidelity table per merge rule; ``busy`` says whether the model has
        live work (queued, on its way or running); ``runs`` is the ``tome_shadow_runs_total`` counter
        (labels model, outcome)."""
        self.model, self.rate, self.tables = model, rate, tables
        self._reference, self._busy, self._runs = reference, busy, runs
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None

    def pick(self, r: int, size: int) -> frozenset[int]:
        """Which images of a batch of ``size`` at ``r`` to keep for a shadow run."""
        if r <= 0 or self.rate <= 0:
            return frozenset()
        return frozenset(i for i in range(size) if self._rng.random() < self.rate)

    def offer(self, r: int, merge: str, kept: Sequence[Kept]) -> None:
        """The batch at ``r`` with rule ``merge`` holding ``kept`` ended (on the event loop): run them
        now if idle, else drop."""
        if not kept:
            return
        if self._busy() or (self._task is not None and not self._task.done()):
            self._drop(len(kept))
            return
        self._task = asyncio.get_running_loop().create_task(self._run(r, self.tables[merge], list(kept)))

    async def _run(self, r: int, table: FidelityTable, kept: list[Kept]) -> None:
        for done, item in enumerate(kept):
            if self._busy():
                self._drop(len(kept) - done)
                return
            try:
                reference = await self._reference([item.pixels])
            except Exception:  # a failing model fails live batches loudly; shadow work just stops
                log.exception("shadow run of %s at r=0 failed", self.model)
                self._drop(len(kept) - done)
                return
            table.add(r, Comparison.of(reference, item.outputs), "shadow")
            self._runs.labels(self.model, RUN).inc()

    def _drop(self, count: int) -> None:
        self._runs.labels(self.model, DROPPED).inc(count)

    async def close(self) -> None:
        """Stop (shutting down): a shadow image already on an inference thread still finishes there."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
