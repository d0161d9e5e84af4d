"""`addon.pool.pool.Pool` on the in-memory store with the real write-behind writer (no processes).

What a client or operator would notice: which key a request gets, when a client moves, that a backup
is consumed exactly once, that spend is counted once and survives in the store, and that a database
outage changes nothing the request path sees.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from addon.core import rotation_policy as policy
from addon.core.reservation import KeyLoad
from addon.pool.pool import KeyState, Pool
from addon.store.mongo import new_key_doc, utcnow
from tests.memory_store import MemoryStore, make_writer

T0 = 1_760_000_000.0


class Rig:
    """One sidecar's pool over a shared store; `clock` is the pool's wall clock."""

    def __init__(self, store: MemoryStore, journal: Path, *, start_writer: bool = True) -> None:
        self.store = store
        self.clock = [T0]
        self.writer = make_writer(store, journal)
        self.started = start_writer
        if start_writer:
            self.writer.start()
        self.pool = Pool(store, self.writer, threshold=lambda: 9.95, default_budget=lambda: 10.0,
                         clock=lambda: self.clock[0])

    def flush(self) -> None:
        assert self.writer.flush(10), "the writer did not drain"

    def stop(self) -> None:
        self.writer.stop(flush_timeout=5 if self.started else 0)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def rig(store, tmp_path) -> Iterator[Rig]:
    r = Rig(store, tmp_path / "journal.jsonl")
    yield r
    r.stop()


def add(store: MemoryStore, key_id: str, spend: float = 0.0, *, budget: float = 10.0, **fields: Any) -> None:
    assert store.insert_key({**new_key_doc(key_id, f"sk-{key_id}-0123456789abcdef", budget, utcnow()),
                             "spendEstimate": spend, **fields})


def bound_in_store(store: MemoryStore) -> dict[str, str]:
    return {b["clientId"]: b["openhandsKeyId"] for b in store.snapshot().bindings}


# -- a key's figures ---------------------------------------------------------------------------------
@pytest.mark.parametrize("estimate,total", [
    (1.5, 2.5), (2.5, 1.5), (3.0, 3.0), (0.0, 0.0), (float("nan"), 1.0), (1.0, float("nan")),
    (float("inf"), 1.0), (2, 1.5), (None, 4.0), (4.0, None),
])
def test_a_keys_effective_spend_is_the_policys_figure(estimate, total):
    key = KeyState("k", "sk-k-0123456789abcdef", spend_estimate=estimate, total_spend=total)  # type: ignore[arg-type]
    assert key.effective_spend == policy.effective_spend(estimate, total)


# -- choose -----------------------------------------------------------------------------------------
def test_a_bound_client_keeps_its_key_while_it_is_usable(store, rig):
    add(store, "k1")
    add(store, "k2", 5.0)
    store.bind_many({"conv": "k2", "x": "k2"})
    rig.pool.sync()
    assert rig.pool.choose("conv").key.id == "k2"  # not the emptier, less-bound k1: the prompt cache is per key
    assert rig.pool.choose("newcomer").key.id == "k1"


@pytest.mark.parametrize("keys,binds,expect", [
    ({"a": 0.0, "b": 0.0}, {"x": "a"}, "b"),  # fewest bindings first
    ({"a": 3.0, "b": 1.0}, {}, "b"),  # then most budget left
    ({"a": 1.0, "b": 1.0}, {}, "a"),  # then the smallest id: every sidecar picks the same
    ({"a": 9.95, "b": 9.0}, {}, "b"),  # a key at its rotation point is never chosen
])
def test_a_new_client_gets_the_least_loaded_usable_key(store, rig, keys, binds, expect):
    for key_id, spend in keys.items():
        add(store, key_id, spend)
    store.bind_many(binds)
    rig.pool.sync()
    assert rig.pool.choose("newcomer").key.id == expect


def test_a_bound_key_at_its_rotation_point_asks_for_a_rotation(store, rig):
    add(store, "k1", 9.95)
    add(store, "k2")
    store.bind("conv", "k1")
    rig.pool.sync()
    choice = rig.pool.choose("conv")
    assert choice.key is None and choice.rotate_from.id == "k1"


def test_an_excluded_bound_key_is_not_offered_again(store, rig):
    add(store, "k1")
    add(store, "k2")
    store.bind("conv", "k1")
    rig.pool.sync()
    assert rig.pool.choose("conv", exclude={"k1"}).key.id == "k2"
    assert rig.pool.choose("conv", exclude={"k1", "k2"}).key is None


def test_with_nothing_usable_the_most_spent_healthy_key_is_the_one_to_rotate(store, rig):
    add(store, "k1", 9.96)
    add(store, "k2", 9.99)
    add(store, "k3", 1.0, status="invalid")
    assert store.insert_backup("b1", "sk-backup-b1-0123456789")  # rotating can claim it
    rig.pool.sync()
    choice = rig.pool.choose("newcomer")
    assert choice.key is None and choice.rotate_from.id == "k2"


def test_with_nothing_usable_and_no_backup_the_last_resort_is_chosen_in_memory(store, rig, caplog):
    """No rotation storm: with nowhere to rotate to, no request flips a key's status or calls the store."""
    add(store, "k1", 9.96)
    add(store, "k2", 9.99)
    rig.pool.sync()
    calls_before = len(store.calls)
    for i in range(20):
        got = rig.pool.acquire(f"c{i}")  # new clients: one binding read each (first sight), no rotation step
        assert got is not None and got.key.id == "k1" and "sending on k1" in got.warning
    assert sum("sending on k1" in r.getMessage() for r in caplog.records) == 1  # warned once, not per request
    rotation_steps = {"transition_status", "reserve_replacement", "claim_backup", "reserve_pool_claim",
                      "finish_replacement", "snapshot", "changes", "server_time", "get_key"}
    assert rotation_steps.isdisjoint(store.calls[calls_before:]), store.calls[calls_before:]
    assert store.get_key("k2")["status"] == "healthy"


