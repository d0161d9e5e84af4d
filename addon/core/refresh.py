"""When to refresh something that needs a usable pool key (the upstream's `/v1/model/info` prices).

Pure: the caller supplies the clock and reports each try. A try made while no key is usable does not
count, so a sidecar started with an empty pool loads prices as soon as the first key arrives, not an
interval later; after a load the next one is an interval away, after a failure a shorter retry delay.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Outcome(Enum):
    LOADED = "loaded"
    NO_KEY = "no_key"  # nothing usable to ask with: ask again at the next tick
    FAILED = "failed"  # asked, got no prices (upstream down, non-200, bad body)


@dataclass
class RefreshSchedule:
    interval_s: float
    retry_s: float
    next_at: float = 0.0  # due at once

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def record(self, now: float, outcome: Outcome) -> None:
        if outcome is Outcome.LOADED:
            self.next_at = now + self.interval_s
        elif outcome is Outcome.FAILED:
            self.next_at = now + self.retry_s
        # NO_KEY: stay due
