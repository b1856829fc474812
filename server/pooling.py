"""Image embeddings from a patched model's final features: the ways to pool them.

- ``model``: the model's own pooling and pre-logits head (timm's ``forward_head(pre_logits=True)``:
  class token, mean or MAP attention pooling, then ``fc_norm``); what a classifier's head sees.
- ``cls``: the class token of the final features (models that have one).
- ``mean``: the mean over patch tokens, each merged token weighted by the patches it holds, so it
  equals the mean over the input patches of the features they ended up in.
- ``patch``: dense features, one row per input patch ([H/p * W/p, D]): each patch gets the feature of
  the token it was merged into (ToMe's source map), so a merged model still answers at full resolution.

At r=0 each equals timm's own computation on the same input (tests/test_server_embeddings.py).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

Pooling = Literal["model", "cls", "mean", "patch"]
POOLINGS: tuple[str, ...] = get_args(Pooling)


def unavailable(module: nn.Module, pooling: str) -> str | None:
    """Why ``module`` cannot pool this way, or None when it can."""
    if pooling not in POOLINGS:
        return f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}"
    if pooling == "cls" and getattr(module, "cls_token", None) is None:
        return "pooling 'cls' needs a class token, and this model has none: use 'model', 'mean' or 'patch'"
    return None


def width(module: nn.Module, pooling: str) -> int:
    """The length of one embedding (of one patch's, for ``patch``)."""
    if pooling == "model":
        return int(getattr(module, "head_hidden_size", module.num_features))
    return int(module.embed_dim)


def finish(embeddings: torch.Tensor, dimensions: int | None, normalize: bool) -> torch.Tensor:
    """Truncate to ``dimensions`` (Matryoshka-style), then scale to unit length when ``normalize``."""
    if dimensions is not None:
        embeddings = embeddings[..., :dimensions]
    return torch.nn.functional.normalize(embeddings, dim=-1) if normalize else embeddings


def pool(
    module: nn.Module,
    features: torch.Tensor,
    pooling: str,
    pre_logits: torch.Tensor | None,
    source: torch.Tensor | None,
) -> torch.Tensor:
    """[B, D] (or [B, H/p * W/p, D] for ``patch``) float32 embeddings. ``features`` is what the patched
    ``forward_features`` returned (its token sizes travel with it), ``pre_logits`` the model's
    ``forward_head(features, pre_logits=True)``, ``source`` the source map of the call (``patch``)."""
    prefix = int(module.num_prefix_tokens)
    if pooling == "model":
        assert pre_logits is not None
        pooled = pre_logits
    elif pooling == "cls":
        pooled = features[:, 0]
    elif pooling == "mean":
        sizes = getattr(features, "tome_sizes", None)
        patches = features[:, prefix:]
        if sizes is None:
            pooled = patches.mean(dim=1)
        else:
            weights = sizes[:, prefix:, None].to(features.dtype)
            pooled = (patches * weights).sum(dim=1) / weights.sum(dim=1)
    else:
        assert source is not None, "patch pooling needs the source map (trace_source)"
        index = source[:, prefix:, None].expand(-1, -1, features.shape[-1])
        pooled = features.gather(1, index)
    return pooled.float()
