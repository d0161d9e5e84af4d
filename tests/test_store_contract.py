"""One contract, two stores: the real `PoolStore` on SecantusDB and `tests.memory_store.MemoryStore`.

Every unit test that runs on the memory store trusts it to behave like MongoDB; this suite is that
trust checked. Each test runs against both, through public methods only. A store method that is
added or changes meaning must be covered here, and the memory store must pass.
"""
from __future__ import annotations

import datetime as dt
import inspect
import threading
import time
from typing import Any, Callable, Iterator

import pytest

from addon.store.lease import SpendLease
from addon.store.mongo import PENDING, PoolStore, UsageOp, new_key_doc, utcnow
from tests.memory_store import MemoryStore

T0 = 1_760_000_000.0


@pytest.fixture(params=["mongo", "memory"])
def store(request, db_name) -> Iterator[Any]:
    if request.param == "mongo":
        server = request.getfixturevalue("mongo")
        s = PoolStore(server.uri, db_name)
        s.ensure_indexes(30)
        yield s
        s.client.drop_database(db_name)
        s.close()
    else:
        yield MemoryStore()


def add(store: Any, key_id: str, *, budget: float = 10.0, **fields: Any) -> None:
    assert store.insert_key({**new_key_doc(key_id, f"sk-{key_id}-0123456789abcdef", budget, utcnow()), **fields})


def bound(store: Any) -> dict[str, str]:
    """Active bindings: client id -> key id."""
    return {b["clientId"]: b["openhandsKeyId"] for b in store.snapshot().bindings}


def usage(key_id: str, op_id: str, cost: float = 0.25, *, at: float = T0, floor: float | None = None) -> UsageOp:
    return UsageOp(op_id, key_id, cost, 100, at, floor)


