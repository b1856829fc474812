"""The state folder (TOME_STATE_DIR): a restart with a valid file is ready without r=auto's warm-up; a
changed key (dtype, model kwargs) or a corrupt file means measuring again, logged, never a crash; files
are replaced atomically and keep the sections another part of the server wrote."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from serverutil import TINY_MODEL_KWARGS, is_ready, png, start_server, wait_until
from tiny import NAME, tiny_vit

import tome
from tome_bench.ready import table_line
from tome_serve.app import create_app
from tome_serve.config import Settings
from tome_serve.state import Keeper, LaneState, StateFolder, StateKey, weights_digest

REPO = Path(__file__).resolve().parents[1]


def key(**changes: object) -> StateKey:
    base = StateKey(
        model="vit_x",
        model_kwargs={"img_size": 64},
        weights="random (seed 0)",
        dtype="float32",
        device="cpu",
        processor="Some CPU",
        isa=["avx2"],
        torch="2.0",
        timm="1.0",
        max_batch_size=8,
        r_grid=[0, 4, 8],
        instances=2,
        torch_threads=1,
    )
    return dataclasses.replace(base, **changes)


# -- the folder ---------------------------------------------------------------------------------


def test_a_file_is_read_back_only_by_its_own_key_and_the_log_says_what_differs(tmp_path, caplog):
    folder = StateFolder(tmp_path / "state")  # created by the first write
    assert folder.write(key(), {"timings": {"cells": [1]}})
    assert folder.read(key()) == {"timings": {"cells": [1]}}
    assert [path.name for path in folder.path.iterdir()] == [key().file_name]  # no temporary left
    with caplog.at_level(logging.INFO, logger="tome_serve.state"):
        assert folder.read(key(dtype="bfloat16")) == {}
        assert folder.read(key(model_kwargs={"img_size": 96})) == {}
    assert "dtype: 'bfloat16' here vs 'float32'" in caplog.text
    assert "model_kwargs: {'img_size': 96} here vs {'img_size': 64}" in caplog.text
    assert key(dtype="bfloat16").file_name != key().file_name


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ('{"format": 1, "key": {', "not JSON"),
        ("[1, 2]", "not a state file"),
        ('{"format": 99, "sections": {}}', "not a state file"),
        ("other key", "made for another key (instances: 2 here vs 4)"),
        ("no sections", "no sections"),
    ],
)
def test_a_corrupt_or_foreign_file_is_ignored_with_a_warning(tmp_path, caplog, content, why):
    folder = StateFolder(tmp_path)
    if content == "other key":
        content = json.dumps({"format": 1, "key": key(instances=4).as_json(), "sections": {}})
    elif content == "no sections":
        content = json.dumps({"format": 1, "key": key().as_json(), "sections": [1]})
    (tmp_path / key().file_name).write_text(content)
    with caplog.at_level(logging.WARNING, logger="tome_serve.state"):
        assert folder.read(key()) == {}
    assert f"ignoring {tmp_path / key().file_name}: " in caplog.text and why in caplog.text


def test_a_folder_that_cannot_be_written_is_a_warning(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="tome_serve.state"):
        assert StateFolder(blocked / "state").write(key(), {"timings": {}}) is False
    assert "cannot save the state" in caplog.text


def test_concurrent_writers_never_let_a_reader_see_half_a_file(tmp_path):
    """Pods sharing a node's folder write the same file at once: every read gets one writer's whole
    file (a write in place would show readers truncated JSON)."""
    folder = StateFolder(tmp_path)
    payloads = [{"timings": {"writer": n, "cells": list(range(5_000))}} for n in range(3)]
    folder.write(key(), payloads[0])
    stop = threading.Event()

    def write(payload: dict) -> None:
        while not stop.is_set():
            folder.write(key(), payload)

    writers = [threading.Thread(target=write, args=(payload,)) for payload in payloads]
    for writer in writers:
        writer.start()
    try:
        reads = [folder.read(key()) for _ in range(40)]
    finally:
        stop.set()
        for writer in writers:
            writer.join()
    assert all(read in payloads for read in reads)
    assert [path.name for path in tmp_path.iterdir()] == [key().file_name]


def test_a_lane_keeps_the_sections_it_does_not_provide(tmp_path):
    """Another table (a fidelity table, say) saved in the same file survives a save of the timings."""
    folder = StateFolder(tmp_path)
    folder.write(key(), {"fidelity": {"r": [0.99]}, "timings": {"old": True}})
    state = LaneState(folder, key())
    assert state.section("fidelity") == {"r": [0.99]}
    state.provide("timings", lambda: {"new": True})
    assert state.save()
    assert folder.read(key()) == {"fidelity": {"r": [0.99]}, "timings": {"new": True}}
    state.discard("fidelity", "unusable")
    state.save()
    assert folder.read(key()) == {"timings": {"new": True}}


def test_the_keeper_saves_after_the_recheck_every_interval_and_at_stop(tmp_path):
    folder = StateFolder(tmp_path)
    state = LaneState(folder, key())
    saves = []
    state.provide("timings", lambda: saves.append(time.monotonic()) or {"saves": len(saves)})
    rechecked = threading.Event()
    keeper = Keeper(state, lambda stop: rechecked.set(), every_s=0.05)
    keeper.start()
    wait_until(lambda: len(saves) >= 3, 10, "three saves")
    keeper.stop()
    assert rechecked.is_set()
    assert folder.read(key())["timings"] == {"saves": len(saves)}  # the last save is the stop's


# -- the key ------------------------------------------------------------------------------------


def test_weights_are_told_apart_by_their_tensors_and_random_ones_by_the_seed():
    model = tiny_vit(img_size=32)
    same = tiny_vit(img_size=32)
    assert weights_digest(model, "random") == "random (seed 0)"
    assert weights_digest(model, "/a/file.safetensors") == weights_digest(same, "/another/copy.pth")
    with torch.no_grad():
        same.blocks[0].attn.qkv.weight[0, 0] += 1e-3
    assert weights_digest(model, "pretrained") != weights_digest(same, "pretrained")
    half = tiny_vit(img_size=32).to(torch.bfloat16)  # the served dtype is hashed too (no numpy bf16)
    assert weights_digest(half, "pretrained").startswith("sha256:")


# -- a server's start ---------------------------------------------------------------------------


def serve(state_dir: Path, until: Callable[[], bool] = lambda: True, **changes: object) -> dict:
    """Start the tiny model in-process with ``state_dir``, answer one request, wait ``until``, stop;
    its /models r=auto part."""
    return served(state_dir, until, **changes)["auto"]


def served(state_dir: Path, until: Callable[[], bool] = lambda: True, **changes: object) -> dict:
    """:func:`serve`, returning the model's whole /models entry."""
    base = {"model_kwargs": TINY_MODEL_KWARGS, "device": "cpu", "dtype": "float32", "auto_warmup_s": 2}
    settings = Settings(model=NAME, weights="random", state_dir=state_dir, **{**base, **changes})
    with TestClient(create_app(settings)) as client:
        wait_until(lambda: is_ready(client), 60, "/readyz 200")
        assert client.post("/classify", content=png()).status_code == 200
        wait_until(until, 60, "the condition")
        return client.get("/models").json()["models"][0]


