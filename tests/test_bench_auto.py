"""The pure parts of the r=auto benchmark (tome_bench.auto): the arrival schedule, the request it
sends, the per-cell statistics, the verdict against the issue's goals, and the plot. The benchmark
itself is a script run by hand (it needs minutes and a server with r=auto)."""

from __future__ import annotations

import pytest

from tome_bench.auto import (
    AUTO,
    FLOOR,
    Cell,
    cell_stats,
    floor_facts,
    parse_args,
    plot,
    rotated,
    server_env,
    verdict,
)
from tome_bench.serve import Outcome, answer_r, classify_request, poisson_schedule


def test_poisson_schedule_is_seeded_and_has_the_asked_rate():
    schedule = poisson_schedule(rate=200.0, seconds=50.0)
    assert schedule == poisson_schedule(rate=200.0, seconds=50.0)
    assert schedule != poisson_schedule(rate=200.0, seconds=50.0, seed=1)
    assert schedule[0] == 0.0 and max(schedule) < 50.0
    assert schedule == sorted(schedule)
    assert len(schedule) / 50.0 == pytest.approx(200.0, rel=0.03)
    gaps = [b - a for a, b in zip(schedule, schedule[1:], strict=False)]
    # Exponential gaps: the standard deviation equals the mean (a fixed pace would have none).
    assert float(sum((g - 0.005) ** 2 for g in gaps) / len(gaps)) ** 0.5 == pytest.approx(0.005, rel=0.05)


