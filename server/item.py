"""The types one image travels as: what the client wants, the item, and its result.

An image's request becomes one :class:`Item` when it is admitted: it carries the model's name, r (or
AUTO with its r=auto parameters), what to return, its arrival and deadline, and the future its
:class:`Result` is delivered to; its preprocessed pixels are added once its image is decoded, and it
is queued then. The result holds only this image's data.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from .auto import Waiting
from .params import AutoParams, RChoice

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Want:
    """What to compute for an image: its ``top_k`` predictions, its merge map and/or its embedding.

    ``top_k`` 0 asks for no predictions; None for the default (5, at most the number of classes);
    the query's text until the lane checks it (``params.top_k``) when the request is admitted."""

    top_k: int | str | None = 0
    merge_map: bool = False
    pooling: str | None = None
    """An embedding pooled this way (pooling.py); None for no embedding."""
    dimensions: int | None = None
    """Keep the embedding's first ``dimensions`` values (then normalise, with ``normalize``)."""
    normalize: bool = True
    """Scale the embedding (each patch's, for ``patch``) to unit length."""

    @property
    def fidelity_kind(self) -> str | None:
        """The fidelity kind a floor on this answer is judged in: cosine for an embedding, agreement
        for predictions; None (the model's own) for a merge map alone."""
        if self.pooling is not None:
            return "cosine"
        return "agreement" if self.top_k != 0 else None


class QueueKey(NamedTuple):
    """The queue an item waits in. Batches never mix keys, so every batch has one model and one
    r and therefore one static shape. The r and merge rule that a batch runs at are decided when
    the batch is formed (see ``batching.BatchQueue``); for a fixed r they are the key's."""

    model: str
    r: RChoice
    merge: str = "tome"
    """The merge rule (params.MERGE_RULES), or AUTO (r=auto requests that name none: the server
    chooses each batch's rule with its r). A batch runs one rule."""


@dataclass(eq=False)
class Item:
    """One image on its way through the queue."""

    model: str
    r: RChoice
    """A fixed r, or AUTO (the batch's r is chosen when the batch is formed)."""
    pixels: torch.Tensor | None
    """The resized, cropped uint8 [3, H, W] image the model will see; None until decoded."""
    want: Want
    arrived: float
    """``time.monotonic()`` when the request arrived; the deadline counts from here."""
    deadline: float
    future: asyncio.Future[Result]
    auto: AutoParams | None = None
    """An r=auto request's latency target and auto ceiling; None for a fixed r."""
    merge: str = "tome"
    """The merge rule it runs with, or AUTO: its batch's (r=auto naming no rule)."""
    enqueued_at: float = field(default_factory=time.monotonic)
    """When it joined its queue (set again by the queue)."""

    @property
    def waiting(self) -> Waiting | None:
        """What r=auto plans for: arrival, target and auto ceiling; None for a fixed r."""
        return None if self.auto is None else Waiting(self.arrived, self.auto.target_s, self.auto.max_r)

    @property
    def key(self) -> QueueKey:
        return QueueKey(self.model, self.r, self.merge)

    @property
    def live(self) -> bool:
        """Nobody has answered or given up on this item yet."""
        return not self.future.done()


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class Result:
    """One image's answer."""

    model: str
    weights: str
    r: int
    """The r the batch ran at (for r=auto: the one chosen)."""
    merge: str
    """The merge rule it ran with."""
    target_s: float | None
    """The latency target r=auto aimed at; None for a fixed r."""
    predictions: list[Prediction]
    """Best first; empty unless predictions were asked for."""
    merge_map_png: bytes | None
    """The merge map drawn over the model input, when asked for."""
    embedding: torch.Tensor | None
    """The float32 embedding ([D], or [patches, D] for ``patch`` pooling), when asked for."""
    input_tokens: int
    token_counts: list[int]
    """Tokens left after each block."""
    batch_size: int
    queue_s: float
    """Time in the queue, from enqueueing to the start of the batch."""
    inference_s: float
    """Forward-pass time of the batch (including moving it to the device)."""

    @property
    def output_tokens(self) -> int:
        return self.token_counts[-1] if self.token_counts else self.input_tokens
