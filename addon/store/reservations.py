"""Sharing in-flight reservations between sidecars (issue 17).

One small document per key in `openhands_reservations` (`_id` "key:<key id>"), with one entry per
sidecar under `by.<sidecar id>`: what that sidecar has riding on the key — reserved dollars, requests
in flight, spend metered in the last few seconds (peers' copy of the key shows it only after their
next sync) — and when it wrote the entry. A sidecar only ever `$set`s its own entry to its own
totals, so a lost or repeated write never drifts (unlike a shared `$inc` counter); an entry not
refreshed for `ttl_s` belongs to a dead sidecar and is ignored, then pruned, and a document nobody
writes is removed by a TTL index, so a sidecar that dies leaks nothing.

Far from a key's point a background thread publishes the changed entries in one bulk write as soon
as they change, and a second one reads the peers' entries (`Pool.peer_loads`); the request path only
pokes them. Near a key's point the pool's
blocking acquire (off the event loop) calls `ReservationSharer.claim`: one `find_one_and_update` that
writes our entry with the new claim in it and returns the key's document, so the peers' claims on the
key are read in the same atomic step. Two sidecars claiming one key at once are serialized by the
database: the later one sees the earlier one's claim.

Every write of our entries takes one lock and reads our totals inside it, so an older snapshot can
never overwrite a newer one.
"""
from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import Any, Callable

import pymongo
from pymongo import ReturnDocument, UpdateOne
from pymongo.errors import PyMongoError

from addon.core.reservation import MAX_PARTS, KeyLoad

log = logging.getLogger(__name__)

RESERVATIONS = "openhands_reservations"
PUBLISH_INTERVAL_S = 0.25  # idle: peers' loads are read this often
MIN_SPACING_S = 0.025      # busy: at most one read of the peers' loads per this, however busy the path
PUBLISH_SPACING_S = 0.005  # busy: between two publications (each one bulk write of what changed)
HEARTBEAT_S = 5.0          # unchanged entries are refreshed this often
TTL_S = 30.0               # an entry older than this belongs to a dead sidecar
CLAIM_TIMEOUT_S = 0.5      # a claim's round trip; past it the pool decides from memory
ALONE_SPACING_S = 1.0      # no live peer seen: publish and read at most this often (database work of a lone
                           # sidecar stays flat under load; a peer that starts is seen within a second)
PRESENCE = ""              # the key id of a sidecar's heartbeat entry (a live peer, whatever it holds)
_PREFIX = "key:"


