"""Lifecycle of the sidecar: options, start-up off the loop, background threads, shutdown.

`load`, `configure`, `running` and `done` stay synchronous (async ones break script reload);
the slow start-up (embedded database, MongoDB connection, journal replay) runs on a thread started
in `running`, and pooled requests wait for it without blocking the loop.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http

from addon.core import config
from addon.operator.admin_api import AdminApi, authorized, is_admin_path
from addon.core.config import ConfigError, Settings
from addon.store.embedded import EmbeddedDB, EmbeddedDBError
from addon.core.identity import redact_credentials
from addon.core.masking import mask_key
from addon.core.metering import Meter
from addon.pool.pool import Pool
from addon.traffic.pooled import META, PooledFlows, json_response, openai_error
from addon.store.mongo import PoolStore, StoreUnavailable
from addon.store.writer import StoreWriter
from addon.traffic.upstream_http import make_session, upstream_proxy_from_modes
from pricing.table import PriceTable

log = logging.getLogger("addon.openhands")

SYNC_INTERVAL_S = 2.0
MODEL_INFO_INTERVAL_S = 3600.0


class Sidecar:
    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.pending_error: str | None = None
        self.ready = threading.Event()
        self.failed: str | None = None
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.embedded: EmbeddedDB | None = None
        self.store: PoolStore | None = None
        self.writer: StoreWriter | None = None
        self.pool: Pool | None = None
        self.flows: PooledFlows | None = None
        self.admin: AdminApi | None = None
        self.checker: Any = None
        self.meter = Meter(PriceTable.load_bundled(), (3.0, 15.0))
        self._session = None
        self.db_label = ""

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
        if self.pending_error:
            err, self.pending_error = self.pending_error, None
            raise exceptions.OptionsError(err)
        if not any(name in config.OPTION_NAMES for name in updated) and self.settings is not None:
            return
        values = {spec.name: getattr(ctx.options, spec.name) for spec in config.OPTIONS}
        try:
            if "openhands_config" in updated and self.settings is not None and values["openhands_config"]:
                file_values = config.layered_defaults(dict(os.environ), Path.cwd(), values["openhands_config"])
                for spec in config.OPTIONS:  # the new file fills options the command line did not set
                    if getattr(ctx.options, spec.name) == spec.default and spec.name != "openhands_config":
                        values[spec.name] = file_values[spec.name]
            settings = config.build_settings(values, dict(os.environ))
        except ConfigError as e:
            raise exceptions.OptionsError(str(e)) from None
        if self.settings is not None and self.ready.is_set():
            frozen = ("mongodb_uri", "mongodb_db", "data_dir")
            changed = [f for f in frozen if getattr(settings, f) != getattr(self.settings, f)]
            if changed:
                raise exceptions.OptionsError(f"{', '.join(changed)} cannot change while running; restart the sidecar")
        self.settings = settings
        self.meter.fallback = settings.fallback_price
        self._session = None

    def current(self) -> Settings:
        assert self.settings is not None
        return self.settings

    def session(self):
        if self._session is None:
            modes = getattr(ctx.options, "mode", []) or []
            insecure = bool(getattr(ctx.options, "ssl_insecure", False))
            self._session = make_session(upstream_proxy_from_modes(modes), verify=not insecure)
        return self._session

    # -- start / stop -------------------------------------------------------------------------
    def running(self) -> None:
        if self.threads:
            return
        self.stop_event.clear()
        self.ready.clear()
        self._spawn("openhands-startup", self._start)

    def _spawn(self, name: str, target: Any) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        self.threads.append(t)
        t.start()

    def _start(self) -> None:
        s = self.current()
        try:
            uri = s.mongodb_uri
            if uri == "embedded":
                self.embedded = EmbeddedDB(s.data_dir)
                uri = self.embedded.start()
                self.db_label = f"embedded SecantusDB on 127.0.0.1:{self.embedded.port} ({s.data_dir / 'db'})"
            else:
                self.db_label = config.mask_uri(uri)
            self.store = PoolStore(uri, s.mongodb_db)
            self.store.ping()
            self.store.ensure_indexes(s.history_ttl_days)
            journal = s.data_dir / f"journal-{s.mongodb_db}.jsonl"
            self.writer = StoreWriter(self.store, journal)
            self.writer.replay_journal()
            for fixed in self.store.repair(s.default_budget):
                log.warning("🔧 [OpenHands/Pool] repair: %s", fixed)
            self.pool = Pool(self.store, self.writer, threshold=lambda: self.current().spend_threshold,
                             default_budget=lambda: self.current().default_budget)
            self.pool.sync()
            self.writer.start()
        except (StoreUnavailable, EmbeddedDBError) as e:
            self._fail(str(e))
            return
        except Exception as e:  # one clear line, not a traceback
            self._fail(f"start-up failed: {e.__class__.__name__}: {e}")
            return
        self.flows = PooledFlows(self.pool, self.meter, settings=self.current, session=self.session)
        self.admin = AdminApi(self.pool, threshold=lambda: self.current().spend_threshold, stats=self.spend_stats,
                              dashboard=self.dashboard_html)
        self._start_checker()
        self.ready.set()
        self._banner()
        self._spawn("openhands-pool-sync", self._sync_loop)

    def _fail(self, message: str) -> None:
        self.failed = message
        log.error("❌ [OpenHands] %s", message)
        self.ready.set()
        if os.environ.get("OPENHANDS_KEEP_RUNNING_ON_DB_ERROR") != "1":
            try:
                ctx.master.event_loop.call_soon_threadsafe(ctx.master.shutdown)
            except Exception:
                pass

    def _start_checker(self) -> None:
        try:
            from addon.operator.spend_checker import build_spend_checker
        except ImportError:
            return
        self.checker = build_spend_checker(self)
        if self.checker is not None:
            self.checker.start()

    def _banner(self) -> None:
        s, pool = self.current(), self.pool
        assert pool is not None
        keys = pool.key_list()
        healthy = sum(1 for k in keys if k.status == "healthy")
        auth = "bearer token" if s.admin_token else "loopback clients only (no admin token set)"
        allow = f"{len(s.client_keys)} allowed client key(s)" if s.client_keys else "any client"
        log.info("🚀 [OpenHands] key-pool sidecar ready: upstream %s · database %s (db %s) · %d key(s) loaded, "
                 "%d healthy · %d/%d backup key(s) available · threshold $%.2f · admin auth: %s · clients: %s · "
                 "spend checker: %s", s.upstream, self.db_label, s.mongodb_db, len(keys), healthy,
                 pool.backups_unused, pool.backups_total, s.spend_threshold, auth, allow,
                 "on" if self.checker is not None else "off")

    def _sync_loop(self) -> None:
        last_model_info = 0.0
        while not self.stop_event.wait(SYNC_INTERVAL_S):
            try:
                assert self.pool is not None
                self.pool.sync()
                self.pool.revive_cooled()
                self.pool.store.heal_bindings()
            except Exception as e:
                log.debug("pool sync failed: %s", e)
            if time.time() - last_model_info >= MODEL_INFO_INTERVAL_S:
                last_model_info = time.time()
                self._refresh_model_info()

    def _refresh_model_info(self) -> None:
        """The upstream's own prices (GET /v1/model/info) override the bundled table."""
        if self.pool is None:
            return
        key = next((k for k in self.pool.key_list() if k.status == "healthy"), None)
        if key is None:
            return
        try:
            resp = self.session().get(f"{self.current().upstream}/v1/model/info",
                                      headers={"authorization": f"Bearer {key.api_key}"}, timeout=(5, 15))
            if resp.status_code == 200:
                self.meter.use_model_info(resp.json())
                log.info("💲 [OpenHands/Metering] prices loaded from the upstream's /v1/model/info")
        except Exception as e:
            log.debug("model info unavailable: %s", e)

    def done(self) -> None:
        self.stop_event.set()
        if self.checker is not None:
            try:
                self.checker.stop()
            except Exception:
                log.exception("stopping the spend checker")
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(timeout=10)
        self.threads = []
        if self.writer is not None:
            self.writer.stop()
            if self.writer.outage_since is None and self.store is not None:
                try:  # our last queued binds are written: leave no binding on a retired key behind
                    self.store.heal_bindings()
                except Exception as e:
                    log.debug("binding heal at shutdown failed: %s", e)
        if self.store is not None:
            self.store.close()
        if self.embedded is not None:
            self.embedded.stop()
        self.writer = self.store = self.embedded = self.pool = None
        self.ready.clear()

    # -- stats for the admin API (replaced by the spend checker's when it runs) ----------------
    def spend_stats(self) -> dict[str, Any]:
        if self.checker is not None:
            return self.checker.stats()
        s = self.current()
        return {"running": False, "threshold": s.spend_threshold, "keys_monitored": 0,
                "tiers": [{"min_spend": t.min_spend, "interval_seconds": t.interval_s} for t in s.tiers],
                "key_stats": []}

    def dashboard_html(self, summary: dict[str, Any], history: list[dict[str, Any]], stats: dict[str, Any],
                       keys: list[dict[str, Any]]) -> str:
        try:
            from addon.core.dashboard import render_dashboard
        except ImportError:
            return "<!doctype html><title>OpenHands key pool</title><p>Dashboard not available.</p>"
        return render_dashboard(summary, history, stats, keys, now=time.time(), upstream=self.current().upstream)

    # -- hooks --------------------------------------------------------------------------------
    async def request(self, flow: http.HTTPFlow) -> None:
        if self.settings is None or flow.response is not None:
            return
        s = self.current()
        if not s.is_upstream(flow.request.host, flow.request.port):
            return
        try:
            if not self.ready.is_set():
                await asyncio.to_thread(self.ready.wait, 30)
            if self.failed or self.flows is None:
                flow.response = openai_error(503, f"OpenHands key-pool sidecar is not ready: {self.failed or 'starting'}",
                                             "service_unavailable")
                flow.metadata[META] = {"local": True}
                return
            if is_admin_path(flow.request.path):
                try:
                    await self._admin(flow)
                finally:
                    redact_admin_request(flow)
                return
            await self.flows.request(flow)
        except Exception:
            log.exception("❌ [OpenHands] request hook failed; answering locally instead of forwarding")
            flow.response = openai_error(500, "OpenHands key-pool sidecar internal error", "internal_error")
            flow.metadata[META] = {"local": True}

    async def _admin(self, flow: http.HTTPFlow) -> None:
        flow.metadata[META] = {"local": True, "admin": True}
        s = self.current()
        peer = flow.client_conn.peername[0] if flow.client_conn.peername else None
        if not authorized(flow.request.headers.get("authorization"), s.admin_token, peer):
            flow.response = json_response(401, {"error": {"message": "admin API: missing or wrong bearer token"
                                                          if s.admin_token else "admin API: loopback clients only",
                                                          "type": "auth_error", "code": 401}})
            return
        assert self.admin is not None
        status, body = await asyncio.to_thread(self.admin.handle, flow.request.method, flow.request.path,
                                               flow.request.get_content(strict=False))
        if isinstance(body, str):
            flow.response = http.Response.make(status, body, {"content-type": "text/html; charset=utf-8",
                                                              "cache-control": "no-store"})
        else:
            flow.response = json_response(status, body)
        flow.comment = f"🛠️ admin {flow.request.method} {flow.request.path.split('?')[0]} → {status}"

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if self.flows is None:
            return
        try:
            self.flows.responseheaders(flow)
        except Exception:
            log.exception("❌ [OpenHands] responseheaders hook failed")

    async def response(self, flow: http.HTTPFlow) -> None:
        if self.flows is None:
            return
        try:
            await self.flows.response(flow)
        except Exception:
            log.exception("❌ [OpenHands] response hook failed")
        finally:
            if flow.metadata.get(META):  # the exchange is over: mitmdump/mitmweb/-w see masked credentials
                redact_credentials(flow.request.headers)

    def error(self, flow: http.HTTPFlow) -> None:
        if self.flows is None:
            return
        try:
            self.flows.error(flow)
        except Exception:
            log.exception("❌ [OpenHands] error hook failed")
        finally:
            if flow.metadata.get(META):
                redact_credentials(flow.request.headers)


def redact_admin_request(flow: http.HTTPFlow) -> None:
    """An answered admin request keeps no secret for mitmdump's printing or mitmweb: token and apiKey masked."""
    try:
        redact_credentials(flow.request.headers)
        body = json.loads(flow.request.get_content(strict=False) or b"null")
        if isinstance(body, dict) and isinstance(body.get("apiKey"), str):
            body["apiKey"] = mask_key(body["apiKey"])
            flow.request.set_content(json.dumps(body).encode())
    except Exception:  # not JSON: nothing the API would have accepted as a key
        pass
