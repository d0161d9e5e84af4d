"""Spend checker: polls the upstream's own spend figure per key on one background thread.

Metering counts what passes through this sidecar; the upstream's `/user/daily/activity` counts what
the key really spent (other clients, missed streams, price drift). The poll is the ground truth that
catches whatever metering misses, so the checker raises `spendEstimate` to it and rotates a key that
reached its rotation point, through the same `Pool.rotate` the request path uses.

Shape: pure helpers (page parsing, due logic, log lines, history rows) and a thin shell (`SpendChecker`:
a thread, HTTP with timeouts and retries, pool and writer calls). The thread never touches the
event loop, and every exception stops at the key (or the tick) it happened in. The clock is
injectable and `tick(now)` runs one pass, so tests never sleep through real intervals.

With several sidecars on one database exactly one polls: the holder of a MongoDB lease
(`addon/store/lease.py`).
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import requests

from addon.core.answers import BudgetError, classify_response
from addon.core.config import Settings
from addon.core.masking import mask_key
from addon.pool.pool import KeyState, iso
from addon.core.rotation_policy import (effective_spend, has_reached_rotation_point, plausible_spend, rotation_point,
                                        rotation_reason)
from addon.store.lease import SpendLease
from addon.core.spend_tiers import Tier, interval_for, is_due, next_check_at, tier_name
from addon.core.status import Status

log = logging.getLogger(__name__)

ACTIVITY_PATH = "/user/daily/activity"
START_DATE, END_DATE = "2020-01-01", "2030-12-31"
PAGE_SIZE = 1000  # the endpoint's maximum
MAX_PAGES = 500  # 500k rows; beyond that the answer is treated as malformed rather than looping forever
ACTIVE_WINDOW_S = 240.0  # "active" = used in the last 4 minutes
RETRY_BACKOFF_S: tuple[float, ...] = (0.5, 1.0)  # waits between attempts after a connection error or 5xx
FAILURE_RETRY_S = 30.0  # a failed check is retried after this, or after its tier interval if shorter
MAX_BODY_BYTES = 64 << 20

P = "💰 [OpenHands/SpendChecker]"
R = "🔄 [OpenHands/SpendChecker]"
W = "⚠️ [OpenHands/SpendChecker]"


# -- pure helpers ---------------------------------------------------------------------------------
class MalformedActivity(ValueError):
    """The activity endpoint answered 200 with something that is not a spend page."""


def parse_activity_page(body: bytes | str) -> tuple[float, bool]:
    """(this page's `metadata.total_spend`, `metadata.has_more`) or MalformedActivity.

    `total_spend` covers this page only (reference §2), so callers sum the pages.
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise MalformedActivity(f"not JSON ({e.__class__.__name__})") from None
    meta = data.get("metadata") if isinstance(data, dict) else None
    if not isinstance(meta, dict):
        raise MalformedActivity("no metadata object")
    spend = meta.get("total_spend", 0.0)
    if isinstance(spend, bool) or not isinstance(spend, (int, float)) or not math.isfinite(spend) or spend < 0:
        raise MalformedActivity(f"metadata.total_spend is {spend!r}")
    has_more = meta.get("has_more", False)
    if not isinstance(has_more, bool):
        raise MalformedActivity(f"metadata.has_more is {has_more!r}")
    return float(spend), has_more


def sum_pages(fetch: Callable[[int], tuple[float, bool]], max_pages: int = MAX_PAGES) -> float:
    """Sum `total_spend` over pages 1, 2, … while `has_more`."""
    total = 0.0
    for page in range(1, max_pages + 1):
        spend, has_more = fetch(page)
        total += spend
        if not has_more:
            return total
    raise MalformedActivity(f"still has_more after {max_pages} pages")


def is_active(last_used_at: float | None, now: float) -> bool:
    return last_used_at is not None and now - last_used_at <= ACTIVE_WINDOW_S


def key_label(key: KeyState) -> str:
    """The key's id for logs; masked if an operator used the secret itself as the id."""
    return mask_key(key.api_key) if key.id == key.api_key else key.id


def percent(spend: float, point: float) -> float:
    """How far along to its rotation point a key is (the log line's and stats' percentage)."""
    return round(100.0 * spend / point, 1) if point > 0 else 100.0


def check_line(label: str, active: bool, spend: float, point: float) -> str:
    return (f"{P} Key {label} {'ACTIVE' if active else 'IDLE'}: "
            f"${spend:.2f} / ${point:.2f} ({percent(spend, point):.1f}%)")


def rotation_line(old: str, new: str, spend: float, point: float) -> str:
    return f"{R} Proactive rotation {old} -> {new} (spend ${spend:.2f} >= ${point:.2f})"


def tiers_text(tiers: Sequence[Tier]) -> str:
    return ", ".join(f"{tier_name(t.min_spend, tiers)} every {t.interval_s:g}s" for t in tiers)


def started_line(threshold: float, tiers: Sequence[Tier], lease_s: float | None) -> str:
    lease = f", lease: {lease_s:g}s" if lease_s is not None else ""
    return f"{P} Started (threshold: ${threshold:.2f}, tiers: {tiers_text(tiers)}{lease})"


def history_row(key: KeyState, spend: float, point: float, checked_at: float, was_active: bool, *,
                rotated_at: float | None = None, reason: str | None = None, new_key_id: str | None = None
                ) -> dict[str, Any]:
    """One `openhands_key_spend_history` row (§5 field names; dates as epoch floats for the writer)."""
    return {"keyId": key.id, "apiKeyMasked": mask_key(key.api_key), "spend": round(spend, 6),
            "threshold": round(point, 6), "checkedAt": checked_at, "wasActive": was_active,
            "rotatedAt": rotated_at, "rotationReason": reason, "newKeyId": new_key_id}


def next_due(key: KeyState, tiers: Sequence[Tier], not_before: float | None) -> float | None:
    """Epoch of the key's next poll by its tier (None: never checked, due now), held back after a failure."""
    at = next_check_at(key.last_spend_check, key.effective_spend, tiers)
    if not_before is None:
        return at
    return not_before if at is None else max(at, not_before)


def due_keys(keys: Iterable[KeyState], now: float, tiers: Sequence[Tier],
             not_before: dict[str, float]) -> list[KeyState]:
    """Healthy keys due by their spend tier, the closest to their budget first."""
    due = [k for k in keys if k.status == Status.HEALTHY
           and is_due(k.last_spend_check, k.effective_spend, now, tiers)
           and now >= not_before.get(k.id, -math.inf)]
    return sorted(due, key=lambda k: (-(k.effective_spend / (k.budget_limit or 1.0)), k.id))


# -- outcomes -----------------------------------------------------------------------------------
class PollFailed(Exception):
    """A check that produced no spend; `kind` is stable (timeout, connection, http_5xx, unauthorized, …)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class BudgetAnswer(Exception):
    def __init__(self, error: BudgetError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass
class CheckOutcome:
    """What one check did (returned by `tick` for tests and counted for stats)."""

    key_id: str
    spend: float | None = None
    failure: str | None = None  # PollFailed.kind
    rotated_to: str | None = None
    marked: str | None = None  # status the key was given (exhausted, invalid)


@dataclass
class Counters:
    ticks: int = 0
    checks: int = 0
    failures: int = 0
    rotations: int = 0
    last_tick_at: float | None = None
    last_error: str | None = None
    by_kind: dict[str, int] = field(default_factory=dict)


# -- the shell ----------------------------------------------------------------------------------
class SpendChecker:
    """One background thread polling every due key; see the module docstring."""

    def __init__(self, pool: Any, writer: Any, *, settings: Callable[[], Settings],
                 session: Callable[[], requests.Session], lease: SpendLease | None = None,
                 clock: Callable[[], float] = time.time, retry_backoff_s: Sequence[float] = RETRY_BACKOFF_S) -> None:
        self.pool = pool
        self.writer = writer
        self.settings = settings
        self.session = session
        self.lease = lease
        self.clock = clock
        self.retry_backoff_s = tuple(retry_backoff_s)
        self.counters = Counters()
        self._not_before: dict[str, float] = {}  # per key: no poll before this (after a check or a failure)
        self._stuck: set[str] = set()  # keys at their rotation point with nowhere to go (warned once)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one tick at a time (the thread, or a test calling tick)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        s = self.settings()
        log.info(started_line(s.spend_threshold, s.tiers, self.lease.period_s if self.lease else None))
        self._thread = threading.Thread(target=self._run, name="openhands-spend-checker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread (waiting out at most one in-flight poll) and release the lease. Never raises."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout if timeout is not None else self.settings().spend_check_timeout_s * 2 + 5)
            if thread.is_alive():
                log.warning("%s still waiting for a spend poll at shutdown; leaving it behind", W)
        try:
            if self.lease is not None:
                self.lease.release()
        except Exception:  # noqa: BLE001 - shutdown must not raise
            log.debug("lease release failed", exc_info=True)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick(self.clock())
            except Exception as e:  # noqa: BLE001 - the thread outlives every error
                self.counters.last_error = f"{e.__class__.__name__}: {e}"
                log.warning("%s tick failed: %s: %s", W, e.__class__.__name__, e)
                log.debug("tick failure", exc_info=True)
            self._stop.wait(self.settings().spend_check_tick_s)

    # -- one pass -------------------------------------------------------------------------------
    def tick(self, now: float) -> list[CheckOutcome]:
        """Poll every key due at `now` (if this sidecar is the poller). Returns what each check did."""
        with self._lock:
            s = self.settings()
            self.counters.ticks += 1
            self.counters.last_tick_at = now
            if not s.spend_checker:  # switched off at runtime with --set
                if self.lease is not None:
                    self.lease.release()
                return []
            if self.lease is not None:
                self.lease.period_s = s.spend_check_lease_s
                if not self.lease.hold(now):
                    return []
            outcomes = []
            keys = self.pool.key_list()
            due = due_keys(keys, now, s.tiers, self._not_before)
            unverified = getattr(self.pool, "unverified", None) or {}
            if unverified:  # in use at an unclean stop: due now, whatever their tier, and first
                ids = {k.id for k in due}
                due += [k for k in keys if k.id in unverified and k.id not in ids and k.status == Status.HEALTHY
                        and now >= self._not_before.get(k.id, -math.inf)]
                due.sort(key=lambda k: k.id not in unverified)
            for key in due:
                if self._stop.is_set():
                    break
                if self.lease is not None and not self.lease.hold():
                    break  # a long tick lost the lease: the new poller carries on
                outcomes.append(self._check_guarded(key, now, s))
            return outcomes

    def _check_guarded(self, key: KeyState, now: float, s: Settings) -> CheckOutcome:
        try:
            return self.check_key(key, now, s)
        except Exception as e:  # noqa: BLE001 - one key's trouble never stops the others
            self._failed(key, now, s, PollFailed("error", f"{e.__class__.__name__}: {_scrub(str(e), key)}"))
            log.debug("spend check of %s failed", key.id, exc_info=True)
            return CheckOutcome(key.id, failure="error")

    def check_key(self, key: KeyState, now: float, s: Settings) -> CheckOutcome:
        """Poll one key and act on the answer (spend, budget error, 401, failure)."""
        self.counters.checks += 1
        try:
            total = sum_pages(lambda page: self._page(key, page, s, now))
        except BudgetAnswer as b:
            return self._budget_error(key, b.error, now, s)
        except MalformedActivity as e:
            return self._failed(key, now, s, PollFailed("malformed", f"malformed activity answer: {e}"))
        except PollFailed as e:
            if e.kind == "unauthorized":
                return self._unauthorized(key, now, s, e)
            return self._failed(key, now, s, e)
        if not plausible_spend(total, key.budget_limit):  # a spend figure that cannot be true changes nothing
            return self._failed(key, now, s, PollFailed("malformed", f"malformed activity answer: total_spend "
                                                                     f"{total:g} is implausible for a "
                                                                     f"${key.budget_limit:g} key"))
        return self._spend(key, total, now, s)

    # -- HTTP -----------------------------------------------------------------------------------
    def _page(self, key: KeyState, page: int, s: Settings, now: float) -> tuple[float, bool]:
        resp = self._get(key, page, s)
        if resp.status_code == 200:
            if len(resp.content) > MAX_BODY_BYTES:
                raise MalformedActivity(f"page {page} is {len(resp.content)} bytes")
            return parse_activity_page(resp.content)
        verdict = classify_response(resp.status_code, resp.headers, resp.content[:1 << 20], now)
        if verdict.kind == "budget" and verdict.budget_error is not None:
            raise BudgetAnswer(verdict.budget_error)
        if resp.status_code == 401:
            raise PollFailed("unauthorized", "HTTP 401 (the upstream does not accept this key)")
        raise PollFailed(f"http_{resp.status_code}", f"HTTP {resp.status_code}{_scrub(_snippet(resp), key)}")

    def _get(self, key: KeyState, page: int, s: Settings) -> requests.Response:
        """One page, retried with backoff after connection errors and 5xx; a read timeout is not
        retried (a hung endpoint would otherwise hold the one polling thread several times over)."""
        url = s.upstream + ACTIVITY_PATH
        params: dict[str, str | int] = {"start_date": START_DATE, "end_date": END_DATE, "page": page,
                                        "page_size": PAGE_SIZE}
        headers = {"x-litellm-api-key": key.api_key, "accept": "application/json"}
        timeout = (s.spend_check_timeout_s, s.spend_check_timeout_s)
        waits = [*self.retry_backoff_s, None]
        for attempt, wait in enumerate(waits, 1):
            try:
                resp = self.session().get(url, params=params, headers=headers, timeout=timeout, allow_redirects=False)
            except requests.ConnectionError as e:  # includes ConnectTimeout
                failure = PollFailed("connection", f"connection failed ({_scrub(_reason(e), key)})")
            except requests.Timeout:
                raise PollFailed("timeout", f"no answer within {s.spend_check_timeout_s:g}s") from None
            except requests.RequestException as e:
                raise PollFailed("error", f"{e.__class__.__name__}: {_scrub(str(e), key)}") from None
            else:
                if resp.status_code < 500:
                    return resp
                failure = PollFailed("http_5xx", f"HTTP {resp.status_code}{_scrub(_snippet(resp), key)}")
            if wait is None or self._stop.wait(wait):
                if attempt > 1:
                    failure.detail += f" after {attempt} attempts"
                raise failure
        raise AssertionError("unreachable")

    # -- results --------------------------------------------------------------------------------
    def _spend(self, key: KeyState, total: float, now: float, s: Settings) -> CheckOutcome:
        state = self.pool.record_polled_spend(key.id, total, now) or key
        estimate = max(state.spend_estimate, total)
        point = rotation_point(state.budget_limit, s.spend_threshold)
        active = is_active(state.last_used_at, now)
        self._not_before[key.id] = now + interval_for(effective_spend(estimate, total), s.tiers)
        log.info(check_line(key_label(key), active, total, point))
        outcome = CheckOutcome(key.id, spend=total)
        rotated_at = reason = new_id = None
        # A key draining its last cents (past its point, its budget not reached by the upstream's own figure)
        # is retired by the request path when that figure reaches its budget.
        if has_reached_rotation_point(estimate, total, state.budget_limit, s.spend_threshold) \
                and not self.pool.draining(key.id):
            spend = effective_spend(estimate, total)
            new_id = self._rotate(key, spend, point)
            if new_id is not None:
                rotated_at, reason = now, rotation_reason(spend, point)
                outcome.rotated_to, outcome.marked = new_id, Status.EXHAUSTED.value
        else:
            self._stuck.discard(key.id)
        self.writer.submit({"kind": "history", "row": history_row(
            key, total, point, now, active, rotated_at=rotated_at, reason=reason, new_key_id=new_id)})
        return outcome

    def _rotate(self, key: KeyState, spend: float, point: float) -> str | None:
        """Proactive rotation through the request path's own code; None when there is nowhere to go."""
        result = self.pool.rotate(key.id, error=f"proactive rotation at ${spend:.2f}", keep_if_stuck=True)
        if result.new_id is not None:
            self._stuck.discard(key.id)
            self.counters.rotations += 1
            log.info(rotation_line(key_label(key), result.new_id, spend, point))
            return result.new_id
        if key.id not in self._stuck:
            self._stuck.add(key.id)
            log.warning("%s Key %s reached $%.2f >= $%.2f but no backup or other usable key is left; "
                        "it stays in service", W, key_label(key), spend, point)
        return None

    def _budget_error(self, key: KeyState, be: BudgetError, now: float, s: Settings) -> CheckOutcome:
        """The activity endpoint itself says the budget is spent: calibrate, retire, rotate."""
        spend = be.spend if be.spend is not None else key.effective_spend
        budget = be.budget if be.budget is not None and be.budget > 0 else key.budget_limit
        result = self.pool.rotate(key.id, error=be.message[:300], spend=be.spend, budget=be.budget)
        self._not_before[key.id] = now + interval_for(spend, s.tiers)
        reason = f"budget_exceeded_{spend:.2f}"
        log.warning("%s Key %s budget exceeded per the activity endpoint ($%.2f / $%.2f): marked exhausted, "
                    "rotated %s -> %s", W, key_label(key), spend, budget, key_label(key), result.new_id or "nothing")
        if result.new_id is not None:
            self.counters.rotations += 1
        point = rotation_point(budget, s.spend_threshold)
        self.writer.submit({"kind": "history", "row": history_row(
            key, spend, point, now, is_active(key.last_used_at, now), rotated_at=now, reason=reason,
            new_key_id=result.new_id)})
        return CheckOutcome(key.id, spend=spend, rotated_to=result.new_id, marked=Status.EXHAUSTED.value)

    def _unauthorized(self, key: KeyState, now: float, s: Settings, e: PollFailed) -> CheckOutcome:
        self._count_failure(e)
        self.pool.retire(key.id, Status.INVALID.value, "spend check: the upstream answered 401 (key not accepted)")
        log.warning("%s Key %s check failed: %s; marked invalid", W, key_label(key), e.detail)
        return CheckOutcome(key.id, failure=e.kind, marked=Status.INVALID.value)

    def _failed(self, key: KeyState, now: float, s: Settings, e: PollFailed) -> CheckOutcome:
        """One log line per failed check; the key is tried again after a short pause, never in a loop."""
        self._count_failure(e)
        pause = min(interval_for(key.effective_spend, s.tiers), FAILURE_RETRY_S)
        self._not_before[key.id] = now + pause
        log.warning("%s Key %s check failed: %s; next try in %gs", W, key_label(key), e.detail, pause)
        return CheckOutcome(key.id, failure=e.kind)

    def _count_failure(self, e: PollFailed) -> None:
        self.counters.failures += 1
        self.counters.by_kind[e.kind] = self.counters.by_kind.get(e.kind, 0) + 1
        self.counters.last_error = f"{e.kind}: {e.detail}"

    # -- stats ----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """`GET /openhands/spend-stats` (issue 5 §6), plus the lease and counters."""
        s, now = self.settings(), self.clock()
        keys = sorted((k for k in self.pool.key_list() if k.status == Status.HEALTHY), key=lambda k: k.id)
        rows = []
        for k in keys:
            point = rotation_point(k.budget_limit, s.spend_threshold)
            rows.append({
                "key_id": k.id,
                "api_key": mask_key(k.api_key),
                "total_spend": round(k.total_spend, 6),
                "spend_estimate": round(k.spend_estimate, 6),
                "spend_percent": percent(k.effective_spend, point),
                "spend_tier": tier_name(k.effective_spend, s.tiers),
                "check_interval_seconds": interval_for(k.effective_spend, s.tiers),
                "last_spend_check": iso(k.last_spend_check),
                "last_used_at": iso(k.last_used_at),
                "is_active": is_active(k.last_used_at, now),
                "next_check_at": iso(next_due(k, s.tiers, self._not_before.get(k.id))),
            })
        c = self.counters
        return {
            "running": self.running,
            "polling": self.running and (self.lease is None or self.lease.is_held),
            "threshold": s.spend_threshold,
            "keys_monitored": len(rows),
            "tiers": [{"min_spend": t.min_spend, "interval_seconds": t.interval_s,
                       "name": tier_name(t.min_spend, s.tiers)}
                      for t in s.tiers],
            "lease": self.lease.info() if self.lease is not None else None,
            "counters": {"ticks": c.ticks, "checks": c.checks, "failures": c.failures, "rotations": c.rotations,
                         "failures_by_kind": dict(c.by_kind), "last_tick_at": iso(c.last_tick_at),
                         "last_error": c.last_error},
            "key_stats": rows,
        }


def _reason(e: Exception) -> str:
    text = str(e)
    return text if len(text) <= 200 else text[:200] + "…"


def _scrub(text: str, key: KeyState) -> str:
    """Never let a full key reach a log line, whatever an exception message contains."""
    return text.replace(key.api_key, mask_key(key.api_key)) if key.api_key else text


def _snippet(resp: requests.Response) -> str:
    try:
        text = resp.text.strip().replace("\n", " ")
    except Exception:  # noqa: BLE001
        return ""
    return f": {text[:160]}" if text else ""


def build_spend_checker(services: Any) -> SpendChecker | None:
    """The sidecar's checker, or None when `openhands_spend_checker` is off."""
    s: Settings = services.current()
    if not s.spend_checker:
        return None
    lease = SpendLease(services.store.leases, period_s=s.spend_check_lease_s)
    return SpendChecker(services.pool, services.writer, settings=services.current, session=services.session,
                        lease=lease)