@pytest.mark.parametrize(
    ("change", "logged"),
    [
        ({"dtype": "bfloat16"}, "dtype: 'bfloat16' here vs 'float32'"),
        ({"model_kwargs": {**TINY_MODEL_KWARGS, "num_classes": 10}}, "model_kwargs: {"),
    ],
    ids=["dtype", "model_kwargs"],
)
def test_a_changed_key_measures_again_and_keeps_both_files(tmp_path, caplog, change, logged):
    assert serve(tmp_path)["timings_source"] == "measured"
    with caplog.at_level(logging.INFO, logger="tome_serve"):
        assert serve(tmp_path, **change)["timings_source"] == "measured"
    assert logged in caplog.text
    assert len(list(tmp_path.glob("*.json"))) == 2  # a rollback to the old settings finds its own
    assert serve(tmp_path, **change)["timings_source"] == "state"


def test_a_corrupt_state_file_is_measured_over_and_replaced(tmp_path, caplog):
    serve(tmp_path)
    (path,) = tmp_path.glob("*.json")
    path.write_text(path.read_text()[:200])  # cut short, as by a full disk
    with caplog.at_level(logging.WARNING, logger="tome_serve"):
        assert serve(tmp_path)["timings_source"] == "measured"
    assert f"ignoring {path}: not JSON" in caplog.text
    assert serve(tmp_path)["timings_source"] == "state"


