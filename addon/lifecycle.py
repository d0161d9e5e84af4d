"""Lifecycle addon: options, start-up off the loop, background threads, shutdown.

`load`, `configure`, `running` and `done` stay synchronous (async ones break script reload); the slow
start-up (embedded database, MongoDB connection, journal replay) runs on a thread started in `running`,
and the other addons wait for `Services.ready` without blocking the loop.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from mitmproxy import ctx, exceptions

from addon.core import config
from addon.core.config import ConfigError
from addon.core.dashboard import render_dashboard
from addon.core.refresh import Outcome, RefreshSchedule
from addon.core.status import RETIRED, Status
from addon.operator.admin_api import AdminApi
from addon.operator.spend_checker import build_spend_checker
from addon.pool.pool import Pool
from addon.services import Services
from addon.store.embedded import EmbeddedDB, EmbeddedDBError
from addon.store.mongo import PoolStore, StoreUnavailable
from addon.store.writer import StoreWriter
from addon.traffic.upstream_http import reverse_targets

log = logging.getLogger("addon.openhands")

SYNC_INTERVAL_S = 2.0
RECOVERY_REQUESTS = 16  # requests assumed in flight per key at an unclean stop (see `recovery_margins`)
RECOVERY_MIN_USD = 0.25
HEAL_ALL_EVERY_S = 600.0  # a pass over every retired key's bindings (between them, only recently bound keys)
MODEL_INFO_INTERVAL_S = 3600.0
MODEL_INFO_RETRY_S = 300.0  # after a failed price load (the first one waits only for a usable key)
FROZEN_WHILE_RUNNING = ("mongodb_uri", "mongodb_db", "data_dir")


def recovery_margins(keys: list[Any], in_use: set[str]) -> dict[str, float]:
    """What requests in flight at an unclean stop may have cost on each key in use then (charged
    upstream, never metered): RECOVERY_REQUESTS requests at the key's own average cost, at least
    RECOVERY_MIN_USD, at most half its budget (an average inflated by a spend set by hand or polled).
    Deliberately generous: it only keeps a key away from its rotation point until the upstream's own
    figure arrives (the spend checker polls these keys first)."""
    out: dict[str, float] = {}
    for key in keys:
        if key.id in in_use and key.status not in RETIRED:
            average = key.spend_estimate / key.requests_count if key.requests_count > 0 else 0.0
            margin = min(max(RECOVERY_MIN_USD, RECOVERY_REQUESTS * average), key.budget_limit / 2)
            out[key.id] = round(margin, 6)
    return out


def sync_once(pool: Pool, *, heal_all: bool = False) -> None:
    """One pass of the periodic sync: what changed in MongoDB, cooled keys back, keys drained to their budget
    retired, stray bindings healed.

    Its database work follows activity (issue 14): with nothing written since the last pass it is the
    server's clock, one `_id` read and two empty index range reads, whatever the pool's size. Bindings
    are healed only on the keys recent bindings point at, and on every retired key once per HEAL_ALL_EVERY_S.
    """
    pool.sync()
    pool.revive_cooled()
    pool.retire_spent()
    pool.store.heal_bindings(None if heal_all else pool.store.take_bound_keys())


def exit_failed() -> None:
    """End mitmdump/mitmweb with exit status 1 so a supervisor sees the failed start (a plain shutdown exits 0).

    Raised on the event loop, SystemExit unwinds `Master.run`, whose `finally` still runs every addon's `done`;
    mitmproxy's own start-up error check exits the same way. Test masters only get `shutdown`.
    """
    raise SystemExit(1)


class Lifecycle:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.pending_error: str | None = None
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []

    # -- options ------------------------------------------------------------------------------
    def load(self, loader: Any) -> None:
        for name in ("pymongo", "urllib3", "requests"):
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            defaults = config.layered_defaults(dict(os.environ), Path.cwd())
        except ConfigError as e:
            self.pending_error = str(e)
            defaults = {o.name: o.default for o in config.OPTIONS}
        for spec in config.OPTIONS:
            loader.add_option(spec.name, spec.typespec, defaults[spec.name], spec.help)

    def configure(self, updated: set[str]) -> None:
        svc = self.services
        if self.pending_error:
            err, self.pending_error = self.pending_error, None
            self._option_error(err)
            return
        if not any(name in config.OPTION_NAMES or name == "mode" for name in updated) and svc.settings is not None:
            return
        values = {spec.name: getattr(ctx.options, spec.name) for spec in config.OPTIONS}
        try:
            if "openhands_config" in updated and svc.settings is not None and values["openhands_config"]:
                file_values = config.layered_defaults(dict(os.environ), Path.cwd(), values["openhands_config"])
                for spec in config.OPTIONS:  # the new file fills options the command line did not set
                    if getattr(ctx.options, spec.name) == spec.default and spec.name != "openhands_config":
                        values[spec.name] = file_values[spec.name]
            settings = config.build_settings(values, dict(os.environ),
                                             reverse_targets=reverse_targets(ctx.options.mode))
        except ConfigError as e:
            self._option_error(str(e))
            return
        if svc.settings is not None and svc.ready.is_set():
            changed = [f for f in FROZEN_WHILE_RUNNING if getattr(settings, f) != getattr(svc.settings, f)]
            if changed:
                raise exceptions.OptionsError(f"{', '.join(changed)} cannot change while running; restart the sidecar")
        svc.settings = settings
        svc.meter.fallback = settings.fallback_price
        svc.reset_session()

    def _option_error(self, message: str) -> None:
        """At start-up a bad option is one clear line and exit status 1 (raising would print a traceback);
        later (mitmweb's options page, `set` in the console) mitmproxy rejects the change."""
        if self.services.settings is None:
            if self.services.failed is None:  # mitmweb configures twice before the exit: say it once
                self._fail(message)
            return
        raise exceptions.OptionsError(message)

    # -- start / stop -------------------------------------------------------------------------
    def running(self) -> None:
        if self.threads or self.services.settings is None:  # no settings: start-up already failed
            return
        self.stop_event.clear()
        self.services.ready.clear()
        self._spawn("openhands-startup", self._start)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        self.threads.append(t)
        t.start()

    def _start(self) -> None:
        svc, s = self.services, self.services.current()
        try:
            uri = s.mongodb_uri
            if uri == "embedded":
                svc.embedded = EmbeddedDB(s.data_dir)
                uri = svc.embedded.start()
                svc.db_label = f"embedded SecantusDB on 127.0.0.1:{svc.embedded.port} ({s.data_dir / 'db'})"
            else:
                svc.db_label = config.mask_uri(uri)
            store = svc.store = PoolStore(uri, s.mongodb_db)
            store.ping()
            store.ensure_indexes(s.history_ttl_days, s.binding_ttl_days)
            journal = s.data_dir / f"journal-{s.mongodb_db}.jsonl"
            writer = svc.writer = StoreWriter(store, journal, fsync_interval_s=s.journal_fsync_s,
                                              journal_max_bytes=s.journal_max_bytes)
            writer.replay_journal()
            for fixed in store.repair(s.default_budget):
                log.warning("🔧 [OpenHands/Pool] repair: %s", fixed)
            pool = svc.pool = Pool(store, writer, threshold=lambda: svc.current().spend_threshold,
                                   default_budget=lambda: svc.current().default_budget,
                                   drain_past_point=lambda: svc.current().drain_past_point)
            pool.sync()
            if writer.recheck_keys:
                margins = recovery_margins(pool.key_list(), writer.recheck_keys)
                pool.distrust(margins)
                log.warning("🩺 [OpenHands/Pool] unclean stop: %s not trusted within their in-flight margin of "
                            "the rotation point until the upstream's spend figure arrives",
                            ", ".join(f"{k} (${m:.2f})" for k, m in sorted(margins.items())) or "no key")
            writer.start()
        except (StoreUnavailable, EmbeddedDBError) as e:
            self._fail(str(e))
            return
        except Exception as e:  # one clear line, not a traceback
            self._fail(f"start-up failed: {e.__class__.__name__}: {e}")
            return
        svc.admin = AdminApi(pool, threshold=lambda: svc.current().spend_threshold, stats=svc.spend_stats,
                             dashboard=self.dashboard_html)
        svc.checker = build_spend_checker(svc)
        if svc.checker is not None:
            svc.checker.start()
        svc.ready.set()
        self._banner()
        self._spawn("openhands-pool-sync", self._sync_loop)

    def _fail(self, message: str) -> None:
        self.services.failed = message
        log.error("❌ [OpenHands] %s", message)
        self.services.ready.set()
        if os.environ.get("OPENHANDS_KEEP_RUNNING_ON_DB_ERROR") != "1":
            try:
                master = ctx.master
                stop = exit_failed if type(master).__module__.startswith("mitmproxy.tools") else master.shutdown
                master.event_loop.call_soon_threadsafe(stop)
            except Exception:
                pass

    def _banner(self) -> None:
        svc = self.services
        s, pool = svc.current(), svc.pool
        assert pool is not None
        keys = pool.key_list()
        healthy = sum(1 for k in keys if k.status == Status.HEALTHY)
        auth = "bearer token" if s.admin_token else "loopback clients only (no admin token set)"
        allow = (f"{len(s.client_keys)} allowed client key(s)" if s.client_keys
                 else "any client (openhands_open_pool)" if s.open_pool
                 else "loopback only (set OPENHANDS_CLIENT_KEYS or openhands_open_pool)")
        log.info("🚀 [OpenHands] key-pool sidecar ready: upstream %s · database %s (db %s) · %d key(s) loaded, "
                 "%d healthy · %d/%d backup key(s) available · threshold $%.2f · admin auth: %s · clients: %s · "
                 "spend checker: %s", s.upstream, svc.db_label, s.mongodb_db, len(keys), healthy,
                 pool.backups_unused, pool.backups_total, s.spend_threshold, auth, allow,
                 "on" if svc.checker is not None else "off")

    def _sync_loop(self) -> None:
        prices = RefreshSchedule(MODEL_INFO_INTERVAL_S, MODEL_INFO_RETRY_S)
        last_heal_all = 0.0
        while not self.stop_event.wait(SYNC_INTERVAL_S):
            pool = self.services.pool
            if pool is None:
                return
            try:
                heal_all = time.monotonic() - last_heal_all >= HEAL_ALL_EVERY_S
                sync_once(pool, heal_all=heal_all)
                if heal_all:
                    last_heal_all = time.monotonic()
            except Exception as e:
                log.debug("pool sync failed: %s", e)
            if prices.due(time.time()):  # as soon as a usable key exists, then hourly
                prices.record(time.time(), self._refresh_model_info())

    def _refresh_model_info(self) -> Outcome:
        """The upstream's own prices (GET /v1/model/info) override the bundled table."""
        svc = self.services
        if svc.pool is None:
            return Outcome.NO_KEY
        key = next((k for k in svc.pool.key_list() if k.status == Status.HEALTHY), None)
        if key is None:
            return Outcome.NO_KEY
        try:
            resp = svc.session().get(f"{svc.current().upstream}/v1/model/info",
                                     headers={"authorization": f"Bearer {key.api_key}"}, timeout=(5, 15))
            if resp.status_code == 200:
                svc.meter.use_model_info(resp.json())
                log.info("💲 [OpenHands/Metering] prices loaded from the upstream's /v1/model/info")
                return Outcome.LOADED
            log.debug("model info unavailable: HTTP %d", resp.status_code)
        except Exception as e:
            log.debug("model info unavailable: %s", e)
        return Outcome.FAILED

    def done(self) -> None:
        svc = self.services
        self.stop_event.set()
        if svc.checker is not None:
            try:
                svc.checker.stop()
            except Exception:
                log.exception("stopping the spend checker")
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(timeout=10)
        self.threads = []
        if svc.pool is not None and svc.pool.reservation_sharer is not None:
            try:  # withdraw this sidecar's in-flight reservations so peers stop counting them
                svc.pool.reservation_sharer.stop()
            except Exception:
                log.exception("stopping the reservation sharer")
        if svc.writer is not None:
            svc.writer.stop()
            if svc.writer.outage_since is None and svc.store is not None:
                try:  # our last queued binds are written: leave no binding on a retired key behind
                    svc.store.heal_bindings()
                except Exception as e:
                    log.debug("binding heal at shutdown failed: %s", e)
        if svc.store is not None:
            svc.store.close()
        if svc.embedded is not None:
            svc.embedded.stop()
        svc.writer = svc.store = svc.embedded = svc.pool = None
        svc.checker = None
        svc.ready.clear()

    def dashboard_html(self, summary: dict[str, Any], history: list[Any], stats: dict[str, Any],
                       keys: list[Any]) -> str:
        s = self.services.current()  # with a token, browsers sign in: offer the sign-out button
        return render_dashboard(summary, history, stats, keys, now=time.time(), upstream=s.upstream,
                                logout=s.admin_token is not None)
