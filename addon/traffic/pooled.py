"""Traffic addon: pooled flows — identity, key choice, credential swap, SSE tap, metering, recovery.

Hooks run under `addon.hooks.guarded`; MongoDB and HTTP work runs off the event loop. Which key a
client gets is decided by `Pool.acquire` alone; what an upstream answer means, by `core.answers`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Callable, Collection

import requests
from mitmproxy import http

from addon.core import flow_comments
from addon.core.answers import UpstreamVerdict, classify_response
from addon.core.identity import client_allowed, client_identity, redact_credentials, swap_credential
from addon.core.masking import mask_key
from addon.core.metering import parse_money
from addon.core.sse import SSETap, strip_usage_chunk_from_body, usage_from_sse_body
from addon.core.status import Status
from addon.core.usage import Usage, add_include_usage, usage_from_json, wire_format_for_path
from addon.hooks import guarded
from addon.pool.pool import Acquired, KeyState, Pool
from addon.services import Services
from addon.traffic.flow_state import FlowState
from addon.traffic.local_answers import no_key_response, openai_error
from addon.traffic.upstream_http import resend, response_headers

log = logging.getLogger(__name__)

RECOVERABLE = ("budget", "rate_limited", "invalid")
DEFAULT_COOLDOWN_S = 60.0


class PooledTraffic:
    def __init__(self, services: Services, clock: Callable[[], float] = time.time) -> None:
        self.services = services
        self.clock = clock

    def _pool(self) -> Pool:
        """Set once start-up is done; hooks reach it only after `Services.wait_ready` (no property:
        mitmproxy reads every attribute of an addon when it collects commands)."""
        assert self.services.pool is not None
        return self.services.pool

    # -- request ------------------------------------------------------------------------------
    @guarded
    async def request(self, flow: http.HTTPFlow) -> None:
        svc = self.services
        if svc.settings is None or flow.response is not None:
            return
        if not svc.current().is_upstream(flow.request.host, flow.request.port):
            return
        if not await svc.wait_ready():
            flow.response = openai_error(503, f"OpenHands key-pool sidecar is not ready: {svc.not_ready_reason()}",
                                         "service_unavailable")
            FlowState(local=True).save(flow)
            return
        s = svc.current()
        headers = flow.request.headers
        if not client_allowed(headers, s.client_keys):
            flow.response = openai_error(401, "This sidecar does not accept your client key.", "auth_error")
            FlowState(local=True, rejected="client_key").save(flow)
            flow.comment = "🚫 client key not on the allowlist"
            return
        peer = flow.client_conn.peername[0] if flow.client_conn.peername else None
        state = FlowState(client=client_identity(headers, peer), format=wire_format_for_path(flow.request.path))
        acquired = await self._acquire(state.client, ())
        if acquired.key is None:
            self._answer_no_key(flow, state)
            return
        key = acquired.key
        if acquired.rotated_from is not None:
            state.rotated_from = acquired.rotated_from
            flow.comment = flow_comments.append(flow.comment,
                                                flow_comments.rotated_marker(acquired.rotated_from, key.id))
        swap_credential(headers, key.api_key)
        headers["accept-encoding"] = "identity"
        if state.format is not None:
            # LiteLLM >= 1.110 then puts usage.cost in streamed usage (streams carry no cost header); older ignore it.
            headers["x-litellm-include-cost-in-streaming-usage"] = "true"
            if flow.request.method == "POST":
                self._prepare_body(flow, state)
        state.key_id, state.key, state.tried = key.id, mask_key(key.api_key), [key.id]
        state.save(flow)

    async def _acquire(self, client: str, exclude: Collection[str], successor: str | None = None) -> Acquired:
        """Memory decides on the loop; rotation or promotion (database steps) run off it."""
        acquired = self._pool().acquire(client, exclude, successor=successor, blocking=False)
        if acquired is None:
            acquired = await asyncio.to_thread(self._pool().acquire, client, exclude, successor=successor)
        assert acquired is not None
        return acquired

    @staticmethod
    def _prepare_body(flow: http.HTTPFlow, state: FlowState) -> None:
        try:
            body = json.loads(flow.request.get_content(strict=False) or b"null")
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(body, dict):
            return
        state.model = body.get("model") if isinstance(body.get("model"), str) else None
        if state.format == "chat" and add_include_usage(body):
            flow.request.set_content(json.dumps(body, separators=(",", ":")).encode())
            state.strip_usage = True

    def _answer_no_key(self, flow: http.HTTPFlow, state: FlowState, reason: str = "no usable pool key (429)") -> None:
        flow.response = no_key_response()
        state.local, state.rejected = True, "no_key"
        state.save(flow)
        flow.comment = flow_comments.failed_marker(reason, state.tried or None)

    # -- response headers ---------------------------------------------------------------------
    @guarded
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = FlowState.of(flow)
        if state is None or state.local or flow.response is None or not state.format:
            return
        ctype = flow.response.headers.get("content-type", "")
        if flow.response.status_code == 200 and ctype.split(";")[0].strip().lower() == "text/event-stream":
            flow.response.stream = SSETap(state.format, strip_usage_chunk=state.strip_usage)

    # -- response -----------------------------------------------------------------------------
    @guarded
    async def response(self, flow: http.HTTPFlow) -> None:
        state = FlowState.of(flow)
        if state is None:
            return
        try:
            if not state.local and flow.response is not None:
                await self._finish(flow, state)
        finally:  # the exchange is over: mitmdump, mitmweb and -w files see masked credentials
            redact_credentials(flow.request.headers)
            state.save(flow)

    async def _finish(self, flow: http.HTTPFlow, state: FlowState) -> None:
        resp = flow.response
        assert resp is not None
        tap = resp.stream if isinstance(resp.stream, SSETap) else None
        if tap is not None:
            self._meter(flow, state, tap.usage, None)
            return
        verdict = classify_response(resp.status_code, resp.headers, resp.get_content(strict=False), self.clock())
        if verdict.kind in RECOVERABLE:
            await self._recover(flow, state, verdict)
        elif 200 <= resp.status_code < 300:
            self._meter_buffered(flow, state)

    @guarded
    def error(self, flow: http.HTTPFlow) -> None:
        """A dropped stream still charges what was metered before the drop."""
        state = FlowState.of(flow)
        if state is None:
            return
        try:
            tap = flow.response.stream if flow.response is not None else None
            if not state.local and not state.metered and isinstance(tap, SSETap):
                self._meter(flow, state, tap.usage, None, note=flow_comments.dropped_marker())
        finally:
            redact_credentials(flow.request.headers)
            state.save(flow)

    # -- metering (DESIGN §6) -----------------------------------------------------------------
    def _meter_buffered(self, flow: http.HTTPFlow, state: FlowState) -> None:
        resp = flow.response
        assert resp is not None
        if not state.format:
            return
        body = resp.get_content(strict=False) or b""
        usage: Usage | None
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            usage = usage_from_sse_body(state.format, body)
            if state.strip_usage:
                resp.set_content(strip_usage_chunk_from_body(body))
        else:
            try:
                usage = usage_from_json(state.format, json.loads(body))
            except (ValueError, UnicodeDecodeError):
                usage = None
        self._meter(flow, state, usage, resp.headers.get("x-litellm-response-cost"))

    def _meter(self, flow: http.HTTPFlow, state: FlowState, usage: Usage | None, header_cost: str | None,
               note: str = "") -> None:
        if state.metered or not state.format or state.key_id is None:
            return
        charge = self.services.meter.charge(usage, header_cost, state.model)
        key_spend = parse_money(flow.response.headers.get("x-litellm-key-spend")) if flow.response else None
        spend = self._pool().record_usage(state.key_id, charge.cost, charge.tokens, key_spend)
        state.metered, state.cost, state.cost_source = True, round(charge.cost, 8), charge.source
        state.model = charge.model
        if usage is not None:
            t = usage.tokens
            state.tokens = {"input": t.input, "cache_write": t.cache_write + t.cache_write_1h,
                            "cache_read": t.cache_read, "output": t.output}
        key = self._pool().get(state.key_id)
        line = flow_comments.usage_line(state.key_id, state.key, charge.model, state.tokens or {}, charge.cost,
                                        spend, key.budget_limit if key else 0.0, charge.source)
        flow.comment = flow_comments.append(flow_comments.append(flow.comment, line), note)

    # -- recovery (DESIGN §7) -----------------------------------------------------------------
    async def _recover(self, flow: http.HTTPFlow, state: FlowState, verdict: UpstreamVerdict) -> None:
        """Retire the refusing key, resend on its successor; at most one try per key, max_retries in all."""
        tried = set(state.tried)
        retired = False
        while verdict.kind in RECOVERABLE:
            assert state.key_id is not None
            successor = await self._retire(state.key_id, verdict)
            retired = True
            if state.retries >= self.services.current().max_retries:
                break
            acquired = await self._acquire(state.client, tried, successor)
            key = acquired.key
            if key is None:
                break
            tried.add(key.id)
            state.retries += 1
            old_id = state.key_id
            try:
                resp = await asyncio.to_thread(self._resend, flow, key)
            except requests.RequestException as e:
                log.warning("↩️ [OpenHands/Retry] retry on %s failed: %s", key.id, e.__class__.__name__)
                flow.response = openai_error(502, f"Upstream unreachable on retry: {e.__class__.__name__}",
                                             "upstream_error")
                state.local, state.tried = True, sorted(tried)
                flow.comment = flow_comments.append(flow.comment,
                                                    flow_comments.failed_marker("upstream unreachable on retry (502)"))
                return
            state.key_id, state.key, state.tried = key.id, mask_key(key.api_key), sorted(tried)
            flow.comment = flow_comments.append(flow.comment, flow_comments.retried_marker(key.id, verdict.kind))
            flow.response = http.Response.make(resp.status_code, resp.content, response_headers(resp))
            log.info("↩️ [OpenHands/Retry] %s -> %s after %s: %d", old_id, key.id, _reason(verdict), resp.status_code)
            verdict = classify_response(resp.status_code, flow.response.headers, resp.content, self.clock())
            retired = False
        if verdict.kind in RECOVERABLE:
            if not retired:
                assert state.key_id is not None
                await self._retire(state.key_id, verdict)
            if verdict.kind == "rate_limited" and state.retries == 0:
                return  # nothing else to try: the upstream's own 429 (with its Retry-After) goes through
            # Never show a budget error: the client gets a retryable 429 with a clear message.
            state.tried = sorted(tried)
            self._answer_no_key(flow, state, "every key tried is spent or refused (429)")
            return
        if flow.response is not None and 200 <= flow.response.status_code < 300:
            self._meter_buffered(flow, state)

    async def _retire(self, key_id: str, verdict: UpstreamVerdict) -> str | None:
        """Take the refusing key out of service; returns its successor when a rotation found one."""
        if verdict.kind == "budget" and verdict.budget_error is not None:
            be = verdict.budget_error
            log.warning("💸 [OpenHands/BudgetError] key %s: %s", key_id, be.message[:200])
            # rotate, not just retire: one backup per exhausted key across sidecars, and its clients move too
            result = await asyncio.to_thread(self._pool().rotate, key_id, status=Status.EXHAUSTED.value,
                                             error=be.message[:300], spend=be.spend, budget=be.budget)
            return result.new_id
        if verdict.kind == "rate_limited":
            cooldown = verdict.retry_after or DEFAULT_COOLDOWN_S
            log.warning("⏳ [OpenHands/RateLimit] key %s cooling down for %.0fs", key_id, cooldown)
            self._pool().mark_rate_limited(key_id, self.clock() + cooldown, "rate limited by upstream")
            return None
        if verdict.kind == "invalid":
            log.warning("🚫 [OpenHands/InvalidKey] key %s refused by the upstream; retiring it", key_id)
            result = await asyncio.to_thread(self._pool().rotate, key_id, status=Status.INVALID.value,
                                             error="refused by upstream (401/403)")
            return result.new_id
        return None

    def _resend(self, flow: http.HTTPFlow, key: KeyState) -> requests.Response:
        headers = http.Headers(flow.request.headers.fields)
        swap_credential(headers, key.api_key)
        return resend(self.services.session(), flow.request.method, flow.request.url, headers.items(multi=True),
                      flow.request.get_content(strict=False))


def _reason(verdict: UpstreamVerdict) -> str:
    return {"budget": "budget error", "rate_limited": "rate limit", "invalid": "invalid key"}.get(verdict.kind,
                                                                                                verdict.kind)
