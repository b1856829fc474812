"""The goals table runs end to end and judges the goals of issue 10 (timings are not asserted)."""

import json

from tome_bench.goals import check_goals, main, r_values


def test_the_r_swept():
    assert r_values("bfloat16", 1, 24) == [0, *range(4, 25)]
    assert r_values("float32", 8, 24) == [0, 8, 16, 24]


def test_goals_are_judged_per_cell():
    cells = [
        {
            "model": "m",
            "dtype": "bfloat16",
            "batch": 1,
            "r_max": 6,
            "ratio": {"r=0": 0.99, "r=4": 0.97, "r=16": 1.5},
        },
        {"model": "m", "dtype": "float32", "batch": 8, "r_max": 6, "ratio": {"r=0": 0.97, "r=16": 1.95}},
    ]
    cells[0]["ratio"] = {"r=0": 0.99, "r=4": 0.97, "r=16": 1.5}
    cells[1]["ratio"] = {"r=0": 0.97, "r=16": 1.95}
    lines = check_goals(cells)
    assert lines[0].startswith("PASS m bfloat16 batch 1: r=0 0.99x")
    assert lines[1].startswith("MISS") and "at r=4" in lines[1]
    assert lines[2].startswith("PASS") and lines[3].startswith("MISS m float32 batch 8: r=0")
    assert lines[4].startswith("PASS m float32 batch 8: r=16 1.95x")


def test_goals_command_prints_the_table(tmp_path, capsys):
    kwargs = json.dumps({"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 64})
    out = tmp_path / "goals.json"
    argv = ["--models", "vit_tiny_patch16_224", "--model-kwargs", kwargs, "--batch-sizes", "1", "2"]
    main([*argv, "--rounds-scale", "0", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "torch threads" in printed
    assert "| model | dtype | batch | rounds | timm img/s |" in printed
    assert len(json.loads(out.read_text())["cells"]) == 4
