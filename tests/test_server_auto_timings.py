"""The measured timing table behind r=auto: warm-up order and budget, prediction of cells it did not
measure, dominated r, robust updates from real batches, thread safety, and what it exports."""

from __future__ import annotations

import json
import threading

import pytest
from autofakes import MAX_BATCH, R_MAX, FakeClock, TimedRunner, cpu_like, warmed_table, with_slow_r20

from tome_serve.auto.timings import (
    TimingTable,
    batch_grid,
    budget_shares,
    coarse_to_fine,
    r_grid,
    tables_from_json,
    tables_to_json,
    warm_up_order,
)


def test_grids_always_hold_their_ends():
    assert r_grid(24) == (0, 4, 8, 12, 16, 20, 24)
    assert r_grid(10, step=4) == (0, 4, 8, 10)
    assert r_grid(0) == (0,)
    assert batch_grid(8) == (1, 2, 4, 8)
    assert batch_grid(6) == (1, 2, 4, 6)
    assert batch_grid(1) == (1,)
    with pytest.raises(ValueError):
        batch_grid(0)


def test_coarse_to_fine_starts_with_the_ends_and_halves_the_widest_gap():
    values = r_grid(24)
    order = coarse_to_fine(values)
    assert sorted(order) == list(values)
    assert order[:3] == [0, 24, 12]
    assert set(order[3:5]) == {4, 16} or set(order[3:5]) == {8, 16} or set(order[3:5]) == {4, 20}


def test_warm_up_order_measures_both_batch_ends_of_every_r_before_any_middle_size():
    order = warm_up_order(r_grid(24), batch_grid(8))
    assert order[:4] == [(0, 8), (0, 1), (24, 8), (24, 1)]
    ends = [i for i, (_, size) in enumerate(order) if size in (1, 8)]
    middles = [i for i, (_, size) in enumerate(order) if size in (2, 4)]
    assert max(ends) < min(middles)
    assert len(order) == len(set(order)) == 7 * 4


def test_a_full_warm_up_reproduces_the_measured_times_and_predicts_sizes_in_between():
    table = warmed_table()
    snapshot = table.snapshot()
    for r in table.rs:
        for size in range(1, MAX_BATCH + 1):  # the fake is linear in the batch size: exact
            assert snapshot.seconds(r, size) == pytest.approx(cpu_like(r, size))


def test_warm_up_stays_within_its_budget_and_measures_the_most_useful_cells_first():
    clock = FakeClock()
    runner = TimedRunner(clock)
    table = TimingTable("fake", R_MAX, MAX_BATCH)
    start = clock()
    measured = table.warm_up(runner, budget_s=1.0, repeats=3, clock=clock)
    assert clock() - start <= 1.0
    assert 4 <= measured < 7 * 4
    cells = list(dict.fromkeys(runner.calls))
    assert cells[:4] == [(0, 8), (0, 1), (24, 8), (24, 1)]
    # Unmeasured cells are predicted from measured neighbours (linear in r here, so close).
    snapshot = table.snapshot()
    for r in table.rs:
        assert snapshot.seconds(r, 8) == pytest.approx(cpu_like(r, 8), rel=0.15)


def test_a_warm_up_without_budget_leaves_an_empty_table_that_still_answers():
    table = TimingTable("fake", R_MAX, MAX_BATCH)
    assert table.warm_up(TimedRunner(FakeClock()), budget_s=0.0, clock=FakeClock(0.0)) == 1
    # The first cell always runs (nothing to predict its cost from); everything else from it.
    snapshot = table.snapshot()
    assert snapshot.seconds(16, 8) == pytest.approx(cpu_like(0, 8))
    assert snapshot.usable(8) == (0,)


def test_an_r_that_is_not_faster_than_a_smaller_r_is_dominated_there():
    snapshot = warmed_table().snapshot()
    assert snapshot.usable(1) == (0,), "at batch 1 merging costs more than it saves"
    assert snapshot.usable(8) == r_grid(24)
    assert snapshot.fastest_up_to(16, 1) == 0
    slow = warmed_table(with_slow_r20).snapshot()
    assert 20 not in slow.usable(8)
    assert slow.fastest_up_to(20, 8) == 16
    assert slow.fastest_up_to(24, 8) == 24


