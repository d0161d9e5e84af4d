"""In-flight reservation: the pure rules (core.reservation) and the pool's use of them (memory store)."""
from __future__ import annotations

import pytest

from addon.core import reservation as rsv
from addon.core.reservation import KeyLoad, admits, header_spend_floor, spend_is_after

POINT, BUDGET = 9.95, 10.0


@pytest.mark.parametrize("spend, load, expected, why", [
    (5.00, KeyLoad(), True, "plenty left, nothing in flight"),
    (9.94, KeyLoad(), True, "below the point with nothing in flight: the last cents are used"),
    (9.95, KeyLoad(), False, "at the point"),
    (9.70, KeyLoad(0.20, 1), True, "spend + reservation still below the point"),
    (9.80, KeyLoad(0.20, 1), False, "spend + reservation reach the point: the key is full for now"),
    (9.50, KeyLoad(0.30, 2, recent=0.20), False, "a peer's fresh spend counts until our copy shows it"),
    (9.80, KeyLoad(0.10, 1), False, "less than one request's maximum left: one request at a time"),
    (9.76, KeyLoad(0.05, 1), False, "one in flight holds up to 0.25 upstream: a second would be refused as busy"),
    (9.74, KeyLoad(0.05, 1), True, "one in flight and room for its whole upstream reservation"),
    (9.40, KeyLoad(0.30, 2), True, "two in flight, room for their maximum reservations"),
    (9.30, KeyLoad(0.30, 3), False, "three maximum reservations would fill the budget"),
])
def test_admits(spend: float, load: KeyLoad, expected: bool, why: str) -> None:
    assert admits(spend, BUDGET, POINT, load) is expected, why


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_admits_ignores_junk_numbers(bad: float) -> None:
    assert admits(5.0, BUDGET, POINT, KeyLoad(bad, 0, bad)) is True


@pytest.mark.parametrize("headers, streamed, version, expected", [
    ({}, True, "1.110.2", False),                                    # streams: spend before, every version
    ({}, False, "1.110.2", True),                                    # 1.110 JSON: spend after
    ({}, False, "1.80.0", False),
    ({}, False, "1.105.7", False),
    ({}, False, "v1.111.0", True),
    ({"x-litellm-response-cost-input": "0.1"}, False, None, True),   # no version header: per-part costs = 1.110
    ({"x-litellm-response-cost": "0.1"}, False, None, None),         # nothing tells: unknown
    ({}, False, "garbage", None),
])
def test_spend_is_after(headers: dict, streamed: bool, version: str | None, expected: bool | None) -> None:
    assert spend_is_after(headers, streamed, version) is expected


@pytest.mark.parametrize("header, cost, after, expected", [
    (5.0, 0.1, False, 5.1),     # before: header + this response
    (5.1, 0.1, True, 5.1),      # after: the header already holds it (no double count)
    (5.0, 0.1, None, 5.0),      # unknown: the header alone is a floor on both versions
    (None, 0.1, False, None),
    (float("nan"), 0.1, False, None),
    (-1.0, 0.1, True, None),
])
def test_header_spend_floor(header, cost, after, expected) -> None:
    got = header_spend_floor(header, cost, after)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_estimator_uses_client_then_model_then_default() -> None:
    est = rsv.CostEstimator(default=0.25, history=3)
    assert est.estimate("a", "m") == 0.25
    est.observe("a", "m", 0.05)
    est.observe("a", "m", 0.12)
    assert est.estimate("a", "m") == 0.12
    assert est.estimate("b", "m") == 0.12           # a new client of a known model: the model's figure
    assert est.estimate("b", "other") == 0.25
    for c in (0.01, 0.02, 0.03):                    # only the last few costs count
        est.observe("a", "m", c)
    assert est.estimate("a", "m") == 0.03
    est.observe("a", "m", float("nan"))
    assert est.estimate("a", "m") == 0.03


def test_estimator_memory_is_bounded() -> None:
    est = rsv.CostEstimator(max_clients=10)
    for i in range(100):
        est.observe(f"c{i}", "m", 0.1)
    assert len(est._by_client) == 10


