"""The types one image travels as: what the client wants, the queued item, and its result.

A request becomes exactly one :class:`Item` once its image is decoded: it carries the model's name,
r, the preprocessed pixels, what to return, its arrival and deadline, and the future its
:class:`Result` is delivered to. The result holds only this image's data.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:
    import torch

    from .controller import Waiting

AUTO: Literal["auto"] = "auto"
"""The r of an r=auto request and of its queue's key: the batch's r is chosen when it is formed."""


@dataclass(frozen=True)
class Want:
    """What to compute for an image: its ``top_k`` predictions and/or its merge map.

    ``top_k`` 0 asks for no predictions; None for the default (5, at most the number of classes),
    which the service resolves before the item is queued."""

    top_k: int | None = 0
    merge_map: bool = False


class QueueKey(NamedTuple):
    """The queue an item waits in. Batches never mix keys, so every batch has one model and one
    r and therefore one static shape. The r that a batch runs at is decided when the batch is
    formed (see ``batching.BatchQueue``); for a fixed r it is the key's r."""

    model: str
    r: int | Literal["auto"]


@dataclass(eq=False)
class Item:
    """One image on its way through the queue."""

    model: str
    r: int | Literal["auto"]
    """A fixed r, or AUTO (the batch's r is chosen when the batch is formed)."""
    pixels: torch.Tensor
    """The resized, cropped uint8 [3, H, W] image the model will see."""
    want: Want
    arrived: float
    """``time.monotonic()`` when the request arrived; the deadline counts from here."""
    deadline: float
    future: asyncio.Future[Result]
    enqueued_at: float = field(default_factory=time.monotonic)
    waiting: Waiting | None = None
    """An r=auto request's arrival, latency target and floor, for the controller; None for fixed r."""

    @property
    def key(self) -> QueueKey:
        return QueueKey(self.model, self.r)

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
    predictions: list[Prediction]
    """Best first; empty unless predictions were asked for."""
    merge_map_png: bytes | None
    """The merge map drawn over the model input, when asked for."""
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
