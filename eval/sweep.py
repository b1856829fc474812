"""The r sweep: quality over a folder and speed on one batch for each r, against r=0."""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import asdict, dataclass
from typing import Any

import timm
import torch
import torch.nn as nn

import tome
from tome_runtime.hardware import cpu_name

from .data import Listing
from .errors import EvalInputError
from .metrics import Quality
from .runner import FolderRun, Timing, heads, outputs_at


@dataclass(frozen=True)
class SweepRow:
    r: int
    gmacs: float
    tokens_out: int
    """Tokens leaving the last block (prefix tokens included)."""
    images_per_second: float | None
    speedup: float | None
    """Throughput relative to r=0: the median of the per-round ratios of the interleaved run."""
    speedup_low: float | None
    """The per-round ratios' lower quartile: with ``speedup_high``, how much the machine's noise
    moved them. A wide range means the ratio cannot be trusted to its second digit."""
    speedup_high: float | None
    quality: Quality | None
    top1_drop: float | None
    """r=0 top-1 minus this r's top-1, as a fraction (0.012 = 1.2 points)."""
    top5_drop: float | None

    def flat(self) -> dict[str, Any]:
        row = {k: v for k, v in asdict(self).items() if k != "quality"}
        quality = asdict(self.quality) if self.quality else {}
        quality.pop("images", None)
        return {**row, **{k: quality.get(k) for k in Quality.__dataclass_fields__ if k != "images"}}


def check_r_values(values: list[int], model: nn.Module, model_name: str) -> list[int]:
    """Sorted, de-duplicated, always with the r=0 reference; out-of-range values are an input error.
    The range is the server's: 0 to :func:`tome.largest_useful_r`."""
    top = tome.largest_useful_r(model)
    bad = [r for r in values if not 0 <= r <= top]
    if bad:
        raise EvalInputError(
            f"r={bad[0]} is out of range for {model_name}: r must lie in 0..{top} (with "
            f"{tome.input_tokens(model)} input tokens, r={top} already leaves the fewest output tokens)"
        )
    return sorted({0, *values})


def rows_for(
    model: nn.Module,
    r_values: list[int],
    timing: Timing | None,
    batch_size: int,
    folder: FolderRun | None,
) -> list[SweepRow]:
    has_classifier = bool(model.num_classes)
    quality = {r: folder.tallies[r].summary(has_classifier) for r in r_values} if folder else {}
    base = quality.get(0)
    seconds = timing.seconds if timing else {}
    rows = []
    for cost in tome.cost_table(model, r_values):
        r, q = cost.r, quality.get(cost.r)
        low, middle, high = _quartiles(timing.speedups(0, r)) if timing else (None, None, None)
        rows.append(
            SweepRow(
                r=r,
                gmacs=cost.gmacs,
                tokens_out=cost.output_tokens,
                images_per_second=batch_size / seconds[r] if timing else None,
                speedup=middle,
                speedup_low=low,
                speedup_high=high,
                quality=q,
                top1_drop=_drop(base.top1 if base else None, q.top1 if q else None),
                top5_drop=_drop(base.top5 if base else None, q.top5 if q else None),
            )
        )
    return rows


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    """Lower quartile, median and upper quartile (by linear interpolation; one value: itself)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    low, middle, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, middle, high


NOISY_SPREAD = 0.10
"""A speed ratio whose per-round quartiles lie further apart than this fraction of it is flagged."""


def speed_warnings(rows: list[SweepRow]) -> list[str]:
    """The speed ratios the machine's noise moved too much to trust, in words."""
    noisy = [row for row in rows if _is_noisy(row)]
    if not noisy:
        return []
    shown = ", ".join(f"r={row.r} {row.speedup_low:.2f}-{row.speedup_high:.2f}x" for row in noisy)
    return [
        f"the speed ratios varied between timing rounds by more than {NOISY_SPREAD:.0%} ({shown}): other "
        "work on the machine, or too few rounds; rerun on an idle machine, with more --timing-rounds or a "
        "fixed --threads, before trusting the speedup column"
    ]


def _is_noisy(row: SweepRow) -> bool:
    if row.speedup is None or row.speedup_low is None or row.speedup_high is None:
        return False
    return row.speedup_high - row.speedup_low > NOISY_SPREAD * row.speedup


RANDOM_WEIGHTS = (
    "the weights are random: agreement, cosine and accuracy against r=0 say little about what merging "
    "costs a trained model (random weights barely react to merging: cosine stays near 1.0000 at every r); "
    "use --weights pretrained or a weights file to judge quality"
)
RANDOM_HEAD = (
    "the classifier head is random (the weights file has none): accuracy and top-1 agreement with r=0 "
    "compare arg-maxes of a random projection and say little; the features' cosine is the measure"
)


def _drop(reference: float | None, value: float | None) -> float | None:
    return None if reference is None or value is None else reference - value


def sweep_variants(model: nn.Module, r_values: list[int]) -> dict[int, Any]:
    forward = heads(model)
    return {r: outputs_at(forward, r) for r in r_values}


def machine() -> str:
    """A short description of where the numbers were taken."""
    name = cpu_name() or platform.machine()
    cpu = f"{name}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, {platform.system()}"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({cpu})"
    return cpu


def run_info(
    model_name: str,
    weights: str,
    head_is_random: bool,
    device: torch.device,
    listing: Listing | None,
    unreadable: list[str],
    **extra: Any,
) -> dict[str, Any]:
    return {
        "model": model_name,
        "weights": weights,
        "head": "random (not from the weights)" if head_is_random else "from the weights",
        "device": str(device),
        "machine": machine(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "layout": listing.layout if listing else None,
        "images": len(listing.samples) - len(unreadable) if listing else 0,
        "unreadable": len(unreadable),
        "unreadable_files": unreadable,
        "ignored_files": listing.ignored if listing else 0,
        **extra,
    }
