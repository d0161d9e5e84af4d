"""Sharing reservations: every change the request path pokes about reaches the peers (real SecantusDB).

The request path skips the poke while one is pending (`ReservationSharer.poked`); the publisher takes the
pending poke before it reads our loads, so a change made while it publishes is published by the next round,
never left to the idle interval (set to a minute here: a lost poke would show as a stale entry).
"""
from __future__ import annotations

import threading
import time

import pytest

from addon.core.reservation import KeyLoad, ReservationBook
from addon.store.reservations import ReservationSharer, ReservationStore
from tests.harness import eventually


@pytest.mark.parametrize("changes", [1, 25])
def test_every_poked_change_is_published_without_waiting_for_the_idle_interval(mongo_db, changes):
    book, lock = ReservationBook(), threading.Lock()

    def local_loads(now: float) -> dict[str, KeyLoad]:
        with lock:
            return book.loads(now, 4.0)

    ours = ReservationStore(mongo_db, "side-a")
    peer = ReservationStore(mongo_db, "side-b")
    peer.publish({"": KeyLoad()}, time.time())  # a live peer: the publisher runs at its busy pace, not once a second
    sharer = ReservationSharer(ours, local_loads, lambda loads: None, interval_s=60.0)
    sharer.start()
    try:
        for i in range(changes):
            with lock:
                book.reserve(f"flow-{i}", "k1", 0.01, time.time())
            if not sharer.poked:  # as Pool.reserve pokes
                sharer.poke()
            eventually(lambda want=i + 1: peer.peers(time.time()).get("k1", KeyLoad()).in_flight == want, timeout=20)
        for i in range(changes):
            with lock:
                book.release(f"flow-{i}")
            if not sharer.poked:  # as Pool.release pokes
                sharer.poke()
        eventually(lambda: peer.peers(time.time()).get("k1") == KeyLoad(), timeout=20)
    finally:
        sharer.stop()
