"""``tome.patch``: check that a model can be merged correctly, then patch it in place."""

from __future__ import annotations

import torch.nn as nn
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from .layers import ToMeBlock
from .model import ToMeVisionTransformer, tome_class


class UnsupportedModelError(TypeError):
    """The model cannot be token-merged correctly, so it was left unchanged."""


_OWN_FORWARD = ("forward", "forward_features", "forward_intermediates", "pool")


def patch(model: nn.Module, *, prop_attn: bool = True) -> nn.Module:
    """Patch a timm ``VisionTransformer`` in place for Token Merging and return it.

    ``model.r`` (default 0: no merging) is the default schedule and ``model.merge_rule`` (default
    ``"tome"``, see :data:`tome.MERGE_RULES`) the default merge rule; ``tome.merging(r=...,
    merge=...)`` overrides them per call. ``prop_attn`` turns on proportional attention; switch it off
    for models trained without it that never saw merged tokens (for example MAE). Patching twice only
    updates ``prop_attn``. Raises :class:`UnsupportedModelError`, before changing anything, for
    models it cannot merge.
    """
    problems = _problems(model)
    if problems:
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot be patched for token merging: " + "; ".join(problems)
        )
    if not isinstance(model, ToMeVisionTransformer):
        for block in model.blocks:
            block.__class__ = ToMeBlock
        model.__class__ = tome_class(type(model))
        model.r = 0
        model.merge_rule = "tome"
    model.tome_prop_attn = prop_attn
    return model


def _problems(model: nn.Module) -> list[str]:
    if not isinstance(model, VisionTransformer):
        return [
            "only timm VisionTransformer models (ViT, DeiT, DeiT-III, DINOv2, CLIP, SigLIP, MAE) are "
            "supported; this is not one"
        ]
    problems = []
    for cls in type(model).__mro__:
        if cls is VisionTransformer or issubclass(cls, ToMeVisionTransformer):
            break
        overridden = sorted(set(_OWN_FORWARD) & set(vars(cls)))
        if overridden:
            problems.append(f"{cls.__name__} has its own {', '.join(overridden)}")
    for i, block in enumerate(model.blocks):
        if type(block) not in (Block, ToMeBlock):
            problems.append(f"block {i} is {type(block).__name__}, only timm's pre-norm Block is supported")
        elif type(block.attn) is not Attention:
            problems.append(f"block {i} uses {type(block.attn).__name__}, only timm's Attention is supported")
    if model.global_pool == "prr":
        problems.append("PRR attention pooling is not supported")
    if getattr(model.attn_pool, "pos_embed", None) is not None:
        problems.append("the attention-pooling head has its own position embedding, which needs every token")
    return problems
