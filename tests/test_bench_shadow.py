"""tome_bench.shadow's bookkeeping: the alternating order, the per-round ratio and its verdict, the
shadow counts read from /metrics, and its arguments. The benchmark itself runs by hand (minutes)."""

from __future__ import annotations

import pytest

from tome_bench.shadow import OFF, SHADOW, Round, alternating, parse_args, shadow_counts, verdict


def a_round(index: int, variant: str, ips: float, run: float = 0.0, dropped: float = 0.0) -> Round:
    return Round(index, variant, ips, 100.0, 300.0, int(ips * 20), 0, run, dropped, 1.9)


def test_the_servers_take_turns_starting_a_round():
    assert [alternating([SHADOW, OFF], i)[0] for i in range(4)] == [SHADOW, OFF, SHADOW, OFF]


def test_the_verdict_is_the_median_of_per_round_ratios():
    rounds = [
        a_round(0, SHADOW, 9.8, run=2, dropped=40),
        a_round(0, OFF, 10.0),
        a_round(1, OFF, 10.0),
        a_round(1, SHADOW, 9.0, run=1, dropped=45),
        a_round(2, SHADOW, 10.1, dropped=38),
        a_round(2, OFF, 10.0),
    ]
    result = verdict(rounds)
    assert result["ratios"] == pytest.approx([0.98, 0.9, 1.01])
    assert result["median_ratio"] == pytest.approx(0.98) and result["within_goal"] is True
    assert (result["shadow_run"], result["shadow_dropped"], result["off_server_counted"]) == (3, 123, 0)
    assert verdict(rounds[2:4])["within_goal"] is False  # 10 % slower in its only round


def test_shadow_counts_are_read_from_the_metrics(tiny_server):
    assert shadow_counts(tiny_server, {}) == {"run": 0.0, "dropped": 0.0}  # TOME_SHADOW_RATE unset


def test_arguments_refuse_a_load_that_is_never_shadowed():
    assert parse_args([]).concurrency == 24 and parse_args([]).r == 8
    for wrong in (["--r", "0"], ["--rate", "0"], ["--rate", "1.5"]):
        with pytest.raises(SystemExit):
            parse_args(wrong)
