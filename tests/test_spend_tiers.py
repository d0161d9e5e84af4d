"""Tiered spend-check intervals (DESIGN §3, §8)."""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from addon.core.spend_tiers import DEFAULT_TIERS, Tier, interval_for, is_due, next_check_at, parse_tiers, tier_name

T0 = 1_700_000_000.0


def test_default_tiers_match_the_documented_defaults():
    assert DEFAULT_TIERS == (Tier(0.0, 300.0), Tier(5.0, 120.0), Tier(7.0, 10.0))


@pytest.mark.parametrize(
    ("spend", "interval", "name"),
    [
        (0.0, 300.0, "<$5"),
        (-1.0, 300.0, "<$5"),  # a refund or a corrupt record still gets polled
        (4.99, 300.0, "<$5"),
        (4.999999, 300.0, "<$5"),
        (5.0, 120.0, "$5-$7"),
        (5.01, 120.0, "$5-$7"),
        (6.99, 120.0, "$5-$7"),
        (7.0, 10.0, ">=$7"),
        (9.95, 10.0, ">=$7"),
        (120.0, 10.0, ">=$7"),
        (float("inf"), 10.0, ">=$7"),
        (float("nan"), 10.0, ">=$7"),  # unknown spend: poll as if close to the budget
    ],
)
def test_default_tier_boundaries(spend, interval, name):
    assert interval_for(spend, DEFAULT_TIERS) == interval
    assert tier_name(spend, DEFAULT_TIERS) == name


CUSTOM = (Tier(0.0, 600.0), Tier(2.5, 60.0), Tier(8.0, 30.0), Tier(9.5, 5.0))


@pytest.mark.parametrize(
    ("spend", "interval", "name"),
    [(2.49, 600.0, "<$2.5"), (2.5, 60.0, "$2.5-$8"), (8.0, 30.0, "$8-$9.5"), (9.5, 5.0, ">=$9.5")],
)
def test_custom_tiers(spend, interval, name):
    assert interval_for(spend, CUSTOM) == interval
    assert tier_name(spend, CUSTOM) == name


def test_single_tier_polls_at_one_rate():
    tiers = (Tier(0.0, 42.0),)
    assert interval_for(0.0, tiers) == interval_for(1e6, tiers) == 42.0
    assert tier_name(3.0, tiers) == ">=$0"


@pytest.mark.parametrize(
    ("last", "spend", "expected"),
    [(None, 1.0, None), (None, 8.0, None), (T0, 1.0, T0 + 300), (T0, 6.0, T0 + 120), (T0, 8.0, T0 + 10),
     (float("nan"), 1.0, None)],
)
def test_next_check_at(last, spend, expected):
    assert next_check_at(last, spend, DEFAULT_TIERS) == expected


@pytest.mark.parametrize(("spend", "interval"), [(0.0, 300.0), (4.99, 300.0), (5.0, 120.0), (6.99, 120.0), (7.0, 10.0)])
@pytest.mark.parametrize(
    ("offset", "due"),
    [(-1.0, False), (-0.001, False), (0.0, True), (0.001, True), (1.0, True)],
    ids=["1s-before", "1ms-before", "exactly", "1ms-after", "1s-after"],
)
def test_is_due_around_each_interval(spend, interval, offset, due):
    assert is_due(T0, spend, T0 + interval + offset, DEFAULT_TIERS) is due


@pytest.mark.parametrize("last", [None, float("nan"), float("inf")])
def test_never_checked_key_is_due_at_once(last):
    assert is_due(last, 0.0, T0, DEFAULT_TIERS)


def test_crossing_into_a_faster_tier_makes_a_key_due_sooner():
    """Spend rose from $4 to $7.50 since the last poll: the next poll is 10 s after the last, not 300 s."""
    assert not is_due(T0, 4.0, T0 + 60, DEFAULT_TIERS)
    assert is_due(T0, 7.5, T0 + 60, DEFAULT_TIERS)


