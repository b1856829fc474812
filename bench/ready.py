"""Time to ready with and without a valid state folder (TOME_STATE_DIR), measured in one run.

    python -m tome_bench.ready --model vit_small_patch16_224 --weights random --rounds 3

Every round starts the server twice, the order alternating between rounds: "cold", with an empty state
folder (r=auto measures its cost table within TOME_AUTO_WARMUP_S, as without a folder), and "state",
with the folder the first cold start wrote. Ready is from spawning ``python -m tome_serve`` to /readyz
answering 200; /models' ``auto.timings_source`` confirms which path each start took, and the server's
log line gives the seconds spent on the table. Each server is stopped (SIGTERM) before the next starts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from tome_runtime.hardware import cpu_name

from .serve import free_port, wait_until_ok

TABLE_LINE = re.compile(r"r=auto timing table: (\d+) cells (?:measured|loaded from \S+) in ([\d.]+) s")


@dataclass
class Start:
    round: int
    variant: str
    ready_s: float
    table_s: float
    """Seconds the server spent measuring or loading the timing table (its log)."""
    cells: int
    source: str
    """/models auto.timings_source."""


def table_line(log: str) -> tuple[int, float]:
    """(cells, seconds) from the server's timing-table log line."""
    match = TABLE_LINE.search(log)
    if match is None:
        raise SystemExit(f"the server logged no timing-table line:\n{log[-2000:]}")
    return int(match[1]), float(match[2])


def start_once(args: argparse.Namespace, state_dir: Path, round_: int, variant: str) -> Start:
    port = free_port()
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith("TOME_")},
        "TOME_MODEL": args.model,
        "TOME_WEIGHTS": args.weights,
        "TOME_DTYPE": args.dtype,
        "TOME_DEVICE": args.device,
        "TOME_MAX_BATCH_SIZE": str(args.batch_size),
        "TOME_PORT": str(port),
        "TOME_STATE_DIR": str(state_dir),
    }
    with tempfile.TemporaryFile("w+") as log:
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", "tome_serve"], env=env, stdout=log, stderr=log)
        try:
            wait_until_ok(process, f"http://127.0.0.1:{port}/readyz", "the server")
            ready_s = time.monotonic() - started
            auto = httpx.get(f"http://127.0.0.1:{port}/models").json()["models"][0]["auto"]
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
        log.seek(0)
        cells, table_s = table_line(log.read())
    return Start(round_, variant, round(ready_s, 2), table_s, cells, auto["timings_source"])


def main(argv: list[str] | None = None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the starts and the summary as JSON")
    args = parser.parse_args(argv)
    starts = []
    with tempfile.TemporaryDirectory() as folder:
        kept = Path(folder) / "kept"
        for round_ in range(args.rounds):
            for variant in ("cold", "state") if round_ % 2 == 0 else ("state", "cold"):
                state_dir = kept if variant == "state" or round_ == 0 else Path(folder) / f"cold-{round_}"
                starts.append(start_once(args, state_dir, round_, variant))
                print(json.dumps(asdict(starts[-1])), flush=True)
    summary = {v: statistics.median(s.ready_s for s in starts if s.variant == v) for v in ("cold", "state")}
    machine = f"{cpu_name()} ({platform.machine()})"
    print(f"median ready: cold {summary['cold']:.1f} s, state {summary['state']:.1f} s on {machine}")
    if args.out is not None:
        result = {"machine": machine, "median_ready_s": summary, "starts": [asdict(s) for s in starts]}
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