class ReservationStore:
    """The MongoDB edge: the same database handle as `PoolStore` (`store.db`)."""

    def __init__(self, db: Any, sidecar_id: str, ttl_s: float = TTL_S) -> None:
        self.coll = db[RESERVATIONS]
        self.sidecar_id = sidecar_id
        self.ttl_s = ttl_s
        self._stale: list[tuple[Any, str]] = []  # dead sidecars' entries seen by the last `peers`

    def ensure_indexes(self) -> None:
        try:
            self.coll.create_index("updatedAt", expireAfterSeconds=int(max(self.ttl_s * 4, 60)), name="ttl_updatedAt")
        except PyMongoError as e:  # a server without TTL support still works: readers filter by age
            log.debug("reservation TTL index: %s", e)

    def _update(self, key_id: str, load: KeyLoad, now: float) -> dict[str, Any]:
        at = dt.datetime.fromtimestamp(now, dt.timezone.utc)
        return {"$set": {"keyId": key_id, "updatedAt": at,
                         f"by.{self.sidecar_id}": {"reserved": round(load.reserved, 6), "inFlight": int(load.in_flight),
                                                   "recent": round(load.recent, 6), "t": now,
                                                   "parts": [[s, round(a, 6)] for _, s, a in load.parts]}}}

    def publish(self, loads: dict[str, KeyLoad], now: float) -> None:
        """Write this sidecar's totals for the given keys (zeros for keys whose load ended)."""
        if not loads:
            return
        ops = [UpdateOne({"_id": _PREFIX + key_id}, self._update(key_id, load, now), upsert=True)
               for key_id, load in loads.items()]
        self.coll.bulk_write(ops, ordered=False)

    def claim(self, key_id: str, load: KeyLoad, now: float) -> KeyLoad:
        """Write our totals on one key and read every live peer's, in one atomic step."""
        doc = self.coll.find_one_and_update({"_id": _PREFIX + key_id}, self._update(key_id, load, now),
                                            projection={"by": 1}, upsert=True, return_document=ReturnDocument.AFTER)
        total = KeyLoad()
        for sidecar, entry in _entries(doc):
            if sidecar != self.sidecar_id and now - _num(entry.get("t")) <= self.ttl_s:
                total = total + _load(entry, sidecar)
        return total

    def peers(self, now: float) -> dict[str, KeyLoad]:
        """Sum of every other live sidecar's load, per key. Keys a live peer holds nothing on are listed
        with a zero load, and every live peer's heartbeat as `PRESENCE` (""): an empty result means no
        peer is at work (then near-the-point claims are skipped and header floors are stored)."""
        since = dt.datetime.fromtimestamp(now - self.ttl_s, dt.timezone.utc)
        out: dict[str, KeyLoad] = {}
        stale: list[tuple[Any, str]] = []
        for doc in self.coll.find({"updatedAt": {"$gte": since}}, {"keyId": 1, "by": 1}):
            key_id = doc.get("keyId")
            if not isinstance(key_id, str):
                continue
            for sidecar, entry in _entries(doc):
                if sidecar == self.sidecar_id:
                    continue
                if now - _num(entry.get("t")) > self.ttl_s:
                    stale.append((doc["_id"], sidecar))
                    continue
                out[key_id] = out.get(key_id, KeyLoad()) + _load(entry, sidecar)
        self._stale = stale
        return out

    def prune(self, now: float) -> int:
        """Drop dead sidecars' entries seen by the last `peers` (only if still not refreshed)."""
        stale, self._stale = self._stale, []
        for doc_id, sidecar in stale:
            self.coll.update_one({"_id": doc_id, f"by.{sidecar}.t": {"$lt": now - self.ttl_s}},
                                 {"$unset": {f"by.{sidecar}": ""}})
        return len(stale)

    def withdraw(self) -> None:
        """On a clean stop: this sidecar holds nothing any more."""
        self.coll.update_many({f"by.{self.sidecar_id}": {"$exists": True}}, {"$unset": {f"by.{self.sidecar_id}": ""}})


def _entries(doc: Any) -> list[tuple[str, dict[str, Any]]]:
    by = doc.get("by") if isinstance(doc, dict) else None
    if not isinstance(by, dict):
        return []
    return [(str(s), e) for s, e in by.items() if isinstance(e, dict)]


def _load(entry: dict[str, Any], sidecar: str) -> KeyLoad:
    reserved, in_flight = _num(entry.get("reserved")), int(_num(entry.get("inFlight")))
    recent = _num(entry.get("recent"))
    if "parts" not in entry:  # an older sidecar: its fresh spend is load only (see KeyLoad.legacy)
        return KeyLoad(reserved, in_flight, legacy=recent)
    return KeyLoad(reserved, in_flight, recent, _parts(entry.get("parts"), sidecar))


def _parts(v: Any, sidecar: str) -> tuple[tuple[str, int, float], ...]:
    """The parts of a peer's fresh spend, checked: [sequence number, dollars] pairs of real, non-negative
    numbers, a bounded few (junk is left out: its cost then counts until it expires, never too little). The
    sidecar id is the writer prefix of its op ids (`Pool._op_prefix`)."""
    if not isinstance(v, list):
        return ()
    out = []
    for pair in v[:MAX_PARTS]:
        if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int) and not isinstance(pair[0], bool) \
                and pair[0] >= 0:
            out.append((sidecar, pair[0], _num(pair[1])))
    return tuple(out)


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and 0 <= v < 1e10 else 0.0


