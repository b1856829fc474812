"""The ToMe version of timm's VisionTransformer, made by swapping the class of a model in place."""

from __future__ import annotations

import warnings
from functools import cache

import torch
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import VisionTransformer

from .context import MergeInfo, current_request
from .layers import weighted_pool
from .schedule import RSpec, parse_r
from .state import CallState


class ToMeVisionTransformer(VisionTransformer):
    """Mixin placed in front of the model's own class. Weights and state_dict keys are untouched.

    ``r`` and ``merge_rule`` are the model's default schedule and merge rule; :func:`tome.merging`
    overrides them per call.
    """

    r: object = 0
    merge_rule: str = "tome"
    tome_prop_attn: bool = True

    def _tome_request(self) -> tuple[list[int], bool, str]:
        """This call's merge schedule, whether it traces sources, and its merge rule, from
        tome.merging or else the model's ``r`` and ``merge_rule``."""
        request = current_request()
        if request is None:
            return parse_r(self.r, len(self.blocks)), False, self.merge_rule
        r = self.r if request.r is None else request.r
        rule = self.merge_rule if request.merge is None else request.merge
        return parse_r(r, len(self.blocks)), request.trace_source, rule

    def _tome_begin(self, x: torch.Tensor, trace: bool, rule: str) -> tuple[torch.Tensor, CallState]:
        """Embed the image and set up this call's state."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        return x, CallState.start(x, self.num_prefix_tokens, self.tome_prop_attn, trace, rule)

    def _tome_features(
        self,
        x: torch.Tensor,
        schedule: list[int],
        trace: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rule: str = "tome",
    ) -> tuple[torch.Tensor, CallState]:
        x, state = self._tome_begin(x, trace, rule)
        _check_masks(schedule, attn_mask, is_causal)
        for block, r in zip(self.blocks, schedule, strict=True):
            x = block(x, attn_mask, is_causal, state=state, r=r)
        x = self.norm(x)
        # The sizes travel with the very tensor they describe, so forward_head pools it correctly
        # whatever other calls happened in between; a copy or slice of it has no sizes.
        x.tome_sizes = None if state.size is None else state.size[..., 0]
        return x, state

    def _tome_finish(self, x: torch.Tensor, state: CallState) -> None:
        x.tome_sizes = None if state.size is None else state.size[..., 0]
        request = current_request()
        if request is not None:
            _fill(request.info, state, state.final_sizes(x))

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        schedule, trace, rule = self._tome_request()
        x, state = self._tome_features(x, schedule, trace, attn_mask, is_causal, rule)
        self._tome_finish(x, state)
        return x

    def tome_forward(self, x: torch.Tensor, r: RSpec, merge: str | None = None) -> torch.Tensor:
        """``forward(x)`` merging with schedule ``r`` and rule ``merge`` (None: ``model.merge_rule``).

        It reads no context variable and fills no :class:`MergeInfo` (the token counts of a schedule
        are :func:`tome.token_counts`), which makes it the entry point for ``torch.compile``; see
        :mod:`tome.compiled`.
        """
        rule = self.merge_rule if merge is None else merge
        features, _ = self._tome_features(x, parse_r(r, len(self.blocks)), rule=rule)
        return self.forward_head(features)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ):
        """timm's forward_intermediates. Merged intermediates are spread back over the input grid:
        every patch position carries the features of the token it was merged into."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError("output_fmt must be 'NCHW' or 'NLC'")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        batch, _, height, width = x.shape
        schedule, _, rule = self._tome_request()
        x, state = self._tome_begin(x, True, rule)
        _check_masks(schedule, attn_mask, is_causal)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        taken = []
        for i, (block, r) in enumerate(zip(blocks, schedule, strict=False)):
            x = block(x, attn_mask, is_causal, state=state, r=r)
            if i in take:
                y = self.norm(x) if norm else x
                taken.append(y.gather(1, state.source[..., None].expand(-1, -1, y.shape[-1])))
        prefix = [y[:, : self.num_prefix_tokens] for y in taken] if self.num_prefix_tokens else None
        spatial = [y[:, self.num_prefix_tokens :] for y in taken]
        if output_fmt == "NCHW":
            grid_h, grid_w = self.patch_embed.dynamic_feat_size((height, width))
            spatial = [y.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous() for y in spatial]
        final = None
        if not intermediates_only:
            final = self.norm(x)
            self._tome_finish(final, state)
        if output_dict:
            out = {"image_intermediates": spatial}
            if prefix is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if final is not None:
                out["image_features"] = final
            return out
        if return_prefix_tokens and prefix is not None:
            spatial = list(zip(spatial, prefix, strict=True))
        return spatial if intermediates_only else (final, spatial)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        sizes = getattr(x, "tome_sizes", None)
        if sizes is None:
            if not hasattr(x, "tome_sizes") and _fewer_tokens_than_input(self, x):
                warnings.warn(
                    "pooling features with fewer tokens than the input but without token sizes: pass "
                    "forward_head the tensor forward_features returned (a copy or slice loses the sizes "
                    "of merged tokens, and they are then pooled as if each were one patch)",
                    stacklevel=2,
                )
            return super().pool(x, pool_type)
        if self.attn_pool is not None:
            # The pooling attention is proportional too: a merged token speaks for all its patches.
            if not self.pool_include_prefix:
                x, sizes = x[:, self.num_prefix_tokens :], sizes[:, self.num_prefix_tokens :]
            return self.attn_pool(x, attn_mask=sizes.log().to(x.dtype)[:, None, None, :])
        prefix = 0 if self.pool_include_prefix else self.num_prefix_tokens
        return weighted_pool(x, sizes, self.global_pool if pool_type is None else pool_type, prefix)


def _fewer_tokens_than_input(model: VisionTransformer, x: torch.Tensor) -> bool:
    if x.ndim != 3 or getattr(model.patch_embed, "dynamic_img_size", False):
        return False
    return x.shape[1] < model.patch_embed.num_patches + model.num_prefix_tokens


def _check_masks(schedule: list[int], attn_mask: torch.Tensor | None, is_causal: bool) -> None:
    if any(schedule) and (attn_mask is not None or is_causal):
        raise ValueError("attention masks fix the token count, so they cannot be combined with merging")


def _fill(info: MergeInfo, state: CallState, sizes: torch.Tensor) -> None:
    info.r = list(state.applied_r)
    info.input_tokens = state.input_tokens
    info.token_counts = list(state.token_counts)
    info.sizes = sizes
    info.source = state.source


@cache
def tome_class(cls: type[VisionTransformer]) -> type[VisionTransformer]:
    """``ToMe<cls>``: the model's own class with ToMe's forward methods in front of it."""
    if issubclass(cls, ToMeVisionTransformer):
        return cls
    return type(f"ToMe{cls.__name__}", (ToMeVisionTransformer, cls), {})
