"""Bipartite soft matching: decide once which tokens merge, then apply that decision to any tensor.

Token layout is ``[prefix | patches]``. The first ``num_protected`` tokens (class, distillation and
register tokens) are never merged and keep their positions. The remaining tokens are split into two
alternating sets A and B by their position in the whole sequence (even positions go to A), each A
token proposes one edge to its most similar B token (cosine similarity), and the ``r`` strongest
edges are merged. With one class token this is exactly the paper's partition, because the class token
sits at position 0 of A and is excluded there.

After a merge the order is ``[prefix | unmerged A tokens in their old order | all B tokens]``.

Merge rules (:data:`MERGE_RULES`) decide what features a group of merged tokens becomes; the matching
is the same for all of them. ``"tome"`` is the paper's size-weighted mean. ``"mlerp"`` is Token Fusion's
norm-preserving merge (ToFu, Kim et al., WACV 2024): the same mean, rescaled to the largest norm among
the group's tokens, since averaging tokens that point in different directions shrinks the norm.

Speed: a merge runs once per layer on a few hundred tokens, so at small batches its cost is the number
of kernels it launches, not their arithmetic. Everything that depends only on the shapes (the rows of
the A, B and prefix tokens in the flattened batch) is built once per (batch, tokens, r, device) and
cached. Per call, the matching is a normalisation, one small matrix product, a max, two sorts of
about N/2 elements, three gathers and a concatenation; the weighted merge gathers the surviving rows
once and updates only the r merged rows per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

MERGE_RULES = ("tome", "mlerp")
"""The merge rules, the default first."""


def check_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`MERGE_RULES`, else ValueError naming the allowed ones."""
    if rule not in MERGE_RULES:
        allowed = ", ".join(repr(name) for name in MERGE_RULES)
        raise ValueError(f"unknown merge rule {rule!r}: use one of {allowed}")
    return rule


def max_merge(num_tokens: int, num_protected: int) -> int:
    """The largest r one layer may apply: half of the tokens that are allowed to merge."""
    return max(num_tokens - num_protected, 0) // 2


@dataclass(frozen=True)
class _Layout:
    """Index tensors of one merge step that depend only on its shapes."""

    first_a: int
    first_b: int
    num_out: int
    b_start: int
    a_rows: torch.Tensor
    """[B, Na] row of every A token in the flattened [B * N, C] input."""
    prefix_rows: torch.Tensor
    """[B, P] rows of the protected tokens."""
    b_rows: torch.Tensor
    """[B, Nb] rows of the B tokens."""
    dst_base: torch.Tensor
    """[B, 1] row of each image's first B token in the flattened [B * (N - r), C] output."""
    ones_src: torch.Tensor
    """[B * r, 1] float32 ones: the size of every merged token while no token has been merged."""


def _build_layout(batch: int, num_tokens: int, r: int, num_protected: int, device: torch.device) -> _Layout:
    first_a = num_protected + num_protected % 2  # A holds the even positions
    first_b = num_protected + 1 - num_protected % 2
    num_a = len(range(first_a, num_tokens, 2))
    num_out = num_tokens - r
    b_start = num_protected + num_a - r
    offsets = torch.arange(batch, device=device)[:, None]
    return _Layout(
        first_a=first_a,
        first_b=first_b,
        num_out=num_out,
        b_start=b_start,
        a_rows=torch.arange(first_a, num_tokens, 2, device=device) + offsets * num_tokens,
        prefix_rows=torch.arange(num_protected, device=device) + offsets * num_tokens,
        b_rows=torch.arange(first_b, num_tokens, 2, device=device) + offsets * num_tokens,
        dst_base=offsets * num_out + b_start,
        ones_src=torch.ones(batch * r, 1, device=device),
    )


@lru_cache(maxsize=1024)
def _cached_layout(batch: int, num_tokens: int, r: int, num_protected: int, device: torch.device) -> _Layout:
    # Normal tensors even when first asked for under inference_mode, so that later autograd calls
    # (training with merging) may save them for backward.
    with torch.inference_mode(False):
        return _build_layout(batch, num_tokens, r, num_protected, device)


def _layout(batch: int, num_tokens: int, r: int, num_protected: int, device: torch.device) -> _Layout:
    if torch.compiler.is_compiling():  # traced once into the graph as constants
        return _build_layout(batch, num_tokens, r, num_protected, device)
    return _cached_layout(batch, num_tokens, r, num_protected, device)


