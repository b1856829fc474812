"""What the server knows about one loaded model: its weights' source, r range and analytical cost."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

import tome

from .preprocess import Preprocessor


@dataclass(frozen=True)
class RCost:
    r: int
    gflops: float
    """Analytical GMACs per image (the unit the ToMe paper calls FLOPs)."""
    speedup: float
    """flops(r=0) / flops(r): the speed-up to expect where compute is the bottleneck."""
    output_tokens: int


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
    r_max: int
    default_r: int
    costs: list[RCost]
    notes: list[str] = field(default_factory=list)

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


def input_tokens(model: nn.Module) -> int:
    grid = model.patch_embed.grid_size
    return grid[0] * grid[1] + model.num_prefix_tokens


def largest_useful_r(model: nn.Module) -> int:
    """The smallest r whose output is down to the fewest tokens merging can leave.

    Larger r would still merge more in the early layers, but it cannot shrink the output further
    and the result is no longer a useful picture of the image (ViT-S/16 at 224 px: 24, where the
    cap of half the mergeable tokens per layer would allow up to 98).
    """
    tokens, depth, prefix = input_tokens(model), len(model.blocks), model.num_prefix_tokens
    floor = tome.token_counts(tokens, depth, tokens, prefix)[-1]
    r = 0
    while tome.token_counts(tokens, depth, r, prefix)[-1] != floor:
        r += 1
    return r


def r_costs(model: nn.Module, r_max: int) -> list[RCost]:
    """The cost of every r in [0, r_max], so clients can show the trade-off before asking."""
    tokens, depth, prefix = input_tokens(model), len(model.blocks), model.num_prefix_tokens
    base = tome.flops(model, r=0)
    costs = [RCost(0, base, 1.0, tokens)]
    for r in range(1, r_max + 1):
        gflops = tome.flops(model, r=r)
        counts = tome.token_counts(tokens, depth, r, prefix)
        costs.append(RCost(r, gflops, base / gflops, counts[-1]))
    return costs
