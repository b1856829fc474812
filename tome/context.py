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

from .merge import check_rule
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
    merge: str | None = None


_request: ContextVar[_Request | None] = ContextVar("tome_request", default=None)


@contextmanager
def merging(
    r: RSpec | None = None, trace_source: bool = False, merge: str | None = None
) -> Iterator[MergeInfo]:
    """Override the merge schedule and rule for patched-model calls made inside this block.

    ``r=None`` keeps each model's own ``model.r``; ``merge`` (one of :data:`tome.MERGE_RULES`) picks
    how merged tokens combine, ``None`` keeping each model's own ``model.merge_rule``. An unknown
    rule raises ValueError here, before any call. The override is visible only to the current
    thread or asyncio task. The yielded :class:`MergeInfo` is filled in by each call.
    """
    if merge is not None:
        check_rule(merge)
    info = MergeInfo()
    token = _request.set(_Request(r=r, trace_source=trace_source, info=info, merge=merge))
    try:
        yield info
    finally:
        _request.reset(token)


def current_request() -> _Request | None:
    return _request.get()
