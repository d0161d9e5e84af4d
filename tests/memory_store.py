"""An in-memory `PoolStore`: the same public interface and semantics, no database, no I/O.

Unit tests of the pool, the admin API, the commands and the request path run against it so they
stay fast (no processes). `tests/test_store_contract.py` runs one suite against this class and the
real `PoolStore` on SecantusDB; that suite is what keeps the two equal, so a change of the store's
interface or semantics must land in both (the contract test fails otherwise).

Semantics kept from MongoDB: spend only grows through `$inc`/`$max`; `transition_status`,
`reserve_replacement` and `claim_backup` are single atomic steps (one lock); metered increments are
idempotent on their op id; every read returns copies, so a caller can never edit stored state.
`down = True` makes every call fail like an unreachable MongoDB (a `PyMongoError`); clearing `gate`
makes every call wait like a hanging one.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as dt
import threading
from pathlib import Path
from typing import Any, Callable, Collection

from pymongo.errors import AutoReconnect

from addon.store.mongo import (APPLIED_OPS_WINDOW, CHANGE_MARGIN_S, PENDING, RETIRED, Snapshot, UsageOp, new_key_doc,
                               to_datetime, utcnow)

_MISSING = object()


def _cmp_key(value: Any) -> tuple[int, Any]:
    """MongoDB's cross-type order for the values this store compares: null < numbers < dates."""
    if value is None or value is _MISSING:
        return (0, 0)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value))
    if isinstance(value, dt.datetime):
        return (2, value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc))
    return (3, str(value))


