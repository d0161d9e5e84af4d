"""The composed addons in process (mitmproxy.test.taddons), driven hook by hook as mitmproxy would."""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
from mitmproxy import http
from mitmproxy.test import taddons

from addon.lifecycle import Lifecycle
from addon.openhands import default_addons
from addon.services import Services


class InProcess:
    """All addons of `addon/openhands.py` on one `Services`; `request(flow)` runs every addon's hook in order."""

    tctx: Any = None  # the taddons context while `running()` holds it (to configure options mid-test)

    def __init__(self) -> None:
        self.services = Services()
        self.addons = default_addons(self.services)
        self.lifecycle: Lifecycle = self.addons[0]  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:  # pool, store, ready, failed, ... of the shared services
        return getattr(self.services, name)

    async def _run(self, hook: str, flow: http.HTTPFlow) -> None:
        for addon in self.addons:
            fn = getattr(addon, hook, None)
            if fn is None:
                continue
            result = fn(flow)
            if inspect.isawaitable(result):
                await result

    async def request(self, flow: http.HTTPFlow) -> None:
        await self._run("request", flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        for addon in self.addons:
            fn = getattr(addon, "responseheaders", None)
            if fn is not None:
                fn(flow)

    async def response(self, flow: http.HTTPFlow) -> None:
        await self._run("response", flow)

    def error(self, flow: http.HTTPFlow) -> None:
        for addon in self.addons:
            fn = getattr(addon, "error", None)
            if fn is not None:
                fn(flow)


# What a test's environment could set that would change these defaults (an operator's token, allowlist, ...).
CLEARED_ENV = ("OPENHANDS_ADMIN_TOKEN", "OPENHANDS_CLIENT_KEYS", "MONGODB_URI", "OPENHANDS_CONFIG",
               "OPENHANDS_OPEN_POOL")


@contextmanager
def running(mongo_uri: str, db_name: str, upstream: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            keys: dict[str, str]) -> Iterator[InProcess]:
    """The one in-process sidecar the hook-level test files share: every addon on a taddons master, started on the
    session's SecantusDB (own database) against the fake upstream, with `keys` ({id: api key}) in the pool and
    known to the upstream. The spend checker is off; the working directory and data dir are `tmp_path`."""
    for var in CLEARED_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    oh = InProcess()
    with taddons.context(*oh.addons) as tctx:
        tctx.configure(oh.lifecycle, openhands_upstream=upstream.url, openhands_mongodb_uri=mongo_uri,
                       openhands_mongodb_db=db_name, openhands_data_dir=str(tmp_path / "data"),
                       openhands_spend_checker=False)
        oh.lifecycle._start()
        pool = oh.services.pool
        assert oh.services.failed is None and oh.services.ready.is_set() and pool is not None
        for key_id, api_key in keys.items():
            upstream.add_key(api_key)
            assert pool.add_key(key_id, api_key, None)
        oh.tctx = tctx
        try:
            yield oh
        finally:
            oh.lifecycle.done()


@contextmanager
def pools_on_one_database(mongo_uri: str, db_name: str, tmp_path: Path, n: int) -> Iterator[list[Any]]:
    """`n` pools on one database, each with its own store and write-behind writer: `n` sidecars without
    their mitmproxy side (rotation races, shared reservations). Stopped on exit."""
    from addon.pool.pool import Pool
    from addon.store.mongo import PoolStore
    from addon.store.writer import StoreWriter

    pools = []
    for i in range(n):
        store = PoolStore(mongo_uri, db_name)
        store.ensure_indexes(30)
        writer = StoreWriter(store, tmp_path / f"sc{i}" / f"journal-{db_name}.jsonl")
        writer.start()
        pools.append(Pool(store, writer, threshold=lambda: 9.95, default_budget=lambda: 10.0))
    try:
        yield pools
    finally:
        for p in pools:
            if p.reservation_sharer is not None:
                p.reservation_sharer.stop()
            p.writer.stop()
            p.store.close()
