"""Event counters behind `GET /metrics`: requests, metered dollars and tokens, rotations, budget
errors, retries, 429s for lack of a key.

Pure (threading only), so the request path can count without importing the exposition library: each
call is one lock and a dict increment. `addon/operator/metrics.py` turns them into Prometheus families
at scrape time. Label values are key ids, models, formats and reasons, never a key.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict, deque
from typing import Any, Mapping

log = logging.getLogger(__name__)

ROTATION_REASONS = ("proactive", "budget_error", "spend_checker", "invalid", "admin")
RETRY_OUTCOMES = ("ok", "refused", "unreachable")
TOKEN_KINDS = ("input", "cache_write", "cache_read", "output")
NO_KEY = "none"  # label of requests that never got a pool key
FLOWS_HELD = 256  # finished flows `flow_done` holds before it counts them (every read counts them first)


def label_value(value: Any, default: str = "unknown", limit: int = 128) -> str:
    """A label value: a short printable string (never a key: callers pass ids, models, formats)."""
    if not isinstance(value, str) or not value:
        return default
    return value[:limit]


class Metrics:
    """The event counters; thread-safe (the loop and worker threads record into it).

    A finished flow is one look-up and one increment: its tally, keyed by the facts as the flow state
    holds them (key id, format, outcome, and the model when metered), is `[flows, sums]`, where `sums`
    is the (key id, model) list `[dollars, input, cache_write, cache_read, output]` the tally shares with
    every other tally of that pair (None when nothing was metered). Label values are made once, when a
    tally is new; the `requests` family is summed from the tallies only when read, at scrape time.

    The flow observer hands each finished flow over with `flow_done` (its stored state, status, whether it
    dropped), which only queues it: the flows are counted FLOWS_HELD at a time, and before any read. Counting
    one flow at once is the same work, but its code (three functions) would then run cold between mitmproxy's
    work on every response, where the CPU pays far more for code it must fetch again than for running it
    (README, Performance: the sidecar's L2 misses); counted in a batch it runs warm.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tallies: dict[tuple[Any, Any, str, Any], list[Any]] = {}  # key id, format, outcome, model
        self._metered: dict[tuple[str, str], list[Any]] = {}             # key id, model -> sums
        self.rotations: dict[str, int] = {r: 0 for r in ROTATION_REASONS}
        self.budget_errors: dict[str, int] = defaultdict(int)                    # key id
        self.retries: dict[str, int] = {o: 0 for o in RETRY_OUTCOMES}
        self._no_key = 0
        self._done: deque[tuple[Any, int | None, bool]] = deque()  # finished flows not counted yet (`flow_done`)
        self.started_at = time.time()

    def _sums(self, key: str, mdl: str) -> list[Any]:
        """The (key id, model) sums, made on first use (caller holds the lock)."""
        sums = self._metered.get((key, mdl))
        if sums is None:
            sums = self._metered[(key, mdl)] = [0.0, 0, 0, 0, 0]
        return sums

    def _tally(self, facts: tuple[Any, Any, str, Any]) -> list[Any]:
        """A new tally: its labels and, when metered, the pair's sums it adds to (caller holds the lock)."""
        key_id, fmt, outcome, model = facts
        key = key_id if isinstance(key_id, str) and key_id else NO_KEY
        labels = (key, fmt if isinstance(fmt, str) and fmt else "other", outcome)
        sums = None if model is None else self._sums(key, model[:128] if type(model) is str and model
                                                     else label_value(model))
        tally = self._tallies[facts] = [0, sums, labels]
        return tally

    # -- recording (called by the hooks) ------------------------------------------------------
    def flow_done(self, state: Mapping[str, Any], status: int | None, dropped: bool) -> None:
        """One finished flow, by its stored flow state (`FlowState.to_json`): queued, counted with the next
        FLOWS_HELD or the next read, whichever comes first (deque appends and pops are atomic: no lock here)."""
        done = self._done
        done.append((state, status, dropped))
        if len(done) >= FLOWS_HELD:
            with self._lock:
                self._count_done()

    def _count_done(self) -> None:
        """Count the queued flows (caller holds the lock). A state nothing can count (a hand-edited flow's) is
        skipped, as the hook that counted it at once used to fail on it alone: a scrape never fails for it."""
        done = self._done
        while True:
            try:
                state, status, dropped = done.popleft()
            except IndexError:
                return
            try:
                self._count_state(state, status, dropped)
            except Exception:  # noqa: BLE001 - one flow's counters, never the scrape
                log.debug("flow state not counted: %r", state, exc_info=True)

    def _count_state(self, state: Mapping[str, Any], status: int | None, dropped: bool) -> None:
        """What a finished flow's state says: its outcome, and its dollars and tokens when metered (caller holds
        the lock)."""
        rejected = state.get("rejected")
        if rejected is not None and not isinstance(rejected, str):
            rejected = None
        if rejected == "no_key":
            self._no_key += 1
        if dropped and status is None:
            outcome = "connection_error"
        elif rejected is None and not dropped and status is not None and 200 <= status < 300:
            outcome = "ok"  # the usual case (what `outcome_of` says of it)
        else:
            outcome = outcome_of(status, rejected=rejected, dropped=dropped)
        key_id = None if rejected else state.get("key_id")
        self._count_flow(key_id, state.get("format"), outcome, bool(state.get("metered")) and bool(key_id),
                         state.get("model"), state.get("cost"), state.get("tokens"))

    def count_request(self, key_id: str | None, fmt: str | None, outcome: str) -> None:
        """One finished request, nothing metered."""
        self.count_flow(label_value(key_id, NO_KEY), label_value(fmt, "other"), label_value(outcome))

    def record_metered(self, key_id: str, model: str | None, cost: float, tokens: Mapping[str, int] | None) -> None:
        """Dollars and tokens metered, no request counted."""
        key, mdl = label_value(key_id, NO_KEY), label_value(model)
        with self._lock:
            sums = self._sums(key, mdl)
            if isinstance(cost, (int, float)) and math.isfinite(cost) and cost > 0:
                sums[0] += float(cost)
            for kind, n in (tokens or {}).items():
                i = _KIND_INDEX.get(kind)
                if i is not None and isinstance(n, int) and not isinstance(n, bool) and n > 0:
                    sums[i] += n

    def count_flow(self, key_id: str | None, fmt: str | None, outcome: str, metered: bool = False,
                   model: str | None = None, cost: Any = None, tokens: Any = None) -> None:
        """One finished flow: its request count and, when metered, its dollars and tokens (one lock, one look-up)."""
        with self._lock:
            self._count_flow(key_id, fmt, outcome, metered, model, cost, tokens)

    def _count_flow(self, key_id: str | None, fmt: str | None, outcome: str, metered: bool, model: str | None,
                    cost: Any, tokens: Any) -> None:
        """`count_flow` (caller holds the lock)."""
        if not metered:
            facts: tuple[Any, Any, str, Any] = (key_id, fmt, outcome, None)
            try:
                tally = self._tallies.get(facts) or self._tally(facts)
            except TypeError:  # a value no dict key can be (a hand-edited flow state): counted by its label
                tally = self._hashable((key_id, fmt, outcome, None))
            tally[0] += 1
            return
        if model is None:
            model = ""  # (None marks "not metered": `_tally` labels it like any other model that is no string)
        if type(cost) is float:
            dollars = cost if 0.0 < cost < math.inf else 0.0
        else:
            dollars = float(cost) if isinstance(cost, (int, float)) else 0.0
            if not (dollars > 0 and math.isfinite(dollars)):
                dollars = 0.0
        if type(tokens) is dict:
            get = tokens.get
            i, cw, cr, o = get("input"), get("cache_write"), get("cache_read"), get("output")
            i = i if type(i) is int and i > 0 else 0
            cw = cw if type(cw) is int and cw > 0 else 0
            cr = cr if type(cr) is int and cr > 0 else 0
            o = o if type(o) is int and o > 0 else 0
        else:
            i = cw = cr = o = 0
        facts = (key_id, fmt, outcome, model)
        try:
            tally = self._tallies.get(facts) or self._tally(facts)
        except TypeError:
            tally = self._hashable(facts)
        tally[0] += 1
        sums = tally[1]
        sums[0] += dollars
        sums[1] += i
        sums[2] += cw
        sums[3] += cr
        sums[4] += o

    def _hashable(self, facts: tuple[Any, Any, str, Any]) -> list[Any]:
        """The tally of facts some of which cannot be a dict key: keyed by what their labels would be."""
        key_id, fmt, outcome, model = facts
        safe = (key_id if isinstance(key_id, str) else None, fmt if isinstance(fmt, str) else None, outcome,
                None if model is None else model if isinstance(model, str) else "")
        return self._tallies.get(safe) or self._tally(safe)

    # -- reading (scrape time) ----------------------------------------------------------------
    @property
    def requests(self) -> dict[tuple[str, str, str], int]:
        """Finished flows by (key id, format, outcome)."""
        with self._lock:
            self._count_done()
            return self._requests()

    def _requests(self) -> dict[tuple[str, str, str], int]:
        out: dict[tuple[str, str, str], int] = {}
        for n, _, labels in self._tallies.values():
            out[labels] = out.get(labels, 0) + n
        return out

    @property
    def dollars(self) -> dict[tuple[str, str], float]:
        """Metered dollars by (key id, model), materialized (every metered pair, $0 included)."""
        with self._lock:
            self._count_done()
            return {k: v[0] for k, v in self._metered.items()}

    @property
    def tokens(self) -> dict[tuple[str, str, str], int]:
        """Metered tokens by (key id, model, kind), materialized (kinds with none left out)."""
        with self._lock:
            self._count_done()
            return self._tokens()

    def _tokens(self) -> dict[tuple[str, str, str], int]:
        return {(key, mdl, kind): sums[i] for (key, mdl), sums in self._metered.items()
                for kind, i in _KIND_INDEX.items() if sums[i]}

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
            self._no_key += 1

    @property
    def no_key(self) -> int:
        """Requests answered with a 429 for lack of a usable key."""
        with self._lock:
            self._count_done()
            return self._no_key

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of every counter (for the collector and for tests)."""
        with self._lock:
            self._count_done()
            return {"requests": self._requests(), "dollars": {k: v[0] for k, v in self._metered.items()},
                    "tokens": self._tokens(), "rotations": dict(self.rotations),
                    "budget_errors": dict(self.budget_errors), "retries": dict(self.retries), "no_key": self._no_key}


_KIND_INDEX = {kind: i for i, kind in enumerate(TOKEN_KINDS, start=1)}  # TOKEN_KINDS -> place in the sums


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