def test_one_outlier_barely_moves_an_estimate_but_a_lasting_change_is_followed():
    table = warmed_table()
    before = table.snapshot().seconds(16, 8)
    table.observe(16, 8, 10 * before)
    assert table.snapshot().seconds(16, 8) < 1.05 * before
    for _ in range(80):  # the machine got twice as slow
        table.observe(16, 8, 2 * before)
    assert table.snapshot().seconds(16, 8) == pytest.approx(2 * before, rel=0.1)


def test_real_batches_fill_cells_the_warm_up_missed_and_off_grid_batches_are_ignored():
    table = TimingTable("fake", R_MAX, MAX_BATCH)
    table.observe(0, 8, 0.08)
    table.observe(0, 1, 0.02)
    table.observe(7, 8, 1.0)  # a fixed-r client's r, not on the grid
    table.observe(0, 9, 1.0)  # larger than any batch the server forms
    table.observe(0, 2, -1.0)
    snapshot = table.snapshot()
    assert snapshot.seconds(0, 8) == pytest.approx(0.08)
    assert snapshot.seconds(0, 4) == pytest.approx(0.02 + 3 * 0.06 / 7)
    assert snapshot.seconds(24, 8) == pytest.approx(0.08), "unmeasured r: the nearest measured one"


def test_concurrent_observers_and_readers():
    table = warmed_table()
    errors: list[BaseException] = []

    def observe() -> None:
        for i in range(500):
            table.observe(table.rs[i % len(table.rs)], 1 + i % MAX_BATCH, 0.01)

    def read() -> None:
        try:
            for _ in range(500):
                snapshot = table.snapshot()
                assert snapshot.usable(8)[0] == 0
                snapshot.seconds(24, 3)
        except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=f) for f in (observe, observe, read, read)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    samples = sum(row.samples for row in table.snapshot().rows())
    at_grid_sizes = sum(1 + i % MAX_BATCH in batch_grid(MAX_BATCH) for i in range(500))
    assert samples == 7 * 4 + 2 * at_grid_sizes, "no observation lost"


def test_describe_puts_measured_images_per_second_beside_the_library_gmacs():
    import timm

    import tome

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, num_classes=10)
    tome.patch(model)
    gmacs = {cost.r: cost.gmacs for cost in tome.cost_table(model, range(9))}
    table = warmed_table(r_max=8)
    described = table.describe(gmacs)
    assert [entry["r"] for entry in described] == [0, 4, 8]
    assert described[0]["gmacs"] == pytest.approx(tome.gmacs(model, r=0))
    assert described[0]["images_per_s"][8] == pytest.approx(8 / cpu_like(0, 8), rel=1e-3)
    # r=4 is slower than r=0 at batch 1 and only 2% faster at batch 2 (the table wants 3%).
    assert described[1]["dominated_at"] == [1, 2]
    assert described[2]["dominated_at"] == [1]


def test_metric_rows_label_every_cell():
    rows = list(warmed_table().metric_rows())
    assert len(rows) == 7 * 4
    labels, images_per_s, dominated = rows[0]
    assert labels == {"model": "fake", "r": "0", "batch_size": "1"}
    assert images_per_s == pytest.approx(1 / cpu_like(0, 1))
    assert dominated is False
    # Batch 1: every r > 0 is slower. Batch 2: r=4, 12 and 20 are each under 3% faster than the r
    # below them that is usable.
    at_batch_2 = {("4", "2"), ("12", "2"), ("20", "2")}
    assert {(labels["r"], labels["batch_size"]) for labels, _, dominated in rows if dominated} == {
        (str(r), "1") for r in r_grid(24)[1:]
    } | at_batch_2


def test_a_burst_of_load_during_warm_up_spoils_single_samples_not_cells():
    """Another process takes the CPU for a moment: the samples taken then are 5x too slow. Passes
    over the grid put at most one sample of each cell into the burst, and the median drops it."""
    clock = FakeClock()
    burst = (clock(), clock() + 1.5)

    def seconds(r: int, batch_size: int) -> float:
        slow = 5.0 if burst[0] <= clock() < burst[1] else 1.0
        return slow * cpu_like(r, batch_size)

    table = TimingTable("fake", R_MAX, MAX_BATCH)
    table.warm_up(TimedRunner(clock, seconds), budget_s=1e9, repeats=3, clock=clock)
    snapshot = table.snapshot()
    for r in table.rs:
        for size in batch_grid(MAX_BATCH):
            assert snapshot.seconds(r, size) == pytest.approx(cpu_like(r, size)), (r, size)


