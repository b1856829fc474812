"""r=auto's choice of (r, merge rule) for batches of requests that name no rule (server/auto/pareto.py).

Over crafted timing and fidelity tables: the best measured fidelity within the controller's time budget
and each rule's ceiling, ties to the cheaper pair and then the default rule, unmeasured pairs never
preferred, and (a property over random tables) never a pair another measured one beats on both cost
and fidelity. In the server (a tiny random ViT in process, its tables replaced by crafted ones): the
answer names the chosen pair and carries that rule's fidelity, a request naming a rule keeps it,
/models shows a table per rule, and a fidelity floor is never crossed with either rule."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from functools import partial

import pytest
from autofakes import MAX_BATCH, R_MAX, FakeClock, cpu_like, warmed_table
from fastapi.testclient import TestClient
from serverutil import TINY_MODEL_KWARGS, is_ready, lane_of, png, wait_until

from tome_runtime.fidelity import Comparison, FidelityTable
from tome_serve.app import create_app
from tome_serve.auto import AutoR
from tome_serve.auto.controller import Waiting
from tome_serve.auto.pareto import LowerBound, Pair, choose
from tome_serve.auto.timings import Snapshot
from tome_serve.config import Settings
from tome_serve.item import Item, Want
from tome_serve.lane import Lane
from tome_serve.params import Asked

GRID = tuple(range(0, R_MAX + 1, 4))
OPEN = {"tome": R_MAX, "mlerp": R_MAX}
"""Ceilings that allow every r."""
R_STAR = 12
"""The controller's r for the default rule in the crafted cases; its budget: cpu_like(12, 8) = 60 ms."""


def tome_lower(r: int) -> float:
    """Fidelity falling with r: 1 at r=0, 0.88 at r=12."""
    return 1.0 - 0.01 * r


def scaled(factor: float) -> Callable[[int, int], float]:
    return lambda r, size: factor * cpu_like(r, size)


def timings(mlerp_seconds: Callable[[int, int], float]) -> dict[str, Snapshot]:
    return {
        "tome": warmed_table(cpu_like).snapshot(),
        "mlerp": warmed_table(mlerp_seconds, merge="mlerp").snapshot(),
    }


def bounds(
    mlerp: Callable[[int], float | None], tome: Callable[[int], float | None] = tome_lower
) -> LowerBound:
    def lower(r: int, rule: str) -> float | None:
        if r == 0:
            return 1.0
        return tome(r) if rule == "tome" else mlerp(r)

    return lower


@pytest.mark.parametrize(
    ("mlerp_speed", "mlerp_lower", "ceilings", "chosen"),
    [
        (0.95, lambda r: tome_lower(r) + 0.02, OPEN, (12, "mlerp")),  # cheaper and better
        (1.05, lambda r: tome_lower(r) - 0.02, OPEN, (12, "tome")),  # worse and slower
        (1.0, tome_lower, OPEN, (12, "tome")),  # equal: the default rule
        (0.95, tome_lower, OPEN, (12, "mlerp")),  # equal fidelity, cheaper: the cheaper pair
        (1.05, lambda r: tome_lower(r) + 0.05, OPEN, (16, "mlerp")),  # slower, better at more r
        (0.95, lambda r: None, OPEN, (12, "tome")),  # unmeasured: never preferred
        (0.95, lambda r: tome_lower(r) + 0.02, {"tome": R_MAX, "mlerp": 8}, (12, "tome")),  # its ceiling
    ],
    ids=[
        "cheaper-and-better",
        "worse-and-slower",
        "equal",
        "equal-fidelity-cheaper",
        "better-at-more-r",
        "unmeasured",
        "above-its-ceiling",
    ],
)
def test_the_choice_between_the_two_rules(mlerp_speed, mlerp_lower, ceilings, chosen) -> None:
    pair = choose(R_STAR, MAX_BATCH, timings(scaled(mlerp_speed)), ceilings, bounds(mlerp_lower), "tome")
    assert (pair.r, pair.merge) == chosen
    assert pair.seconds <= cpu_like(R_STAR, MAX_BATCH) + 1e-12  # within the controller's budget


