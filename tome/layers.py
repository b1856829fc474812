"""ToMe versions of timm's ViT block and the attention and pooling it needs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block

from .state import CallState


def attend(attn: Attention, x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's Attention forward with an additive bias; returns the output and the keys averaged over
    heads [B, N, D] in float32, the similarity metric for merging.

    It always uses the fused kernel; with ``bias=None`` that is the unmasked kernel. ``attn_dim`` and
    ``gate`` are read with the meaning they have in older timm releases, which lack them.
    """
    batch, num_tokens, _ = x.shape
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    qkv = attn.qkv(x).reshape(batch, num_tokens, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.unbind(2)  # [B, N, H, D]: averaging keys over heads reads contiguous memory
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, dropout_p=dropout
    )
    out = attn.norm(out.transpose(1, 2).reshape(batch, num_tokens, attn.num_heads * attn.head_dim))
    if gate is not None:
        out = out * gate
    # float32: one kernel here, and the matching's small matrix product is faster and exact-er than
    # in bfloat16.
    return attn.proj_drop(attn.proj(out)), k.mean(dim=2, dtype=torch.float32)


class ToMeBlock(Block):
    """timm's pre-norm Block that merges ``r`` tokens between its attention and MLP branches.

    Called without ``state`` it is exactly timm's Block.
    """

    def _timm_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        # Older timm releases have no is_causal argument; pass it only when it is asked for.
        if is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=True)
        return super().forward(x, attn_mask=attn_mask)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        *,
        state: CallState | None = None,
        r: int = 0,
    ) -> torch.Tensor:
        if state is None:
            return self._timm_forward(x, attn_mask, is_causal)
        num_tokens = x.shape[1]
        bias = state.attn_bias()
        if r == 0 and bias is None:
            x = self._timm_forward(x, attn_mask, is_causal)
        else:
            out, metric = attend(self.attn, self.norm1(x), bias)
            x = x + self.drop_path1(self.ls1(out))
            if r > 0:
                x = state.merge(x, metric, r)
            x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        state.record(num_tokens, x)
        return x


def weighted_pool(x: torch.Tensor, sizes: torch.Tensor, pool_type: str, num_prefix: int) -> torch.Tensor:
    """timm's global_pool_nlc where every token counts as many times as the patches it holds."""
    if not pool_type:
        return x
    if pool_type == "token":
        return x[:, 0]
    x, sizes = x[:, num_prefix:], sizes[:, num_prefix:, None].to(x.dtype)
    avg = (x * sizes).sum(dim=1) / sizes.sum(dim=1)
    if pool_type == "avg":
        return avg
    if pool_type == "max":
        return x.amax(dim=1)
    if pool_type == "avgmax":
        return 0.5 * (x.amax(dim=1) + avg)
    raise ValueError(f"unknown pool type {pool_type!r}")