class Match:
    """The outcome of one matching step, applicable to features, sizes and sources alike."""

    def __init__(
        self,
        layout: _Layout,
        shape: tuple[int, int],
        survivor_rows: torch.Tensor,
        src_rows: torch.Tensor,
        dst_rows: torch.Tensor,
    ) -> None:
        self._layout = layout
        self._batch, self._num_tokens = shape
        self._survivor_rows = survivor_rows  # rows of the input that survive, in output order
        self._src_rows = src_rows  # rows of the input that merge away
        self._dst_rows = dst_rows  # rows of the output they merge into

    @property
    def num_out(self) -> int:
        return self._layout.num_out

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` [B, N, C] over the tokens that merge, giving [B, N - r, C]."""
        # index_select copies whole rows and index_add_ touches only the r merged rows per image: both
        # far cheaper on CPU than a scatter over every token.
        rows = x.reshape(self._batch * self._num_tokens, x.shape[-1])
        out = rows.index_select(0, self._survivor_rows)
        out.index_add_(0, self._dst_rows, rows.index_select(0, self._src_rows))
        return out.view(self._batch, self.num_out, x.shape[-1])

    def merge_weighted(
        self, x: torch.Tensor, size: torch.Tensor | None, rule: str = "tome"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge the tokens of ``x`` [B, N, C] by ``rule`` (see :data:`MERGE_RULES`).

        ``size`` is [B, N, 1] float32, None while every size is 1. Returns the merged ``x`` and the
        new sizes. Sizes are counted in float32 whatever the dtype of ``x`` (bfloat16 counts exactly
        only to 256); only the merged rows' shares are converted to the dtype of ``x``.

        Only the merged rows are computed: a token that absorbs others moves towards each of them by
        its share of the new size, ``x_dst += s_src * (x_src - x_dst) / s_new``, which is the
        size-weighted mean without weighting and unweighting every token. ``"mlerp"`` then rescales
        each merged row to the largest norm among the tokens merged into it, see :func:`restore_norms`.
        """
        check_rule(rule)
        batch, num_tokens, channels = x.shape
        rows = x.reshape(batch * num_tokens, channels)
        out = rows.index_select(0, self._survivor_rows)
        if size is None:
            new_size = torch.ones(batch * self.num_out, 1, device=x.device)
            src_size = self._layout.ones_src
        else:
            sizes = size.reshape(batch * num_tokens, 1)
            new_size = sizes.index_select(0, self._survivor_rows)
            src_size = sizes.index_select(0, self._src_rows)
        new_size.index_add_(0, self._dst_rows, src_size)
        share = src_size / new_size.index_select(0, self._dst_rows)
        src = rows.index_select(0, self._src_rows)
        dst = out.index_select(0, self._dst_rows)
        out.index_add_(0, self._dst_rows, (src - dst) * share.to(x.dtype))
        if rule == "mlerp":
            restore_norms(out, self._dst_rows, torch.maximum(_norms(src), _norms(dst)))
        return out.view(batch, self.num_out, channels), new_size.view(batch, self.num_out, 1)

    def follow(self, index: torch.Tensor) -> torch.Tensor:
        """Map token positions ``index`` [B, M] before the merge to positions after it."""
        batch, num_tokens = self._batch, self._num_tokens
        device = index.device
        local = self._survivor_rows.view(batch, -1) % num_tokens
        new_index = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
        new_index.scatter_(1, local, torch.arange(self.num_out, device=device).expand(batch, -1))
        src = self._src_rows.view(batch, -1) % num_tokens
        dst = self._dst_rows.view(batch, -1) % self.num_out
        new_index.scatter_(1, src, dst)
        return new_index.gather(1, index)


def _norms(rows: torch.Tensor) -> torch.Tensor:
    """[M] float32 Euclidean norm of each row of ``rows`` [M, C]."""
    return torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32)


def restore_norms(out: torch.Tensor, dst_rows: torch.Tensor, member_norms: torch.Tensor) -> None:
    """Rescale the merged rows ``out[dst_rows]`` in place to the largest of their members' norms.

    ``member_norms`` [M] holds, for each merge edge, the larger norm of its source and of its
    destination before the merge; a destination that absorbed several sources takes the largest of
    all of them (``scatter_reduce`` with ``amax``). The norm is that of the rows being merged, the
    block's hidden state (the residual stream), not of the keys that chose the pairs: the next
    LayerNorm hides the shrinkage from the branches, but the residual sum does not, so a shrunken
    token would be dominated by what later blocks add to it. A merged row of norm zero (tokens that
    cancel out) has no direction to rescale and stays zero.
    """
    peak = torch.zeros(out.shape[0], dtype=torch.float32, device=out.device)
    peak.scatter_reduce_(0, dst_rows, member_norms, reduce="amax")  # norms >= 0: the zeros never win
    merged = out.index_select(0, dst_rows)
    scale = peak.index_select(0, dst_rows) / _norms(merged).clamp_min(torch.finfo(torch.float32).tiny)
    # A destination listed several times gets the same row each time, so duplicates agree.
    out.index_copy_(0, dst_rows, merged * scale[:, None].to(out.dtype))


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_protected: int) -> Match:
    """Match the ``r`` most similar A->B token pairs of ``metric`` [B, N, C].

    ``r`` is capped at :func:`max_merge`. The returned :class:`Match` applies one set of indices to
    features, sizes and source maps, so they stay consistent.
    """
    batch, num_tokens, _ = metric.shape
    r = min(r, max_merge(num_tokens, num_protected))
    layout = _layout(batch, num_tokens, r, num_protected, metric.device)
    with torch.no_grad():
        unit = F.normalize(metric, dim=-1)
        scores = unit[:, layout.first_a :: 2] @ unit[:, layout.first_b :: 2].transpose(-1, -2)
        best_score, best_b = scores.max(dim=-1)
        # Stable, so that equal scores merge the earlier A token first.
        order = best_score.argsort(dim=-1, descending=True, stable=True)
        src = order[:, :r]  # indices into A
        kept = order[:, r:].sort(dim=-1).values  # unmerged A, back in sequence order
        dst = best_b.gather(-1, src)  # indices into B
        survivors = torch.cat([layout.prefix_rows, layout.a_rows.gather(1, kept), layout.b_rows], dim=1)
        src_rows = layout.a_rows.gather(1, src)
        dst_rows = dst + layout.dst_base
    return Match(layout, (batch, num_tokens), survivors.view(-1), src_rows.view(-1), dst_rows.view(-1))
