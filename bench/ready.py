"""Time to ready with and without a valid state folder (TOME_STATE_DIR), measured in one run, and
optionally against another checkout of the code (before/after a change).

    python -m tome_bench.ready --model vit_small_patch16_224 --weights random --rounds 3
    python -m tome_bench.ready ... --baseline /tmp/before   # e.g. git archive main | tar -x -C /tmp/before

Every round starts the server twice per code, in an order rotated between rounds: "cold", with an
empty state folder (r=auto measures its cost table within TOME_AUTO_WARMUP_S and calibration measures
the fidelity table, as without a folder), and "state", with the folder that code's first cold start
wrote. Ready is from spawning ``python -m tome_serve`` to /readyz answering 200. A state start must
have loaded both tables (/models' ``auto.timings_source`` is "state" and the log says "calibration
skipped"), or the run stops: its time would not be a state start's.

Where the seconds go comes from when the server's log lines arrive (seconds since spawn): "imported"
(the first line after torch, timm and the app are imported), "created" (the model is created, loaded
and patched), "table" (the worker's warm-up batches ran and the timing table was measured or loaded),
"fidelity" (calibrated or loaded). Each server is stopped (SIGTERM) before the next starts. The load
average at the start and at the end is part of the result: on a shared machine it moves every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from .serve import free_port, wait_until_ok
from .stats import load_average, run_facts

TABLE_LINE = re.compile(r"r=auto timing table: (\d+) cells (?:measured|loaded from \S+) in ([\d.]+) s")
PHASES = {
    "imported": re.compile(r"tome_serve\.service: threads: "),
    "created": re.compile(r"tome_serve\.loading: \S+: \w+ on \w+"),
    "table": TABLE_LINE,
    "fidelity": re.compile(r"calibration skipped|fidelity calibration: "),
}
"""Log lines that end a phase of the start, by the phase's name (in order)."""
SKIPPED = "calibration skipped"
PACKAGES = {"tome": "tome", "tome_runtime": "runtime", "tome_serve": "server"}
"""The import names the server needs, and their folders in a checkout (pyproject.toml's package-dir)."""
THIS = "this"


@dataclass
class Start:
    round: int
    code: str
    """"this" (the installed code) or "baseline" (--baseline)."""
    variant: str
    ready_s: float
    table_s: float
    """Seconds the server spent measuring or loading the timing table (its log)."""
    cells: int
    source: str
    """/models auto.timings_source."""
    fidelity: str
    """"state" when the log says calibration was skipped, else "measured"."""
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds from spawn to each of :data:`PHASES`' log lines."""


def table_line(log: str) -> tuple[int, float]:
    """(cells, seconds) from the server's timing-table log line."""
    match = TABLE_LINE.search(log)
    if match is None:
        raise SystemExit(f"the server logged no timing-table line:\n{log[-2000:]}")
    return int(match[1]), float(match[2])


def phase_times(lines: list[tuple[float, str]]) -> dict[str, float]:
    """Seconds since spawn at which each phase's line arrived, from (seconds, line) pairs."""
    found: dict[str, float] = {}
    for at, line in lines:
        for phase, pattern in PHASES.items():
            if phase not in found and pattern.search(line):
                found[phase] = round(at, 2)
    return found


def import_root(checkout: Path, folder: Path) -> Path:
    """A folder for PYTHONPATH where the server's packages are ``checkout``'s folders (symbolic links),
    so ``python -m tome_serve`` runs that code instead of the installed one."""
    folder.mkdir(parents=True, exist_ok=True)
    for package, source in PACKAGES.items():
        if not (checkout / source / "__init__.py").is_file():
            raise SystemExit(f"{checkout} is not a checkout of this project: no {source}/__init__.py")
        (folder / package).symlink_to((checkout / source).resolve(), target_is_directory=True)
    return folder


class Log:
    """The server's output, line by line, each with the seconds since ``started`` it arrived at."""

    def __init__(self, process: subprocess.Popen, started: float) -> None:
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, args=(process, started), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen, started: float) -> None:
        for line in process.stdout:
            self.lines.append((time.monotonic() - started, line.rstrip("\n")))

    def text(self) -> str:
        self._thread.join(10)
        return "\n".join(line for _, line in self.lines)


def start_once(
    args: argparse.Namespace, state_dir: Path, round_: int, code: str, variant: str, path: Path | None
) -> Start:
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
        "TOME_LOG_LEVEL": "info",
    }
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH")]))
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "tome_serve"],
        env=env,
        cwd=path,  # python -m puts the working folder first on sys.path: the checkout's packages win
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log = Log(process, started)
    try:
        wait_until_ok(process, f"http://127.0.0.1:{port}/readyz", "the server")
        ready_s = time.monotonic() - started
        auto = httpx.get(f"http://127.0.0.1:{port}/models").json()["models"][0]["auto"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    text = log.text()
    cells, table_s = table_line(text)
    fidelity = "state" if SKIPPED in text else "measured"
    start = Start(round_, code, variant, round(ready_s, 2), table_s, cells, auto["timings_source"], fidelity)
    start.phases = phase_times(log.lines)
    if variant == "state" and (start.source, start.fidelity) != ("state", "state"):
        raise SystemExit(
            f"a start with a valid state folder did not load both tables: {start}\n{text[-2000:]}"
        )
    return start


def order(codes: list[str], round_: int) -> list[tuple[str, str]]:
    """Every (code, variant) once, rotated by the round, so no start always follows the same one."""
    cells = [(code, variant) for code in codes for variant in ("cold", "state")]
    shift = round_ % len(cells)
    return cells[shift:] + cells[:shift]


def summarize(starts: list[Start]) -> dict[str, dict[str, float]]:
    """Medians per "code/variant": ready, and each phase's seconds from the previous one."""
    summary = {}
    for code, variant in dict.fromkeys((s.code, s.variant) for s in starts):
        mine = [s for s in starts if (s.code, s.variant) == (code, variant)]
        row = {"ready_s": statistics.median(s.ready_s for s in mine)}
        previous = "spawn"
        for phase in PHASES:
            spans = [s.phases[phase] - s.phases.get(previous, 0.0) for s in mine if phase in s.phases]
            if spans:
                row[f"{previous}->{phase}_s"] = round(statistics.median(spans), 2)
            previous = phase
        row["table_s"] = statistics.median(s.table_s for s in mine)
        summary[f"{code}/{variant}"] = row
    return summary


def main(argv: list[str] | None = None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="a checkout of other code to start in the same rounds")
    parser.add_argument("--out", type=Path, help="write the starts and the summary as JSON")
    args = parser.parse_args(argv)
    load_at_start = load_average()
    starts = []
    with tempfile.TemporaryDirectory() as folder:
        paths = {THIS: None}
        if args.baseline is not None:
            paths["baseline"] = import_root(args.baseline, Path(folder) / "baseline-code")
        for round_ in range(args.rounds):
            for code, variant in order(list(paths), round_):  # round 0: each code's cold start first
                kept = Path(folder) / f"kept-{code}"  # what that code's first cold start wrote
                cold = kept if round_ == 0 else Path(folder) / f"cold-{code}-{round_}"
                state_dir = kept if variant == "state" else cold
                starts.append(start_once(args, state_dir, round_, code, variant, paths[code]))
                print(json.dumps(asdict(starts[-1])), flush=True)
    result = {
        **run_facts(load_at_start),
        "median": summarize(starts),
        "starts": [asdict(s) for s in starts],
    }
    print(json.dumps({key: result[key] for key in ("machine", "load_average", "median")}, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
