"""Speed sweep: images/s of a ToMe-patched timm model against the unpatched model, over r and batch size.

    tome-bench --model vit_small_patch16_224 --r 0,8,16 --batch-sizes 1 8 --out bench-out

All variants of one batch size are timed interleaved in one process, so the speedups compare like
with like. Writes a table to stdout and ``results.csv``, ``results.json`` and (with matplotlib) ``speed.png``
to --out.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch

import tome
from tome_runtime.hardware import cpu_flags, cpu_name

from .timing import interleaved_seconds

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Row:
    model: str
    device: str
    dtype: str
    batch_size: int
    r: int | None  # None: the unpatched timm model
    images_per_s: float
    speedup: float
    gmacs: float


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tome-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--model-kwargs", default="{}", help="JSON of extra timm create_model kwargs")
    parser.add_argument(
        "--r",
        nargs="+",
        default=["0,4,8,12,16"],
        metavar="R",
        help="r values, e.g. --r 0,4,8 (spaces work too: --r 0 4 8); at most tome.largest_useful_r "
        "(default: 0,4,8,12,16)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=10, help="timed calls per variant (median is kept)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    try:
        args.r = tome.parse_r_values(args.r)
    except ValueError as error:
        parser.error(str(error))
    if any(b < 1 for b in args.batch_sizes):
        parser.error("batch sizes must be >= 1")
    return args


def _check_r(model: torch.nn.Module, name: str, rs: list[int]) -> None:
    """The server's range: 0 to tome.largest_useful_r; anything above exits with status 2."""
    top = tome.largest_useful_r(model)
    bad = [r for r in rs if r > top]
    if bad:
        print(
            f"tome-bench: error: r={bad[0]} is out of range for {name}: r must lie in 0..{top} "
            f"(r={top} already leaves the fewest output tokens)",
            file=sys.stderr,
        )
        raise SystemExit(2)


def _variants(baseline, patched, x: torch.Tensor, rs: list[int]) -> dict[str, Callable[[], object]]:
    def run_patched(r: int) -> Callable[[], object]:
        def call() -> object:
            with tome.merging(r=r):
                return patched(x)

        return call

    variants: dict[str, Callable[[], object]] = {"timm": lambda: baseline(x)}
    variants.update({f"r={r}": run_patched(r) for r in rs})
    return variants


def _progress(batch: int, rounds: int) -> Callable[[int], None]:
    def report(i: int) -> None:
        print(f"\r  batch {batch}: round {i + 1}/{rounds}", end="", file=sys.stderr, flush=True)
        if i + 1 == rounds:
            print(file=sys.stderr)

    return report


def sweep(args: argparse.Namespace) -> list[Row]:
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    baseline = timm.create_model(args.model, pretrained=False, **json.loads(args.model_kwargs))
    baseline = baseline.eval().to(args.device, dtype)
    _check_r(baseline, args.model, args.r)
    patched = tome.patch(copy.deepcopy(baseline))
    gmacs = {c.r: c.gmacs for c in tome.cost_table(baseline, sorted({0, *args.r}))}
    size = baseline.patch_embed.img_size
    rows = []
    for batch in args.batch_sizes:
        x = torch.randn(batch, 3, *size, device=args.device, dtype=dtype)
        variants = _variants(baseline, patched, x, args.r)
        seconds = interleaved_seconds(
            variants, args.rounds, args.warmup, args.device, _progress(batch, args.rounds)
        )
        base_rate = batch / seconds["timm"]
        for name, secs in seconds.items():
            r = None if name == "timm" else int(name[2:])
            rate = batch / secs
            cost = gmacs[r or 0]
            rows.append(Row(args.model, args.device, args.dtype, batch, r, rate, rate / base_rate, cost))
    return rows


def _table(rows: list[Row]) -> str:
    lines = [f"{'batch':>5} {'variant':>8} {'img/s':>9} {'speedup':>8} {'GMACs':>7}"]
    for row in rows:
        name = "timm" if row.r is None else f"r={row.r}"
        line = (
            f"{row.batch_size:>5} {name:>8} {row.images_per_s:>9.2f} {row.speedup:>7.3f}x {row.gmacs:>7.2f}"
        )
        lines.append(line)
    return "\n".join(lines)


def _write(rows: list[Row], out: Path, machine: str) -> list[str]:
    """Writes the results (and the plot, if matplotlib is there); returns the names written."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    (out / "results.json").write_text(
        json.dumps({"machine": machine, "rows": [asdict(r) for r in rows]}, indent=2)
    )
    written = ["results.csv", "results.json"]
    if _plot(rows, out / "speed.png", machine):
        written.append("speed.png")
    return written


def _plot(rows: list[Row], path: Path, machine: str) -> bool:
    """Draws the plot to ``path``; False (with a note on stderr) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "matplotlib is not installed (pip install 'tome-serve[bench]'): no plot written", file=sys.stderr
        )
        return False
    merged = [row for row in rows if row.r is not None]
    batches = sorted({row.batch_size for row in rows})
    rs = sorted({row.r for row in merged})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for batch in batches:
        points = [row for row in merged if row.batch_size == batch]
        left.plot([p.r for p in points], [p.images_per_s for p in points], marker="o", label=f"batch {batch}")
        base = next(row for row in rows if row.batch_size == batch and row.r is None)
        left.axhline(base.images_per_s, linestyle=":", color=left.lines[-1].get_color())
    left.set(xlabel="r (tokens merged per layer)", ylabel="images/s", title="Throughput vs r (dotted: timm)")
    left.legend()
    for r in rs:
        points = [row for row in merged if row.r == r]
        right.plot([p.batch_size for p in points], [p.speedup for p in points], marker="o", label=f"r={r}")
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_xscale("log", base=2)
    right.set_xticks(batches, [str(b) for b in batches])
    right.set(xlabel="batch size", ylabel="speedup vs timm", title="Speedup vs batch size")
    right.legend()
    fig.suptitle(f"{rows[0].model}, {rows[0].dtype}, {machine}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def describe_machine(device: str) -> str:
    """The GPU's name, or the CPU's model name and the flags that decide its matrix-multiply speed."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    name, flags = cpu_name() or platform.machine(), cpu_flags()
    simd = [flag for flag in SIMD_FLAGS if flag in flags]
    amx = "" if not flags or "amx_tile" in flags else ", no AMX"
    listed = f" ({' '.join(simd)}{amx})" if simd else ""
    return f"{name}{listed}, {torch.get_num_threads()} torch threads"


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    rows = sweep(args)
    machine = describe_machine(args.device)
    print(f"{args.model} on {machine}, {args.dtype}")
    print(_table(rows))
    written = _write(rows, args.out, machine)
    print(f"wrote {', '.join(str(args.out / name) for name in written)}")


if __name__ == "__main__":
    main()
