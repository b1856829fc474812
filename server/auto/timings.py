"""Measured batch times of one model on the hardware at hand, per (r, batch size): what r=auto decides on.

The analytical GMACs (``tome.gmacs``) say what merging saves in arithmetic; whether that turns into
time depends on the hardware, the dtype and the batch size (on this project's CPU at batch 1, r=8 is
*slower* than r=0). So the controller works from a table of measured seconds per batch:

- :meth:`TimingTable.warm_up` measures a grid of r (0, step, 2*step, ..., r_max) and batch sizes
  (1, 2, 4, ..., max batch) within a start-up budget, most useful cells first: for every r the largest
  batch (what runs under load, when r matters) and batch 1 (idle traffic), coarse to fine over r, and
  only then the batch sizes in between. A cell the budget did not reach is predicted from its
  neighbours (see :class:`Snapshot`).
- :meth:`TimingTable.observe` folds in the forward time of every real batch, so the table follows the
  machine (thermal state, neighbours, a second inference thread) after start-up.
- :meth:`TimingTable.to_json` / :meth:`TimingTable.from_json` keep the table in the state folder
  (server/state.py; :func:`tables_to_json` / :func:`tables_from_json`: one per merge rule), so a
  restart on the same hardware starts from it instead of measuring again.
- An r that is not clearly faster than every smaller r at a batch size is *dominated* there: it would
  cost accuracy for no speed, and the controller never chooses it.
- A lane keeps one table per merge rule (their batches cost differently), warmed up in turn within
  one budget (:func:`budget_shares`), the default rule's first.

Thread-safe: batches finish on inference threads while the event loop reads predictions. Readers get
an immutable :class:`Snapshot`, rebuilt only after a change.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

BatchTimer = Callable[[int, int], float]
"""Runs one batch of ``batch_size`` images at ``r`` and returns its forward seconds. Injected, so the
server passes its inference worker and tests pass a fake."""


def r_grid(r_max: int, step: int = 4) -> tuple[int, ...]:
    """0, step, 2*step, ... and r_max itself (the strongest merge is always a candidate)."""
    if r_max < 0 or step < 1:
        raise ValueError(f"need r_max >= 0 and step >= 1, got {r_max}, {step}")
    return tuple(sorted({*range(0, r_max + 1, step), r_max}))


def batch_grid(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... and max_batch itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = {max_batch}
    size = 1
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def budget_shares(budget_s: float, count: int, spent: Callable[[], float]) -> Iterator[float]:
    """The budgets of ``count`` steps run in turn (one timing table per merge rule, the default rule's
    first): each an equal part of what is left when it starts (``spent``: the seconds used so far), so
    what one step leaves unused goes to those after it."""
    for index in range(count):
        yield max(0.0, budget_s - spent()) / (count - index)


def coarse_to_fine(values: tuple[int, ...]) -> list[int]:
    """Both ends, then the middles of the widest gaps: stopping anywhere leaves an even spread."""
    if len(values) <= 2:
        return list(values)
    order, spans = [values[0], values[-1]], [(0, len(values) - 1)]
    while spans:
        spans.sort(key=lambda span: span[1] - span[0])
        low, high = spans.pop()
        if high - low < 2:
            continue
        middle = (low + high) // 2
        order.append(values[middle])
        spans += [(low, middle), (middle, high)]
    return order


def warm_up_order(rs: tuple[int, ...], batch_sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    """The cells in the order they are worth measuring (see the module docstring)."""
    ends = [batch_sizes[-1], batch_sizes[0]] if len(batch_sizes) > 1 else [batch_sizes[0]]
    cells = [(r, size) for r in coarse_to_fine(rs) for size in ends]
    middles = coarse_to_fine(batch_sizes)[len(ends) :]
    return cells + [(r, size) for size in middles for r in coarse_to_fine(rs)]


class _Cell:
    """A robust running estimate of one cell's seconds.

    A plain EWMA would let one slow batch (a page fault, a neighbour's burst) pull the estimate far
    off. Each step is clipped to a few mean absolute deviations, so a lone outlier moves it by little,
    while a lasting change (more load on the machine) keeps pushing it and widens the deviation until
    the estimate has followed.
    """

    __slots__ = ("seconds", "deviation", "samples")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deviation = 0.1 * seconds
        self.samples = 1

    def saved(self, r: int, size: int) -> dict[str, float | int]:
        numbers = {"seconds": self.seconds, "deviation": self.deviation, "samples": self.samples}
        return {"r": r, "batch_size": size, **numbers}

    @classmethod
    def restored(cls, saved: Mapping[str, Any]) -> _Cell:
        """A cell as saved by :meth:`TimingTable.to_json`; ValueError unless its numbers can be one."""
        seconds, deviation, samples = saved["seconds"], saved["deviation"], saved["samples"]
        values = (float(seconds), float(deviation))
        if not (all(math.isfinite(v) for v in values) and values[0] > 0 and values[1] >= 0):
            raise ValueError(f"a cell needs seconds > 0 and deviation >= 0, got {seconds}, {deviation}")
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"a cell needs samples >= 1, got {samples!r}")
        cell = cls(values[0])
        cell.deviation, cell.samples = values[1], samples
        return cell

    def update(self, seconds: float, alpha: float, clip: float) -> None:
        error = seconds - self.seconds
        bound = max(clip * self.deviation, 0.05 * self.seconds)
        self.seconds += alpha * max(-bound, min(bound, error))
        self.deviation += alpha * (min(abs(error), 2 * bound) - self.deviation)
        self.samples += 1


@dataclass(frozen=True)
class TimingRow:
    """One (r, batch size) cell as exported to /models and to metrics."""

    r: int
    batch_size: int
    seconds: float
    images_per_s: float
    samples: int
    """Warm-up measurements and real batches folded in; 0 for a predicted cell."""
    dominated: bool


class Snapshot:
    """Immutable predicted seconds for every grid r and every batch size 1..max_batch.

    Prediction, for a cell that has no samples: along the batch size, piecewise linear between the
    measured sizes of the same r (a batch costs a fixed part plus a part per image) and extrapolated
    with the slope of the nearest two; an r with no samples at all takes the linear interpolation
    between the nearest measured r below and above, or the nearest one beyond the ends. Extrapolating
    past the largest measured r copies its time, which can only make the controller pessimistic.
    """

    def __init__(
        self, rs: tuple[int, ...], max_batch: int, cells: Mapping[tuple[int, int], _Cell], min_gain: float
    ) -> None:
        self.rs, self.max_batch = rs, max_batch
        self._samples = {key: cell.samples for key, cell in cells.items()}
        by_r = _curves(rs, max_batch, cells)
        self._seconds = {r: _across_r(r, by_r) for r in rs} if by_r else {}
        self._usable = {size: self._non_dominated(size, min_gain) for size in range(1, max_batch + 1)}

    @property
    def ready(self) -> bool:
        return bool(self._seconds)

    def seconds(self, r: int, batch_size: int) -> float:
        """Predicted forward seconds of a batch; r must be on the grid."""
        if not 1 <= batch_size <= self.max_batch:
            raise ValueError(f"batch size {batch_size} outside 1..{self.max_batch}")
        return self._seconds[r][batch_size - 1]

    def estimate(self, r: int, batch_size: int) -> float:
        """Predicted seconds at any r in [0, r_max] (fixed-r clients use r off the grid): linear
        between the grid r around it."""
        if r in self._seconds:
            return self.seconds(r, batch_size)
        above = bisect.bisect_right(self.rs, r)
        if not 0 < above < len(self.rs):
            raise ValueError(f"r={r} outside 0..{self.rs[-1]}")
        low, high = self.rs[above - 1], self.rs[above]
        weight = (r - low) / (high - low)
        return (1 - weight) * self.seconds(low, batch_size) + weight * self.seconds(high, batch_size)

    def usable(self, batch_size: int) -> tuple[int, ...]:
        """The grid r that are not dominated at this batch size, ascending (each faster than the last)."""
        return self._usable[batch_size]

    def fastest_up_to(self, r: int, batch_size: int) -> int:
        """The largest usable r <= r: at least as fast as r, at no more merging."""
        usable = self.usable(batch_size)
        return usable[max(0, bisect.bisect_right(usable, r) - 1)]

    def rows(self) -> list[TimingRow]:
        rows = []
        for r in self.rs:
            usable = {size for size in range(1, self.max_batch + 1) if r in self._usable[size]}
            for size in batch_grid(self.max_batch):
                seconds = self.seconds(r, size)
                samples = self._samples.get((r, size), 0)
                rows.append(TimingRow(r, size, seconds, size / seconds, samples, size not in usable))
        return rows

    def _non_dominated(self, batch_size: int, min_gain: float) -> tuple[int, ...]:
        if not self._seconds:
            return (0,)
        usable, best = [], float("inf")
        for r in self.rs:
            seconds = self.seconds(r, batch_size)
            if seconds < (1.0 - min_gain) * best:
                usable.append(r)
                best = seconds
        return tuple(usable)


def _curves(
    rs: tuple[int, ...], max_batch: int, cells: Mapping[tuple[int, int], _Cell]
) -> dict[int, list[float]]:
    """Seconds per batch size 1..max_batch of every r with samples. An r sampled at one size only
    takes the shape of its neighbours' curves, scaled through its one point."""
    points: dict[int, list[tuple[int, float]]] = {}
    for (r, size), cell in sorted(cells.items()):
        points.setdefault(r, []).append((size, cell.seconds))
    curves = {r: _along_batch(p, max_batch) for r, p in points.items() if len(p) > 1}
    for r, p in points.items():
        if len(p) == 1:
            size, seconds = p[0]
            # Nothing to borrow from: time per image constant (pessimistic above the size).
            shape = _across_r(r, curves) if curves else [b / size for b in range(1, max_batch + 1)]
            curves[r] = [value * seconds / shape[size - 1] for value in shape]
    return curves


def _along_batch(points: list[tuple[int, float]], max_batch: int) -> list[float]:
    sizes = [size for size, _ in points]
    out = []
    for b in range(1, max_batch + 1):
        i = min(max(bisect.bisect_left(sizes, b), 1), len(points) - 1)
        (b0, t0), (b1, t1) = points[i - 1], points[i]
        slope = max(0.0, (t1 - t0) / (b1 - b0))
        out.append(max(t0 + slope * (b - b0), 1e-9))
    return out


def _across_r(r: int, by_r: Mapping[int, list[float]]) -> list[float]:
    if r in by_r:
        return by_r[r]
    known = sorted(by_r)
    below = [k for k in known if k < r]
    above = [k for k in known if k > r]
    if not below or not above:
        return by_r[below[-1] if below else above[0]]
    low, high = below[-1], above[0]
    weight = (r - low) / (high - low)
    return [(1 - weight) * a + weight * b for a, b in zip(by_r[low], by_r[high], strict=True)]


class TimingTable:
    """The measured timing table of one model (see the module docstring)."""

    def __init__(
        self,
        model: str,
        r_max: int,
        max_batch: int,
        r_step: int = 4,
        min_gain: float = 0.03,
        merge: str = "tome",
        alpha: float = 0.1,
        clip: float = 3.0,
    ) -> None:
        """``min_gain``: an r must be this much faster than every smaller r at a batch size to be
        usable there (3%: less is within the noise of one measurement, and not worth accuracy)."""
        self.model = model
        self.merge = merge
        """The merge rule whose batches it measures."""
        self.r_step = r_step
        self.rs = r_grid(r_max, r_step)
        self.max_batch = max_batch
        self._min_gain, self._alpha, self._clip = min_gain, alpha, clip
        self._cells: dict[tuple[int, int], _Cell] = {}
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None

    def warm_up(
        self,
        timer: BatchTimer,
        budget_s: float,
        repeats: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> int:
        """Measure grid cells in :func:`warm_up_order` until the budget would be overrun; returns the
        number of cells measured. A cell's first visit makes one untimed call (the first call at a new
        shape pays for allocations) and one timed; later passes over the same cells add a sample each,
        up to ``repeats``, and a cell keeps the median of its samples. Passes, rather than all samples
        of a cell at once, cover the grid first under a tight budget, and spread a burst of load from
        elsewhere on the machine over many cells instead of ruining one (a cell measured too slow is
        rarely chosen, so real batches would seldom correct it)."""
        deadline = clock() + budget_s
        samples: dict[tuple[int, int], list[float]] = {}
        order = warm_up_order(self.rs, batch_grid(self.max_batch))
        for visit in range(repeats):
            for cell in order if visit == 0 else list(samples):
                snapshot = self.snapshot()
                calls = 2 if visit == 0 else 1
                if snapshot.ready and clock() + calls * snapshot.seconds(*cell) > deadline:
                    continue  # a cheaper cell later in the order may still fit
                if visit == 0:
                    timer(*cell)
                times = samples.setdefault(cell, [])
                times.append(timer(*cell))
                self._set(*cell, sorted(times)[len(times) // 2])
        return len(samples)

    @property
    def measured(self) -> int:
        """Cells with samples: measured at warm-up, loaded, or taught by real batches."""
        with self._lock:
            return len(self._cells)

    def observe(self, r: int, batch_size: int, seconds: float) -> None:
        """Fold in a real batch's forward seconds. Batches at an r off the grid (fixed-r clients) are
        ignored: the controller only ever chooses grid r."""
        if r not in self.rs or not 1 <= batch_size <= self.max_batch or seconds <= 0:
            return
        with self._lock:
            cell = self._cells.get((r, batch_size))
            if cell is None:
                self._cells[(r, batch_size)] = _Cell(seconds)
            else:
                cell.update(seconds, self._alpha, self._clip)
            self._snapshot = None

    def snapshot(self) -> Snapshot:
        with self._lock:
            if self._snapshot is None:
                self._snapshot = Snapshot(self.rs, self.max_batch, self._cells, self._min_gain)
            return self._snapshot

    def describe(self, gmacs: Mapping[int, float]) -> list[dict]:
        """Per grid r, for /models: the analytical GMACs per image (``gmacs``, computed by the
        library's ``tome.gmacs``) beside the measured images/s per batch size and where r is dominated."""
        by_r: dict[int, dict] = {}
        for row in self.snapshot().rows():
            entry = by_r.setdefault(
                row.r, {"r": row.r, "gmacs": gmacs.get(row.r), "images_per_s": {}, "dominated_at": []}
            )
            entry["images_per_s"][row.batch_size] = round(row.images_per_s, 2)
            if row.dominated:
                entry["dominated_at"].append(row.batch_size)
        return list(by_r.values())

    def metric_rows(self) -> Iterable[tuple[dict[str, str], float, bool]]:
        """(labels, images/s, dominated) per cell, for the ``tome_cost_images_per_second`` and
        ``tome_cost_dominated`` gauges (labels model, r, batch_size)."""
        for row in self.snapshot().rows():
            labels = {"model": self.model, "r": str(row.r), "batch_size": str(row.batch_size)}
            yield labels, row.images_per_s, row.dominated

    def to_json(self) -> dict[str, Any]:
        """The grid and every measured cell's estimate, for the state folder (server/state.py)."""
        with self._lock:
            cells = [c.saved(*key) for key, c in sorted(self._cells.items())]
        return {
            "model": self.model,
            "r_max": self.rs[-1],
            "r_step": self.r_step,
            "max_batch": self.max_batch,
            "merge": self.merge,
            "cells": cells,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TimingTable:
        """The table :meth:`to_json` wrote; ValueError, saying what is wrong, for anything else (a
        hand-edited or truncated file must not steer r=auto)."""
        try:
            table = cls(
                str(data["model"]),
                int(data["r_max"]),
                int(data["max_batch"]),
                int(data["r_step"]),
                merge=str(data.get("merge", "tome")),
            )
            cells = {(int(c["r"]), int(c["batch_size"])): _Cell.restored(c) for c in data["cells"]}
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a timing table ({type(exc).__name__}: {exc})") from None
        if not cells:
            raise ValueError("the timing table has no measured cell")
        for r, size in cells:
            if r not in table.rs or not 1 <= size <= table.max_batch:
                grid = f"{table.rs} x 1..{table.max_batch}"
                raise ValueError(f"cell (r={r}, batch {size}) is off the grid {grid}")
        table._cells = cells
        return table

    def _set(self, r: int, size: int, seconds: float) -> None:
        with self._lock:
            self._cells[(r, size)] = _Cell(seconds)
            self._snapshot = None


def tables_to_json(tables: Iterable[TimingTable]) -> dict[str, Any]:
    """The tables of a lane's merge rules, keyed by rule: the state folder's "timings" section."""
    return {table.merge: table.to_json() for table in tables}


def tables_from_json(data: Any, like: Sequence[TimingTable]) -> list[TimingTable]:
    """What :func:`tables_to_json` wrote, as tables in the order of ``like``, each on the grid and of the
    merge rule of its table there; ValueError, saying what differs, for anything else."""
    rules = [table.merge for table in like]
    if not isinstance(data, Mapping) or sorted(data) != sorted(rules):
        found = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"expected a timing table per merge rule ({', '.join(rules)}), found {found}")
    tables = [TimingTable.from_json(data[rule]) for rule in rules]
    for table, own in zip(tables, like, strict=True):
        if (table.rs, table.max_batch, table.merge) != (own.rs, own.max_batch, own.merge):
            grid = f"r {table.rs}, batch 1..{table.max_batch}, merge rule {table.merge}"
            raise ValueError(f"its grid is {grid}: not this lane's")
    return tables
