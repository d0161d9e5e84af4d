"""Prometheus metrics of the sidecar (`GET /metrics`), produced with `prometheus_client`.

Two halves:
- `Metrics` (`addon/core/counters.py`, pure) counts events as they happen (requests, metered dollars and tokens,
  rotations, budget errors, retries, 429s for lack of a key). The hooks call its small `record_*`/`count_*` methods:
  one lock and a dict increment each, so the request path pays well under a microsecond.
- `SidecarCollector` reads everything that is state rather than an event (per-key spend, budget,
  rotation point, status; backups left; the store's queue, journal and outage; the spend checker's
  counters; the run-dry forecast) at scrape time, from the pool and its neighbours.

Both live in the sidecar's own `CollectorRegistry`, never the process-global default one (mitmproxy or
another addon may use that). Label values are key *ids*, models, formats and reasons, never a key.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from addon.core.counters import Metrics, label_value
from addon.core.dashboard import Forecast, forecast
from addon.core.rotation_policy import rotation_point
from addon.core.status import Status

log = logging.getLogger(__name__)

PREFIX = "openhands"
STATUSES = tuple(s.value for s in Status)
HISTORY_ROWS = 2000  # the dashboard's burn rate reads as many
HISTORY_REFRESH_S = 30.0  # the forecast's history is read from the database at most this often


# -- scrape time ----------------------------------------------------------------------------------
def pool_summary(pool: Any, threshold: float) -> dict[str, Any]:
    """The part of `spend-summary` the forecast needs, straight from the pool's memory."""
    rows = []
    for k in sorted(pool.key_list(), key=lambda k: k.id):
        rows.append({"id": k.id, "status": str(k.status), "effectiveSpend": k.effective_spend,
                     "rotationPoint": rotation_point(k.budget_limit, threshold)})
    return {"keys": rows, "threshold": threshold,
            "backupKeys": {"available": pool.backups_unused, "total": pool.backups_total}}


