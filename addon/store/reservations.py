"""Sharing in-flight reservations between sidecars (issue 17), off the request path.

One small document per (sidecar, key) in `openhands_reservations`: what this sidecar has riding on
the key — reserved dollars, requests in flight, spend metered in the last few seconds (peers' copy
of the key shows it only after their next sync). A background thread publishes the changed documents
in one bulk write (`$set` of this sidecar's own totals, so a lost or repeated write never drifts,
unlike a shared `$inc` counter) and reads the peers' documents; a document not refreshed for
`ttl_s` is ignored and, through a TTL index, removed, so a sidecar that dies leaks nothing.

The request path only reads `Pool.peer_loads` and pokes the thread; every database call runs here.
Near a key's rotation point the pool's blocking acquire (off the event loop) waits for one pass
(`confirm`) so its claim is visible to peers before the request goes upstream.
"""
from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import Any, Callable

from pymongo import UpdateOne
from pymongo.errors import PyMongoError

from addon.core.reservation import KeyLoad

log = logging.getLogger(__name__)

RESERVATIONS = "openhands_reservations"
PUBLISH_INTERVAL_S = 0.25  # idle: peers' loads are read this often
MIN_SPACING_S = 0.025      # busy: at most one pass (one bulk write, one read) per this, however busy the path
HEARTBEAT_S = 5.0          # unchanged documents are refreshed this often
TTL_S = 30.0               # a document older than this belongs to a dead sidecar
PRESENCE = ""              # the key id of a sidecar's heartbeat document (a live peer, whatever it holds)


class ReservationStore:
    """The MongoDB edge: the same database handle as `PoolStore` (`store.db`)."""

    def __init__(self, db: Any, sidecar_id: str, ttl_s: float = TTL_S) -> None:
        self.coll = db[RESERVATIONS]
        self.sidecar_id = sidecar_id
        self.ttl_s = ttl_s

    def ensure_indexes(self) -> None:
        try:
            self.coll.create_index("updatedAt", expireAfterSeconds=int(max(self.ttl_s * 4, 60)), name="ttl_updatedAt")
        except PyMongoError as e:  # a server without TTL support still works: readers filter by age
            log.debug("reservation TTL index: %s", e)

    def publish(self, loads: dict[str, KeyLoad], now: float) -> None:
        """Write this sidecar's totals for the given keys (zeros for keys whose load ended)."""
        if not loads:
            return
        at = dt.datetime.fromtimestamp(now, dt.timezone.utc)
        ops = [UpdateOne({"_id": f"{self.sidecar_id}:{key_id}"},
                         {"$set": {"keyId": key_id, "sidecar": self.sidecar_id, "reserved": round(load.reserved, 6),
                                   "inFlight": int(load.in_flight), "recent": round(load.recent, 6),
                                   "updatedAt": at}}, upsert=True)
               for key_id, load in loads.items()]
        self.coll.bulk_write(ops, ordered=False)

    def peers(self, now: float) -> dict[str, KeyLoad]:
        """Sum of every other live sidecar's load, per key. Keys a live peer holds nothing on are listed
        with a zero load, and every live peer's heartbeat as `PRESENCE` (""): an empty result means no
        peer is at work (then near-the-point confirmation is skipped and header floors are stored)."""
        since = dt.datetime.fromtimestamp(now - self.ttl_s, dt.timezone.utc)
        out: dict[str, KeyLoad] = {}
        for doc in self.coll.find({"sidecar": {"$ne": self.sidecar_id}, "updatedAt": {"$gte": since}},
                                  {"keyId": 1, "reserved": 1, "inFlight": 1, "recent": 1}):
            key_id = doc.get("keyId")
            if not isinstance(key_id, str):
                continue
            load = KeyLoad(_num(doc.get("reserved")), int(_num(doc.get("inFlight"))), _num(doc.get("recent")))
            out[key_id] = out.get(key_id, KeyLoad()) + load
        return out

    def withdraw(self) -> None:
        """On a clean stop: this sidecar holds nothing any more."""
        self.coll.delete_many({"sidecar": self.sidecar_id})


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and 0 <= v < 1e9 else 0.0


class ReservationSharer(threading.Thread):
    """Publishes our loads when they change (or every heartbeat) and refreshes the peers' loads.

    `confirm` (called off the event loop) waits for one pass that starts after the call: our loads as
    they are now are then in the database and the peers' loads were read after that write. Two sidecars
    claiming one key at once therefore cannot both miss each other (each writes, then reads): at least
    the later one sees the other's claim, which is what near-the-point admission relies on.
    """

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
        self._stop = threading.Event()
        self._published: dict[str, KeyLoad] = {}
        self._last_heartbeat = 0.0
        self.passes = 0
        self.errors = 0
        self._cv = threading.Condition()
        self._begun = 0   # passes begun
        self._ended = 0  # passes ended (ok or not)
        self._ok = 0        # the last pass that ended without error
        self._waiters = 0
        self.confirms = 0

    def poke(self) -> None:
        """Cheap, from the request path: something changed, publish soon."""
        self._wake.set()

    def confirm(self, timeout_s: float) -> bool:
        """Blocking: True once a pass begun after this call published our loads and read the peers'
        (False on a timeout, a database error or a sharer not running: the caller decides on what it has)."""
        if not self.is_alive() or self._stop.is_set():
            return False
        with self._cv:
            target = self._begun + 1
            self._waiters += 1
            self._wake.set()
            try:
                self._cv.wait_for(lambda: self._ended >= target or self._stop.is_set(), timeout_s)
            finally:
                self._waiters -= 1
            self.confirms += 1
            return self._ok >= target

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
        try:
            self.store.ensure_indexes()
        except Exception:  # noqa: BLE001 - never let the thread die on start-up
            pass
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            with self._cv:
                self._begun += 1
                gen = self._begun
            ok = False
            try:
                self.pass_once()
                ok = True
            except PyMongoError as e:
                self.errors += 1
                log.debug("reservation sharing failed: %s", e.__class__.__name__)
            except Exception as e:  # noqa: BLE001
                self.errors += 1
                log.debug("reservation sharing failed: %r", e)
            with self._cv:
                self._ended = gen
                if ok:
                    self._ok = gen
                self._cv.notify_all()
                waiting = self._waiters > 0
            if not waiting:  # a request waiting for a confirmation is not kept waiting by the spacing
                self._stop.wait(MIN_SPACING_S)
        with self._cv:
            self._cv.notify_all()

    def pass_once(self) -> None:
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
        self.set_peer_loads(self.store.peers(now))
        self.passes += 1
