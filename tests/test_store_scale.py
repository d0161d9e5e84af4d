"""State stays bounded and sync cost follows activity (issue 14 §3-4), on real SecantusDB.

Every write stamps `updatedAt` with the server's clock, so a delta read (`changes`) sees exactly what
changed; inactive bindings expire through a TTL index; one client's binding is read on its own.
"""
from __future__ import annotations

import datetime as dt
import time
from typing import Any, Callable

import pytest

from addon.store.mongo import PoolStore, UsageOp, new_key_doc, utcnow
from addon.store.writer import apply_batch, usage_op


def eventually(check: Callable[[], Any], timeout: float = 20.0, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(every)


@pytest.fixture
def store(mongo, db_name):
    s = PoolStore(mongo.uri, db_name)
    s.change_margin_s = CHANGE_WAIT / 2  # production re-reads 5 s; the tests need not wait that long
    s.ensure_indexes(30, binding_ttl_days=7)
    for k in ("a", "b", "c"):
        s.insert_key(new_key_doc(k, f"sk-{k}-scale-0123456789abcdef", 10.0, utcnow()))
    s.bind_many({"c1": "a", "c2": "b"})
    yield s
    s.client.drop_database(db_name)
    s.close()


def test_a_delta_rereads_only_the_margin_before_the_last_read(store):
    time.sleep(CHANGE_WAIT)
    first = store.changes(None)
    assert store.changes(first.high_water).keys == []  # nothing changed: nothing read


def test_bindings_expire_after_the_configured_days_of_inactivity(store):
    ttl = {ix["name"]: ix for ix in store.bindings.list_indexes()}["ttl_updatedAt"]
    assert ttl["expireAfterSeconds"] == 7 * 86400 and dict(ttl["key"]) == {"updatedAt": 1}
    store.ensure_indexes(30, binding_ttl_days=2)  # the option changed: the index follows
    ttl = {ix["name"]: ix for ix in store.bindings.list_indexes()}["ttl_updatedAt"]
    assert ttl["expireAfterSeconds"] == 2 * 86400


def test_an_inactive_binding_is_deleted_by_the_server_and_an_active_one_kept(store):
    old = utcnow() - dt.timedelta(days=3)
    store.bindings.update_many({}, {"$set": {"updatedAt": old}})
    store.touch_bindings(["c2"])  # c2 is still in use
    store.ensure_indexes(30, binding_ttl_days=2)
    # The server's TTL monitor runs once a minute.
    assert eventually(lambda: store.get_binding("c1") is None, timeout=150, every=1.0)
    assert store.get_binding("c2") == "b"


WRITES: list[tuple[str, Callable[[PoolStore], None]]] = [
    ("usage", lambda s: s.apply_usage(UsageOp("u1", "a", 0.1, 5, time.time()))),
    ("usage batch", lambda s: apply_batch(s, [usage_op("a", 0.1, 5, time.time(), 2.0, "u2")])),
    ("set batch", lambda s: apply_batch(s, [{"kind": "set", "key_id": "a", "set": {"lastError": "x"}}])),
    ("raise spend batch", lambda s: apply_batch(s, [{"kind": "raise_spend", "key_id": "a", "spend": 3.0}])),
    ("raise spend", lambda s: s.raise_spend("a", 4.0)),
    ("set fields", lambda s: s.set_key_fields("a", {"budgetLimit": 20.0})),
    ("status", lambda s: s.transition_status("a", ["healthy"], {"status": "exhausted"})),
    ("reserve", lambda s: s.reserve_replacement("a")),
    ("successor", lambda s: s.record_successor("a", "b")),
]


@pytest.mark.parametrize("name,write", WRITES, ids=[w[0] for w in WRITES])
def test_every_key_write_shows_up_in_the_next_delta_and_nothing_else_does(store, name, write):
    time.sleep(CHANGE_WAIT)  # past the delta's safety margin, so the set-up writes fall out of it
    first = store.changes(None)
    assert first.full and {d["_id"] for d in first.keys} == {"a", "b", "c"}
    write(store)
    delta = store.changes(first.high_water)
    assert not delta.full and delta.key_count == 3
    assert [d["_id"] for d in delta.keys] == ["a"], name
    assert delta.bindings == []


def test_binding_writes_show_up_in_the_delta(store):
    time.sleep(CHANGE_WAIT)
    first = store.changes(None)
    store.bind("c3", "c")
    store.move_bindings("a", "b")
    delta = store.changes(first.high_water)
    assert sorted((b["clientId"], b["openhandsKeyId"]) for b in delta.bindings) == [("c1", "b"), ("c3", "c")]
    assert delta.keys == []


def test_a_promoted_backup_shows_up_in_the_delta(store):
    store.insert_backup("bk", "sk-bk-scale-0123456789abcdef")
    time.sleep(CHANGE_WAIT)
    first = store.changes(None)
    assert first.backups_unused == 1
    store.activate_backup(store.claim_backup("a"), 10.0)
    delta = store.changes(first.high_water)
    assert [d["_id"] for d in delta.keys] == ["bk"] and delta.key_count == 4 and delta.backups_unused == 0


def test_delta_read_cost_follows_activity_not_history(store):
    """2,000 idle bindings and 200 idle keys: a delta after one write returns that one document."""
    idle = utcnow() - dt.timedelta(hours=1)
    for lo in range(0, 2000, 250):
        store.bindings.insert_many([{"clientId": f"idle-{i}", "openhandsKeyId": "a", "isActive": True,
                                     "updatedAt": idle} for i in range(lo, lo + 250)])
    store.keys.insert_many([{**new_key_doc(f"idle-{i}", f"sk-idle-{i}-0123456789ab", 10.0, utcnow()),
                             "updatedAt": idle} for i in range(200)])
    time.sleep(CHANGE_WAIT)
    first = store.changes(None, with_bindings=False)
    assert first.bindings == [] and len(first.keys) == 203  # bindings are read per client, not in bulk
    store.bind("busy", "b")
    delta = store.changes(first.high_water)
    assert [b["clientId"] for b in delta.bindings] == ["busy"] and delta.keys == []
    assert store.get_binding("idle-42") == "a" and store.get_binding("never-seen") is None


def test_documents_from_before_updated_at_get_one(store):
    store.bindings.drop_index("ttl_updatedAt")  # a deployment from before this version
    store.keys.update_many({}, {"$unset": {"updatedAt": ""}})
    store.bindings.update_many({}, {"$unset": {"updatedAt": ""}})
    store.ensure_indexes(30, binding_ttl_days=7)
    assert store.keys.count_documents({"updatedAt": {"$exists": False}}) == 0
    assert store.bindings.count_documents({"updatedAt": {"$exists": False}}) == 0


def test_a_start_loads_only_recently_active_bindings(store):
    store.bindings.update_one({"clientId": "c1"}, {"$set": {"updatedAt": utcnow() - dt.timedelta(days=1)}})
    full = store.changes(None)
    assert [b["clientId"] for b in full.bindings] == ["c2"]  # c1 idle for a day: a fresh key choice if it returns


CHANGE_WAIT = 0.6  # twice the test store's re-read margin


def test_pool_claim_admits_one_holder_until_released_or_stale(store):
    assert store.reserve_pool_claim("sidecar-a")
    assert not store.reserve_pool_claim("sidecar-b")
    store.release_pool_claim("sidecar-b")  # not the holder: changes nothing
    assert not store.reserve_pool_claim("sidecar-b")
    store.release_pool_claim("sidecar-a")
    assert store.reserve_pool_claim("sidecar-b")
    # a crashed holder's claim goes stale (with no grace at all: once the stored time, in whole milliseconds, is past)
    assert eventually(lambda: store.reserve_pool_claim("sidecar-c", stale_after_s=0.0))
