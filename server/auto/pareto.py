"""r=auto's second dial: for requests that name no merge rule, the server chooses each batch's merge
rule together with its r, on the measured Pareto front of cost and fidelity.

The rule of choice, per batch (:func:`choose`):

1. The controller (``controller.py``) chooses r for the default rule (TOME_DEFAULT_MERGE), as for any
   auto queue: the least merging that keeps the queued requests on time. That pair's measured seconds
   at the batch's size are the batch's time **budget**.
2. The **candidates** are the (r, rule) pairs of every rule's timing table whose seconds at that size
   are within the budget and whose r is within the batch's auto ceiling for that rule: the smallest
   of its requests' ``max_r_by_merge``, where each request's fidelity floor is applied in that rule's
   own fidelity table. r=0 merges nothing, so it is one pair: the default rule's.
3. Among the candidates whose fidelity is **measured** (a lower bound, of the batch's kind, on at least
   TOME_FIDELITY_MIN_SAMPLES images; r=0 is exactly 1), the best lower bound wins; ties go to the
   cheaper pair, then to the default rule, then to the smaller r.
4. The controller's own pair is always a candidate. While its fidelity is unmeasured, no pair can be
   shown to be better, and it is served: a pair of unmeasured fidelity never displaces another
   (otherwise, with nothing measured, the cheapest pair in the budget, the most merging, would win).

So no other measured candidate beats the chosen pair on both cost and fidelity: one with a better
lower bound would have won, and one with an equal bound is not cheaper. The batch's kind is that of
its oldest request (the one whose deadline drives the batch); every request's own fidelity floor
holds, in its own kind, through the ceilings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .timings import Snapshot

LowerBound = Callable[[int, str], float | None]
"""(r, merge rule) -> the fidelity lower bound of the batch's kind; None while unmeasured."""


@dataclass(frozen=True)
class Pair:
    r: int
    merge: str
    seconds: float
    """The timing table's seconds of the batch at (r, merge)."""
    lower: float | None
    """Its fidelity lower bound; None while unmeasured."""


def choose(
    r: int,
    batch_size: int,
    timings: Mapping[str, Snapshot],
    ceilings: Mapping[str, int],
    lower: LowerBound,
    default: str,
) -> Pair:
    """The pair a batch of ``batch_size`` runs at, given the controller's ``r`` for the ``default``
    rule, each rule's timings and auto ceiling (see the module docstring)."""
    own = _pair(r, default, batch_size, timings[default], lower)
    if own.lower is None:
        return own
    pairs = candidates(own.seconds, batch_size, timings, ceilings, lower, default)
    measured = [pair for pair in [own, *pairs] if pair.lower is not None]
    # Best lower bound first (every one here is measured), then the cheaper, the default rule, less r.
    return min(measured, key=lambda pair: (-(pair.lower or 0.0), pair.seconds, pair.merge != default, pair.r))


def candidates(
    budget_s: float,
    batch_size: int,
    timings: Mapping[str, Snapshot],
    ceilings: Mapping[str, int],
    lower: LowerBound,
    default: str,
) -> list[Pair]:
    """Every pair within ``budget_s`` seconds and each rule's ceiling (r=0 only with ``default``)."""
    return [
        _pair(r, rule, batch_size, snapshot, lower)
        for rule, snapshot in timings.items()
        for r in snapshot.rs
        if r <= ceilings[rule] and (r > 0 or rule == default) and snapshot.seconds(r, batch_size) <= budget_s
    ]


def _pair(r: int, rule: str, batch_size: int, snapshot: Snapshot, lower: LowerBound) -> Pair:
    return Pair(r, rule, snapshot.seconds(r, batch_size), lower(r, rule))
