"""r=auto's request parameters: what is accepted, and 422 messages that say what is allowed."""

from __future__ import annotations

import math

import pytest

from tome_serve.auto_params import AUTO, AutoParams, ParamError, auto_params, parse_r

LIMITS = dict(default_target_ms=1000.0, timeout_ms=10_000.0, r_max=24, auto_max_r=16)


@pytest.mark.parametrize(
    ("value", "expected"), [(None, AUTO), ("auto", AUTO), (" Auto ", AUTO), ("0", 0), ("24", 24)]
)
def test_r_is_auto_or_an_integer_in_range(value, expected):
    assert parse_r(value, AUTO, r_max=24) == expected


def test_a_fixed_default_r_stays_configurable():
    assert parse_r(None, 16, r_max=24) == 16


@pytest.mark.parametrize("value", ["25", "-1", "1.5", "fast", ""])
def test_bad_r_says_what_is_allowed(value):
    with pytest.raises(ParamError, match=r"r must be 'auto' or an integer from 0 to 24 for this model"):
        parse_r(value, AUTO, r_max=24)


def test_auto_takes_the_server_target_and_cap_by_default():
    assert auto_params(AUTO, None, None, **LIMITS) == AutoParams(1.0, 16)
    assert auto_params(AUTO, 250.0, 8, **LIMITS) == AutoParams(0.25, 8)


def test_a_floor_above_the_server_cap_is_capped_not_refused():
    assert auto_params(AUTO, None, 24, **LIMITS).max_r == 16


@pytest.mark.parametrize("target", [0.0, -5.0, 10_001.0, math.nan, math.inf])
def test_bad_target_says_what_is_allowed(target):
    message = r"target_ms must be a number above 0 and at most the request timeout \(10000 ms"
    with pytest.raises(ParamError, match=message):
        auto_params(AUTO, target, None, **LIMITS)


@pytest.mark.parametrize("floor", [-1, 25])
def test_a_floor_outside_the_model_range_is_refused(floor):
    with pytest.raises(ParamError, match="max_r must be an integer from 0 to 24 for this model"):
        auto_params(AUTO, None, floor, **LIMITS)


def test_fixed_r_takes_no_target_or_floor():
    assert auto_params(8, None, None, **LIMITS) is None
    with pytest.raises(ParamError, match="apply to r=auto only"):
        auto_params(8, 500.0, None, **LIMITS)
    with pytest.raises(ParamError, match="apply to r=auto only"):
        auto_params(8, None, 4, **LIMITS)
