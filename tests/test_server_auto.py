"""AutoR, the per-model r=auto its lane calls: admission counts sheds, batch decisions see the work
already handed to the inference threads (fixed-r batches included), finished batches teach the
timing table, answers feed the metrics."""

from __future__ import annotations

import pytest
from autofakes import MAX_BATCH, R_MAX, FakeClock, cpu_like, warmed_table
from prometheus_client import CollectorRegistry

from tome_serve.auto import AutoR
from tome_serve.auto.controller import Overloaded, Waiting
from tome_serve.auto.metrics import AutoMetrics
from tome_serve.auto.timings import TimingTable


def auto_r(clock: FakeClock) -> tuple[AutoR, CollectorRegistry]:
    registry = CollectorRegistry()
    table = warmed_table()
    metrics = AutoMetrics(registry, lambda: [table])
    tables = [table, warmed_table(merge="mlerp")]
    return AutoR(tables, auto_max_r=R_MAX, metrics=metrics, clock=clock), registry


def test_fixed_r_work_in_flight_raises_the_auto_batch_r():
    clock = FakeClock()
    auto, _ = auto_r(clock)
    queued = [Waiting(clock(), 0.25, R_MAX) for _ in range(20)]
    idle = auto.choose(queued).r
    clock.advance(2.0)  # past the hold, so the next choice is its own
    queued = [Waiting(clock(), 0.25, R_MAX) for _ in range(20)]
    ticket = auto.handed(r=7, batch_size=MAX_BATCH)  # a fixed-r batch, r off the grid
    ticket.started()
    assert auto.choose(queued).r > idle
    ticket.finished(cpu_like(7, 8))
    assert auto.backlog.ahead_s() == 0.0


def test_finished_batches_teach_the_cost_table_and_failed_ones_do_not():
    clock = FakeClock()
    auto, _ = auto_r(clock)
    before = auto.table.snapshot().seconds(16, 8)
    for _ in range(50):
        auto.handed(16, 8).finished(2 * before)
    assert auto.table.snapshot().seconds(16, 8) > 1.5 * before
    ticket = auto.handed(0, 8)
    ticket.finished(None)
    ticket.finished(3 * before)  # a ticket acts once: the failed batch taught nothing
    assert auto.table.snapshot().seconds(0, 8) == pytest.approx(cpu_like(0, 8))


def test_a_batch_teaches_the_table_of_its_own_merge_rule():
    clock = FakeClock()
    auto, _ = auto_r(clock)
    tome, mlerp = (auto.tables[rule].snapshot().seconds(16, 8) for rule in ("tome", "mlerp"))
    for _ in range(50):
        auto.handed(16, 8, "mlerp").finished(2 * mlerp)
    assert auto.tables["mlerp"].snapshot().seconds(16, 8) > 1.5 * mlerp
    assert auto.table.snapshot().seconds(16, 8) == tome  # the default rule's table learnt nothing
    assert auto.tables["tome"] is auto.table


def test_sheds_answers_and_timeouts_are_counted():
    clock = FakeClock()
    auto, registry = auto_r(clock)
    queued = [Waiting(clock(), 0.25, R_MAX) for _ in range(64)]
    with pytest.raises(Overloaded):
        auto.admit(queued, Waiting(clock(), 0.25, R_MAX))
    auto.answered(8, 0.1, 0.25)
    auto.timed_out()

    def count(outcome: str) -> float:
        return registry.get_sample_value("tome_auto_requests_total", {"model": "fake", "outcome": outcome})

    assert (count("shed"), count("met"), count("missed")) == (1, 1, 1)


def test_an_empty_cost_table_is_refused_up_front():
    with pytest.raises(ValueError, match="warm the timing table up first"):
        AutoR([warmed_table(), TimingTable("fake", R_MAX, MAX_BATCH, merge="mlerp")], auto_max_r=R_MAX)
