"""r=auto against fixed r under open-loop load, one latency target (issue 12).

    python -m tome_bench.auto --model vit_small_patch16_224 --weights random --target-ms 1000

1. Starts ``python -m tome_serve`` (or uses ``--url``) with r=auto's settings (the target, the cap).
2. Measures the r=0 saturation throughput: closed-loop clients at fixed r=0, as ``tome_bench.serve``.
3. For every load in ``--loads`` (default 0.5x, 1x, 1.5x, 2x, 3x that throughput), serves the same
   seeded Poisson arrivals with each variant (default fixed r=0, fixed r=16, auto), the variants in
   a rotated order per load so slow drifts of the machine do not always hit the same one.
4. Per cell: goodput (answers within the target per second), 429 share, p50/p99 of the answered,
   mean r used (the answers' X-Tome-R). JSON and CSV to ``--out``, a plot of goodput and mean r
   against load beside them, and the issue's goals checked in ``verdict``.

With a fidelity floor (``--min-fidelity``, the server's TOME_MIN_FIDELITY, issue 18) r=auto may only
choose an r whose top-1 agreement with r=0 has a lower bound at the floor. The fidelity table comes
from start-up calibration (``--calibration-dir``, ``--calibration-budget-s``), a tome-eval profile
(``--fidelity-profile``) or both; ``--fidelity-min-samples`` is the samples an r needs. After the start
the benchmark reads the table from /models: the *qualifying* r are 0 and every r that meets the floor,
and the variant ``floor`` is the largest r r=auto may choose (``fidelity.max_r_at_floor``). Each cell
then also counts its *good* answers (within the target AND at a qualifying r) per second and the
answers at an r that does not qualify (the goal: none for auto). Without a floor every r qualifies.

Needs a server with r=auto wired in (issue 12, phase 2); against one without, it stops at the first
auto request with the server's 422. Clients share the machine with the server, as in
``tome_bench.serve``: name the machine beside any figure.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .extras import exit_for_missing
from .stats import cpu_description, load_average

try:
    import httpx
    import numpy as np
except ModuleNotFoundError as missing:
    exit_for_missing(missing)

from .serve import (
    Outcome,
    add_server_model_arguments,
    closed_loop,
    open_loop,
    start_server,
    summarize,
    test_image,
)

AUTO = "auto"
FLOOR = "floor"
"""The variant that stands for the largest r a fidelity floor allows (fixed at that r)."""


@dataclass(frozen=True)
class Cell:
    """One (load, variant) cell of the benchmark."""

    load: float
    """Offered rate as a multiple of the measured r=0 saturation throughput."""
    variant: str
    """"auto", or a fixed r as a string."""
    offered_rps: float
    sent: int
    answered: int
    within_target: int
    shed_429: int
    timed_out_504: int
    other_errors: int
    goodput_rps: float
    shed_share: float
    p50_ms: float | None
    p99_ms: float | None
    mean_r: float | None
    """Mean r of the answered requests, from their X-Tome-R header."""
    good_answers: int
    """Answered within the target at a qualifying r (every r without a fidelity floor)."""
    good_rps: float
    below_floor: int
    """Answered at an r that does not meet the fidelity floor (always 0 without one)."""


def cell_stats(
    outcomes: list[Outcome],
    target_s: float,
    seconds: float,
    load: float,
    variant: str,
    offered_rps: float,
    qualifying: frozenset[int] | None = None,
) -> Cell:
    """One cell's counts; ``qualifying`` is the set of r that meet the fidelity floor (None: no floor).
    An answer without its r (no X-Tome-R) never counts as at a qualifying r."""
    answered = [o for o in outcomes if o.status == 200]
    latencies = [o.latency_s for o in answered]
    used = [o.r for o in answered if o.r is not None]
    shed = sum(o.status == 429 for o in outcomes)
    timed_out = sum(o.status == 504 for o in outcomes)
    within = sum(o.latency_s <= target_s for o in answered)
    allowed = [o for o in answered if qualifying is None or o.r in qualifying]
    good = sum(o.latency_s <= target_s for o in allowed)
    return Cell(
        load=load,
        variant=variant,
        offered_rps=round(offered_rps, 2),
        sent=len(outcomes),
        answered=len(answered),
        within_target=within,
        shed_429=shed,
        timed_out_504=timed_out,
        other_errors=len(outcomes) - len(answered) - shed - timed_out,
        goodput_rps=round(within / seconds, 2),
        shed_share=round(shed / max(len(outcomes), 1), 4),
        p50_ms=_quantile_ms(latencies, 50),
        p99_ms=_quantile_ms(latencies, 99),
        mean_r=round(sum(used) / len(used), 2) if used else None,
        good_answers=good,
        good_rps=round(good / seconds, 2),
        below_floor=len(answered) - len(allowed),
    )


def _quantile_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def rotated(variants: list[str], index: int) -> list[str]:
    """The variants starting at a different one for every load."""
    shift = index % len(variants)
    return variants[shift:] + variants[:shift]


def verdict(cells: list[Cell], floor_load: float = 1.5) -> dict:
    """The issue's goals per load: auto's good answers per second (goodput, without a fidelity floor)
    at least the best fixed r's; none of auto's answers at an r below the floor; auto's mean r no
    larger than the smallest fixed r reaching that rate; at ``floor_load`` (a load the auto ceiling's
    capacity carries) >= 99% within target and <= 1% shed; at 0.5x a mean r of at most 2."""
    by_load: dict[float, dict[str, Cell]] = {}
    for cell in cells:
        by_load.setdefault(cell.load, {})[cell.variant] = cell
    result = {}
    for load, row in sorted(by_load.items()):
        auto = row.get(AUTO)
        fixed = {int(variant): cell for variant, cell in row.items() if variant != AUTO}
        if auto is None or not fixed:
            continue
        best = max(cell.good_rps for cell in fixed.values())
        reaching = [r for r, cell in sorted(fixed.items()) if cell.good_rps >= auto.good_rps]
        checks = {
            "auto_good_rps": auto.good_rps,
            "best_fixed_good_rps": best,
            "auto_over_best": round(auto.good_rps / best, 3) if best else None,
            "auto_at_least_best": auto.good_rps >= best,
            "auto_below_floor": auto.below_floor,
            "auto_mean_r": auto.mean_r,
            "smallest_fixed_r_reaching_auto": reaching[0] if reaching else None,
            "auto_r_no_larger": not reaching or (auto.mean_r or 0.0) <= reaching[0],
        }
        if load == floor_load:
            share_within = auto.within_target / max(auto.sent, 1)
            checks["auto_within_target_share"] = round(share_within, 4)
            checks["auto_meets_99_within_1_shed"] = share_within >= 0.99 and auto.shed_share <= 0.01
        if load == 0.5:
            checks["auto_mean_r_at_most_2"] = auto.mean_r is not None and auto.mean_r <= 2
        result[f"{load:g}x"] = checks
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_server_model_arguments(parser)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=8, help="server TOME_MAX_BATCH_SIZE")
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--instances", type=int, default=1, help="server TOME_INSTANCES")
    parser.add_argument("--request-timeout-ms", type=float, default=10_000)
    parser.add_argument(
        "--target-ms",
        type=float,
        default=1000.0,
        help="latency target of every cell (1000: about 2 full r=0 batches of ViT-S/16 on a 2-vCPU CPU)",
    )
    parser.add_argument("--auto-max-r", type=int, default=None, help="server TOME_AUTO_MAX_R (auto ceiling)")
    parser.add_argument("--min-fidelity", type=float, default=None, help="server TOME_MIN_FIDELITY")
    parser.add_argument("--calibration-dir", default=None, help="server TOME_CALIBRATION_DIR")
    parser.add_argument(
        "--calibration-budget-s", type=float, default=None, help="server TOME_CALIBRATION_BUDGET_S"
    )
    parser.add_argument(
        "--fidelity-min-samples", type=int, default=None, help="server TOME_FIDELITY_MIN_SAMPLES"
    )
    parser.add_argument("--fidelity-profile", default=None, help="server TOME_FIDELITY_PROFILE")
    parser.add_argument("--loads", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0, 3.0])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help=f"fixed r values, {FLOOR} (with --min-fidelity) and/or auto (default: 0 16 auto; with a floor "
        f"0 {FLOOR} auto)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=None, help="saturation clients (default 3 x batch)"
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each cell")
    parser.add_argument("--image", default=None, help="image to send (default: synthetic)")
    parser.add_argument("--image-size", type=int, default=320, help="side of the synthetic image")
    parser.add_argument("--url", default=None, help="use this running server instead of starting one")
    parser.add_argument("--out", default="artifacts/auto_bench.json")
    args = parser.parse_args(argv)
    if args.variants is None:
        args.variants = ["0", FLOOR if args.min_fidelity is not None else "16", AUTO]
    if FLOOR in args.variants and args.min_fidelity is None:
        parser.error(f"the variant {FLOOR} needs --min-fidelity")
    return args


SERVER_SETTINGS = {
    "auto_max_r": "TOME_AUTO_MAX_R",
    "min_fidelity": "TOME_MIN_FIDELITY",
    "calibration_dir": "TOME_CALIBRATION_DIR",
    "calibration_budget_s": "TOME_CALIBRATION_BUDGET_S",
    "fidelity_min_samples": "TOME_FIDELITY_MIN_SAMPLES",
    "fidelity_profile": "TOME_FIDELITY_PROFILE",
}
"""The options passed on to the server as they are, when given."""


def server_env(args: argparse.Namespace) -> dict[str, str]:
    env = {"TOME_LATENCY_TARGET_MS": f"{args.target_ms:g}"}
    for option, name in SERVER_SETTINGS.items():
        value = getattr(args, option)
        if value is not None:
            env[name] = f"{value:g}" if isinstance(value, float) else str(value)
    return env


def floor_facts(model: dict) -> tuple[frozenset[int] | None, int | None]:
    """From a /models entry: the r that meet the fidelity floor for top-1 agreement (0 always does),
    and the largest r r=auto may choose under it; (None, None) without a floor."""
    fidelity = model.get("fidelity") or {}
    if fidelity.get("floor") is None:
        return None, None
    rows = fidelity.get("rows", [])
    meets = {row["r"] for row in rows if row["kind"] == "agreement" and row.get("meets_floor")}
    return frozenset(meets | {0}), (fidelity.get("max_r_at_floor") or {}).get("agreement", 0)


def check_auto(url: str, payload: bytes, headers: dict[str, str], target_ms: float) -> None:
    """Stop early, with the server's words, if it does not take r=auto."""
    response = httpx.post(
        f"{url}/classify",
        params={"r": AUTO, "target_ms": f"{target_ms:g}"},
        content=payload,
        headers={**headers, "Content-Type": "image/jpeg"},
        timeout=60,
    )
    if response.status_code != 200:
        raise SystemExit(f"the server does not serve r=auto: {response.status_code} {response.text}")


