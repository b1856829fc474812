"""A request's parameters, checked in one place: r (an integer or ``auto``), the r=auto latency target,
the request's auto ceiling, and top_k. The routes and the settings parse "auto or an integer" here, and
the range of r a model accepts is decided here (:meth:`RLimits.for_model`), once per model at start-up.

The words for r, used the same way in code, settings, ``/models`` and the README:

- **r**: tokens merged per block (0: no merging). ``auto``: the server picks r per batch.
- **useful r** of a model (``tome.largest_useful_r``): the smallest r that already leaves the fewest
  tokens merging can leave; any larger r gives the same output.
- **ceiling** of a model (``RLimits.ceiling``; ``r_max`` in ``/models``): the largest r the server
  accepts for it: its useful r, or ``TOME_MAX_R`` when that is lower. A larger r is a 422.
- **auto ceiling** (``RLimits.auto_ceiling``; ``auto.max_r`` in ``/models``): the largest r r=auto may
  choose for the model: ``TOME_AUTO_MAX_R``, at most the ceiling.
- **a request's auto ceiling** (query ``max_r``; ``AutoParams.max_r``): the largest r one auto request
  accepts; above the auto ceiling it is capped to it (the operator's limit wins).
- **fidelity floor** (``TOME_MIN_FIDELITY``, query ``min_fidelity``; ``AutoParams.floor``): the lowest
  fidelity lower bound (tome_runtime.fidelity) an auto request accepts; the higher of the two applies
  (the operator's floor wins). The lane turns it into the request's auto ceiling, one per merge rule
  (``AutoParams.max_r_by_merge``): each rule has its own fidelity table.
- **merge rule** (query or body ``merge``, ``TOME_DEFAULT_MERGE``): how merged tokens combine. A fixed-r
  request that names none gets the default; an r=auto request that names none gets :data:`AUTO`: the
  server chooses the rule with r, per batch (server/auto/pareto.py).

Nothing here knows about HTTP: :class:`ParamError`'s message is the 422's detail and says what is
allowed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

AUTO: Literal["auto"] = "auto"
"""r (or the merge rule) chosen by the server per batch; also the r (the rule) of the queue that r=auto
requests (naming no rule) share."""

RChoice = int | Literal["auto"]

MergeRule = Literal["tome", "mlerp"]
"""How merged tokens combine: ``tome.MERGE_RULES``, named here too so that settings can be checked
before the library (and the model hub client with it) is imported; a test keeps the two equal."""
MERGE_RULES: tuple[str, ...] = get_args(MergeRule)


def default_first(default: str) -> tuple[str, ...]:
    """:data:`MERGE_RULES` with ``default`` first: the order a lane measures them in."""
    return (default, *(rule for rule in MERGE_RULES if rule != default))


DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class Asked:
    """A request's parameters as it sent them (query text, JSON numbers, or None for "not given"):
    its model, r and merge rule, and for r=auto its latency target, auto ceiling and fidelity floor.
    Every endpoint builds one; the model's lane checks it (``Lane.admit``)."""

    model: str | None = None
    r: int | str | None = None
    merge: str | None = None
    target_ms: float | str | None = None
    max_r: int | str | None = None
    min_fidelity: float | str | None = None


class ParamError(ValueError):
    """A bad request parameter or setting; the message says what is allowed."""


def parse_r_choice(value: object, what: str = "r", ceiling: int | None = None) -> RChoice:
    """``auto`` (any case, spaces around allowed) or an integer from 0 to ``ceiling`` (no upper bound
    when None). ``what`` names the parameter or setting in the message."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    number = _integer(value, ceiling)
    if number is None:
        upper = (
            "a non-negative integer" if ceiling is None else f"an integer from 0 to {ceiling} for this model"
        )
        raise ParamError(f"{what} must be 'auto' or {upper}, got {value!r}")
    return number


@dataclass(frozen=True)
class RLimits:
    """Which r a model accepts and what r=auto may choose (see the module docstring for the words)."""

    useful: int
    ceiling: int
    auto_ceiling: int
    default: RChoice
    """r of a request that names none."""
    notes: tuple[str, ...] = ()
    """Settings that were capped for this model, said once at start-up and listed by /models."""

    @classmethod
    def for_model(
        cls,
        name: str,
        useful: int,
        *,
        max_r: int | None,
        auto_max_r: int | None,
        default: RChoice,
        default_is_explicit: bool = True,
    ) -> RLimits:
        """The limits of model ``name`` under the settings TOME_MAX_R, TOME_AUTO_MAX_R and
        TOME_DEFAULT_R. Settings beyond what the model can use are capped with a note, not refused:
        one server may load models of different sizes."""
        notes = []
        ceiling = useful if max_r is None else min(useful, max_r)
        if max_r is not None and max_r > useful:
            notes.append(
                f"--max-r / TOME_MAX_R is {max_r}, above the largest useful r of {name} ({useful}); "
                f"r is capped at {useful}"
            )
        if default != AUTO and default > ceiling:
            if default_is_explicit:
                notes.append(
                    f"--default-r / TOME_DEFAULT_R is {default}, above the largest r {name} accepts "
                    f"({ceiling}); its default r is {ceiling}"
                )
            default = ceiling
        auto_ceiling = ceiling if auto_max_r is None else min(auto_max_r, ceiling)
        return cls(useful, ceiling, auto_ceiling, default, tuple(notes))

    def r(self, value: str | int | None) -> RChoice:
        """A request's r: ``auto`` or an integer up to the ceiling; the default when it names none."""
        return self.default if value is None else parse_r_choice(value, "r", self.ceiling)