def test_with_no_healthy_key_there_is_nothing_to_rotate(store, rig):
    add(store, "k1", status="exhausted")
    rig.pool.sync()
    assert rig.pool.choose("c").key is None and rig.pool.choose("c").rotate_from is None


def test_a_cooling_key_comes_back_after_its_cooldown(store, rig):
    add(store, "k1")
    rig.pool.sync()
    rig.pool.mark_rate_limited("k1", T0 + 60, "rate limited by upstream")
    assert rig.pool.choose("c").key is None
    assert rig.pool.revive_cooled() == []
    rig.clock[0] = T0 + 60
    assert rig.pool.choose("c").key.id == "k1"  # usable once the cooldown passed, even before revival
    assert rig.pool.revive_cooled() == ["k1"]
    rig.flush()
    doc = store.get_key("k1")
    assert doc["status"] == "healthy" and doc["cooldownUntil"] is None
    assert doc["lastError"] == "rate limited by upstream"


def test_bind_is_written_behind_and_only_once(store, rig):
    add(store, "k1")
    rig.pool.sync()
    rig.pool.bind("c", "k1")
    rig.pool.bind("c", "k1")
    rig.flush()
    assert bound_in_store(store) == {"c": "k1"} and store.calls.count("bind_many") == 1


# -- metering ---------------------------------------------------------------------------------------
def test_usage_counts_at_once_in_memory_and_once_in_the_store(store, rig):
    add(store, "k1")
    rig.pool.sync()
    assert rig.pool.record_usage("k1", 0.25, 100) == pytest.approx(0.25)
    assert rig.pool.record_usage("k1", 0.5, 50) == pytest.approx(0.75)
    k = rig.pool.get("k1")
    assert (k.tokens_used, k.requests_count, k.last_used_at) == (150, 2, T0)
    rig.flush()
    rig.pool.sync()
    assert rig.pool.get("k1").spend_estimate == pytest.approx(0.75)  # not 1.5: pending totals left with the write
    doc = store.get_key("k1")
    assert doc["spendEstimate"] == pytest.approx(0.75) and doc["requestsCount"] == 2 and doc["tokensUsed"] == 150


