"""Event counters behind `GET /metrics`: requests, metered dollars and tokens, rotations, budget
errors, retries, 429s for lack of a key.

Pure (threading only), so the request path can count without importing the exposition library: each
call is one lock and a dict increment. `addon/operator/metrics.py` turns them into Prometheus families
at scrape time. Label values are key ids, models, formats and reasons, never a key.
"""
from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from typing import Any, Mapping

ROTATION_REASONS = ("proactive", "budget_error", "spend_checker", "invalid", "admin")
RETRY_OUTCOMES = ("ok", "refused", "unreachable")
TOKEN_KINDS = ("input", "cache_write", "cache_read", "output")
NO_KEY = "none"  # label of requests that never got a pool key


def label_value(value: Any, default: str = "unknown", limit: int = 128) -> str:
    """A label value: a short printable string (never a key: callers pass ids, models, formats)."""
    if not isinstance(value, str) or not value:
        return default
    return value[:limit]


class Metrics:
    """The event counters; thread-safe (the loop and worker threads record into it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)       # key id, format, outcome
        self.dollars: dict[tuple[str, str], float] = defaultdict(float)          # key id, model
        self.tokens: dict[tuple[str, str, str], int] = defaultdict(int)          # key id, model, kind
        self.rotations: dict[str, int] = {r: 0 for r in ROTATION_REASONS}
        self.budget_errors: dict[str, int] = defaultdict(int)                    # key id
        self.retries: dict[str, int] = {o: 0 for o in RETRY_OUTCOMES}
        self.no_key = 0
        self.started_at = time.time()

    # -- recording (called by the hooks) ------------------------------------------------------
    def count_request(self, key_id: str | None, fmt: str | None, outcome: str) -> None:
        k = (label_value(key_id, NO_KEY), label_value(fmt, "other"), label_value(outcome))
        with self._lock:
            self.requests[k] += 1

    def record_metered(self, key_id: str, model: str | None, cost: float, tokens: Mapping[str, int] | None) -> None:
        key, mdl = label_value(key_id, NO_KEY), label_value(model)
        with self._lock:
            if isinstance(cost, (int, float)) and math.isfinite(cost) and cost > 0:
                self.dollars[(key, mdl)] += float(cost)
            elif (key, mdl) not in self.dollars:
                self.dollars[(key, mdl)] = 0.0
            for kind, n in (tokens or {}).items():
                if kind in TOKEN_KINDS and isinstance(n, int) and not isinstance(n, bool) and n > 0:
                    self.tokens[(key, mdl, kind)] += n

    def count_flow(self, key_id: str | None, fmt: str | None, outcome: str, metered: bool = False,
                   model: str | None = None, cost: Any = None, tokens: Any = None) -> None:
        """One finished flow: its request count and, when metered, its dollars and tokens (one lock)."""
        key = key_id if isinstance(key_id, str) and key_id else NO_KEY
        req = (key, fmt if isinstance(fmt, str) and fmt else "other", outcome)
        if not metered:
            with self._lock:
                self.requests[req] += 1
            return
        mdl = label_value(model)
        dollars = float(cost) if isinstance(cost, (int, float)) and math.isfinite(cost) and cost > 0 else 0.0
        counts = [(kind, n) for kind, n in tokens.items() if kind in TOKEN_KINDS and type(n) is int and n > 0] \
            if isinstance(tokens, dict) else []
        with self._lock:
            self.requests[req] += 1
            self.dollars[(key, mdl)] += dollars
            for kind, n in counts:
                self.tokens[(key, mdl, kind)] += n

    def count_rotation(self, reason: str) -> None:
        reason = reason if reason in ROTATION_REASONS else "other"
        with self._lock:
            self.rotations[reason] = self.rotations.get(reason, 0) + 1

    def count_budget_error(self, key_id: str | None) -> None:
        with self._lock:
            self.budget_errors[label_value(key_id, NO_KEY)] += 1

    def count_retry(self, outcome: str) -> None:
        with self._lock:
            self.retries[outcome] = self.retries.get(outcome, 0) + 1

    def count_no_key(self) -> None:
        with self._lock:
            self.no_key += 1

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of every counter (for the collector and for tests)."""
        with self._lock:
            return {"requests": dict(self.requests), "dollars": dict(self.dollars), "tokens": dict(self.tokens),
                    "rotations": dict(self.rotations), "budget_errors": dict(self.budget_errors),
                    "retries": dict(self.retries), "no_key": self.no_key}


def outcome_of(status: int | None, *, rejected: str | None = None, dropped: bool = False) -> str:
    """The `outcome` label of one finished request."""
    if rejected == "no_key":
        return "no_key"
    if rejected:
        return "rejected"
    if dropped:
        return "dropped"
    if status is None:
        return "error"
    if 200 <= status < 300:
        return "ok"
    if status == 429:
        return "rate_limited"
    if 400 <= status < 500:
        return "client_error"
    if status >= 500:
        return "server_error"
    return "other"