def test_estimate_interpolates_off_grid_r_for_fixed_r_batches():
    snapshot = warmed_table().snapshot()
    assert snapshot.estimate(16, 8) == snapshot.seconds(16, 8)
    assert snapshot.estimate(6, 8) == pytest.approx(cpu_like(6, 8))  # the fake is linear in r
    with pytest.raises(ValueError):
        snapshot.estimate(25, 8)


def test_a_saved_table_restores_its_predictions_and_its_robustness():
    """What the state folder keeps: the same predictions after a JSON round trip, and a cell that real
    batches had settled still moves little for one outlier."""
    table = warmed_table(with_slow_r20)
    for _ in range(20):
        table.observe(8, 8, cpu_like(8, 8))
    restored = TimingTable.from_json(json.loads(json.dumps(table.to_json())))
    assert (restored.model, restored.rs, restored.max_batch) == ("fake", table.rs, MAX_BATCH)
    assert restored.merge == table.merge == "tome"  # a lane refuses a table of another merge rule
    assert restored.snapshot().rows() == table.snapshot().rows()
    for copy in (table, restored):
        copy.observe(8, 8, 10 * cpu_like(8, 8))
    assert restored.snapshot().seconds(8, 8) == table.snapshot().seconds(8, 8) < 1.1 * cpu_like(8, 8)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda saved: saved.pop("cells"), "not a timing table"),
        (lambda saved: saved["cells"].clear(), "no measured cell"),
        (lambda saved: saved["cells"][0].update(r=3), "off the grid"),
        (lambda saved: saved["cells"][0].update(batch_size=MAX_BATCH + 1), "off the grid"),
        (lambda saved: saved["cells"][0].update(seconds=-0.5), "seconds > 0"),
        (lambda saved: saved["cells"][0].update(seconds=float("nan")), "seconds > 0"),
        (lambda saved: saved["cells"][0].update(samples=0), "samples >= 1"),
        (lambda saved: saved["cells"][0].update(deviation=None), "not a timing table"),
    ],
    ids=["no cells", "empty", "r off grid", "batch off grid", "negative", "nan", "no samples", "null"],
)
def test_a_damaged_saved_table_is_refused_saying_what_is_wrong(damage, message):
    saved = warmed_table().to_json()
    damage(saved)
    with pytest.raises(ValueError, match=message):
        TimingTable.from_json(saved)


@pytest.mark.parametrize(("first_uses", "second_gets"), [(3.0, 7.0), (5.0, 5.0), (12.0, 0.0)])
def test_one_budget_is_shared_in_turn_and_what_a_rule_leaves_goes_to_the_next(first_uses, second_gets):
    spent = [0.0]
    shares = budget_shares(10.0, 2, lambda: spent[0])
    assert next(shares) == 5.0  # the default rule's: half of it
    spent[0] = first_uses
    assert next(shares) == second_gets
    assert next(shares, None) is None


def test_a_lane_s_tables_are_saved_per_rule_and_refused_on_another_lane_s_grid():
    tables = [warmed_table(), warmed_table(merge="mlerp")]
    saved = json.loads(json.dumps(tables_to_json(tables)))
    restored = tables_from_json(saved, tables)
    assert [t.merge for t in restored] == ["tome", "mlerp"]
    assert restored[1].snapshot().seconds(8, 4) == tables[1].snapshot().seconds(8, 4)
    with pytest.raises(ValueError, match=r"expected a timing table per merge rule \(tome, mlerp\)"):
        tables_from_json(saved["tome"], tables)  # one table: the layout before tables per rule
    other_grid = [warmed_table(r_max=16), warmed_table(r_max=16, merge="mlerp")]
    with pytest.raises(ValueError, match="not this lane's"):
        tables_from_json(saved, other_grid)
