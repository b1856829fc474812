"""The r sweep: quality over a folder and speed on one batch for each r, against r=0."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from typing import Any

import timm
import torch
import torch.nn as nn

import tome

from .data import Listing
from .errors import EvalInputError
from .metrics import Quality
from .runner import FolderRun, heads, outputs_at


@dataclass(frozen=True)
class SweepRow:
    r: int
    gmacs: float
    tokens_out: int
    """Tokens leaving the last block (prefix tokens included)."""
    images_per_second: float | None
    speedup: float | None
    """Throughput relative to r=0, from the same interleaved run."""
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
    seconds: dict[int, float] | None,
    batch_size: int,
    folder: FolderRun | None,
) -> list[SweepRow]:
    has_classifier = bool(model.num_classes)
    quality = {r: folder.tallies[r].summary(has_classifier) for r in r_values} if folder else {}
    base = quality.get(0)
    rows = []
    for cost in tome.cost_table(model, r_values):
        r, q = cost.r, quality.get(cost.r)
        rows.append(
            SweepRow(
                r=r,
                gmacs=cost.gmacs,
                tokens_out=cost.output_tokens,
                images_per_second=batch_size / seconds[r] if seconds else None,
                speedup=seconds[0] / seconds[r] if seconds else None,
                quality=q,
                top1_drop=_drop(base.top1 if base else None, q.top1 if q else None),
                top5_drop=_drop(base.top5 if base else None, q.top5 if q else None),
            )
        )
    return rows


def _drop(reference: float | None, value: float | None) -> float | None:
    return None if reference is None or value is None else reference - value


def sweep_variants(model: nn.Module, r_values: list[int]) -> dict[int, Any]:
    forward = heads(model)
    return {r: outputs_at(forward, r) for r in r_values}


def machine() -> str:
    """A short description of where the numbers were taken."""
    cpu = f"{os.cpu_count()} CPU cores, {platform.machine()}, {platform.system()}"
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
