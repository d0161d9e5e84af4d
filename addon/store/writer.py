"""Write-behind queue: hooks enqueue, one thread writes to MongoDB, outages cost nothing.

Hooks never wait for the database. Every op is first appended to a local write-ahead journal
(`journal.py`: one write to the OS, fsync every 100 ms), then queued; one thread writes batches to
MongoDB and acknowledges them in the journal. While MongoDB is away the ops wait in the bounded queue
and are written, in order, when it returns; if the process stops or is killed first, the next start
replays the journal. Usage ops carry an id and are applied idempotently, so a replay never counts twice.
"""
from __future__ import annotations

import collections
import json
import logging
from math import isfinite as _isfinite
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from pymongo.errors import PyMongoError

from addon.store.journal import Journal, orphans
from addon.store.mongo import (UPDATED, PoolStore, UsageOp, landed_ids, to_datetime, usage_guard, usage_record,
                               with_dates)

log = logging.getLogger(__name__)

Op = dict[str, Any]  # JSON-safe: {"kind": ..., ...}; datetimes travel as epoch floats


def apply_op(store: PoolStore, op: Op) -> None:
    kind = op["kind"]
    if kind == "usage":
        fields = {k: op[k] for k in ("op_id", "key_id", "cost", "tokens", "at", "key_spend_floor")}
        store.apply_usage(UsageOp(**fields))
    elif kind == "raise_spend":
        store.raise_spend(op["key_id"], op["spend"], with_dates(op.get("set")))
    elif kind == "set":
        store.set_key_fields(op["key_id"], with_dates(op["set"]) or {})
    elif kind == "bind":
        store.bind(op["client_id"], op["key_id"])
    elif kind == "history":
        store.insert_history(with_dates(op["row"]) or {})
    elif kind == "touch":
        store.touch_bindings(list(op["clients"]))
    else:
        log.error("dropping unknown store op kind %r", kind)


MAX_BATCH = 1000  # ops per round trip (a merged write is remembered as id ranges, whatever its size)
REPLAY_BATCH = 200  # a start-up replay writes (and acknowledges) in these steps
# How long a batch may gather ops before it is written. Persistence does not wait for it (the journal
# has every op at once; peers count our unwritten spend through the shared reservations), so it is
# set for the database's sake: one round trip a second carrying about one update per key in use,
# whatever the request rate (each update costs SecantusDB ~2 ms of CPU, on the cores the proxy uses).
# `flush` and `stop` cut it short.
LINGER_S = 1.0


def plan_batch(ops: list[Op]) -> tuple[list[tuple[str, Any]], dict[str, str], list[dict[str, Any]]]:
    """Fold a run of queued ops into few writes, keeping per-key order.

    Usage ops for one key merge into one idempotent increment (all their ids are remembered), unless
    another op for that key came in between; binds collapse to the last one per client.
    Returns (key writes in order, binds, history rows).
    """
    key_writes: list[tuple[str, Any]] = []
    open_usage: dict[str, int] = {}
    binds: dict[str, str] = {}
    history: list[dict[str, Any]] = []
    for op in ops:
        kind = op["kind"]
        if kind == "usage":
            i = open_usage.get(op["key_id"])
            if i is None:
                open_usage[op["key_id"]] = len(key_writes)
                key_writes.append(("usage", {"key_id": op["key_id"], "cost": op["cost"], "tokens": op["tokens"],
                                             "count": 1, "at": op["at"], "floor": op.get("key_spend_floor"),
                                             "ids": [op["op_id"]]}))
            else:
                merged = key_writes[i][1]
                merged["cost"] += op["cost"]
                merged["tokens"] += op["tokens"]
                merged["count"] += 1
                merged["at"] = max(merged["at"], op["at"])
                floor = op.get("key_spend_floor")
                if floor is not None:
                    merged["floor"] = floor if merged["floor"] is None else max(merged["floor"], floor)
                merged["ids"].append(op["op_id"])
        elif kind in ("raise_spend", "set"):
            open_usage.pop(op["key_id"], None)
            key_writes.append((kind, op))
        elif kind == "bind":
            binds.pop(op["client_id"], None)
            binds[op["client_id"]] = op["key_id"]
        elif kind == "history":
            history.append(op["row"])
        elif kind == "touch":
            pass  # applied on its own by apply_batch (after the binds)
        else:
            log.error("dropping unknown store op kind %r", kind)
    return key_writes, binds, history


