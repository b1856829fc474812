"""The state of one forward pass: token sizes, source map and token counts.

A fresh :class:`CallState` is made by every patched forward call and passed down to the blocks
explicitly, so it is never shared between calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .merge import bipartite_soft_matching, check_rule


@dataclass
class CallState:
    num_protected: int
    prop_attn: bool
    input_tokens: int
    rule: str = "tome"
    """The merge rule, one of tome.MERGE_RULES."""
    size: torch.Tensor | None = None
    """[B, N, 1] float32 token sizes; None while no token has been merged (all sizes are 1)."""
    bias: torch.Tensor | None = None
    """[B, 1, 1, N] proportional-attention bias log(size) in the activations' dtype, once per merge."""
    source: torch.Tensor | None = None
    """[B, N_in] current index of every input token; None unless traced."""
    applied_r: list[int] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)

    @classmethod
    def start(
        cls, x: torch.Tensor, num_protected: int, prop_attn: bool, trace_source: bool, rule: str = "tome"
    ) -> CallState:
        batch, num_tokens, _ = x.shape
        source = None
        if trace_source:
            source = torch.arange(num_tokens, device=x.device).expand(batch, -1)
        return cls(num_protected, prop_attn, num_tokens, check_rule(rule), source=source)

    def attn_bias(self) -> torch.Tensor | None:
        """Proportional attention: log(size) added to every key's logit. None means plain attention."""
        return self.bias

    def merge(self, x: torch.Tensor, metric: torch.Tensor, r: int) -> torch.Tensor:
        match = bipartite_soft_matching(metric, r, self.num_protected)
        x, self.size = match.merge_weighted(x, self.size, self.rule)
        if self.prop_attn:
            self.bias = self.size.log().to(x.dtype).view(x.shape[0], 1, 1, x.shape[1])
        if self.source is not None:
            self.source = match.follow(self.source)
        return x

    def record(self, num_tokens_before: int, x: torch.Tensor) -> None:
        self.applied_r.append(num_tokens_before - x.shape[1])
        self.token_counts.append(x.shape[1])

    def final_sizes(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is None:
            return torch.ones(x.shape[0], x.shape[1], device=x.device)
        return self.size[..., 0]
