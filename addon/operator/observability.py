"""Observability addons: `GET /metrics`, the dashboard's sign-in, and flows readable in mitmweb.

Two small composed addons, because mitmproxy calls addons in list order for every hook:
- `ObservabilityRoutes` goes *before* the admin addon: its `request` hook answers `GET /metrics`
  and `/admin/openhands/login|logout` locally (same auth rule as the admin API, `admin_auth.py`).
  Given the admin addon (`admin=`), it also hands it the admin requests: the script then tells the
  sidecar's own routes apart once per request, not once per addon (the admin addon is no hook of its own).
- `FlowObserver` goes *after* the pooled-traffic addon: in `responseheaders` it asks the stream tap
  the traffic addon installed to keep a bounded copy when flows are kept (mitmweb, the console, or a
  `-w` flow file), in `response`/`error` it sets that copy as the flow's body (so mitmweb's raw and
  `SSE-LLM` views show the stream) and counts the finished flow into the metrics from its flow state.
  Under mitmweb it adds the `comment` column to `web_columns` when the user has not set them.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable

from mitmproxy import ctx, http

from addon.core.counters import Metrics
from addon.core.identity import is_loopback, redact_credentials
from addon.core.sse import DEFAULT_KEEP_BYTES
from addon.hooks import guarded
from addon.operator import admin_auth
from addon.operator.admin_addon import AdminAddon
from addon.operator.metrics import MetricsEndpoint
from addon.traffic.flow_state import META as FLOW_META
from addon.traffic.flow_state import FlowState
from addon.traffic.flow_route import METRICS, SESSION, route_of
from addon.traffic.local_answers import json_response

log = logging.getLogger(__name__)

OBSERVED = "openhands_observed"  # flow.metadata flag: this flow was counted once already
KEEPING_OPTIONS = ("web_port", "console_layout")  # mitmweb's and the console's options: they keep flows


def _peer(flow: http.HTTPFlow) -> str | None:
    return flow.client_conn.peername[0] if flow.client_conn.peername else None


def _local_hosts(flow: http.HTTPFlow) -> list[str]:
    """The authorities a browser may have used to reach us (mitmproxy rewrites Host in reverse mode)."""
    sock = flow.client_conn.sockname
    if not sock:
        return []
    host, port = sock[0], sock[1]
    hosts = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    if is_loopback(host):
        hosts += [f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"]
    return hosts


def _comment(flow: http.HTTPFlow, path: str) -> None:
    flow.comment = f"🛠️ {flow.request.method} {path} → {flow.response.status_code if flow.response else '?'}"


def _secure(flow: http.HTTPFlow) -> bool:
    """TLS between the browser and the sidecar (not `request.scheme`: reverse mode sets the upstream's)."""
    return bool(getattr(flow.client_conn, "tls_established", False))


class ObservabilityRoutes:
    """Answers `GET /metrics` and the dashboard's sign-in and sign-out on the sidecar's own address, and
    hands the admin requests to `admin` when given (an `AdminAddon`: the one route look-up serves both)."""

    def __init__(self, services: Any, endpoint: MetricsEndpoint, admin: AdminAddon | None = None) -> None:
        self.services = services
        self.endpoint = endpoint
        self.admin = admin

    @guarded
    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """Sync: an LLM request is told apart from ours without normalizing its path (`flow_route`); only
        `/metrics` and an admin request return a coroutine (a page rendered, or an answer made, off the loop)."""
        s = self.services.settings
        if flow.response is not None or s is None:
            return None
        route = route_of(flow, s)  # `//metrics`, `/%6Detrics`...: answered here too, never forwarded
        if route is None:
            return None
        kind, path = route
        if kind == METRICS:
            FlowState(local=True, admin=True).save(flow)
            return self._metrics(flow, s, path)
        if kind == SESSION:
            FlowState(local=True, admin=True).save(flow)
            self._session(flow, s, path)
            _comment(flow, path)
        elif self.admin is not None:  # ADMIN
            return self.admin.answer(flow)
        return None

    async def _metrics(self, flow: http.HTTPFlow, s: Any, path: str) -> None:
        await self._metrics_answer(flow, s)
        _comment(flow, path)

    async def _metrics_answer(self, flow: http.HTTPFlow, s: Any) -> None:
        try:
            if flow.request.method not in ("GET", "HEAD"):
                flow.response = json_response(405, {"error": {"message": "GET /metrics only", "type":
                                                              "invalid_request_error", "code": 405}}, {"allow": "GET"})
                return
            d = admin_auth.decide(flow.request.method, flow.request.headers, _peer(flow), s.admin_token, time.time(),
                                  loopback_without_token=s.metrics_loopback)
            if not d.allowed:
                flow.response = json_response(d.status, {"error": {"message": d.message.replace("admin API", "metrics"),
                                                                   "type": "auth_error", "code": d.status}})
                return
            body, ctype = await asyncio.to_thread(self.endpoint.render)
            flow.response = http.Response.make(200, body, {"content-type": ctype, "cache-control": "no-store"})
        finally:
            redact_credentials(flow.request.headers)

    def _session(self, flow: http.HTTPFlow, s: Any, path: str) -> None:
        req = flow.request
        try:
            a = admin_auth.answer_session(req.method, path, req.headers, req.get_content(strict=False),
                                          s.admin_token, time.time(), secure=_secure(flow),
                                          local_hosts=_local_hosts(flow))
            flow.response = http.Response.make(a.status, a.body, a.headers)
        finally:  # the token was in the form: nothing of it stays in the flow (mitmweb, -w files)
            redact_credentials(req.headers)
            if req.raw_content:
                req.set_content(b"token=***" if b"token=" in req.raw_content else b"")


class FlowObserver:
    """Bounded stream copies for kept flows, the `comment` column, and per-flow metrics."""

    def __init__(self, services: Any, metrics: Metrics) -> None:
        self.services = services
        self.metrics = metrics
        self.flows_kept = False
        self._columns_done = False

    # -- options ------------------------------------------------------------------------------
    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        self.flows_kept = any(name in opts for name in KEEPING_OPTIONS) or bool(
            "save_stream_file" in opts and opts.save_stream_file)
        if self.flows_kept and "store_streamed_bodies" in opts and opts.store_streamed_bodies:
            self.flows_kept = False  # mitmproxy keeps the whole stream itself
        if "web_columns" in opts and not self._columns_done:
            self._columns_done = True
            try:
                if not opts.has_changed("web_columns") and "comment" not in opts.web_columns:
                    opts.update(web_columns=[*opts.web_columns, "comment"])
            except Exception as e:  # an older mitmweb without the column: the flows still carry comments
                log.debug("could not add the comment column: %s", e)

    def keep_bytes(self) -> int:
        if not self.flows_kept:
            return 0
        s = self.services.settings
        return int(getattr(s, "stream_copy_bytes", DEFAULT_KEEP_BYTES)) if s is not None else DEFAULT_KEEP_BYTES

    # -- hooks --------------------------------------------------------------------------------
    @guarded
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if not self.flows_kept or flow.response is None:
            return
        keep = getattr(flow.response.stream, "keep", None)
        if callable(keep):
            keep(self.keep_bytes())

    @guarded
    def response(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is not None and callable(resp.stream):  # a buffered answer (stream False) has no tap to read
            self._attach_copy(resp)
        self._count(flow, dropped=False)

    @guarded
    def error(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is not None and callable(resp.stream):
            self._attach_copy(resp)
        self._count(flow, dropped=True)

    @staticmethod
    def _attach_copy(resp: http.Response) -> None:
        """The tap's copy becomes the body mitmproxy did not keep (it keeps none for a streamed flow)."""
        tap = resp.stream
        kept = getattr(tap, "kept_body", None)
        if not callable(kept):
            return
        body = kept()
        if body is None:
            return
        if resp.raw_content is None:
            resp.raw_content = body
        release = getattr(tap, "release_copy", None)
        if callable(release):
            release()

    def _count(self, flow: http.HTTPFlow, dropped: bool) -> None:
        """Once per flow (a stream that fails after its response is not counted again); the counters read the
        stored state dict themselves, in a batch (`Metrics.flow_done`)."""
        meta = flow.metadata
        state = meta.get(FLOW_META)
        if not isinstance(state, dict) or state.get("admin") or meta.get(OBSERVED):
            return
        meta[OBSERVED] = True
        resp = flow.response
        self.metrics.flow_done(state, resp.status_code if resp is not None else None, dropped)
