"""The request parameters of r=auto, checked: ``r`` (an integer or ``auto``), ``target_ms`` and
``max_r``. Routes turn :class:`ParamError` into a 422 whose detail is its message, which says what is
allowed. Nothing here knows about HTTP; the spec is in the r=auto notes (TOME_DEFAULT_R,
TOME_LATENCY_TARGET_MS, TOME_AUTO_MAX_R)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

AUTO = "auto"

RChoice = int | Literal["auto"]


class ParamError(ValueError):
    """A bad r, target_ms or max_r; the message is the 422's detail."""


@dataclass(frozen=True)
class AutoParams:
    """What the controller needs of one auto request."""

    target_s: float
    max_r: int
    """Its floor: the largest r it accepts, already capped by the server's TOME_AUTO_MAX_R."""


def parse_r(value: str | None, default: RChoice, r_max: int) -> RChoice:
    """The request's r: ``auto``, or an integer in [0, r_max]; ``default`` when it names none."""
    if value is None:
        return default
    if value.strip().lower() == AUTO:
        return AUTO
    try:
        r = int(value)
    except ValueError:
        r = -1
    if not 0 <= r <= r_max:
        raise ParamError(f"r must be 'auto' or an integer from 0 to {r_max} for this model, got {value!r}")
    return r


def auto_params(
    r: RChoice,
    target_ms: float | None,
    max_r: int | None,
    *,
    default_target_ms: float,
    timeout_ms: float,
    r_max: int,
    auto_max_r: int,
) -> AutoParams | None:
    """Check ``target_ms`` and ``max_r`` and return the auto request's parameters, or None for a
    fixed r (which takes neither: naming one with a fixed r is refused, not silently ignored).
    ``max_r`` must lie in the model's range [0, r_max]; above the server's cap ``auto_max_r``
    (TOME_AUTO_MAX_R, at most r_max) it is capped to it: the operator's floor wins, and the answer's
    r shows what was used."""
    if r != AUTO:
        if target_ms is not None or max_r is not None:
            raise ParamError(f"target_ms and max_r apply to r=auto only; this request asks for r={r}")
        return None
    target = default_target_ms if target_ms is None else target_ms
    if not (math.isfinite(target) and 0 < target <= timeout_ms):
        raise ParamError(
            f"target_ms must be a number above 0 and at most the request timeout ({timeout_ms:g} ms, "
            f"TOME_REQUEST_TIMEOUT_MS), got {target_ms!r}"
        )
    if max_r is not None and not 0 <= max_r <= r_max:
        raise ParamError(f"max_r must be an integer from 0 to {r_max} for this model, got {max_r!r}")
    return AutoParams(target / 1000.0, auto_max_r if max_r is None else min(max_r, auto_max_r))
