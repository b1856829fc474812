"""tome_bench.ready's bookkeeping: where a start's seconds go (from its log lines), the rotated order of
the starts, the medians, and running another checkout's code (--baseline)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tome_bench.ready import PACKAGES, Start, import_root, order, phase_times, summarize

REPO = Path(__file__).resolve().parents[1]

LOG = [
    (6.1, "INFO tome_serve.service: threads: 2 instance(s) per model x 1 torch thread(s), ..."),
    (6.2, "INFO tome_serve.service: loading vit_small_patch16_224 (weights: random)"),
    (7.0, "INFO tome_serve.loading: vit_small_patch16_224: float32 on cpu (set explicitly)"),
    (
        9.5,
        "INFO tome_serve.lane: vit_x: r=auto timing table: 27 cells loaded from /s/x.json in 0.0 s (r=0...",
    ),
    (
        9.5,
        "INFO tome_serve.lane: vit_x: fidelity table from /s/x.json ({...}): calibration skipped",
    ),
]


def test_each_phase_ends_at_its_first_log_line() -> None:
    assert phase_times(LOG + [(12.0, "INFO tome_serve.service: threads: again")]) == {
        "imported": 6.1,
        "created": 7.0,
        "table": 9.5,
        "fidelity": 9.5,
    }
    calibrated = [(30.0, "INFO tome_serve.lane: vit_x: fidelity calibration: 4 image(s) from ...")]
    assert phase_times(calibrated) == {"fidelity": 30.0}


def test_every_start_runs_once_per_round_in_a_rotated_order() -> None:
    rounds = [order(["this", "baseline"], i) for i in range(4)]
    assert all(sorted(r) == sorted(rounds[0]) and len(r) == 4 for r in rounds)
    assert [r[0] for r in rounds] == [
        ("this", "cold"),
        ("this", "state"),
        ("baseline", "cold"),
        ("baseline", "state"),
    ]
    # round 0 starts each code cold before its state start: that cold start fills the folder
    assert rounds[0].index(("this", "cold")) < rounds[0].index(("this", "state"))
    assert rounds[0].index(("baseline", "cold")) < rounds[0].index(("baseline", "state"))


def test_the_medians_are_per_code_and_variant_with_each_phase_from_the_one_before() -> None:
    def start(code: str, ready: float, created: float) -> Start:
        phases = {"imported": 6.0, "created": created, "table": created + 2.0, "fidelity": created + 2.0}
        return Start(0, code, "state", ready, 0.0, 27, "state", "state", phases)

    summary = summarize([start("this", 9.0, 7.0), start("this", 11.0, 7.5), start("baseline", 14.0, 9.0)])
    assert summary["this/state"]["ready_s"] == 10.0
    assert summary["this/state"]["imported->created_s"] == 1.25
    assert summary["this/state"]["created->table_s"] == 2.0
    assert summary["baseline/state"]["spawn->imported_s"] == 6.0


def test_a_baseline_checkout_is_what_the_server_imports(tmp_path: Path) -> None:
    root = import_root(REPO, tmp_path / "root")
    assert sorted(p.name for p in root.iterdir()) == sorted(PACKAGES)
    code = (
        "import tome, tome_runtime, tome_serve as s; print(tome.__file__, tome_runtime.__file__, s.__file__)"
    )
    shown = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env={"PYTHONPATH": str(root)}, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    assert all(path.startswith(str(root)) for path in shown.stdout.split())
    with pytest.raises(SystemExit, match="not a checkout"):
        import_root(tmp_path, tmp_path / "elsewhere")
