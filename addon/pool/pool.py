"""The key pool: in-memory state served to the request path, MongoDB behind it.

Reads on the request path are memory-only (a lock, no I/O). Writes go to the write-behind writer.
The few steps that must be atomic across sidecars (rotation, backup promotion, admin changes) are
blocking methods that callers run off the event loop (`asyncio.to_thread`).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, cast

from addon.core import reservation as rsv
from addon.core import rotation_policy as policy
from addon.core.masking import mask_key
from addon.core.status import RETIRED, STATUSES, Status
from addon.store.mongo import (DatabaseError, PoolStore, Snapshot, new_key_doc, to_datetime, to_epoch, utcnow,
                               with_dates, writer_marks)
from addon.store.reservations import PRESENCE, ReservationSharer, ReservationStore
from addon.store.writer import StoreWriter

log = logging.getLogger(__name__)

LOCAL_BIND_GRACE_S = 30.0  # a local binding newer than this wins over a possibly stale DB read
# Between them the sync reads only what changed (`updatedAt` deltas); a key or backup added, claimed or
# deleted triggers one at once (the store's structure counter), so this only catches writes that bypass
# `updatedAt` (a hand edit, an older sidecar).
FULL_KEY_READ_EVERY_S = 600.0
TOUCH_EVERY_S = 3600.0  # active clients' bindings are re-stamped this often, so the TTL spares them
LAST_RESORT_WARN_EVERY_S = 60.0
LOOK_UP_DEADLINE_S = 0.5  # a first-sight binding read slower than this gives the client a fresh choice
LOOK_UP_PAUSE_S = 10.0  # ... and the reads pause this long (the database is slow or away)
RECOVERY_FLOW = "recovery:"  # the reservation a key unverified since an unclean stop holds (`distrust`)
SEEN_SPEND_TTL_S = 10.0  # a header's spend (peers' requests in it) guides admission until syncs show them
PEER_GRACE_S = 5.0  # after sharing starts, peers are assumed at work until this long without seeing one
RETIRE_SPENT_PER_PASS = 4  # keys drained to their budget retired per sync pass (each is a few database steps)
RECENT_SPEND_WINDOW_S = 4.0  # peers count our fresh spend until written + this (their sync, every 2 s, reads it;
                             # what their copy of the key holds already is not counted again: KeyLoad.unsynced)
SUCCESSOR_ROTATIONS = 2      # a successor found past its own point is rotated too, at most this often per request
_HEALTHY: str = Status.HEALTHY.value  # (a plain string: reading an enum member costs a lookup per request)


@dataclass
class KeyState:
    id: str
    api_key: str
    status: str = Status.HEALTHY
    spend_estimate: float = 0.0
    total_spend: float = 0.0
    budget_limit: float = policy.NOMINAL_BUDGET
    tokens_used: int = 0
    requests_count: int = 0
    last_error: str | None = None
    cooldown_until: float | None = None
    created_at: float | None = None
    last_used_at: float | None = None
    last_spend_check: float | None = None
    replaced_by: str | None = None
    # The upstream's spend per `x-litellm-key-spend`, peers' fresh requests included, for admission only
    # (never for retirement: a sync's figure may not show those requests yet, and would count them twice).
    seen_spend: float = 0.0
    seen_spend_at: float = 0.0
    # Spend peers metered that our copy of the key does not show yet (their loads' `unsynced`): every decision
    # counts it (`view`, `Pool._admission_spend`); nothing stores it.
    peer_unsynced: float = 0.0
    # Per writer (sidecar), the last of its usage ops our copy of the key holds (store.mongo.writer_marks).
    applied: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> "KeyState":
        def num(name: str, default: float = 0.0) -> float:
            v = doc.get(name)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default

        return cls(
            id=str(doc["_id"]),
            api_key=str(doc.get("apiKey", "")),
            status=doc["status"] if doc.get("status") in STATUSES else Status.HEALTHY,
            spend_estimate=num("spendEstimate"),
            total_spend=num("totalSpend"),
            budget_limit=num("budgetLimit", policy.NOMINAL_BUDGET) or policy.NOMINAL_BUDGET,
            tokens_used=int(num("tokensUsed")),
            requests_count=int(num("requestsCount")),
            last_error=doc.get("lastError"),
            cooldown_until=to_epoch(doc.get("cooldownUntil")),
            created_at=to_epoch(doc.get("createdAt")),
            last_used_at=to_epoch(doc.get("lastUsedAt")),
            last_spend_check=to_epoch(doc.get("lastSpendCheck")),
            replaced_by=str(doc["replacedBy"]) if doc.get("replacedBy") else None,
            applied=writer_marks(doc),
        )

    @property
    def effective_spend(self) -> float:
        a, b = self.spend_estimate, self.total_spend
        if type(a) is float and type(b) is float and a == a and b == b:  # two real figures (NaN != NaN): the max
            return a if a >= b else b
        return policy.effective_spend(a, b)

    def view(self, bindings: int = 0) -> policy.KeyView:
        return policy.KeyView(self.id, self.status, self.spend_estimate + self.peer_unsynced, self.total_spend,
                              self.budget_limit, self.cooldown_until, bindings)

    def public(self, threshold: float) -> dict[str, Any]:
        """What the admin API and commands show: never the full key."""
        point = policy.rotation_point(self.budget_limit, threshold)
        return {
            "id": self.id,
            "apiKey": mask_key(self.api_key),
            "status": self.status,
            "spendEstimate": round(self.spend_estimate + self.peer_unsynced, 6),  # peers' fresh spend in it
            "totalSpend": round(self.total_spend, 6),
            "budgetLimit": self.budget_limit,
            "rotationPoint": round(point, 6),
            "spendPercentage": round(100.0 * policy.effective_spend(self.spend_estimate + self.peer_unsynced,
                                                                    self.total_spend) / self.budget_limit, 2)
            if self.budget_limit else 0.0,
            "tokensUsed": self.tokens_used,
            "requestsCount": self.requests_count,
            "lastError": self.last_error,
            "cooldownUntil": iso(self.cooldown_until),
            "createdAt": iso(self.created_at),
            "lastUsedAt": iso(self.last_used_at),
            "lastSpendCheck": iso(self.last_spend_check),
        }


# Stored field -> KeyState attribute, for the writes a fresh read does not show yet.
_QUEUED_FIELDS = {"status": "status", "totalSpend": "total_spend", "lastSpendCheck": "last_spend_check",
                  "lastError": "last_error", "cooldownUntil": "cooldown_until", "budgetLimit": "budget_limit"}


def _overlay_queued(keys: dict[str, KeyState], ops: list[dict[str, Any]]) -> None:
    """A database read lags our queued writes: lay them over it, so no view shows a key going back
    (a calibrated spend of 0.0 right after a budget error, a polled `totalSpend` of 0 after a rotation)."""
    for op in ops:
        key = keys.get(op.get("key_id", ""))
        if key is None:
            continue
        kind = op.get("kind")
        if kind == "raise_spend" and isinstance(op.get("spend"), (int, float)):
            key.spend_estimate = max(key.spend_estimate, float(op["spend"]))
        elif kind == "usage":
            # an answer metered here and not yet written: the read cannot hold it (its cost is in the pending
            # cost already), so the key's request and token counts do not go back until it lands
            key.requests_count += 1
            tokens = op.get("tokens")
            if type(tokens) is int:  # as the write will add them
                key.tokens_used += tokens
            if isinstance(op.get("key_spend_floor"), (int, float)):
                key.spend_estimate = max(key.spend_estimate, float(op["key_spend_floor"]))
        for name, value in (op.get("set") or {}).items():
            attr = _QUEUED_FIELDS.get(name)
            if attr is not None:
                setattr(key, attr, to_epoch(value) if attr in ("last_spend_check", "cooldown_until") else value)


def iso(epoch: float | None) -> str | None:
    d = to_datetime(epoch)
    return d.isoformat().replace("+00:00", "Z") if d else None


@dataclass(slots=True)  # one or two per request
class Choice:
    """The memory-only part of a key choice: a key, or the key that must be rotated first."""

    key: KeyState | None
    rotate_from: KeyState | None = None  # the bound key reached its rotation point
    spill: bool = False  # the bound key is full of reservations: this request only goes elsewhere (no rebind)
    full: bool = False   # every usable key is full of reservations: the caller may wait and ask again
    stuck_from: KeyState | None = None  # nowhere to rotate this key to (no other key, no backup): last resort
    settled: bool = False  # memory decided, even with no key: no database step can change the answer
    drain: bool = False  # the bound key is past its point with budget left: it takes this one request alone


@dataclass(slots=True)  # one or two per request
class Acquired:
    """The key a request goes out on, and how it was reached (for logs, comments and flow state)."""

    key: KeyState | None
    rotated_from: str | None = None  # proactive rotation moved the client off this key
    warning: str | None = None       # sent on a key past its point: nothing else was left
    full: bool = False               # every usable key is full of in-flight reservations (see core.reservation)


@dataclass
class RotationResult:
    old_id: str
    new_id: str | None
    promoted_backup: bool = False
    won: bool = True  # this caller flipped the old key's status
    new_api_key: str | None = field(default=None, repr=False)


class Pool:
    def __init__(self, store: PoolStore, writer: StoreWriter, *, threshold: Callable[[], float],
                 default_budget: Callable[[], float], clock: Callable[[], float] = time.time,
                 drain_past_point: Callable[[], bool] = lambda: True) -> None:
        self.store = store
        self.writer = writer
        self.threshold = threshold
        self.drain_past_point = drain_past_point  # openhands_drain_past_point (see _drain_zone)
        self.default_budget = default_budget
        self.clock = clock
        self.lock = threading.RLock()
        self._op_prefix = uuid.uuid4().hex[:16] + "-"  # unique per process; the counter makes each op id unique
        self._op_seq = itertools.count(1)
        self._promote_lock = threading.Lock()
        self.keys: dict[str, KeyState] = {}
        self.bindings: dict[str, str] = {}
        self._local_binds: dict[str, float] = {}
        self.backups_unused = 0
        self.backups_total = 0
        self.last_sync: float | None = None
        self._high_water: Any = None  # the database clock of the last read (delta syncs start there)
        self._last_full = 0.0
        self._active: set[str] = set()  # clients seen since the last binding touch
        self._unbound: set[str] = set()  # clients looked up with no stored binding (not read again)
        self._generation: int | None = None  # the store's structure counter at the last read
        self._look_ups_paused_until = 0.0  # after a failed binding read, new clients choose afresh for a while
        self.unverified: dict[str, float] = {}  # after an unclean stop: key -> in-flight margin (see `distrust`)
        self._distrusted_at = 0.0
        self._last_touch = clock()
        self._last_resort_warned: dict[str, float] = {}
        self._implausible_warned: dict[str, float] = {}
        # In-flight reservation (core.reservation): ours per flow, peers' per key (set by the sharer thread).
        self.reservations = rsv.ReservationBook()
        self.estimator = rsv.CostEstimator()
        self.peer_loads: dict[str, rsv.KeyLoad] = {}  # peers' reservations and requests (their spend: below)
        self._peer_raw: dict[str, rsv.KeyLoad] = {}  # as read, with their fresh spend and when it landed
        self._with_peer_spend: set[str] = set()  # keys whose `peer_unsynced` was set
        self.reservation_sharer: Any = None
        self._sharing_since = 0.0
        self._held_floors: dict[str, float] = {}  # key-spend floors kept in memory while peers may be at work

    # -- sync with MongoDB (blocking) -----------------------------------------------------------
    def load(self, snap: Snapshot, keep_spend: bool = False) -> None:
        """A full snapshot replaces memory; a delta (`snap.full` False) updates the keys and bindings in it."""
        now = self.clock()
        with self.lock:
            keys = {}
            for doc in snap.keys:
                state = KeyState.from_doc(doc)
                landed = state.spend_estimate
                state.spend_estimate += self.writer.pending_cost(state.id)
                old = self.keys.get(state.id)
                if keep_spend and old is not None:
                    # Torn read (a batch of ours landed during it): stored + pending may count that batch twice,
                    # but what landed alone never does, and it holds peers' spend our figure lacks.
                    state.spend_estimate = max(old.spend_estimate, landed)
                if old is not None:
                    state.seen_spend, state.seen_spend_at = old.seen_spend, old.seen_spend_at
                    state.last_used_at = max(filter(None, (old.last_used_at, state.last_used_at)), default=None)
                    state.spend_estimate = max(state.spend_estimate, old.spend_estimate) \
                        if self.writer.outage_since is not None else state.spend_estimate
                keys[state.id] = state
            _overlay_queued(keys, self.writer.queued_ops())
            bindings = {b["clientId"]: str(b["openhandsKeyId"]) for b in snap.bindings if "clientId" in b}
            if not getattr(snap, "full", True):  # a delta: unchanged keys and bindings stay as they are
                keys = {**self.keys, **keys}
                # Only the clients this sidecar serves; others are read on first sight (`_look_up`).
                bindings = {**self.bindings, **{c: k for c, k in bindings.items()
                                                if c in self.bindings or c in self._unbound}}
            for client, at in list(self._local_binds.items()):
                if now - at < LOCAL_BIND_GRACE_S and client in self.bindings:
                    bindings[client] = self.bindings[client]
                elif now - at >= LOCAL_BIND_GRACE_S:
                    del self._local_binds[client]
            self.keys = keys
            self.bindings = bindings
            if getattr(snap, "full", True) or getattr(snap, "restructured", True):  # a quiet delta counts nothing
                self.backups_unused = snap.backups_unused
                self.backups_total = snap.backups_total
            self._generation = getattr(snap, "generation", None)
            self.last_sync = now
            self._apply_peer_spend()
            if self.unverified:
                self._hold_recovery(now)

    def distrust(self, margins: dict[str, float]) -> None:
        """After an unclean stop: requests in flight on these keys at the stop were charged upstream but
        never metered. Until the upstream's own figure arrives (a spend check, or `x-litellm-key-spend`
        on an answer), each key holds its margin as an in-flight reservation (shared with peers like any
        other), so it is not admitted within that margin of its rotation point."""
        with self.lock:
            self.unverified.update(margins)
            self._distrusted_at = self.clock()
            self._hold_recovery(self._distrusted_at)

    def _hold_recovery(self, now: float) -> None:
        """Renew the recovery reservations; drop those of keys the upstream's figure has verified since
        (caller holds the lock)."""
        for key_id, margin in list(self.unverified.items()):
            key = self.keys.get(key_id)
            verified = key is not None and max(key.last_spend_check or 0.0, key.seen_spend_at) >= self._distrusted_at
            if key is None or key.status in RETIRED or verified:
                del self.unverified[key_id]
                self.reservations.release(RECOVERY_FLOW + key_id)
                if verified and key is not None:
                    log.info("🩺 [OpenHands/Pool] key %s verified with the upstream's spend after the unclean stop "
                             "($%.2f): trusted up to its rotation point again", key_id, key.effective_spend)
            else:
                self.reservations.reserve(RECOVERY_FLOW + key_id, key_id, margin, now)

    def sync(self, full: bool = False) -> None:
        """Reload from MongoDB; memory spend = stored spend + our increments not yet written.

        Only what changed since the last read is read (`store.changes`), so the cost follows activity;
        keys are read in full every FULL_KEY_READ_EVERY_S and when a key or backup was added, claimed or
        deleted; bindings at the first sync (recent ones) and on a client's first sight. A batch landing
        while the snapshot is read would be counted twice (in the snapshot and still in the pending
        totals) and could retire a key early, so read again until no batch landed.
        """
        changes = getattr(self.store, "changes", None)
        if changes is None:  # a store without delta reads
            self._sync_with(lambda: self.store.snapshot())
            return
        now = self.clock()
        since = self._high_water
        if since is None or full:
            self._sync_with(lambda: changes(None, with_bindings=True))
            self._last_full = now
        else:
            snap = self._sync_with(lambda: changes(since, with_bindings=True, generation=self._generation))
            if now - self._last_full >= FULL_KEY_READ_EVERY_S or snap.restructured:
                delta_mark = self._high_water  # bindings: the next delta starts at the delta read
                self._sync_with(lambda: changes(None, with_bindings=False))
                self._high_water = delta_mark
                self._last_full = now
        self._touch_active(now)

    def _sync_with(self, read: Callable[[], Snapshot]) -> Snapshot:
        for _ in range(5):
            before = self.writer.epoch
            snap = read()
            if before % 2 == 0 and self.writer.epoch == before:
                break
            time.sleep(0.01)
        else:
            before = -1
        if snap.full and not snap.bindings and self.bindings:  # a keys-only full read keeps the bindings
            snap.bindings = [{"clientId": c, "openhandsKeyId": k} for c, k in self.bindings.items()]
        self.load(snap, keep_spend=before == -1)
        self._high_water = getattr(snap, "high_water", None) or self._high_water
        return snap

    def _touch_active(self, now: float) -> None:
        """Bindings expire TTL days after their last write: re-stamp the ones clients still use."""
        if now - self._last_touch < TOUCH_EVERY_S:
            return
        with self.lock:
            active, self._active = self._active, set()
            # Clients idle for a whole touch period leave the cache (a return reads their binding again).
            self.bindings = {c: k for c, k in self.bindings.items() if c in active or c in self._local_binds}
            self._unbound.clear()
        self._last_touch = now
        for i in range(0, len(active), 500):
            self.writer.submit({"kind": "touch", "clients": sorted(active)[i:i + 500]})

    # -- request path (memory only) -------------------------------------------------------------
    def _binding_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for key_id in self.bindings.values():
            counts[key_id] = counts.get(key_id, 0) + 1
        return counts

    def views(self) -> list[policy.KeyView]:
        counts = self._binding_counts()
        return [k.view(counts.get(k.id, 0)) for k in self.keys.values()]

    def choose(self, client_id: str, exclude: Collection[str] = (), successor: str | None = None) -> Choice:
        """Memory only: the client's bound key (or `successor`, the key a rotation just handed it)."""
        now, threshold = self.clock(), self.threshold()
        with self.lock:
            bound = self.keys.get(successor or self.bindings.get(client_id, ""))
            if bound is not None and bound.id not in exclude:
                # (the key itself has the fields the policy reads; with peers' unsynced spend, its view adds it)
                view = bound.view() if bound.peer_unsynced else cast(policy.KeyView, bound)
                if policy.is_usable(view, now, threshold):
                    if self._admits(bound, threshold):
                        return Choice(bound)
                    other = policy.choose_key(self.views(), None, now, threshold, self._full_keys(exclude, threshold))
                    if other is not None:
                        return Choice(self.keys[other], spill=True)
                    roomiest: KeyState | None = self._roomiest(exclude, now, threshold) or bound
                    return Choice(roomiest, spill=roomiest is not bound, full=True)
                if bound.status == Status.HEALTHY and self._drain_zone(bound, now, threshold):
                    if self._drains(bound, now, threshold):  # its last cents, one request at a time
                        return Choice(bound, drain=True)
                    other = policy.choose_key(self.views(), None, now, threshold,
                                              self._full_keys({*exclude, bound.id}, threshold))
                    if other is not None:  # busy draining: this request goes elsewhere, the binding stays
                        return Choice(self.keys[other], spill=True)
                    if self.backups_unused == 0:  # nothing else to use: wait for its request to settle
                        return Choice(bound, full=True)
                if bound.status == Status.HEALTHY:  # healthy but at its rotation point
                    if self.backups_unused > 0 or self._verified_spent(bound, now) or policy.choose_key(
                            self.views(), None, now, threshold, {*exclude, bound.id}) is not None:
                        return Choice(None, rotate_from=bound)
                    return self._last_resort_choice(exclude, bound, now, threshold)
            key_id = policy.choose_key(self.views(), None, now, threshold, self._full_keys(exclude, threshold))
            if key_id is not None:
                return Choice(self.keys[key_id])
            roomiest = self._roomiest(exclude, now, threshold)
            if roomiest is not None:  # every usable key is full of reservations
                return Choice(roomiest, full=True)
            # Nothing usable, but a healthy key sits past its rotation point: rotating *it* is the one
            # step that may consume a backup (its status flip admits a single winner across sidecars).
            spent = sorted((k for k in self.keys.values() if k.status == Status.HEALTHY and k.id not in exclude),
                           key=lambda k: (-k.effective_spend, k.id))
            if self.backups_unused == 0:
                # No backup to claim (as of the last sync): rotating would only flip a key's status and back
                # with several database round trips per request. The last-resort key, from memory.
                return self._last_resort_choice(exclude, spent[0] if spent else None, now, threshold)
            return Choice(None, rotate_from=spent[0] if spent else None)

    def _last_resort_choice(self, exclude: Collection[str], stuck_from: KeyState | None, now: float,
                            threshold: float) -> Choice:
        """Nothing to rotate to (caller holds the lock): the last-resort key — one request at a time while the
        upstream's own figure shows it short of its budget (the rest wait for it), else as it comes."""
        key = self.last_resort(exclude)
        if key is not None and self._drain_zone(key, now, threshold):
            if self._drains(key, now, threshold):
                return Choice(key, drain=True)
            return Choice(key, full=True)
        return Choice(key, stuck_from=stuck_from, settled=True)

    def acquire(self, client_id: str, exclude: Collection[str] = (), *, successor: str | None = None,
                blocking: bool = True) -> Acquired | None:
        """The one place a client's key is chosen: its bound key, else proactive rotation, backup
        promotion, or the last-resort key; the client is bound to the result.

        With `blocking=False` (on the event loop) it answers only what memory can decide and returns
        None when the choice needs the database (rotation, promotion): call it again off the loop.
        """
        if successor is None:
            kept = self._bound_admits(client_id, exclude)
            if kept is not None:
                return kept
        return self._choose_and_bind(client_id, exclude, successor, blocking)

    def _bound_admits(self, client_id: str, exclude: Collection[str]) -> Acquired | None:
        """`acquire`'s answer in its common case, without the general choice: the client's bound key is healthy,
        below its rotation point and admits the request, no peer is at work (no claim to make) and its figures
        are plain floats. None in every other case, which `_choose_and_bind` decides. In this case it is
        exactly what `choose` and `_choose_and_bind` answer (tests/test_pool_fastpath.py compares the two), with
        their figures inlined: every pooled request runs this."""
        lock = self.lock
        lock.acquire()  # (`with` costs twice the instructions of the two calls)
        try:
            key = self.keys.get(self.bindings.get(client_id, ""))
            if key is None or key.status != _HEALTHY or self.peer_loads or key.id in exclude:
                return None
            se, ts, pu, budget = key.spend_estimate, key.total_spend, key.peer_unsynced, key.budget_limit
            if type(se) is not float or type(ts) is not float or type(pu) is not float or type(budget) is not float:
                return None
            point = budget - (policy.NOMINAL_BUDGET - self.threshold())  # policy.rotation_point
            view = se + pu  # KeyState.view's spend
            if not (view == view and ts == ts and point == point):  # NaN anywhere: the general path's rules
                return None
            if (view if view >= ts else ts) >= point - policy.SPEND_EPSILON:  # not policy.is_usable
                return None
            spend = (se if se >= ts else ts) + pu  # _admission_spend
            if key.seen_spend > spend and self.clock() - key.seen_spend_at < SEEN_SPEND_TTL_S:
                spend = key.seen_spend
            reserved, in_flight = self.reservations.totals(key.id)
            if not rsv.admits_totals(spend, budget, point, reserved, in_flight, 0.0):  # not _admits: spill or full
                return None
            self._active.add(client_id)
        finally:
            lock.release()
        return Acquired(key)

    def _choose_and_bind(self, client_id: str, exclude: Collection[str], successor: str | None,
                         blocking: bool) -> Acquired | None:
        """`acquire` in general (see there)."""
        if successor is None and client_id not in self.bindings and client_id not in self._unbound:
            if not blocking:
                return None  # first sight: its stored binding is read off the loop
            self._look_up(client_id)
        choice = self.choose(client_id, exclude, successor)
        self._active.add(client_id)
        if choice.settled:
            return self._last_resort(client_id, choice)
        if choice.key is not None:
            near = not choice.full and self._near_point(client_id, choice.key)
            if near and not blocking:
                return None  # near its point with peers at work: admitted once they see our claim (off the loop)
            if not choice.spill:
                self.bind(client_id, choice.key.id)
            if near:
                return self._claim_near(client_id, exclude, choice.key)
            if choice.drain:
                return self._claim_drain(client_id, exclude, choice.key)
            return Acquired(choice.key, full=choice.full)
        if not blocking:
            return None
        if choice.rotate_from is not None:
            acquired = self._rotate_proactively(choice.rotate_from, exclude)
        else:
            acquired = self._promote_or_last_resort(exclude)
        for _ in range(SUCCESSOR_ROTATIONS):
            # The successor reached its own point meanwhile (a peer's spend, a header): it rotates too.
            if acquired.key is None or acquired.warning is not None:
                break
            again = self.choose(client_id, exclude, acquired.key.id)
            if again.key is not None or again.rotate_from is None or again.rotate_from.id != acquired.key.id:
                break
            first = acquired.rotated_from
            acquired = self._rotate_proactively(again.rotate_from, exclude)
            acquired.rotated_from = acquired.rotated_from and first
        if acquired.key is not None:
            self.bind(client_id, acquired.key.id)
            if acquired.warning is None:  # a successor already full of reservations: this request goes elsewhere
                again = self.choose(client_id, exclude, acquired.key.id)
                if again.key is not None:
                    acquired.key, acquired.full = again.key, again.full
                    # a successor near its point, or any successor while peers are at work (our view of a key we
                    # did not use may be a sync behind): claimed, so the peers' loads and its stored spend decide
                    if not again.full and (self._near_point(client_id, again.key) or (
                            self.peer_loads and self.reservation_sharer is not None)):
                        claimed = self._claim_near(client_id, exclude, again.key)
                        acquired.key, acquired.full = claimed.key, claimed.full
                    elif not again.full:
                        acquired.full = not self._claim_here(client_id, again.key)
        return acquired

    def _claim_here(self, client_id: str, key: KeyState) -> bool:
        """A rotation's clients all land on its successor at once, each from its own thread: admitted and
        claimed under one lock (the request's `reserve` adopts the claim), so no more of them go out than
        the key can pay for — the rest wait for it to settle, or for another key."""
        with self.lock:
            now, threshold = self.clock(), self.threshold()
            if self._drains(key, now, threshold) or (
                    policy.is_usable(key.view(), now, threshold) and self._admits(key, threshold)):
                self.reservations.claim(client_id, key.id, self.estimator.estimate_client(client_id), now)
                return True
            return False

    def _last_resort(self, client_id: str, choice: Choice) -> Acquired:
        """Nothing to rotate to: send on the key with the most budget truly left (the upstream's budget
        error stays the real limit), warning once a minute per key instead of on every request."""
        if choice.key is None:
            return Acquired(None)
        self.bind(client_id, choice.key.id)
        return self._sending_on_last_resort(choice.key, choice.stuck_from)

    def _sending_on_last_resort(self, key: KeyState, old: KeyState | None = None) -> Acquired:
        """The warning for a request sent past every rotation point, logged once a minute per key."""
        if old is not None:
            point = policy.rotation_point(old.budget_limit, self.threshold())
            warning = (f"key {old.id} reached ${old.effective_spend:.2f} >= ${point:.2f} but no backup or other "
                       f"usable key is left; sending on {key.id}")
        else:
            warning = (f"every key is past its rotation point and no backup is left; sending on {key.id} "
                       f"(spend ${key.effective_spend:.2f} of ${key.budget_limit:.2f})")
        now = self.clock()
        if now - self._last_resort_warned.get(key.id, 0.0) >= LAST_RESORT_WARN_EVERY_S:
            self._last_resort_warned[key.id] = now
            log.warning("⚠️ [OpenHands/ProactiveRotation] %s", warning)
        return Acquired(key, warning=warning)

    def _rotate_proactively(self, old: KeyState, exclude: Collection[str]) -> Acquired:
        point = policy.rotation_point(old.budget_limit, self.threshold())
        # A key the upstream's own figure shows spent is retired even with nothing to move to: the upstream
        # would only refuse it (then the client gets the pool's "no key" answer, not a budget error).
        spent = self._verified_spent(old, self.clock())
        with self.lock:
            at = self._admission_spend(old)  # the figure that decided (peers' unsynced spend and the header in it)
        result = self.rotate(old.id, error=f"proactive rotation at ${at:.2f}", keep_if_stuck=not spent)
        new = self.get(result.new_id) if result.new_id is not None else None
        if new is not None and new.id not in exclude:
            log.info("🔮 [OpenHands/ProactiveRotation] %s -> %s (spend $%.2f >= $%.2f)", old.id, new.id, at, point)
            return Acquired(new, rotated_from=old.id)
        if spent:  # retired: the key with the most budget truly left, if any
            other = self.last_resort({*exclude, old.id})
            return self._sending_on_last_resort(other, old) if other is not None else Acquired(None)
        warning = (f"key {old.id} reached ${old.effective_spend:.2f} >= ${point:.2f} but no backup or other usable "
                   "key is left; sending on it")
        log.warning("⚠️ [OpenHands/ProactiveRotation] %s", warning)
        key = self.get(old.id)
        return Acquired(key if key is not None and key.status == Status.HEALTHY else None, warning=warning)

    def _promote_or_last_resort(self, exclude: Collection[str]) -> Acquired:
        new_id = self.promote_backup()
        key = self.get(new_id) if new_id else None
        if key is not None and key.id not in exclude:
            return Acquired(key)
        key = self.last_resort(exclude)
        return self._sending_on_last_resort(key) if key is not None else Acquired(None)

    def _look_up(self, client_id: str) -> None:
        """A client this sidecar has not served lately: read its stored binding once, then cache it
        (one indexed read within LOOK_UP_DEADLINE_S; skipped while the database is away or after a read
        failed: the client then gets a fresh choice)."""
        key_id = None
        if self.writer.outage_since is None and time.monotonic() >= self._look_ups_paused_until:
            try:
                with self.store.deadline(LOOK_UP_DEADLINE_S):  # a hung database must not hold the request
                    key_id = self.store.get_binding(client_id)
            except DatabaseError as e:
                self._look_ups_paused_until = time.monotonic() + LOOK_UP_PAUSE_S
                log.debug("binding read for a new client failed: %s", e.__class__.__name__)
        with self.lock:
            if key_id is not None:
                self.bindings.setdefault(client_id, key_id)
            elif client_id not in self.bindings:
                if len(self._unbound) >= 100_000:
                    self._unbound.clear()
                self._unbound.add(client_id)

    def bind(self, client_id: str, key_id: str) -> None:
        with self.lock:
            if self.bindings.get(client_id) == key_id:
                return
            self.bindings[client_id] = key_id
            self._local_binds[client_id] = self.clock()
        self.writer.submit({"kind": "bind", "client_id": client_id, "key_id": key_id})

    def get(self, key_id: str) -> KeyState | None:
        # No lock: one dict read is atomic, and `load` replaces the dict whole (the request path reads this).
        return self.keys.get(key_id)

    # -- in-flight reservation (memory only; shared with peers by `reservation_sharer`) ----------
    def _load(self, key_id: str) -> rsv.KeyLoad:
        own, peer = self.reservations.load(key_id), self.peer_loads.get(key_id)
        return own if peer is None else own + peer

    def _apply_peer_spend(self) -> None:
        """Each key's spend peers metered that our copy lacks: their fresh spend less the writes our copy of
        the key holds (caller holds the lock; after every read of theirs and of ours)."""
        keys, had = self.keys, self._with_peer_spend
        now_has: set[str] = set()
        for key_id, peer in self._peer_raw.items():
            key = keys.get(key_id)
            if key is not None and peer.recent:
                key.peer_unsynced = peer.unsynced(key.applied)
                now_has.add(key_id)
        for key_id in had - now_has:
            key = keys.get(key_id)
            if key is not None:
                key.peer_unsynced = 0.0
        self._with_peer_spend = now_has

    def _admission_spend(self, key: KeyState) -> float:
        """What admission counts as spent: our figure with peers' unsynced spend, or a fresher header's when
        it is higher (peers' requests are in it until a sync shows them)."""
        spend = key.effective_spend + key.peer_unsynced
        if key.seen_spend > spend and self.clock() - key.seen_spend_at < SEEN_SPEND_TTL_S:
            return key.seen_spend
        return spend

    def _admits(self, key: KeyState, threshold: float) -> bool:
        point = policy.rotation_point(key.budget_limit, threshold)
        spend = self._admission_spend(key)
        reserved, in_flight = self.reservations.totals(key.id)  # (per request: no KeyLoad built)
        peer = self.peer_loads.get(key.id)
        if peer is None:
            return rsv.admits_totals(spend, key.budget_limit, point, reserved, in_flight, 0.0)
        return rsv.admits_totals(spend, key.budget_limit, point, reserved + peer.reserved, in_flight + peer.in_flight,
                                 peer.recent)

    def _full_keys(self, exclude: Collection[str], threshold: float) -> set[str]:
        """`exclude` plus every key that is full of reservations now (caller holds the lock)."""
        out = set(exclude)
        if not len(self.reservations) and not self.peer_loads:
            return out
        out.update(k.id for k in self.keys.values() if k.id not in out and not self._admits(k, threshold))
        return out

    def _roomiest(self, exclude: Collection[str], now: float, threshold: float) -> KeyState | None:
        """Every usable key is full: the one with the most room left after its load (caller holds the lock)."""
        def room(k: KeyState) -> float:
            load = self._load(k.id)
            return policy.rotation_point(k.budget_limit, threshold) - max(k.effective_spend + k.peer_unsynced,
                                                                          k.seen_spend) - load.reserved - load.recent
        usable = [k for k in self.keys.values() if k.id not in exclude and policy.is_usable(k.view(), now, threshold)]
        return max(usable, key=lambda k: (room(k), k.id), default=None)

    def _near_point(self, client_id: str, key: KeyState) -> bool:
        """Peers are at work and `key` is within a few request estimates of its point (core.reservation.near_point)."""
        if not self.peer_loads or self.reservation_sharer is None:
            return False
        # Every request runs this while peers are at work: plain floats, no lock (a stale read only moves
        # one request between paths; the claim itself decides under the lock).
        spend = self._admission_spend(key)
        peer = self.peer_loads.get(key.id)
        held = self.reservations.reserved(key.id) + (peer.reserved + peer.recent if peer is not None else 0.0)
        return rsv.near_point(spend, policy.rotation_point(key.budget_limit, self.threshold()), held,
                              self.estimator.estimate_client(client_id))

    def _claim_near(self, client_id: str, exclude: Collection[str], key: KeyState, depth: int = 0) -> Acquired:
        """Blocking (off the loop): claim `key` for this request — one atomic database step publishes the
        claim and reads the peers' load on the key — then admit only if it still fits; else another
        key, else `full`. The request's `reserve` takes the claim over. Without an answer (database
        slow or down) memory decides, as far from the point."""
        with self.lock:
            amount = self.estimator.estimate_client(client_id)
            claim_id = self.reservations.claim(client_id, key.id, amount, self.clock())
        fresh = self.reservation_sharer.claim(key.id)
        confirmed = fresh is not None
        now, threshold = self.clock(), self.threshold()
        with self.lock:
            if fresh is not None:
                self._peer_raw = {**self._peer_raw, key.id: fresh}
                self.peer_loads = {**self.peer_loads, key.id: fresh.as_load()}
                self._apply_peer_spend()
            k = self.keys.get(key.id)
            ok = k is not None and policy.is_usable(k.view(), now, threshold) and (
                not confirmed or self._admits_claim(k, threshold, amount))
            if not ok and k is not None and confirmed and k.status == Status.HEALTHY:
                # past its point: drained only when the peers' fresh loads show it alone
                ok = self._drains(k, now, threshold, self._load(k.id).without(amount))
            if not ok:
                self.reservations.unclaim(claim_id, client_id, key.id)
        if ok and k is not None:
            return Acquired(k)
        self.reservation_sharer.poke()
        if depth < 2:
            again = self.choose(client_id, {*exclude, key.id})
            if again.key is not None and not again.full:
                if self._near_point(client_id, again.key):
                    return self._claim_near(client_id, {*exclude, key.id}, again.key, depth + 1)
                return Acquired(again.key)  # a roomy key for this request only (the binding stays)
        return Acquired(key, full=True)

    def _may_drain(self, key: KeyState, now: float) -> bool:
        """Draining is on and the key's last answers carried `x-litellm-key-spend` lately: our meter alone
        (an unknown price, a key spent elsewhere) keeps the point's margin."""
        return now - key.seen_spend_at < SEEN_SPEND_TTL_S and self.drain_past_point()

    def _drain_zone(self, key: KeyState, now: float, threshold: float) -> bool:
        """Past its point, short of its budget by the upstream's own recent figure (caller holds the lock)."""
        if not self._may_drain(key, now):
            return False
        peer = self.peer_loads.get(key.id)  # (`recent`: older peers' fresh spend only, see _set_peer_loads)
        return rsv.in_drain_zone(self._admission_spend(key), key.budget_limit,
                                 policy.rotation_point(key.budget_limit, threshold),
                                 peer.recent if peer is not None else 0.0)

    def _drains(self, key: KeyState, now: float, threshold: float, load: rsv.KeyLoad | None = None) -> bool:
        """May `key`, past its point, take one request now: in its drain zone and alone on it
        (core.reservation.drains; caller holds the lock)."""
        if key.status != Status.HEALTHY or not self._may_drain(key, now):
            return False
        return rsv.drains(self._admission_spend(key), key.budget_limit,
                          policy.rotation_point(key.budget_limit, threshold),
                          self._load(key.id) if load is None else load)

    def _verified_spent(self, key: KeyState, now: float) -> bool:
        """The upstream's own recent figure (`x-litellm-key-spend`) shows the key's budget used up."""
        return now - key.seen_spend_at < SEEN_SPEND_TTL_S and \
            self._admission_spend(key) >= key.budget_limit - rsv.DRAIN_MARGIN

    def retire_spent(self) -> list[str]:
        """Blocking (the sync loop): keys drained to their budget — the upstream's own recent figure shows
        them spent, nothing in flight on them — are retired now rather than at their next request, so
        their status tells peers, operators and the spend checker at once. Returns their ids."""
        now = self.clock()
        with self.lock:
            spent = sorted(k.id for k in self.keys.values() if k.status == Status.HEALTHY
                           and self._verified_spent(k, now) and self._load(k.id).in_flight <= 0)
        for key_id in spent[:RETIRE_SPENT_PER_PASS]:  # the sync pass must stay short: peers' views age with it
            key = self.get(key_id)
            result = self.rotate(key_id, error=f"spent: ${key.effective_spend if key else 0.0:.2f} by the upstream's "
                                 "own figure", keep_if_stuck=False, wait_for_peer_s=0.0)
            log.info("🔮 [OpenHands/ProactiveRotation] %s -> %s (spent: the upstream's figure reached its budget)",
                     key_id, result.new_id or "no key left")
        return spent[:RETIRE_SPENT_PER_PASS]

    def draining(self, key_id: str) -> bool:
        """Is this key spending its last cents past its point (the spend checker leaves it to the request
        path, which retires it once its budget is reached)?"""
        with self.lock:
            key = self.keys.get(key_id)
            return key is not None and key.status == Status.HEALTHY and \
                self._drain_zone(key, self.clock(), self.threshold())

    def _claim_drain(self, client_id: str, exclude: Collection[str], key: KeyState) -> Acquired:
        """Take a draining key for this request: checked again and claimed under one lock, so a second
        request (another thread's acquire) finds it busy. The request's `reserve` adopts the claim."""
        with self.lock:
            now, threshold = self.clock(), self.threshold()
            if self._drains(key, now, threshold):
                self.reservations.claim(client_id, key.id, self.estimator.estimate_client(client_id), now)
                return Acquired(key)
        again = self.choose(client_id, {*exclude, key.id})
        if again.key is not None and not again.full and not again.drain:
            return Acquired(again.key)  # another key for this request only (the binding stays)
        return Acquired(key, full=True)

    def _admits_claim(self, key: KeyState, threshold: float, amount: float) -> bool:
        """`_admits` with our claim of `amount` left out of the load (a request's own cost never counts)."""
        spend = self._admission_spend(key)
        point = policy.rotation_point(key.budget_limit, threshold)
        return rsv.admits(spend, key.budget_limit, point, self._load(key.id).without(amount))

    def reserve(self, flow_id: str, key_id: str, client_id: str, model: str | None) -> float:
        """A request goes out on `key_id`: hold its estimated cost until `release` (a retry moves it);
        a claim its key choice left on `key_id` becomes this reservation."""
        lock = self.lock
        lock.acquire()  # (`with` costs twice the instructions of the two calls: this runs per request)
        try:
            amount = self.estimator.estimate(client_id, model)
            now = self.clock()
            if not self.reservations.adopt(flow_id, client_id, key_id, amount, now):
                self.reservations.reserve(flow_id, key_id, amount, now)
        finally:
            lock.release()
        sharer = self.reservation_sharer or self.share_reservations()
        if sharer is not None:
            sharer.poke()
        return amount

    def share_reservations(self) -> Any:
        """Start sharing reservations with peer sidecars through the store's database (once; no-op
        for a store without one, e.g. the memory store). Returns the sharer or None."""
        if self.reservation_sharer is not None or getattr(self.store, "db", None) is None:
            return self.reservation_sharer
        with self.lock:
            if self.reservation_sharer is not None:
                return self.reservation_sharer
            rs = ReservationStore(self.store.db, self._op_prefix.rstrip("-"))
            self.reservation_sharer = ReservationSharer(rs, self._local_loads, self._set_peer_loads, self.clock)
            # Until the first reads, peers may be at work unseen: header floors stay in memory meanwhile
            # (stored, one would count a peer's request twice for good).
            self.peer_loads = {PRESENCE: rsv.KeyLoad()}
            self._peer_raw = {}
            self._sharing_since = self.clock()
        self.writer.on_landed = self.reservation_sharer.poke  # peers stop counting our landed costs at once
        self.reservation_sharer.start()
        return self.reservation_sharer

    def _local_loads(self, now: float) -> dict[str, rsv.KeyLoad]:
        with self.lock:
            return self.reservations.loads(now, RECENT_SPEND_WINDOW_S, self.writer.pending_cost)

    def _set_peer_loads(self, loads: dict[str, rsv.KeyLoad]) -> None:
        with self.lock:
            if not loads and self.clock() - self._sharing_since < PEER_GRACE_S:
                # Peers starting with us may not have published yet: until they had time to, assume one.
                loads = {PRESENCE: rsv.KeyLoad()}
            self._peer_raw = loads
            # their fresh spend counts as the key's (`peer_unsynced`), not as load: a key it takes past its point
            # rotates instead of waiting for reservations to settle (KeyLoad.as_load)
            self.peer_loads = {k: v.as_load() for k, v in loads.items()}
            self._apply_peer_spend()
            if not loads and self._held_floors:
                # Alone after all: the header floors held while peers might have been at work are stored
                # now, each raised by what was charged on its key since (queued after those charges).
                for key_id, floor in self._held_floors.items():
                    self.writer.submit({"kind": "raise_spend", "key_id": key_id, "spend": floor})
                self._held_floors.clear()

    def release(self, flow_id: str) -> None:
        """The flow was metered, failed or answered locally: its reservation ends (idempotent)."""
        if flow_id not in self.reservations.flows:  # (usually: metering ended it already; no lock for that read)
            return
        with self.lock:
            held = self.reservations.release(flow_id)
        if held is not None and self.reservation_sharer is not None:
            self.reservation_sharer.poke()

    def in_flight(self, key_id: str) -> int:
        """Requests on this key still waiting for their answer, ours and our peers'."""
        with self.lock:
            return self._load(key_id).in_flight

    def record_usage(self, key_id: str, cost: float, tokens: int, key_spend_header: float | None = None, *,
                     spend_is_after: bool | None = False, max_budget: float | None = None,
                     client_id: str | None = None, model: str | None = None,
                     flow_id: str | None = None) -> float | None:
        """Count one response at once in memory and, via the writer, in MongoDB. Returns the new spend.

        `spend_is_after` says whether the header's spend already includes this response (1.110 JSON
        answers) or not (streams, older LiteLLM); None = unknown: the header alone is the floor.
        `max_budget` (`x-litellm-key-max-budget`) catches a budget changed upstream. `flow_id`'s
        reservation ends here, atomically with the charge.

        The header's spend may already hold requests the upstream charged and we have not metered yet
        (their answers are still on the way), or a peer metered and has not written yet; their cost is
        added when they are, so the floor leaves out what is still reserved on the key and what peers
        metered lately — else one request would count twice. With peers active the floor stays in
        memory (a sync replaces it with the database's figure): a peer's `$inc` landing after our `$max`
        would otherwise count its request twice for good.
        """
        now = self.clock()
        floor = None if key_spend_header is None else rsv.header_spend_floor(key_spend_header, cost, spend_is_after)
        new_budget = None
        lock = self.lock
        lock.acquire()  # (`with` costs twice the instructions of the two calls: this runs per answer)
        try:
            if flow_id is not None:
                self.reservations.release(flow_id)
            key = self.keys.get(key_id)
            if floor is not None and key is not None and not policy.plausible_spend(
                    key_spend_header, max(key.budget_limit, max_budget or 0.0)):
                floor = None  # a figure that cannot be true would retire a key with budget left
                self._implausible_header(key_id, key_spend_header)
            stored_floor = floor
            if floor is not None:
                if key is not None and floor >= key.seen_spend:
                    key.seen_spend, key.seen_spend_at = floor, now
                peer = self.peer_loads.get(key_id)
                floor -= self.reservations.load(key_id).reserved + self._peers_fresh_spend(key_id, key)
                if peer is not None:
                    floor -= peer.reserved
                stored_floor = floor if not self.peer_loads else None
            if key_id in self._held_floors:
                self._held_floors[key_id] += cost  # a held floor moves with every later charge on the key
            if floor is not None and stored_floor is None:
                self._held_floors[key_id] = max(self._held_floors.get(key_id, 0.0), floor)
            if key is not None:
                key.spend_estimate += cost
                if stored_floor is not None and stored_floor <= key.spend_estimate + 1e-9:
                    # The header confirms what we metered: the increment alone stores it (one database
                    # statement fewer per key and batch; a sync would lower a figure the store lacks, and
                    # the next header raise it again).
                    stored_floor = None
                if floor is not None and not self.peer_loads:
                    # (with peers at work, their unsynced spend is counted as `peer_unsynced` and the header in
                    # `seen_spend`: raising our figure too would count their fresh requests twice)
                    key.spend_estimate = max(key.spend_estimate, floor)
                key.tokens_used += tokens
                key.requests_count += 1
                key.last_used_at = now
                if max_budget is not None and 0 < max_budget < 1e9 and abs(max_budget - key.budget_limit) > 1e-9:
                    key.budget_limit = new_budget = float(max_budget)
            if client_id is not None:
                self.estimator.observe(client_id, model, cost)
            seq = next(self._op_seq)
            # Queued under the lock: a sync's `load` (stored + pending) then sees this cost in memory and in
            # the writer's pending totals together, never in neither (which undercounts until the next sync).
            op = self.writer.submit_usage(key_id, cost, tokens, now, stored_floor, f"{self._op_prefix}{seq}")
            self.reservations.settled(key_id, cost, now, RECENT_SPEND_WINDOW_S, op, seq)  # the writer stamps it landed
        finally:
            lock.release()
        if new_budget is not None:
            log.info("💲 [OpenHands/Pool] key %s: the upstream reports a budget of $%.2f; using it", key_id, new_budget)
            self.writer.submit({"kind": "set", "key_id": key_id, "set": {"budgetLimit": new_budget}})
        return key.spend_estimate if key is not None else None

    def _peers_fresh_spend(self, key_id: str, key: KeyState | None) -> float:
        """What peers metered lately that an upstream figure of the key's spend already holds and our copy does
        not: left out of the floors that figure sets, or it would be counted twice (caller holds the lock)."""
        peer = self.peer_loads.get(key_id)  # (`recent`: an older peer's fresh spend, see KeyLoad.as_load)
        return (peer.recent if peer is not None else 0.0) + (key.peer_unsynced if key is not None else 0.0)

    def _implausible_header(self, key_id: str, value: float | None) -> None:
        """One warning a minute per key (caller holds the lock)."""
        now = self.clock()
        if now - self._implausible_warned.get(key_id, 0.0) >= LAST_RESORT_WARN_EVERY_S:
            self._implausible_warned[key_id] = now
            log.warning("⚠️ [OpenHands/Pool] key %s: ignored x-litellm-key-spend %r (implausible for its budget)",
                        key_id, value)

    def record_polled_spend(self, key_id: str, total_spend: float, checked_at: float) -> KeyState | None:
        with self.lock:
            key = self.keys.get(key_id)
            if key is not None:
                key.total_spend = total_spend
                key.last_spend_check = checked_at
                key.spend_estimate = max(key.spend_estimate, total_spend)
        self.writer.submit({"kind": "raise_spend", "key_id": key_id, "spend": total_spend,
                            "set": {"totalSpend": total_spend, "lastSpendCheck": checked_at}})
        return key

    def mark_rate_limited(self, key_id: str, until: float, error: str) -> None:
        with self.lock:
            key = self.keys.get(key_id)
            if key is not None:
                key.status, key.cooldown_until, key.last_error = Status.RATE_LIMITED, until, error
        self.writer.submit({"kind": "set", "key_id": key_id,
                            "set": {"status": Status.RATE_LIMITED.value, "cooldownUntil": until, "lastError": error}})

    def revive_cooled(self) -> list[str]:
        """Rate-limited keys whose cooldown passed become healthy again (memory and store)."""
        now, revived = self.clock(), []
        with self.lock:
            for key in self.keys.values():
                if key.status == Status.RATE_LIMITED and (key.cooldown_until or 0) <= now:
                    key.status, key.cooldown_until = Status.HEALTHY, None
                    revived.append(key.id)
        for key_id in revived:
            self.writer.submit({"kind": "set", "key_id": key_id,
                                "set": {"status": Status.HEALTHY.value, "cooldownUntil": None}})
        return revived

    # -- rotation (blocking: run off the event loop) ------------------------------------------
    def _error_spend_floor(self, key_id: str, key: KeyState | None, spend: float) -> float | None:
        """The spend a budget error's figure proves, to store, or None (caller holds the lock).

        On LiteLLM >= 1.86 the counter may still hold a settled request's reservation (up to one request's
        maximum cost): a small excess over a figure the upstream's own header confirmed lately is that
        noise, not spend. With peers at work the figure stays in memory, like a header's floor: it holds
        their requests whose increments have not landed yet, and a `$max` before their `$inc` would count
        those twice."""
        if key is not None and self.clock() - key.seen_spend_at < SEEN_SPEND_TTL_S \
                and spend <= self._admission_spend(key) + rsv.MAX_REQUEST_COST:
            return None
        if self.peer_loads:
            floor = spend - self._peers_fresh_spend(key_id, key)
            self._held_floors[key_id] = max(self._held_floors.get(key_id, 0.0), floor)
            if key is not None:
                key.spend_estimate = max(key.spend_estimate, floor)
            return None
        return spend

    def retire(self, key_id: str, status: str, error: str | None, spend: float | None = None,
               budget: float | None = None) -> bool:
        """Mark a key exhausted/invalid in memory and, atomically, in MongoDB. True if this caller won."""
        fields: dict[str, Any] = {"status": status, "lastError": error, "cooldownUntil": None}
        if budget is not None and budget > 0:
            fields["budgetLimit"] = float(budget)
        with self.lock:
            key = self.keys.get(key_id)
            if spend is not None:
                spend = self._error_spend_floor(key_id, key, spend)
            if key is not None:
                key.status, key.last_error = status, error
                if budget is not None and budget > 0:
                    key.budget_limit = float(budget)
                if spend is not None:  # calibrated from the upstream's own figure (spend only grows)
                    key.spend_estimate = max(key.spend_estimate, spend)
        if spend is not None:
            # Behind our queued increments, as `$max`: increments the upstream's figure already includes
            # then cannot land on top of it (DESIGN §5: authoritative readings go through `$max`).
            self.writer.submit({"kind": "raise_spend", "key_id": key_id, "spend": float(spend)})
        if self.writer.outage_since is None:
            try:
                return self.store.transition_status(key_id, [Status.HEALTHY.value, Status.RATE_LIMITED.value],
                                                    with_dates(fields) or {})
            except DatabaseError as e:
                log.warning("💾 [OpenHands/Pool] database unavailable (%s): key %s retired in memory; the change "
                            "is queued", e.__class__.__name__, key_id)
        # Database down: memory already says so; the write waits in the writer's queue (journal on stop).
        self.writer.submit({"kind": "set", "key_id": key_id, "set": fields})
        return True

    def rotate(self, old_id: str, *, status: str = Status.EXHAUSTED.value, error: str | None = None,
               spend: float | None = None, budget: float | None = None, keep_if_stuck: bool = False,
               wait_for_peer_s: float = 2.0) -> RotationResult:
        """See `_rotate`; with the database down, rotate in memory only (no backup can be claimed)."""
        try:
            if self.writer.outage_since is not None:
                raise DatabaseError("database outage in progress")
            return self._rotate(old_id, status=status, error=error, spend=spend, budget=budget,
                                keep_if_stuck=keep_if_stuck, wait_for_peer_s=wait_for_peer_s)
        except DatabaseError as e:
            return self._rotate_in_memory(old_id, status, error, spend, budget, keep_if_stuck, e)

    def _rotate_in_memory(self, old_id: str, status: str, error: str | None, spend: float | None,
                          budget: float | None, keep_if_stuck: bool, cause: Exception) -> RotationResult:
        self.retire(old_id, status, error, spend, budget)  # memory now; the write is queued
        new_id = self._usable_other(old_id)
        moved: list[str] = []
        with self.lock:
            if new_id is None and keep_if_stuck and old_id in self.keys:
                self.keys[old_id].status = Status.HEALTHY
            if new_id is not None:
                moved = [c for c, k in self.bindings.items() if k == old_id]
                for client in moved:
                    self.bindings[client] = new_id
                    self._local_binds[client] = self.clock()
        if new_id is None and keep_if_stuck:
            self.writer.submit({"kind": "set", "key_id": old_id,
                                "set": {"status": Status.HEALTHY.value, "lastError": None}})
        for client in moved:
            self.writer.submit({"kind": "bind", "client_id": client, "key_id": new_id})
        log.warning("💾 [OpenHands/Pool] database unavailable (%s): rotated %s -> %s in memory; backups can be "
                    "claimed when it returns", cause.__class__.__name__, old_id, new_id or "(none)")
        return RotationResult(old_id, new_id, False, True)

    def _rotate(self, old_id: str, *, status: str = Status.EXHAUSTED.value, error: str | None = None,
                spend: float | None = None, budget: float | None = None, keep_if_stuck: bool = False,
                wait_for_peer_s: float = 2.0) -> RotationResult:
        """Retire `old_id` and find its successor: another usable key, else exactly one backup.

        Only the caller that wins the status flip may claim a backup; a loser waits for the winner's
        new key to appear, so two racing rotations of one key consume one backup. With
        `keep_if_stuck` (proactive rotation) and nothing to move to, the key is put back in service.
        """
        won = self.retire(old_id, status, error, spend, budget)  # queues the calibration for winners and losers
        with self.lock:
            clients = [c for c, k in self.bindings.items() if k == old_id]  # before the move and the sync
        if self.peer_loads:
            # Peers at work: keys near their end go fast. The successor is chosen on a fresh copy (a key a peer
            # just retired) and the peers' fresh spend as of now (a key they just spent), not one a sync old.
            self.sync()
            self._refresh_peers()
        new_id = self._usable_other(old_id)
        promoted = False
        if new_id is None or self._only_successors_left(old_id):
            # Nothing left, or only keys already carrying another retired key's clients (several keys
            # running out at once): this key gets its own backup, one per key across sidecars.
            replacement, promoted = self._replace_with_backup(old_id, wait_for_peer_s)
            new_id = replacement or new_id
        if new_id is None and keep_if_stuck and won:
            self.store.transition_status(old_id, [status], {"status": Status.HEALTHY.value, "lastError": None})
            with self.lock:
                if old_id in self.keys:
                    self.keys[old_id].status = Status.HEALTHY
        if new_id is not None:
            if not promoted:  # successor recorded either way, so a peer's stale bind follows it
                self.store.record_successor(old_id, new_id)
            self.store.move_bindings(old_id, new_id)
        self.sync()
        moved: list[tuple[str, str]] = []
        if new_id is not None:
            with self.lock:  # the sync may predate our own queued binds; move them in memory too
                clients += [c for c, k in self.bindings.items() if k == old_id and c not in clients]
                for client, key_id in self._spread(clients, old_id, new_id).items():
                    self.bindings[client] = key_id
                    self._local_binds[client] = self.clock()
                    moved.append((client, key_id))
        for client, key_id in moved:  # queued after any stale bind to the old key, so the new one wins
            self.writer.submit({"kind": "bind", "client_id": client, "key_id": key_id})
        return RotationResult(old_id, new_id, promoted, won)

    def _refresh_peers(self) -> None:
        """Read the peers' entries once now (blocking; a failed read leaves the last one in place)."""
        sharer = self.reservation_sharer
        if sharer is None:
            return
        try:
            sharer.read_once()
        except DatabaseError as e:
            log.debug("peers' reservations not read: %s", e.__class__.__name__)

    def hold_out(self, key_id: str, status: str) -> None:
        """An answer proved this key spent or dead: memory says so at once, so requests choosing a key while its
        rotation runs off the event loop (database steps) skip it; `rotate` records it and moves its clients."""
        with self.lock:
            key = self.keys.get(key_id)
            if key is not None and key.status in (Status.HEALTHY, Status.RATE_LIMITED):
                key.status = status

    def _only_successors_left(self, old_id: str) -> bool:
        """Every usable key already took over a retired key's clients, and a backup is unclaimed."""
        now, threshold = self.clock(), self.threshold()
        with self.lock:
            if self.backups_unused <= 0:
                return False
            taken = {k.replaced_by for k in self.keys.values() if k.status in RETIRED and k.id != old_id}
            usable = [k.id for k in self.keys.values() if k.id != old_id and policy.is_usable(k.view(), now, threshold)]
            return bool(usable) and all(u in taken for u in usable)

    def _spread(self, clients: list[str], old_id: str, successor: str) -> dict[str, str]:
        """A retired key's clients over the usable keys by load: in-flight requests and bindings per
        dollar of budget left (caller holds the lock). The successor is always one of the targets."""
        now, threshold = self.clock(), self.threshold()
        counts = self._binding_counts()
        targets = {k.id: k for k in self.keys.values()
                   if k.id != old_id and (k.id == successor or policy.is_usable(k.view(), now, threshold))}
        if successor not in targets or not clients:
            return {c: successor for c in clients}
        load = {kid: float(self._load(kid).in_flight + counts.get(kid, 0)) for kid in targets}
        left = {kid: max(policy.remaining_budget(k.view()), 1e-6) for kid, k in targets.items()}
        out: dict[str, str] = {}
        for client in sorted(clients):
            kid = min(targets, key=lambda t: ((load[t] + 1.0) / left[t], t))
            out[client] = kid
            load[kid] += 1.0
        return out

    def _replace_with_backup(self, old_id: str, wait_s: float) -> tuple[str | None, bool]:
        """Exactly one backup per replaced key, across threads and sidecars.

        The winner of `old_id`'s replacement reservation claims a backup; everyone else waits for the
        winner's new key to show up in MongoDB instead of claiming another one.
        """
        if self.store.reserve_replacement(old_id):
            backup = self.store.claim_backup(used_for=old_id)
            if backup is None:
                self.store.finish_replacement(old_id, None)
                return None, False
            self.store.activate_backup(backup, self.default_budget())
            self.store.finish_replacement(old_id, str(backup["_id"]))
            log.info("🔑 [OpenHands/Pool] promoted backup %s (%s) to replace %s",
                     backup["_id"], mask_key(backup.get("apiKey")), old_id)
            self.sync()
            return str(backup["_id"]), True
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            self.sync()
            new_id = self._usable_other(old_id)
            if new_id is not None:
                return new_id, False
            doc = self.store.get_key(old_id)
            if doc is None or doc.get("replacedBy") is None:  # the winner found no backup
                return None, False
            time.sleep(0.1)
        return None, False

    def promote_backup(self, used_for: str = "pool") -> str | None:
        """No key left at all: bring one backup into service (one at a time per process)."""
        with self._promote_lock:
            usable = self._usable_other("")
            if usable is not None:  # a concurrent request already promoted one
                return usable
            return self._promote_locked(used_for)

    def _promote_locked(self, used_for: str) -> str | None:
        try:
            if self.writer.outage_since is not None:
                raise DatabaseError("database outage in progress")
            # Replace the most recently retired key that has no successor yet: that reservation keeps
            # a sidecar that has not seen a peer's fresh backup from promoting a second one.
            with self.lock:
                retired = sorted((k for k in self.keys.values()
                                  if k.status in RETIRED and k.replaced_by is None),
                                 key=lambda k: (-(k.last_used_at or 0.0), k.id))
            if retired:
                return self._replace_with_backup(retired[0].id, 2.0)[0]
            return self._claim_for_pool(used_for)
        except DatabaseError as e:
            log.warning("💾 [OpenHands/Pool] database unavailable (%s): no backup can be claimed now",
                        e.__class__.__name__)
            return self._usable_other("")

    def _claim_for_pool(self, used_for: str, wait_s: float = 2.0) -> str | None:
        """A backup with no retired key to reserve: under the pool-wide claim, after a fresh read, so a
        sidecar that has not seen a peer's new key yet never promotes a second one."""
        holder = self._op_prefix.rstrip("-")
        deadline = time.monotonic() + wait_s
        while not self.store.reserve_pool_claim(holder):
            self.sync()  # a peer is promoting one right now: use it when it shows up
            usable = self._usable_other("")
            if usable is not None or time.monotonic() >= deadline:
                return usable
            time.sleep(0.1)
        try:
            self.sync()
            usable = self._usable_other("")
            if usable is not None:
                return usable
            backup = self.store.claim_backup(used_for=used_for)
            if backup is None:
                return None
            self.store.activate_backup(backup, self.default_budget())
        finally:
            self.store.release_pool_claim(holder)
        log.info("🔑 [OpenHands/Pool] promoted backup %s (%s): no usable key left",
                 backup["_id"], mask_key(backup.get("apiKey")))
        self.sync()
        return str(backup["_id"])

    def last_resort(self, exclude: Collection[str] = ()) -> KeyState | None:
        """Past every rotation point and no backup left: the healthy key with the most budget truly left.

        Its last cents are still spendable; the upstream's budget error remains the real limit.
        """
        with self.lock:
            now, threshold = self.clock(), self.threshold()
            candidates = [k for k in self.keys.values() if k.status == Status.HEALTHY and k.id not in exclude
                          and k.effective_spend + k.peer_unsynced < k.budget_limit and not self._verified_spent(k, now)]
            # a key draining alone first: the upstream admits it for sure; one busy draining would refuse. Then
            # the most budget left by the same figure that let it in (peers' fresh spend included)
            return max(candidates, key=lambda k: (self._drains(k, now, threshold),
                                                  k.budget_limit - k.effective_spend - k.peer_unsynced, k.id),
                       default=None)

    def _usable_other(self, old_id: str) -> str | None:
        with self.lock:
            return policy.choose_key(self.views(), None, self.clock(), self.threshold(), exclude={old_id})

    # -- admin (blocking) -----------------------------------------------------------------------
    def add_key(self, key_id: str, api_key: str, budget: float | None) -> bool:
        ok = self.store.insert_key(new_key_doc(key_id, api_key, budget or self.default_budget(), utcnow()))
        if ok:
            self.sync()
        return ok

    def delete_key(self, key_id: str) -> bool:
        ok = self.store.delete_key(key_id)
        if ok:
            with self.lock:
                self.bindings = {c: k for c, k in self.bindings.items() if k != key_id}
            self.sync()
        return ok

    def reset_key(self, key_id: str) -> bool:
        self.writer.flush(timeout=2.0)  # queued increments must not land on top of the reset
        ok = self.store.set_key_fields(key_id, {"status": Status.HEALTHY.value, "tokensUsed": 0, "requestsCount": 0,
                                                "spendEstimate": 0.0, "totalSpend": 0.0, "lastError": None,
                                                "cooldownUntil": None, "replacedBy": None}, unset_ops=False)
        if ok:
            self.sync()
        return ok

    def set_fields(self, key_id: str, fields: dict[str, Any]) -> bool:
        self.writer.flush(timeout=2.0)
        ok = self.store.set_key_fields(key_id, fields)
        if ok:
            self.sync()
        return ok

    def snapshot_public(self) -> list[dict[str, Any]]:
        threshold = self.threshold()
        with self.lock:
            return [k.public(threshold) for k in sorted(self.keys.values(), key=lambda k: k.id)]

    def key_list(self) -> list[KeyState]:
        with self.lock:
            return [KeyState(**k.__dict__) for k in self.keys.values()]

