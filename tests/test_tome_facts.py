"""One definition of each ToMe fact (input tokens, largest useful r, per-r cost), and every front end
(the server's /models, tome-eval, tome-bench) agreeing with it for the same model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import httpx
import pytest
import timm
import torch
from serverutil import TINY_MODEL_KWARGS
from tiny import NAME

import tome
from tome_bench.speed import main as bench_main
from tome_eval.cli import main as eval_main


def server_model() -> torch.nn.Module:
    """The model the tiny server serves (TINY_MODEL_ENV): 64 patches + 1 class token, 4 blocks."""
    return timm.create_model(NAME, pretrained=False, **TINY_MODEL_KWARGS).eval()


def test_largest_useful_r_is_the_smallest_r_with_the_fewest_output_tokens():
    model = server_model()
    tokens = tome.input_tokens(model)
    assert tokens == 65
    top = tome.largest_useful_r(model)
    fewest = tome.token_counts(tokens, 4, 1000)[-1]
    assert tome.token_counts(tokens, 4, top)[-1] == fewest
    assert tome.token_counts(tokens, 4, top - 1)[-1] > fewest
    small = timm.create_model("vit_small_patch16_224", pretrained=False)
    assert (tome.input_tokens(small), tome.largest_useful_r(small)) == (197, 24)
    assert tome.input_tokens(small, img_size=(384, 384)) == 577


def test_cost_table_defaults_to_every_useful_r():
    model = server_model()
    table = tome.cost_table(model)
    assert [row.r for row in table] == list(range(tome.largest_useful_r(model) + 1))
    assert table[0].speedup == 1.0 and table[0].output_tokens == 65
    assert table[8].gmacs == pytest.approx(tome.gmacs(model, 8))
    assert table[8].speedup == pytest.approx(table[0].gmacs / table[8].gmacs)
    assert all(a.gmacs > b.gmacs for a, b in zip(table, table[1:], strict=False))


def test_flops_is_a_deprecated_alias_of_gmacs():
    model = server_model()
    with pytest.warns(DeprecationWarning, match="tome.gmacs"):
        assert tome.flops(model, 4) == tome.gmacs(model, 4)


@pytest.mark.parametrize(
    ("given", "expected"),
    [("0,4,8", [0, 4, 8]), (["0", "4", "8"], [0, 4, 8]), (["0,4", "8"], [0, 4, 8]), (" 2, ", [2])],
)
def test_r_lists_take_commas_or_spaces(given, expected):
    assert tome.parse_r_values(given) == expected


@pytest.mark.parametrize(
    ("given", "message"), [("four", "must be integers"), ("-2", "negative"), (",", "at least")]
)
def test_bad_r_lists_say_why(given, message):
    with pytest.raises(ValueError, match=message):
        tome.parse_r_values(given)


def test_server_eval_and_bench_agree_on_r_range_and_costs(tiny_server: str, tmp_path: Path, capsys):
    model = server_model()
    top = tome.largest_useful_r(model)
    library = {row.r: row for row in tome.cost_table(model)}

    (served,) = httpx.get(f"{tiny_server}/models", timeout=30).json()["models"]
    assert served["r_max"] == top and served["input_tokens"] == tome.input_tokens(model)
    assert [c["r"] for c in served["costs"]] == sorted(library)
    for cost in served["costs"]:
        row = library[cost["r"]]
        assert cost["gmacs"] == pytest.approx(row.gmacs)
        assert cost["speedup"] == pytest.approx(row.speedup)
        assert cost["output_tokens"] == row.output_tokens

    kwargs = json.dumps(TINY_MODEL_KWARGS)
    common = ["--model", NAME, "--model-kwargs", kwargs]
    # tome-eval, comma-separated r list
    out = tmp_path / "eval"
    args = [*common, "--weights", "random", "--r", f"0,8,{top}", "--timing-rounds", "0", "--no-plot"]
    assert eval_main([*args, "--out", str(out)]) == 0
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [row["r"] for row in rows] == [0, 8, top]
    for row in rows:
        assert row["gmacs"] == pytest.approx(library[row["r"]].gmacs)
        assert row["tokens_out"] == library[row["r"]].output_tokens

    # tome-bench, the same r list spelt with spaces
    out = tmp_path / "bench"
    args = [*common, "--r", "0", "8", str(top), "--batch-sizes", "1", "--rounds", "1", "--warmup", "0"]
    bench_main([*args, "--out", str(out)])
    with (out / "results.csv").open() as f:
        bench_rows = [row for row in csv.DictReader(f) if row["r"]]
    assert [int(row["r"]) for row in bench_rows] == [0, 8, top]
    for row in bench_rows:
        assert float(row["gmacs"]) == pytest.approx(library[int(row["r"])].gmacs)
    capsys.readouterr()

    # one past the range: the server answers 422, both tools exit with status 2 and name the range
    image = (Path(__file__).parents[1] / "server/static/samples/cat.jpg").read_bytes()
    refused = httpx.post(
        f"{tiny_server}/classify?r={top + 1}", files={"file": ("cat.jpg", image)}, timeout=30
    )
    assert refused.status_code == 422 and str(top) in refused.text
    for main, extra in ((eval_main, ["--weights", "random", "--timing-rounds", "0"]), (bench_main, [])):
        with pytest.raises(SystemExit) as exited:
            main([*common, *extra, "--r", str(top + 1), "--out", str(tmp_path / "refused")])
        assert exited.value.code == 2
        assert f"0..{top}" in capsys.readouterr().err
