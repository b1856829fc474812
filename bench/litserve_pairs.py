"""Alternating rounds against LitServe: this server with its defaults, LitServe with its defaults,
and LitServe in its best configuration on a small CPU (one worker process per core, one torch
thread each), all serving the same patched model to the same client.

    pip install litserve
    python -m tome_bench.litserve_pairs --rounds 2 --out artifacts/litserve_pairs.json

Each round measures the contestants one after another with ``python -m tome_bench.serve``
(saturation, then 2x overload, each against the direct model measured in the same run), so a
machine that drifts between rounds shows as a drift of every contestant in that round. The table
gives each run's throughput and its ratio to the direct model, and ours over each peer's per
round. Uploads are multipart for all (LitServe reads only forms). The peer is
``tome_bench.litserve_peer``; its process group is stopped after each run, because LitServe's main
process leaves its worker processes running after SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import serve

OURS = "tome-serve (defaults)"
PEERS = {
    "LitServe (defaults)": [],
    "LitServe (2 workers x 1 thread)": ["--workers", "2", "--torch-threads", "1"],
}


def common_arguments(args: argparse.Namespace) -> list[str]:
    """The serve-benchmark options every contestant is measured with."""
    return [
        f"--model={args.model}",
        f"--weights={args.weights}",
        f"--model-kwargs={args.model_kwargs}",
        f"--device={args.device}",
        f"--dtype={args.dtype}",
        f"--r={args.r}",
        f"--batch-size={args.batch_size}",
        f"--duration={args.duration}",
        f"--warmup={args.warmup}",
        f"--direct-seconds={args.direct_seconds}",
        "--multipart",
    ]


def run_ours(args: argparse.Namespace, out: Path) -> dict:
    serve.main([*common_arguments(args), f"--out={out}"])
    return json.loads(out.read_text())


def run_peer(args: argparse.Namespace, extra: list[str], out: Path) -> dict:
    port = serve.free_port()
    command = [sys.executable, "-m", "tome_bench.litserve_peer", f"--port={port}", f"--model={args.model}"]
    command += [f"--weights={args.weights}", f"--model-kwargs={args.model_kwargs}"]
    command += [f"--dtype={args.dtype}", f"--r={args.r}"]
    command += [f"--batch-size={args.batch_size}", *extra]
    peer = subprocess.Popen(command, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        serve.wait_until_ok(peer, f"{url}/health", "the peer")
        serve.main(
            [*common_arguments(args), "--peer", f"--url={url}", f"--server-pid={peer.pid}", f"--out={out}"]
        )
    finally:
        stop_group(peer)
    return json.loads(out.read_text())


def stop_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the peer's whole process group, then, after ``grace_s``, SIGKILL to what is left."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _group_alive(process.pid):
            process.poll()
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def row(round_: int, name: str, result: dict) -> dict:
    saturation, overload = result["phases"]
    return {
        "round": round_,
        "server": name,
        "img_s": saturation["throughput_ips"],
        "direct_img_s": result["direct"]["mean_throughput_ips"],
        "of_direct": result["verdict"]["saturation_over_direct"],
        "machine_busy": saturation["cpu"].get("machine_busy_share"),
        "overload_429_share": result["verdict"]["overload_shed_share"],
        "overload_p95_first_last_ms": [overload["p95_first_third_ms"], overload["p95_last_third_ms"]],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| round | server | img/s | direct img/s | of direct | machine busy | 2x overload: 429 | "
        "p95 first -> last third (ms) | ours / this |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ours = {r["round"]: r["img_s"] for r in rows if r["server"] == OURS}
    for r in rows:
        first, last = r["overload_p95_first_last_ms"]
        versus = "" if r["server"] == OURS else f"{ours[r['round']] / r['img_s']:.2f}x"
        lines.append(
            f"| {r['round']} | {r['server']} | {r['img_s']:.1f} | {r['direct_img_s']:.1f} | "
            f"{r['of_direct']:.2f} | {r['machine_busy']:.1%} | {r['overload_429_share']:.0%} | "
            f"{first:,.0f} -> {last:,.0f} | {versus} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    serve.add_server_model_arguments(parser)
    parser.add_argument("--dtype", default="auto", help="both servers (auto: as tome-serve resolves it)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per load phase")
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--direct-seconds", type=float, default=6.0)
    parser.add_argument("--out", default="artifacts/litserve_pairs.json")
    args = parser.parse_args(argv)
    if args.device != "cpu":
        parser.error("the LitServe peer runs on the CPU only: --device cpu")
    out = Path(args.out)
    runs = out.with_suffix("")
    runs.mkdir(parents=True, exist_ok=True)
    rows = []
    for round_ in range(1, args.rounds + 1):
        rows.append(row(round_, OURS, run_ours(args, runs / f"ours_{round_}.json")))
        for index, (name, extra) in enumerate(PEERS.items()):
            rows.append(row(round_, name, run_peer(args, extra, runs / f"peer{index}_{round_}.json")))
    out.write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
