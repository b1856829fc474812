"""Load-test results per number of concurrent users: the table the README reports.

Locust's own CSV percentiles mix every outcome (a 429 answered in a millisecond pulls them down) and
its history is a rolling window. This recorder keeps, for each user count the test held, the response
times of answered (2xx) requests only, and counts shed (429) and failed requests beside them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tome_bench.stats import percentile  # the one percentile definition (nearest rank), shared with bench/

__all__ = ["ANSWERED", "FAILED", "SHED", "LevelRecorder", "LevelRow", "percentile"]

ANSWERED, SHED, FAILED = "answered", "shed", "failed"

MIN_LEVEL_SECONDS = 3.0
"""Levels held for less time than this (ramp-up, stopping) are left out of the table."""


@dataclass
class _Level:
    users: int
    seconds: float = 0.0
    """Time spent at this user count in spans that are closed (the current span is not included)."""
    latencies_ms: list[float] = field(default_factory=list)
    shed: int = 0
    failed: int = 0


@dataclass(frozen=True)
class LevelRow:
    users: int
    seconds: float
    requests: int
    answered_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    shed_share: float
    failures: int


class LevelRecorder:
    """Collects request outcomes keyed by the number of users running when each request finished.

    A level's time is the sum of the spans during which it was the current user count (a span runs from
    the first request completed at that count to the first completed at the next). Requests finished
    while ``active()`` is false (the test stopping and its users being killed) are ignored, so stragglers
    do not land in a lower level on the way down.
    """

    def __init__(
        self,
        user_count: Callable[[], int],
        active: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._user_count = user_count
        self._active = active
        self._clock = clock
        self._levels: dict[int, _Level] = {}
        self._current: int | None = None
        self._span_start = 0.0
        self._last_event = 0.0

    def record(self, outcome: str, response_time_ms: float) -> None:
        if not self._active():
            return
        now, users = self._clock(), self._user_count()
        if users != self._current:
            if self._current is not None:
                self._levels[self._current].seconds += now - self._span_start
            self._current, self._span_start = users, now
        self._last_event = now
        level = self._levels.setdefault(users, _Level(users))
        if outcome == ANSWERED:
            level.latencies_ms.append(response_time_ms)
        elif outcome == SHED:
            level.shed += 1
        else:
            level.failed += 1

    def _seconds(self, level: _Level) -> float:
        open_span = self._last_event - self._span_start if level.users == self._current else 0.0
        return level.seconds + open_span

    def rows(self, min_seconds: float = MIN_LEVEL_SECONDS) -> list[LevelRow]:
        rows = []
        for users in sorted(self._levels):
            level = self._levels[users]
            seconds = self._seconds(level)
            if seconds < min_seconds:
                continue
            latencies = sorted(level.latencies_ms)
            total = len(latencies) + level.shed + level.failed
            rows.append(
                LevelRow(
                    users=users,
                    seconds=round(seconds, 1),
                    requests=total,
                    answered_per_s=len(latencies) / seconds,
                    p50_ms=percentile(latencies, 50),
                    p95_ms=percentile(latencies, 95),
                    p99_ms=percentile(latencies, 99),
                    shed_share=level.shed / total,
                    failures=level.failed,
                )
            )
        return rows


def markdown_table(rows: list[LevelRow]) -> str:
    lines = [
        "| users | seconds | requests | answered req/s | p50 ms | p95 ms | p99 ms | 429 share | failures |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [
            str(row.users),
            f"{row.seconds:.0f}",
            str(row.requests),
            f"{row.answered_per_s:.1f}",
            f"{row.p50_ms:.0f}",
            f"{row.p95_ms:.0f}",
            f"{row.p99_ms:.0f}",
            f"{row.shed_share:.1%}",
            str(row.failures),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(rows: list[LevelRow], folder: Path) -> None:
    """``levels.md`` (the README table) and ``levels.json`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "levels.md").write_text(markdown_table(rows))
    records = [{k: _json_number(v) for k, v in asdict(row).items()} for row in rows]
    (folder / "levels.json").write_text(json.dumps(records, indent=2) + "\n")


def _json_number(value: float | int) -> float | int | None:
    """NaN (no answered request at that level) is not JSON: write null."""
    return None if isinstance(value, float) and math.isnan(value) else value
