"""The encoding benchmark (``python -m tome_bench.embed_encoding``) on the tiny model: every (pooling,
encoding) row is reported with the bytes the server really sends, float JSON takes more of them than
base64, and both decode to the same values (timings are not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from serverutil import TINY_MODEL_KWARGS
from tiny import NAME

from tome_bench.embed_encoding import main

WIDTH, PATCHES = TINY_MODEL_KWARGS["embed_dim"], 64


def test_rows_for_each_pooling_and_encoding(tmp_path: Path, capsys) -> None:
    out = tmp_path / "encoding.json"
    argv = ["--model", NAME, "--model-kwargs", json.dumps(TINY_MODEL_KWARGS), "--dtype", "float32"]
    assert main([*argv, "--r", "4", "--batch-size", "2", "--rounds", "2", "--out", str(out)]) == 0
    rows = {(row["pooling"], row["encoding"]): row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(p, e) for p in ("model", "patch") for e in ("float", "base64")}
    assert rows["model", "base64"]["shape"] == [WIDTH]
    assert rows["patch", "float"]["shape"] == [PATCHES, WIDTH]
    for pooling in ("model", "patch"):
        float_bytes, base64_bytes = (rows[pooling, e]["answer_bytes"] for e in ("float", "base64"))
        # base64 of little-endian float32 is 16/3 characters a value; a JSON float takes about 20.
        values = WIDTH if pooling == "model" else PATCHES * WIDTH
        assert base64_bytes >= values * 16 / 3 and float_bytes > 2 * base64_bytes
    assert all(row["encode_us"] > 0 and row["decode_us"] > 0 and row["model_ms"] > 0 for row in rows.values())
    assert len({row["request_us"] for row in rows.values()}) == 1 and rows["model", "float"]["request_us"] > 0
    assert "| patch (64x64) | float |" in capsys.readouterr().out
