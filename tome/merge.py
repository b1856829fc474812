"""Bipartite soft matching: decide once which tokens merge, then apply that decision to any tensor.

Token layout is ``[prefix | patches]``. The first ``num_protected`` tokens (class, distillation and
register tokens) are never merged and keep their positions. The remaining tokens are split into two
alternating sets A and B by their position in the whole sequence (even positions go to A), each A
token proposes one edge to its most similar B token (cosine similarity), and the ``r`` strongest
edges are merged. With one class token this is exactly the paper's partition, because the class token
sits at position 0 of A and is excluded there.

After a merge the order is ``[prefix | unmerged A tokens in their old order | all B tokens]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Match:
    """The outcome of one matching step, applicable to features, sizes and sources alike."""

    merge: Callable[[torch.Tensor], torch.Tensor]
    """``merge(x)`` sums ``x`` [B, N, C] over the tokens that merge, giving [B, N - r, C]."""
    follow: Callable[[torch.Tensor], torch.Tensor]
    """``follow(index)`` maps token positions [B, M] before the merge to positions after it."""


def max_merge(num_tokens: int, num_protected: int) -> int:
    """The largest r one layer may apply: half of the tokens that are allowed to merge."""
    return max(num_tokens - num_protected, 0) // 2


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_protected: int) -> Match:
    """Match the ``r`` most similar A->B token pairs of ``metric`` [B, N, C].

    ``r`` is capped at :func:`max_merge`. The returned ``merge`` and ``follow`` closures share one
    set of indices, so features, sizes and source maps stay consistent.
    """
    batch, num_tokens, _ = metric.shape
    r = min(r, max_merge(num_tokens, num_protected))
    device = metric.device
    first_a = num_protected + num_protected % 2  # A holds the even positions
    first_b = num_protected + 1 - num_protected % 2

    with torch.no_grad():
        unit = F.normalize(metric, dim=-1)
        scores = unit[:, first_a::2] @ unit[:, first_b::2].transpose(-1, -2)
        best_score, best_b = scores.max(dim=-1)
        order = best_score.argsort(dim=-1, descending=True, stable=True)
        src = order[:, :r]  # indices into A
        kept = order[:, r:].sort(dim=-1).values  # unmerged A, back in sequence order
        dst = best_b.gather(-1, src)  # indices into B

    num_kept, num_b = kept.shape[1], scores.shape[2]
    b_start = num_protected + num_kept
    num_out = b_start + num_b
    offsets = torch.arange(batch, device=device)[:, None]
    # Rows of the flattened [B * N, C] input that survive, in output order: prefix, kept A, all of B.
    survivors = torch.cat(
        [
            torch.arange(num_protected, device=device).expand(batch, -1),
            first_a + 2 * kept,
            torch.arange(first_b, num_tokens, 2, device=device).expand(batch, -1),
        ],
        dim=1,
    )
    survivor_rows = (survivors + offsets * num_tokens).view(-1)
    src_rows = (first_a + 2 * src + offsets * num_tokens).view(-1)
    dst_rows = (b_start + dst + offsets * num_out).view(-1)

    def merge(x: torch.Tensor) -> torch.Tensor:
        # index_select copies whole rows and index_add_ touches only r rows per image: both far
        # cheaper on CPU than a scatter over every token.
        rows = x.reshape(batch * num_tokens, x.shape[-1])
        out = rows.index_select(0, survivor_rows)
        out.index_add_(0, dst_rows, rows.index_select(0, src_rows))
        return out.view(batch, num_out, x.shape[-1])

    def follow(index: torch.Tensor) -> torch.Tensor:
        new_index = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
        new_index.scatter_(1, survivors, torch.arange(num_out, device=device).expand(batch, -1))
        new_index[:, first_a::2].scatter_(1, src, b_start + dst)
        return new_index.gather(1, index)

    return Match(merge=merge, follow=follow)


def merge_weighted(
    match: Match, x: torch.Tensor, size: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of merged tokens; returns the merged ``x`` and the new sizes.

    ``size`` is [B, N, 1] float32, or None while every size is 1. Sizes stay float32 whatever the
    dtype of ``x``: bfloat16 cannot count past 256 exactly.
    """
    if size is None:
        new_size = match.merge(torch.ones(*x.shape[:2], 1, device=x.device))
        return match.merge(x) / new_size.to(x.dtype), new_size
    new_size = match.merge(size)
    return match.merge(x * size.to(x.dtype)) / new_size.to(x.dtype), new_size
