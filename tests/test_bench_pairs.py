"""The LitServe comparison's bookkeeping: ratios per round, and no peer process left behind."""

from __future__ import annotations

import subprocess
import sys
import time

from tome_bench.litserve_pairs import OURS, stop_group, table


def _row(round_: int, server: str, img_s: float) -> dict:
    return {
        "round": round_,
        "server": server,
        "img_s": img_s,
        "direct_img_s": 50.0,
        "of_direct": img_s / 50.0,
        "machine_busy": 0.99,
        "overload_429_share": 0.5,
        "overload_p95_first_last_ms": [2000.0, 2100.0],
    }


def test_each_peer_is_compared_with_ours_of_the_same_round() -> None:
    rows = [_row(1, OURS, 50.0), _row(1, "peer", 40.0), _row(2, OURS, 45.0), _row(2, "peer", 50.0)]
    lines = table(rows).splitlines()[2:]
    assert lines[1].endswith("| 1.25x |") and lines[3].endswith("| 0.90x |")
    assert lines[0].endswith("|  |")  # ours against itself: no ratio


def test_stop_group_ends_children_that_ignore_sigterm() -> None:
    # LitServe's main process leaves its workers running after SIGTERM; a worker stand-in that
    # ignores SIGTERM must still be gone afterwards.
    child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    spawn = f"subprocess.Popen([sys.executable, '-c', {child!r}])"
    parent = f"import subprocess, sys, time; {spawn}; time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", parent], start_new_session=True)
    time.sleep(1.0)
    stop_group(process, grace_s=1.0)
    listed = subprocess.run(["ps", "-o", "pid=", "-g", str(process.pid)], capture_output=True, text=True)
    assert listed.stdout.split() == []
