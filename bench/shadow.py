"""Shadow runs at saturation: the same closed-loop load on a server with TOME_SHADOW_RATE and on one
without, in interleaved rounds of one run (issue 18: shadow work must cost live traffic nothing).

    python -m tome_bench.shadow --model vit_small_patch16_224 --weights random --dtype float32 --r 8

Starts two servers with the same settings but the shadow rate (``--rate`` and 0), one after the other,
and keeps both running. Every round loads each of them in turn, in an order alternating between rounds:
``--concurrency`` closed-loop clients at fixed ``--r`` (> 0: only images served at r > 0 are shadowed)
for ``--warmup`` + ``--duration`` seconds, as ``tome_bench.serve``'s saturation phase. The server not
under load is idle meanwhile. Per round: each server's throughput, and the shadowed server's
``tome_shadow_runs_total`` over the round (images run at r=0 vs dropped because the model was busy).
Result: the median of the per-round throughput ratios (shadow / off), the shadow counts, the load
average at the start and the end, and the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .extras import exit_for_missing

try:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
except ModuleNotFoundError as missing:
    exit_for_missing(missing)

from .serve import (
    PhaseMeter,
    add_server_model_arguments,
    closed_loop,
    cpu_report,
    start_server,
    summarize,
    test_image,
)
from .stats import load_average, run_facts

SHADOW, OFF = "shadow", "off"


@dataclass
class Round:
    round: int
    variant: str
    throughput_ips: float
    p50_ms: float | None
    p99_ms: float | None
    answered: int
    errors: int
    shadow_run: float
    """tome_shadow_runs_total{outcome="run"} over the round (this server's)."""
    shadow_dropped: float
    server_cores: float | None


def shadow_counts(url: str, headers: dict[str, str]) -> dict[str, float]:
    """``tome_shadow_runs_total`` by outcome, summed over the models (0 when none was counted yet)."""
    counts = {"run": 0.0, "dropped": 0.0}
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tome_shadow_runs_total" and sample.labels.get("outcome") in counts:
                counts[sample.labels["outcome"]] += sample.value
    return counts


def alternating(variants: list[str], round_: int) -> list[str]:
    return variants if round_ % 2 == 0 else variants[::-1]


def load_round(args: argparse.Namespace, round_: int, variant: str, server, payload: bytes) -> Round:
    process, url = server
    headers = {"Authorization": f"Bearer {key}"} if (key := os.environ.get("TOME_API_KEY")) else {}
    before = shadow_counts(url, headers)
    meter = PhaseMeter(process.pid)
    load = closed_loop(
        url, payload, args.r, args.concurrency, args.warmup, args.duration, headers, meter=meter
    )
    phase = summarize(variant, asyncio.run(load), args.duration, None)
    after = shadow_counts(url, headers)
    return Round(
        round=round_,
        variant=variant,
        throughput_ips=phase.throughput_ips,
        p50_ms=phase.p50_ms,
        p99_ms=phase.p99_ms,
        answered=phase.answered,
        errors=phase.sent - phase.answered,
        shadow_run=after["run"] - before["run"],
        shadow_dropped=after["dropped"] - before["dropped"],
        server_cores=cpu_report(meter).get("server_cores"),
    )


def verdict(rounds: list[Round], within: float = 0.03) -> dict:
    """Per-round throughput ratio shadow / off, their median, and whether it is within ``within`` of 1
    (a shadowed server at most that much slower)."""
    by_round: dict[int, dict[str, Round]] = {}
    for each in rounds:
        by_round.setdefault(each.round, {})[each.variant] = each
    ratios = [
        row[SHADOW].throughput_ips / row[OFF].throughput_ips
        for row in by_round.values()
        if SHADOW in row and OFF in row and row[OFF].throughput_ips > 0
    ]
    median = statistics.median(ratios) if ratios else None
    shadowed = [each for each in rounds if each.variant == SHADOW]
    return {
        "ratios": [round(r, 4) for r in ratios],
        "median_ratio": None if median is None else round(median, 4),
        "within_goal": median is not None and median >= 1 - within,
        "median_ips": {
            v: statistics.median(e.throughput_ips for e in rounds if e.variant == v) for v in (SHADOW, OFF)
        },
        "shadow_run": sum(each.shadow_run for each in shadowed),
        "shadow_dropped": sum(each.shadow_dropped for each in shadowed),
        "off_server_counted": sum(e.shadow_run + e.shadow_dropped for e in rounds if e.variant == OFF),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_server_model_arguments(parser)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--r", type=int, default=8, help="fixed r of every request (> 0)")
    parser.add_argument("--rate", type=float, default=0.5, help="TOME_SHADOW_RATE of the shadowed server")
    parser.add_argument("--batch-size", type=int, default=8, help="server TOME_MAX_BATCH_SIZE")
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--instances", default="auto", help="server TOME_INSTANCES")
    parser.add_argument("--request-timeout-ms", type=float, default=10_000)
    parser.add_argument(
        "--concurrency", type=int, default=None, help="closed-loop clients (default 3 x batch)"
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per server per round")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each")
    parser.add_argument("--image", default=None, help="image to send (default: synthetic)")
    parser.add_argument("--image-size", type=int, default=320, help="side of the synthetic image")
    parser.add_argument("--out", type=Path, default=Path("artifacts/shadow_bench.json"))
    args = parser.parse_args(argv)
    if args.r <= 0 or not 0 < args.rate <= 1:
        parser.error("--r must be > 0 (r=0 answers are never shadowed) and --rate in (0, 1]")
    args.concurrency = args.concurrency or 3 * args.batch_size
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_at_start = load_average()
    _, payload = test_image(args.image, args.image_size)
    servers = {}
    try:
        for variant, rate in ((SHADOW, args.rate), (OFF, 0.0)):
            servers[variant] = start_server(args, {"TOME_SHADOW_RATE": f"{rate:g}"})
        rounds = []
        for round_ in range(args.rounds):
            for variant in alternating([SHADOW, OFF], round_):
                rounds.append(load_round(args, round_, variant, servers[variant], payload))
                print(json.dumps(asdict(rounds[-1])), flush=True)
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    result = {
        **run_facts(load_at_start),
        "verdict": verdict(rounds),
        "rounds": [asdict(each) for each in rounds],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("machine", "load_average", "verdict")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
