"""The write-behind writer (`StoreWriter`) on the in-memory store: no processes, outages on demand.

What an operator relies on: hooks never wait for the database, every metered cost lands exactly once
(after an outage, after a restart with a journal, after a replayed journal), and one bad update never
stops the rest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from addon.store.mongo import new_key_doc, utcnow
from addon.store.writer import StoreWriter, apply_op, usage_op
from tests.harness import eventually
from tests.memory_store import MemoryStore, make_writer


@pytest.fixture
def store() -> MemoryStore:
    s = MemoryStore()
    for key_id in ("a", "b"):
        assert s.insert_key(new_key_doc(key_id, f"sk-{key_id}-0123456789abcdef", 10.0, utcnow()))
    return s


@pytest.fixture
def journal(tmp_path) -> Path:
    return tmp_path / "journal-openhands_pool.jsonl"


@pytest.fixture
def writer(store, journal) -> Iterator[StoreWriter]:
    w = make_writer(store, journal)
    w.start()
    yield w
    store.down = False
    store.gate.set()
    w.stop(flush_timeout=5)


def usage(key_id: str, cost: float, n: int) -> dict:
    return usage_op(key_id, cost, 10, 1_760_000_000.0 + n, None, f"{key_id}-op-{n}")


def test_ops_land_in_order_and_pending_spend_is_counted_until_then(store, writer):
    store.gate.clear()  # the database is slow: nothing lands yet
    for n in range(5):
        writer.submit(usage("a", 0.1, n))
    writer.submit({"kind": "set", "key_id": "a", "set": {"status": "exhausted"}})
    assert writer.pending_cost("a") == pytest.approx(0.5)  # what a sync adds to a stale read
    store.gate.set()
    assert writer.flush(10)
    doc = store.get_key("a")
    assert doc["spendEstimate"] == pytest.approx(0.5) and doc["requestsCount"] == 5 and doc["status"] == "exhausted"
    assert writer.pending_cost("a") == 0.0 and writer.backlog == 0


def test_submit_never_waits_for_a_hanging_database(store, writer):
    store.gate.clear()
    for n in range(1000):  # returns at once: the hooks call this on the event loop
        writer.submit(usage("b", 0.001, n))
    assert writer.backlog >= 999
    store.gate.set()
    assert writer.flush(30)
    assert store.get_key("b")["requestsCount"] == 1000


def test_an_outage_queues_updates_and_they_land_once_when_the_database_returns(store, writer):
    store.down = True
    writer.submit(usage("a", 0.25, 1))
    eventually(lambda: writer.outage_since is not None)
    writer.submit(usage("a", 0.25, 2))
    writer.submit({"kind": "bind", "client_id": "c1", "key_id": "a"})
    assert writer.backlog == 3
    store.down = False
    assert writer.flush(30)
    eventually(lambda: writer.outage_since is None)
    assert store.get_key("a")["spendEstimate"] == pytest.approx(0.5) and store.get_binding("c1") == "a"


def test_stopping_during_an_outage_journals_and_the_next_start_replays_once(store, journal):
    first = make_writer(store, journal)
    first.start()
    store.down = True
    for n in range(3):
        first.submit(usage("a", 1.0, n))
    first.submit({"kind": "history", "row": {"keyId": "a", "spend": 3.0, "checkedAt": 1_760_000_000.0}})
    eventually(lambda: first.outage_since is not None)
    first.stop(flush_timeout=0.2)
    store.down = False
    assert store.get_key("a")["spendEstimate"] == 0.0  # nothing landed before the stop
    second = make_writer(store, journal)
    try:
        assert second.replay_journal() == 4
        assert second.replay_journal() == 0  # nothing left to replay
    finally:
        second.stop(flush_timeout=5)
    doc = store.get_key("a")
    assert doc["spendEstimate"] == pytest.approx(3.0) and doc["requestsCount"] == 3
    assert len(store.list_history(10, "a")) == 1


def test_replaying_ops_that_already_landed_counts_nothing_twice(store, journal):
    ops = [usage("a", 0.5, n) for n in range(4)]
    w = make_writer(store, journal)
    w.start()
    for op in ops:
        w.submit(dict(op))
    assert w.flush(10)
    w.stop()
    for op in ops:  # a crash between writing and acknowledging: the same ops come back
        apply_op(store, op)
    assert store.get_key("a")["spendEstimate"] == pytest.approx(2.0) and store.get_key("a")["requestsCount"] == 4


def test_one_bad_update_does_not_stop_the_others(store, writer, caplog):
    writer.submit({"kind": "no-such-kind", "key_id": "a"})
    writer.submit({"kind": "set", "key_id": "a"})  # malformed: no "set"
    writer.submit(usage("a", 0.75, 1))
    assert writer.flush(10)
    assert store.get_key("a")["spendEstimate"] == pytest.approx(0.75)
    assert writer._thread is not None and writer._thread.is_alive()


def test_a_full_queue_sheds_bookkeeping_and_keeps_the_money(store, journal):
    w = make_writer(store, journal, max_queue=5)  # not started: the queue only fills
    try:
        for n in range(3):
            w.submit({"kind": "bind", "client_id": f"c{n}", "key_id": "a"})
        for n in range(4):
            w.submit(usage("a", 0.5, n))
        assert w.backlog == 5 and w.dropped == 2
        assert w.pending_cost("a") == pytest.approx(2.0)  # every metered cost is still owed to the database
        w.start()
        assert w.flush(10)
        assert store.get_key("a")["spendEstimate"] == pytest.approx(2.0)
    finally:
        w.stop(flush_timeout=5)


@pytest.mark.parametrize("cost, tokens, at, floor", [
    (0.0017, 120, 1_760_000_000.123456, None),         # the usual answer
    (0.25, 0, 1_760_000_000.0, 12.345678901234567),    # with a header floor
    (3, 7, 1_760_000_000.5, 2.0),                      # an int cost
    (float("nan"), 7, 1_760_000_000.5, None),          # junk figures: the general encoder (NaN, not null)
    (0.1, 7, 1_760_000_000.5, float("inf")),
    (0.1, 2 ** 70, 1_760_000_000.5, None),             # a count past 64 bits
])
def test_a_metered_answers_journal_line_replays_as_exactly_its_figures(store, journal, cost, tokens, at, floor):
    """What `submit_usage` journals is what a replay (this version's or an older one's: `json.loads` per
    line) reads back, whatever the figures: the fast encoder only writes those it writes exactly."""
    import json
    import math

    from addon.store.journal import orphans

    w = make_writer(store, journal)  # not started: the op stays queued, journaled only
    op = w.submit_usage("a", cost, tokens, at, floor, "writer-op-1")
    assert w.pending_cost("a") == cost or math.isnan(cost)
    assert w.journal.close() == 1
    (orphan,) = list(orphans(w.journal_root))
    ((_, got),) = orphan.pending_ops()
    orphan.release()
    want = json.loads(json.dumps({k: v for k, v in op.items() if k != "_seq"}))
    if math.isnan(cost):
        assert math.isnan(got.pop("cost")) and math.isnan(want.pop("cost"))
    assert got == want
