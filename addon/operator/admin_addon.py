"""Admin addon: answers admin paths in `request`, before any other addon sees the flow.

Admin requests are answered locally and never forwarded; their token and any `apiKey` are masked in
the flow once answered, so flow files and mitmweb keep no secret.
"""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable

from mitmproxy import http

from addon.core.identity import redact_credentials
from addon.hooks import guarded
from addon.operator import admin_auth
from addon.operator.admin_api import redact_admin_body
from addon.services import Services
from addon.traffic.flow_route import METRICS, route_of
from addon.traffic.flow_state import FlowState
from addon.traffic.local_answers import json_response, openai_error


class AdminAddon:
    def __init__(self, services: Services) -> None:
        self.services = services

    @guarded
    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """Sync: an LLM request is told apart from an admin one without normalizing its path (`flow_route`);
        only an admin request returns a coroutine."""
        s = self.services.settings
        if s is None or flow.response is not None:
            return None
        route = route_of(flow, s)  # any spelling that normalizes to an admin path: answered, never forwarded
        if route is None or route[0] == METRICS:
            return None
        return self.answer(flow)

    def answer(self, flow: http.HTTPFlow) -> Awaitable[None]:
        """The admin request `flow` (its path normalizes to an admin path): marked local, then answered.
        Also called by `ObservabilityRoutes`, which tells the sidecar's routes apart for both addons."""
        FlowState(local=True, admin=True).save(flow)
        return self._admin(flow)

    async def _admin(self, flow: http.HTTPFlow) -> None:
        try:
            await self._answer(flow)
        finally:
            redact_admin_request(flow)

    async def _answer(self, flow: http.HTTPFlow) -> None:
        svc = self.services
        if not await svc.wait_ready() or svc.admin is None:
            flow.response = openai_error(503, f"OpenHands key-pool sidecar is not ready: {svc.not_ready_reason()}",
                                         "service_unavailable")
            return
        s = svc.current()
        peer = flow.client_conn.peername[0] if flow.client_conn.peername else None
        req = flow.request
        decision = admin_auth.decide(req.method, req.headers, peer, s.admin_token, time.time())  # bearer or cookie
        if not decision.allowed:
            page = admin_auth.refusal(decision, req.method, req.path, req.headers)  # a browser: the sign-in form
            flow.response = http.Response.make(page.status, page.body, page.headers) if page else json_response(
                decision.status,
                {"error": {"message": decision.message, "type": "auth_error", "code": decision.status}})
            return
        status, body = await asyncio.to_thread(svc.admin.handle, flow.request.method, flow.request.path,
                                               flow.request.get_content(strict=False))
        if isinstance(body, str):
            flow.response = http.Response.make(status, body, {"content-type": "text/html; charset=utf-8",
                                                              "cache-control": "no-store"})
        else:
            flow.response = json_response(status, body)
        flow.comment = f"🛠️ admin {flow.request.method} {flow.request.path.split('?')[0]} → {status}"


def redact_admin_request(flow: http.HTTPFlow) -> None:
    """An answered admin request keeps no secret for mitmdump's printing or mitmweb: token and apiKey masked."""
    redact_credentials(flow.request.headers)
    raw = flow.request.get_content(strict=False)
    if raw:  # whatever its form (invalid JSON too): no full key stays in the flow
        flow.request.set_content(redact_admin_body(raw))
