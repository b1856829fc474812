"""Fidelity: how closely a model's answer at r matches its own answer at r=0 on the same image.

The one word, used the same way in code, settings, ``/models``, metrics and docs: the **fidelity** of r
is a measured agreement between the model at r and the model at r=0 on the same inputs, of one
**kind**:

- ``agreement``: the share of images whose top-1 class at r is the top-1 class at r=0 (classifiers).
  Each row also carries the mean **top-5 overlap** (the share of the r=0 top-5 classes that are in the
  top-5 at r), shown beside it, not bounded and not used by the floor.
- ``cosine``: the mean cosine similarity between the pooled "model" embedding at r and at r=0
  (``pooling.py``; the features a classifier's head sees), for every model.

Each (r, kind) row holds its sample count, its mean and a **lower bound**: a one-sided 95% confidence
bound below which the true mean (over images like the sampled ones) lies with probability at most 5%:

- agreement: the Wilson score bound (a binomial proportion; sound at small counts and near 1, where the
  normal approximation is not);
- cosine: the larger of Hoeffding's bound and the empirical-Bernstein bound of Maurer and Pontil (2009,
  Theorem 4) for values in [-1, 1], each at 97.5%, so that the larger still holds at 95% (union bound).
  Hoeffding needs only the range; empirical Bernstein uses the sample variance and is far tighter once
  there are hundreds of samples of a cosine close to 1.

r=0 is the reference itself: fidelity 1 exactly, nothing to sample, and it always meets a floor. An r
with fewer than ``min_samples`` samples never meets one, whatever its bound says.

Samples come from start-up calibration (``calibration.py``), a profile written by ``tome-eval
--profile`` (``load_profile``) and shadow runs of live traffic (``shadow.py``); :meth:`FidelityTable.add`
and :meth:`FidelityTable.merge` take them from any thread. :meth:`FidelityTable.to_json` and
:meth:`FidelityTable.from_json` are the one file format (docs/fidelity.md), which tome-eval writes too.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

Kind = Literal["agreement", "cosine"]
KINDS: tuple[str, ...] = get_args(Kind)
CONFIDENCE = 0.95
"""Of every lower bound: one-sided, so the true mean lies below it with probability at most 5%."""
FORMAT = "tome-fidelity/1"
"""The ``format`` field of the JSON file (``to_json``)."""
BOUNDS = {
    "agreement": "Wilson score lower bound, one-sided 95%",
    "cosine": "max of Hoeffding and empirical-Bernstein lower bounds for values in [-1, 1], each at 97.5%: "
    "one-sided 95%",
}
TOP_K = 5

_Z = NormalDist().inv_cdf(CONFIDENCE)


def wilson_lower(successes: int, samples: int, z: float = _Z) -> float:
    """One-sided lower bound of a binomial proportion (Wilson score interval's lower end)."""
    if samples <= 0:
        raise ValueError("no samples")
    p, n = successes / samples, samples
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def bounded_mean_lower(
    mean: float, variance: float, samples: int, low: float = -1.0, high: float = 1.0, delta: float = 0.05
) -> float:
    """A one-sided (1 - ``delta``) lower bound for the mean of i.i.d. values in [``low``, ``high``] from
    their sample mean and unbiased sample variance: the larger of Hoeffding's and the empirical-Bernstein
    bound, each at ``delta`` / 2."""
    if samples <= 0:
        raise ValueError("no samples")
    span, log_term = high - low, math.log(2 / delta)  # ln(1 / (delta / 2))
    hoeffding = mean - span * math.sqrt(log_term / (2 * samples))
    bound = hoeffding
    if samples >= 2:
        # Maurer & Pontil (2009), Theorem 4 at delta / 2, rescaled from [0, 1] to a range of ``span``.
        log_both = math.log(4 / delta)
        bernstein = (
            mean
            - math.sqrt(2 * max(variance, 0.0) * log_both / samples)
            - 7 * span * log_both / (3 * (samples - 1))
        )
        bound = max(hoeffding, bernstein)
    return min(high, max(low, bound))


@dataclass(frozen=True)
class Outputs:
    """A batch's answers at one r, as fidelity compares them."""

    logits: torch.Tensor | None
    """[B, classes] float32 on the CPU; None for a model without classifier head."""
    embedding: torch.Tensor
    """[B, D] float32 on the CPU: the model's own pooled embedding (pooling "model")."""

    def row(self, index: int) -> Outputs:
        logits = None if self.logits is None else self.logits[index : index + 1]
        return Outputs(logits, self.embedding[index : index + 1])


@dataclass(frozen=True)
class Comparison:
    """Per image of a batch: its answers at r against its answers at r=0."""

    agree: list[bool] | None
    """Top-1 at r equals top-1 at r=0; None without classifier."""
    top5_overlap: list[float] | None
    """Share of the r=0 top-5 classes also in the top-5 at r."""
    cosine: list[float]
    """Cosine of the pooled embeddings."""

    @classmethod
    def of(cls, reference: Outputs, merged: Outputs) -> Comparison:
        cosine = F.cosine_similarity(merged.embedding.float(), reference.embedding.float(), dim=-1, eps=1e-12)
        if reference.logits is None or merged.logits is None:
            return cls(None, None, cosine.tolist())
        k = min(TOP_K, reference.logits.shape[-1])
        top_ref, top = reference.logits.topk(k, dim=-1).indices, merged.logits.topk(k, dim=-1).indices
        overlap = (top_ref[:, :, None] == top[:, None, :]).any(dim=-1).float().mean(dim=-1)
        return cls((top[:, 0] == top_ref[:, 0]).tolist(), overlap.tolist(), cosine.tolist())


class _Running:
    """Count, mean and sum of squared deviations of a stream of values, mergeable (Chan et al.)."""

    __slots__ = ("n", "mean", "m2")

    def __init__(self, n: int = 0, mean: float = 0.0, m2: float = 0.0) -> None:
        self.n, self.mean, self.m2 = n, mean, m2

    def add(self, values: Iterable[float]) -> None:
        for value in values:
            self.merge(_Running(1, float(value)))

    def merge(self, other: _Running) -> None:
        if not other.n:
            return
        total = self.n + other.n
        delta = other.mean - self.mean
        self.mean += delta * other.n / total
        self.m2 += other.m2 + delta * delta * self.n * other.n / total
        self.n = total

    @property
    def variance(self) -> float:
        return self.m2 / (self.n - 1) if self.n > 1 else 0.0

    def copy(self) -> _Running:
        return _Running(self.n, self.mean, self.m2)


@dataclass(frozen=True)
class AccuracyDrop:
    """From a labelled profile: top-1 (top-5) accuracy at r=0 minus at r, as fractions."""

    labelled: int
    top1: float
    top5: float | None = None


@dataclass(frozen=True)
class FidelityRow:
    """One (r, kind) of the table as /models, the metrics and the answers show it."""

    r: int
    kind: str
    samples: int
    mean: float | None
    """None while unmeasured (no samples)."""
    lower: float | None
    top5_overlap: float | None = None
    accuracy_drop: AccuracyDrop | None = None


_Snapshot = tuple[dict[tuple[int, str], _Running], dict[int, _Running], dict[int, AccuracyDrop]]
"""Copies of a table's statistics: per (r, kind), top-5 overlap per r, accuracy drop per r."""


class FidelityTable:
    """The fidelity of one model per r and kind (see the module docstring). Thread-safe."""

    def __init__(self, model: str, rs: Sequence[int] = (0,), kinds: Sequence[str] = KINDS) -> None:
        """``rs``: the r grid (the timing table's), listed even while unmeasured; samples at other r
        (fixed-r traffic, a profile) get rows of their own. ``kinds``: what the model answers
        (agreement needs a classifier head)."""
        self.model = model
        self.rs = tuple(sorted({0, *rs}))
        self.kinds = tuple(kind for kind in KINDS if kind in kinds)
        self._lock = threading.Lock()
        self._stats: dict[tuple[int, str], _Running] = {}
        self._top5: dict[int, _Running] = {}
        self._drops: dict[int, AccuracyDrop] = {}
        self._sources: dict[str, int] = {}
        self.about: dict[str, Any] = {}
        """What a profile says about how it was measured (model weights, images, ...)."""

    # -- filling ----------------------------------------------------------------------------------

    def add(self, r: int, comparison: Comparison, source: str) -> None:
        """Fold in the comparison of a batch at ``r`` with the same batch at r=0."""
        if r <= 0:
            return  # r=0 is the reference: fidelity 1 by definition
        with self._lock:
            self._stats_of(r, "cosine").add(comparison.cosine)
            if comparison.agree is not None:
                self._stats_of(r, "agreement").add(float(a) for a in comparison.agree)
            if comparison.top5_overlap is not None:
                self._top5.setdefault(r, _Running()).add(comparison.top5_overlap)
            self._sources[source] = self._sources.get(source, 0) + len(comparison.cosine)

    def merge(self, other: FidelityTable, source: str, r_max: int | None = None) -> None:
        """Add ``other``'s samples (a profile's) to this table's; rows above ``r_max`` are left out."""
        stats, top5, drops = other._snapshot()

        def keep(r: int) -> bool:
            return r_max is None or r <= r_max

        with self._lock:
            for (r, kind), running in stats.items():
                if keep(r):
                    self._stats_of(r, kind).merge(running)
            for r, running in top5.items():
                if keep(r):
                    self._top5.setdefault(r, _Running()).merge(running)
            for r, drop in drops.items():
                if keep(r):
                    self._drops[r] = _merge_drops(self._drops.get(r), drop)
            images = sum(running.n for (r, kind), running in stats.items() if kind == "cosine" and keep(r))
            self._sources[source] = self._sources.get(source, 0) + images

    def set_accuracy_drop(self, r: int, drop: AccuracyDrop) -> None:
        with self._lock:
            self._drops[r] = drop

    # -- reading ----------------------------------------------------------------------------------

    @property
    def sources(self) -> dict[str, int]:
        """Comparisons with r=0 per source (calibration, profile, shadow): an image compared at n r
        counts n times."""
        with self._lock:
            return dict(self._sources)

    def estimate(self, r: int, kind: str) -> FidelityRow | None:
        """The row of ``r`` and ``kind``; None while unmeasured. r=0: exactly 1, with 0 samples."""
        if r == 0:
            return FidelityRow(0, kind, 0, 1.0, 1.0, 1.0 if kind == "agreement" else None)
        with self._lock:
            running = self._stats.get((r, kind))
            if running is None or not running.n:
                return None
            return self._row(r, kind, running.copy())

    def lower_bound(self, r: int, kind: str, min_samples: int) -> float | None:
        """The lower bound of ``r`` and ``kind`` when it counts: 1 at r=0, None (unmeasured) with fewer
        than ``min_samples`` samples, since a bound on so few images says too little to act on."""
        row = self.estimate(r, kind)
        if row is None or row.lower is None or (r != 0 and row.samples < min_samples):
            return None
        return row.lower

    def meets(self, r: int, kind: str, floor: float, min_samples: int) -> bool:
        """r=0 always; another r when it has at least ``min_samples`` samples of ``kind`` and its lower
        bound is at least ``floor``."""
        lower = self.lower_bound(r, kind, min_samples)
        return lower is not None and lower >= floor

    def ceiling(self, kind: str, floor: float, min_samples: int) -> int:
        """The largest grid r such that every grid r up to it meets ``floor``: r=auto below it never
        chooses an r that does not."""
        highest = 0
        for r in self.rs:
            if not self.meets(r, kind, floor, min_samples):
                break
            highest = r
        return highest

    def rows(self) -> list[FidelityRow]:
        """Every grid r and every measured r, by r then kind; unmeasured rows have no mean."""
        stats, top5, drops = self._snapshot()
        kinds = [kind for kind in KINDS if kind in self.kinds or any(k == kind for _, k in stats)]
        rs = sorted({*self.rs, *(r for r, _ in stats)})
        rows = []
        for r in rs:
            for kind in kinds:
                if r == 0:
                    rows.append(self.estimate(0, kind))
                elif (r, kind) in stats:
                    overlap = top5.get(r) if kind == "agreement" else None
                    rows.append(self._row(r, kind, stats[r, kind], overlap, drops.get(r)))
                else:
                    rows.append(FidelityRow(r, kind, 0, None, None, accuracy_drop=drops.get(r)))
        return rows

    # -- the file format --------------------------------------------------------------------------

    def to_json(self, about: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The table as a JSON-ready dict (docs/fidelity.md): ``{"format", "models": {model: {...about,
        "rows": {r: {kind: {...}}}}}}``. ``lower`` is written for people; :meth:`from_json` recomputes it."""
        stats, top5, drops = self._snapshot()
        rows: dict[str, dict[str, Any]] = {}
        for (r, kind), running in sorted(stats.items()):
            row = self._row(r, kind, running)
            entry: dict[str, Any] = {"samples": row.samples, "mean": row.mean, "lower": row.lower}
            if kind == "cosine":
                entry["variance"] = running.variance
            elif r in top5:
                entry["top5_overlap"] = top5[r].mean
            rows.setdefault(str(r), {})[kind] = entry
        for r, drop in sorted(drops.items()):
            rows.setdefault(str(r), {})["accuracy_drop"] = {
                "labelled": drop.labelled,
                "top1": drop.top1,
                "top5": drop.top5,
            }
        model = {**(about or {}), "sources": self.sources, "rows": rows}
        return {"format": FORMAT, "confidence": CONFIDENCE, "bounds": BOUNDS, "models": {self.model: model}}

    @classmethod
    def from_json(
        cls, data: Any, model: str, rs: Sequence[int] = (0,), kinds: Sequence[str] = KINDS
    ) -> FidelityTable | None:
        """The table of ``model`` in ``data`` (what :meth:`to_json` wrote), or None when it has none;
        ValueError, in one line, for anything malformed."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f'not a fidelity profile: expected "format": "{FORMAT}"')
        models = data.get("models")
        if not isinstance(models, dict):
            raise ValueError('"models" must be an object keyed by model name')
        entry = models.get(model)
        if entry is None:
            return None
        rows = entry.get("rows") if isinstance(entry, dict) else None
        if not isinstance(rows, dict):
            raise ValueError(f'{model}: "rows" must be an object keyed by r')
        table = cls(model, rs, kinds)
        table.about = {key: value for key, value in entry.items() if key not in ("rows", "sources")}
        sources = entry.get("sources", {})
        if not isinstance(sources, dict) or not all(isinstance(n, int) for n in sources.values()):
            raise ValueError(f'{model}: "sources" must map each source to a count of comparisons')
        table._sources = {str(name): n for name, n in sources.items()}
        for r_text, kinds in rows.items():
            table._load_row(_r_of(r_text, model), kinds, f"{model} r={r_text}")
        return table

    # -- internals --------------------------------------------------------------------------------

    def _stats_of(self, r: int, kind: str) -> _Running:
        return self._stats.setdefault((r, kind), _Running())

    def _snapshot(self) -> _Snapshot:
        with self._lock:
            stats = {key: running.copy() for key, running in self._stats.items() if running.n}
            return stats, {r: v.copy() for r, v in self._top5.items()}, dict(self._drops)

    @staticmethod
    def _row(
        r: int,
        kind: str,
        running: _Running,
        top5: _Running | None = None,
        drop: AccuracyDrop | None = None,
    ) -> FidelityRow:
        mean = running.mean
        if kind == "agreement":
            agreeing = round(mean * running.n)  # a count: exact, whatever order the 0s and 1s came in
            mean, lower = agreeing / running.n, wilson_lower(agreeing, running.n)
        else:
            lower = bounded_mean_lower(mean, running.variance, running.n)
        overlap = top5.mean if top5 is not None and top5.n else None
        return FidelityRow(r, kind, running.n, mean, lower, overlap, drop)

    def _load_row(self, r: int, kinds: Any, where: str) -> None:
        if not isinstance(kinds, dict):
            raise ValueError(f"{where}: expected an object of kinds")
        for kind, entry in kinds.items():
            if r == 0:
                continue  # the reference: fidelity 1 by definition
            if kind == "accuracy_drop":
                self._drops[r] = _drop_of(entry, where)
                continue
            if kind not in KINDS:
                raise ValueError(f"{where}: unknown kind {kind!r} (expected {', '.join(KINDS)})")
            samples, mean = _field(entry, "samples", where, int), _field(entry, "mean", where, float)
            low = 0.0 if kind == "agreement" else -1.0
            if samples < 1 or not low <= mean <= 1.0:
                raise ValueError(f"{where} {kind}: samples must be >= 1 and mean in [{low:g}, 1]")
            if kind == "cosine":
                variance = _field(entry, "variance", where, float)
                self._stats[(r, kind)] = _Running(samples, mean, variance * (samples - 1))
            else:
                agreeing = round(mean * samples)
                self._stats[(r, kind)] = _Running(samples, agreeing / samples, _m2_of(agreeing, samples))
                if "top5_overlap" in entry:
                    self._top5[r] = _Running(samples, _field(entry, "top5_overlap", where, float))


def load_profile(path: Path, model: str, rs: Sequence[int]) -> FidelityTable | None:
    """``model``'s table in the profile at ``path`` (TOME_FIDELITY_PROFILE), or None when the profile
    has none; ValueError naming the file for a profile that cannot be read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return FidelityTable.from_json(data, model, rs)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise ValueError(f"TOME_FIDELITY_PROFILE {path}: {exc}") from None


def _r_of(text: str, model: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{model}: r must be a non-negative integer, got {text!r}")
    return int(text)


def _field(entry: Any, name: str, where: str, kind: type) -> Any:
    value = entry.get(name) if isinstance(entry, dict) else None
    ok = isinstance(value, int) if kind is int else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or (kind is float and not math.isfinite(value)):
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"{where}: {name!r} must be {what}, got {value!r}")
    return kind(value)


def _drop_of(entry: Any, where: str) -> AccuracyDrop:
    labelled, top1 = _field(entry, "labelled", where, int), _field(entry, "top1", where, float)
    top5 = None if entry.get("top5") is None else _field(entry, "top5", where, float)
    return AccuracyDrop(labelled, top1, top5)


def _merge_drops(old: AccuracyDrop | None, new: AccuracyDrop) -> AccuracyDrop:
    """Two profiles' drops, weighted by their labelled images."""
    if old is None:
        return new
    total = old.labelled + new.labelled
    top1 = (old.top1 * old.labelled + new.top1 * new.labelled) / total
    top5 = None
    if old.top5 is not None and new.top5 is not None:
        top5 = (old.top5 * old.labelled + new.top5 * new.labelled) / total
    return AccuracyDrop(total, top1, top5)


def _m2_of(successes: int, samples: int) -> float:
    """Sum of squared deviations of ``successes`` ones and the rest zeros."""
    return successes * (samples - successes) / samples
