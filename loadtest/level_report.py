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

ANSWERED, SHED, FAILED = "answered", "shed", "failed"

MIN_LEVEL_SECONDS = 3.0
"""Levels held for less time than this (ramp-up, stopping) are left out of the table."""


@dataclass
class _Level:
    users: int
    first_s: float
    last_s: float
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


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list; NaN when it is empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


class LevelRecorder:
    """Collects request outcomes keyed by the number of users running when each request finished."""

    def __init__(self, user_count: Callable[[], int], clock: Callable[[], float] = time.monotonic):
        self._user_count = user_count
        self._clock = clock
        self._levels: dict[int, _Level] = {}

    def record(self, outcome: str, response_time_ms: float) -> None:
        now = self._clock()
        users = self._user_count()
        level = self._levels.get(users)
        if level is None:
            level = self._levels[users] = _Level(users, now, now)
        level.last_s = now
        if outcome == ANSWERED:
            level.latencies_ms.append(response_time_ms)
        elif outcome == SHED:
            level.shed += 1
        else:
            level.failed += 1

    def rows(self, min_seconds: float = MIN_LEVEL_SECONDS) -> list[LevelRow]:
        rows = []
        for users in sorted(self._levels):
            level = self._levels[users]
            seconds = level.last_s - level.first_s
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
