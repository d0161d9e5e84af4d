"""Exactly one successor per retired key, across threads and sidecars, and a fair spread of clients
when several keys retire at once (issue 14 §5). Several `Pool`s (one per simulated sidecar, each with
its own write-behind writer) on one real SecantusDB database."""
from __future__ import annotations

import threading
from collections import Counter
from typing import Iterator

import pytest

from addon.pool.pool import Pool
from addon.store.mongo import PoolStore, new_key_doc, utcnow
from tests.inproc import pools_on_one_database


@pytest.fixture
def sidecars(mongo, db_name, tmp_path) -> Iterator[list[Pool]]:
    with pools_on_one_database(mongo.uri, db_name, tmp_path, 3) as pools:
        yield pools


def race(fns) -> None:
    start = threading.Barrier(len(fns))

    def go(fn):
        start.wait()
        fn()
    threads = [threading.Thread(target=go, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)


def live_keys(store: PoolStore) -> list[str]:
    return sorted(d["_id"] for d in store.keys.find({"status": "healthy"}))


@pytest.mark.parametrize("rounds", range(3))
def test_an_empty_pool_promotes_one_backup_whatever_the_race(sidecars, rounds):
    """No key to reserve at all (usedFor: pool): 3 sidecars × 3 threads ask at once, one backup goes."""
    store = sidecars[0].store
    for i in range(6):
        store.insert_backup(f"b{i}", f"sk-backup-{i}-0123456789abcdef")
    for p in sidecars:
        p.sync()
    got: list[str | None] = []
    race([lambda p=p: got.append(p.promote_backup()) for p in sidecars for _ in range(3)])
    used = [b["_id"] for b in store.backups.find({"isUsed": True})]
    assert len(used) == 1, used
    assert live_keys(store) == used and set(got) == set(used)


@pytest.mark.parametrize("rounds", range(3))
def test_a_retired_key_gets_exactly_one_successor_across_sidecars(sidecars, rounds):
    store = sidecars[0].store
    store.insert_key(new_key_doc("k", "sk-only-key-0123456789abcdef", 10.0, utcnow()))
    for i in range(6):
        store.insert_backup(f"b{i}", f"sk-backup-{i}-0123456789abcdef")
    for p in sidecars:
        p.sync()
    results = []
    race([lambda p=p: results.append(p.rotate("k", error="budget")) for p in sidecars for _ in range(2)]
         + [lambda p=p: results.append(p.promote_backup()) for p in sidecars])
    used = list(store.backups.find({"isUsed": True}))
    assert len(used) == 1, [(b["_id"], b["usedFor"]) for b in used]
    assert used[0]["usedFor"] == "k" and live_keys(store) == [used[0]["_id"]]
    assert {r.new_id for r in results if hasattr(r, "new_id")} == {used[0]["_id"]}


def test_keys_retiring_at_once_each_get_a_backup_and_their_clients_spread(sidecars):
    pool = sidecars[0]
    store = pool.store
    for k in ("k1", "k2"):  # both at their rotation point: they run out together
        store.insert_key({**new_key_doc(k, f"sk-{k}-at-once-0123456789ab", 10.0, utcnow()), "spendEstimate": 9.96})
    for i in range(2):
        store.insert_backup(f"b{i}", f"sk-backup-{i}-0123456789abcdef")
    pool.sync()
    for i in range(8):
        pool.bind(f"client-{i}", "k1" if i < 4 else "k2")
    first = pool.rotate("k1", error="budget")
    second = pool.rotate("k2", error="budget")
    assert first.promoted_backup and second.promoted_backup and first.new_id != second.new_id
    assert pool.writer.flush(10)
    on = Counter(b["openhandsKeyId"] for b in store.bindings.find())
    assert set(on) == {"b0", "b1"} and min(on.values()) >= 3, on  # never all onto one key
    assert sorted(b["usedFor"] for b in store.backups.find()) == ["k1", "k2"]


def test_clients_of_a_retired_key_spread_over_the_usable_keys_by_budget_left(sidecars):
    pool = sidecars[0]
    store = pool.store
    for k, spend in (("old", 9.96), ("roomy", 1.0), ("tight", 8.0)):
        store.insert_key({**new_key_doc(k, f"sk-{k}-spread-0123456789ab", 10.0, utcnow()), "spendEstimate": spend})
    pool.sync()
    for i in range(10):
        pool.bind(f"c{i}", "old")
    result = pool.rotate("old", error="budget")
    assert not result.promoted_backup
    on = Counter(pool.bindings[f"c{i}"] for i in range(10))
    assert on["roomy"] > on["tight"] >= 1, on  # both used, more where more budget is left
