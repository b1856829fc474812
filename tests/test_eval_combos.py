"""tome-eval --combos: ToMe stacked with int8, bf16 and torch.compile on a tiny ViT."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from tiny import eval_model, give_colour_classifier, labelled_pattern_folder, model_args, write_weights

from tome_eval import combine
from tome_eval.cli import main
from tome_eval.errors import EvalInputError


def per_image_top1(path: Path) -> dict[str, list[int]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {name: [int(row[name]) for row in rows] for name in rows[0] if name.startswith("top1 ")}


def share_equal(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def cells_of(out: Path) -> dict[tuple[str, int], dict]:
    cells = json.loads((out / "combos.json").read_text())["cells"]
    return {(c["optimisation"], c["r"]): c for c in cells}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("patterns")
    labelled_pattern_folder(root)
    return root


def test_int8_and_bf16_keep_fp32_predictions(tmp_path, folder, capsys):
    model = eval_model()
    give_colour_classifier(model)
    weights = write_weights(tmp_path / "tiny.safetensors", model)
    out = tmp_path / "out"

    code = main(
        [str(folder), *model_args(weights), "--r", "4", "--combos", "--opts", "int8,bf16", "--out", str(out)]
    )

    assert code == 0
    printed = capsys.readouterr().out
    assert "Speedup against plain fp32 at r=0" in printed and "Top-1 accuracy" in printed
    cells = cells_of(out)
    assert set(cells) == {(name, r) for name in ("fp32", "int8", "bf16") for r in (0, 4)}
    assert all(c["error"] is None and c["speedup"] > 0 for c in cells.values())
    assert cells["fp32", 0]["speedup"] == 1.0 and cells["fp32", 0]["agreement"] == 1.0
    assert cells["int8", 4]["cosine_mean"] < 1.0  # it really ran quantised
    top1 = per_image_top1(out / "combos_images.csv")
    assert len(top1["top1 fp32 r=0"]) == 20
    for r in (0, 4):
        assert share_equal(top1[f"top1 int8 r={r}"], top1[f"top1 fp32 r={r}"]) >= 0.9
        assert share_equal(top1[f"top1 bf16 r={r}"], top1[f"top1 fp32 r={r}"]) >= 0.9


def test_compiled_graphs_match_eager(tmp_path, folder, capsys):
    # Two blocks keep inductor's compile time within the test suite's budget.
    model = eval_model(depth=2)
    give_colour_classifier(model)
    weights = write_weights(tmp_path / "tiny2.safetensors", model)
    out = tmp_path / "out"

    code = main(
        [
            str(folder),
            *model_args(weights, depth=2),
            "--r",
            "4",
            "--combos",
            "--opts",
            "compile",
            "--batch-size",
            "8",
            "--out",
            str(out),
        ]
    )

    assert code == 0
    assert "First call (compile) seconds" in capsys.readouterr().out
    cells = cells_of(out)
    for r in (0, 4):
        assert cells["compile", r]["error"] is None
        assert cells["compile", r]["first_call_seconds"] > 0
        assert cells["compile", r]["graphs"] >= 1
        assert cells["compile", r]["speedup"] > 0
    top1 = per_image_top1(out / "combos_images.csv")
    for r in (0, 4):  # 20 images in batches of 8: the short last batch is padded, not recompiled
        assert share_equal(top1[f"top1 compile r={r}"], top1[f"top1 fp32 r={r}"]) >= 0.9


def test_a_failing_row_is_reported_not_fatal(tmp_path, monkeypatch, capsys):
    weights = write_weights(tmp_path / "tiny.safetensors", eval_model())

    def broken(model: torch.nn.Module) -> torch.nn.Module:
        raise RuntimeError("no int8 engine")

    monkeypatch.setattr(combine, "quantise_int8", broken)
    out = tmp_path / "out"
    assert main([*model_args(weights), "--r", "4", "--combos", "--opts", "int8", "--out", str(out)]) == 0
    cells = cells_of(out)
    assert cells["int8", 4]["error"] == "RuntimeError: no int8 engine"
    assert cells["fp32", 4]["speedup"] > 0
    printed = capsys.readouterr().out
    assert "failed" in printed and "no int8 engine" in printed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("turbo", "unknown optimisation 'turbo'"),
        ("bf16+fp16", "choose one of bf16 and fp16"),
        ("int8+bf16", "do not stack them with autocast"),
    ],
)
def test_bad_optimisations_are_rejected(text, message):
    with pytest.raises(EvalInputError, match=message):
        combine.parse_optimisations(text, torch.device("cpu"))


def test_int8_is_cpu_only_and_defaults_fit_the_device():
    with pytest.raises(EvalInputError, match="CPU only"):
        combine.parse_optimisations("int8", torch.device("cuda"))
    cpu = torch.device("cpu")
    rows = combine.parse_optimisations(combine.default_optimisations(cpu), cpu)
    assert [row.name for row in rows] == ["fp32", "compile", "bf16", "int8"]
    stacked = combine.parse_optimisations("compile+bf16", torch.device("cpu"))[1]
    assert stacked.compile and stacked.autocast == torch.bfloat16 and not stacked.int8
