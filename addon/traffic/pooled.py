"""The request path of DESIGN §4 and §7: pooled flows get a pool key, are metered, and recover.

Everything here runs on mitmproxy's event loop, so it touches memory only; MongoDB and HTTP work
is awaited through `asyncio.to_thread`. No exception may escape a hook: each public coroutine is
wrapped by the caller (`Sidecar.guard`).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Callable

import requests
from mitmproxy import http

from addon.core import flow_comments
from addon.core.answers import UpstreamVerdict, classify_response
from addon.core.identity import client_allowed, client_identity, swap_credential
from addon.core.masking import mask_key
from addon.core.metering import Charge, Meter, parse_money
from addon.pool.pool import KeyState, Pool
from addon.core.rotation_policy import rotation_point
from addon.core.sse import SSETap, strip_usage_chunk_from_body, usage_from_sse_body
from addon.traffic.upstream_http import resend, response_headers
from addon.core.usage import add_include_usage, usage_from_json, wire_format_for_path

log = logging.getLogger(__name__)

META = "openhands"  # flow.metadata key; JSON-like values only
RECOVERABLE = ("budget", "rate_limited", "invalid")


def json_response(status: int, body: Any, extra: dict[str, str] | None = None) -> http.Response:
    headers = {"content-type": "application/json", "cache-control": "no-store"}
    headers.update(extra or {})
    return http.Response.make(status, json.dumps(body, separators=(",", ":")), headers)


def openai_error(status: int, message: str, err_type: str, code: str | None = None,
                 retry_after: int | None = None) -> http.Response:
    extra = {"retry-after": str(retry_after)} if retry_after is not None else None
    return json_response(status, {"error": {"message": message, "type": err_type, "param": None,
                                            "code": code or str(status)}}, extra)


class PooledFlows:
    def __init__(self, pool: Pool, meter: Meter, *, settings: Callable[[], Any],
                 session: Callable[[], requests.Session], clock: Callable[[], float] = time.time) -> None:
        self.pool = pool
        self.meter = meter
        self.settings = settings
        self.session = session
        self.clock = clock
        self._last_resort_warned: dict[str, float] = {}

    # -- request ------------------------------------------------------------------------------
    async def request(self, flow: http.HTTPFlow) -> None:
        s = self.settings()
        headers = flow.request.headers
        if not client_allowed(headers, s.client_keys):
            flow.response = openai_error(401, "This sidecar does not accept your client key.", "auth_error")
            flow.metadata[META] = {"local": True, "rejected": "client_key"}
            flow.comment = "🚫 client key not on the allowlist"
            return
        fmt = wire_format_for_path(flow.request.path)
        peer = flow.client_conn.peername[0] if flow.client_conn.peername else None
        client_id = client_identity(headers, peer)
        key = await self.acquire(client_id, flow, exclude=set())
        if key is None:
            self._no_key_response(flow)
            return
        swap_credential(headers, key.api_key)
        headers["accept-encoding"] = "identity"
        if fmt is not None:
            # LiteLLM >= 1.110 then puts usage.cost in streamed usage (streams carry no cost header); older ignore it.
            headers["x-litellm-include-cost-in-streaming-usage"] = "true"
        request_model, strip = None, False
        if fmt is not None and flow.request.method == "POST":
            request_model, strip = self._prepare_body(flow, fmt)
        flow.metadata[META] = {"key_id": key.id, "key": mask_key(key.api_key), "client": client_id[:48],
                               "format": fmt, "strip_usage": strip, "model": request_model, "tried": [key.id]}

    def _prepare_body(self, flow: http.HTTPFlow, fmt: str) -> tuple[str | None, bool]:
        try:
            body = json.loads(flow.request.get_content(strict=False) or b"null")
        except (ValueError, UnicodeDecodeError):
            return None, False
        if not isinstance(body, dict):
            return None, False
        model = body.get("model") if isinstance(body.get("model"), str) else None
        strip = False
        if fmt == "chat" and add_include_usage(body):
            flow.request.set_content(json.dumps(body, separators=(",", ":")).encode())
            strip = True
        return model, strip

    async def acquire(self, client_id: str, flow: http.HTTPFlow | None, exclude: set[str]) -> KeyState | None:
        """The client's key, rotating proactively or promoting a backup when needed (off the loop)."""
        choice = self.pool.choose(client_id, exclude)
        key = choice.key
        if choice.rotate_from is not None:
            old = choice.rotate_from
            point = rotation_point(old.budget_limit, self.settings().spend_threshold)
            result = await asyncio.to_thread(
                self.pool.rotate, old.id, error=f"proactive rotation at ${old.effective_spend:.2f}", keep_if_stuck=True)
            if result.new_id is not None:
                log.info("🔮 [OpenHands/ProactiveRotation] %s -> %s (spend $%.2f >= $%.2f)",
                         old.id, result.new_id, old.effective_spend, point)
                key = self.pool.get(result.new_id)
                if flow is not None:
                    self._note(flow, flow_comments.rotated_marker(old.id, result.new_id), rotated_from=old.id)
            else:
                log.warning("⚠️ [OpenHands/ProactiveRotation] key %s reached $%.2f >= $%.2f but no backup or other "
                            "usable key is left; sending on it", old.id, old.effective_spend, point)
                key = self.pool.get(old.id)
        elif key is None:
            new_id = await asyncio.to_thread(self.pool.promote_backup)
            key = self.pool.get(new_id) if new_id else None
            if key is not None and key.id in exclude:
                key = None
            if key is None:
                key = self.pool.last_resort(exclude)
                if key is not None:
                    self._warn_last_resort(key)
        if key is not None:
            self.pool.bind(client_id, key.id)
        return key

    def _warn_last_resort(self, key: KeyState) -> None:
        now = self.clock()
        if now - self._last_resort_warned.get(key.id, 0.0) >= 60.0:
            self._last_resort_warned[key.id] = now
            log.warning("⚠️ [OpenHands/ProactiveRotation] every key is past its rotation point and no backup is left; "
                        "sending on %s (spend $%.2f of $%.2f)", key.id, key.effective_spend, key.budget_limit)

    def _no_key_response(self, flow: http.HTTPFlow) -> None:
        flow.response = openai_error(
            429, "No pool key with budget left: every key is exhausted, invalid or cooling down and no backup "
                 "key remains. Add keys via the admin API, or retry later.",
            "rate_limit_error", retry_after=60)
        flow.metadata[META] = {"local": True, "rejected": "no_key"}
        flow.comment = flow_comments.failed_marker("no usable pool key (429)")

    # -- response headers ---------------------------------------------------------------------
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(META)
        if not meta or meta.get("local") or flow.response is None or not meta.get("format"):
            return
        ctype = flow.response.headers.get("content-type", "")
        if flow.response.status_code == 200 and ctype.split(";")[0].strip().lower() == "text/event-stream":
            flow.response.stream = SSETap(meta["format"], strip_usage_chunk=bool(meta.get("strip_usage")))

    # -- response -----------------------------------------------------------------------------
    async def response(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(META)
        if not meta or meta.get("local") or flow.response is None:
            return
        tap = flow.response.stream if isinstance(flow.response.stream, SSETap) else None
        if tap is not None:
            self._meter(flow, tap.usage, None)
            return
        resp = flow.response
        verdict = classify_response(resp.status_code, resp.headers, resp.get_content(strict=False), self.clock())
        if verdict.kind in ("budget", "rate_limited", "invalid"):
            await self._recover(flow, verdict)
            return
        if 200 <= resp.status_code < 300:
            self._meter_buffered(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        """A dropped stream still charges what was metered before the drop."""
        meta = flow.metadata.get(META)
        if not meta or meta.get("local") or meta.get("metered") or flow.response is None:
            return
        tap = flow.response.stream if isinstance(flow.response.stream, SSETap) else None
        if tap is not None:
            self._meter(flow, tap.usage, None, note=flow_comments.dropped_marker())

    def _meter_buffered(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata[META]
        resp = flow.response
        assert resp is not None
        body = resp.get_content(strict=False) or b""
        fmt = meta.get("format")
        usage = None
        if fmt:
            if resp.headers.get("content-type", "").startswith("text/event-stream"):
                usage = usage_from_sse_body(fmt, body)
                if meta.get("strip_usage"):
                    resp.set_content(strip_usage_chunk_from_body(body))
            else:
                try:
                    usage = usage_from_json(fmt, json.loads(body))
                except (ValueError, UnicodeDecodeError):
                    usage = None
        self._meter(flow, usage, resp.headers.get("x-litellm-response-cost"))

    def _meter(self, flow: http.HTTPFlow, usage: Any, header_cost: str | None, note: str = "") -> Charge | None:
        meta = flow.metadata[META]
        if meta.get("metered") or not meta.get("format"):
            return None
        charge = self.meter.charge(usage, header_cost, meta.get("model"))
        key_spend = parse_money(flow.response.headers.get("x-litellm-key-spend")) if flow.response else None
        spend = self.pool.record_usage(meta["key_id"], charge.cost, charge.tokens, key_spend)
        meta["metered"] = True
        meta["cost"] = round(charge.cost, 8)
        meta["cost_source"] = charge.source
        meta["model"] = charge.model
        if usage is not None:
            t = usage.tokens
            meta["tokens"] = {"input": t.input, "cache_write": t.cache_write + t.cache_write_1h,
                              "cache_read": t.cache_read, "output": t.output}
        key = self.pool.get(meta["key_id"])
        budget = key.budget_limit if key else 0.0
        tokens = meta.get("tokens") or {}
        line = flow_comments.usage_line(meta["key_id"], meta.get("key", ""), charge.model, tokens, charge.cost,
                                        spend, budget, charge.source)
        flow.comment = flow_comments.append(flow_comments.append(flow.comment, line), note)
        return charge

    def _note(self, flow: http.HTTPFlow, text: str, **meta: Any) -> None:
        flow.comment = flow_comments.append(flow.comment, text)
        m = flow.metadata.setdefault(META, {})
        for k, v in meta.items():
            m[k] = v

    # -- recovery (DESIGN §7) -----------------------------------------------------------------
    async def _recover(self, flow: http.HTTPFlow, verdict: UpstreamVerdict) -> None:
        """Retire the refusing key, resend on the next one; at most one try per key, max_retries in all."""
        meta = flow.metadata[META]
        tried: set[str] = set(meta.get("tried", []))
        attempts, retired = 0, False
        while verdict.kind in RECOVERABLE:
            await self._retire(meta["key_id"], verdict)
            retired = True
            if attempts >= self.settings().max_retries:
                break
            key = await self.acquire(meta.get("client", ""), None, exclude=tried)
            if key is None:
                break
            tried.add(key.id)
            attempts += 1
            try:
                resp = await asyncio.to_thread(self._resend, flow, key)
            except requests.RequestException as e:
                log.warning("↩️ [OpenHands/Retry] retry on %s failed: %s", key.id, e.__class__.__name__)
                flow.response = openai_error(502, f"Upstream unreachable on retry: {e.__class__.__name__}",
                                             "upstream_error")
                meta.update(local=True, retries=attempts, tried=sorted(tried))
                self._note(flow, flow_comments.failed_marker("upstream unreachable on retry (502)"))
                return
            meta.update(key_id=key.id, key=mask_key(key.api_key), tried=sorted(tried), retries=attempts)
            self._note(flow, flow_comments.retried_marker(key.id, verdict.kind))
            flow.response = http.Response.make(resp.status_code, resp.content, response_headers(resp))
            verdict = classify_response(resp.status_code, flow.response.headers, resp.content, self.clock())
            retired = False
        if verdict.kind in RECOVERABLE:
            if not retired:
                await self._retire(meta["key_id"], verdict)
            if verdict.kind == "rate_limited" and attempts == 0:
                return  # nothing else to try: the upstream's own 429 (with its Retry-After) goes through
            # Never show a budget error: the client gets a retryable 429 with a clear message.
            self._no_key_response(flow)
            flow.comment = flow_comments.failed_marker("every key tried is spent or refused (429)", sorted(tried))
            flow.metadata[META] = {**meta, "local": True, "retries": attempts, "tried": sorted(tried)}
            return
        if flow.response is not None and 200 <= flow.response.status_code < 300:
            self._meter_buffered(flow)

    async def _retire(self, key_id: str, verdict: UpstreamVerdict) -> None:
        if verdict.kind == "budget" and verdict.budget_error is not None:
            be = verdict.budget_error
            log.warning("💸 [OpenHands/BudgetError] key %s: %s", key_id, be.message[:200])
            # rotate, not just retire: one backup per exhausted key across sidecars, and its clients move too
            await asyncio.to_thread(self.pool.rotate, key_id, status="exhausted", error=be.message[:300],
                                    spend=be.spend, budget=be.budget)
        elif verdict.kind == "rate_limited":
            until = self.clock() + (verdict.retry_after or 60.0)
            log.warning("⏳ [OpenHands/RateLimit] key %s cooling down for %.0fs", key_id, verdict.retry_after or 60.0)
            self.pool.mark_rate_limited(key_id, until, "rate limited by upstream")
        elif verdict.kind == "invalid":
            log.warning("🚫 [OpenHands/InvalidKey] key %s refused by the upstream; retiring it", key_id)
            await asyncio.to_thread(self.pool.rotate, key_id, status="invalid", error="refused by upstream (401/403)")

    def _resend(self, flow: http.HTTPFlow, key: KeyState) -> requests.Response:
        headers = http.Headers(flow.request.headers.fields)
        swap_credential(headers, key.api_key)
        return resend(self.session(), flow.request.method, flow.request.url, headers.items(multi=True),
                      flow.request.get_content(strict=False))