def test_the_key_spend_header_raises_spend_to_what_it_proves(store, rig):
    add(store, "k1")
    rig.pool.sync()
    assert rig.pool.record_usage("k1", 0.1, 10, key_spend_header=6.0) == pytest.approx(6.1)
    rig.flush()
    assert store.get_key("k1")["spendEstimate"] == pytest.approx(6.1)


def test_a_header_floor_held_while_peers_may_be_at_work_is_stored_once_alone(store, rig):
    """Floors stay in memory while a peer may be at work (stored, a peer's late $inc would count twice);
    once the pool is alone, the held floor is stored, raised by what was charged on the key since."""
    add(store, "k1", 1.0)
    rig.pool.sync()
    rig.pool.peer_loads = {"": KeyLoad()}  # a live peer's heartbeat
    rig.pool.record_usage("k1", 0.1, 10, key_spend_header=6.0)
    rig.pool.record_usage("k1", 0.2, 10)
    rig.flush()
    assert store.get_key("k1")["spendEstimate"] == pytest.approx(1.3)  # the floor was not stored
    rig.clock[0] += 60  # past the start-up grace
    rig.pool._set_peer_loads({})  # the sharer's read: no peer any more
    rig.flush()
    assert store.get_key("k1")["spendEstimate"] == pytest.approx(6.1 + 0.2)


def test_a_peers_unsynced_spend_moves_a_client_on_and_what_our_read_showed_counts_once(store, rig):
    """Peers' fresh spend is the key's spend for every decision (a key it takes past its point rotates
    instead of serving budget errors), but what had landed before our last read is in our copy already."""
    add(store, "k1", 5.0, appliedRanges=[{"p": "peer", "a": 1, "b": 7}])  # the peer's ops up to 7 are in it
    add(store, "k2")
    store.bind_many({"conv": "k1"})
    rig.pool.sync()
    rig.pool._set_peer_loads({"k1": KeyLoad(recent=4.9, parts=(("peer", 7, 4.9),))})  # in the 5.0 we read
    got = rig.pool.acquire("conv")
    assert got is not None and got.key is not None and got.key.id == "k1"
    rig.pool._set_peer_loads({"k1": KeyLoad(recent=4.96)})  # not written yet: $9.96, past its $9.95 point
    shown = {k["id"]: k for k in rig.pool.snapshot_public()}["k1"]
    assert shown["spendEstimate"] == pytest.approx(9.96)   # what this sidecar knows, peers' fresh spend in it
    got = rig.pool.acquire("conv")
    assert got is not None and got.key is not None and got.key.id == "k2" and not got.full
    rig.flush()
    assert store.get_key("k1")["status"] == "exhausted"
    assert store.get_key("k1")["spendEstimate"] == pytest.approx(5.0)  # peers' spend is never stored by us


def test_a_key_an_answer_proved_spent_is_skipped_at_once_while_its_rotation_runs(store, rig):
    """A budget error's rotation runs off the event loop (database steps); requests choosing a key in the
    meantime must not land on the spent key (each would collect its own budget error)."""
    add(store, "k1", 5.0)
    add(store, "k2", 1.0)
    store.bind_many({"conv": "k1", "other": "k1"})
    rig.pool.sync()
    rig.pool.hold_out("k1", "exhausted")
    got = rig.pool.acquire("other", blocking=False)       # decided in memory, on the loop
    assert got is not None and got.key is not None and got.key.id == "k2"
    assert store.get_key("k1")["status"] == "healthy"      # the rotation records it, not this
    result = rig.pool.rotate("k1", status="exhausted", error="budget exceeded")
    assert result.won and store.get_key("k1")["status"] == "exhausted"


def test_the_last_resort_counts_peers_fresh_spend_in_the_budget_left(store, rig):
    add(store, "k1", 9.96)
    add(store, "k2", 9.97)
    rig.pool.sync()
    assert rig.pool.last_resort().id == "k1"                     # $0.04 left against $0.03
    rig.pool._set_peer_loads({"k1": KeyLoad(recent=0.03)})       # a peer just spent 3 cents of it
    assert rig.pool.last_resort().id == "k2"