def test_the_auto_request_carries_its_target_and_the_answer_its_r():
    _, _, request = classify_request("http://127.0.0.1:8000", b"jpeg", AUTO, {}, "&target_ms=250")
    assert request.startswith(b"POST /classify?r=auto&top_k=1&target_ms=250 HTTP/1.1\r\n")
    assert request.endswith(b"\r\n\r\njpeg")
    assert answer_r(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-tome-r: 12\r\n\r\n", b"{}") == 12
    assert answer_r(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", b'{"r": 8, "batch_size": 2}') == 8
    assert answer_r(b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\n\r\n", b'{"detail": "r"}') is None


def outcome(latency_s: float, status: int = 200, r: int | None = 0) -> Outcome:
    return Outcome(sent_at=0.0, latency_s=latency_s, status=status, r=r)


def test_cell_statistics_count_goodput_only_within_the_target():
    outcomes = [outcome(0.1, r=0), outcome(0.2, r=8), outcome(0.3, r=16), outcome(0.05, 429, None)]
    outcomes += [outcome(10.0, 504, None), outcome(0.01, 500, None)]
    cell = cell_stats(outcomes, target_s=0.25, seconds=2.0, load=1.5, variant=AUTO, offered_rps=3.0)
    assert (cell.sent, cell.answered, cell.within_target) == (6, 3, 2)
    assert (cell.shed_429, cell.timed_out_504, cell.other_errors) == (1, 1, 1)
    assert cell.goodput_rps == 1.0
    assert cell.shed_share == pytest.approx(1 / 6, abs=1e-4)
    assert cell.mean_r == 8.0
    assert cell.p50_ms == 200.0
    assert 290 < cell.p99_ms <= 300


def test_with_a_floor_only_answers_in_time_at_a_qualifying_r_are_good():
    outcomes = [outcome(0.1, r=0), outcome(0.2, r=8), outcome(0.2, r=16), outcome(0.9, r=8)]
    outcomes += [outcome(0.1, r=None), outcome(0.05, 429, None)]
    cell = cell_stats(outcomes, 0.25, 2.0, 1.5, AUTO, 3.0, qualifying=frozenset({0, 4, 8}))
    assert (cell.answered, cell.within_target, cell.good_answers) == (5, 4, 2)  # r=0 and the fast r=8
    assert cell.below_floor == 2  # r=16, and an answer that did not say its r
    assert cell.good_rps == 1.0 and cell.goodput_rps == 2.0
    unbounded = cell_stats(outcomes, 0.25, 2.0, 1.5, AUTO, 3.0)
    assert (unbounded.good_answers, unbounded.below_floor) == (unbounded.within_target, 0)


def test_the_qualifying_r_and_the_floor_variant_come_from_models():
    rows = [
        {"r": 4, "kind": "agreement", "meets_floor": True},
        {"r": 4, "kind": "cosine", "meets_floor": True},
        {"r": 8, "kind": "agreement", "meets_floor": False},
        {"r": 12, "kind": "agreement", "meets_floor": True},  # beyond a gap: qualifies, auto stops at 4
        {"r": 16, "kind": "cosine", "meets_floor": True},  # another kind's row
    ]
    fidelity = {"floor": 0.8, "max_r_at_floor": {"agreement": 4, "cosine": 4}, "rows": rows}
    assert floor_facts({"fidelity": fidelity}) == (frozenset({0, 4, 12}), 4)
    assert floor_facts({"fidelity": {**fidelity, "floor": None}}) == (None, None)
    assert floor_facts({"fidelity": None}) == (None, None)


def test_a_cell_with_no_answers_has_no_latency_or_r():
    cell = cell_stats([outcome(0.0, 429, None)], 0.25, 1.0, 3.0, "0", 10.0)
    assert (cell.p50_ms, cell.p99_ms, cell.mean_r, cell.goodput_rps) == (None, None, None, 0.0)


def test_variants_start_at_a_different_one_for_every_load():
    variants = ["0", "16", AUTO]
    orders = [rotated(variants, index) for index in range(3)]
    assert [order[0] for order in orders] == variants
    assert all(sorted(order) == sorted(variants) for order in orders)


def cell(load: float, variant: str, goodput: float, mean_r: float, sent: int = 100, **extra) -> Cell:
    within = extra.pop("within", sent)
    return Cell(
        load=load,
        variant=variant,
        offered_rps=10.0,
        sent=sent,
        answered=within,
        within_target=within,
        shed_429=extra.pop("shed", 0),
        timed_out_504=0,
        other_errors=0,
        goodput_rps=goodput,
        shed_share=extra.pop("shed_share", 0.0),
        p50_ms=10.0,
        p99_ms=20.0,
        mean_r=mean_r,
        good_answers=extra.pop("good", within),
        good_rps=extra.pop("good_rps", goodput),
        below_floor=extra.pop("below", 0),
    )


def test_verdict_checks_the_issue_goals():
    cells = [
        cell(0.5, "0", 50.0, 0.0),
        cell(0.5, "16", 50.0, 16.0),
        cell(0.5, AUTO, 50.0, 1.0),
        cell(1.5, "0", 60.0, 0.0, within=66, shed=33, shed_share=0.33),
        cell(1.5, "16", 90.0, 16.0),
        cell(1.5, AUTO, 91.0, 9.5, within=100),
        cell(3.0, "0", 60.0, 0.0),
        cell(3.0, "16", 110.0, 16.0),
        cell(3.0, AUTO, 100.0, 20.0),
    ]
    result = verdict(cells)
    assert result["0.5x"]["auto_mean_r_at_most_2"] is True
    assert result["0.5x"]["smallest_fixed_r_reaching_auto"] == 0
    assert result["0.5x"]["auto_r_no_larger"] is False, "auto merged where r=0 gave the same goodput"
    assert result["1.5x"]["auto_at_least_best"] is True
    assert result["1.5x"]["auto_r_no_larger"] is True, "no fixed r reached auto's goodput"
    assert result["1.5x"]["auto_meets_99_within_1_shed"] is True
    assert result["3x"]["auto_at_least_best"] is False
    assert result["3x"]["auto_over_best"] == pytest.approx(100 / 110, abs=1e-3)
    assert result["3x"]["auto_r_no_larger"] is False, "r=16 reached more goodput at less merging"


def test_with_a_floor_the_verdict_compares_good_answers_and_counts_those_below_it():
    cells = [
        cell(1.5, "0", 60.0, 0.0),
        cell(1.5, "8", 90.0, 8.0),
        cell(1.5, AUTO, 95.0, 10.0, good_rps=80.0, below=3),
    ]
    checks = verdict(cells)["1.5x"]
    assert checks["auto_good_rps"] == 80.0 and checks["best_fixed_good_rps"] == 90.0
    assert checks["auto_at_least_best"] is False and checks["auto_below_floor"] == 3


def test_plot_and_arguments(tmp_path):
    cells = [
        cell(load, variant, 10.0 * load, r) for load in (0.5, 1.0) for variant, r in (("0", 0), (AUTO, 4))
    ]
    path = tmp_path / "auto.png"
    plot(cells, 250.0, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    args = parse_args(["--target-ms", "300", "--auto-max-r", "16"])
    assert args.loads == [0.5, 1.0, 1.5, 2.0, 3.0]
    assert args.variants == ["0", "16", AUTO]
    assert server_env(args) == {"TOME_LATENCY_TARGET_MS": "300", "TOME_AUTO_MAX_R": "16"}
    floor = parse_args(
        ["--min-fidelity", "0.8", "--calibration-dir", "photos", "--fidelity-min-samples", "10"]
    )
    assert floor.variants == ["0", FLOOR, AUTO]
    assert server_env(floor) == {
        "TOME_LATENCY_TARGET_MS": "1000",
        "TOME_MIN_FIDELITY": "0.8",
        "TOME_CALIBRATION_DIR": "photos",
        "TOME_FIDELITY_MIN_SAMPLES": "10",
    }
    with pytest.raises(SystemExit):
        parse_args(["--variants", "0", FLOOR])  # a floor variant without a floor


def test_open_loop_reads_the_r_of_every_answer_from_a_real_server(tiny_server):
    import asyncio

    from tome_bench.serve import open_loop, test_image

    _, payload = test_image(None, 64)
    outcomes = asyncio.run(open_loop(tiny_server, payload, 4, rate=40.0, warmup=0.0, seconds=0.5, headers={}))
    assert outcomes and all(o.status == 200 for o in outcomes)
    assert {o.r for o in outcomes} == {4}
