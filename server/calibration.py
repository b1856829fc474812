"""Start-up calibration: a folder of images, run at r=0 and at every r of the grid with every merge
rule, fills a model's fidelity tables (one per rule) before the first request (``tome_runtime.fidelity``).

The images are TOME_CALIBRATION_DIR's, or the repository's sample photos (server/static/samples), each
decoded and preprocessed exactly as an upload is (``images.py``). They are run in batches: each batch
at r=0 (the reference, the same for every rule: r=0 merges nothing) and then at every grid r in
ascending order, each r with every rule, the default rule first, so when the budget
(TOME_CALIBRATION_BUDGET_S) runs out the small r, which a floor reaches first, have the most samples,
and the default rule has at least as many as any other.

Four sample photos give four samples per r: bounds that loose never meet a useful floor, and an r needs
TOME_FIDELITY_MIN_SAMPLES samples anyway. Bring a folder of images like the traffic, a profile from
tome-eval, or shadow runs (``shadow.py``), for a floor that means something.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tome_runtime.fidelity import Comparison, FidelityTable, Outputs, wilson_lower

from .errors import ImageError
from .images import decode_image
from .loading import LoadedModel

log = logging.getLogger(__name__)

SAMPLES_DIR = Path(__file__).resolve().parent / "static" / "samples"
"""The default calibration folder: the demo page's sample photos."""
SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})

Runner = Callable[[int, list[torch.Tensor], str], Outputs]
"""Runs a batch of preprocessed images at r with a merge rule on an inference thread
(``InferenceWorker.outputs``)."""


@dataclass
class CalibrationReport:
    images: int = 0
    """Images run at r=0 and at one r or more."""
    unreadable: list[str] = field(default_factory=list)
    runs: int = 0
    """Batches run (r=0 included)."""
    complete: bool = True
    """Every image ran at every grid r with every rule within the budget."""
    rules: tuple[str, ...] = ()
    """The merge rules calibrated, the default first."""


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` and below it, by name."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and not p.name.startswith("."))


def origin(profile: Path | None, folder: Path) -> dict[str, str | None]:
    """What a fidelity table was measured from: the profile's bytes and the calibration images' names
    and sizes, each as a digest (server/state.py keeps a table only with its origin)."""
    images = hashlib.sha256()
    for path in image_files(folder) if folder.is_dir() else []:
        images.update(f"{path.relative_to(folder)}:{path.stat().st_size};".encode())
    profiled = hashlib.sha256(profile.read_bytes()).hexdigest() if profile and profile.is_file() else None
    return {"profile": profiled, "calibration": f"{folder.resolve()} sha256:{images.hexdigest()}"}


def calibrate(
    tables: Mapping[str, FidelityTable],
    run: Runner,
    model: LoadedModel,
    files: Sequence[Path],
    *,
    batch_size: int,
    budget_s: float,
    max_pixels: int,
    clock: Callable[[], float] = time.monotonic,
) -> CalibrationReport:
    """Fill ``tables`` (per merge rule, the default rule's first; one grid) from ``files`` within
    ``budget_s`` seconds (see the module docstring)."""
    report = CalibrationReport(rules=tuple(tables))
    deadline = clock() + budget_s
    slowest = 0.0  # the longest batch so far: a batch that would overrun the budget is not started
    grid = next(iter(tables.values())).rs
    runs = [(0, report.rules[0])] + [(r, rule) for r in grid if r > 0 for rule in report.rules]
    for pixels in _batches(files, model, max_pixels, batch_size, report):
        reference = None
        for r, rule in runs:
            if clock() + slowest > deadline:
                report.complete = False
                return report
            started = clock()
            outputs = run(r, pixels, rule)
            slowest = max(slowest, clock() - started)
            report.runs += 1
            if reference is None:
                reference = outputs
                report.images += len(pixels)
            else:
                tables[rule].add(r, Comparison.of(reference, outputs), "calibration")
    return report


def _batches(
    files: Sequence[Path], model: LoadedModel, max_pixels: int, batch_size: int, report: CalibrationReport
) -> Iterator[list[torch.Tensor]]:
    """Preprocessed images, ``batch_size`` at a time, decoded only when needed; files that do not
    decode are counted in ``report`` and skipped."""
    batch: list[torch.Tensor] = []
    for path in files:
        try:
            image = decode_image(path.read_bytes(), max_pixels, model.preprocessor.resize_short_side)
            batch.append(model.preprocessor(image))
        except (OSError, ImageError) as exc:
            report.unreadable.append(f"{path.name} ({exc})")
            continue
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def describe(
    report: CalibrationReport, folder: Path, grid: Sequence[int], seconds: float, min_samples: int
) -> str:
    """One log line: what was measured, and how loose so few images leave the bounds."""
    where = "the sample photos" if folder == SAMPLES_DIR else str(folder)
    text = (
        f"fidelity calibration: {report.images} image(s) from {where} at r=0 and r in "
        f"{list(grid[1:])} with merge rules {', '.join(report.rules)} in {seconds:.1f} s"
    )
    if not report.complete:
        text += " (budget TOME_CALIBRATION_BUDGET_S reached: the larger r have fewer samples or none)"
    if report.images and report.images < min_samples:
        text += (
            f"; fewer than TOME_FIDELITY_MIN_SAMPLES={min_samples} images: no r > 0 meets a fidelity floor "
            "until a profile or shadow runs add samples"
        )
    elif report.images:
        best = wilson_lower(report.images, report.images)
        text += f"; even full agreement on {report.images} images bounds agreement at {best:.3f} or less"
    if report.unreadable:
        text += f"; skipped {len(report.unreadable)} unreadable: {', '.join(report.unreadable[:3])}"
    return text
