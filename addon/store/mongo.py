"""MongoDB edge: every pymongo call of the addon lives here and runs off the event loop.

Collection and field names are the contract of DESIGN §5, shared with existing deployments.
Spend only grows through `$inc` (metered cost) and `$max` (authoritative readings) so concurrent
sidecars never lose each other's updates; metered increments carry an op id so a replay from the
journal is idempotent.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Collection

import pymongo
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError
from addon.core.status import Status

log = logging.getLogger(__name__)

KEYS = "openhands_keys"
BACKUPS = "openhands_backup_keys"
BINDINGS = "openhands_bindings"
HISTORY = "openhands_key_spend_history"
LEASES = "openhands_leases"

PENDING = "pending"  # replacedBy while one sidecar claims the key's backup
RETIRED = (Status.EXHAUSTED.value, Status.INVALID.value)
APPLIED_OPS_WINDOW = 256  # per key: enough to cover every op that can be in doubt after a crash
# Landed usage writes are remembered per key as ranges of op ids ({p: writer prefix, a: first seq, b: last
# seq}): one small entry per merged write however many ops it carries (an id array made every write
# rewrite ~10 KB and the database compare ids one by one). Ids without a sequence number use appliedOps.
APPLIED_RANGES_WINDOW = 32
# A key is read with its landed-write ranges (`writer_marks`: which of a peer's fresh spend the copy holds),
# not with the older per-op ids.
KEY_PROJECTION = {"appliedOps": 0}


def op_position(op_id: str) -> tuple[str, int] | None:
    """`<writer prefix>-<seq>` -> (prefix, seq); None for any other id."""
    head, sep, tail = op_id.rpartition("-")
    if not sep or not head or not tail.isdigit() or len(tail) > 18:
        return None
    return head, int(tail)


def writer_marks(doc: dict[str, Any]) -> dict[str, int]:
    """Per writer prefix, the last sequence number of its usage ops this copy of a key document holds
    (a writer's ops for a key land in sequence order, so every one up to it is in the copy)."""
    out: dict[str, int] = {}
    ranges = doc.get("appliedRanges")
    for r in ranges if isinstance(ranges, list) else ():
        if isinstance(r, dict) and isinstance(r.get("p"), str) and isinstance(r.get("b"), int):
            if r["b"] > out.get(r["p"], -1):
                out[r["p"]] = r["b"]
    return out


def usage_guard(ids: list[str]) -> dict[str, Any]:
    """The filter that lets a merged usage write land once: it is all-or-nothing and only ever retried
    as it was (replays leave applied ops out first), so its first id tells whether it landed."""
    first = ids[0]
    guard: dict[str, Any] = {"appliedOps": {"$ne": first}}
    pos = op_position(first)
    if pos is not None:
        guard["appliedRanges"] = {"$not": {"$elemMatch": {"p": pos[0], "a": {"$lte": pos[1]}, "b": {"$gte": pos[1]}}}}
    return guard


def usage_record(ids: list[str]) -> dict[str, Any]:
    """The `$push` that remembers a merged write's ids: one range per writer prefix (a key's usage ops
    of one writer are queued in sequence order, so every op of that writer for the key between its
    first and last sequence number is in the write), or the ids themselves if any has no position."""
    spans: dict[str, list[int]] = {}
    for op_id in ids:
        pos = op_position(op_id)
        if pos is None:
            return {"appliedOps": {"$each": list(ids), "$slice": -APPLIED_OPS_WINDOW}}
        span = spans.get(pos[0])
        if span is None:
            spans[pos[0]] = [pos[1], pos[1]]
        else:
            span[0], span[1] = min(span[0], pos[1]), max(span[1], pos[1])
    ranges = [{"p": p, "a": a, "b": b} for p, (a, b) in spans.items()]
    return {"appliedRanges": {"$each": ranges, "$slice": -APPLIED_RANGES_WINDOW}}


def landed_ids(doc: dict[str, Any], ids: list[str]) -> set[str]:
    """Which of `ids` a key document remembers as applied (either form)."""
    listed = set(doc.get("appliedOps") or ())
    ranges: dict[str, list[tuple[int, int]]] = {}
    for r in doc.get("appliedRanges") or ():
        if isinstance(r, dict) and isinstance(r.get("a"), int) and isinstance(r.get("b"), int):
            ranges.setdefault(str(r.get("p")), []).append((r["a"], r["b"]))
    out = set()
    for op_id in ids:
        if op_id in listed:
            out.add(op_id)
            continue
        pos = op_position(op_id)
        if pos is not None and any(a <= pos[1] <= b for a, b in ranges.get(pos[0], ())):
            out.add(op_id)
    return out


DatabaseError = PyMongoError  # what callers outside the store catch: only this package imports pymongo


class StoreUnavailable(RuntimeError):
    """The database cannot be reached; the message is one line for the operator."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def to_datetime(epoch: float | None) -> dt.datetime | None:
    return None if epoch is None else dt.datetime.fromtimestamp(epoch, dt.timezone.utc)


DATE_FIELDS = frozenset({"lastUsedAt", "cooldownUntil", "lastSpendCheck", "checkedAt", "rotatedAt"})


def with_dates(fields: dict[str, Any] | None) -> dict[str, Any] | None:
    """Epoch floats of date fields become BSON dates at the edge (ops travel JSON-safe until here)."""
    if fields is None:
        return None
    return {k: (to_datetime(v) if k in DATE_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool)
                else v) for k, v in fields.items()}


def to_epoch(value: Any) -> float | None:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def new_key_doc(key_id: str, api_key: str, budget_limit: float, now: dt.datetime) -> dict[str, Any]:
    return {
        "_id": key_id,
        "apiKey": api_key,
        "status": Status.HEALTHY.value,
        "tokensUsed": 0,
        "requestsCount": 0,
        "lastError": None,
        "cooldownUntil": None,
        "createdAt": now,
        "lastUsedAt": None,
        "spendEstimate": 0.0,
        "budgetLimit": float(budget_limit),
        "totalSpend": 0.0,
        "lastSpendCheck": None,
        "updatedAt": now,
    }


@dataclass
class UsageOp:
    """One metered response, applied exactly once even if replayed."""

    op_id: str
    key_id: str
    cost: float
    tokens: int
    at: float
    key_spend_floor: float | None = None  # x-litellm-key-spend + this response's cost

    def to_json(self) -> dict[str, Any]:
        return {"kind": "usage", **self.__dict__}


@dataclass
class Snapshot:
    keys: list[dict[str, Any]] = field(default_factory=list)
    bindings: list[dict[str, Any]] = field(default_factory=list)
    backups_unused: int = 0
    backups_total: int = 0
    full: bool = True  # False: `keys`/`bindings` hold only documents written since the last read
    key_count: int = 0  # documents in the keys collection (in a delta: counted only when `restructured`)
    high_water: dt.datetime | None = None  # the server's clock when read: pass it to the next `changes`
    generation: int = 0  # the pool's structure counter when read: pass it to the next `changes`
    # A delta: keys or backups were added, claimed or deleted since the caller's `generation` (then the
    # backup counts and `key_count` are filled in and the reader should re-read every key); False: none
    # were, nothing was counted, and the caller's counts still hold.
    restructured: bool = True


BINDING_WARM_S = 3 * 3600.0  # a start loads the bindings written (or touched, hourly) within this window
CHANGE_MARGIN_S = 5.0  # re-read this much before the last read: writes in flight then, modest clock skew
UPDATED = {"$currentDate": {"updatedAt": True}}  # the server's clock: one clock for every sidecar
GENERATION_ID = "pool-generation"  # in LEASES: `n` grows on every key or backup added, claimed or deleted


class PoolStore:
    def __init__(self, uri: str, db_name: str, *, timeout_ms: int = 3000) -> None:
        self.uri = uri
        self.client: pymongo.MongoClient = pymongo.MongoClient(
            uri,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            socketTimeoutMS=max(timeout_ms, 5000),
            retryWrites=False,
            tz_aware=True,
            appname="openhands-key-pool",
        )
        self.db = self.client[db_name]
        self.change_margin_s = CHANGE_MARGIN_S
        self.binding_warm_s = BINDING_WARM_S
        self.keys = self.db[KEYS]
        self.backups = self.db[BACKUPS]
        self.bindings = self.db[BINDINGS]
        self.history = self.db[HISTORY]
        self.leases = self.db[LEASES]
        self._bound_lock = threading.Lock()
        self._bound_keys: set[str] = set()  # keys the binding deltas read since `take_bound_keys`

    def deadline(self, seconds: float) -> contextlib.AbstractContextManager[Any]:
        """Every operation inside, connection checkout included, ends by `seconds` from now (pymongo's
        client-side timeout): a hung database answers an admin caller in bounded time, not per step."""
        return pymongo.timeout(seconds)

    def ping(self) -> None:
        try:
            self.client.admin.command("ping")
        except PyMongoError as e:
            raise StoreUnavailable(
                f"MongoDB at {self.uri_for_humans()} is unreachable: {e.__class__.__name__}") from None

    def uri_for_humans(self) -> str:
        from addon.core.config import mask_uri

        return mask_uri(self.uri)

    def ensure_indexes(self, history_ttl_days: int, binding_ttl_days: int = 7) -> None:
        with pymongo.timeout(600):  # first builds over a large deployment's collections take a while
            self._ensure_indexes(history_ttl_days, binding_ttl_days)

    def _ensure_indexes(self, history_ttl_days: int, binding_ttl_days: int) -> None:
        self.bindings.create_index("clientId", unique=True)
        self.bindings.create_index("openhandsKeyId")
        self.keys.create_index("status")
        if "ttl_updatedAt" not in {ix["name"] for ix in self.bindings.list_indexes()}:
            # Once, on a deployment from before `updatedAt`: stamp every document so it can expire and
            # shows up in deltas (a full scan, so not at every start).
            self.keys.update_many({"updatedAt": {"$exists": False}}, UPDATED)
            self.bindings.update_many({"updatedAt": {"$exists": False}}, UPDATED)
        self.keys.create_index("updatedAt")
        self._ttl_index(self.bindings, BINDINGS, "updatedAt", "ttl_updatedAt", binding_ttl_days)
        self.backups.create_index([("isUsed", 1), ("createdAt", 1)])
        self.history.create_index([("keyId", 1), ("checkedAt", -1)])
        self._ttl_index(self.history, HISTORY, "checkedAt", "ttl_checkedAt", history_ttl_days)

    def _ttl_index(self, coll: Any, coll_name: str, field_name: str, name: str, days: float) -> None:
        try:
            coll.create_index(field_name, expireAfterSeconds=int(days * 86400), name=name)
        except PyMongoError:  # an existing TTL index with another period: adjust it in place
            self.db.command("collMod", coll_name, index={"name": name, "expireAfterSeconds": int(days * 86400)})

    def close(self) -> None:
        self.client.close()

    # -- reads ------------------------------------------------------------------------------
    def snapshot(self, with_bindings: bool = True, bindings_since: dt.datetime | None = None) -> Snapshot:
        """Everything; with `bindings_since`, only the bindings written since then (recently active clients)."""
        keys = list(self.keys.find({}, KEY_PROJECTION))
        query: dict[str, Any] = {"isActive": True}
        if bindings_since is not None:
            query["updatedAt"] = {"$gte": bindings_since}
        bindings = list(self.bindings.find(query, {"_id": 0})) if with_bindings else []
        unused = self.backups.count_documents({"isUsed": False})
        total = self.backups.count_documents({})
        return Snapshot(keys, bindings, unused, total, key_count=len(keys))

    def changes(self, since: dt.datetime | None, *, with_bindings: bool = True,
                generation: int | None = None) -> Snapshot:
        """What was written since `since` (a previous `high_water`); everything when None.

        Cost follows activity: the server's clock, one `_id` read (the pool's structure counter) and two
        range reads on the `updatedAt` indexes, which return nothing when nothing changed, whatever the
        number of keys, bindings or history rows. Nothing is counted unless the structure counter moved
        past `generation` (a key or backup added, claimed or deleted: deletions show in no delta).
        """
        high_water = self.server_time()
        gen = self.generation()  # before the reads: a change that lands after them moves it again
        if since is None:
            # Bindings of clients active within BINDING_WARM_S only: an idle client's key has no prompt
            # cache left, so it simply gets a fresh choice (and a sidecar never loads its whole history).
            snap = self.snapshot(with_bindings=with_bindings,
                                 bindings_since=high_water - dt.timedelta(seconds=self.binding_warm_s))
            snap.high_water, snap.generation = high_water, gen
            return snap
        window = {"updatedAt": {"$gte": since - dt.timedelta(seconds=self.change_margin_s)}}
        keys = list(self.keys.find(window, KEY_PROJECTION))
        bindings = list(self.bindings.find({**window, "isActive": True}, {"_id": 0})) if with_bindings else []
        self._note_bound(bindings)
        restructured = generation is None or gen != generation
        unused = total = key_count = 0
        if restructured:
            unused = self.backups.count_documents({"isUsed": False})
            total = self.backups.count_documents({})
            key_count = self.keys.count_documents({})
        return Snapshot(keys, bindings, unused, total, full=False, key_count=key_count, high_water=high_water,
                        generation=gen, restructured=restructured)

    def generation(self) -> int:
        """The pool's structure counter (one `_id` read); 0 before the first structural change."""
        doc = self.leases.find_one({"_id": GENERATION_ID}, {"n": 1})
        n = doc.get("n") if doc else None
        return int(n) if isinstance(n, int) and not isinstance(n, bool) else 0

    def _restructured(self) -> None:
        """A key or backup was added, claimed or deleted: every sidecar's next delta re-counts."""
        self.leases.update_one({"_id": GENERATION_ID}, {"$inc": {"n": 1}}, upsert=True)

    def _note_bound(self, bindings: list[dict[str, Any]]) -> None:
        with self._bound_lock:
            self._bound_keys.update(str(b["openhandsKeyId"]) for b in bindings if b.get("openhandsKeyId"))

    def take_bound_keys(self) -> set[str]:
        """The keys that recently written bindings point at (read by the deltas since the last call):
        the only candidates for `heal_bindings` between its full passes."""
        with self._bound_lock:
            out, self._bound_keys = self._bound_keys, set()
        return out

    def server_time(self) -> dt.datetime:
        """The database's clock (`hello.localTime`), which stamps every `updatedAt`."""
        now = self.client.admin.command("hello").get("localTime")
        if isinstance(now, dt.datetime):
            return now if now.tzinfo else now.replace(tzinfo=dt.timezone.utc)
        return utcnow()

    def get_binding(self, client_id: str) -> str | None:
        """One client's key, read when the client is first seen (bindings are not all held in memory)."""
        doc = self.bindings.find_one({"clientId": client_id, "isActive": True}, {"openhandsKeyId": 1})
        return str(doc["openhandsKeyId"]) if doc and doc.get("openhandsKeyId") else None

    def touch_bindings(self, client_ids: list[str]) -> int:
        """Clients still in use keep their binding past the TTL (it counts from the last update)."""
        if not client_ids:
            return 0
        return self.bindings.update_many({"clientId": {"$in": list(client_ids)}}, UPDATED).modified_count

    def get_key(self, key_id: str) -> dict[str, Any] | None:
        return self.keys.find_one({"_id": key_id}, KEY_PROJECTION)

    def list_backups(self) -> list[dict[str, Any]]:
        return list(self.backups.find({}).sort("createdAt", 1))

    def list_history(self, limit: int, key_id: str | None) -> list[dict[str, Any]]:
        query = {"keyId": key_id} if key_id else {}
        return list(self.history.find(query, {"_id": 0}).sort("checkedAt", -1).limit(limit))

    # -- keys -------------------------------------------------------------------------------
    def insert_key(self, doc: dict[str, Any]) -> bool:
        try:
            self.keys.insert_one(doc)
        except DuplicateKeyError:
            return False
        self._restructured()
        return True

    def delete_key(self, key_id: str) -> bool:
        deleted = self.keys.delete_one({"_id": key_id}).deleted_count == 1
        if deleted:
            self.bindings.delete_many({"openhandsKeyId": key_id})
            self._restructured()
        return deleted

    def set_key_fields(self, key_id: str, fields: dict[str, Any], unset_ops: bool = False) -> bool:
        update: dict[str, Any] = {"$set": fields, **UPDATED}
        if unset_ops:
            update["$unset"] = {"appliedOps": "", "appliedRanges": ""}
        return self.keys.update_one({"_id": key_id}, update).matched_count == 1

    def transition_status(self, key_id: str, allowed_from: list[str], fields: dict[str, Any]) -> bool:
        """Atomic compare-and-set on `status`: the one caller that wins owns the follow-up step."""
        res = self.keys.update_one({"_id": key_id, "status": {"$in": allowed_from}}, {"$set": fields, **UPDATED})
        return res.modified_count == 1

    def raise_spend(self, key_id: str, spend: float, extra: dict[str, Any] | None = None) -> None:
        update: dict[str, Any] = {"$max": {"spendEstimate": float(spend)}, **UPDATED}
        if extra:
            update["$set"] = extra
        self.keys.update_one({"_id": key_id}, update)

    def apply_usage(self, op: UsageOp) -> None:
        """Idempotent: the op id is remembered on the key, so a replayed op changes nothing."""
        update: dict[str, Any] = {
            "$inc": {"spendEstimate": op.cost, "tokensUsed": op.tokens, "requestsCount": 1},
            "$max": {"lastUsedAt": to_datetime(op.at)},
            "$push": usage_record([op.op_id]),
            **UPDATED,
        }
        res = self.keys.update_one({"_id": op.key_id, **usage_guard([op.op_id])}, update)
        if op.key_spend_floor is not None and res.matched_count:
            self.keys.update_one({"_id": op.key_id}, {"$max": {"spendEstimate": op.key_spend_floor}, **UPDATED})

    # -- bindings ---------------------------------------------------------------------------
    def bind(self, client_id: str, key_id: str) -> None:
        """Upsert a binding; a write queued before a peer retired the key follows the key's successor."""
        self.bind_many({client_id: key_id})

    def bind_many(self, binds: dict[str, str]) -> None:
        """`bind` for a batch: one read of the targets, one bulk write."""
        from pymongo import UpdateOne

        targets = {d["_id"]: d for d in self.keys.find({"_id": {"$in": list(set(binds.values()))}},
                                                       {"status": 1, "replacedBy": 1})}
        now = utcnow()
        writes = []
        for client_id, key_id in binds.items():
            target = targets.get(key_id)
            if target and target.get("status") in RETIRED and target.get("replacedBy") not in (None, PENDING):
                key_id = str(target["replacedBy"])
            writes.append(UpdateOne({"clientId": client_id},
                                    {"$set": {"openhandsKeyId": key_id, "isActive": True}, **UPDATED,
                                     "$setOnInsert": {"createdAt": now}}, upsert=True))
        self.bindings.bulk_write(writes, ordered=False)

    def heal_bindings(self, key_ids: Collection[str] | None = None) -> int:
        """Bindings left on retired keys (a race with a peer's rotation) move to the successor or go.

        With `key_ids` (the keys recent bindings point at, `take_bound_keys`) only those are looked at,
        so the periodic pass costs nothing while no binding is written; None looks at every retired key.
        A dropped binding only means that client gets a fresh key choice on its next request.
        """
        healed = 0
        query: dict[str, Any] = {"status": {"$in": list(RETIRED)}}
        if key_ids is not None:
            if not key_ids:
                return 0
            query["_id"] = {"$in": sorted(key_ids)}
        retired = list(self.keys.find(query, {"replacedBy": 1}))
        if not retired:
            return 0
        stuck = set(self.bindings.distinct("openhandsKeyId", {"openhandsKeyId": {"$in": [d["_id"] for d in retired]}}))
        retired = [d for d in retired if d["_id"] in stuck]
        successors = [d.get("replacedBy") for d in retired if d.get("replacedBy") not in (None, PENDING)]
        live = {d["_id"] for d in self.keys.find({"_id": {"$in": successors}, "status": {"$nin": list(RETIRED)}},
                                                 {"_id": 1})} if successors else set()
        for doc in retired:
            successor = doc.get("replacedBy")
            if successor in live:
                healed += self.move_bindings(doc["_id"], successor)
            else:
                healed += self.bindings.delete_many({"openhandsKeyId": doc["_id"]}).deleted_count
        return healed

    def move_bindings(self, old_key: str, new_key: str) -> int:
        return self.bindings.update_many(
            {"openhandsKeyId": old_key}, {"$set": {"openhandsKeyId": new_key}, **UPDATED}
        ).modified_count

    # -- backups ----------------------------------------------------------------------------
    def insert_backup(self, backup_id: str, api_key: str) -> bool:
        try:
            self.backups.insert_one({"_id": backup_id, "apiKey": api_key, "isUsed": False, "usedFor": None,
                                     "usedAt": None, "createdAt": utcnow()})
        except DuplicateKeyError:
            return False
        self._restructured()
        return True

    def backup_exists(self, backup_id: str) -> bool:
        return self.backups.count_documents({"_id": backup_id}, limit=1) > 0

    def delete_backup(self, backup_id: str) -> bool:
        deleted = self.backups.delete_one({"_id": backup_id}).deleted_count == 1
        if deleted:
            self._restructured()
        return deleted

    def claim_backup(self, used_for: str) -> dict[str, Any] | None:
        """One atomic find_one_and_update: two racing claimers never get the same backup."""
        doc = self.backups.find_one_and_update(
            {"isUsed": False},
            {"$set": {"isUsed": True, "usedFor": used_for, "usedAt": utcnow()}},
            sort=[("createdAt", 1), ("_id", 1)],
            return_document=ReturnDocument.AFTER,
        )
        if doc is not None:
            self._restructured()
        return doc

    def reserve_replacement(self, key_id: str, stale_after_s: float = 30.0) -> bool:
        """Atomic per-key mutex for claiming its backup: exactly one caller, in any sidecar, wins.

        A reservation left by a crashed sidecar goes stale and may be taken over.
        """
        now = utcnow()
        res = self.keys.update_one({"_id": key_id, "replacedBy": None},
                                   {"$set": {"replacedBy": PENDING, "replacedAt": now}, **UPDATED})
        if res.modified_count == 1:
            return True
        stale = now - dt.timedelta(seconds=stale_after_s)
        res = self.keys.update_one({"_id": key_id, "replacedBy": PENDING, "replacedAt": {"$lt": stale}},
                                   {"$set": {"replacedAt": now}, **UPDATED})
        return res.modified_count == 1

    def reserve_pool_claim(self, holder: str, stale_after_s: float = 30.0) -> bool:
        """Pool-wide mutex for a backup claimed with no retired key to reserve (`usedFor: pool`): two
        sidecars that both see an empty pool promote one backup, not two. A crashed holder's goes stale."""
        now = utcnow()
        free = {"$or": [{"holder": None}, {"at": {"$lt": now - dt.timedelta(seconds=stale_after_s)}}]}
        try:
            doc = self.leases.find_one_and_update({"_id": "pool-claim", **free},
                                                  {"$set": {"holder": holder, "at": now}},
                                                  upsert=True, return_document=ReturnDocument.AFTER)
        except DuplicateKeyError:  # held by someone else (the upsert found no free document)
            return False
        return doc is not None and doc.get("holder") == holder

    def release_pool_claim(self, holder: str) -> None:
        self.leases.update_one({"_id": "pool-claim", "holder": holder}, {"$set": {"holder": None}})

    def finish_replacement(self, key_id: str, new_key_id: str | None) -> None:
        """Record the successor, or release the reservation when no backup was left."""
        self.keys.update_one({"_id": key_id, "replacedBy": PENDING},
                             {"$set": {"replacedBy": new_key_id, "replacedAt": utcnow()}, **UPDATED})

    def record_successor(self, key_id: str, new_key_id: str) -> None:
        """A retired key moved to an existing key: remember where its clients went (first writer wins)."""
        self.keys.update_one({"_id": key_id, "replacedBy": None}, {"$set": {"replacedBy": new_key_id,
                                                                            "replacedAt": utcnow()}, **UPDATED})

    def activate_backup(self, backup: dict[str, Any], budget_limit: float) -> None:
        """Insert the claimed backup as a healthy key; idempotent so a re-run can finish it."""
        doc = new_key_doc(str(backup["_id"]), backup["apiKey"], budget_limit, utcnow())
        doc["promotedFrom"] = backup.get("usedFor")
        doc.pop("updatedAt")  # set by the server below
        self.keys.update_one({"_id": doc["_id"]}, {"$setOnInsert": doc, **UPDATED}, upsert=True)
        # Once its key exists, a claimed backup is done: deleting that key later must not revive it.
        self.backups.update_one({"_id": backup["_id"]}, {"$set": {"activatedAt": utcnow()}})

    def repair(self, budget_limit: float) -> list[str]:
        """Finish rotations a crash left half-done: claimed backups with no key, bindings to nothing.

        Once per start; the binding pass reads the `openhandsKeyId` index whole, seconds at 100,000
        bindings on a slow server, so it gets a long deadline instead of the per-operation timeout."""
        with pymongo.timeout(300):
            return self._repair(budget_limit)

    def _repair(self, budget_limit: float) -> list[str]:
        fixed: list[str] = []
        existing = {d["_id"] for d in self.keys.find({}, {"_id": 1})}
        for backup in self.backups.find({"isUsed": True, "activatedAt": None}):
            if str(backup["_id"]) in existing:  # activated before `activatedAt` was recorded
                self.backups.update_one({"_id": backup["_id"]}, {"$set": {"activatedAt": utcnow()}})
                continue
            self.activate_backup(backup, budget_limit)  # claimed, then the sidecar died before activating it
            existing.add(str(backup["_id"]))
            fixed.append(f"activated claimed backup {backup['_id']}")
        # One indexed `distinct` instead of a `$nin` scan over every binding (minutes at 100,000).
        missing = [k for k in self.bindings.distinct("openhandsKeyId") if k not in existing]
        if missing:
            dropped = self.bindings.delete_many({"openhandsKeyId": {"$in": missing}}).deleted_count
            fixed.append(f"dropped {dropped} binding(s) to missing keys")
        return fixed

    # -- history ----------------------------------------------------------------------------
    def insert_history(self, row: dict[str, Any]) -> None:
        try:
            self.history.insert_one(row)
        except DuplicateKeyError:  # replayed from the journal
            pass
