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

    merge: Callable[..., torch.Tensor]
    """``merge(x, mode="sum")`` reduces ``x`` [B, N, C] to [B, N - r, C]."""
    new_index: torch.Tensor
    """[B, N] LongTensor: the position each old token occupies (or was merged into) after the merge."""


def _partition(num_tokens: int, num_protected: int, device: torch.device):
    """Positions of the A and B tokens: alternating, protected tokens in neither."""
    positions = torch.arange(num_protected, num_tokens, device=device)
    is_a = positions % 2 == 0
    return positions[is_a], positions[~is_a]


def max_merge(num_tokens: int, num_protected: int) -> int:
    """The largest r one layer may apply: half of the tokens that are allowed to merge."""
    return max(num_tokens - num_protected, 0) // 2


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_protected: int) -> Match:
    """Match the ``r`` most similar A->B token pairs of ``metric`` [B, N, C].

    ``r`` is capped at :func:`max_merge`. The returned ``merge`` closure and ``new_index`` map
    share one set of indices, so features, sizes and source maps stay consistent.
    """
    batch, num_tokens, _ = metric.shape
    r = min(r, max_merge(num_tokens, num_protected))
    device = metric.device
    a_pos, b_pos = _partition(num_tokens, num_protected, device)

    with torch.no_grad():
        unit = F.normalize(metric, dim=-1)
        scores = unit[:, a_pos] @ unit[:, b_pos].transpose(-1, -2)
        best_score, best_b = scores.max(dim=-1)
        order = best_score.argsort(dim=-1, descending=True, stable=True)
        src = order[:, :r]  # indices into A
        kept = order[:, r:].sort(dim=-1).values  # unmerged A, back in sequence order
        dst = best_b.gather(-1, src)  # indices into B

    kept_pos = a_pos[kept]  # [B, n_kept] positions in the full sequence
    src_pos = a_pos[src]
    num_kept = kept.shape[1]

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        channels = x.shape[-1]
        prefix = x[:, :num_protected]
        unmerged = x.gather(1, kept_pos.unsqueeze(-1).expand(-1, -1, channels))
        merged_src = x.gather(1, src_pos.unsqueeze(-1).expand(-1, -1, channels))
        targets = x[:, b_pos].scatter_reduce(
            1, dst.unsqueeze(-1).expand(-1, -1, channels), merged_src, reduce=mode
        )
        return torch.cat([prefix, unmerged, targets], dim=1)

    new_index = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
    new_index[:, :num_protected] = torch.arange(num_protected, device=device)
    new_index.scatter_(
        1, kept_pos, torch.arange(num_protected, num_protected + num_kept, device=device).expand(batch, -1)
    )
    b_new = num_protected + num_kept
    new_index[:, b_pos] = torch.arange(b_new, b_new + b_pos.numel(), device=device)
    new_index.scatter_(1, src_pos, b_new + dst)
    return Match(merge=merge, new_index=new_index)


def merge_weighted(match: Match, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of merged tokens. ``size`` is [B, N, 1]; returns new ``x`` and ``size``."""
    x = match.merge(x * size, mode="sum")
    size = match.merge(size, mode="sum")
    return x / size, size


def merge_source(match: Match, source: torch.Tensor) -> torch.Tensor:
    """Follow each input token (``source`` [B, N_in] -> current index) through this merge."""
    return match.new_index.gather(1, source)
