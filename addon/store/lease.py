"""One spend poller per pool: a lease document in MongoDB that sidecars sharing a database contend for.

Polling the upstream from every sidecar would multiply the activity-endpoint load and race the
proactive rotations; so exactly one sidecar holds the lease (`openhands_leases`, `_id:
"spend_checker"`, `owner`, `expiresAt`) and polls. The holder renews it well before it expires; when
the holder dies, its lease simply runs out and the next sidecar to try takes it over, so a dead
poller is replaced within one lease period. A clean stop releases the lease at once.

Acquire and renew are one atomic `find_one_and_update` whose filter matches only a lease that is
expired or already ours; upsert creates the document the first time. When the filter does not match
because someone else holds a live lease, the upsert collides with the existing `_id`, and that
DuplicateKeyError is simply "not ours".

Times are wall-clock epoch seconds, because the lease is shared between processes (and hosts):
sidecars must keep their clocks roughly in sync (NTP), as with any lease.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Any, Callable

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

from addon.store.mongo import to_datetime, to_epoch

log = logging.getLogger(__name__)

LEASE_ID = "spend_checker"
LOOK_EVERY_S = 30.0  # a standby re-reads who holds the lease (for stats) at most this often


def new_owner_id() -> str:
    """Readable and unique per process run: host, pid and a random suffix (a restarted pid differs)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def renew_due(held_until: float | None, now: float, period: float) -> bool:
    """Renew once a third of the period has passed, so two renewals can fail before the lease lapses."""
    return held_until is None or now >= held_until - period * 2 / 3


class SpendLease:
    """The lease as one sidecar sees it. `hold(now)` is called by the checker before each piece of work."""

    def __init__(self, collection: Any, *, period_s: float, owner: str | None = None,
                 clock: Callable[[], float] = time.time, lease_id: str = LEASE_ID) -> None:
        self.collection = collection
        self.period_s = float(period_s)
        self.owner = owner or new_owner_id()
        self.clock = clock
        self.lease_id = lease_id
        self.held_until: float | None = None  # our lease's expiry as last written by us
        self.holder: str | None = None  # who held it at our last look (us or someone else)
        self._error_logged = False
        self._looked_at: float | None = None

    @property
    def is_held(self) -> bool:
        return self.held_until is not None and self.clock() < self.held_until

    def hold(self, now: float | None = None) -> bool:
        """True when this sidecar holds the lease now (acquiring or renewing it if due). Never raises."""
        now = self.clock() if now is None else now
        if self.held_until is not None and now < self.held_until and not renew_due(self.held_until, now, self.period_s):
            return True
        return self._acquire(now)

    def _acquire(self, now: float) -> bool:
        had = self.held_until is not None and now < self.held_until
        expires = now + self.period_s
        try:
            doc = self.collection.find_one_and_update(
                {"_id": self.lease_id, "$or": [{"owner": self.owner}, {"expiresAt": {"$lt": to_datetime(now)}}]},
                {"$set": {"owner": self.owner, "expiresAt": to_datetime(expires), "renewedAt": to_datetime(now)}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            doc = None  # a live lease held by someone else: the upsert collided with its _id
        except PyMongoError as e:
            if not self._error_logged:
                self._error_logged = True
                log.warning("🔒 [OpenHands/SpendChecker] lease unavailable (%s); polling %s",
                            e.__class__.__name__, "continues until our lease runs out" if had else "paused")
            # Keep polling only while the lease we already hold is still valid.
            if self.held_until is not None and now >= self.held_until:
                self.held_until = None
            return self.held_until is not None
        self._error_logged = False
        if doc is not None and doc.get("owner") == self.owner:
            if not had:
                log.info("🔒 [OpenHands/SpendChecker] this sidecar is the spend poller (lease %gs, owner %s)",
                         self.period_s, self.owner)
            self.held_until, self.holder = expires, self.owner
            return True
        if had or self.held_until is not None:
            log.warning("🔒 [OpenHands/SpendChecker] lost the spend-poller lease; another sidecar polls now")
        self.held_until = None
        # A standby tries every tick (so a released lease is taken over at once): one atomic attempt,
        # and only now and then a second read to learn the holder's name.
        if self._looked_at is None or now - self._looked_at >= LOOK_EVERY_S or self.holder in (None, self.owner):
            self._look(now)
        return False

    def _look(self, now: float) -> None:
        """Remember who holds it, for stats; best effort."""
        self._looked_at = now
        try:
            doc = self.collection.find_one({"_id": self.lease_id})
        except PyMongoError:
            return
        holder = doc.get("owner") if doc else None
        if holder != self.holder and holder and holder != self.owner:
            log.info("🔒 [OpenHands/SpendChecker] %s polls spend for this pool; this sidecar stands by", holder)
        self.holder = holder

    def release(self) -> None:
        """Expire our lease now so another sidecar takes over at its next tick. Never raises."""
        if self.held_until is None:
            return
        self.held_until = None
        try:
            self.collection.update_one({"_id": self.lease_id, "owner": self.owner},
                                       {"$set": {"expiresAt": to_datetime(0.0)}})
        except PyMongoError as e:
            log.debug("lease release failed: %s", e)

    def info(self) -> dict[str, Any]:
        """For the stats endpoint: whether we poll, and who does."""
        return {"owner": self.owner, "held": self.is_held, "holder": self.holder,
                "period_seconds": self.period_s}


def read_lease(collection: Any, lease_id: str = LEASE_ID) -> dict[str, Any] | None:
    """The lease document with `expiresAt` as epoch seconds (tests and diagnostics)."""
    doc = collection.find_one({"_id": lease_id})
    if doc is None:
        return None
    return {**doc, "expiresAt": to_epoch(doc.get("expiresAt"))}