@dataclass(frozen=True)
class AutoParams:
    """What r=auto needs of one request."""

    target_s: float
    """Its latency target."""
    max_r: int
    """Its auto ceiling, already capped at the model's auto ceiling (and, once the lane applied it, at
    the largest r that meets ``floor`` with the rule r=auto plans it for: its own, or the default
    when the server chooses the rule)."""
    floor: float | None = None
    """Its fidelity floor: the larger of TOME_MIN_FIDELITY and its ``min_fidelity``; None: none."""
    kind: str | None = None
    """The fidelity kind its floor and its choice of rule are judged in (set by the lane)."""
    max_r_by_merge: Mapping[str, int] = field(default_factory=dict)
    """Per merge rule, its auto ceiling under ``floor`` in that rule's fidelity table (set by the lane):
    the pairs (r, rule) the server may choose for it."""


def auto_params(
    r: RChoice,
    target_ms: float | str | None,
    max_r: int | str | None,
    limits: RLimits,
    *,
    default_target_ms: float,
    timeout_ms: float,
    min_fidelity: float | str | None = None,
    default_floor: float | None = None,
) -> AutoParams | None:
    """Check ``target_ms``, ``max_r`` and ``min_fidelity`` (numbers, or their query text) and return an
    auto request's parameters, or None for a fixed r, which takes none of them: naming one with a fixed
    r is refused, not silently ignored."""
    if r != AUTO:
        if target_ms is not None or max_r is not None or min_fidelity is not None:
            raise ParamError(
                f"target_ms, max_r and min_fidelity apply to r=auto only; this request asks for r={r}"
            )
        return None
    floor = fidelity_floor(min_fidelity, default_floor)
    target = default_target_ms if target_ms is None else _number(target_ms)
    if not (math.isfinite(target) and 0 < target <= timeout_ms):
        raise ParamError(
            f"target_ms must be a number above 0 and at most the request timeout ({timeout_ms:g} ms, "
            f"TOME_REQUEST_TIMEOUT_MS), got {target_ms!r}"
        )
    if max_r is None:
        return AutoParams(target / 1000.0, limits.auto_ceiling, floor)
    ceiling = _integer(max_r, limits.ceiling)
    if ceiling is None:
        raise ParamError(f"max_r must be an integer from 0 to {limits.ceiling} for this model, got {max_r!r}")
    return AutoParams(target / 1000.0, min(ceiling, limits.auto_ceiling), floor)


def fidelity_floor(min_fidelity: float | str | None, default: float | None) -> float | None:
    """A request's fidelity floor: its ``min_fidelity`` (0 to 1) or ``default`` (TOME_MIN_FIDELITY),
    whichever is higher; None when neither is set."""
    if min_fidelity is None:
        return default
    floor = _number(min_fidelity)
    if not 0 <= floor <= 1:  # NaN fails too
        raise ParamError(
            "min_fidelity must be a number from 0 to 1 (the lowest lower bound of top-1 agreement, or of "
            f"embedding cosine, with r=0 that this request accepts), got {min_fidelity!r}"
        )
    return floor if default is None else max(floor, default)


def merge_rule(value: str | None, default: str) -> str:
    """The request's merge rule: one of :data:`MERGE_RULES`; ``default`` when it names none."""
    if value is None:
        return default
    if value not in MERGE_RULES:
        raise ParamError(f"merge must be one of {', '.join(MERGE_RULES)}, got {value!r}")
    return value


def top_k(value: int | str | None, num_classes: int) -> int:
    """How many predictions to return: the default (5, at most the number of classes), or 1 to the
    number of classes."""
    if value is None:
        return min(DEFAULT_TOP_K, num_classes)
    number = _number(value)
    if not (number.is_integer() and 1 <= number <= num_classes):
        raise ParamError(f"top_k must be an integer from 1 to {num_classes} for this model, got {value!r}")
    return int(number)


def _number(value: float | int | str) -> float:
    """A number, or its text; text that is not one becomes NaN, which every range check refuses."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _integer(value: object, ceiling: int | None) -> int | None:
    """``value`` (or its text) as an integer from 0 to ``ceiling``, else None."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value if ceiling is None or value <= ceiling else None