def apply_batch(store: PoolStore, ops: list[Op]) -> None:
    """One bulk write per collection; safe to repeat after a failure (every step is idempotent)."""
    from pymongo import UpdateOne

    key_writes, binds, history = plan_batch(ops)
    requests: list[UpdateOne] = []
    for kind, w in key_writes:
        if kind == "usage":
            # Landed once (mongo.usage_guard: its first id; SecantusDB spent ~80 % of its CPU under load
            # comparing every id of a group with each remembered one); remembered as id ranges.
            requests.append(UpdateOne(
                {"_id": w["key_id"], **usage_guard(w["ids"])},
                {"$inc": {"spendEstimate": w["cost"], "tokensUsed": w["tokens"], "requestsCount": w["count"]},
                 "$max": {"lastUsedAt": to_datetime(w["at"])},
                 "$push": usage_record(w["ids"]), **UPDATED}))
            if w["floor"] is not None:
                requests.append(UpdateOne({"_id": w["key_id"]}, {"$max": {"spendEstimate": w["floor"]}, **UPDATED}))
        elif kind == "raise_spend":
            update: dict[str, Any] = {"$max": {"spendEstimate": float(w["spend"])}, **UPDATED}
            if w.get("set"):
                update["$set"] = with_dates(w["set"])
            requests.append(UpdateOne({"_id": w["key_id"]}, update))
        else:
            requests.append(UpdateOne({"_id": w["key_id"]}, {"$set": with_dates(w["set"]) or {}, **UPDATED}))
    if requests:
        store.keys.bulk_write(requests, ordered=True)
    if binds:
        store.bind_many(binds)
    for row in history:
        store.insert_history(with_dates(row) or {})
    touched = sorted({c for op in ops if op["kind"] == "touch" for c in op["clients"]})
    if touched:
        store.touch_bindings(touched)


