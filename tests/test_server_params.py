"""Request parameters and the r range: what is accepted, and 422 messages that say what is allowed."""

from __future__ import annotations

import math

import pytest

from tome_serve.params import (
    AUTO,
    AutoParams,
    ParamError,
    RLimits,
    auto_params,
    fidelity_floor,
    parse_r_choice,
    top_k,
)

LIMITS = RLimits(useful=24, ceiling=24, auto_ceiling=16, default=AUTO)
DEFAULTS = dict(default_target_ms=1000.0, timeout_ms=10_000.0)


@pytest.mark.parametrize(
    ("value", "expected"), [(None, AUTO), ("auto", AUTO), (" Auto ", AUTO), ("0", 0), ("24", 24), (7, 7)]
)
def test_r_is_auto_or_an_integer_in_range(value, expected):
    assert LIMITS.r(value) == expected


def test_a_fixed_default_r_stays_configurable():
    assert RLimits(24, 24, 24, default=16).r(None) == 16


@pytest.mark.parametrize("value", ["25", "-1", "1.5", "fast", "", 25, True])
def test_bad_r_says_what_is_allowed(value):
    with pytest.raises(ParamError, match=r"r must be 'auto' or an integer from 0 to 24 for this model"):
        LIMITS.r(value)


def test_settings_parse_auto_or_integer_with_the_same_rule():
    assert parse_r_choice(" AUTO ", "TOME_DEFAULT_R") == AUTO and parse_r_choice("12", "TOME_DEFAULT_R") == 12
    with pytest.raises(
        ParamError, match="TOME_DEFAULT_R must be 'auto' or a non-negative integer, got 'fast'"
    ):
        parse_r_choice("fast", "TOME_DEFAULT_R")


def test_the_limits_of_a_model_cap_settings_it_cannot_use_and_say_so():
    limits = RLimits.for_model("m", 24, max_r=30, auto_max_r=40, default=28)
    assert (limits.useful, limits.ceiling, limits.auto_ceiling, limits.default) == (24, 24, 24, 24)
    assert len(limits.notes) == 2 and "TOME_MAX_R is 30" in limits.notes[0]
    assert "TOME_DEFAULT_R is 28" in limits.notes[1]
    limits = RLimits.for_model("m", 24, max_r=12, auto_max_r=8, default=AUTO)
    assert (limits.ceiling, limits.auto_ceiling, limits.default, limits.notes) == (12, 8, AUTO, ())


def test_auto_takes_the_server_target_and_auto_ceiling_by_default():
    assert auto_params(AUTO, None, None, LIMITS, **DEFAULTS) == AutoParams(1.0, 16)
    assert auto_params(AUTO, 250.0, 8, LIMITS, **DEFAULTS) == AutoParams(0.25, 8)
    assert auto_params(AUTO, "250", "8", LIMITS, **DEFAULTS) == AutoParams(0.25, 8)  # query text


def test_a_request_auto_ceiling_above_the_server_one_is_capped_not_refused():
    assert auto_params(AUTO, None, 24, LIMITS, **DEFAULTS).max_r == 16


@pytest.mark.parametrize("target", [0.0, -5.0, 10_001.0, math.nan, math.inf, "soon"])
def test_bad_target_says_what_is_allowed(target):
    message = r"target_ms must be a number above 0 and at most the request timeout \(10000 ms"
    with pytest.raises(ParamError, match=message):
        auto_params(AUTO, target, None, LIMITS, **DEFAULTS)


@pytest.mark.parametrize("ceiling", [-1, 25, "x", "auto"])
def test_a_request_auto_ceiling_outside_the_model_range_is_refused(ceiling):
    with pytest.raises(ParamError, match="max_r must be an integer from 0 to 24 for this model"):
        auto_params(AUTO, None, ceiling, LIMITS, **DEFAULTS)


def test_fixed_r_takes_no_target_or_auto_ceiling():
    assert auto_params(8, None, None, LIMITS, **DEFAULTS) is None
    with pytest.raises(ParamError, match="apply to r=auto only"):
        auto_params(8, 500.0, None, LIMITS, **DEFAULTS)
    with pytest.raises(ParamError, match="apply to r=auto only"):
        auto_params(8, None, 4, LIMITS, **DEFAULTS)


def test_a_fidelity_floor_is_a_number_from_0_to_1_and_the_server_floor_wins():
    assert auto_params(AUTO, None, None, LIMITS, **DEFAULTS).floor is None
    assert auto_params(AUTO, None, None, LIMITS, **DEFAULTS, min_fidelity="0.9").floor == 0.9
    assert auto_params(AUTO, None, None, LIMITS, **DEFAULTS, default_floor=0.95).floor == 0.95
    assert fidelity_floor("0.9", 0.95) == 0.95 and fidelity_floor(" 0.99 ", 0.95) == 0.99
    for bad in ("1.01", "-0.5", "nan", "high", ""):
        with pytest.raises(ParamError, match="min_fidelity must be a number from 0 to 1"):
            fidelity_floor(bad, None)
    with pytest.raises(ParamError, match="apply to r=auto only"):
        auto_params(8, None, None, LIMITS, **DEFAULTS, min_fidelity="0.9")


def test_top_k_defaults_to_five_within_the_classes_and_says_what_is_allowed():
    assert (top_k(None, 1000), top_k(None, 3), top_k("7", 1000)) == (5, 3, 7)
    for bad in (0, 1001, "x", "2.5"):
        with pytest.raises(ParamError, match="top_k must be an integer from 1 to 1000 for this model"):
            top_k(bad, 1000)


def test_the_served_merge_rules_are_the_librarys() -> None:
    import tome  # imported late here as in the server: settings are checked before the library loads
    from tome_serve.params import MERGE_RULES, merge_rule

    assert tuple(tome.MERGE_RULES) == MERGE_RULES
    assert merge_rule(None, "tome") == "tome" and merge_rule("mlerp", "tome") == "mlerp"
    with pytest.raises(ParamError, match="merge must be one of tome, mlerp, got 'avg'"):
        merge_rule("avg", "tome")