class ReservationSharer(threading.Thread):
    """Publishes our loads when they change (or every heartbeat), refreshes the peers' loads, and
    makes a claim near a key's point visible to peers at once (`claim`, off the event loop)."""

    def __init__(self, store: ReservationStore, local_loads: Callable[[float], dict[str, KeyLoad]],
                 set_peer_loads: Callable[[dict[str, KeyLoad]], None], clock: Callable[[], float] = time.time,
                 interval_s: float = PUBLISH_INTERVAL_S) -> None:
        super().__init__(name="openhands-reservations", daemon=True)
        self.store = store
        self.local_loads = local_loads
        self.set_peer_loads = set_peer_loads
        self.clock = clock
        self.interval_s = interval_s
        self._wake = threading.Event()
        # Up from a poke until the publisher takes it (cleared after `_wake`, before our loads are read): the
        # request path reads this plain attribute and skips the poke when it is up (no call per request).
        self.poked = False
        self._read_wake = threading.Event()
        self._stop = threading.Event()
        self._last_prune = 0.0
        self.alone = False  # the last read saw no live peer (until the first read: assume peers)
        self._write = threading.Lock()  # one writer of our entries at a time, totals read inside it
        self._published: dict[str, KeyLoad] = {}
        self._last_heartbeat = 0.0
        self.passes = 0
        self.errors = 0
        self.claims = 0
        self.claim_errors = 0

    def poke(self) -> None:
        """Cheap, from the request path: something changed, publish soon (Event.set takes a lock; most
        pokes find `poked` already up)."""
        if not self.poked:
            self.poked = True
            self._wake.set()

    def claim(self, key_id: str, timeout_s: float = CLAIM_TIMEOUT_S) -> KeyLoad | None:
        """Blocking: publish our load on `key_id` now (the caller's claim is in it) and return the live
        peers' load on the key read in the same step; None if the database did not answer in time."""
        try:
            with self._write, pymongo.timeout(timeout_s):
                now = self.clock()
                load = self.local_loads(now).get(key_id, KeyLoad())
                peers = self.store.claim(key_id, load, now)
                self._published[key_id] = load
            self.claims += 1
            return peers
        except PyMongoError as e:
            self.claim_errors += 1
            log.debug("reservation claim failed: %s", e.__class__.__name__)
            return None

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout)
        try:
            self.store.withdraw()
        except PyMongoError:
            pass

    def run(self) -> None:
        """Publishes as soon as something changed (one write at a time); a second thread reads the
        peers, so a slow read never delays our next publication."""
        try:
            self.store.ensure_indexes()
        except Exception:  # noqa: BLE001 - never let the thread die on start-up
            pass
        reader = threading.Thread(target=self._read_loop, name="openhands-reservations-read", daemon=True)
        reader.start()
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            self.poked = False  # after the clear: a poke from now on sets `_wake` again (none is lost)
            if self._stop.is_set():
                break
            self._guarded(self.publish_once)
            self._read_wake.set()
            self._stop.wait(ALONE_SPACING_S if self.alone else PUBLISH_SPACING_S)
        self._read_wake.set()
        reader.join(2.0)

    def _read_loop(self) -> None:
        while not self._stop.is_set():
            self._read_wake.wait(self.interval_s)
            self._read_wake.clear()
            if self._stop.is_set():
                return
            self._guarded(self.read_once)
            self._stop.wait(ALONE_SPACING_S if self.alone else MIN_SPACING_S)

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            step()
        except PyMongoError as e:
            self.errors += 1
            log.debug("reservation sharing failed: %s", e.__class__.__name__)
        except Exception as e:  # noqa: BLE001
            self.errors += 1
            log.debug("reservation sharing failed: %r", e)

    def pass_once(self) -> None:
        """One publication, then one read (tests; the threads run these two steps apart)."""
        self.publish_once()
        self.read_once()

    def publish_once(self) -> None:
        with self._write:
            now = self.clock()
            loads = self.local_loads(now)
            heartbeat = now - self._last_heartbeat >= HEARTBEAT_S
            changed = {k: v for k, v in loads.items() if heartbeat or self._published.get(k) != v}
            changed.update({k: KeyLoad() for k in self._published if k not in loads})
            if heartbeat:  # presence: peers know this sidecar is at work even while it holds nothing
                changed[PRESENCE] = KeyLoad()
            if changed:
                self.store.publish(changed, now)
                if heartbeat:
                    self._last_heartbeat = now
                self._published = dict(loads)
        self.passes += 1

    def read_once(self) -> None:
        now = self.clock()
        peers = self.store.peers(now)
        self.alone = not peers
        self.set_peer_loads(peers)
        if now - self._last_prune >= HEARTBEAT_S:
            self._last_prune = now
            self.store.prune(now)
