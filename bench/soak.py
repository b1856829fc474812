"""Soak: the server's resident memory against requests served, under steady load with r cycling.

    python -m tome_bench.soak --requests 100000 --dtype bfloat16 --batch-size 8 --clients 16 \\
        --r-cycle 0,8,16 --r-period 30 [--env MALLOC_ARENA_MAX=2] [--out artifacts/soak.json]

Starts ``python -m tome_serve`` (ViT-S/16, random weights by default), then ``--clients``
closed-loop keep-alive clients POST a JPEG back to back; every ``--r-period`` seconds all of them
move to the next r of ``--r-cycle``, until ``--requests`` are answered or ``--minutes`` have passed.
Every ``--sample-seconds`` the server's resident set (VmRSS of the process and its children, from
/proc) is recorded beside the number of requests answered so far. The verdict compares the resident
set at the middle of the run (by requests) with the end: issue 11 asks for less than 2% growth over
the second half of a run of at least 100,000 requests. ``--env`` passes extra environment variables
to the server (allocator experiments: MALLOC_ARENA_MAX, LD_PRELOAD).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

from .extras import exit_for_missing

try:
    import aiohttp
except ModuleNotFoundError as missing:
    exit_for_missing(missing)

from .serve import add_server_model_arguments, start_server, test_image
from .serve import parse_args as serve_args
from .stats import process_tree


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its child processes, in MB (VmRSS)."""
    return round(sum(_own_rss_mb(each) for each in process_tree(pid)), 1)


def _own_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def soak(args: argparse.Namespace, url: str, pid: int, payload: bytes) -> list[dict]:
    cycle = [int(r) for r in args.r_cycle.split(",")]
    start = time.monotonic()
    end = start + args.minutes * 60
    answered = {"200": 0, "other": 0}
    samples: list[dict] = []

    def done() -> bool:
        return time.monotonic() >= end or answered["200"] >= args.requests

    def current_r() -> int:
        return cycle[int((time.monotonic() - start) // args.r_period) % len(cycle)]

    connector = aiohttp.TCPConnector(limit=args.clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:

        async def client() -> None:
            while not done():
                try:
                    async with http.post(
                        f"{url}/classify",
                        params={"r": current_r(), "top_k": 1},
                        data=payload,
                        headers={"Content-Type": "image/jpeg"},
                    ) as response:
                        await response.read()
                        answered["200" if response.status == 200 else "other"] += 1
                except (aiohttp.ClientError, OSError, TimeoutError):
                    answered["other"] += 1

        async def sampler() -> None:
            while True:
                samples.append(
                    {
                        "seconds": round(time.monotonic() - start, 1),
                        "requests": answered["200"],
                        "not_200": answered["other"],
                        "rss_mb": rss_mb(pid),
                    }
                )
                print(json.dumps(samples[-1]), flush=True)
                if done():
                    return
                await asyncio.sleep(min(args.sample_seconds, max(0.0, end - time.monotonic())))

        await asyncio.gather(sampler(), *(client() for _ in range(args.clients)))
    return samples


def verdict(samples: list[dict], ready_mb: float) -> dict:
    total = samples[-1]["requests"]
    middle = min(samples, key=lambda s: abs(s["requests"] - total / 2))
    last = samples[-1]
    first_half = middle["rss_mb"] - ready_mb
    second_half = last["rss_mb"] - middle["rss_mb"]
    per_10k = 1e4 * second_half / max(last["requests"] - middle["requests"], 1)
    return {
        "requests": total,
        "not_200": last["not_200"],
        "rss_ready_mb": ready_mb,
        "rss_middle_mb": middle["rss_mb"],
        "rss_end_mb": last["rss_mb"],
        "rss_peak_mb": max(s["rss_mb"] for s in samples),
        "growth_first_half_mb": round(first_half, 1),
        "growth_second_half_mb": round(second_half, 1),
        "growth_second_half_share": round(second_half / middle["rss_mb"], 4),
        "second_half_mb_per_10k_requests": round(per_10k, 2),
        "meets_2_percent": total >= 100_000 and second_half / middle["rss_mb"] < 0.02,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_server_model_arguments(parser)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--instances", default="auto", help="the server's TOME_INSTANCES")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--r-cycle", default="0,8,16")
    parser.add_argument("--r-period", type=float, default=30.0)
    parser.add_argument("--minutes", type=float, default=90.0, help="at most this long")
    parser.add_argument("--requests", type=int, default=100_000, help="stop once this many are answered")
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server, repeatable")
    parser.add_argument("--out", default="artifacts/soak.json")
    args = parser.parse_args(argv)
    server_args = serve_args(
        [
            f"--model={args.model}",
            f"--weights={args.weights}",
            f"--model-kwargs={args.model_kwargs}",
            f"--device={args.device}",
            f"--dtype={args.dtype}",
            f"--batch-size={args.batch_size}",
            f"--instances={args.instances}",
            f"--max-queue={4 * args.clients}",
        ]
    )
    extra = dict(item.split("=", 1) for item in args.env)
    process, url = start_server(server_args, extra)
    try:
        ready_mb = rss_mb(process.pid)
        print(f"server ready: {ready_mb} MB resident; env {extra}", flush=True)
        _, payload = test_image(None, args.image_size)
        samples = asyncio.run(soak(args, url, process.pid, payload))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    result = {
        "config": {**vars(args), "server_env": extra},
        "verdict": verdict(samples, ready_mb),
        "samples": samples,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["verdict"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
