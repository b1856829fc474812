"""Throughput measurement shared by the benchmarks: warm up, then time variants interleaved."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence

import torch


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Seconds one call of ``fn`` takes, waiting for the device to finish."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_rounds(
    variants: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    on_round: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each variant's call in every round, the variants timed in turn in each round.

    Interleaving spreads slow drifts of the machine (thermal, other load) over all variants
    instead of biasing whichever ran last, and every round runs them in a new random order (seeded,
    so runs repeat) because a variant can leave the caches and the allocator in a state that helps
    or hurts whichever runs next. Values at the same index were measured in the same round, so their
    ratios pair like with like.
    """
    names = list(variants)
    order = random.Random(0)
    with torch.inference_mode():
        for fn in variants.values():
            for _ in range(warmup):
                fn()
        samples: dict[str, list[float]] = {name: [] for name in names}
        for i in range(rounds):
            for name in order.sample(names, len(names)):
                samples[name].append(time_call(variants[name], device))
            if on_round is not None:
                on_round(i)
    return samples


def median(values: Sequence[float]) -> float:
    """The upper median (an actual sample): what every benchmark here reports per variant."""
    return sorted(values)[len(values) // 2]


def interleaved_seconds(
    variants: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    on_round: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each variant, from :func:`interleaved_rounds`."""
    timed = interleaved_rounds(variants, rounds, warmup, device, on_round)
    return {name: median(values) for name, values in timed.items()}
