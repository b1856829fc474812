"""tome-eval --profile -> the server's TOME_FIDELITY_PROFILE: the rows tome-eval measured on a folder are
the rows the server shows in /models, with their samples, bounds and accuracy drop."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from tiny import (
    EVAL_KWARGS,
    NAME,
    NUM_CLASSES,
    TINY,
    eval_model,
    labelled_pattern_folder,
    model_args,
    write_weights,
)

from tome_eval.cli import main
from tome_runtime.fidelity import wilson_lower
from tome_serve.app import create_app
from tome_serve.config import Settings


def test_a_profile_round_trips_from_tome_eval_to_the_server(tmp_path: Path) -> None:
    weights = write_weights(tmp_path / "tiny.safetensors", eval_model())
    labelled_pattern_folder(tmp_path / "images", per_class=5)  # 4 classes x 5 images
    profile = tmp_path / "profile.json"
    args = [str(tmp_path / "images"), *model_args(weights), "--timing-rounds", "0", "--no-plot"]
    assert main([*args, "--out", str(tmp_path / "out"), "--profile", str(profile)]) == 0

    written = json.loads(profile.read_text())["models"][NAME]
    assert written["weights"] == str(weights) and written["images"] == 20
    rows = written["rows"]
    assert sorted(rows, key=int) == ["4", "8"]  # the default r up to this model's largest useful r
    sweep = {row["r"]: row for row in json.loads((tmp_path / "out" / "sweep.json").read_text())["rows"]}
    for r, row in rows.items():
        agreement = row["agreement"]
        assert agreement["samples"] == 20 and agreement["mean"] == pytest.approx(sweep[int(r)]["agreement"])
        assert agreement["lower"] == pytest.approx(wilson_lower(round(agreement["mean"] * 20), 20))
        assert row["cosine"]["mean"] == pytest.approx(sweep[int(r)]["cosine_mean"])
        drops = {"top1": sweep[int(r)]["top1_drop"], "top5": sweep[int(r)]["top5_drop"]}
        assert row["accuracy_drop"] == {"labelled": 20, **drops}

    settings = Settings(
        model=NAME,
        weights=str(weights),
        model_kwargs={**TINY, **EVAL_KWARGS, "num_classes": NUM_CLASSES},
        device="cpu",
        auto_warmup_s=0,
        calibration_budget_s=0,  # the profile's rows only
        fidelity_profile=profile,
    )
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        fidelity = client.get("/models").json()["models"][0]["fidelity"]
    assert fidelity["sources"] == {"profile": 2 * 20}  # 20 images compared at r=4 and at r=8
    shown = {(row["r"], row["kind"]): row for row in fidelity["rows"]}
    for r, row in rows.items():
        for kind in ("agreement", "cosine"):
            served = shown[int(r), kind]
            assert served["samples"] == row[kind]["samples"]
            assert served["mean"] == pytest.approx(row[kind]["mean"])
            assert served["lower"] == pytest.approx(row[kind]["lower"])
        assert served["accuracy_drop"] == row["accuracy_drop"]


def test_profile_needs_a_folder(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--model", NAME, "--weights", "random", "--profile", "p.json", "--timing-rounds", "0"])
    assert exit_.value.code == 2 and "--profile needs an image folder" in capsys.readouterr().err