class StoreWriter:
    """The write-behind queue with a write-ahead journal in front of it.

    `journal_path` names the pre-journal single file (`journal-<db>.jsonl`, replayed if present); the
    journal itself lives in the directory of the same name without the suffix (see `journal.py`).
    """

    def __init__(self, store: PoolStore, journal_path: Path, *, max_queue: int = 200_000,
                 apply: Callable[[PoolStore, Op], None] = apply_op, fsync_interval_s: float = 0.1,
                 journal_max_bytes: int = 256 << 20) -> None:
        self.store = store
        self.journal_path = journal_path
        self.journal_root = journal_path.with_suffix("")
        self.journal = Journal(self.journal_root, fsync_interval_s=fsync_interval_s, max_bytes=journal_max_bytes)
        self.max_queue = max_queue
        self._apply = apply
        self._queue: collections.deque[Op] = collections.deque()
        # The condition's own lock, held directly on the request path (`with self._lock` is a C call;
        # `with self._cond` goes through two Python-level methods of `Condition`).
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending_cost: dict[str, float] = collections.defaultdict(float)
        self.outage_since: float | None = None
        self.written = 0
        self.dropped = 0
        self.spilled = 0
        self.recheck_keys: set[str] = set()  # keys in use at an unclean stop (see `_recheck`)

    # -- producer side (any thread, never blocks on MongoDB) ----------------------------------
    def submit(self, op: Op) -> None:
        """Journal the op (in the OS at once, see journal.py), then queue it for MongoDB."""
        kind = op["kind"]
        if kind == "usage":
            # (the op itself is queued: its figures are only read)
            self.submit_usage(op["key_id"], op["cost"], op.get("tokens", 0), op.get("at", 0.0),
                              op.get("key_spend_floor"), op.get("op_id", ""), op)
            return
        if kind == "history" and isinstance(op.get("row"), dict):
            op["row"].setdefault("_id", uuid.uuid4().hex)  # a replayed row is then inserted once
        lock = self._lock
        lock.acquire()  # (`with` costs twice the instructions of the two calls)
        try:
            seq = self.journal.append(op)
            if seq is not None:
                op["_seq"] = seq
            if len(self._queue) >= self.max_queue:
                self._make_room()
            self._queue.append(op)
            n = len(self._queue)
            if n == 1 or n == MAX_BATCH:  # the first op, or a full batch: the writer stops lingering
                self._cond.notify()  # waking the writer for every op would cost the event loop GIL hand-offs
        finally:
            lock.release()

    def submit_usage(self, key_id: str, cost: float, tokens: int, at: float, key_spend_floor: float | None,
                     op_id: str, op: Op | None = None) -> Op:
        """`submit(usage_op(...))` in one step, the request path's form (one per metered answer; `op`: that op
        already built): journaled (by the journal's fast line when its figures are real numbers, checked here),
        queued, its cost pending on the key. Returns the op."""
        fast = False  # an op built elsewhere may hold anything: the journal checks its fields
        if op is None:
            op = usage_op(key_id, cost, tokens, at, key_spend_floor, op_id)
            try:  # real figures (NaN fails it, infinities too): the journal's fast line; else its general encoder
                fast = _isfinite(cost + at + tokens) and (key_spend_floor is None or _isfinite(key_spend_floor))
            except (TypeError, OverflowError):
                pass
        lock = self._lock
        lock.acquire()  # (`with` costs twice the instructions of the two calls: this runs per answer)
        try:
            seq = self.journal.append(op, fast)
            if seq is not None:
                op["_seq"] = seq
            queue = self._queue
            if len(queue) >= self.max_queue:
                self._make_room()
            queue.append(op)
            self._pending_cost[key_id] += cost
            n = len(queue)
            if n == 1 or n == MAX_BATCH:  # the first op, or a full batch: the writer stops lingering
                self._cond.notify()  # waking the writer for every op would cost the event loop GIL hand-offs
        finally:
            lock.release()
        return op

    def _make_room(self) -> None:
        """The queue is full (caller holds the lock): bounded memory keeps the money (usage ops) and sheds the
        oldest bookkeeping op (never one of the batch being written: its acknowledgement would then be
        counted twice)."""
        skip = len(self._inflight) if self._inflight is not None else 0
        for i in range(skip, len(self._queue)):
            queued = self._queue[i]
            if queued["kind"] != "usage":
                del self._queue[i]
                self.journal.ack([queued.get("_seq", 0)])  # dropped on purpose: not replayed either
                self.dropped += 1
                break
        else:
            if skip < len(self._queue):
                # Memory is full of money: the oldest usage op now lives in the journal only and is
                # written by the next start's replay.
                oldest = self._queue[skip]
                del self._queue[skip]
                self.spilled += 1
                self.dropped += 1
                if "_seq" not in oldest:
                    log.error("💾 [OpenHands/Store] queue and journal full: a metered update was lost")

    def queued_ops(self) -> list[Op]:
        """A copy of what is not yet written, oldest first: the pool lays it over a fresh read."""
        with self._cond:
            return list(self._queue)

    def pending_cost(self, key_id: str) -> float:
        with self._cond:
            return self._pending_cost.get(key_id, 0.0)

    @property
    def backlog(self) -> int:
        return len(self._queue)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self.journal.start()
        self._thread = threading.Thread(target=self._run, name="openhands-store-writer", daemon=True)
        self._thread.start()

    def stop(self, flush_timeout: float = 5.0) -> None:
        """Flush what the database takes within the timeout; the rest is already in the journal."""
        deadline = time.monotonic() + flush_timeout
        with self._cond:
            while self._queue and self.outage_since is None and time.monotonic() < deadline:
                self._hurry = True  # no lingering for more ops: the process is stopping
                self._cond.notify_all()
                self._cond.wait(0.05)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread:
            self._thread.join(timeout=max(0.5, deadline - time.monotonic()) + 2)
        with self._cond:
            rest = list(self._queue)
            self._queue.clear()
        lost = sum(1 for op in rest if "_seq" not in op)
        left = self.journal.close()
        if rest or left:
            log.warning("💾 [OpenHands/Store] database unavailable at shutdown: %d update(s) saved to %s, "
                        "replayed at next start", left, self.journal.dir)
        if lost:
            log.error("💾 [OpenHands/Store] %d update(s) could not be journaled (journal full) and are lost", lost)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the queue is empty (tests and admin reads that must see every write)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._queue or self._busy) and time.monotonic() < deadline:
                self._hurry = True  # no lingering for more ops: someone waits for these
                self._cond.notify_all()
                self._cond.wait(0.02)
            return not self._queue

    _busy = False
    _hurry = False
    on_landed: Callable[[], None] | None = None  # after each batch lands (peers learn that our costs are stored)
    _inflight: list[Op] | None = None
    epoch = 0  # even when no batch is in flight; readers use it to tell a clean snapshot from a torn one

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait(0.5)
                if self._stop.is_set():
                    return
                if self._inflight is None and len(self._queue) < MAX_BATCH and LINGER_S > 0:
                    # Under load, wait a moment so one write carries many ops: the database (often on the
                    # same cores) then does a fraction of the work. Persistence lags by at most LINGER_S.
                    deadline = time.monotonic() + LINGER_S
                    while len(self._queue) < MAX_BATCH and not self._stop.is_set() and not self._hurry:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                # A failed batch is retried exactly as it was: merged writes are all-or-nothing on their op
                # ids, so regrouping after a partial success could skip ops that never landed.
                self._hurry = False
                if self._inflight is None:
                    self._inflight = [self._queue[i] for i in range(min(MAX_BATCH, len(self._queue)))]
                batch = self._inflight
                self._busy = True
                self.epoch += 1  # odd: a batch may be landing in MongoDB right now
            try:
                if self._apply is apply_op:
                    apply_batch(self.store, batch)
                else:  # an injected per-op writer (tests)
                    for op in batch:
                        self._apply(self.store, op)
            except PyMongoError as e:
                with self._cond:
                    self._busy = False
                    self.epoch += 1
                if self.outage_since is None:
                    self.outage_since = time.time()
                    log.warning("💾 [OpenHands/Store] MongoDB write failed (%s); serving from memory, "
                                "%d update(s) queued", e.__class__.__name__, len(self._queue))
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            except Exception:  # a bad batch must not stop the writer: write its ops one by one
                batch = self._apply_singly(batch)
            backoff = 0.1
            if self.outage_since is not None:
                log.info("💾 [OpenHands/Store] MongoDB is back after %.1fs; writing %d queued update(s)",
                         time.time() - self.outage_since, len(self._queue))
                self.outage_since = None
            self.journal.ack([op.get("_seq", 0) for op in batch])
            landed_at = time.time()
            with self._cond:
                for op in batch:
                    if self._queue and self._queue[0] is op:
                        self._queue.popleft()
                    if op["kind"] == "usage":
                        op["landed_at"] = landed_at  # peers' reads from now on show it (see ReservationBook)
                        left = self._pending_cost.get(op["key_id"], 0.0) - op["cost"]
                        if abs(left) < 1e-12:
                            self._pending_cost.pop(op["key_id"], None)
                        else:
                            self._pending_cost[op["key_id"]] = left
                self.written += len(batch)
                self._inflight = None
                self._busy = False
                self.epoch += 1  # even again: the landed ops are out of the pending totals
                self._cond.notify_all()
            if self.on_landed is not None:
                self.on_landed()

    def _apply_singly(self, batch: list[Op]) -> list[Op]:
        """Fallback for a batch with a bad op: write the good ones, drop (and log) the bad one."""
        done: list[Op] = []
        for op in batch:
            try:
                apply_op(self.store, op)
            except PyMongoError:
                break  # the database went away: the rest stays queued
            except Exception:
                log.exception("💾 [OpenHands/Store] dropping an update that cannot be written")
            done.append(op)
        return done

    # -- replay -------------------------------------------------------------------------------
    def replay_journal(self) -> int:
        """Apply what stopped or crashed runs left in their journals; returns how many ops were replayed.

        Idempotent (op ids, `$max`, history `_id`s) and crash-safe: each replayed batch is acknowledged
        in the orphan's own journal before the next, and the orphan is deleted only at the end, so a
        crash during replay resumes where it stopped. With MongoDB gone midway, the rest moves into this
        process's journal and queue.
        """
        total = 0
        if self.journal_path.is_file():
            total += self._replay_legacy()
        for orphan in orphans(self.journal_root, own=self.journal.dir):
            try:
                self.recheck_keys |= orphan.keys_in_use()
                items = orphan.pending_ops()
                done = self._replay_items(items, orphan.ack)
                total += len(items)
                orphan.remove()
                if items:
                    log.info("💾 [OpenHands/Store] replayed %d journaled update(s) from %s%s", len(items),
                             orphan.dir, "" if done == len(items) else
                             f" ({len(items) - done} queued until MongoDB returns)")
            except OSError as e:
                log.error("💾 [OpenHands/Store] cannot replay journal %s: %s", orphan.dir, e)
                orphan.release()
        if self.recheck_keys:
            self._recheck(sorted(self.recheck_keys))
        return total

    def _recheck(self, key_ids: list[str]) -> None:
        """After an unclean stop, requests in flight at the stop were charged upstream but never metered:
        the keys in use are marked never-checked, so the spend checker reads their real spend first
        (at its next tick) before their metered figure is trusted near the rotation point."""
        log.warning("🩺 [OpenHands/Store] unclean stop: %d key(s) in use at the stop are re-checked with the "
                    "upstream first: %s", len(key_ids), ", ".join(key_ids[:20]))
        for i, key_id in enumerate(key_ids):
            try:
                self.store.set_key_fields(key_id, {"lastSpendCheck": None})
            except PyMongoError:  # the database is gone again: queue (and journal) the rest
                for rest in key_ids[i:]:
                    self.submit({"kind": "set", "key_id": rest, "set": {"lastSpendCheck": None}})
                return

    def _replay_legacy(self) -> int:
        ops = []
        for line in self.journal_path.read_text(encoding="utf-8").splitlines():
            try:
                ops.append(json.loads(line))
            except ValueError:
                log.warning("💾 [OpenHands/Store] skipping a torn journal line")
        self._replay_items(list(enumerate(ops, 1)), lambda seqs: None)
        self.journal_path.unlink(missing_ok=True)
        if ops:
            log.info("💾 [OpenHands/Store] replayed %d journaled update(s) from %s", len(ops), self.journal_path)
        return len(ops)

    def _replay_items(self, items: list[tuple[int, Op]], ack: Callable[[list[int]], None]) -> int:
        """Apply in batches, acknowledging each; on an outage queue the rest. Returns ops applied."""
        i = 0
        try:
            while i < len(items):
                chunk = items[i:i + REPLAY_BATCH]
                ops = [dict(op) for _, op in chunk]
                if self._apply is apply_op:
                    apply_batch(self.store, drop_applied(self.store, ops))
                else:
                    for op in ops:
                        self._apply(self.store, op)
                ack([s for s, _ in chunk])
                i += len(chunk)
        except PyMongoError:
            for _, op in items[i:]:
                self.submit(dict(op))
            self.journal.sync()
        return i


def drop_applied(store: PoolStore, ops: list[Op]) -> list[Op]:
    """Usage ops whose id a key already remembers are left out (replays regroup ops into new batches,
    and a merged write is all-or-nothing on its ids, so a half-applied group must not block the rest)."""
    keys = {op["key_id"] for op in ops if op["kind"] == "usage"}
    if not keys:
        return ops
    ids = [op["op_id"] for op in ops if op["kind"] == "usage"]
    applied: set[str] = set()
    for doc in store.keys.find({"_id": {"$in": list(keys)}}, {"appliedOps": 1, "appliedRanges": 1}):
        applied |= landed_ids(doc, ids)
    return [op for op in ops if op["kind"] != "usage" or op["op_id"] not in applied]


def usage_op(key_id: str, cost: float, tokens: int, at: float, key_spend_floor: float | None, op_id: str) -> Op:
    """`UsageOp(...).to_json()`, built directly (the request path makes one per response)."""
    return {"kind": "usage", "op_id": op_id, "key_id": key_id, "cost": cost, "tokens": tokens, "at": at,
            "key_spend_floor": key_spend_floor}
