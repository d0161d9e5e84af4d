"""When the upstream's prices are fetched: at once when a usable key exists, then hourly (pure schedule)."""
from __future__ import annotations

import pytest

from addon.core.refresh import Outcome, RefreshSchedule

H, RETRY = 3600.0, 300.0


@pytest.mark.parametrize("tries,next_at", [
    ([], 0.0),                                                    # a new sidecar tries at its first tick
    ([(t, Outcome.NO_KEY) for t in (2, 4, 6, 8)], 0.0),           # an empty pool never consumes the timer
    ([(2, Outcome.NO_KEY), (4, Outcome.LOADED)], 4 + H),          # first key: loaded at once, then hourly
    ([(2, Outcome.FAILED)], 2 + RETRY),                           # upstream down: retried sooner than an hour
    ([(2, Outcome.FAILED), (2 + RETRY, Outcome.LOADED)], 2 + RETRY + H),
    ([(2, Outcome.LOADED), (2 + H, Outcome.NO_KEY)], 2 + H),      # keys gone at the hour: retried each tick
])
def test_schedule(tries, next_at):
    s = RefreshSchedule(interval_s=H, retry_s=RETRY)
    for t, outcome in tries:
        assert s.due(t), t
        s.record(t, outcome)
    assert s.next_at == next_at


def test_not_due_between_loads():
    s = RefreshSchedule(interval_s=H, retry_s=RETRY)
    s.record(100.0, Outcome.LOADED)
    assert not s.due(100.0 + H - 1) and s.due(100.0 + H)