def test_book_reserve_move_release_never_leaks() -> None:
    book = rsv.ReservationBook(ttl_s=60)
    book.reserve("f1", "k1", 0.2, now=0)
    book.reserve("f2", "k1", 0.1, now=0)
    assert book.load("k1") == KeyLoad(pytest.approx(0.3), 2)
    book.reserve("f1", "k2", 0.2, now=1)            # a retry moves the flow's reservation
    assert book.load("k1") == KeyLoad(pytest.approx(0.1), 1) and book.load("k2").in_flight == 1
    assert book.release("f2") == "k1" and book.release("f2") is None   # idempotent
    assert book.load("k1") == KeyLoad()
    assert book.sweep(now=100) == 1 and len(book) == 0                 # a flow whose end was never seen


def test_book_recent_spend_lasts_until_written_and_read() -> None:
    book = rsv.ReservationBook()
    book.settled("k1", 0.2, now=0, window_s=3)
    unwritten = {"k1": 0.2}
    assert book.loads(now=10, window_s=3, unwritten=unwritten.get)["k1"].recent == pytest.approx(0.2)
    unwritten["k1"] = 0.0                                        # the write-behind wrote it at t=11
    assert book.loads(now=11, window_s=3, unwritten=unwritten.get)["k1"].recent == pytest.approx(0.2)
    assert "k1" in book.loads(now=13.5, window_s=3, unwritten=unwritten.get)
    assert "k1" not in book.loads(now=14.5, window_s=3, unwritten=unwritten.get)


# -- the pool: Pool.acquire is where the rule applies ---------------------------------------------------
@pytest.fixture
def pool(tmp_path):
    from addon.pool.pool import Pool
    from addon.store.mongo import new_key_doc, utcnow
    from tests.memory_store import MemoryStore, make_writer

    store = MemoryStore()
    p = Pool(store, make_writer(store, tmp_path / "journal.jsonl"), threshold=lambda: 9.95,
             default_budget=lambda: 10.0)
    for key_id, spend in (("k1", 9.70), ("k2", 1.0)):
        assert store.insert_key({**new_key_doc(key_id, f"sk-{key_id}-0123456789abcdef", 10.0, utcnow()),
                                 "spendEstimate": spend})
    p.sync()
    return p


def test_full_key_spills_to_another_without_rebinding(pool) -> None:
    pool.bind("client", "k1")
    first = pool.acquire("client")
    assert first.key.id == "k1"
    pool.reserve("flow-1", "k1", "client", None)     # default estimate 0.25: 9.70 + 0.25 reaches 9.95
    second = pool.acquire("client")
    assert second.key.id == "k2" and not second.full
    assert pool.bindings["client"] == "k1"           # the conversation keeps its key (prompt cache)
    pool.release("flow-1")
    assert pool.acquire("client").key.id == "k1"     # settled: the key serves again, not retired
    assert pool.get("k1").status == "healthy"


def test_every_key_full_says_so(pool) -> None:
    pool.reserve("a", "k1", "c", None)
    for i in range(40):
        pool.reserve(f"b{i}", "k2", "c", None)
    got = pool.acquire("c")
    assert got.key is not None and got.full


def test_metered_header_on_1110_json_is_not_counted_twice(pool) -> None:
    before = pool.get("k2").spend_estimate
    pool.record_usage("k2", 0.1, 10, before + 0.1, spend_is_after=True)
    assert pool.get("k2").spend_estimate == pytest.approx(before + 0.1)
    pool.record_usage("k2", 0.1, 10, before + 0.1, spend_is_after=False)   # stream / 1.80: header is before
    assert pool.get("k2").spend_estimate == pytest.approx(before + 0.2)


def test_upstream_budget_header_updates_the_key(pool) -> None:
    pool.record_usage("k2", 0.1, 10, None, max_budget=25.0)
    assert pool.get("k2").budget_limit == 25.0
    pool.record_usage("k2", 0.1, 10, None, max_budget=float("inf"))
    assert pool.get("k2").budget_limit == 25.0
