"""`Pool.acquire`'s fast path for its common case (the bound key kept) against the general choice.

Every pooled request asks the pool for its key. In the common case — the client's bound key healthy, below
its rotation point, admitting the request, no peer at work — the pool answers without the general choice;
whatever the key's figures, that answer must be the one the general path gives, and every other case must
be left to the general path.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addon.core.reservation import KeyLoad
from addon.pool.pool import KeyState, Pool
from tests.memory_store import MemoryStore, make_writer

T0 = 1_760_000_000.0


def make_pool(keys: list[KeyState], threshold: float = 9.95) -> Pool:
    store = MemoryStore()
    writer = make_writer(store, Path(tempfile.mkdtemp()) / "journal.jsonl")  # never started: nothing is written
    pool = Pool(store, writer, threshold=lambda: threshold, default_budget=lambda: 10.0, clock=lambda: T0)
    pool.keys = {k.id: k for k in keys}
    pool.bindings = {"conv": keys[0].id, **{f"other-{k.id}": k.id for k in keys[1:]}}
    return pool


def general(pool: Pool, exclude: tuple[str, ...] = ()) -> tuple[str | None, bool, str | None, str | None]:
    got = pool._choose_and_bind("conv", exclude, None, False)
    assert got is not None
    return (got.key.id if got.key else None), got.full, got.warning, got.rotated_from


def test_the_common_case_takes_the_fast_path_and_the_general_answer():
    pool = make_pool([KeyState("a", "sk-a", spend_estimate=3.0), KeyState("b", "sk-b", spend_estimate=1.0)])
    pool.reservations.reserve("f1", "a", 0.2, T0)
    fast = pool._bound_admits("conv", ())
    assert fast is not None and fast.key is pool.keys["a"] and not fast.full and fast.warning is None
    assert "conv" in pool._active
    assert general(pool) == ("a", False, None, None)
    assert pool.acquire("conv", blocking=False) == fast


@pytest.mark.parametrize("change", [
    pytest.param(lambda p: setattr(p.keys["a"], "status", "rate_limited"), id="rate-limited"),
    pytest.param(lambda p: setattr(p.keys["a"], "status", "exhausted"), id="retired"),
    pytest.param(lambda p: setattr(p.keys["a"], "spend_estimate", 9.95), id="at-its-point"),
    pytest.param(lambda p: setattr(p.keys["a"], "total_spend", 9.96), id="polled-past-its-point"),
    pytest.param(lambda p: setattr(p.keys["a"], "peer_unsynced", 7.0), id="peers-spend-takes-it-past"),
    pytest.param(lambda p: (setattr(p.keys["a"], "seen_spend", 9.99), setattr(p.keys["a"], "seen_spend_at", T0)),
                 id="a-fresh-header-past-its-point"),
    pytest.param(lambda p: p.reservations.reserve("f9", "a", 7.0, T0), id="full-of-reservations"),
    pytest.param(lambda p: setattr(p, "peer_loads", {"a": KeyLoad(0.1, 1)}), id="peers-at-work"),
    pytest.param(lambda p: setattr(p.keys["a"], "spend_estimate", float("nan")), id="nan-spend"),
    pytest.param(lambda p: setattr(p.keys["a"], "budget_limit", float("nan")), id="nan-budget"),
    pytest.param(lambda p: setattr(p.keys["a"], "spend_estimate", 3), id="an-int-spend"),
    pytest.param(lambda p: p.bindings.pop("conv"), id="unbound"),
    pytest.param(lambda p: p.bindings.update(conv="gone"), id="bound-to-a-deleted-key"),
])
def test_anything_unusual_goes_the_general_way(change):
    pool = make_pool([KeyState("a", "sk-a", spend_estimate=3.0), KeyState("b", "sk-b", spend_estimate=1.0)])
    change(pool)
    assert pool._bound_admits("conv", ()) is None
    assert "conv" not in pool._active


def test_an_excluded_bound_key_goes_the_general_way():
    pool = make_pool([KeyState("a", "sk-a", spend_estimate=3.0), KeyState("b", "sk-b", spend_estimate=1.0)])
    assert pool._bound_admits("conv", ("a",)) is None
    assert general(pool, ("a",))[0] == "b"


money = st.one_of(st.floats(min_value=0, max_value=12), st.sampled_from([0.0, 9.95, 9.949999, 9.95 - 1e-6, 10.0]),
                  st.just(float("nan")), st.just(float("inf")), st.integers(0, 11))


@settings(max_examples=400, deadline=None)
@given(status=st.sampled_from(["healthy", "rate_limited", "exhausted"]), spend=money, total=money,
       unsynced=st.one_of(st.just(0.0), st.floats(0, 3)), budget=st.one_of(st.just(10.0), st.floats(0.5, 20), money),
       seen=st.floats(0, 12), seen_age=st.floats(0, 20),
       reserved=st.lists(st.floats(0, 3), max_size=4), threshold=st.sampled_from([9.95, 9.5, 10.0]),
       peers=st.booleans(), exclude=st.booleans())
def test_the_fast_answer_is_always_the_general_one(status, spend, total, unsynced, budget, seen, seen_age, reserved,
                                                   threshold, peers, exclude):
    key = KeyState("a", "sk-a", status=status, spend_estimate=spend, total_spend=total, budget_limit=budget,
                   peer_unsynced=unsynced, seen_spend=seen, seen_spend_at=T0 - seen_age)
    pool = make_pool([key, KeyState("b", "sk-b", spend_estimate=2.0)], threshold)
    for i, amount in enumerate(reserved):
        pool.reservations.reserve(f"f{i}", "a", amount, T0)
    if peers:
        pool.peer_loads = {"b": KeyLoad(0.1, 1)}
    fast = pool._bound_admits("conv", ("a",) if exclude else ())
    if fast is None:
        return  # the general path decides
    assert general(pool, ("a",) if exclude else ()) == (fast.key.id if fast.key else None, fast.full, fast.warning,
                                                        fast.rotated_from)
    assert pool.bindings["conv"] == "a"
