"""Issue 10's goals table: ToMe against unpatched timm, per model, dtype and batch size, in one command.

    python -m tome_bench.goals                                  # ViT-S/16 and ViT-B/16, float32 and bfloat16
    python -m tome_bench.goals --models vit_small_patch16_224 --batch-sizes 1 8 --compile

For every (model, dtype, batch size) the unpatched timm model and the patched model at each r are
timed interleaved in one process (random weights; medians of the rounds), so each ratio compares like
with like. bfloat16 at batch 1 sweeps every r from 4 to the model's largest useful r, the other cells
r = 0, 8, 16 and the largest. ``--compile`` adds torch.compile'd timm and tome.compiled cells
(one graph per r and batch size) for ratios against eager timm, and reports each cell's compile time.
The goals are checked and printed under the table with the CPU's model name and flags.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch

import tome

from .speed import describe_machine
from .timing import interleaved_seconds

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROUNDS = {1: 30, 8: 8, 32: 3}


def r_values(dtype: str, batch: int, r_max: int) -> list[int]:
    if dtype != "float32" and batch == 1:
        return [0, *range(4, r_max + 1)]
    return sorted({0, 8, 16, r_max})


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tome_bench.goals", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    parser.add_argument("--model-kwargs", default="{}", help="JSON of extra timm create_model kwargs")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--rounds-scale", type=float, default=1.0, help=f"times the default rounds per batch size {ROUNDS}"
    )
    parser.add_argument("--compile", action="store_true", help="also time compiled timm and compiled tome")
    parser.add_argument("--compile-r", type=int, nargs="+", default=[8, 16], help="r values compiled")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.batch_sizes):
        parser.error("batch sizes must be >= 1")
    return args


def _patched(model, x: torch.Tensor, r: int) -> Callable[[], object]:
    def call() -> object:
        with tome.merging(r=r):
            return model(x)

    return call


def measure_cell(args, name: str, dtype_name: str, batch: int) -> dict:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    baseline = timm.create_model(name, pretrained=False, **json.loads(args.model_kwargs))
    baseline = baseline.eval().to(args.device, dtype)
    patched = tome.patch(copy.deepcopy(baseline))
    r_max = tome.largest_useful_r(baseline)
    rs = r_values(dtype_name, batch, r_max)
    x = torch.randn(batch, 3, *baseline.patch_embed.img_size, device=args.device, dtype=dtype)
    variants: dict[str, Callable[[], object]] = {"timm": lambda: baseline(x)}
    variants.update({f"r={r}": _patched(patched, x, r) for r in rs})
    compile_s: dict[str, float] = {}
    if args.compile:
        from tome.compiled import CompiledToMe

        start = time.perf_counter()
        compiled_timm = torch.compile(copy.deepcopy(baseline), dynamic=False)
        with torch.inference_mode():
            compiled_timm(x)
        compile_s["timm"] = time.perf_counter() - start
        variants["timm compiled"] = lambda: compiled_timm(x)
        runner = CompiledToMe(patched, buckets=(batch,))
        for r in args.compile_r:
            compile_s[f"r={r}"] = runner.compile_cell(r, batch, x)
            variants[f"r={r} compiled"] = lambda r=r: runner(x, r)
    rounds = max(2, round(ROUNDS.get(batch, 3) * args.rounds_scale))
    print(f"{name} {dtype_name} batch {batch}: {len(variants)} variants x {rounds} rounds", file=sys.stderr)
    seconds = interleaved_seconds(variants, rounds, warmup=2, device=args.device)
    base = seconds["timm"]
    return {
        "model": name,
        "dtype": dtype_name,
        "batch": batch,
        "rounds": rounds,
        "r_max": r_max,
        "timm_images_per_s": batch / base,
        "ratio": {key: base / secs for key, secs in seconds.items() if key != "timm"},
        "compile_s": compile_s,
    }


def check_goals(cells: list[dict]) -> list[str]:
    """One line per goal of issue 10 that the measured cells speak to: PASS/MISS with the figure."""
    lines = []

    def line(where: str, goal: str, value: float, target: float, ratio_at: str = "") -> None:
        verdict = "PASS" if value >= target else "MISS"
        lines.append(f"{verdict} {where}: {goal} {value:.2f}x{ratio_at} (goal >= {target}x)")

    for cell in cells:
        ratio, where = cell["ratio"], f"{cell['model']} {cell['dtype']} batch {cell['batch']}"

        line(where, "r=0", ratio["r=0"], 0.98)
        if cell["dtype"] == "bfloat16" and cell["batch"] == 1:
            eager = {k: v for k, v in ratio.items() if not k.endswith("compiled") and k != "r=0"}
            worst = min(eager, key=eager.get)
            line(where, f"every r in 4..{cell['r_max']}: worst", eager[worst], 1.0, f" at {worst}")
            if "r=16" in ratio:
                line(where, "r=16", ratio["r=16"], 1.4)
        elif cell["batch"] == 8 and cell["dtype"] in ("bfloat16", "float32") and "r=16" in ratio:
            line(where, "r=16", ratio["r=16"], 1.8 if cell["dtype"] == "bfloat16" else 1.9)
    return lines


def table(cells: list[dict]) -> str:
    columns = ["r=0", "r=4", "r=8", "r=12", "r=16", "r=max"]
    extra = sorted({k for c in cells for k in c["ratio"] if "compiled" in k}, key=len)
    head = ["model", "dtype", "batch", "rounds", "timm img/s", *columns, *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in cells:
        ratio = dict(cell["ratio"])
        ratio["r=max"] = ratio.get(f"r={cell['r_max']}")
        values = [f"{ratio[c]:.2f}x" if ratio.get(c) else "" for c in columns + extra]
        short = cell["model"].replace("vit_", "").replace("_patch16_224", "/16")
        row = [short, cell["dtype"], str(cell["batch"]), str(cell["rounds"])]
        lines.append("| " + " | ".join([*row, f"{cell['timm_images_per_s']:.1f}", *values]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cells = [
        measure_cell(args, name, dtype, batch)
        for name in args.models
        for dtype in args.dtypes
        for batch in args.batch_sizes
    ]
    machine = describe_machine(args.device)
    print(f"{machine}; torch {torch.__version__}, timm {timm.__version__}; r=max is the largest useful r")
    print(table(cells))
    for cell in cells:
        if cell["compile_s"]:
            times = ", ".join(f"{k} {v:.0f} s" for k, v in cell["compile_s"].items())
            print(f"compile time {cell['model']} {cell['dtype']} batch {cell['batch']}: {times}")
    print("\n".join(check_goals(cells)))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "cells": cells}, indent=2))


if __name__ == "__main__":
    main()
