"""The speed sweep runs end to end and writes its table, CSV, JSON and plot (timings are not asserted)."""

import csv
import json
import sys

from tiny import NAME, TINY

from tome_bench.speed import main


def bench_args(out) -> list[str]:
    kwargs = json.dumps({**TINY, "img_size": 64})
    sizes = ["--batch-sizes", "1", "2", "--rounds", "2", "--warmup", "1"]
    return ["--model", NAME, "--model-kwargs", kwargs, "--r", "0", "4", *sizes, "--out", str(out)]


def test_bench_writes_every_report(tmp_path, capsys):
    main(bench_args(tmp_path))
    rows = list(csv.DictReader((tmp_path / "results.csv").read_text().splitlines()))
    assert [(row["batch_size"], row["r"]) for row in rows] == [
        ("1", ""),
        ("1", "0"),
        ("1", "4"),
        ("2", ""),
        ("2", "0"),
        ("2", "4"),
    ]
    assert all(float(row["images_per_s"]) > 0 for row in rows)
    assert float(rows[2]["gmacs"]) < float(rows[1]["gmacs"])
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["machine"] and len(report["rows"]) == 6
    assert (tmp_path / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "speedup" in out and f"wrote {tmp_path / 'results.csv'}" in out and "speed.png" in out


def test_without_matplotlib_the_bench_says_no_plot_and_claims_none(tmp_path, capsys, monkeypatch):
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails
    main(bench_args(tmp_path))
    captured = capsys.readouterr()
    assert "no plot written" in captured.err
    wrote = [line for line in captured.out.splitlines() if line.startswith("wrote ")]
    assert wrote == [f"wrote {tmp_path / 'results.csv'}, {tmp_path / 'results.json'}"]
    assert not (tmp_path / "speed.png").exists()
