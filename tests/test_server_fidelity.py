"""The fidelity table on its own: its lower bounds hold at their stated confidence, a floor is met only
with enough samples, the floor's auto ceiling stops at the first r that misses it, it survives
concurrent writers, and its JSON round-trips."""

from __future__ import annotations

import json
import random
import threading

import pytest
import torch

from tome_runtime.fidelity import (
    Comparison,
    FidelityTable,
    Outputs,
    bounded_mean_lower,
    load_profile,
    wilson_lower,
)

GRID = (0, 4, 8, 12, 16)


def agreeing(n: int, agree: int, cosine: float = 0.99) -> Comparison:
    return Comparison([True] * agree + [False] * (n - agree), [1.0] * n, [cosine] * n)


def test_wilson_bound_matches_the_issue_s_example_and_is_honest_at_small_counts():
    assert wilson_lower(3972, 4000) == pytest.approx(0.99047, abs=1e-5)  # 99.3% of 4,000 images
    assert wilson_lower(4, 4) == pytest.approx(4 / (4 + 1.6449**2), abs=1e-4)  # all agree: still loose
    assert wilson_lower(0, 10) == 0.0


def test_wilson_bound_is_the_lower_end_of_scipy_s_two_sided_90_percent_interval():
    stats = pytest.importorskip("scipy.stats", reason="scipy (an independent Wilson interval) not installed")
    for agree, n in ((3972, 4000), (4, 4), (17, 40), (0, 7)):
        expected = stats.binomtest(agree, n).proportion_ci(confidence_level=0.90, method="wilson").low
        assert wilson_lower(agree, n) == pytest.approx(expected, abs=1e-12)


def test_wilson_bound_is_wrong_at_most_five_percent_of_the_time():
    rng = random.Random(0)
    for p, n in ((0.95, 40), (0.99, 300)):
        misses = sum(wilson_lower(sum(rng.random() < p for _ in range(n)), n) > p for _ in range(2000))
        assert misses / 2000 <= 0.065, (p, n, misses)


def test_cosine_bound_holds_at_95_percent_and_tightens_with_samples():
    generator = torch.Generator().manual_seed(0)
    true_mean = 1 - 0.02  # cosines 1 - Exponential(0.02), clipped to [-1, 1]
    misses = 0
    for _ in range(1000):
        values = (1 - torch.empty(200).exponential_(1 / 0.02, generator=generator)).clamp(-1, 1)
        lower = bounded_mean_lower(float(values.mean()), float(values.var()), len(values))
        misses += lower > true_mean
    assert misses / 1000 <= 0.05
    # Hoeffding alone would give 0.98 - 2 * sqrt(ln(40) / 8000) = 0.936 at 4,000 samples; the variance helps.
    assert bounded_mean_lower(0.98, 0.02**2, 4000) > 0.97
    assert bounded_mean_lower(0.99, 0.0, 4) < 0  # four images bound nothing useful


def test_comparison_counts_top1_top5_and_cosine_per_image():
    reference = Outputs(torch.tensor([[5.0, 4, 3, 2, 1, 0], [0.0, 1, 2, 3, 4, 5]]), torch.eye(2, 3))
    merged = Outputs(
        torch.tensor([[5.0, 3, 4, 2, 1, 0], [5.0, 1, 2, 3, 4, 0]]), torch.tensor([[1.0, 0, 0], [1, 1, 0]])
    )
    comparison = Comparison.of(reference, merged)
    assert comparison.agree == [True, False]
    assert comparison.top5_overlap == pytest.approx([1.0, 0.8])  # reordered top 5; class 0 replaced class 5
    assert comparison.cosine == pytest.approx([1.0, 2**-0.5])
    backbone = Comparison.of(Outputs(None, torch.eye(2, 3)), Outputs(None, torch.eye(2, 3)))
    assert backbone.agree is None and backbone.cosine == pytest.approx([1.0, 1.0])