def race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(i) on n threads released together; results in thread order."""
    barrier, out = threading.Barrier(n), [None] * n

    def go(i: int) -> None:
        barrier.wait()
        out[i] = fn(i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


# -- keys -------------------------------------------------------------------------------------------
def test_a_key_round_trips_with_its_fields_and_a_duplicate_id_is_refused(store):
    add(store, "k1", budget=25.0)
    assert not store.insert_key(new_key_doc("k1", "sk-other-0123456789", 10.0, utcnow()))
    doc = store.get_key("k1")
    assert doc["_id"] == "k1" and doc["apiKey"] == "sk-k1-0123456789abcdef" and doc["budgetLimit"] == 25.0
    assert doc["status"] == "healthy" and doc["spendEstimate"] == 0.0 and doc["requestsCount"] == 0
    assert isinstance(doc["createdAt"], dt.datetime) and doc["createdAt"].tzinfo is not None
    assert store.get_key("nope") is None


def test_reads_are_copies_a_caller_cannot_edit_stored_state(store):
    add(store, "k1")
    store.get_key("k1")["status"] = "invalid"
    store.snapshot().keys[0]["spendEstimate"] = 99.0
    assert store.get_key("k1")["status"] == "healthy" and store.get_key("k1")["spendEstimate"] == 0.0


def test_delete_removes_the_key_and_its_bindings_only(store):
    add(store, "k1")
    add(store, "k2")
    store.bind_many({"c1": "k1", "c2": "k1", "c3": "k2"})
    assert store.delete_key("k1") is True
    assert store.get_key("k1") is None and bound(store) == {"c3": "k2"}
    assert store.delete_key("k1") is False


def test_set_fields_matches_existing_keys_only(store):
    add(store, "k1")
    assert store.set_key_fields("k1", {"budgetLimit": 20.0, "lastError": "x"}) is True
    assert store.set_key_fields("k1", {"budgetLimit": 20.0}) is True  # matched, even when nothing changes
    assert store.set_key_fields("ghost", {"budgetLimit": 20.0}) is False
    assert store.get_key("ghost") is None  # never an upsert
    assert store.get_key("k1")["budgetLimit"] == 20.0 and store.get_key("k1")["lastError"] == "x"


@pytest.mark.parametrize("status,allowed,won", [
    ("healthy", ["healthy", "rate_limited"], True),
    ("rate_limited", ["healthy", "rate_limited"], True),
    ("exhausted", ["healthy", "rate_limited"], False),
    ("invalid", ["healthy"], False),
])
def test_status_transition_is_a_compare_and_set(store, status, allowed, won):
    add(store, "k1", status=status)
    assert store.transition_status("k1", allowed, {"status": "exhausted", "lastError": "spent"}) is won
    assert store.get_key("k1")["status"] == ("exhausted" if won else status)
    assert store.transition_status("ghost", allowed, {"status": "exhausted"}) is False


def test_a_matched_transition_always_counts_as_a_change(store):
    """`updatedAt` is stamped by the server, so even a same-value transition modifies the document."""
    add(store, "k1", status="exhausted")
    assert store.transition_status("k1", ["exhausted"], {"status": "exhausted"}) is True


def test_racing_status_flips_have_exactly_one_winner(store):
    add(store, "k1")
    wins = race(8, lambda i: store.transition_status("k1", ["healthy"], {"status": "exhausted", "lastError": str(i)}))
    assert wins.count(True) == 1
    assert store.get_key("k1")["lastError"] == str(wins.index(True))


# -- change reads (sync cost follows activity) ------------------------------------------------------
def test_changes_since_a_high_water_mark_return_only_recent_writes(store):
    long_ago = utcnow() - dt.timedelta(seconds=120)
    add(store, "quiet", updatedAt=long_ago)
    add(store, "busy", updatedAt=long_ago)
    add(store, "gone", updatedAt=long_ago)
    first = store.changes(None)
    assert first.full and {d["_id"] for d in first.keys} == {"quiet", "busy", "gone"} and first.key_count == 3
    assert isinstance(first.high_water, dt.datetime) and first.high_water.tzinfo is not None
    store.raise_spend("busy", 1.0)
    store.delete_key("gone")
    store.bind("c1", "busy")
    delta = store.changes(first.high_water)
    assert not delta.full and [d["_id"] for d in delta.keys] == ["busy"]  # a quiet key costs nothing
    assert delta.key_count == 2  # a deletion shows as a drop in the count
    assert [b["clientId"] for b in delta.bindings] == ["c1"]
    assert store.changes(first.high_water, with_bindings=False).bindings == []
    assert delta.high_water >= first.high_water


STRUCTURAL: list[tuple[str, Callable[[Any], Any]]] = [
    ("key added", lambda s: add(s, "k9")),
    ("key deleted", lambda s: s.delete_key("k1")),
    ("backup added", lambda s: s.insert_backup("b2", "sk-b2-0123456789abcdef")),
    ("backup deleted", lambda s: s.delete_backup("b1")),
    ("backup claimed", lambda s: s.claim_backup(used_for="k1")),
]


@pytest.mark.parametrize("name,change", STRUCTURAL, ids=[c[0] for c in STRUCTURAL])
def test_a_structural_change_moves_the_generation_and_a_quiet_delta_counts_nothing(store, name, change):
    add(store, "k1")
    store.insert_backup("b1", "sk-b1-0123456789abcdef")
    first = store.changes(None)
    assert (first.key_count, first.backups_unused, first.backups_total) == (1, 1, 1)
    quiet = store.changes(first.high_water, generation=first.generation)
    assert not quiet.restructured and (quiet.key_count, quiet.backups_unused, quiet.backups_total) == (0, 0, 0)
    store.raise_spend("k1", 1.0)  # a write, not a structural change
    assert not store.changes(first.high_water, generation=first.generation).restructured
    change(store)
    moved = store.changes(first.high_water, generation=first.generation)
    assert moved.restructured and moved.generation != first.generation, name
    assert (moved.key_count, moved.backups_unused, moved.backups_total) == (
        len(store.snapshot().keys), store.snapshot().backups_unused, store.snapshot().backups_total)


def test_a_failed_structural_change_leaves_the_generation(store):
    add(store, "k1")
    store.insert_backup("b1", "sk-b1-0123456789abcdef")
    g = store.generation()
    assert not store.insert_key(new_key_doc("k1", "sk-k1-0123456789abcdef", 10.0, utcnow()))
    assert not store.delete_key("nobody") and not store.delete_backup("nobody")
    assert not store.insert_backup("b1", "sk-b1-0123456789abcdef")
    assert store.generation() == g
    store.claim_backup(used_for="k1")
    g = store.generation()
    assert store.claim_backup(used_for="k1") is None  # none left
    assert store.generation() == g


def test_binding_deltas_name_the_keys_to_heal(store):
    add(store, "old", status="exhausted", replacedBy="new")
    add(store, "new")
    add(store, "other", status="exhausted", replacedBy="new")
    first = store.changes(None)
    store.take_bound_keys()
    store.move_bindings("x", "y")
    store.bind_many({"a": "new", "b": "new"})
    store.move_bindings("new", "old")  # a peer's stale write put them on the retired key
    store.changes(first.high_water)
    assert store.take_bound_keys() == {"old"} and store.take_bound_keys() == set()
    assert store.heal_bindings(set()) == 0  # nothing written lately: nothing looked at
    assert store.heal_bindings({"other"}) == 0  # only the keys named
    assert store.heal_bindings({"old", "new"}) == 2 and bound(store) == {"a": "new", "b": "new"}


def test_snapshot_without_bindings_and_with_the_key_count(store):
    add(store, "k1")
    store.bind("c1", "k1")
    snap = store.snapshot(with_bindings=False)
    assert snap.bindings == [] and snap.key_count == 1 and [d["_id"] for d in snap.keys] == ["k1"]


def test_one_binding_read_and_touch(store):
    add(store, "k1")
    store.bind("c1", "k1")
    assert store.get_binding("c1") == "k1" and store.get_binding("nobody") is None
    assert store.touch_bindings(["c1", "nobody"]) == 1
    assert store.touch_bindings([]) == 0
    assert store.get_binding("c1") == "k1"


def test_server_time_is_utc_now(store):
    t = store.server_time()
    assert t.tzinfo is not None and abs((t - utcnow()).total_seconds()) < 60


# -- spend ------------------------------------------------------------------------------------------
def test_raise_spend_only_raises_and_sets_the_extra_fields(store):
    add(store, "k1", spendEstimate=3.0)
    store.raise_spend("k1", 2.0, {"totalSpend": 2.0})
    assert store.get_key("k1")["spendEstimate"] == 3.0 and store.get_key("k1")["totalSpend"] == 2.0
    store.raise_spend("k1", 4.5)
    assert store.get_key("k1")["spendEstimate"] == 4.5
    store.raise_spend("ghost", 4.5)
    assert store.get_key("ghost") is None


def test_usage_is_counted_once_per_op_id(store):
    add(store, "k1")
    for op_id in ("a", "b", "a", "c", "b"):  # replays of a and b (journal, retried batch)
        store.apply_usage(usage("k1", op_id))
    doc = store.get_key("k1")
    assert doc["spendEstimate"] == pytest.approx(0.75) and doc["tokensUsed"] == 300 and doc["requestsCount"] == 3
    assert "appliedOps" not in doc and "appliedRanges" not in doc  # internal bookkeeping never reaches readers


def test_usage_keeps_the_latest_use_time_and_applies_the_key_spend_floor(store):
    add(store, "k1")
    store.apply_usage(usage("k1", "late", at=T0 + 60))
    store.apply_usage(usage("k1", "early", at=T0))
    assert store.get_key("k1")["lastUsedAt"].timestamp() == pytest.approx(T0 + 60, abs=0.001)
    store.apply_usage(usage("k1", "floor", cost=0.1, floor=7.0))  # x-litellm-key-spend proved $7
    assert store.get_key("k1")["spendEstimate"] == pytest.approx(7.0)
    store.apply_usage(usage("k1", "floor", cost=0.1, floor=9.0))  # replayed: neither the cost nor the floor
    assert store.get_key("k1")["spendEstimate"] == pytest.approx(7.0)


def test_concurrent_increments_are_never_lost(store):
    add(store, "k1")
    race(8, lambda i: [store.apply_usage(usage("k1", f"{i}-{n}", cost=0.01)) for n in range(25)])
    doc = store.get_key("k1")
    assert doc["requestsCount"] == 200 and doc["spendEstimate"] == pytest.approx(2.0)


def test_unset_ops_forgets_applied_op_ids(store):
    add(store, "k1")
    store.apply_usage(usage("k1", "a"))
    store.set_key_fields("k1", {"spendEstimate": 0.0, "requestsCount": 0}, unset_ops=True)
    store.apply_usage(usage("k1", "a"))
    assert store.get_key("k1")["requestsCount"] == 1


# -- bindings ---------------------------------------------------------------------------------------
def test_bind_upserts_one_binding_per_client(store):
    add(store, "k1")
    add(store, "k2")
    store.bind("c1", "k1")
    store.bind("c1", "k2")
    store.bind_many({"c2": "k1", "c3": "k2"})
    assert bound(store) == {"c1": "k2", "c2": "k1", "c3": "k2"}
    [b] = [b for b in store.snapshot().bindings if b["clientId"] == "c1"]
    assert "_id" not in b and b["isActive"] is True and b["updatedAt"] >= b["createdAt"]


@pytest.mark.parametrize("status,replaced_by,lands_on", [
    ("exhausted", "k2", "k2"),  # a stale queued bind follows the retired key's successor
    ("invalid", "k2", "k2"),
    ("exhausted", PENDING, "k1"),  # successor not known yet: stays (heal moves it later)
    ("exhausted", None, "k1"),
    ("healthy", "k2", "k1"),  # a reset key serves again
])
def test_a_bind_to_a_retired_key_follows_its_successor(store, status, replaced_by, lands_on):
    add(store, "k1", status=status, replacedBy=replaced_by)
    add(store, "k2")
    store.bind("c1", "k1")
    assert bound(store) == {"c1": lands_on}


def test_move_and_heal_bindings(store):
    add(store, "old", status="exhausted", replacedBy="new")
    add(store, "new")
    add(store, "dead", status="invalid")  # no successor: its clients choose afresh
    add(store, "gone", status="exhausted", replacedBy="dead")  # successor retired too
    store.bind_many({"a": "new", "b": "new", "c": "dead", "d": "gone", "e": "new"})
    assert store.move_bindings("new", "old") == 3  # put three on the retired key (a peer's stale write)
    assert store.move_bindings("nobody", "new") == 0
    assert store.heal_bindings() == 5
    assert bound(store) == {"a": "new", "b": "new", "e": "new"}
    assert store.heal_bindings() == 0


# -- backups ----------------------------------------------------------------------------------------
def test_backup_insert_exists_delete_and_list_oldest_first(store):
    for b in ("b2", "b1", "b3"):
        assert store.insert_backup(b, f"sk-{b}-0123456789abcdef")
        time.sleep(0.002)  # distinct createdAt at MongoDB's millisecond resolution
    assert not store.insert_backup("b1", "sk-again-0123456789")
    assert store.backup_exists("b1") and not store.backup_exists("b9")
    assert [b["_id"] for b in store.list_backups()] == ["b2", "b1", "b3"]
    assert store.delete_backup("b1") and not store.delete_backup("b1")
    snap = store.snapshot()
    assert (snap.backups_unused, snap.backups_total) == (2, 2)


def test_claims_take_the_oldest_backup_and_mark_it_used(store):
    store.insert_backup("b1", "sk-b1-0123456789abcdef")
    time.sleep(0.002)
    store.insert_backup("b2", "sk-b2-0123456789abcdef")
    first = store.claim_backup(used_for="k1")
    assert first["_id"] == "b1" and first["apiKey"] == "sk-b1-0123456789abcdef"
    assert first["isUsed"] is True and first["usedFor"] == "k1" and isinstance(first["usedAt"], dt.datetime)
    assert store.claim_backup(used_for="k2")["_id"] == "b2"
    assert store.claim_backup(used_for="k3") is None
    snap = store.snapshot()
    assert (snap.backups_unused, snap.backups_total) == (0, 2)


def test_racing_claimers_never_share_a_backup(store):
    for i in range(3):
        store.insert_backup(f"b{i}", f"sk-b{i}-0123456789abcdef")
    got = race(8, lambda i: store.claim_backup(used_for=f"k{i}"))
    claimed = [g["_id"] for g in got if g is not None]
    assert sorted(claimed) == ["b0", "b1", "b2"]
    assert {b["_id"]: b["usedFor"] for b in store.list_backups()} == {
        g["_id"]: g["usedFor"] for g in got if g is not None}


def test_activating_a_backup_twice_keeps_the_first_activation(store):
    store.insert_backup("b1", "sk-b1-0123456789abcdef")
    backup = store.claim_backup(used_for="k1")
    store.activate_backup(backup, 10.0)
    store.apply_usage(usage("b1", "x", cost=1.5))
    store.activate_backup(backup, 50.0)  # a re-run finishing a rotation must not reset it
    doc = store.get_key("b1")
    assert doc["status"] == "healthy" and doc["spendEstimate"] == pytest.approx(1.5) and doc["budgetLimit"] == 10.0
    assert doc["apiKey"] == "sk-b1-0123456789abcdef" and doc["promotedFrom"] == "k1"


# -- replacement reservation ------------------------------------------------------------------------
def test_one_reservation_per_key_released_or_finished(store):
    add(store, "k1")
    assert store.reserve_replacement("k1") is True
    assert store.reserve_replacement("k1") is False  # held
    store.finish_replacement("k1", None)  # no backup was left: released
    assert store.get_key("k1").get("replacedBy") is None
    assert store.reserve_replacement("k1") is True
    store.finish_replacement("k1", "b1")
    assert store.get_key("k1")["replacedBy"] == "b1"
    assert store.reserve_replacement("k1", stale_after_s=0.0) is False  # finished, not stale
    assert store.reserve_replacement("ghost") is False


def test_a_stale_reservation_can_be_taken_over(store):
    add(store, "k1")
    assert store.reserve_replacement("k1")
    assert store.reserve_replacement("k1", stale_after_s=30.0) is False
    time.sleep(0.01)
    assert store.reserve_replacement("k1", stale_after_s=0.0) is True  # the holder crashed
    assert store.get_key("k1")["replacedBy"] == PENDING


def test_racing_reservations_have_exactly_one_winner(store):
    add(store, "k1")
    assert race(8, lambda i: store.reserve_replacement("k1")).count(True) == 1


def test_the_first_recorded_successor_wins(store):
    add(store, "k1", status="exhausted")
    store.record_successor("k1", "k2")
    store.record_successor("k1", "k3")
    assert store.get_key("k1")["replacedBy"] == "k2"
    store.finish_replacement("k1", "k4")  # no reservation pending: nothing to finish
    assert store.get_key("k1")["replacedBy"] == "k2"


def test_repair_finishes_a_half_done_rotation(store):
    add(store, "k1", status="exhausted")
    store.insert_backup("b1", "sk-b1-0123456789abcdef")
    store.claim_backup(used_for="k1")  # crashed before activate_backup
    store.bind_many({"c1": "k1", "c2": "ghost-key"})
    fixed = store.repair(12.0)
    assert any("b1" in line for line in fixed) and any("1 binding" in line for line in fixed)
    assert store.get_key("b1")["status"] == "healthy" and store.get_key("b1")["budgetLimit"] == 12.0
    assert bound(store) == {"c1": "k1"}
    assert store.repair(12.0) == []


def test_a_deleted_promoted_backup_stays_deleted(store):
    store.insert_backup("b1", "sk-b1-0123456789abcdef")
    store.activate_backup(store.claim_backup(used_for="k1"), 10.0)
    assert store.delete_key("b1")  # the operator removed the promoted key
    assert store.repair(10.0) == [] and store.get_key("b1") is None


# -- history ----------------------------------------------------------------------------------------
def test_history_newest_first_filtered_and_limited(store):
    def row(key_id: str, t: float) -> dict:
        return {"keyId": key_id, "apiKeyMasked": "sk-x...", "spend": t - T0, "threshold": 9.95,
                "checkedAt": dt.datetime.fromtimestamp(t, dt.timezone.utc), "wasActive": True, "rotatedAt": None,
                "rotationReason": None, "newKeyId": None}

    for key_id, t in (("k1", T0 + 1), ("k2", T0 + 2), ("k1", T0 + 3), ("k1", T0 + 0)):
        store.insert_history(row(key_id, t))
    rows = store.list_history(10, None)
    assert [r["spend"] for r in rows] == [3.0, 2.0, 1.0, 0.0] and all("_id" not in r for r in rows)
    assert [r["spend"] for r in store.list_history(2, "k1")] == [3.0, 1.0]
    assert store.list_history(10, "nobody") == []


# -- spend-poller lease, on the store's lease collection --------------------------------------------
def test_one_lease_holder_takeover_after_expiry_and_release(store):
    t = [T0]
    a = SpendLease(store.leases, period_s=10, owner="A", clock=lambda: t[0])
    b = SpendLease(store.leases, period_s=10, owner="B", clock=lambda: t[0])
    assert a.hold() and not b.hold() and b.holder == "A"
    t[0] += 4
    assert a.hold() and not b.hold()  # renewed at +4 until +14
    t[0] += 10.1
    assert b.hold() and not a.hold()  # A stopped renewing: B takes over
    b.release()
    assert a.hold()


class Counting:
    """A collection that records the name of every method called on it."""

    def __init__(self, coll: Any) -> None:
        self.coll, self.calls = coll, []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.coll, name)

        def call(*a: Any, **kw: Any) -> Any:
            self.calls.append(name)
            return attr(*a, **kw)
        return call


def test_a_standby_tries_the_lease_once_a_tick_and_reads_the_holder_now_and_then(store):
    t = [T0]
    a = SpendLease(store.leases, period_s=30, owner="A", clock=lambda: t[0])
    assert a.hold()
    coll = Counting(store.leases)
    b = SpendLease(coll, period_s=30, owner="B", clock=lambda: t[0])
    for _ in range(10):  # ten one-second ticks of an idle standby
        assert not b.hold()
        t[0] += 1
        assert a.hold()
    assert coll.calls.count("find_one_and_update") == 10 and coll.calls.count("find_one") == 1
    assert b.holder == "A"
    a.release()
    assert b.hold()  # a clean stop still hands over at the next tick


def test_racing_lease_acquirers_get_one_lease(store):
    leases = [SpendLease(store.leases, period_s=30, owner=f"o{i}") for i in range(6)]
    assert race(len(leases), lambda i: leases[i].hold()).count(True) == 1


# -- the interface itself ---------------------------------------------------------------------------
def _public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_")}


def test_the_memory_store_offers_every_method_of_the_real_store_with_the_same_parameters():
    """A method added to (or changed in) PoolStore must be added to the memory store and to this suite."""
    real, memory = _public_methods(PoolStore), _public_methods(MemoryStore)
    missing = sorted(set(real) - set(memory))
    assert missing == [], f"MemoryStore lacks {missing}"
    differ = {name: (str(real[name]), str(memory[name])) for name in real
              if list(real[name].parameters) != list(memory[name].parameters)}
    assert differ == {}, differ
