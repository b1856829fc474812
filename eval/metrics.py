"""What changes as r grows: accuracy, top-1 agreement with r=0, and drift of the pre-logits features.

Agreement and cosine compare each image with the same image at r=0, so they need no labels.
Agreement needs a classifier: for a backbone (``num_classes=0``) the arg-max over feature channels
names no class, so it is reported as not defined and cosine is the measure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Outputs:
    """One batch's results at one r."""

    features: torch.Tensor
    """[B, C] pre-logits features (after pooling and the final norm), float32."""
    logits: torch.Tensor | None
    """[B, num_classes] float32, or None for a backbone."""

    @property
    def top1(self) -> torch.Tensor | None:
        return None if self.logits is None else self.logits.argmax(dim=-1)


def top_k_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """[B] bool: whether the label is among the ``k`` highest logits (k capped at the class count)."""
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1)


def cosine(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[B] cosine similarity of each image's features with its reference features."""
    return F.cosine_similarity(features, reference, dim=-1, eps=1e-12)


@dataclass
class Tally:
    """Running sums for one r (or one optimisation and r) over the whole folder."""

    images: int = 0
    labelled: int = 0
    top1_hits: int = 0
    top5_hits: int = 0
    agreeing: int = 0
    cosine_sum: float = 0.0
    cosine_min: float = float("inf")

    def add(self, out: Outputs, reference: Outputs, labels: torch.Tensor) -> None:
        self.images += out.features.shape[0]
        cos = cosine(out.features, reference.features)
        self.cosine_sum += float(cos.sum())
        self.cosine_min = min(self.cosine_min, float(cos.min()))
        if out.logits is None or reference.logits is None:
            return
        self.agreeing += int((out.top1 == reference.top1).sum())
        known = labels >= 0
        if known.any():
            self.labelled += int(known.sum())
            self.top1_hits += int(top_k_hits(out.logits[known], labels[known], 1).sum())
            self.top5_hits += int(top_k_hits(out.logits[known], labels[known], 5).sum())

    def summary(self, has_classifier: bool) -> Quality:
        def share(count: float, total: int) -> float | None:
            return count / total if total else None

        return Quality(
            images=self.images,
            top1=share(self.top1_hits, self.labelled),
            top5=share(self.top5_hits, self.labelled),
            agreement=share(self.agreeing, self.images) if has_classifier else None,
            cosine_mean=share(self.cosine_sum, self.images),
            cosine_min=self.cosine_min if self.images else None,
        )


@dataclass(frozen=True)
class Quality:
    """Fractions in [0, 1]; None where not defined (no labels, or no classifier)."""

    images: int
    top1: float | None
    top5: float | None
    agreement: float | None
    cosine_mean: float | None
    cosine_min: float | None
