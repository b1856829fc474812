"""What the server knows about one loaded model: its weights' source, r range and analytical cost.

The ToMe facts (input tokens, largest useful r, cost table) come from the library
(``tome.input_tokens``, ``tome.largest_useful_r``, ``tome.cost_table``), so the server, tome-eval
and tome-bench agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

import tome

from .images import Preprocessor
from .params import RLimits


@dataclass(frozen=True)
class LoadedModel:
    """A patched model and its description. Only its inference worker's thread calls ``module``."""

    name: str
    module: nn.Module
    weights: str
    device: torch.device
    dtype: torch.dtype
    preprocessor: Preprocessor
    labels: list[str]
    num_tokens: int
    """Tokens entering the first block, prefix tokens included."""
    limits: RLimits
    """The r it accepts, its default r and what r=auto may choose (params.py)."""
    costs: list[tome.RCost]
    """Analytical GMACs of every r up to its ceiling (``tome.cost_table``)."""
    notes: list[str] = field(default_factory=list)
    dtype_reason: str = "set explicitly"
    """Why the model runs in ``dtype`` (``--dtype auto`` names the hardware feature)."""

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def depth(self) -> int:
        return len(self.module.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.module.num_prefix_tokens)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.module.patch_embed.patch_size)

    def token_counts(self, r: int) -> list[int]:
        return tome.token_counts(self.num_tokens, self.depth, r, self.num_prefix_tokens)