class SidecarCollector(Collector):
    """Yields every metric family at scrape time; never raises (a broken source omits its figures)."""

    def __init__(self, metrics: Metrics, services: Any, clock: Callable[[], float] = time.time) -> None:
        self.metrics = metrics
        self.services = services
        self.clock = clock
        self._history: list[dict[str, Any]] = []
        self._history_at = -math.inf
        self._history_lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        yield from self._events()
        for part in (self._pool, self._store, self._checker):
            try:
                yield from part()
            except Exception:  # a scrape must answer even when one source is mid-restart
                log.debug("metrics: %s failed", part.__name__, exc_info=True)

    def describe(self) -> Iterable[Metric]:
        return []  # families depend on the pool: no up-front description (auto_describe off)

    # -- events -----------------------------------------------------------------------------
    def _events(self) -> Iterator[Metric]:
        snap = self.metrics.snapshot()
        fam = CounterMetricFamily(f"{PREFIX}_requests", "Pooled requests answered, by key id, wire format and outcome.",
                                  labels=["key_id", "format", "outcome"])
        for (key, fmt, outcome), n in sorted(snap["requests"].items()):
            fam.add_metric([key, fmt, outcome], n)
        yield fam
        fam = CounterMetricFamily(f"{PREFIX}_metered_dollars", "Dollars metered (charged to pool keys), "
                                  "by key id and model.",
                                  labels=["key_id", "model"])
        for (key, model), v in sorted(snap["dollars"].items()):
            fam.add_metric([key, model], v)
        yield fam
        fam = CounterMetricFamily(f"{PREFIX}_metered_tokens", "Tokens metered, by key id, model and kind "
                                  "(input excludes cache reads and writes).", labels=["key_id", "model", "kind"])
        for (key, model, kind), n in sorted(snap["tokens"].items()):
            fam.add_metric([key, model, kind], n)
        yield fam
        rotations = dict(snap["rotations"])
        checker = getattr(self.services, "checker", None)
        counters = getattr(checker, "counters", None)
        if counters is not None:
            rotations["spend_checker"] = rotations.get("spend_checker", 0) + int(getattr(counters, "rotations", 0))
        fam = CounterMetricFamily(f"{PREFIX}_rotations", "Keys retired and replaced, by reason (proactive, "
                                  "budget_error, spend_checker, invalid, admin).", labels=["reason"])
        for reason, n in sorted(rotations.items()):
            fam.add_metric([reason], n)
        yield fam
        fam = CounterMetricFamily(f"{PREFIX}_upstream_budget_errors", "Budget errors the upstream answered (each was "
                                  "calibrated, rotated and retried; none reached a client), by key id.",
                                  labels=["key_id"])
        for key, n in sorted(snap["budget_errors"].items()):
            fam.add_metric([key], n)
        yield fam
        fam = CounterMetricFamily(f"{PREFIX}_retries", "Requests resent on another key after a budget error, 429 or "
                                  "401/403, by outcome (ok: answered; refused: that key refused too; unreachable).",
                                  labels=["outcome"])
        for outcome, n in sorted(snap["retries"].items()):
            fam.add_metric([outcome], n)
        yield fam
        yield CounterMetricFamily(f"{PREFIX}_no_key_responses", "429 answers given because no pool key was left.",
                                  value=snap["no_key"])

    # -- pool -------------------------------------------------------------------------------
    def _pool(self) -> Iterator[Metric]:
        pool = getattr(self.services, "pool", None)
        if pool is None:
            return
        threshold = self._threshold()
        spend = GaugeMetricFamily(f"{PREFIX}_key_spend_dollars", "Effective spend of each key (the larger of the "
                                  "metered estimate and the last polled spend).", labels=["key_id"])
        estimate = GaugeMetricFamily(f"{PREFIX}_key_spend_estimate_dollars", "Metered spend estimate of each key.",
                                     labels=["key_id"])
        polled = GaugeMetricFamily(f"{PREFIX}_key_polled_spend_dollars",
                                   "Last spend the upstream reported for each key.",
                                   labels=["key_id"])
        budget = GaugeMetricFamily(f"{PREFIX}_key_budget_dollars", "budgetLimit of each key.", labels=["key_id"])
        point = GaugeMetricFamily(f"{PREFIX}_key_rotation_point_dollars", "Spend at which each key is rotated.",
                                  labels=["key_id"])
        status = GaugeMetricFamily(f"{PREFIX}_key_status", "1, labelled with each key's current status (one sample "
                                   "per key; count them with openhands_keys).", labels=["key_id", "status"])
        by_status: dict[str, int] = {s: 0 for s in STATUSES}
        for k in sorted(pool.key_list(), key=lambda k: k.id):
            spend.add_metric([k.id], k.effective_spend)
            estimate.add_metric([k.id], k.spend_estimate)
            polled.add_metric([k.id], k.total_spend)
            budget.add_metric([k.id], k.budget_limit)
            point.add_metric([k.id], rotation_point(k.budget_limit, threshold))
            st = str(getattr(k.status, "value", k.status))
            by_status[st] = by_status.get(st, 0) + 1
            status.add_metric([k.id, st], 1.0)
        yield from (spend, estimate, polled, budget, point, status)
        keys = GaugeMetricFamily(f"{PREFIX}_keys", "Pool keys by status.", labels=["status"])
        for s, n in sorted(by_status.items()):
            keys.add_metric([s], n)
        yield keys
        yield GaugeMetricFamily(f"{PREFIX}_backup_keys_available", "Backup keys not yet promoted.",
                                value=pool.backups_unused)
        yield GaugeMetricFamily(f"{PREFIX}_backup_keys_total", "Backup keys configured.", value=pool.backups_total)
        yield GaugeMetricFamily(f"{PREFIX}_spend_threshold_dollars", "Rotation threshold of a $10 key.",
                                value=threshold)
        yield from self._forecast(pool, threshold)

    def _forecast(self, pool: Any, threshold: float) -> Iterator[Metric]:
        f = self.forecast(pool, threshold)
        yield GaugeMetricFamily(f"{PREFIX}_pool_keys_left", "Keys that can still take spend: live keys below their "
                                "rotation point plus unused backups.", value=f.keys_left)
        yield GaugeMetricFamily(f"{PREFIX}_pool_usable_dollars", "Dollars the pool can spend before its last rotation.",
                                value=f.usable)
        if f.burn_rate_per_h is not None:
            yield GaugeMetricFamily(f"{PREFIX}_pool_burn_rate_dollars_per_hour", "Pool spend per hour over the last "
                                    "day of spend history (the dashboard's figure).", value=f.burn_rate_per_h)
            yield GaugeMetricFamily(f"{PREFIX}_pool_runway_seconds", "Seconds until the pool runs dry at the current "
                                    "burn rate (+Inf: no spend in the window).",
                                    value=f.runway_h * 3600.0 if f.runway_h is not None else math.inf)

    def forecast(self, pool: Any, threshold: float) -> Forecast:
        """The dashboard's forecast from the pool's memory and the (cached) spend history."""
        return forecast(pool_summary(pool, threshold), self._history_rows(pool), self.clock())

    def _history_rows(self, pool: Any) -> list[dict[str, Any]]:
        """Spend history, read at most every HISTORY_REFRESH_S and never while the database is away."""
        writer = getattr(self.services, "writer", None)
        now = time.monotonic()
        with self._history_lock:
            if now - self._history_at < HISTORY_REFRESH_S or getattr(writer, "outage_since", None) is not None:
                return self._history
            self._history_at = now
        try:
            rows = pool.store.list_history(HISTORY_ROWS, None)
        except Exception as e:
            log.debug("metrics: spend history unavailable: %s", e)
            return self._history
        with self._history_lock:
            self._history = rows
        return rows

    def _threshold(self) -> float:
        settings = getattr(self.services, "settings", None)
        return float(getattr(settings, "spend_threshold", 9.95))

    # -- store ------------------------------------------------------------------------------
    def _store(self) -> Iterator[Metric]:
        writer = getattr(self.services, "writer", None)
        if writer is None:
            return
        yield GaugeMetricFamily(f"{PREFIX}_store_queue_depth", "Updates waiting in the write-behind queue for MongoDB.",
                                value=writer.backlog)
        journal = getattr(writer, "journal", None)
        if journal is not None:
            yield GaugeMetricFamily(f"{PREFIX}_journal_bytes", "Size of the local write-ahead journal.",
                                    value=journal.size_bytes)
        since = writer.outage_since
        yield GaugeMetricFamily(f"{PREFIX}_database_up", "1 while MongoDB takes writes, 0 during an outage.",
                                value=0.0 if since is not None else 1.0)
        yield GaugeMetricFamily(f"{PREFIX}_database_outage_seconds", "Seconds the current MongoDB outage has lasted "
                                "(0 while the database is up).",
                                value=max(0.0, self.clock() - since) if since is not None else 0.0)

    # -- spend checker ----------------------------------------------------------------------
    def _checker(self) -> Iterator[Metric]:
        checker = getattr(self.services, "checker", None)
        yield GaugeMetricFamily(f"{PREFIX}_spend_checker_running", "1 when the spend checker thread runs here.",
                                value=1.0 if checker is not None and checker.running else 0.0)
        counters = getattr(checker, "counters", None)
        polls = int(getattr(counters, "checks", 0)) if counters is not None else 0
        yield CounterMetricFamily(f"{PREFIX}_spend_checker_polls", "Spend checks made (one per key poll).", value=polls)
        fam = CounterMetricFamily(f"{PREFIX}_spend_checker_failures", "Spend checks that failed, by kind.",
                                  labels=["kind"])
        for kind, n in sorted((dict(getattr(counters, "by_kind", {}) or {}) if counters is not None else {}).items()):
            fam.add_metric([label_value(kind)], n)
        yield fam


class MetricsEndpoint:
    """The sidecar's registry: `render()` is the body of `GET /metrics` (blocking: call off the loop)."""

    def __init__(self, services: Any, metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics()
        self.collector = SidecarCollector(self.metrics, services)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
