"""Compiled execution of a patched model: one static-shape graph per (r, batch-size bucket).

Every call of a patched model with a given r and batch size has one static shape in every layer, so
each (r, bucket) cell compiles to one graph without dynamic shapes. A batch is padded up to the
smallest bucket that holds it (with copies of its last image; images never interact, so the real
rows come out as they would alone) and the outputs are sliced back::

    runner = tome.compiled.CompiledToMe(tome.patch(model), buckets=(1, 8, 32))
    report = runner.warmup(r_values=[0, 8, 16], budget_s=600)  # compile cells until the budget is spent
    logits = runner(images, r=8)  # compiled if the (8, bucket) cell is ready, else eager

Cells not compiled yet run eagerly (``tome.merging``), so a server can start answering before its
warm-up has finished or when the budget ran out; ``on_demand=True`` compiles a missing cell on its
first call instead (that call then takes as long as the compilation).

Compile time and caches. On a 2-vCPU AMD EPYC, a ViT-S/16 bfloat16 batch-1 cell compiled in 33 to
47 s with a cold cache (the README's Speed section has the figures). Inductor keeps its generated code in
``TORCHINDUCTOR_CACHE_DIR`` (default ``/tmp/torchinductor_<user>``); with its FX-graph and AOTAutograd
caches (on by default in recent torch), a restart that finds the directory skips code generation and
C++ compilation, and only Dynamo's tracing runs again. Point ``TORCHINDUCTOR_CACHE_DIR`` at a
persistent volume to keep them across container restarts; ``torch.compiler.save_cache_artifacts()`` /
``load_cache_artifacts()`` move them between machines.

On CUDA, ``mode="reduce-overhead"`` records each cell as a CUDA graph, which the static buckets make
possible; outputs are then cloned before they are returned, because the next replay overwrites them.
GPU figures have not been measured in this project (no GPU was lent).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch._dynamo.config as dynamo_config
import torch.nn as nn

from .context import merging
from .model import ToMeVisionTransformer


@dataclass
class WarmupReport:
    compiled: dict[tuple[int, int], float] = field(default_factory=dict)
    """Seconds each (r, bucket) cell took to compile and run once."""
    skipped: list[tuple[int, int]] = field(default_factory=list)
    """Cells left eager because the budget was spent."""


class CompiledToMe:
    """Run a :func:`tome.patch`-ed model compiled per (r, batch-size bucket), eager where not yet.

    ``buckets``: the batch sizes graphs are built for; a larger batch is split into chunks of the
    largest bucket. ``backend``/``mode``/``options`` go to ``torch.compile`` (``dynamic=False``,
    ``fullgraph=True``). Calls run under ``torch.inference_mode``; the model must not change
    (weights, dtype, device) after cells are compiled.
    """

    def __init__(
        self,
        model: nn.Module,
        buckets: Sequence[int] = (1, 2, 4, 8, 16, 32),
        *,
        backend: str | Callable = "inductor",
        mode: str | None = None,
        options: dict | None = None,
        on_demand: bool = False,
    ) -> None:
        if not isinstance(model, ToMeVisionTransformer):
            raise TypeError("CompiledToMe needs a model patched with tome.patch")
        if not buckets or any(b < 1 for b in buckets):
            raise ValueError(f"buckets must be positive batch sizes, got {buckets!r}")
        self.model = model
        self.buckets = tuple(sorted(set(buckets)))
        self.on_demand = on_demand
        self._compile_kwargs = dict(
            backend=backend, mode=mode, options=options, dynamic=False, fullgraph=True
        )
        self._clone_outputs = mode is not None and "reduce-overhead" in mode
        self._cells: dict[tuple[int, int], Callable[[torch.Tensor], torch.Tensor]] = {}
        self._lock = threading.Lock()

    def bucket_for(self, batch: int) -> int:
        """The smallest bucket that holds ``batch`` images (the largest bucket for larger batches)."""
        return next((b for b in self.buckets if b >= batch), self.buckets[-1])

    def is_compiled(self, r: int, bucket: int) -> bool:
        return (r, bucket) in self._cells

    def compile_cell(self, r: int, bucket: int, example: torch.Tensor) -> float:
        """Compile the (r, bucket) cell now, traced with ``example`` [bucket, 3, H, W]; returns seconds."""
        if example.shape[0] != bucket:
            raise ValueError(f"the example batch has {example.shape[0]} images, the bucket {bucket}")
        start = time.perf_counter()
        with self._lock:
            if (r, bucket) in self._cells:
                return 0.0
            model = self.model

            def forward(x: torch.Tensor) -> torch.Tensor:
                return model.tome_forward(x, r)

            # Every cell is one more graph of the same code: let Dynamo keep them all.
            cells = len(self._cells) + 1
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, cells)
            dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, cells)
            compiled = torch.compile(forward, **self._compile_kwargs)
            with torch.inference_mode():
                compiled(_as_input(example, bucket))  # compiles
            self._cells[(r, bucket)] = compiled
        return time.perf_counter() - start

    def warmup(
        self,
        r_values: Iterable[int],
        budget_s: float | None = None,
        buckets: Iterable[int] | None = None,
        image_shape: tuple[int, int, int] | None = None,
    ) -> WarmupReport:
        """Compile cells in order (every r for the smallest bucket first) until ``budget_s`` is spent.

        The budget is checked before each cell, so the last cell may overrun it by one compilation.
        """
        report = WarmupReport()
        param = next(self.model.parameters())
        shape = image_shape or (self.model.patch_embed.proj.in_channels, *self.model.patch_embed.img_size)
        start = time.perf_counter()
        r_values = list(r_values)
        for bucket in self.buckets if buckets is None else sorted(buckets):
            for r in r_values:
                if budget_s is not None and time.perf_counter() - start >= budget_s:
                    report.skipped.append((r, bucket))
                    continue
                example = torch.randn(bucket, *shape, device=param.device, dtype=param.dtype)
                report.compiled[(r, bucket)] = self.compile_cell(r, bucket, example)
        return report

    def __call__(self, x: torch.Tensor, r: int) -> torch.Tensor:
        """The patched model's output for ``x`` [B, 3, H, W] at constant ``r``, any B."""
        largest = self.buckets[-1]
        if x.shape[0] > largest:
            return torch.cat([self(chunk, r) for chunk in x.split(largest)])
        batch = x.shape[0]
        bucket = self.bucket_for(batch)
        cell = self._cells.get((r, bucket))
        if cell is None and self.on_demand:
            self.compile_cell(r, bucket, x if batch == bucket else _as_input(x, bucket))
            cell = self._cells[(r, bucket)]
        if cell is None:
            with torch.inference_mode(), merging(r=r):
                return self.model(x)
        with torch.inference_mode():
            out = cell(_as_input(x, bucket))
        out = out[:batch]
        return out.clone() if self._clone_outputs else out


def _as_input(x: torch.Tensor, bucket: int) -> torch.Tensor:
    """``x`` padded to ``bucket`` images with copies of its last one, as an inference tensor.

    Always an inference tensor (one copy of the images), because Dynamo's guards tell inference
    tensors from normal ones and would otherwise compile every cell twice.
    """
    with torch.inference_mode():
        if x.shape[0] < bucket:
            return torch.cat([x, x[-1:].expand(bucket - x.shape[0], *x.shape[1:])])
        return x if x.is_inference() else x.clone()