TOML_EXAMPLE = """
spend_check_tiers = [
  {min_spend = 0, interval_seconds = 300},
  {min_spend = 5, interval_seconds = 120},
  {min_spend = 7, interval_seconds = 10},
]
"""


def test_parse_tiers_from_toml():
    assert parse_tiers(tomllib.loads(TOML_EXAMPLE)["spend_check_tiers"]) == DEFAULT_TIERS


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([{"min_spend": 0, "interval_seconds": 60}], (Tier(0.0, 60.0),)),
        (({"min_spend": 0.0, "interval_seconds": 0.5}, {"min_spend": 9.5, "interval_seconds": 1}),
         (Tier(0.0, 0.5), Tier(9.5, 1.0))),
        ([{"interval_seconds": 300, "min_spend": 0}, {"interval_seconds": 5, "min_spend": 8}],
         (Tier(0.0, 300.0), Tier(8.0, 5.0))),
    ],
)
def test_parse_tiers_accepts(value, expected):
    tiers = parse_tiers(value)
    assert tiers == expected
    assert all(isinstance(t.min_spend, float) and isinstance(t.interval_s, float) for t in tiers)


def row(min_spend: object = 0, interval: object = 300) -> dict:
    return {"min_spend": min_spend, "interval_seconds": interval}


@pytest.mark.parametrize(
    ("value", "named"),
    [
        pytest.param("0:300", "'0:300'", id="string"),
        pytest.param({"min_spend": 0, "interval_seconds": 300}, "'min_spend'", id="single-table"),
        pytest.param(None, "None", id="none"),
        pytest.param(300, "300", id="number"),
        pytest.param([], "empty", id="empty"),
        pytest.param([row(1)], "min_spend = 0, got 1", id="first-not-zero"),
        pytest.param([row(-1)], "got -1", id="first-negative"),
        pytest.param([row(0), row(5), row(5)], "got 5", id="repeated-min"),
        pytest.param([row(0), row(7), row(5)], "got 5", id="decreasing-min"),
        pytest.param([row(0, 0)], "got 0", id="zero-interval"),
        pytest.param([row(0, -10)], "got -10", id="negative-interval"),
        pytest.param([row(0, float("nan"))], "nan", id="nan-interval"),
        pytest.param([row(0, float("inf"))], "inf", id="inf-interval"),
        pytest.param([row(0), row(float("nan"))], "nan", id="nan-min"),
        pytest.param([row("0")], "'0'", id="string-min"),
        pytest.param([row(0, "300")], "'300'", id="string-interval"),
        pytest.param([row(0, True)], "True", id="bool-interval"),
        pytest.param([row(False)], "False", id="bool-min"),
        pytest.param([row(0), 120], "120", id="row-not-table"),
        pytest.param([{"min_spend": 0}], "interval_seconds", id="missing-interval"),
        pytest.param([{"min_spend": 0, "interval_secs": 300}], "interval_secs", id="misspelt-key"),
        pytest.param([row(0, None)], "None", id="null-interval"),
    ],
)
def test_parse_tiers_rejects_and_names_the_value(value, named):
    with pytest.raises(ValueError) as excinfo:
        parse_tiers(value)
    assert named in str(excinfo.value)


@given(
    steps=st.lists(st.tuples(st.floats(min_value=0.01, max_value=100), st.floats(min_value=0.1, max_value=3600)),
                   min_size=1, max_size=6),
    spend=st.floats(min_value=0, max_value=1000),
)
def test_interval_is_that_of_the_highest_tier_reached(steps, spend):
    rows, lo = [], 0.0
    for _i, (gap, interval) in enumerate(steps):
        rows.append({"min_spend": lo, "interval_seconds": interval})
        lo += gap
    tiers = parse_tiers(rows)
    reached = [t for t in tiers if spend >= t.min_spend]
    assert interval_for(spend, tiers) == reached[-1].interval_s
