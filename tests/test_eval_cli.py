"""tome-eval end to end on generated folders with a tiny ViT: outputs, numbers, and bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny import (
    BASES,
    NAME,
    NUM_CLASSES,
    eval_model,
    give_colour_classifier,
    labelled_solid_folder,
    model_args,
    pattern_image,
    solid_image,
    solid_tensor,
    write_weights,
)

import tome
from tome_eval import sweep
from tome_eval.cli import main

R_VALUES = [0, 2, 4]


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = eval_model()
    give_colour_classifier(model)
    return model, write_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors", model)


def run_eval(args: list[str]) -> int:
    return main(args)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def expected_hits(model: torch.nn.Module, files: dict, r: int, k: int) -> int:
    """Hand count: run the model on hand-built inputs for each one-colour image."""
    inputs = torch.stack([solid_tensor(model, colour) for _, colour in files.values()])
    labels = torch.tensor([label for label, _ in files.values()])
    with torch.inference_mode(), tome.merging(r=r):
        logits = model(inputs)
    return int((logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1).sum())


def test_labelled_folder_outputs_and_accuracy_match_hand_count(tmp_path, colour_model):
    model, weights = colour_model
    files = labelled_solid_folder(tmp_path / "data")
    (tmp_path / "data" / "2" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (tmp_path / "data" / "2" / "notes.txt").write_text("not an image either")
    out = tmp_path / "out"

    code = run_eval([str(tmp_path / "data"), *model_args(weights), "--r", "4,2", "--out", str(out)])

    assert code == 0
    rows = read_csv(out / "sweep.csv")
    assert [int(row["r"]) for row in rows] == R_VALUES  # r=0 added, sorted
    document = json.loads((out / "sweep.json").read_text())
    assert document["info"]["unreadable"] == 1
    assert document["info"]["unreadable_files"][0].endswith("broken.jpg")
    assert document["info"]["ignored_files"] == 1
    assert document["info"]["images"] == len(files)
    for row, record in zip(rows, document["rows"], strict=True):
        r = int(row["r"])
        top1, top5 = expected_hits(model, files, r, 1), expected_hits(model, files, r, 5)
        assert record["top1"] == pytest.approx(top1 / len(files))
        assert float(row["top5"]) == pytest.approx(top5 / len(files))
        assert record["gmacs"] == pytest.approx(tome.gmacs(model, r))
        assert record["images_per_second"] > 0 and record["speedup"] > 0
    assert 0 < document["rows"][0]["top1"] < 1, "the misfiled images should make accuracy non-trivial"
    assert document["rows"][0]["agreement"] == 1.0
    assert document["rows"][0]["speedup"] == 1.0
    assert document["rows"][0]["top1_drop"] == 0.0
    assert document["rows"][-1]["tokens_out"] < document["rows"][0]["tokens_out"]
    per_image = read_csv(out / "sweep_images.csv")
    assert len(per_image) == len(files)
    assert {row["file"] for row in per_image} == {str(p) for p in files}
    with Image.open(out / "sweep.png") as plot:
        assert plot.format == "PNG" and plot.width > 300


def test_unlabelled_folder_reports_agreement_but_no_accuracy(tmp_path, capsys, colour_model):
    _, weights = colour_model
    for i in range(5):
        pattern_image(tmp_path / "photos" / f"p{i}.png", BASES[i % len(BASES)], seed=i)
    out = tmp_path / "out"

    assert run_eval([str(tmp_path / "photos"), *model_args(weights), "--r", "2,4", "--out", str(out)]) == 0

    document = json.loads((out / "sweep.json").read_text())
    rows = document["rows"]
    assert -1 <= document["info"]["cosine_between_images"] < 1
    assert [row["top1"] for row in rows] == [None, None, None]
    assert "weights are random" not in capsys.readouterr().err  # trained-like weights: no warning
    assert rows[0]["agreement"] == 1.0
    assert all(0 <= row["agreement"] <= 1 for row in rows)
    assert all(-1 <= row["cosine_mean"] <= 1.0001 for row in rows)
    assert read_csv(out / "sweep.csv")[1]["top1"] == ""
    assert (out / "sweep.png").stat().st_size > 1000


def test_backbone_has_no_agreement_and_a_headless_file_loads(tmp_path, capsys):
    backbone = eval_model(num_classes=0)
    weights = write_weights(tmp_path / "backbone.safetensors", backbone)
    for i in range(3):
        pattern_image(tmp_path / "photos" / f"p{i}.png", BASES[i], seed=i)
    out = tmp_path / "out"

    assert run_eval([str(tmp_path / "photos"), *model_args(weights, num_classes=0), "--out", str(out)]) == 0
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [row["r"] for row in rows] == [0, 4, 8]  # the defaults the 64-pixel model allows
    assert all(row["agreement"] is None for row in rows)
    assert rows[0]["cosine_mean"] == pytest.approx(1.0)
    assert rows[-1]["cosine_mean"] < 1.0

    # The same backbone weights into a model with a classifier: loads, with the head reported random.
    assert run_eval([str(tmp_path / "photos"), *model_args(weights), "--out", str(out)]) == 0
    info = json.loads((out / "sweep.json").read_text())["info"]
    assert info["head"].startswith("random") and sweep.RANDOM_HEAD in info["warnings"]
    err = capsys.readouterr().err
    assert "head.weight" in err and f"warning: {sweep.RANDOM_HEAD}" in err


def test_random_weights_warn_that_quality_means_little_and_speed_shows_its_spread(tmp_path, capsys):
    for i in range(3):
        pattern_image(tmp_path / "photos" / f"p{i}.png", BASES[i], seed=i)
    out = tmp_path / "out"
    args = [str(tmp_path / "photos"), *model_args("random"), "--timing-rounds", "3", "--no-plot"]
    assert run_eval([*args, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"warning: {sweep.RANDOM_WEIGHTS}" in captured.err
    assert sweep.RANDOM_WEIGHTS in json.loads((out / "sweep.json").read_text())["info"]["warnings"]
    assert "speedup IQR" in captured.out and "3 interleaved rounds' ratios to r=0" in captured.out
    for row in read_csv(out / "sweep.csv"):
        low, middle, high = (float(row[key]) for key in ("speedup_low", "speedup", "speedup_high"))
        assert 0 < low <= middle <= high


def test_without_matplotlib_the_hint_names_the_eval_extra(tmp_path, capsys, monkeypatch, colour_model):
    _, weights = colour_model
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails
    out = tmp_path / "out"
    assert run_eval([*model_args(weights), "--r", "4", "--timing-rounds", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "matplotlib is not installed (pip install 'tome-serve[eval]'): no plot written" in err
    assert f"wrote {out / 'sweep.csv'}, {out / 'sweep.json'}\n" in err and not (out / "sweep.png").exists()


def test_speed_only_without_a_folder(tmp_path, colour_model):
    _, weights = colour_model
    out = tmp_path / "out"
    assert run_eval([*model_args(weights), "--r", "4", "--out", str(out), "--no-plot"]) == 0
    rows = read_csv(out / "sweep.csv")
    assert [row["r"] for row in rows] == ["0", "4"]
    assert float(rows[1]["images_per_second"]) > 0 and rows[1]["agreement"] == ""
    assert not (out / "sweep.png").exists()


def expect_usage_error(args: list[str], capsys, *fragments: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_eval(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err


def test_r_out_of_range_is_a_usage_error(tmp_path, capsys, colour_model):
    _, weights = colour_model
    labelled_solid_folder(tmp_path / "data")
    expect_usage_error(
        [str(tmp_path / "data"), *model_args(weights), "--r", "9"], capsys, "r=9 is out of range", "0..8"
    )
    expect_usage_error(
        [str(tmp_path / "data"), *model_args(weights), "--r", "-2"], capsys, "must not be negative"
    )
    expect_usage_error(
        [str(tmp_path / "data"), *model_args(weights), "--r", "four"], capsys, "must be integers"
    )


def test_empty_folder_is_a_usage_error(tmp_path, capsys, colour_model):
    _, weights = colour_model
    (tmp_path / "empty").mkdir()
    expect_usage_error([str(tmp_path / "empty"), *model_args(weights)], capsys, "no images found")
    expect_usage_error([str(tmp_path / "missing"), *model_args(weights)], capsys, "is not a folder")


def test_unknown_class_folder_is_a_usage_error(tmp_path, capsys, colour_model):
    _, weights = colour_model
    labelled_solid_folder(tmp_path / "data")
    solid_image(tmp_path / "data" / "cats" / "a.png", BASES[0])
    expect_usage_error(
        [str(tmp_path / "data"), *model_args(weights)],
        capsys,
        "'cats' is neither a WordNet id",
        "--unlabelled",
    )
    solid_image(tmp_path / "wn" / "n01440764" / "a.png", BASES[0])
    expect_usage_error([str(tmp_path / "wn"), *model_args(weights)], capsys, "are not an ImageNet label set")
    solid_image(tmp_path / "big" / str(NUM_CLASSES) / "a.png", BASES[0])
    expect_usage_error([str(tmp_path / "big"), *model_args(weights)], capsys, "out of range", "0..7")


def test_only_unreadable_files_is_a_usage_error(tmp_path, capsys, colour_model):
    _, weights = colour_model
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"garbage")
    (tmp_path / "bad" / "b.jpg").write_bytes(b"")
    expect_usage_error(
        [str(tmp_path / "bad"), *model_args(weights)],
        capsys,
        "none of the 2 images could be decoded",
        "skipped 2 unreadable",
    )


def test_bad_weights_and_options_are_usage_errors(tmp_path, capsys, colour_model):
    _, weights = colour_model
    labelled_solid_folder(tmp_path / "data")
    folder = str(tmp_path / "data")
    expect_usage_error([folder, *model_args(tmp_path / "nope.pth")], capsys, "does not exist")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    expect_usage_error([folder, *model_args(tmp_path / "junk.pth")], capsys, "cannot read weights")
    expect_usage_error(
        [folder, *model_args(weights), "--model-kwargs", "{depth: 4"], capsys, "not valid JSON"
    )
    expect_usage_error([folder, *model_args(weights), "--opts", "int8"], capsys, "--opts needs --combos")
    wrong = write_weights(tmp_path / "wide.safetensors", eval_model(num_classes=3))
    expect_usage_error([folder, *model_args(wrong)], capsys, "does not fit")
    expect_usage_error(
        [folder, "--model", "resnet18", "--weights", "random", "--workers", "0"], capsys, "cannot be patched"
    )


def test_module_entry_point_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tome_eval", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0
    assert "--combos" in result.stdout and "labels.tsv" in result.stdout


HUB_RETRIES_S = 50
"""How long the hub client retries an unreachable hub before it gives up (about a minute, measured)."""


def test_pretrained_weights_without_the_hub_fail_fast_in_one_line(tmp_path):
    """The hub is probed before its client is imported, as tome-serve does: offline, the client looks in
    the (empty) cache only and fails at once, and the error is one line with exit code 2."""
    env = {key: value for key, value in os.environ.items() if not key.upper().endswith("_PROXY")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="")
    command = [sys.executable, "-m", "tome_eval", "--model", NAME, "--weights", "pretrained"]
    started = time.monotonic()
    result = subprocess.run(
        [*command, "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120
    )
    # The imports (torch, timm) take most of it: 3-8 s on a shared 2-core machine.
    assert time.monotonic() - started < HUB_RETRIES_S / 2, result.stderr
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("tome-eval: error: could not obtain pretrained weights for vit_tiny_patch16_224")
    assert "--weights random" in line and "Traceback" not in result.stderr


def test_wordnet_folders_with_an_imagenet_sized_model_and_limit(tmp_path):
    for i, wnid in enumerate(["n01440764", "n01443537", "n15075141"]):
        for j in range(2):
            solid_image(tmp_path / "val" / wnid / f"{j}.JPEG", BASES[i])
    args = [
        "--model",
        "vit_tiny_patch16_224",
        "--weights",
        "random",
        "--workers",
        "0",
        "--no-progress",
        "--model-kwargs",
        json.dumps({"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32}),
        "--timing-rounds",
        "0",
        "--r",
        "2",
        "--limit",
        "5",
        "--no-plot",
        "--out",
        str(tmp_path / "out"),
    ]
    assert run_eval([str(tmp_path / "val"), *args]) == 0
    info = json.loads((tmp_path / "out" / "sweep.json").read_text())["info"]
    assert info["layout"] == "WordNet-id class folders" and info["images"] == 5
    labels = [row["label"] for row in read_csv(tmp_path / "out" / "sweep_images.csv")]
    assert labels == ["0", "0", "1", "1", "999"]


def test_r_list_with_spaces_gives_the_folder_back(tmp_path, colour_model):
    """`--r 2 4 FOLDER` (tome-bench's spelling, folder last) means r = 2, 4 on FOLDER."""
    _, weights = colour_model
    labelled_solid_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = [*model_args(weights), "--timing-rounds", "0", "--no-plot", "--out", str(out)]
    assert run_eval([*args, "--r", "2", "4", str(tmp_path / "data")]) == 0
    report = json.loads((out / "sweep.json").read_text())
    assert [row["r"] for row in report["rows"]] == [0, 2, 4]
    assert report["info"]["images"] == 12