def _stored(value: Any) -> Any:
    """A deep copy as BSON would keep it: datetimes in UTC, to the millisecond."""
    if isinstance(value, dt.datetime):
        value = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc).replace(microsecond=value.microsecond // 1000 * 1000)
    if isinstance(value, dict):
        return {k: _stored(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_stored(v) for v in value]
    return value


def _max(doc: dict[str, Any], name: str, value: Any) -> None:
    """`$max`: set when missing or when `value` sorts higher."""
    if name not in doc or _cmp_key(value) > _cmp_key(doc[name]):
        doc[name] = value


class MemoryLeases:
    """The slice of a pymongo collection `SpendLease` uses (`find_one_and_update`, `update_one`, `find_one`).

    Only the filter shapes the lease sends are understood: `_id`, `owner`, `expiresAt: {"$lt"}`, `$or`.
    """

    def __init__(self, store: "MemoryStore") -> None:
        self._store = store
        self._docs: dict[str, dict[str, Any]] = {}

    def _matches(self, doc: dict[str, Any], flt: dict[str, Any]) -> bool:
        for name, want in flt.items():
            if name == "$or":
                if not any(self._matches(doc, sub) for sub in want):
                    return False
            elif isinstance(want, dict) and "$lt" in want:
                have = doc.get(name, _MISSING)
                if have is _MISSING or have is None or not _cmp_key(have) < _cmp_key(want["$lt"]):
                    return False
            elif doc.get(name) != want:
                return False
        return True

    def find_one_and_update(self, flt: dict[str, Any], update: dict[str, Any], *, upsert: bool = False,
                            return_document: Any = None) -> dict[str, Any] | None:
        from pymongo.errors import DuplicateKeyError

        with self._store._op():
            doc = self._docs.get(flt["_id"])
            if doc is not None and self._matches(doc, flt):
                doc.update(_stored(update.get("$set", {})))
                return copy.deepcopy(doc)
            if doc is not None or not upsert:
                if upsert:  # the filter missed an existing _id: the upsert collides, as in MongoDB
                    raise DuplicateKeyError("E11000 duplicate key error (memory store)")
                return None
            doc = {"_id": flt["_id"], **_stored(update.get("$set", {}))}
            self._docs[flt["_id"]] = doc
            return copy.deepcopy(doc)

    def update_one(self, flt: dict[str, Any], update: dict[str, Any]) -> None:
        with self._store._op():
            doc = self._docs.get(flt.get("_id"))
            if doc is not None and self._matches(doc, flt):
                doc.update(_stored(update.get("$set", {})))

    def find_one(self, flt: dict[str, Any]) -> dict[str, Any] | None:
        with self._store._op():
            doc = self._docs.get(flt.get("_id"))
            return copy.deepcopy(doc) if doc is not None and self._matches(doc, flt) else None


class MemoryStore:
    """`addon.store.mongo.PoolStore` in memory. Thread-safe: every method is one atomic step."""

    def __init__(self, uri: str = "memory://", db_name: str = "openhands_pool", *,
                 clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.uri = uri
        self.db_name = db_name
        self.clock = clock
        self.down = False  # True: every call raises like an unreachable database
        self.calls: list[str] = []  # method names, in order (tests check what reached the "database")
        self.call_threads: list[tuple[str, str]] = []  # (method, thread name): who waited on the "database"
        self.gate = threading.Event()  # cleared: every call waits, like a hanging MongoDB
        self.gate.set()
        self._lock = threading.RLock()
        self._keys: dict[str, dict[str, Any]] = {}
        self._backups: dict[str, dict[str, Any]] = {}
        self._bindings: dict[str, dict[str, Any]] = {}
        self._history: list[dict[str, Any]] = []
        self.leases = MemoryLeases(self)
        self._pool_claim: tuple[str, dt.datetime] | None = None  # (holder, at): the pool-wide backup claim
        self._generation = 0  # keys/backups added, claimed or deleted (PoolStore's structure counter)
        self._bound_keys: set[str] = set()

    # -- plumbing -----------------------------------------------------------------------------
    class _Op:
        def __init__(self, store: "MemoryStore") -> None:
            self.store = store

        def __enter__(self) -> None:
            self.store._lock.acquire()
            if self.store.down:
                self.store._lock.release()
                raise AutoReconnect("memory store is down (simulated outage)")

        def __exit__(self, *exc: Any) -> None:
            self.store._lock.release()

    def _op(self, name: str = "") -> "MemoryStore._Op":
        if name:
            self.calls.append(name)
            self.call_threads.append((name, threading.current_thread().name))
        if not self.gate.wait(30):
            raise AutoReconnect("memory store gate stayed closed (simulated hang)")
        return MemoryStore._Op(self)

    def _now(self) -> dt.datetime:
        return _stored(self.clock())

    @staticmethod
    def _public_key(doc: dict[str, Any]) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in doc.items() if k != "appliedOps"}

    # -- connection -----------------------------------------------------------------------------
    def deadline(self, seconds: float) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def ping(self) -> None:
        from addon.store.mongo import StoreUnavailable

        if self.down:
            raise StoreUnavailable(f"MongoDB at {self.uri_for_humans()} is unreachable: AutoReconnect")

    def uri_for_humans(self) -> str:
        return self.uri

    def ensure_indexes(self, history_ttl_days: int, binding_ttl_days: int = 7) -> None:
        """No indexes to build; documents from before `updatedAt` existed get one, as in MongoDB."""
        with self._op("ensure_indexes"):
            for doc in [*self._keys.values(), *self._bindings.values()]:
                doc.setdefault("updatedAt", self._now())

    def close(self) -> None:
        pass

    # -- reads ----------------------------------------------------------------------------------
    def snapshot(self, with_bindings: bool = True, bindings_since: dt.datetime | None = None) -> Snapshot:
        with self._op("snapshot"):
            keys = [self._public_key(d) for d in self._keys.values()]
            bindings = [copy.deepcopy(b) for b in self._bindings.values() if b.get("isActive") is True
                        and (bindings_since is None or _cmp_key(b.get("updatedAt")) >= _cmp_key(bindings_since))] \
                if with_bindings else []
            unused = sum(1 for b in self._backups.values() if b.get("isUsed") is False)
            return Snapshot(keys, bindings, unused, len(self._backups), key_count=len(keys))

    def changes(self, since: dt.datetime | None, *, with_bindings: bool = True,
                generation: int | None = None) -> Snapshot:
        """Documents written since `since` (a previous `high_water`) minus the margin; everything when None.
        Counts only when the structure counter moved past `generation`."""
        high_water = self.server_time()
        gen = self.generation()
        if since is None:
            snap = self.snapshot(with_bindings=with_bindings)
            snap.high_water, snap.generation = high_water, gen
            return snap
        with self._op("changes"):
            floor = _cmp_key(since - dt.timedelta(seconds=CHANGE_MARGIN_S))
            fresh = lambda d: "updatedAt" in d and _cmp_key(d["updatedAt"]) >= floor  # noqa: E731
            keys = [self._public_key(d) for d in self._keys.values() if fresh(d)]
            bindings = [copy.deepcopy(b) for b in self._bindings.values() if b.get("isActive") is True and fresh(b)] \
                if with_bindings else []
            self._bound_keys.update(str(b["openhandsKeyId"]) for b in bindings if b.get("openhandsKeyId"))
            restructured = generation is None or gen != generation
            unused = sum(1 for b in self._backups.values() if b.get("isUsed") is False) if restructured else 0
            return Snapshot(keys, bindings, unused, len(self._backups) if restructured else 0, full=False,
                            key_count=len(self._keys) if restructured else 0, high_water=high_water,
                            generation=gen, restructured=restructured)

    def generation(self) -> int:
        with self._op("generation"):
            return self._generation

    def take_bound_keys(self) -> set[str]:
        with self._lock:
            out, self._bound_keys = self._bound_keys, set()
        return out

    def server_time(self) -> dt.datetime:
        with self._op("server_time"):
            return self._now()

    def get_binding(self, client_id: str) -> str | None:
        with self._op("get_binding"):
            b = self._bindings.get(client_id)
            return str(b["openhandsKeyId"]) if b and b.get("isActive") is True and b.get("openhandsKeyId") else None

    def touch_bindings(self, client_ids: list[str]) -> int:
        if not client_ids:
            return 0
        with self._op("touch_bindings"):
            now, touched = self._now(), 0
            for c in set(client_ids):
                if c in self._bindings:
                    self._bindings[c]["updatedAt"] = now
                    touched += 1
            return touched

    def get_key(self, key_id: str) -> dict[str, Any] | None:
        with self._op("get_key"):
            doc = self._keys.get(key_id)
            return self._public_key(doc) if doc is not None else None

    def list_backups(self) -> list[dict[str, Any]]:
        with self._op("list_backups"):
            rows = sorted(self._backups.values(), key=lambda b: _cmp_key(b.get("createdAt")))
            return [copy.deepcopy(b) for b in rows]

    def list_history(self, limit: int, key_id: str | None) -> list[dict[str, Any]]:
        with self._op("list_history"):
            rows = [r for r in self._history if not key_id or r.get("keyId") == key_id]
            rows = sorted(rows, key=lambda r: _cmp_key(r.get("checkedAt")), reverse=True)[:limit]
            return [{k: copy.deepcopy(v) for k, v in r.items() if k != "_id"} for r in rows]

    def bindings_of(self, key_id: str) -> list[str]:
        """Test helper (not part of PoolStore): client ids bound to `key_id`, active or not."""
        with self._lock:
            return sorted(c for c, b in self._bindings.items() if b.get("openhandsKeyId") == key_id)

    # -- keys -----------------------------------------------------------------------------------
    def insert_key(self, doc: dict[str, Any]) -> bool:
        with self._op("insert_key"):
            if doc["_id"] in self._keys:
                return False
            self._keys[doc["_id"]] = _stored(doc)
            self._generation += 1
            return True

    def delete_key(self, key_id: str) -> bool:
        with self._op("delete_key"):
            if self._keys.pop(key_id, None) is None:
                return False
            self._bindings = {c: b for c, b in self._bindings.items() if b.get("openhandsKeyId") != key_id}
            self._generation += 1
            return True

    def set_key_fields(self, key_id: str, fields: dict[str, Any], unset_ops: bool = False) -> bool:
        with self._op("set_key_fields"):
            doc = self._keys.get(key_id)
            if doc is None:
                return False
            doc.update(_stored(fields))
            doc["updatedAt"] = self._now()
            if unset_ops:
                doc.pop("appliedOps", None)
            return True

    def transition_status(self, key_id: str, allowed_from: list[str], fields: dict[str, Any]) -> bool:
        with self._op("transition_status"):
            doc = self._keys.get(key_id)
            if doc is None or doc.get("status") not in allowed_from:
                return False
            doc.update(_stored(fields))
            doc["updatedAt"] = self._now()  # the server stamps it, so a matched update always modifies
            return True

    def raise_spend(self, key_id: str, spend: float, extra: dict[str, Any] | None = None) -> None:
        with self._op("raise_spend"):
            doc = self._keys.get(key_id)
            if doc is None:
                return
            _max(doc, "spendEstimate", float(spend))
            if extra:
                doc.update(_stored(extra))
            doc["updatedAt"] = self._now()

    def apply_usage(self, op: UsageOp) -> None:
        with self._op("apply_usage"):
            doc = self._keys.get(op.key_id)
            if doc is None or op.op_id in doc.get("appliedOps", []):
                return
            for name, delta in (("spendEstimate", op.cost), ("tokensUsed", op.tokens), ("requestsCount", 1)):
                doc[name] = doc.get(name, 0) + delta
            _max(doc, "lastUsedAt", _stored(to_datetime(op.at)))
            doc["appliedOps"] = (doc.get("appliedOps", []) + [op.op_id])[-APPLIED_OPS_WINDOW:]
            if op.key_spend_floor is not None:
                _max(doc, "spendEstimate", op.key_spend_floor)
            doc["updatedAt"] = self._now()

    # -- bindings -------------------------------------------------------------------------------
    def bind(self, client_id: str, key_id: str) -> None:
        self.bind_many({client_id: key_id})

    def bind_many(self, binds: dict[str, str]) -> None:
        with self._op("bind_many"):
            now = self._now()
            for client_id, key_id in binds.items():
                target = self._keys.get(key_id)
                if target and target.get("status") in RETIRED and target.get("replacedBy") not in (None, PENDING):
                    key_id = str(target["replacedBy"])
                b = self._bindings.setdefault(client_id, {"clientId": client_id, "createdAt": now})
                b.update({"openhandsKeyId": key_id, "isActive": True, "updatedAt": now})

    def heal_bindings(self, key_ids: Collection[str] | None = None) -> int:
        if key_ids is not None and not key_ids:
            return 0
        with self._op("heal_bindings"):
            live = {k for k, d in self._keys.items() if d.get("status") not in RETIRED}
            healed = 0
            for key_id, doc in list(self._keys.items()):
                if doc.get("status") not in RETIRED or (key_ids is not None and key_id not in key_ids):
                    continue
                successor = doc.get("replacedBy")
                if successor in live:
                    healed += self._move(key_id, successor)
                else:
                    gone = [c for c, b in self._bindings.items() if b.get("openhandsKeyId") == key_id]
                    for c in gone:
                        del self._bindings[c]
                    healed += len(gone)
            return healed

    def _move(self, old_key: str, new_key: str) -> int:
        now, moved = self._now(), 0
        for b in self._bindings.values():
            if b.get("openhandsKeyId") == old_key:
                b.update({"openhandsKeyId": new_key, "updatedAt": now})
                moved += 1
        return moved

    def move_bindings(self, old_key: str, new_key: str) -> int:
        with self._op("move_bindings"):
            return self._move(old_key, new_key)

    # -- backups --------------------------------------------------------------------------------
    def insert_backup(self, backup_id: str, api_key: str) -> bool:
        with self._op("insert_backup"):
            if backup_id in self._backups:
                return False
            self._backups[backup_id] = {"_id": backup_id, "apiKey": api_key, "isUsed": False, "usedFor": None,
                                        "usedAt": None, "createdAt": self._now()}
            self._generation += 1
            return True

    def backup_exists(self, backup_id: str) -> bool:
        with self._op("backup_exists"):
            return backup_id in self._backups

    def delete_backup(self, backup_id: str) -> bool:
        with self._op("delete_backup"):
            deleted = self._backups.pop(backup_id, None) is not None
            self._generation += deleted
            return deleted

    def claim_backup(self, used_for: str) -> dict[str, Any] | None:
        with self._op("claim_backup"):
            free = [b for b in self._backups.values() if b.get("isUsed") is False]
            if not free:
                return None
            b = min(free, key=lambda b: (_cmp_key(b.get("createdAt")), str(b["_id"])))
            b.update({"isUsed": True, "usedFor": used_for, "usedAt": self._now()})
            self._generation += 1
            return copy.deepcopy(b)

    def reserve_replacement(self, key_id: str, stale_after_s: float = 30.0) -> bool:
        with self._op("reserve_replacement"):
            doc = self._keys.get(key_id)
            if doc is None:
                return False
            now = self._now()
            if doc.get("replacedBy") is None:
                doc.update({"replacedBy": PENDING, "replacedAt": now, "updatedAt": now})
                return True
            at = doc.get("replacedAt")
            if doc.get("replacedBy") == PENDING and at is not None \
                    and _cmp_key(at) < _cmp_key(now - dt.timedelta(seconds=stale_after_s)):
                doc.update({"replacedAt": now, "updatedAt": now})
                return True
            return False

    def reserve_pool_claim(self, holder: str, stale_after_s: float = 30.0) -> bool:
        with self._op("reserve_pool_claim"):
            now = self._now()
            held = self._pool_claim
            if (held is None or held[0] == holder
                    or _cmp_key(held[1]) < _cmp_key(now - dt.timedelta(seconds=stale_after_s))):
                self._pool_claim = (holder, now)
                return True
            return False

    def release_pool_claim(self, holder: str) -> None:
        with self._op("release_pool_claim"):
            if self._pool_claim is not None and self._pool_claim[0] == holder:
                self._pool_claim = None

    def finish_replacement(self, key_id: str, new_key_id: str | None) -> None:
        with self._op("finish_replacement"):
            doc = self._keys.get(key_id)
            if doc is not None and doc.get("replacedBy") == PENDING:
                doc.update({"replacedBy": new_key_id, "replacedAt": self._now(), "updatedAt": self._now()})

    def record_successor(self, key_id: str, new_key_id: str) -> None:
        with self._op("record_successor"):
            doc = self._keys.get(key_id)
            if doc is not None and doc.get("replacedBy") is None:
                doc.update({"replacedBy": new_key_id, "replacedAt": self._now(), "updatedAt": self._now()})

    def activate_backup(self, backup: dict[str, Any], budget_limit: float) -> None:
        with self._op("activate_backup"):
            self._activate(backup, budget_limit)

    def _activate(self, backup: dict[str, Any], budget_limit: float) -> None:
        doc = new_key_doc(str(backup["_id"]), backup["apiKey"], budget_limit, self._now())
        doc["promotedFrom"] = backup.get("usedFor")
        self._keys.setdefault(doc["_id"], _stored(doc))["updatedAt"] = self._now()
        if backup["_id"] in self._backups:  # done: deleting its key later must not revive it
            self._backups[backup["_id"]]["activatedAt"] = self._now()

    def repair(self, budget_limit: float) -> list[str]:
        with self._op("repair"):
            fixed: list[str] = []
            for backup in sorted(self._backups.values(), key=lambda b: str(b["_id"])):
                if backup.get("isUsed") is not True or backup.get("activatedAt") is not None:
                    continue
                if str(backup["_id"]) in self._keys:  # activated before `activatedAt` was recorded
                    backup["activatedAt"] = self._now()
                    continue
                self._activate(backup, budget_limit)  # claimed, then the sidecar died before activating it
                fixed.append(f"activated claimed backup {backup['_id']}")
            orphans = [c for c, b in self._bindings.items() if b.get("openhandsKeyId") not in self._keys]
            for c in orphans:
                del self._bindings[c]
            if orphans:
                fixed.append(f"dropped {len(orphans)} binding(s) to missing keys")
            return fixed

    # -- history --------------------------------------------------------------------------------
    def insert_history(self, row: dict[str, Any]) -> None:
        with self._op("insert_history"):
            if "_id" in row and any(r.get("_id") == row["_id"] for r in self._history):
                return  # replayed from the journal
            self._history.append(_stored(row))


def make_writer(store: Any, journal: Path, **kw: Any) -> Any:
    """A real `StoreWriter` over `store`, writing op by op (the memory store has no pymongo bulk write)."""
    from addon.store.writer import StoreWriter, apply_op

    return StoreWriter(store, journal, apply=lambda s, op: apply_op(s, op), **kw)