def test_a_budget_errors_figure_held_with_an_older_peer_leaves_its_fresh_spend_out(store, rig):
    """The figure holds what the older peer metered lately; our floor must not count that a second time
    when the peer's own increments land."""
    add(store, "k1", 9.0)
    rig.pool.sync()
    rig.pool._set_peer_loads({"k1": KeyLoad(legacy=0.5)})
    rig.pool.retire("k1", "exhausted", "budget exceeded", spend=10.05)
    assert rig.pool._held_floors["k1"] == pytest.approx(9.55)


def test_an_older_peers_fresh_spend_stays_load_as_it_meant_it(store, rig):
    """A peer of an older version publishes its fresh spend without parts: it may be in our copy already,
    so it keeps the key full for now (the request goes elsewhere) but retires nothing."""
    add(store, "k1", 5.0)
    add(store, "k2")
    store.bind_many({"conv": "k1"})
    rig.pool.sync()
    rig.pool._set_peer_loads({"k1": KeyLoad(legacy=4.96)})
    got = rig.pool.acquire("conv")
    assert got is not None and got.key is not None and got.key.id == "k2" and got.rotated_from is None
    assert rig.pool.get("k1").status == "healthy" and rig.pool.bindings["conv"] == "k1"


def test_a_successor_that_reaches_its_point_during_the_rotation_is_rotated_too(store, rig, monkeypatch):
    """A peer's spend lands on the successor while we rotate onto it: the request must not go out on a
    key past its point (a budget error) but on the next one."""
    add(store, "k1", 9.96)
    add(store, "k2", 5.0)
    add(store, "k3", 1.0)
    store.bind_many({"conv": "k1"})
    rig.pool.sync()
    moves = store.move_bindings

    def peers_spend_k2_meanwhile(old: str, new: str) -> Any:
        if new == "k2":
            rig.pool._set_peer_loads({"k2": KeyLoad(recent=4.96)})
        return moves(old, new)

    monkeypatch.setattr(store, "move_bindings", peers_spend_k2_meanwhile)
    monkeypatch.setattr(rig.pool, "_usable_other", lambda old: {"k1": "k2", "k2": "k3"}.get(old))
    got = rig.pool.acquire("conv")
    assert got is not None and got.key is not None and got.key.id == "k3"
    assert got.rotated_from == "k1" and rig.pool.bindings["conv"] == "k3"


def test_a_rotations_clients_are_admitted_to_a_nearly_spent_successor_only_as_far_as_it_can_pay(store, rig):
    """Every client of a rotated key lands on its successor at once (each request from its own thread,
    reserving only when it is sent): the first is admitted and holds its claim, the next finds the
    successor full instead of going out on it too (a budget error)."""
    add(store, "k1", 9.96)
    add(store, "k2", 9.80)
    store.bind_many({"c1": "k1", "c2": "k1"})
    rig.pool.sync()
    first = rig.pool.acquire("c1")
    assert first is not None and first.key is not None and first.key.id == "k2" and not first.full
    assert first.rotated_from == "k1" and rig.pool.bindings["c2"] == "k2"
    second = rig.pool.acquire("c2")              # c1's request has not been sent (reserved) yet
    assert second is not None and second.key is not None and second.full
    rig.pool.reserve("flow-1", "k2", "c1", None)   # c1's request goes out: its claim becomes its reservation
    assert rig.pool.reservations.load("k2").in_flight == 1
    rig.pool.release("flow-1")
    third = rig.pool.acquire("c2")
    assert third is not None and third.key is not None and third.key.id == "k2" and not third.full


def test_an_absurd_key_spend_header_neither_moves_spend_nor_retires_the_key(store, rig, caplog):
    add(store, "k1", 2.0)
    store.bind_many({"conv": "k1"})
    rig.pool.sync()
    for _ in range(3):
        rig.pool.record_usage("k1", 0.1, 10, key_spend_header=1e12)
    key = rig.pool.get("k1")
    assert key.spend_estimate == pytest.approx(2.3) and key.seen_spend == 0.0
    assert rig.pool.retire_spent() == []
    got = rig.pool.acquire("conv")
    assert got is not None and got.key is not None and got.key.id == "k1" and got.rotated_from is None
    assert caplog.text.count("ignored x-litellm-key-spend") == 1   # one warning a minute, not one per answer
    rig.flush()
    assert store.get_key("k1")["spendEstimate"] == pytest.approx(2.3)