def test_a_better_measured_r_of_the_default_rule_within_the_budget_is_served() -> None:
    """r=16 is faster than the controller's r=12 and measured better: the r=12 pair is dominated."""
    tome = {12: 0.88, 16: 0.9, 20: 0.8, 24: 0.7}
    pair = choose(R_STAR, MAX_BATCH, timings(scaled(1.2)), OPEN, bounds(lambda r: None, tome.get), "tome")
    assert (pair.r, pair.merge) == (16, "tome")


def test_while_the_controller_s_own_pair_is_unmeasured_it_is_served() -> None:
    lower = bounds(lambda r: 0.99, lambda r: None if r == R_STAR else tome_lower(r))
    pair = choose(R_STAR, MAX_BATCH, timings(scaled(0.9)), OPEN, lower, "tome")
    assert (pair.r, pair.merge, pair.lower) == (R_STAR, "tome", None)


def test_r0_is_the_default_rule_s_and_wins_whenever_it_is_within_the_budget() -> None:
    pair = choose(0, MAX_BATCH, timings(scaled(0.5)), OPEN, bounds(lambda r: 0.999), "tome")
    assert (pair.r, pair.merge, pair.lower) == (0, "tome", 1.0)


def dominates(a: Pair, b: Pair) -> bool:
    assert a.lower is not None and b.lower is not None
    return a.seconds <= b.seconds and a.lower >= b.lower and (a.seconds < b.seconds or a.lower > b.lower)


def random_seconds(rng: random.Random) -> Callable[[int, int], float]:
    """A fixed cost per batch, a cost per unit of r and per image, and noise per cell."""
    fixed, per_r, per_image = rng.uniform(0.002, 0.01), rng.uniform(0, 0.001), rng.uniform(0.005, 0.02)
    noise = {(r, size): rng.uniform(0.9, 1.1) for r in GRID for size in range(1, MAX_BATCH + 1)}
    return lambda r, size: (fixed + per_r * r + per_image * (1 - r / 32) * size) * noise[r, size]


def lookup(fidelity: dict[tuple[int, str], float | None], rule: str, r: int) -> float | None:
    return fidelity[r, rule]


def test_the_chosen_pair_is_never_dominated_over_random_tables() -> None:
    rng, chosen_rules = random.Random(19), set()
    pool = {
        rule: [warmed_table(random_seconds(rng), merge=rule).snapshot() for _ in range(6)] for rule in OPEN
    }
    for _ in range(300):
        snapshots = {rule: rng.choice(tables) for rule, tables in pool.items()}
        fidelity = {
            (r, rule): None if rng.random() < 0.3 else round(rng.uniform(0.5, 1.0), 1)  # with ties
            for r in GRID[1:]
            for rule in OPEN
        }
        lower = bounds(partial(lookup, fidelity, "mlerp"), partial(lookup, fidelity, "tome"))
        ceilings = {rule: rng.choice(GRID) for rule in OPEN}
        size = rng.randint(1, MAX_BATCH)
        usable = [r for r in snapshots["tome"].usable(size) if r <= ceilings["tome"]]
        r = rng.choice(usable)
        pair = choose(r, size, snapshots, ceilings, lower, "tome")
        budget, own = snapshots["tome"].seconds(r, size), lower(r, "tome")
        assert (
            pair.seconds <= budget and pair.r <= ceilings[pair.merge] and (pair.r > 0 or pair.merge == "tome")
        )
        assert pair.lower == lower(pair.r, pair.merge)
        if own is None:
            assert (pair.r, pair.merge) == (r, "tome")
            continue
        assert pair.lower is not None and pair.lower >= own
        for rule, snapshot in snapshots.items():
            for other in GRID[1:] if rule != "tome" else GRID:  # r=0 merges nothing: one pair
                rival = Pair(other, rule, snapshot.seconds(other, size), lower(other, rule))
                if rival.seconds <= budget and other <= ceilings[rule] and rival.lower is not None:
                    assert not dominates(rival, pair), (rival, pair)
        chosen_rules.add(pair.merge)
    assert chosen_rules == {"tome", "mlerp"}  # the property held for choices of both rules