def run_cells(
    args: argparse.Namespace,
    url: str,
    payload: bytes,
    headers: dict[str, str],
    capacity: float,
    qualifying: frozenset[int] | None = None,
):
    target_s = args.target_ms / 1000
    cells = []
    for index, load in enumerate(args.loads):
        rate = load * capacity
        for variant in rotated(args.variants, index):
            params = f"&target_ms={args.target_ms:g}" if variant == AUTO else ""
            load_run = open_loop(url, payload, variant, rate, args.warmup, args.duration, headers, params)
            outcomes = asyncio.run(load_run)
            cell = cell_stats(outcomes, target_s, args.duration, load, variant, rate, qualifying)
            print(f"{load:g}x {variant}: {asdict(cell)}", flush=True)
            cells.append(cell)
    return cells


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    key = os.environ.get("TOME_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    _, payload = test_image(args.image, args.image_size)
    process, url = (None, args.url) if args.url else start_server(args, server_env(args))
    load_at_start = load_average()
    try:
        if AUTO in args.variants:
            check_auto(url, payload, headers, args.target_ms)
        model = httpx.get(f"{url}/models", headers=headers, timeout=30).json()["models"][0]
        qualifying, floor_r = floor_facts(model)
        args.variants = [str(floor_r) if v == FLOOR else v for v in args.variants]
        print(f"fidelity: {model.get('fidelity')}\nqualifying r: {qualifying}", flush=True)
        clients = args.concurrency or 3 * args.batch_size
        saturated = closed_loop(url, payload, 0, clients, args.warmup, args.duration, headers)
        capacity = summarize("saturation r=0", asyncio.run(saturated), args.duration, None).throughput_ips
        print(f"r=0 saturation: {capacity} images/s", flush=True)
        cells = run_cells(args, url, payload, headers, max(capacity, 1.0), qualifying)
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    result = {"machine": machine(), "config": vars(args), "r0_saturation_ips": capacity}
    result["load_average"] = {"start": load_at_start, "end": load_average()}
    result["fidelity"] = model.get("fidelity")
    result["qualifying_r"] = None if qualifying is None else sorted(qualifying)
    result |= {"cells": [asdict(cell) for cell in cells], "verdict": verdict(cells)}
    write(Path(args.out), result, cells)
    print(json.dumps(result["verdict"], indent=2))
    return 0


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": cpu_description(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write(out: Path, result: dict, cells: list[Cell]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    rows = [asdict(cell) for cell in cells]
    with out.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["load"])
        writer.writeheader()
        writer.writerows(rows)
    plot(cells, result["config"]["target_ms"], out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


def plot(cells: list[Cell], target_ms: float, path: Path) -> None:
    """Goodput and mean r against load, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (goodput, mean_r) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in dict.fromkeys(cell.variant for cell in cells):
        mine = sorted((c for c in cells if c.variant == variant), key=lambda c: c.load)
        label = "auto" if variant == AUTO else f"r={variant}"
        goodput.plot([c.load for c in mine], [c.good_rps for c in mine], marker="o", label=label)
        mean_r.plot([c.load for c in mine], [c.mean_r for c in mine], marker="o", label=label)
    offered = sorted({(c.load, c.offered_rps) for c in cells})
    goodput.plot([load for load, _ in offered], [rate for _, rate in offered], "k--", label="offered")
    ylabel = f"good answers per s (within {target_ms:g} ms, at an r meeting any floor)"
    goodput.set(xlabel="offered load (x r=0 saturation)", ylabel=ylabel)
    mean_r.set(xlabel="offered load (x r=0 saturation)", ylabel="mean r of answered requests")
    for axes in (goodput, mean_r):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