def test_usage_for_an_unknown_key_changes_nothing(store, rig):
    add(store, "k1")
    rig.pool.sync()
    assert rig.pool.record_usage("ghost", 0.1, 10) is None
    rig.flush()
    assert store.get_key("ghost") is None and store.get_key("k1")["requestsCount"] == 0


def test_sync_adds_our_unwritten_increments_to_a_peers_stored_spend(store, tmp_path):
    add(store, "k1")
    r = Rig(store, tmp_path / "j.jsonl", start_writer=False)  # our increments stay queued
    r.pool.sync()
    r.pool.record_usage("k1", 0.5, 10)
    store.raise_spend("k1", 2.0)  # a peer sidecar's writes landed meanwhile
    r.pool.sync()
    assert r.pool.get("k1").spend_estimate == pytest.approx(2.5)
    r.writer.start()
    r.started = True
    r.flush()
    r.pool.sync()
    assert r.pool.get("k1").spend_estimate == pytest.approx(2.5)  # counted once
    r.stop()


def test_polled_spend_is_kept_and_never_lowers_the_estimate(store, rig):
    add(store, "k1", 3.0)
    rig.pool.sync()
    rig.pool.record_polled_spend("k1", 2.0, T0)
    k = rig.pool.get("k1")
    assert (k.total_spend, k.spend_estimate, k.last_spend_check) == (2.0, 3.0, T0)
    rig.pool.record_polled_spend("k1", 4.0, T0 + 10)
    rig.flush()
    doc = store.get_key("k1")
    assert doc["spendEstimate"] == 4.0 and doc["totalSpend"] == 4.0
    assert doc["lastSpendCheck"].timestamp() == pytest.approx(T0 + 10)


def test_a_local_binding_wins_over_a_stale_database_read_for_a_grace_period(store, tmp_path):
    add(store, "k1")
    add(store, "k2")
    store.bind("c", "k1")
    r = Rig(store, tmp_path / "j.jsonl", start_writer=False)  # our bind to k2 is not written yet
    r.pool.sync()
    r.pool.bind("c", "k2")
    r.pool.sync()
    assert r.pool.choose("c").key.id == "k2"
    r.clock[0] += 31  # past the grace: the database is the truth again
    r.pool.sync()
    assert r.pool.choose("c").key.id == "k1"
    r.stop()


def test_unknown_status_and_bad_numbers_load_as_safe_defaults(store, rig):
    add(store, "k1", status="weird", budgetLimit="ten", tokensUsed=None)
    rig.pool.sync()
    k = rig.pool.get("k1")
    assert (k.status, k.budget_limit, k.tokens_used) == ("healthy", 10.0, 0)


# -- rotation ---------------------------------------------------------------------------------------
def test_rotating_to_another_key_moves_every_client_and_records_the_successor(store, rig):
    add(store, "k1", 9.0)
    add(store, "k2")
    store.bind_many({"a": "k1", "b": "k1"})
    rig.pool.sync()
    rig.pool.bind("c", "k1")  # queued, maybe not written yet: must move too
    result = rig.pool.rotate("k1", error="budget exceeded", spend=10.02, budget=10.0)
    assert (result.old_id, result.new_id, result.promoted_backup, result.won) == ("k1", "k2", False, True)
    assert {c: rig.pool.choose(c).key.id for c in "abc"} == {"a": "k2", "b": "k2", "c": "k2"}
    rig.flush()
    doc = store.get_key("k1")
    assert doc["status"] == "exhausted" and doc["spendEstimate"] == pytest.approx(10.02)
    assert doc["replacedBy"] == "k2" and doc["lastError"] == "budget exceeded"
    assert bound_in_store(store) == {"a": "k2", "b": "k2", "c": "k2"}
    assert store.snapshot().backups_unused == 0 and store.calls.count("claim_backup") == 0