def test_auto_r_plans_the_batch_at_the_chosen_pair() -> None:
    clock = FakeClock()
    auto = AutoR([warmed_table(), warmed_table(scaled(0.95), merge="mlerp")], R_MAX, clock=clock)
    queued = [Waiting(clock(), 0.2, R_MAX) for _ in range(24)]  # needs merging to be on time
    planned = auto.choose(queued)
    decision, rule = auto.choose_pair(queued, OPEN, bounds(lambda r: tome_lower(r) + 0.02))
    assert (decision.r, rule) == (planned.r, "mlerp") and planned.r > 0
    assert decision.predicted_s == pytest.approx(0.95 * cpu_like(planned.r, MAX_BATCH))


# -- in the server ------------------------------------------------------------------------------

MODEL = "vit_tiny_patch16_224"
SERVED_GRID = tuple(range(0, 33, 4))  # the tiny model's r grid: auto ceiling 32


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = Settings(
        model=MODEL,
        weights="random",
        model_kwargs=TINY_MODEL_KWARGS,
        device="cpu",
        auto_warmup_s=1,
        calibration_budget_s=0,
    )
    with TestClient(create_app(settings)) as client:
        wait_until(lambda: is_ready(client), 60, "/readyz 200")
        yield client


def one_image_seconds(factor: float) -> Callable[[int, int], float]:
    """200 ms per image at r=0, falling linearly with r (r=24: 80 ms), times ``factor``."""
    return lambda r, size: factor * 0.2 * size * (1 - r / 40)


def agreeing(count: int, samples: int = 200) -> Comparison:
    return Comparison([True] * count + [False] * (samples - count), None, [1.0] * samples)


@pytest.fixture
def lane(client: TestClient) -> Iterator[Lane]:
    """The lane with crafted tables: for one image and a 90 ms target the controller needs r=24 with
    tome (80 ms); mlerp costs 2% more, so its r=28 (61 ms) is the cheapest of its pairs in that budget,
    and it is measured better than tome at r=24. The controller's clock stands 1000 s after every
    request's arrival, so each counts with a fresh target from now: its decisions do not depend on how
    long the test takes."""
    lane: Lane = lane_of(client, MODEL)
    kept = lane.auto, lane.fidelity
    tables = [warmed_table(one_image_seconds(f), 32, 8, rule) for f, rule in ((1.0, "tome"), (1.02, "mlerp"))]
    lane.auto = AutoR(tables, 32, lane.worker.instances, clock=FakeClock(time.monotonic() + 1000))
    lane.fidelity = {rule: FidelityTable(MODEL, SERVED_GRID) for rule in ("tome", "mlerp")}
    for r, count in ((24, 190), (28, 180), (32, 170)):
        lane.fidelity["tome"].add(r, agreeing(count), "test")
    lane.fidelity["mlerp"].add(28, agreeing(198), "test")
    yield lane
    lane.auto, lane.fidelity = kept


def classify(client: TestClient, **params: object) -> dict:
    query = {
        key: value for key, value in {"r": "auto", "target_ms": 90, **params}.items() if value is not None
    }
    answer = client.post("/classify", params=query, content=png())
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_the_server_answers_at_the_chosen_pair_with_its_rule_s_fidelity(client, lane) -> None:
    rows = client.get("/models").json()["models"][0]["fidelity"]["by_merge"]
    fidelity = {
        rule: {row["r"]: row for row in table["rows"] if row["kind"] == "agreement"}
        for rule, table in rows.items()
    }
    chosen = classify(client)
    assert (chosen["r"], chosen["merge"], chosen["r_auto"]) == (28, "mlerp", True)
    assert (
        chosen["fidelity"]["samples"] == 200 and chosen["fidelity"]["lower"] == fidelity["mlerp"][28]["lower"]
    )
    assert (
        chosen["tokens"]["output"]
        == classify(client, r=28, merge="mlerp", target_ms=None)["tokens"]["output"]
    )
    # A request that names its rule keeps it: r is chosen with that rule's timings alone.
    named = classify(client, merge="tome")
    assert (named["r"], named["merge"]) == (24, "tome") and named["fidelity"]["mean"] == 0.95
    named = classify(client, merge="mlerp")
    assert (named["r"], named["merge"]) == (24, "mlerp")  # 82 ms with mlerp: r=24 still fits 90 ms
    assert named["fidelity"] is None  # mlerp at r=24 is unmeasured, whatever tome's r=24 says


