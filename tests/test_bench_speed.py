"""The speed sweep runs end to end and writes its table, CSV, JSON and plot (timings are not asserted)."""

import csv
import json

from tiny import NAME, TINY

from tome_bench.speed import main


def test_bench_writes_every_report(tmp_path, capsys):
    kwargs = json.dumps({**TINY, "img_size": 64})
    argv = [
        "--model",
        NAME,
        "--model-kwargs",
        kwargs,
        "--r",
        "0",
        "4",
        "--batch-sizes",
        "1",
        "2",
        "--rounds",
        "2",
        "--warmup",
        "1",
        "--out",
        str(tmp_path),
    ]
    main(argv)
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
    assert "speedup" in capsys.readouterr().out
