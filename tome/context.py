"""Per-call settings and results, kept in context variables.

A context variable has one value per thread and per asyncio task, so two threads sharing one
patched model can merge with different r at the same time without seeing each other's state.
Nothing per-call is stored on the model or on this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from .schedule import RSpec


@dataclass
class MergeInfo:
    """What the last patched forward pass inside a :func:`merging` block did."""

    r: list[int] = field(default_factory=list)
    """The r each layer applied (after capping)."""
    input_tokens: int = 0
    """Tokens entering the first block, prefix tokens included."""
    token_counts: list[int] = field(default_factory=list)
    """Tokens left after each block."""
    sizes: torch.Tensor | None = None
    """[B, N_out] number of input tokens each final token stands for."""
    source: torch.Tensor | None = None
    """[B, N_in] index of the final token that each input token ended up in (with trace_source)."""

    @property
    def output_tokens(self) -> int:
        return self.token_counts[-1] if self.token_counts else self.input_tokens


@dataclass(frozen=True)
class _Request:
    r: RSpec | None
    trace_source: bool
    info: MergeInfo


@dataclass(frozen=True)
class FeatureSizes:
    """Token sizes of the features a forward_features call returned, for the pooling that follows."""

    shape: tuple[int, int]
    sizes: torch.Tensor | None


_request: ContextVar[_Request | None] = ContextVar("tome_request", default=None)
_last_features: ContextVar[FeatureSizes | None] = ContextVar("tome_last_features", default=None)


@contextmanager
def merging(r: RSpec | None = None, trace_source: bool = False) -> Iterator[MergeInfo]:
    """Override the merge schedule for patched-model calls made inside this block.

    ``r=None`` keeps each model's own ``model.r``. The override is visible only to the current
    thread or asyncio task. The yielded :class:`MergeInfo` is filled in by each call.
    """
    info = MergeInfo()
    token = _request.set(_Request(r=r, trace_source=trace_source, info=info))
    try:
        yield info
    finally:
        _request.reset(token)


def current_request() -> _Request | None:
    return _request.get()


def remember_features(x: torch.Tensor, sizes: torch.Tensor | None) -> None:
    _last_features.set(FeatureSizes(shape=(x.shape[0], x.shape[1]), sizes=sizes))


def sizes_for(x: torch.Tensor) -> torch.Tensor | None:
    """Sizes of the tokens in ``x`` if ``x`` came from this context's last forward_features call."""
    last = _last_features.get()
    if last is None or x.ndim != 3 or last.shape != (x.shape[0], x.shape[1]):
        return None
    return last.sizes
