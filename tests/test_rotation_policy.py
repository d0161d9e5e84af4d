"""Rotation point and key choice (DESIGN §4, §7)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from addon.core.rotation_policy import (
    NOMINAL_BUDGET,
    KeyView,
    choose_key,
    effective_spend,
    has_reached_rotation_point,
    is_usable,
    plausible_spend,
    rotation_point,
    rotation_reason,
)

NOW = 1_700_000_000.0
T = 9.95  # default threshold


def noisy_sum(step: float, n: int) -> float:
    total = 0.0
    for _ in range(n):
        total += step
    return total


def key(id: str = "k1", status: str = "healthy", spend: float = 0.0, total: float = 0.0, budget: float = 10.0,
        cooldown: float | None = None, bindings: int = 0) -> KeyView:
    return KeyView(id=id, status=status, spend_estimate=spend, total_spend=total, budget_limit=budget,
                   cooldown_until=cooldown, bindings=bindings)


@pytest.mark.parametrize(
    ("budget", "threshold", "point"),
    [(10.0, 9.95, 9.95), (50.0, 9.95, 49.95), (10.0, 9.5, 9.5), (25.0, 9.5, 24.5), (100.0, 9.99, 99.99)],
)
def test_rotation_point_keeps_the_same_margin_for_every_budget(budget, threshold, point):
    assert rotation_point(budget, threshold) == pytest.approx(point)
    assert NOMINAL_BUDGET == 10.0


@pytest.mark.parametrize(
    ("spend", "total", "budget", "threshold", "rotates"),
    [
        pytest.param(9.95, 0.0, 10.0, T, True, id="10$-at-9.95"),
        pytest.param(9.94, 0.0, 10.0, T, False, id="10$-at-9.94"),
        pytest.param(9.949999999, 0.0, 10.0, T, True, id="float-noise-literal"),
        pytest.param(noisy_sum(0.01, 995), 0.0, 10.0, T, True, id="995-cents-summed"),
        pytest.param(9.9499995, 0.0, 10.0, T, True, id="within-a-micro-dollar"),
        pytest.param(9.9499, 0.0, 10.0, T, False, id="a-hundredth-of-a-cent-short"),
        pytest.param(10.51, 0.0, 10.0, T, True, id="over-budget"),
        pytest.param(0.0, 9.95, 10.0, T, True, id="polled-spend-alone"),
        pytest.param(9.0, 9.96, 10.0, T, True, id="polled-ahead-of-estimate"),
        pytest.param(9.96, 9.0, 10.0, T, True, id="estimate-ahead-of-polled"),
        pytest.param(None, None, 10.0, T, False, id="never-metered"),
        pytest.param(9.5, 0.0, 10.0, 9.5, True, id="threshold-9.5-at-9.5"),
        pytest.param(9.49, 0.0, 10.0, 9.5, False, id="threshold-9.5-at-9.49"),
        pytest.param(9.6, 0.0, 10.0, 9.5, True, id="threshold-9.5-at-9.6"),
        pytest.param(49.95, 0.0, 50.0, T, True, id="50$-at-49.95"),
        pytest.param(49.94, 0.0, 50.0, T, False, id="50$-at-49.94"),
        pytest.param(9.96, 0.0, 50.0, T, False, id="50$-key-not-rotated-at-10$-level"),
        pytest.param(float("nan"), 9.96, 10.0, T, True, id="nan-estimate-ignored"),
        pytest.param(float("nan"), 1.0, 10.0, T, False, id="nan-estimate-not-a-rotation"),
        pytest.param(float("inf"), 0.0, 10.0, T, True, id="infinite-spend"),
        pytest.param(9.95, 0.0, float("nan"), T, True, id="nan-budget-means-10$"),
    ],
)
def test_has_reached_rotation_point(spend, total, budget, threshold, rotates):
    assert has_reached_rotation_point(spend, total, budget, threshold) is rotates


@pytest.mark.parametrize(
    ("spend", "total", "expected"),
    [(1.5, 2.5, 2.5), (2.5, 1.5, 2.5), (None, 3.0, 3.0), (3.0, None, 3.0), (None, None, 0.0)],
)
def test_effective_spend_is_the_larger_reading(spend, total, expected):
    assert effective_spend(spend, total) == expected


@pytest.mark.parametrize(
    ("view", "usable"),
    [
        pytest.param(key(), True, id="healthy-fresh"),
        pytest.param(key(spend=9.94), True, id="healthy-just-below"),
        pytest.param(key(spend=9.95), False, id="healthy-at-point"),
        pytest.param(key(total=9.95), False, id="healthy-polled-at-point"),
        pytest.param(key(status="exhausted"), False, id="exhausted"),
        pytest.param(key(status="invalid"), False, id="invalid"),
        pytest.param(key(status="disabled"), False, id="unknown-status"),
        pytest.param(key(status="rate_limited", cooldown=NOW + 30), False, id="cooling"),
        pytest.param(key(status="rate_limited", cooldown=NOW), True, id="cooldown-ends-now"),
        pytest.param(key(status="rate_limited", cooldown=NOW - 1), True, id="cooldown-passed"),
        pytest.param(key(status="rate_limited", cooldown=None), True, id="rate-limited-no-cooldown"),
        pytest.param(key(status="rate_limited", cooldown=NOW - 1, spend=9.95), False, id="revived-but-spent"),
        pytest.param(key(cooldown=NOW + 30), True, id="healthy-ignores-stale-cooldown"),
        pytest.param(key(spend=20.0, budget=50.0), True, id="50$-key-at-20$"),
    ],
)
def test_is_usable(view, usable):
    assert is_usable(view, NOW, T) is usable


def test_threshold_moves_usability():
    view = key(spend=9.6)
    assert is_usable(view, NOW, T)
    assert not is_usable(view, NOW, 9.5)


@pytest.mark.parametrize(
    ("keys", "current", "exclude", "chosen"),
    [
        pytest.param([key("a", bindings=5), key("b", bindings=0)], "a", (), "a",
                     id="keeps-current-even-if-busier"),
        pytest.param([key("a", status="exhausted"), key("b")], "a", (), "b", id="leaves-exhausted-current"),
        pytest.param([key("a", spend=9.95), key("b")], "a", (), "b", id="leaves-current-at-rotation-point"),
        pytest.param([key("a"), key("b", bindings=1)], "a", ("a",), "b", id="excluded-current"),
        pytest.param([key("a", bindings=2), key("b", bindings=1)], "gone", (), "b", id="current-not-in-pool"),
        pytest.param([key("a", bindings=3), key("b", bindings=1), key("c", bindings=2)], None, (), "b",
                     id="fewest-bindings"),
        pytest.param([key("a", status="exhausted"), key("b", status="invalid"),
                      key("c", status="rate_limited", cooldown=NOW + 60), key("d", bindings=9)], None, (), "d",
                     id="skips-exhausted-invalid-cooling"),
        pytest.param([key("a", status="invalid"), key("b", status="rate_limited", cooldown=NOW - 1)], None, (), "b",
                     id="revives-cooled-down"),
        pytest.param([key("a", spend=1.0), key("b", spend=20.0, budget=50.0)], None, (), "b",
                     id="tie-most-remaining-budget"),
        pytest.param([key("a", spend=1.5), key("b", spend=0.5, total=2.0)], None, (), "a",
                     id="tie-remaining-uses-effective-spend"),
        pytest.param([key("a", bindings=1, spend=0.0), key("b", bindings=0, spend=9.0)], None, (), "b",
                     id="bindings-before-budget"),
        pytest.param([key("a", status="exhausted"), key("b", status="rate_limited", cooldown=NOW + 1)], "a", (),
                     None, id="nothing-usable"),
        pytest.param([], None, (), None, id="empty-pool"),
        pytest.param([key("a"), key("b")], "a", {"a", "b"}, None, id="all-excluded"),
    ],
)
def test_choose_key(keys, current, exclude, chosen):
    assert choose_key(keys, current, NOW, T, exclude) == chosen


def test_choose_key_breaks_full_ties_by_id_whatever_the_order():
    pool = [key("k2"), key("k10"), key("k1")]
    assert {choose_key(list(p), None, NOW, T) for p in itertools.permutations(pool)} == {"k1"}


@pytest.mark.parametrize(
    ("spend", "point", "reason"),
    [(9.96, 9.95, "proactive_threshold_9.96"), (9.95, 9.95, "proactive_threshold_9.95"),
     (noisy_sum(0.01, 995), 9.95, "proactive_threshold_9.95"), (49.951, 49.95, "proactive_threshold_49.95")],
)
def test_rotation_reason(spend, point, reason):
    assert rotation_reason(spend, point) == reason


statuses = st.sampled_from(["healthy", "rate_limited", "exhausted", "invalid"])
views = st.builds(
    KeyView,
    id=st.sampled_from(["a", "b", "c", "d", "e"]),
    status=statuses,
    spend_estimate=st.floats(min_value=0, max_value=60),
    total_spend=st.floats(min_value=0, max_value=60),
    budget_limit=st.sampled_from([10.0, 25.0, 50.0]),
    cooldown_until=st.none() | st.floats(min_value=NOW - 100, max_value=NOW + 100),
    bindings=st.integers(min_value=0, max_value=5),
)


@given(keys=st.lists(views, max_size=6), current=st.none() | st.sampled_from(["a", "b", "z"]),
       exclude=st.sets(st.sampled_from(["a", "b", "c"])), threshold=st.sampled_from([9.5, 9.95, 9.99]))
def test_choose_key_only_returns_usable_keys(keys, current, exclude, threshold):
    chosen = choose_key(keys, current, NOW, threshold, exclude)
    usable = [k for k in keys if k.id not in exclude and is_usable(k, NOW, threshold)]
    if not usable:
        assert chosen is None
    else:
        assert chosen in {k.id for k in usable}
        if current in {k.id for k in usable}:
            assert chosen == current


@pytest.mark.parametrize("spend, budget, plausible", [
    (0.0, 10.0, True),
    (10.4, 10.0, True),                 # past the budget by requests in flight
    (1010.0, 10.0, True),               # the bound itself
    (1010.5, 10.0, False),
    (1e12, 10.0, False),
    (5000.0, 10000.0, True),
    (-0.01, 10.0, False),
    (float("nan"), 10.0, False),
    (float("inf"), 10.0, False),
    (None, 10.0, False),
    (500.0, float("nan"), True),        # an unknown budget is the nominal $10
])
def test_an_upstream_spend_figure_is_used_only_when_it_can_be_true(spend, budget, plausible):
    assert plausible_spend(spend, budget) is plausible
