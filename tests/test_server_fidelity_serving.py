"""Fidelity in the server (a tiny random ViT, in process): start-up calibration on the sample photos
fills the table within its budget, /models, /metrics and every answer show it, a fidelity floor becomes
the request's auto ceiling and is never crossed, and shadow runs fill the table while idle and are
dropped, and counted, under load."""

from __future__ import annotations

import asyncio
import base64
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from autofakes import MAX_BATCH, R_MAX, FakeClock, warmed_table
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from serverutil import TINY_MODEL_KWARGS, lane_of, metric_value, png

from tome_runtime.fidelity import Comparison, FidelityTable, Outputs
from tome_serve import calibration
from tome_serve.app import create_app
from tome_serve.auto.controller import AutoController, Waiting
from tome_serve.config import Settings
from tome_serve.fidelity_metrics import FidelityMetrics
from tome_serve.inference import Kept
from tome_serve.item import Result, Want
from tome_serve.loading import load_model
from tome_serve.params import Asked
from tome_serve.service import InferenceService
from tome_serve.shadow import Shadow

MODEL = "vit_tiny_patch16_224"
GRID = tuple(range(0, 33, 4))  # the tiny model's r grid: r_max 32


def settings(**overrides: object) -> Settings:
    return Settings(
        model=MODEL,
        weights="random",
        model_kwargs=TINY_MODEL_KWARGS,
        device="cpu",
        auto_warmup_s=1,
        **overrides,
    )


