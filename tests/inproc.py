"""The composed addons in process (mitmproxy.test.taddons), driven hook by hook as mitmproxy would."""
from __future__ import annotations

import inspect
from typing import Any

from mitmproxy import http

from addon.lifecycle import Lifecycle
from addon.openhands import default_addons
from addon.services import Services


class InProcess:
    """All addons of `addon/openhands.py` on one `Services`; `request(flow)` runs every addon's hook in order."""

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
