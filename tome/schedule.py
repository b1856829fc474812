"""Merge schedules: how many tokens each layer merges, and how many tokens remain."""

from __future__ import annotations

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
