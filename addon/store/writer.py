"""Write-behind queue: hooks enqueue, one thread writes to MongoDB, outages cost nothing.

Hooks never wait for the database. While MongoDB is away the ops wait in a bounded queue and are
written, in order, when it returns; if the process stops first they go to a local journal that the
next start replays. Usage ops carry an id and are applied idempotently, so a replay never counts
twice.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pymongo.errors import PyMongoError

from addon.store.mongo import APPLIED_OPS_WINDOW, PoolStore, UsageOp, to_datetime, with_dates

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
    else:
        log.error("dropping unknown store op kind %r", kind)


MAX_BATCH = 200  # ops per round trip; also well inside the per-key applied-ops window
LINGER_S = 0.05


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
            requests.append(UpdateOne(
                {"_id": w["key_id"], "appliedOps": {"$nin": w["ids"]}},
                {"$inc": {"spendEstimate": w["cost"], "tokensUsed": w["tokens"], "requestsCount": w["count"]},
                 "$max": {"lastUsedAt": to_datetime(w["at"])},
                 "$push": {"appliedOps": {"$each": w["ids"], "$slice": -APPLIED_OPS_WINDOW}}}))
            if w["floor"] is not None:
                requests.append(UpdateOne({"_id": w["key_id"]}, {"$max": {"spendEstimate": w["floor"]}}))
        elif kind == "raise_spend":
            update: dict[str, Any] = {"$max": {"spendEstimate": float(w["spend"])}}
            if w.get("set"):
                update["$set"] = with_dates(w["set"])
            requests.append(UpdateOne({"_id": w["key_id"]}, update))
        else:
            requests.append(UpdateOne({"_id": w["key_id"]}, {"$set": with_dates(w["set"]) or {}}))
    if requests:
        store.keys.bulk_write(requests, ordered=True)
    if binds:
        store.bind_many(binds)
    for row in history:
        store.insert_history(with_dates(row) or {})


class StoreWriter:
    def __init__(self, store: PoolStore, journal_path: Path, *, max_queue: int = 200_000,
                 apply: Callable[[PoolStore, Op], None] = apply_op) -> None:
        self.store = store
        self.journal_path = journal_path
        self.max_queue = max_queue
        self._apply = apply
        self._queue: collections.deque[Op] = collections.deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending_cost: dict[str, float] = collections.defaultdict(float)
        self.outage_since: float | None = None
        self.written = 0
        self.dropped = 0

    # -- producer side (any thread, never blocks) ---------------------------------------------
    def submit(self, op: Op) -> None:
        with self._cond:
            if len(self._queue) >= self.max_queue:
                # Bounded memory: keep the money (usage ops), shed the oldest bookkeeping op.
                for i, queued in enumerate(self._queue):
                    if queued["kind"] != "usage":
                        del self._queue[i]
                        break
                else:
                    self._spill([self._queue.popleft()])
                self.dropped += 1
            self._queue.append(op)
            if op["kind"] == "usage":
                self._pending_cost[op["key_id"]] += op["cost"]
            if len(self._queue) == 1 or len(self._queue) >= MAX_BATCH:
                self._cond.notify()  # waking the writer for every op would cost the event loop GIL hand-offs

    def pending_cost(self, key_id: str) -> float:
        with self._cond:
            return self._pending_cost.get(key_id, 0.0)

    @property
    def backlog(self) -> int:
        return len(self._queue)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="openhands-store-writer", daemon=True)
        self._thread.start()

    def stop(self, flush_timeout: float = 5.0) -> None:
        """Flush what the database takes within the timeout; journal the rest."""
        deadline = time.monotonic() + flush_timeout
        with self._cond:
            while self._queue and self.outage_since is None and time.monotonic() < deadline:
                self._cond.wait(0.05)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread:
            self._thread.join(timeout=max(0.5, deadline - time.monotonic()) + 2)
        with self._cond:
            rest = list(self._queue)
            self._queue.clear()
        if rest:
            self._spill(rest)
            log.warning("💾 [OpenHands/Store] database unavailable at shutdown: %d update(s) saved to %s, "
                        "replayed at next start", len(rest), self.journal_path)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the queue is empty (tests and admin reads that must see every write)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._queue or self._busy) and time.monotonic() < deadline:
                self._cond.wait(0.02)
            return not self._queue

    _busy = False
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
                    while len(self._queue) < MAX_BATCH and not self._stop.is_set():
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                # A failed batch is retried exactly as it was: merged writes are all-or-nothing on their op
                # ids, so regrouping after a partial success could skip ops that never landed.
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
            with self._cond:
                for op in batch:
                    if self._queue and self._queue[0] is op:
                        self._queue.popleft()
                    if op["kind"] == "usage":
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

    # -- journal ------------------------------------------------------------------------------
    def _spill(self, ops: list[Op]) -> None:
        try:
            self.journal_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.journal_path, "a", encoding="utf-8") as f:
                for op in ops:
                    f.write(json.dumps(op, separators=(",", ":")) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            log.error("💾 [OpenHands/Store] cannot write journal %s: %s; %d update(s) lost",
                      self.journal_path, e, len(ops))

    def replay_journal(self) -> int:
        """Apply a previous run's journal (idempotently); returns how many ops were replayed."""
        if not self.journal_path.exists():
            return 0
        claimed = self.journal_path.with_suffix(f".replaying-{os.getpid()}")
        try:
            os.rename(self.journal_path, claimed)
        except FileNotFoundError:  # another sidecar claimed it first
            return 0
        ops = []
        for line in claimed.read_text(encoding="utf-8").splitlines():
            try:
                ops.append(json.loads(line))
            except ValueError:
                log.warning("💾 [OpenHands/Store] skipping a torn journal line")
        done = 0
        try:
            for op in ops:
                self._apply(self.store, op)
                done += 1
        except PyMongoError:
            # Still down: keep what is left for the queue (and the next journal if we stop again).
            for op in ops[done:]:
                self.submit(op)
        claimed.unlink(missing_ok=True)
        if ops:
            log.info("💾 [OpenHands/Store] replayed %d journaled update(s) from %s", done, self.journal_path)
        return done


def usage_op(key_id: str, cost: float, tokens: int, at: float, key_spend_floor: float | None, op_id: str) -> Op:
    return UsageOp(op_id, key_id, cost, tokens, at, key_spend_floor).to_json()
