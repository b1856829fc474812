"""A plain, unfused, one-image-at-a-time implementation of the ToMe paper's algorithm.

It shares no code with the tome package: it uses only the model's weights (linear layers, norms,
layer scales) and writes out attention, matching, merging and pooling with explicit softmax and
Python loops, so the tests can compare the optimised library against it.

``rule="mlerp"`` replaces the paper's merge by Token Fusion's norm-preserving one (ToFu, Kim et al.,
WACV 2024), written out group by group: each merged token is its group's size-weighted mean, rescaled
to the largest norm among the tokens of the group.
"""

from __future__ import annotations

import math

import torch


def _attention(
    attn, x: torch.Tensor, size: torch.Tensor, prop_attn: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    n, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(n, 3, heads, head_dim).permute(1, 2, 0, 3)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
    if prop_attn:
        logits = logits + size.log()[None, None, :]
    out = torch.softmax(logits, dim=-1) @ v
    out = out.permute(1, 0, 2).reshape(n, heads * head_dim)
    out = attn.norm(out)
    gate = getattr(attn, "gate", None)  # timm releases before gated attention lack the attribute
    if gate is not None:
        out = out * gate(x).sigmoid()
    return attn.proj(out), k.mean(dim=0)


def _mlerp(members: list[torch.Tensor], mean: torch.Tensor) -> torch.Tensor:
    """``mean`` rescaled to the largest norm of the ``members`` it was averaged from."""
    if len(members) == 1:
        return mean
    largest = max(float(member.norm()) for member in members)
    norm = float(mean.norm())
    return mean if norm == 0.0 else mean * (largest / norm)


def _merge(
    x: torch.Tensor,
    size: torch.Tensor,
    source: list[int],
    metric: torch.Tensor,
    r: int,
    protected: int,
    rule: str = "tome",
):
    n = x.shape[0]
    r = min(r, (n - protected) // 2)
    if r <= 0:
        return x, size, source
    a_set = [i for i in range(protected, n) if i % 2 == 0]
    b_set = [i for i in range(protected, n) if i % 2 == 1]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    edges = []  # (score, a, best b)
    for a in a_set:
        sims = [float(unit[a] @ unit[b]) for b in b_set]
        best = max(range(len(b_set)), key=lambda j: (sims[j], -j))
        edges.append((sims[best], a, b_set[best]))
    ranked = sorted(range(len(edges)), key=lambda i: -edges[i][0])  # sorted() is stable
    merged = {edges[i][1]: edges[i][2] for i in ranked[:r]}

    order = list(range(protected)) + [a for a in a_set if a not in merged] + b_set
    new_pos = {old: new for new, old in enumerate(order)}
    for a, b in merged.items():
        new_pos[a] = new_pos[b]
    sums = torch.zeros(len(order), x.shape[1], dtype=x.dtype)
    sizes = torch.zeros(len(order), dtype=x.dtype)
    for old in range(n):
        sums[new_pos[old]] += x[old] * size[old]
        sizes[new_pos[old]] += size[old]
    merged = sums / sizes[:, None]
    if rule == "mlerp":
        groups = [[x[old] for old in range(n) if new_pos[old] == new] for new in range(len(order))]
        merged = torch.stack([_mlerp(members, mean) for members, mean in zip(groups, merged, strict=True)])
    return merged, sizes, [new_pos[s] for s in source]


def _map_pool(pool, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    heads, head_dim = pool.num_heads, pool.head_dim
    latent = pool.latent[0]
    q = pool.q(latent).reshape(-1, heads, head_dim).transpose(0, 1)
    kv = pool.kv(x).reshape(x.shape[0], 2, heads, head_dim).permute(1, 2, 0, 3)
    q, k = pool.q_norm(q), pool.k_norm(kv[0])
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim) + size.log()[None, None, :]
    out = (torch.softmax(logits, dim=-1) @ kv[1]).transpose(0, 1).reshape(latent.shape[0], -1)
    out = pool.proj(out)
    out = out + pool.mlp(pool.norm(out))
    return out[0] if pool.pool == "token" else out.mean(0)


def _head(model, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    prefix = model.num_prefix_tokens
    if hasattr(model, "head_dist"):
        return (model.head(x[0]) + model.head_dist(x[1])) / 2
    if model.global_pool == "map":
        pooled = _map_pool(model.attn_pool, x[prefix:], size[prefix:])
    elif model.global_pool == "token":
        pooled = x[0]
    elif model.global_pool == "avg":
        weights = size[prefix:, None]
        pooled = (x[prefix:] * weights).sum(0) / weights.sum()
    else:
        return x
    return model.head(model.fc_norm(pooled))


@torch.no_grad()
def reference_forward(
    model, images: torch.Tensor, schedule: list[int], prop_attn: bool = True, rule: str = "tome"
):
    """Logits (or features for head-less pooling), token counts per layer and source maps per image.

    ``model`` must be an unpatched timm VisionTransformer in eval mode; ``rule`` is "tome" or "mlerp".
    """
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    protected = model.num_prefix_tokens
    outputs, counts, sources = [], [], []
    for x in tokens:
        size = torch.ones(x.shape[0], dtype=x.dtype)
        source = list(range(x.shape[0]))
        per_layer = []
        for block, r in zip(model.blocks, schedule, strict=True):
            out, metric = _attention(block.attn, block.norm1(x), size, prop_attn)
            x = x + block.ls1(out)
            x, size, source = _merge(x, size, source, metric, r, protected, rule)
            x = x + block.ls2(block.mlp(block.norm2(x)))
            per_layer.append(x.shape[0])
        x = model.norm(x)
        outputs.append(_head(model, x, size))
        counts.append(per_layer)
        sources.append(source)
    return torch.stack(outputs), counts, torch.tensor(sources)