def test_a_floor_needs_enough_samples_and_r0_always_meets_it():
    table = FidelityTable("m", GRID)
    table.add(4, agreeing(100, 100), "calibration")
    table.add(8, agreeing(5, 5), "calibration")  # perfect, but only 5 samples
    assert table.meets(0, "agreement", 1.0, 30)
    assert table.meets(4, "agreement", 0.95, 30) and not table.meets(4, "agreement", 0.99, 30)
    assert not table.meets(8, "agreement", 0.0, 30)
    assert table.meets(8, "agreement", 0.0, 5)
    assert not table.meets(12, "agreement", 0.0, 1)  # never measured


def test_the_floor_s_ceiling_stops_at_the_first_grid_r_that_misses_it():
    table = FidelityTable("m", GRID)
    table.add(4, agreeing(200, 199), "calibration")
    table.add(8, agreeing(10, 10), "calibration")  # too few samples: does not meet
    table.add(12, agreeing(200, 200), "calibration")  # meets, but lies beyond r=8
    assert table.ceiling("agreement", 0.95, 30) == 4
    assert table.ceiling("cosine", 0.5, 30) == 4  # cosine 0.99 everywhere, but the same gap at r=8
    table.add(8, agreeing(200, 199), "shadow")
    assert table.ceiling("agreement", 0.95, 30) == 12
    assert table.ceiling("agreement", 0.999, 30) == 0


def test_rows_list_every_grid_r_measured_or_not_and_the_r0_reference():
    table = FidelityTable("m", GRID, kinds=("cosine",))
    table.add(6, Comparison(None, None, [0.9, 0.95]), "shadow")  # a fixed r off the grid
    rows = {(row.r, row.kind): row for row in table.rows()}
    assert sorted(rows) == [(r, "cosine") for r in (0, 4, 6, 8, 12, 16)]
    assert (rows[0, "cosine"].mean, rows[0, "cosine"].lower) == (1.0, 1.0)
    assert rows[4, "cosine"].samples == 0 and rows[4, "cosine"].mean is None
    assert rows[6, "cosine"].samples == 2 and rows[6, "cosine"].mean == pytest.approx(0.925)
    assert table.sources == {"shadow": 2}


def test_concurrent_writers_lose_no_sample():
    table = FidelityTable("m", GRID)

    def write() -> None:
        for _ in range(200):
            table.add(4, agreeing(3, 2), "shadow")

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    row = table.estimate(4, "agreement")
    assert row.samples == 2400 and row.mean == pytest.approx(2 / 3)


def test_json_round_trip_keeps_every_row_and_merging_counts_samples():
    table = FidelityTable("m", GRID)
    table.add(4, Comparison([True, True, False], [1.0, 0.8, 0.6], [0.99, 0.97, 0.9]), "profile")
    text = json.dumps(table.to_json({"weights": "w.safetensors"}))
    back = FidelityTable.from_json(json.loads(text), "m", GRID)
    assert back.rows() == table.rows() and back.about == {"weights": "w.safetensors"}
    assert FidelityTable.from_json(json.loads(text), "another", GRID) is None
    back.merge(table, "profile")
    row = back.estimate(4, "cosine")
    assert row.samples == 6 and row.mean == pytest.approx((0.99 + 0.97 + 0.9) / 3)
    assert row.lower == pytest.approx(
        bounded_mean_lower(row.mean, torch.tensor([0.99, 0.97, 0.9] * 2).var().item(), 6)
    )


@pytest.mark.parametrize(
    ("document", "words"),
    [
        ("[]", "not a fidelity profile"),
        ('{"format": "tome-fidelity/1", "models": {"m": {"rows": {"x": {}}}}}', "non-negative integer"),
        (
            '{"format": "tome-fidelity/1", "models": {"m": {"rows": {"4": {"agreement": '
            '{"samples": 3, "mean": 2}}}}}}',
            r"mean in \[0, 1\]",
        ),
        ('{"format": "tome-fidelity/1", "models": {"m": {"rows": {"4": {"top1": {}}}}}}', "unknown kind"),
        ("{", "Expecting"),
    ],
)
def test_a_bad_profile_is_one_clear_line(tmp_path, document, words):
    path = tmp_path / "profile.json"
    path.write_text(document)
    with pytest.raises(ValueError, match=words) as error:
        load_profile(path, "m", GRID)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
