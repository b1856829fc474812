"""The background re-check of a timing table loaded from the state folder: which cells, only while the
lane is idle, within a budget of batch seconds, and stopping at shutdown."""

from __future__ import annotations

import threading
import time

import pytest
from autofakes import MAX_BATCH, cpu_like, warmed_table

from tome_serve.auto.recheck import recheck
from tome_serve.auto.timings import batch_grid, warm_up_order


class Machine:
    """Batch timer of a machine now ``slower`` times slower than the one that saved the table."""

    def __init__(self, slower: float = 2.0, sleep_s: float = 0.0) -> None:
        self.slower, self.sleep_s = slower, sleep_s
        self.calls: list[tuple[int, int]] = []

    def __call__(self, r: int, batch_size: int) -> float:
        self.calls.append((r, batch_size))
        time.sleep(self.sleep_s)
        return self.slower * cpu_like(r, batch_size)


def test_every_cell_is_measured_again_most_used_first_and_replaces_the_saved_one():
    table = warmed_table()
    machine = Machine(slower=2.0)
    done = recheck(table, machine, idle=lambda: True, stop=threading.Event(), budget_s=60)
    grid = warm_up_order(table.rs, batch_grid(MAX_BATCH))
    assert machine.calls == [cell for cell in grid for _ in range(2)]  # untimed at a new shape, timed
    assert done.cells == len(grid) and not done.stopped
    assert done.ratios == pytest.approx([2.0] * len(grid))
    assert "now / saved = 2.00 (median; 2.00 to 2.00)" in done.describe()
    assert table.snapshot().seconds(16, 4) == pytest.approx(2 * cpu_like(16, 4))


def test_nothing_runs_while_the_lane_is_busy():
    table = warmed_table()
    machine = Machine()
    idle, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=recheck, args=(table, machine, idle.is_set, stop, 60))
    thread.start()
    time.sleep(0.5)
    assert machine.calls == []
    idle.set()
    thread.join(10)
    assert not thread.is_alive() and machine.calls


def test_shutting_down_ends_the_recheck_and_keeps_the_saved_table():
    table = warmed_table()
    before = table.snapshot().rows()
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    done = recheck(table, Machine(), idle=lambda: False, stop=stop, budget_s=60)
    assert done.stopped and done.cells == 0
    assert table.snapshot().rows() == before


def test_the_budget_counts_the_batches_not_the_wait_for_idle_moments():
    """Idle only after 0.5 s, with a budget of 0.3 s of batches of 10 ms: waiting does not use it up,
    and the batches stop within it."""
    table = warmed_table(lambda r, size: 0.01)
    cells = len(warm_up_order(table.rs, batch_grid(MAX_BATCH)))
    became_idle = time.monotonic() + 0.5

    def idle() -> bool:
        return time.monotonic() >= became_idle

    done = recheck(table, Machine(slower=1.0, sleep_s=0.01), idle, threading.Event(), budget_s=0.3)
    assert 1 <= done.cells <= 0.3 / 0.02
    everything = recheck(table, Machine(slower=1.0), lambda: True, threading.Event(), budget_s=0.3)
    assert everything.cells == cells
