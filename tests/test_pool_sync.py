"""The pool's sync follows activity and a client's binding is read on first sight (issue 14 §3-4), and a
key in use at an unclean stop is not trusted near its rotation point before the upstream's own figure
(issue 14 §2). `Pool` on the in-memory store (same interface as PoolStore) with the real writer."""
from __future__ import annotations

import datetime as dt
from typing import Iterator

import pytest

from addon.lifecycle import RECOVERY_MIN_USD, RECOVERY_REQUESTS, recovery_margins, sync_once
from addon.pool import pool as pool_mod
from addon.pool.pool import KeyState
from addon.store.mongo import CHANGE_MARGIN_S, utcnow
from tests.memory_store import MemoryStore
from tests.test_pool import T0, Rig, add

QUIET_SYNC = ["server_time", "generation", "changes"]  # what an idle pass asks the database, nothing more


class Clock:
    """The store's (database's) clock, moved by hand: a delta re-reads CHANGE_MARGIN_S before its mark."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> dt.datetime:
        return self.now

    def pass_margin(self) -> None:
        self.now += dt.timedelta(seconds=CHANGE_MARGIN_S + 1)


@pytest.fixture
def db_clock() -> Clock:
    return Clock()


@pytest.fixture
def store(db_clock) -> MemoryStore:
    return MemoryStore(clock=db_clock)


@pytest.fixture
def rig(store, tmp_path) -> Iterator[Rig]:
    r = Rig(store, tmp_path / "journal.jsonl")
    yield r
    r.stop()


def calls_of(store: MemoryStore, action) -> list[str]:
    before = len(store.calls)
    action()
    return store.calls[before:]


# -- sync cost follows activity ------------------------------------------------------------------------
def test_an_idle_sync_pass_counts_nothing_and_heals_nothing(store, rig, db_clock):
    for i in range(30):
        add(store, f"k{i}")
    store.bind_many({f"idle-{i}": f"k{i % 30}" for i in range(300)})
    rig.pool.sync()
    sync_once(rig.pool, heal_all=True)
    rig.flush()
    db_clock.pass_margin()
    sync_once(rig.pool)  # the margin's re-read of the writes above
    assert calls_of(store, lambda: sync_once(rig.pool)) == QUIET_SYNC


@pytest.mark.parametrize("change,check", [
    (lambda s: s.delete_key("k1"), lambda p: p.get("k1") is None),
    (lambda s: add(s, "k9"), lambda p: p.get("k9") is not None),
    (lambda s: s.insert_backup("b1", "sk-b1-0123456789abcdef"), lambda p: p.backups_unused == 1),
], ids=["peer deleted a key", "peer added a key", "peer added a backup"])
def test_a_peers_structural_change_reaches_memory_at_the_next_pass(store, rig, db_clock, change, check):
    add(store, "k1")
    add(store, "k2")
    rig.pool.sync()
    sync_once(rig.pool)
    change(store)
    sync_once(rig.pool)
    assert check(rig.pool)
    db_clock.pass_margin()
    sync_once(rig.pool)
    assert calls_of(store, lambda: sync_once(rig.pool)) == QUIET_SYNC  # and the pass after is quiet again


def test_stray_bindings_are_healed_from_the_recent_binding_writes(store, rig):
    add(store, "k1")
    add(store, "k2")
    rig.pool.sync()
    store.transition_status("k1", ["healthy"], {"status": "exhausted"})
    store.record_successor("k1", "k2")
    store.bind("late", "k1")  # a bind that landed after a peer's rotation moved k1's clients
    sync_once(rig.pool)
    assert store.get_binding("late") == "k2"


# -- bindings: read on first sight, cached, bounded ---------------------------------------------------
def test_a_new_client_is_decided_off_the_loop_with_its_stored_binding_then_from_memory(store, rig):
    add(store, "k1")
    add(store, "k2")
    rig.pool.sync()
    store.bind("returning", "k2")  # bound by this sidecar's earlier run, or by a peer
    assert rig.pool.acquire("returning", blocking=False) is None  # first sight: not on the event loop
    assert calls_of(store, lambda: rig.pool.acquire("returning")).count("get_binding") == 1
    assert rig.pool.choose("returning").key.id == "k2"  # the prompt cache's key, not a fresh choice
    assert calls_of(store, lambda: rig.pool.acquire("returning", blocking=False)) == []  # cached


def test_a_new_client_without_a_binding_is_read_once(store, rig):
    add(store, "k1", status="exhausted")  # nothing usable: acquire binds nothing
    rig.pool.sync()
    assert rig.pool.acquire("stranger").key is None
    assert calls_of(store, lambda: rig.pool.acquire("stranger")).count("get_binding") == 0


def test_with_the_database_away_a_new_client_gets_a_fresh_key_without_waiting(store, rig):
    add(store, "k1")
    rig.pool.sync()
    rig.writer.outage_since = T0  # the writer saw the outage
    store.down = True
    try:
        assert rig.pool.acquire("newcomer").key.id == "k1"
    finally:
        store.down = False
        rig.writer.outage_since = None


def test_a_failed_binding_read_gives_a_fresh_choice_and_pauses_the_reads(store, rig):
    add(store, "k1")
    rig.pool.sync()
    store.down = True  # failing before the writer noticed
    try:
        assert rig.pool.acquire("first").key.id == "k1"
        assert calls_of(store, lambda: rig.pool.acquire("second")).count("get_binding") == 0
    finally:
        store.down = False


def test_peers_bindings_of_clients_this_sidecar_does_not_serve_stay_out_of_memory(store, rig):
    add(store, "k1")
    add(store, "k2")
    rig.pool.sync()
    rig.pool.acquire("mine")
    rig.flush()
    store.bind_many({**{f"peer-{i}": "k2" for i in range(50)}, "mine": "k2"})  # a peer moved "mine" too
    rig.clock[0] = T0 + pool_mod.LOCAL_BIND_GRACE_S + 1
    sync_once(rig.pool)
    assert set(rig.pool.bindings) == {"mine"} and rig.pool.bindings["mine"] == "k2"


def test_clients_idle_for_a_touch_period_leave_the_cache(store, rig):
    add(store, "k1")
    rig.pool.sync()
    rig.pool.acquire("idle")
    rig.pool.acquire("busy")
    rig.clock[0] = T0 + pool_mod.TOUCH_EVERY_S + 1
    rig.pool.sync()  # the first touch: both were active in the period
    rig.pool.acquire("busy")
    rig.clock[0] = T0 + 2 * pool_mod.TOUCH_EVERY_S + 2
    rig.pool.sync()
    assert set(rig.pool.bindings) == {"busy"}
    rig.flush()
    assert rig.pool.acquire("idle", blocking=False) is None  # back after an idle hour: read again


# -- in-flight recovery after an unclean stop ---------------------------------------------------------
def _key(key_id: str, spend: float, requests: int, status: str = "healthy") -> KeyState:
    return KeyState(key_id, "sk-x", status=status, spend_estimate=spend, requests_count=requests)


@pytest.mark.parametrize("key,margin", [
    (_key("busy", 2.0, 100), RECOVERY_REQUESTS * 0.02),       # 16 requests at its own average cost
    (_key("cheap", 0.01, 100), RECOVERY_MIN_USD),              # never less than the floor
    (_key("fresh", 0.0, 0), RECOVERY_MIN_USD),
    (_key("patched", 9.0, 2), 5.0),                            # spend set by hand: at most half the budget
    (_key("gone", 9.99, 10, status="exhausted"), None),         # retired: nothing to guard
    (_key("idle", 5.0, 10), None),                              # not in use at the stop
], ids=lambda v: getattr(v, "id", v))
def test_recovery_margin_per_key(key, margin):
    in_use = {"busy", "cheap", "fresh", "patched", "gone"}
    assert recovery_margins([key], in_use).get(key.id) == (pytest.approx(margin) if margin is not None else None)


def near_point(store: MemoryStore, rig: Rig) -> None:
    add(store, "k1", 9.80, requestsCount=98)  # $0.10 a request: margin $1.60, point $9.95
    add(store, "k2", 1.0)
    store.bind("conv", "k1")
    rig.pool.sync()
    rig.pool.acquire("conv")
    rig.pool.distrust({"k1": 1.60})


def test_an_unverified_key_is_not_admitted_near_its_point(store, rig):
    near_point(store, rig)
    got = rig.pool.acquire("conv")
    assert got.key.id == "k2"  # this request goes elsewhere ...
    assert rig.pool.bindings["conv"] == "k1"  # ... without losing the client's key (its prompt cache)


def test_far_from_its_point_an_unverified_key_serves_as_usual(store, rig):
    add(store, "k1", 2.0, requestsCount=20)
    add(store, "k2")
    store.bind("conv", "k1")
    rig.pool.sync()
    rig.pool.distrust({"k1": 1.60})
    assert rig.pool.acquire("conv").key.id == "k1"


@pytest.mark.parametrize("verify", [
    lambda p: p.record_polled_spend("k1", 9.82, T0 + 1),  # the spend checker's read
    lambda p: p.record_usage("k1", 0.01, 10, key_spend_header=9.82, spend_is_after=False),  # a header
], ids=["spend check", "key-spend header"])
def test_the_upstreams_figure_verifies_the_key_and_it_serves_to_its_point_again(store, rig, verify):
    near_point(store, rig)
    rig.clock[0] = T0 + 1
    verify(rig.pool)
    rig.pool.sync()
    assert rig.pool.unverified == {}
    assert rig.pool.acquire("conv").key.id == "k1"


def test_a_key_that_retired_meanwhile_needs_no_verification(store, rig):
    near_point(store, rig)
    store.transition_status("k1", ["healthy"], {"status": "exhausted"})
    rig.pool.sync()
    assert rig.pool.unverified == {} and rig.pool.in_flight("k1") == 0