def test_rotating_the_last_key_promotes_exactly_one_backup(store, rig):
    add(store, "k1", 9.96)
    store.insert_backup("b1", "sk-b1-0123456789abcdef")
    store.insert_backup("b2", "sk-b2-0123456789abcdef")
    store.bind("conv", "k1")
    rig.pool.sync()
    result = rig.pool.rotate("k1", error="proactive", keep_if_stuck=True)
    assert result.new_id == "b1" and result.promoted_backup
    assert rig.pool.choose("conv").key.id == "b1" and rig.pool.backups_unused == 1
    rig.flush()
    assert store.get_key("k1")["replacedBy"] == "b1"
    assert {b["_id"]: b["usedFor"] for b in store.list_backups()} == {"b1": "k1", "b2": None}
    b1 = store.get_key("b1")
    assert b1["status"] == "healthy" and b1["spendEstimate"] == 0.0 and b1["budgetLimit"] == 10.0


@pytest.mark.parametrize("keep_if_stuck,status", [(True, "healthy"), (False, "exhausted")])
def test_with_nowhere_to_go(store, rig, keep_if_stuck, status):
    add(store, "k1", 9.96)
    rig.pool.sync()
    result = rig.pool.rotate("k1", error="proactive", keep_if_stuck=keep_if_stuck)
    assert result.new_id is None
    rig.flush()
    assert rig.pool.get("k1").status == status and store.get_key("k1")["status"] == status
    assert store.get_key("k1").get("replacedBy") is None  # the reservation was released for a later backup