def test_models_shows_a_timing_and_a_fidelity_table_per_rule(client, lane) -> None:
    info = client.get("/models").json()["models"][0]
    assert info["default_merge"] == "tome"
    auto, fidelity = info["auto"], info["fidelity"]
    assert sorted(auto["timings_by_merge"]) == sorted(fidelity["by_merge"]) == ["mlerp", "tome"]
    assert auto["timings"] == auto["timings_by_merge"]["tome"]  # the existing field: the default rule's
    for rule, factor in (("tome", 1.0), ("mlerp", 1.02)):
        speeds = {row["r"]: row["images_per_s"]["1"] for row in auto["timings_by_merge"][rule]}
        assert speeds == pytest.approx(
            {r: 1 / one_image_seconds(factor)(r, 1) for r in SERVED_GRID}, abs=0.01
        )
    default = {key: fidelity[key] for key in ("sources", "max_r_at_floor", "rows")}
    assert default == fidelity["by_merge"]["tome"]
    measured = {
        rule: sorted(row["r"] for row in table["rows"] if row["samples"] and row["kind"] == "agreement")
        for rule, table in fidelity["by_merge"].items()
    }
    assert measured == {"tome": [24, 28, 32], "mlerp": [28]}


@pytest.mark.parametrize("seed", range(2))
def test_a_fidelity_floor_is_never_crossed_with_either_rule(client, lane, seed) -> None:
    """Random fidelity tables per rule (some r on too few images), mlerp's cost, floors, targets and
    batches: the (r, rule) of every planned batch meets each request's floor in that rule's table."""
    rng, plans = random.Random(seed), set()
    tome = warmed_table(one_image_seconds(1.0), 32, 8)
    mlerp = [warmed_table(one_image_seconds(f), 32, 8, "mlerp") for f in (0.9, 1.0, 1.1)]
    for _ in range(60):
        clock = FakeClock(time.monotonic() + 1000)  # a fresh controller, planning with fresh targets
        lane.auto = AutoR([tome, rng.choice(mlerp)], 32, lane.worker.instances, clock=clock)
        for rule in ("tome", "mlerp"):
            table = lane.fidelity[rule] = FidelityTable(MODEL, SERVED_GRID)
            for r in SERVED_GRID[1:]:
                samples = rng.choice([10, 60, 400])
                table.add(r, agreeing(round(samples * rng.uniform(0.85, 1.0)), samples), "t")
        floor, named, count = rng.uniform(0.8, 0.99), rng.choice([None, "tome", "mlerp"]), rng.randint(1, 8)
        target_ms = 200 * count * rng.uniform(0.3, 0.95)  # too short for r=0, long enough for a larger r
        params = {"target_ms": target_ms, "min_fidelity": floor, "merge": named}

        async def admitted(count: int, params: dict) -> list[Item]:
            return lane.admit(Asked(r="auto", **params), Want(top_k=1), time.monotonic(), count)

        items = client.portal.call(admitted, count, params)
        plan = lane._plan(items[0].key, items)
        rule = plan.merge or named
        assert lane.fidelity[rule].meets(plan.r, "agreement", floor, 30), (plan, floor)
        plans.add((plan.r > 0, rule, named is None))
        for item in items:
            item.future.cancel()
    assert {(True, "tome", True), (True, "mlerp", True)} <= plans  # the server chose each rule, merging
