"""Analytical multiply-accumulate counts (the unit the ToMe paper calls FLOPs) of a ViT forward pass."""

from __future__ import annotations

import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from .schedule import RSpec, token_counts


def _linear_macs(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _patch_macs(model: VisionTransformer, num_patches: int) -> int:
    conv = model.patch_embed.proj
    return num_patches * conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]


def _block_macs(block: nn.Module, tokens_in: int, tokens_out: int) -> int:
    attn = block.attn
    projections = tokens_in * (_linear_macs(attn.qkv) + _linear_macs(attn.proj) + _linear_macs(attn.gate))
    scores_and_mix = 2 * tokens_in * tokens_in * attn.attn_dim  # Q @ K^T and softmax(..) @ V
    return projections + scores_and_mix + tokens_out * _linear_macs(block.mlp)


def _head_macs(model: VisionTransformer, tokens: int) -> int:
    macs = _linear_macs(model.head) + _linear_macs(getattr(model, "head_dist", None))
    pool = model.attn_pool
    if pool is not None and hasattr(pool, "kv"):
        latent = pool.latent_len
        macs += tokens * _linear_macs(pool.kv) + latent * (_linear_macs(pool.q) + _linear_macs(pool.proj))
        macs += 2 * latent * tokens * pool.kv.out_features // 2 + latent * _linear_macs(pool.mlp)
    return macs


def flops(model: VisionTransformer, r: RSpec = 0, img_size: tuple[int, int] | None = None) -> float:
    """GMACs of one image's forward pass at merge schedule ``r`` (patch embedding, every block's
    attention including Q@K^T and attention@V, MLPs and head; norms and the matching are ignored).
    ``img_size`` defaults to the model's own input size."""
    grid = model.patch_embed.dynamic_feat_size(img_size) if img_size else model.patch_embed.grid_size
    num_patches = grid[0] * grid[1]
    tokens = num_patches + model.num_prefix_tokens
    counts = token_counts(tokens, len(model.blocks), r, model.num_prefix_tokens)
    macs = _patch_macs(model, num_patches)
    for block, tokens_out in zip(model.blocks, counts, strict=True):
        macs += _block_macs(block, tokens, tokens_out)
        tokens = tokens_out
    pooled = tokens - (0 if model.pool_include_prefix else model.num_prefix_tokens)
    return (macs + _head_macs(model, pooled)) / 1e9
