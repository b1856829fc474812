"""Smoke load test: loadtest/run.sh drives Locust headless for about 20 s against a real server (tiny
random ViT, API key on), and the run must end with zero failures and a non-zero request rate."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from serverutil import run_server

REPO = Path(__file__).resolve().parents[1]
API_KEY = "smoke-test-key"


@pytest.mark.timeout(240)
def test_locust_smoke_run_has_no_failures(tmp_path):
    with run_server(env={"TOME_API_KEY": API_KEY}) as url:
        env = {
            **os.environ,
            "PYTHON": sys.executable,
            "USERS": "4",
            "SPAWN_RATE": "4",
            "TOME_API_KEY": API_KEY,
        }
        env.pop("LOADTEST_SHAPE", None)
        result = subprocess.run(
            [str(REPO / "loadtest" / "run.sh"), url, "20s", str(tmp_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    log = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, log

    rows = {
        row["Name"]: row for row in csv.DictReader(io.StringIO((tmp_path / "locust_stats.csv").read_text()))
    }
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0 and total["Failure Count"] == "0", log
    assert float(total["Requests/s"]) > 0
    assert rows["setup: GET /models"]["Failure Count"] == "0", "the API key must be sent"
    endpoints = ("/classify r=", "/visualize r=", "/v1/embeddings r=")
    answered = [name for name in rows if name.startswith(endpoints) and "[429]" not in name]
    assert {name.split()[0] for name in answered} == {"/classify", "/visualize", "/v1/embeddings"}
    r_names = {name.split()[1] for name in answered}
    assert r_names == {"r=0", "r=8", "r=16", "r=auto"}, "the default r mix 0,8,16,auto fits the tiny model"

    (level,) = json.loads((tmp_path / "levels.json").read_text())
    assert level["users"] == 4 and level["failures"] == 0 and level["answered_per_s"] > 0
    assert (tmp_path / "report.html").stat().st_size > 0