def test_two_sidecars_rotating_one_key_consume_one_backup(store, tmp_path):
    add(store, "k1", 9.96)
    for b in ("b1", "b2", "b3"):
        store.insert_backup(b, f"sk-{b}-0123456789abcdef")
    rigs = [Rig(store, tmp_path / f"j{i}.jsonl") for i in range(2)]
    for r in rigs:
        r.pool.sync()
    barrier, results = threading.Barrier(len(rigs)), [None] * len(rigs)

    def go(i: int) -> None:
        barrier.wait()
        results[i] = rigs[i].pool.rotate("k1", error="budget", spend=10.0)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(rigs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert [r.new_id for r in results] == ["b1", "b1"]
        assert sorted(r.won for r in results) == [False, True]
        assert store.snapshot().backups_unused == 2
    finally:
        for r in rigs:
            r.stop()


def test_promote_backup_with_no_key_left_claims_one_and_reuses_it(store, rig):
    store.insert_backup("b1", "sk-b1-0123456789abcdef")
    store.insert_backup("b2", "sk-b2-0123456789abcdef")
    rig.pool.sync()
    assert rig.pool.promote_backup() == "b1"
    assert rig.pool.promote_backup() == "b1"  # a usable key exists now: no second backup
    assert store.snapshot().backups_unused == 1


def test_promote_backup_replaces_the_last_retired_key(store, rig):
    add(store, "old", status="exhausted", lastUsedAt=utcnow())
    store.insert_backup("b1", "sk-b1-0123456789abcdef")
    rig.pool.sync()
    assert rig.pool.promote_backup() == "b1"
    assert store.get_key("old")["replacedBy"] == "b1"  # so a peer does not promote a second backup for it


def test_promote_backup_with_none_left_gives_none(store, rig):
    add(store, "k1", status="exhausted")
    rig.pool.sync()
    assert rig.pool.promote_backup() is None


@pytest.mark.parametrize("keys,exclude,expect", [
    ({"a": 9.97, "b": 9.99}, (), "a"),  # most budget truly left
    ({"a": 9.97, "b": 9.99}, ("a",), "b"),
    ({"a": 10.0, "b": 10.5}, (), None),  # nothing left to spend at all
])
def test_last_resort_is_the_healthy_key_with_the_most_budget_left(store, rig, keys, exclude, expect):
    for key_id, spend in keys.items():
        add(store, key_id, spend)
    add(store, "dead", 0.0, status="invalid")
    rig.pool.sync()
    k = rig.pool.last_resort(exclude)
    assert (k.id if k else None) == expect


# -- database outage --------------------------------------------------------------------------------
def test_during_an_outage_rotation_happens_in_memory_and_lands_when_the_database_returns(store, rig):
    add(store, "k1", 9.0)
    add(store, "k2")
    store.insert_backup("b1", "sk-b1-0123456789abcdef")
    store.bind("conv", "k1")
    rig.pool.sync()
    store.down = True
    rig.pool.record_usage("k1", 0.5, 10)  # the writer's attempt notices the outage
    assert _wait(lambda: rig.writer.outage_since is not None)
    result = rig.pool.rotate("k1", error="budget", spend=10.01)
    assert result.new_id == "k2" and not result.promoted_backup
    assert rig.pool.choose("conv").key.id == "k2" and rig.pool.get("k1").status == "exhausted"
    store.down = False
    rig.flush()
    doc = store.get_key("k1")
    assert doc["status"] == "exhausted" and doc["spendEstimate"] == pytest.approx(10.01)
    assert bound_in_store(store) == {"conv": "k2"}
    assert store.snapshot().backups_unused == 1  # no backup can be claimed while the database is away


def test_during_an_outage_no_backup_is_claimed(store, rig):
    add(store, "k1", 9.96)
    store.insert_backup("b1", "sk-b1-0123456789abcdef")
    rig.pool.sync()
    store.down = True
    rig.pool.record_usage("k1", 0.01, 1)
    assert _wait(lambda: rig.writer.outage_since is not None)
    assert rig.pool.rotate("k1", keep_if_stuck=True).new_id is None
    assert rig.pool.get("k1").status == "healthy"  # kept in service: the upstream stays the real limit
    assert rig.pool.promote_backup() is None
    store.down = False
    rig.flush()
    assert store.snapshot().backups_unused == 1 and store.get_key("k1")["status"] == "healthy"


# -- admin operations -------------------------------------------------------------------------------
def test_add_and_delete_keys(store, rig):
    assert rig.pool.add_key("k1", "sk-k1-0123456789abcdef", None)
    assert not rig.pool.add_key("k1", "sk-other-0123456789", 5.0)
    assert rig.pool.get("k1").budget_limit == 10.0
    rig.pool.bind("c", "k1")
    assert rig.pool.delete_key("k1") and rig.pool.get("k1") is None
    assert rig.pool.choose("c").key is None and not rig.pool.delete_key("k1")


def test_reset_waits_for_queued_spend_so_it_really_is_zero(store, rig):
    add(store, "k1", 9.5, status="exhausted", replacedBy="k2", lastError="spent")
    rig.pool.sync()
    for _ in range(20):
        rig.pool.record_usage("k1", 0.1, 10)
    assert rig.pool.reset_key("k1")
    rig.flush()
    doc = store.get_key("k1")
    assert (doc["status"], doc["spendEstimate"], doc["requestsCount"], doc["lastError"], doc["replacedBy"]) == \
        ("healthy", 0.0, 0, None, None)
    assert rig.pool.get("k1").spend_estimate == 0.0 and not rig.pool.reset_key("ghost")


def test_public_view_never_shows_a_full_key(store, rig):
    add(store, "k1", 5.0)
    rig.pool.sync()
    [row] = rig.pool.snapshot_public()
    assert row["apiKey"] == "sk-k1-01...cdef" and row["spendPercentage"] == 50.0 and row["rotationPoint"] == 9.95
    assert "sk-k1-0123456789abcdef" not in repr(rig.pool.snapshot_public())


def _wait(pred, timeout: float = 10.0) -> bool:
    from tests.harness import eventually

    return bool(eventually(pred, timeout=timeout, interval=0.01))


# -- acquire: the one key-choice path ---------------------------------------------------------------
def test_acquire_keeps_a_bound_key_and_binds_a_new_client_in_the_store(store, rig):
    add(store, "k1")
    add(store, "k2")
    store.bind("conv", "k2")
    rig.pool.sync()
    got = rig.pool.acquire("conv")
    assert (got.key.id, got.rotated_from, got.warning) == ("k2", None, None)
    long_id = "session:" + "x" * 200  # bound under the whole id, never a truncated one
    assert rig.pool.acquire(long_id).key.id == "k1"
    rig.flush()
    assert bound_in_store(store) == {"conv": "k2", long_id: "k1"}


def test_acquire_on_the_loop_decides_from_memory_or_defers(store, rig):
    add(store, "k1", 9.96)
    add(store, "k2")
    store.bind("conv", "k1")
    rig.pool.sync()
    assert rig.pool.acquire("other", blocking=False) is None  # first sight: its binding is read off the loop
    rig.pool.acquire("other")
    store.calls.clear()
    assert rig.pool.acquire("conv", blocking=False) is None  # a rotation needs the database: not on the loop
    assert rig.pool.acquire("other", blocking=False).key.id == "k2"
    assert store.calls == []  # memory only
    got = rig.pool.acquire("conv")
    assert (got.key.id, got.rotated_from) == ("k2", "k1")
    rig.flush()
    assert store.get_key("k1")["status"] == "exhausted" and bound_in_store(store)["conv"] == "k2"


def test_acquire_rotates_to_a_promoted_backup(store, rig):
    add(store, "k1", 9.96)
    store.insert_backup("b1", "sk-b1-0123456789abcdef")
    store.bind("conv", "k1")
    rig.pool.sync()
    got = rig.pool.acquire("conv")
    assert (got.key.id, got.rotated_from, got.warning) == ("b1", "k1", None)
    assert store.snapshot().backups_unused == 0


def test_acquire_with_nowhere_to_rotate_sends_on_the_key_with_a_warning(store, rig, caplog):
    add(store, "k1", 9.97)
    store.bind("conv", "k1")
    rig.pool.sync()
    got = rig.pool.acquire("conv")
    assert got.key.id == "k1" and got.rotated_from is None and "no backup or other usable key" in got.warning
    assert store.get_key("k1")["status"] == "healthy"  # kept in service: the upstream is the real limit
    assert "ProactiveRotation" in caplog.text


@pytest.mark.parametrize("setup,expect_key,warns", [
    ({"backups": ["b1"]}, "b1", False),  # nothing in the pool: a backup is promoted
    ({"keys": {"k1": (9.99, "healthy")}, "exclude": {"k1"}}, None, False),  # the only key was tried already
    ({"keys": {"k1": (0.0, "invalid")}}, None, False),
])
def test_acquire_for_a_new_client_with_no_usable_key(store, rig, setup, expect_key, warns):
    for key_id, (spend, status) in setup.get("keys", {}).items():
        add(store, key_id, spend, status=status)
    for b in setup.get("backups", []):
        store.insert_backup(b, f"sk-{b}-0123456789abcdef")
    rig.pool.sync()
    got = rig.pool.acquire("newcomer", setup.get("exclude", ()))
    assert (got.key.id if got.key else None) == expect_key and bool(got.warning) == warns
    if expect_key is None:
        rig.flush()
        assert "newcomer" not in bound_in_store(store)


def test_recovery_reuses_the_successor_the_rotation_found(store, rig):
    add(store, "k1")
    add(store, "k2")
    add(store, "k3")
    store.bind_many({"x": "k3", "y": "k3"})  # k3 is busy: a fresh choice would pick k2
    store.bind("conv", "k1")
    rig.pool.sync()
    assert rig.pool.choose("newcomer").key.id == "k2"
    got = rig.pool.acquire("conv", {"k1"}, successor="k3")
    assert got.key.id == "k3"
    rig.flush()
    assert bound_in_store(store)["conv"] == "k3"


# -- a peer's changes reach this sidecar's memory -----------------------------------------------------
def test_a_peers_added_deleted_and_retired_keys_show_up_at_the_next_sync(store, rig):
    add(store, "k1")
    add(store, "k2")
    rig.pool.sync()
    store.bind("conv", "k2")
    add(store, "k3")  # another sidecar added a key ...
    assert store.delete_key("k1")  # ... deleted one ...
    store.transition_status("k2", ["healthy"], {"status": "exhausted"})  # ... and retired one
    rig.pool.sync()
    assert rig.pool.get("k1") is None and rig.pool.get("k3") is not None
    assert rig.pool.get("k2").status == "exhausted"
    assert rig.pool.choose("conv").key.id == "k3"  # never the deleted or the retired key
