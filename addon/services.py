"""What the composed addons share: settings, the pool and its store, the meter, the HTTP session.

The lifecycle addon fills it at start-up; the admin, traffic and command addons only read it. One small
object instead of the whole sidecar or a bag of lambdas, so each addon's dependencies are visible.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import requests
from mitmproxy import ctx

from addon.core.config import Settings
from addon.core.metering import Meter
from addon.traffic.upstream_http import make_session, upstream_proxy_from_modes
from pricing.table import PriceTable

if TYPE_CHECKING:
    from addon.operator.admin_api import AdminApi
    from addon.operator.spend_checker import SpendChecker
    from addon.pool.pool import Pool
    from addon.store.embedded import EmbeddedDB
    from addon.store.mongo import PoolStore
    from addon.store.writer import StoreWriter

READY_WAIT_S = 30.0
FALLBACK_PRICE = (3.0, 15.0)  # $/1M input, output until the settings say otherwise


def _bundled_meter() -> Meter:
    return Meter(PriceTable.load_bundled(), FALLBACK_PRICE)


@dataclass
class Services:
    settings: Settings | None = None
    meter: Meter = field(default_factory=_bundled_meter)
    ready: threading.Event = field(default_factory=threading.Event)
    failed: str | None = None
    embedded: "EmbeddedDB | None" = None
    store: "PoolStore | None" = None
    writer: "StoreWriter | None" = None
    pool: "Pool | None" = None
    admin: "AdminApi | None" = None
    checker: "SpendChecker | None" = None
    db_label: str = ""
    _session: requests.Session | None = field(default=None, repr=False)

    def current(self) -> Settings:
        assert self.settings is not None, "options not configured yet"
        return self.settings

    def session(self) -> requests.Session:
        """Retries and polls leave through mitmproxy's own upstream proxy, if it runs in that mode."""
        if self._session is None:
            modes = getattr(ctx.options, "mode", []) or []
            insecure = bool(getattr(ctx.options, "ssl_insecure", False))
            self._session = make_session(upstream_proxy_from_modes(modes), verify=not insecure)
        return self._session

    def reset_session(self) -> None:
        self._session = None

    async def wait_ready(self) -> bool:
        """Wait (off the loop) for start-up; True when the pool can serve."""
        if not self.ready.is_set():
            await asyncio.to_thread(self.ready.wait, READY_WAIT_S)
        return self.serving()

    def serving(self) -> bool:
        """Start-up is over and the pool can serve (what `wait_ready` answers, without waiting)."""
        return self.failed is None and self.pool is not None and self.ready.is_set()

    def not_ready_reason(self) -> str:
        return self.failed or "starting"

    def spend_stats(self) -> dict[str, Any]:
        """The spend checker's figures, or the configured tiers when it is off."""
        if self.checker is not None:
            return self.checker.stats()
        s = self.current()
        return {"running": False, "threshold": s.spend_threshold, "keys_monitored": 0,
                "tiers": [{"min_spend": t.min_spend, "interval_seconds": t.interval_s} for t in s.tiers],
                "key_stats": []}
