"""tome-eval's speed column: paired per-round ratios, their spread beside each ratio, and a warning
when the machine's noise moved them too much to trust."""

from __future__ import annotations

import re

import pytest
from tiny import eval_model

from tome_eval import report, sweep
from tome_eval.runner import Timing


@pytest.fixture(scope="module")
def model():
    return eval_model()


def test_a_slow_round_slows_both_and_cancels_out(model) -> None:
    """Rounds 2 and 4 ran at half speed (another job on the machine): the per-round ratios do not move."""
    timing = Timing({0: [1.0, 2.0, 1.0, 2.0, 1.0], 4: [0.5, 1.0, 0.5, 1.0, 0.5]})
    rows = sweep.rows_for(model, [0, 4], timing, batch_size=4, folder=None)
    assert [(row.speedup, row.speedup_low, row.speedup_high) for row in rows] == [(1, 1, 1), (2, 2, 2)]
    assert rows[1].images_per_second == 4 / 0.5  # from the median time of r=4
    assert sweep.speed_warnings(rows) == []
    assert re.search(r"\b2\.00x +2\.00-2\.00 ", report.sweep_table(rows))


def test_ratios_that_vary_between_rounds_are_shown_and_flagged(model) -> None:
    timing = Timing({0: [1.0] * 5, 4: [1 / 1.0, 1 / 1.5, 1 / 2.0, 1 / 2.5, 1 / 3.0]})
    rows = sweep.rows_for(model, [0, 4], timing, batch_size=4, folder=None)
    assert (rows[1].speedup_low, rows[1].speedup, rows[1].speedup_high) == pytest.approx((1.5, 2.0, 2.5))
    table = report.sweep_table(rows)
    assert "speedup IQR" in table.splitlines()[0] and re.search(r"\b2\.00x +1\.50-2\.50 ", table)
    (warning,) = sweep.speed_warnings(rows)
    assert "r=4 1.50-2.50x" in warning and "--timing-rounds" in warning
    assert rows[1].flat()["speedup_low"] == pytest.approx(1.5)  # in the CSV and JSON too


def test_without_timing_the_columns_say_so(model) -> None:
    rows = sweep.rows_for(model, [0, 4], None, batch_size=4, folder=None)
    assert rows[1].speedup is None and sweep.speed_warnings(rows) == []
    assert report.sweep_table(rows).splitlines()[-1].count("n/a") >= 3
