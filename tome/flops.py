"""Analytical cost of a ViT forward pass, in GMACs (billions of multiply-accumulates).

The ToMe paper, like much of the ViT literature, calls this count "FLOPs"; it is the number of
multiply-accumulates, not twice it. The project names the unit GMACs everywhere: :func:`gmacs`, the
``gmacs`` field of :class:`RCost`, the server's ``/models`` and the tools' tables. :func:`flops` is
the old name of :func:`gmacs`, kept as a deprecated alias.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from .schedule import RSpec, input_tokens, largest_useful_r, token_counts


def _linear_macs(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _patch_macs(model: VisionTransformer, num_patches: int) -> int:
    conv = model.patch_embed.proj
    return num_patches * conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]


def _block_macs(block: nn.Module, tokens_in: int, tokens_out: int) -> int:
    attn = block.attn
    gate = getattr(attn, "gate", None)  # older timm releases have no gated attention
    projections = tokens_in * (_linear_macs(attn.qkv) + _linear_macs(attn.proj) + _linear_macs(gate))
    scores_and_mix = 2 * tokens_in * tokens_in * attn.num_heads * attn.head_dim  # Q @ K^T and softmax(..) @ V
    return projections + scores_and_mix + tokens_out * _linear_macs(block.mlp)


def _head_macs(model: VisionTransformer, tokens: int) -> int:
    macs = _linear_macs(model.head) + _linear_macs(getattr(model, "head_dist", None))
    pool = model.attn_pool
    if pool is not None and hasattr(pool, "kv"):
        latent = pool.latent_len
        macs += tokens * _linear_macs(pool.kv) + latent * (_linear_macs(pool.q) + _linear_macs(pool.proj))
        macs += 2 * latent * tokens * pool.kv.out_features // 2 + latent * _linear_macs(pool.mlp)
    return macs


def gmacs(model: VisionTransformer, r: RSpec = 0, img_size: tuple[int, int] | None = None) -> float:
    """GMACs (multiply-accumulates / 1e9) of one image's forward pass at merge schedule ``r``: patch
    embedding, every block's attention including Q@K^T and attention@V, MLPs and head; norms and the
    matching are ignored. ``img_size`` defaults to the model's own input size."""
    tokens = input_tokens(model, img_size)
    num_patches = tokens - model.num_prefix_tokens
    counts = token_counts(tokens, len(model.blocks), r, model.num_prefix_tokens)
    macs = _patch_macs(model, num_patches)
    for block, tokens_out in zip(model.blocks, counts, strict=True):
        macs += _block_macs(block, tokens, tokens_out)
        tokens = tokens_out
    pooled = tokens - (0 if model.pool_include_prefix else model.num_prefix_tokens)
    return (macs + _head_macs(model, pooled)) / 1e9


def flops(model: VisionTransformer, r: RSpec = 0, img_size: tuple[int, int] | None = None) -> float:
    """Deprecated name of :func:`gmacs` (the paper's "FLOPs" are multiply-accumulates)."""
    warnings.warn("tome.flops is renamed tome.gmacs (same value: GMACs)", DeprecationWarning, stacklevel=2)
    return gmacs(model, r, img_size)


@dataclass(frozen=True)
class RCost:
    """What one constant r costs and saves for one image."""

    r: int
    gmacs: float
    """Analytical GMACs per image (:func:`gmacs`)."""
    speedup: float
    """gmacs at r=0 divided by gmacs at this r: the speed-up to expect where compute is the bottleneck."""
    output_tokens: int
    """Tokens leaving the last block, prefix tokens included."""


def cost_table(model: VisionTransformer, r_values: Iterable[int] | None = None) -> list[RCost]:
    """The cost of each r in ``r_values`` (default: every r from 0 to :func:`largest_useful_r`)."""
    if r_values is None:
        r_values = range(largest_useful_r(model) + 1)
    tokens, depth, prefix = input_tokens(model), len(model.blocks), model.num_prefix_tokens
    base = gmacs(model, 0)
    rows = []
    for r in r_values:
        cost = gmacs(model, r)
        rows.append(RCost(r, cost, base / cost, token_counts(tokens, depth, r, prefix)[-1]))
    return rows
