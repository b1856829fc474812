"""Merge schedules: how many tokens each layer merges, how many remain, and which r are worth asking for.

These are the one definition of each fact that the server, ``tome-eval`` and ``tome-bench`` use.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .merge import max_merge

RSpec = int | list[int] | tuple[int, float]
"""An int (same r in every layer), a list (one r per layer, padded with 0) or ``(r, inflection)``."""


def parse_r(r: RSpec, depth: int) -> list[int]:
    """Turn an r specification into one non-negative int per layer.

    ``(r, inflection)`` is a linear schedule from ``r * (1 - inflection)`` in the first layer to
    ``r * (1 + inflection)`` in the last: inflection -1 is the paper's decreasing ``2r -> 0``, 0 is
    constant and +1 increases ``0 -> 2r``. Values are truncated to ints, as in the paper.
    """
    if isinstance(r, bool):
        raise TypeError("r must be an int, a list of ints or a (r, inflection) tuple, not a bool")
    if isinstance(r, int):
        schedule = [r] * depth
    elif isinstance(r, tuple):
        if len(r) != 2:
            raise TypeError(f"a tuple r must be (r, inflection), got {r!r}")
        schedule = _linear(int(r[0]), float(r[1]), depth)
    elif isinstance(r, list):
        schedule = [int(v) for v in r]
        if len(schedule) > depth:
            raise ValueError(f"r lists {len(schedule)} layers but the model has {depth}")
        schedule += [0] * (depth - len(schedule))
    else:
        raise TypeError(f"r must be an int, a list of ints or a (r, inflection) tuple, got {r!r}")
    if any(v < 0 for v in schedule):
        raise ValueError(f"r must not be negative, got {r!r}")
    return schedule


def _linear(r: int, inflection: float, depth: int) -> list[int]:
    if not -1.0 <= inflection <= 1.0:
        raise ValueError(f"inflection must lie in [-1, 1], got {inflection}")
    first, last = r * (1.0 - inflection), r * (1.0 + inflection)
    if depth == 1:
        return [int(first)]
    step = (last - first) / (depth - 1)
    return [int(first + step * i) for i in range(depth)]


def token_counts(num_tokens: int, depth: int, r: RSpec, num_protected: int = 1) -> list[int]:
    """Tokens left after each of ``depth`` layers, starting from ``num_tokens`` (prefix included).

    Each layer's r is capped at half of the tokens that may merge, as in the paper.
    """
    counts = []
    for layer_r in parse_r(r, depth):
        num_tokens -= min(layer_r, max_merge(num_tokens, num_protected))
        counts.append(num_tokens)
    return counts


def input_tokens(model: nn.Module, img_size: tuple[int, int] | None = None) -> int:
    """Tokens entering the first block of a timm ViT: patches (at ``img_size``, default the model's
    own input size) plus prefix tokens (class, distillation, registers)."""
    embed = model.patch_embed
    grid = embed.dynamic_feat_size(img_size) if img_size else embed.grid_size
    return grid[0] * grid[1] + model.num_prefix_tokens


def largest_useful_r(model: nn.Module, img_size: tuple[int, int] | None = None) -> int:
    """The smallest r whose output is already down to the fewest tokens merging can leave.

    A larger r still merges more in the early layers, but it cannot shrink the output any further,
    and the result is no longer a useful picture of the image. ViT-S/16 at 224 px: 24 (197 tokens
    in, 2 out), where the per-layer cap of half the mergeable tokens would accept up to 98.
    """
    tokens, depth, prefix = input_tokens(model, img_size), len(model.blocks), model.num_prefix_tokens
    fewest = token_counts(tokens, depth, tokens, prefix)[-1]
    r = 0
    while token_counts(tokens, depth, r, prefix)[-1] != fewest:
        r += 1
    return r


def parse_r_values(values: str | Iterable[str]) -> list[int]:
    """r values as a user types them on a command line: ``"0,4,8"``, ``["0", "4", "8"]`` or a mix
    (``["0,4", "8"]``). Raises ValueError on anything but non-negative integers or when none is given."""
    texts = [values] if isinstance(values, str) else list(values)
    parts = [part.strip() for text in texts for part in text.split(",")]
    try:
        parsed = [int(part) for part in parts if part]
    except ValueError:
        given = " ".join(texts)
        raise ValueError(f"r values must be integers, separated by commas or spaces, got {given!r}") from None
    if not parsed:
        raise ValueError("give at least one r")
    negative = [r for r in parsed if r < 0]
    if negative:
        raise ValueError(f"r must not be negative, got {negative[0]}")
    return parsed