@contextmanager
def started(app_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield client


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    """Default settings: calibration on the sample photos, no floor, no shadow runs."""
    with started(settings()) as client:
        yield client


def test_calibration_on_the_sample_photos_fills_the_table(client: TestClient) -> None:
    photos = len(calibration.image_files(calibration.SAMPLES_DIR))
    fidelity = client.get("/models").json()["models"][0]["fidelity"]
    rows = {(row["r"], row["kind"]): row for row in fidelity["rows"]}
    assert sorted(rows) == [(r, kind) for r in GRID for kind in ("agreement", "cosine")]
    for (r, kind), row in rows.items():
        if r == 0:
            assert (row["mean"], row["lower"], row["samples"]) == (1.0, 1.0, 0)  # the reference itself
            continue
        assert row["samples"] == photos and row["lower"] <= row["mean"] <= 1.0
        if kind == "agreement":
            assert row["lower"] < 0.6  # four images, even all agreeing: a loose bound, honestly
    assert fidelity["sources"] == {"calibration": photos * (len(GRID) - 1)}
    assert fidelity["floor"] is None and fidelity["max_r_at_floor"] is None
    assert "Wilson" in fidelity["bounds"]["agreement"] and "Bernstein" in fidelity["bounds"]["cosine"]


def test_answers_carry_the_fidelity_of_the_r_they_were_served_at(client: TestClient) -> None:
    rows = {
        (row["r"], row["kind"]): row for row in client.get("/models").json()["models"][0]["fidelity"]["rows"]
    }
    body = client.post("/classify", params={"r": 8}, content=png()).json()
    assert body["fidelity"] == {
        key: rows[8, "agreement"][key] for key in ("r", "kind", "samples", "mean", "lower")
    }
    assert client.post("/classify", params={"r": 0}, content=png()).json()["fidelity"]["lower"] == 1.0
    shown = client.post("/visualize", params={"r": 8}, content=png()).headers["x-tome-fidelity"]
    assert shown.startswith("kind=agreement;") and f"samples={rows[8, 'agreement']['samples']}" in shown
    assert client.post("/classify", params={"r": 6}, content=png()).json()["fidelity"] is None  # off the grid


def test_embeddings_carry_the_cosine_fidelity_and_take_a_cosine_floor(client: TestClient) -> None:
    rows = {
        (row["r"], row["kind"]): row for row in client.get("/models").json()["models"][0]["fidelity"]["rows"]
    }
    data_uri = "data:image/png;base64," + base64.b64encode(png()).decode()
    body = client.post("/v1/embeddings", json={"input": [data_uri], "r": 8}).json()
    assert body["data"][0]["fidelity"] == {
        key: rows[8, "cosine"][key] for key in ("r", "kind", "samples", "mean", "lower")
    }
    # Four calibration photos meet no floor above 0, so a floor leaves r=auto only r=0.
    floored = client.post("/v1/embeddings", json={"input": [data_uri], "r": "auto", "min_fidelity": 0.5})
    assert floored.status_code == 200 and floored.json()["data"][0]["r"] == 0
    fixed = client.post("/v1/embeddings", json={"input": [data_uri], "r": 8, "min_fidelity": 0.5})
    assert fixed.status_code == 422 and "r=auto only" in fixed.json()["detail"]


def test_fidelity_metrics_are_read_at_scrape_time(client: TestClient) -> None:
    lane = lane_of(client, MODEL)
    exposition = client.get("/metrics").text
    for row in lane.fidelity["tome"].rows():
        labels = {"model": MODEL, "r": str(row.r), "kind": row.kind}
        assert metric_value(exposition, "tome_fidelity_samples", **labels) == row.samples
        assert metric_value(exposition, "tome_fidelity", bound="lower", **labels) == pytest.approx(row.lower)
    assert "\ntome_fidelity_floor" not in exposition  # no TOME_MIN_FIDELITY
    lane.fidelity["tome"].add(12, Comparison([True] * 3, [1.0] * 3, [1.0] * 3), "test")
    exposition = client.get("/metrics").text
    assert metric_value(exposition, "tome_fidelity_samples", model=MODEL, r="12", kind="agreement") == 4 + 3


def test_min_fidelity_is_checked_and_applies_to_r_auto_only(client: TestClient) -> None:
    for value in ("1.5", "-0.1", "high", "nan"):
        refused = client.post("/classify", params={"r": "auto", "min_fidelity": value}, content=png())
        assert (
            refused.status_code == 422
            and "min_fidelity must be a number from 0 to 1" in refused.json()["detail"]
        )
    fixed = client.post("/visualize", params={"r": 8, "min_fidelity": "0.9"}, content=png())
    assert fixed.status_code == 422 and "apply to r=auto only" in fixed.json()["detail"]


def known_table(rs: tuple[int, ...] = GRID) -> FidelityTable:
    """r=4 and r=12 measured well and agreeing; r=8 agreeing on too few images to count."""
    table = FidelityTable(MODEL, rs)
    table.add(4, Comparison([True] * 200, [1.0] * 200, [0.999] * 200), "test")
    table.add(8, Comparison([True] * 10, [1.0] * 10, [0.999] * 10), "test")
    table.add(12, Comparison([True] * 200, [1.0] * 200, [0.999] * 200), "test")
    return table


def test_a_floor_becomes_the_request_s_auto_ceiling_and_the_server_floor_wins() -> None:
    with started(settings(min_fidelity=0.9)) as client:
        lane = lane_of(client, MODEL)
        info = client.get("/models").json()["models"][0]["fidelity"]
        assert info["max_r_at_floor"] == {"agreement": 0, "cosine": 0}  # four photos: too few samples
        assert metric_value(client.get("/metrics").text, "tome_fidelity_floor", kind="agreement") == 0.9
        answer = client.post("/classify", params={"r": "auto"}, content=png()).json()
        assert answer["r"] == 0 and answer["fidelity"]["lower"] == 1.0

        lane.fidelity = {"tome": known_table(), "mlerp": FidelityTable(MODEL, GRID)}

        async def ceiling(**params: object) -> int:
            (item,) = lane.admit(Asked(r="auto", **params), Want(top_k=1), time.monotonic())
            item.future.cancel()
            return item.auto.max_r

        assert client.portal.call(ceiling) == 4  # r=8 has too few samples, so r=12 is out of reach too
        assert client.portal.call(lambda: ceiling(min_fidelity="0.5")) == 4  # lower than the server's: no
        assert client.portal.call(lambda: ceiling(min_fidelity="0.999")) == 0
        assert client.portal.call(lambda: ceiling(max_r="2")) == 2
        rows = client.get("/models").json()["models"][0]["fidelity"]["rows"]
        assert [row["r"] for row in rows if row["kind"] == "agreement" and row["meets_floor"]] == [0, 4, 12]


@pytest.mark.parametrize("seed", range(3))
def test_r_auto_never_chooses_an_r_below_the_floor(seed: int) -> None:
    """Random tables (some r measured on too few images), random floors, random backlogs: the r the
    controller chooses under the floor's auto ceiling always meets the floor, and the load does make
    it merge."""
    rng = random.Random(seed)
    clock, merged, timings = FakeClock(), 0, warmed_table().snapshot
    grid = tuple(range(0, R_MAX + 1, 4))
    for _ in range(100):
        table = FidelityTable("fake", grid)
        for r in grid[1:]:
            samples = rng.choice([5, 29, 60, 400])
            agreeing = round(samples * rng.uniform(0.9, 1.0))
            table.add(
                r, Comparison([True] * agreeing + [False] * (samples - agreeing), None, [1.0] * samples), "t"
            )
        floor = rng.uniform(0.8, 0.99)
        ceiling = table.ceiling("agreement", floor, 30)
        controller = AutoController(timings, MAX_BATCH, R_MAX, clock=clock)
        backlog = [Waiting(clock() - rng.uniform(0, 0.2), 0.25, ceiling) for _ in range(rng.randint(1, 60))]
        r = controller.decide(backlog, busy_s=()).r
        assert table.meets(r, "agreement", floor, 30), (r, ceiling, floor)
        merged += r > 0
    assert merged > 10  # the test exercised merging, not just r=0


def test_calibration_stays_within_its_budget_and_measures_the_small_r_first(tmp_path) -> None:
    for photo in calibration.image_files(calibration.SAMPLES_DIR):
        shutil.copy(photo, tmp_path / photo.name)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    model = load_model(MODEL, settings())
    clock = FakeClock(0.0)

    runs = []

    def run(r: int, pixels: list[torch.Tensor], merge: str) -> Outputs:
        clock.advance(1.0)  # every batch takes one second
        runs.append((r, merge))
        return Outputs(torch.randn(len(pixels), 10), torch.randn(len(pixels), 8))

    tables = {rule: FidelityTable(MODEL, (0, 4, 8)) for rule in ("mlerp", "tome")}  # the default first
    files = calibration.image_files(tmp_path)
    report = calibration.calibrate(
        tables, run, model, files, batch_size=2, budget_s=8.0, max_pixels=10**8, clock=clock
    )
    # Batch 1 at r=0, then r=4 and 8 with both rules (5 s), batch 2 at r=0 and r=4 with both (8 s): the
    # next run would end past the budget.
    assert runs[:5] == [(0, "mlerp"), (4, "mlerp"), (4, "tome"), (8, "mlerp"), (8, "tome")]
    assert clock() <= 8.0 and not report.complete and report.runs == 8
    for table in tables.values():
        assert [table.estimate(r, "cosine").samples for r in (4, 8)] == [4, 2]
    assert report.images == 4 and len(report.unreadable) == 1 and "broken.jpg" in report.unreadable[0]
    assert report.rules == ("mlerp", "tome")


class Idle:
    """The lane's ``busy`` flag, set by the test."""

    def __init__(self) -> None:
        self.busy = False

    def __call__(self) -> bool:
        return self.busy


def kept(count: int) -> list[Kept]:
    return [
        Kept(torch.zeros(3, 8, 8, dtype=torch.uint8), Outputs(torch.eye(1, 4), torch.ones(1, 4)))
        for _ in range(count)
    ]


def test_shadow_runs_only_while_idle_and_counts_what_it_drops() -> None:
    registry = CollectorRegistry()
    runs = Counter("tome_shadow_runs_total", "", ["model", "outcome"], registry=registry)
    table, other, state, calls = FidelityTable("m", (0, 8)), FidelityTable("m", (0, 8)), Idle(), []

    async def reference(pixels: list[torch.Tensor]) -> Outputs:
        calls.append(len(pixels))
        state.busy = len(calls) == 2  # live work arrives during the second shadow image
        return Outputs(torch.eye(1, 4), torch.ones(1, 4))

    def count(outcome: str) -> float:
        return registry.get_sample_value("tome_shadow_runs_total", {"model": "m", "outcome": outcome}) or 0.0

    async def scenario() -> None:
        shadow = Shadow("m", 1.0, {"tome": other, "mlerp": table}, reference, state, runs)
        assert shadow.pick(0, 4) == frozenset() and shadow.pick(8, 3) == {0, 1, 2}
        state.busy = True
        shadow.offer(8, "mlerp", kept(3))  # busy: all three dropped, none run
        assert (count("run"), count("dropped"), calls) == (0, 3, [])
        state.busy = False
        shadow.offer(8, "mlerp", kept(4))
        for _ in range(100):  # the shadow task runs on this loop
            await asyncio.sleep(0)
        assert calls == [1, 1]  # one image at a time; busy after the second: the other two dropped
        assert (count("run"), count("dropped")) == (2, 5)
        assert table.estimate(8, "agreement").samples == 2
        assert other.estimate(8, "agreement") is None  # the batch's own rule's table only

    asyncio.run(scenario())


def test_shadow_runs_fill_the_table_when_idle_and_are_dropped_under_load() -> None:
    with started(settings(shadow_rate=1.0, calibration_budget_s=0)) as client:
        service: InferenceService = client.app.state.service
        lane = lane_of(client, MODEL)

        def counted(outcome: str) -> float:
            return metric_value(client.get("/metrics").text, "tome_shadow_runs_total", outcome=outcome)

        for i in range(3):  # one at a time: the model is idle after each
            assert client.post("/classify", params={"r": 8}, content=png((i, 90, 200))).status_code == 200
            deadline = time.monotonic() + 10
            while counted("run") < i + 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert lane.fidelity["tome"].estimate(8, "agreement").samples == 3 and counted("dropped") == 0

        async def burst() -> list[Result]:
            images = [png((i * 5, 40, 90)) for i in range(40)]
            return await asyncio.gather(
                *(service.infer(Asked(None, 4), image, Want(top_k=1)) for image in images)
            )

        assert len(client.portal.call(burst)) == 40
        deadline = time.monotonic() + 10
        while counted("run") + counted("dropped") < 3 + 40:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert counted("dropped") > 0  # batches that ended with more waiting behind them
        assert lane.fidelity["tome"].estimate(4, "agreement").samples == counted("run") - 3


def test_every_fidelity_metric_the_deploy_files_use_is_registered_and_passes_promtool(promtool) -> None:
    from test_deploy_prometheus import FIDELITY_METRICS

    registry = CollectorRegistry()
    metrics = FidelityMetrics(registry, lambda: [known_table()], floor=0.95)
    metrics.serving(MODEL)
    text = generate_latest(registry).decode()
    names = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
    assert not FIDELITY_METRICS - names, FIDELITY_METRICS - names
    result = promtool("check", "metrics", input=text)
    assert result.returncode == 0, result.stdout + result.stderr
