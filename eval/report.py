"""Output of tome-eval: terminal tables, CSV and JSON files, and the accuracy-vs-throughput plot."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .combine import Cell
from .data import Sample
from .runner import PerImage
from .sweep import SweepRow


def text_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(row) for row in rows]
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def sweep_table(rows: list[SweepRow]) -> str:
    headers = [
        "r",
        "GMACs",
        "tokens out",
        "img/s",
        "speedup",
        "speedup IQR",
        "top-1 %",
        "drop",
        "top-5 %",
        "drop",
        "agree %",
        "cos mean",
        "cos min",
    ]
    body = []
    for row in rows:
        q = row.quality
        body.append(
            [
                str(row.r),
                f"{row.gmacs:.3f}",
                str(row.tokens_out),
                num(row.images_per_second, ".1f"),
                num(row.speedup, ".2f") + ("x" if row.speedup else ""),
                _spread(row),
                pct(q and q.top1),
                pct(row.top1_drop),
                pct(q and q.top5),
                pct(row.top5_drop),
                pct(q and q.agreement),
                num(q and q.cosine_mean, ".4f"),
                num(q and q.cosine_min, ".4f"),
            ]
        )
    return text_table(headers, body)


def _spread(row: SweepRow) -> str:
    """The per-round speed ratios' middle half (quartiles), to read the speedup's noise by."""
    if row.speedup_low is None or row.speedup_high is None:
        return "n/a"
    return f"{row.speedup_low:.2f}-{row.speedup_high:.2f}"


def matrix(cells: dict[tuple[str, int], Cell], r_values: list[int], value: Any) -> str:
    """Rows: optimisation, columns: r; ``value(cell)`` gives each entry's text."""
    names = list(dict.fromkeys(name for name, _ in cells))
    return text_table(
        ["optimisation", *(f"r={r}" for r in r_values)],
        [[name, *(value(cells[name, r]) for r in r_values)] for name in names],
    )


def combo_tables(
    cells: dict[tuple[str, int], Cell], r_values: list[int], labelled: bool, classifier: bool
) -> str:
    def speed(cell: Cell) -> str:
        return "failed" if cell.error else num(cell.speedup, ".2f") + ("x" if cell.speedup else "")

    parts = ["Speedup against plain fp32 at r=0 (same interleaved run):", matrix(cells, r_values, speed)]
    if any(c.quality for c in cells.values()):
        if classifier:
            parts += [
                "",
                "Top-1 agreement with plain fp32 at r=0, %:",
                matrix(cells, r_values, lambda c: pct(c.quality and c.quality.agreement)),
            ]
        parts += [
            "",
            "Mean cosine of pre-logits features to plain fp32 at r=0:",
            matrix(cells, r_values, lambda c: num(c.quality and c.quality.cosine_mean, ".4f")),
        ]
        if labelled and classifier:
            parts += [
                "",
                "Top-1 accuracy, % (drop against plain fp32 at r=0):",
                matrix(
                    cells, r_values, lambda c: f"{pct(c.quality and c.quality.top1)} ({pct(c.top1_drop)})"
                ),
            ]
    first = [c for c in cells.values() if c.first_call_seconds is not None and "compile" in c.optimisation]
    if first:
        parts += [
            "",
            "First call (compile) seconds, counted apart from the timing:",
            matrix(
                {(c.optimisation, c.r): c for c in first},
                r_values,
                lambda c: f"{num(c.first_call_seconds, '.1f')} ({c.graphs} graphs)",
            ),
        ]
    errors = sorted({f"{c.optimisation}: {c.error}" for c in cells.values() if c.error})
    if errors:
        parts += ["", "Failed:", *errors]
    return "\n".join(parts)


def cell_record(cell: Cell) -> dict[str, Any]:
    record = {k: v for k, v in asdict(cell).items() if k != "quality"}
    quality = asdict(cell.quality) if cell.quality else {}
    for key in ("top1", "top5", "agreement", "cosine_mean", "cosine_min"):
        record[key] = quality.get(key)
    return record


def write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in records)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, default=str, allow_nan=False) + "\n", encoding="utf-8")


def write_per_image(path: Path, per_image: PerImage, samples: Sequence[Sample], label: Any) -> None:
    """One row per readable image: its file, label, and top-1 and cosine of each variant."""
    keys: list[Hashable] = list(per_image.cosine)
    header = [
        "file",
        "label",
        *(f"top1 {label(k)}" for k in per_image.top1),
        *(f"cos {label(k)}" for k in keys),
    ]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i, index in enumerate(per_image.indices):
            writer.writerow(
                [
                    str(samples[index].path),
                    "" if per_image.labels[i] < 0 else per_image.labels[i],
                    *(per_image.top1[k][i] for k in per_image.top1),
                    *(f"{per_image.cosine[k][i]:.6f}" for k in keys),
                ]
            )


def plot_sweep(path: Path, rows: list[SweepRow], title: str) -> str | None:
    """The paper's model-sweep view: quality against throughput, one point per r, labelled with r.

    Quality is top-1 accuracy when labelled, else agreement with r=0, else (a backbone) mean cosine.
    Returns what the y axis shows, or None when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    y_name, ys = _plot_quality(rows)
    timed = all(row.images_per_second for row in rows)
    xs = [row.images_per_second if timed else row.gmacs for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    ax.plot(xs, ys, "-o", color="tab:blue")
    for x, y, row in zip(xs, ys, rows, strict=True):
        if y is not None and not math.isnan(y):
            ax.annotate(f"r={row.r}", (x, y), textcoords="offset points", xytext=(4, 5), fontsize=8)
    ax.set_xlabel("throughput (img/s)" if timed else "GMACs per image")
    if not timed:
        ax.invert_xaxis()  # cheaper to the right, like throughput
    ax.set_ylabel(y_name)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return y_name


def _plot_quality(rows: list[SweepRow]) -> tuple[str, list[float]]:
    def values(attr: str) -> list[float | None]:
        return [getattr(row.quality, attr) if row.quality else None for row in rows]

    choices = (
        ("top1", "top-1 accuracy (%)", 100),
        ("agreement", "top-1 agreement with r=0 (%)", 100),
        ("cosine_mean", "mean cosine to r=0 features", 1),
    )
    for attr, name, scale in choices:
        found = values(attr)
        if all(v is not None for v in found):
            return name, [scale * v for v in found]
    return "GMACs per image", [row.gmacs for row in rows]