def test_a_restart_with_the_state_folder_is_ready_without_the_warm_up(tmp_path):
    """The real process twice on one folder: the first measures the table (every cell, 3 samples), the
    second loads it, serves at once, and re-checks it in the background."""
    env = {"TOME_STATE_DIR": str(tmp_path), "TOME_AUTO_WARMUP_S": "60"}
    auto, logs = [], []
    for _ in range(2):
        server = start_server(env)
        try:
            auto.append(httpx.get(f"{server.url}/models").json()["models"][0]["auto"])
            classified = httpx.post(f"{server.url}/classify", content=png(), timeout=30)
            assert classified.status_code == 200, classified.text
        finally:
            server.stop()
            logs.append(server.log())
            server.log_path.unlink(missing_ok=True)
    assert [a["timings_source"] for a in auto] == ["measured", "state"]
    assert "no saved state" in logs[0]
    cells = 36 * len(tome.MERGE_RULES)  # 9 r x 4 batch sizes, one table per merge rule
    measured = re.search(rf"timing table: {cells} cells measured in ([\d.]+) s", logs[0])
    loaded = re.search(rf"timing table: {cells} cells loaded from \S+ in ([\d.]+) s", logs[1])
    assert measured and loaded, logs
    assert float(loaded[1]) < float(measured[1])
    assert [table_line(log) for log in logs] == [(cells, float(measured[1])), (cells, float(loaded[1]))]
    assert auto[1]["target_ms"] == auto[0]["target_ms"]  # derived from the same table


def test_the_file_keeps_a_table_per_merge_rule_and_one_from_before_is_measured_over(tmp_path, caplog):
    serve(tmp_path)
    (path,) = tmp_path.glob("*.json")
    saved = json.loads(path.read_text())
    tables = saved["sections"]["timings"]
    assert sorted(tables) == sorted(tome.MERGE_RULES)
    assert all(table["merge"] == rule for rule, table in tables.items())
    assert all(len(table["cells"]) == 36 for table in tables.values())
    saved["sections"]["timings"] = tables["tome"]  # the layout before tables per rule: one table
    path.write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING, logger="tome_serve"):
        assert serve(tmp_path)["timings_source"] == "measured"
    assert "expected a timing table per merge rule (tome, mlerp)" in caplog.text
    assert serve(tmp_path)["timings_source"] == "state"


def test_a_loaded_table_is_measured_again_while_idle_and_saved(tmp_path, caplog):
    serve(tmp_path)
    (path,) = tmp_path.glob("*.json")
    first = json.loads(path.read_text())
    with caplog.at_level(logging.INFO, logger="tome_serve"):
        auto = serve(tmp_path, until=lambda: "background re-check" in caplog.text)
    assert auto["timings_source"] == "state"
    assert re.search(r"\d+ cells re-measured while idle: now / saved = [\d.]+ \(median", caplog.text)
    again = json.loads(path.read_text())
    assert again["written"] > first["written"] and again["key"] == first["key"]


def test_the_fidelity_table_is_kept_and_not_counted_twice_unless_its_images_changed(tmp_path, caplog):
    """Calibrating again on the same photos would count each comparison twice and tighten the bounds for
    nothing; other calibration images make the saved table stale."""
    first = served(tmp_path)["fidelity"]
    with caplog.at_level(logging.INFO, logger="tome_serve"):
        second = served(tmp_path)["fidelity"]
    assert "calibration skipped" in caplog.text
    assert second["sources"] == first["sources"] and first["sources"]["calibration"] > 0
    by_rule = {rule: table["sources"] for rule, table in first["by_merge"].items()}
    assert {rule: table["sources"] for rule, table in second["by_merge"].items()} == by_rule
    assert sorted(by_rule) == ["mlerp", "tome"]  # every rule's table kept
    assert [(row["r"], row["kind"], row["samples"]) for row in second["rows"]] == [
        (row["r"], row["kind"], row["samples"]) for row in first["rows"]
    ]
    assert [row["lower"] for row in second["rows"]] == pytest.approx([row["lower"] for row in first["rows"]])
    photos = tmp_path / "photos"
    photos.mkdir()
    for sample in sorted((REPO / "server" / "static" / "samples").glob("*.jpg"))[:2]:
        (photos / sample.name).write_bytes(sample.read_bytes())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tome_serve"):
        third = served(tmp_path, calibration_dir=photos)["fidelity"]
    assert "other calibration images" in caplog.text
    assert third["sources"]["calibration"] == first["sources"]["calibration"] // 2  # two photos of four
