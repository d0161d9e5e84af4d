"""Traffic addon: pooled flows — identity, key choice, credential swap, SSE tap, metering, recovery.

Hooks run under `addon.hooks.guarded`; MongoDB and HTTP work runs off the event loop. Which key a
client gets is decided by `Pool.acquire` alone; what an upstream answer means, by `core.answers`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Awaitable, Callable, Collection, Iterable, overload

import requests
from mitmproxy import http

from addon.core import flow_comments
from addon.core.answers import KeyContext, UpstreamVerdict, classify_response
from addon.core.identity import (CREDENTIAL_QUERY, Fields, HeaderScan, access, fold, identity_of, redact_credentials,
                                 scan_headers, swap_and_redact, swap_credential)
from addon.core.masking import mask_echoed_keys, mask_key
from addon.core.rotation_policy import rotation_point
from addon.core.routes import refusal_message, route_kind
from addon.traffic.key_probe import probe_key
from addon.core.metering import Charge, parse_money
from addon.core.request_body import request_facts
from addon.core.response_body import answer_usage
from addon.core.reservation import spend_is_after
from addon.core.sse import DECODABLE, EncodedSSETap, SSETap, strip_usage_chunk_from_body, usage_from_sse_body
from addon.core.config import Settings
from addon.core.status import Status
from addon.core.usage import Usage, add_include_usage, wire_format_for_path
from addon.hooks import guarded
from addon.core.counters import Metrics
from addon.pool.pool import Acquired, KeyState, Pool
from addon.services import Services
from addon.traffic.flow_memo import memo_of, peek
from addon.traffic.flow_state import FlowState
from addon.traffic.local_answers import no_key_response, openai_error
from addon.traffic.upstream_http import resend, response_headers

log = logging.getLogger(__name__)

RECOVERABLE = ("budget", "rate_limited", "invalid", "busy")
POOLED_KINDS = ("llm", "passthrough", "info")
IN_FLIGHT_META = "openhands_in_flight"  # the key id this flow counts as in flight on (a plain string)
BUSY_WAIT_S = 1.0
CONFIRMED_META = "openhands_confirmed"  # the key id a probe confirmed for this flow
DEFAULT_COOLDOWN_S = 60.0
FULL_WAIT_S, FULL_POLL_S = 3.0, 0.02  # in-flight reservation: how long a request waits for a key to settle
_INCLUDE_USAGE = b'{"stream_options":{"include_usage":true},'  # what `add_include_usage` adds, as bytes
# Headers the sidecar sets on every pooled request (read only, never changed: a body change copies them).
_ALSO = {b"accept-encoding": b"identity"}
_ALSO_LLM = {**_ALSO, b"x-litellm-include-cost-in-streaming-usage": b"true"}
_COPY_ONCE = 16384  # a body at least this long gets the member without a copy of its tail first (large contexts)


class PooledTraffic:
    def __init__(self, services: Services, clock: Callable[[], float] = time.time,
                 metrics: Metrics | None = None) -> None:
        self.services = services
        self.clock = clock
        self.metrics = metrics or Metrics()  # rotations, budget errors and retries, for GET /metrics
        self._in_flight: dict[str, int] = {}  # requests sent per key and not yet answered (busy vs spent)
        self._warned: set[tuple[str | None, str]] = set()
        self._encodings_warned: set[str] = set()
        self._masked: dict[str, str] = {}  # pool key -> `mask_key` of it (a pool's keys: bounded, see _MASKED_CAP)

    def _pool(self) -> Pool:
        """Set once start-up is done; hooks reach it only after `Services.wait_ready` (no property:
        mitmproxy reads every attribute of an addon when it collects commands)."""
        assert self.services.pool is not None
        return self.services.pool

    # -- request ------------------------------------------------------------------------------
    # Sync: a pooled flow whose key memory can choose at once is sent without any coroutine made or awaited;
    # what must wait (start-up, a database step, every key full) is handed back as an awaitable, guarded too.
    @guarded
    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        svc = self.services
        if svc.settings is None or flow.response is not None:
            return None
        req = flow.request
        if not svc.settings.is_upstream(req.host, req.port):
            return None
        if not svc.serving():
            return self._request_when_ready(flow)
        return self._request_ready(flow)

    async def _request_when_ready(self, flow: http.HTTPFlow) -> None:
        """Start-up is not over: wait for it (off the loop), then go on as a request would."""
        svc = self.services
        if not await svc.wait_ready():
            flow.response = openai_error(503, f"OpenHands key-pool sidecar is not ready: {svc.not_ready_reason()}",
                                         "service_unavailable")
            FlowState(local=True).save(flow)
            return
        rest = self._request_ready(flow)
        if rest is not None:
            await rest

    def _request_ready(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """The pool serves: admit the flow and send it on the key memory chooses; an awaitable only when
        the choice needs the database or every key is full."""
        admitted = self._admit(flow, self.services.current())
        if admitted is None:
            return None
        client, path, fields, scan = admitted
        state = FlowState.fresh(client, wire_format_for_path(path))
        acquired = self._acquire_now(state.client, ())
        if acquired is None or acquired.full:
            return self._request_waiting(flow, state, acquired, fields, scan)
        self._go(flow, state, acquired, fields, scan)
        return None

    async def _request_waiting(self, flow: http.HTTPFlow, state: FlowState, acquired: Acquired | None,
                               fields: Fields, scan: HeaderScan) -> None:
        """The key choice that waits: a rotation or promotion off the loop, or a moment for a full key."""
        if acquired is None:
            acquired = await self._acquire(state.client, ())
        if acquired.full:
            acquired = await self._wait_if_full(state.client, acquired)
        self._go(flow, state, acquired, fields, scan)

    def _go(self, flow: http.HTTPFlow, state: FlowState, acquired: Acquired, fields: Fields,
            scan: HeaderScan) -> None:
        """The key is chosen: no key is a local 429, else the rotation is noted and the flow sent."""
        if acquired.key is None:
            self._answer_no_key(flow, state)
            return
        if acquired.rotated_from is not None:
            state.rotated_from = acquired.rotated_from
            flow.comment = flow_comments.append(flow.comment,
                                                flow_comments.rotated_marker(acquired.rotated_from, acquired.key.id))
        self._send(flow, state, acquired.key, fields, scan)

    @staticmethod
    def _admit(flow: http.HTTPFlow, s: Settings) -> tuple[str, str, Fields, HeaderScan] | None:
        """The route and the client: (client identity, path, the header fields scanned, their scan) when
        the flow may use the pool; None when it was answered here (a route that never sees a pool key,
        a client refused)."""
        req = flow.request
        path = req.path
        query = list(req.query.items(multi=True)) if "?" in path else []
        if query and any(k.lower() in CREDENTIAL_QUERY for k, _ in query):  # ?key= is a LiteLLM credential
            req.query = [(k, v) for k, v in query if k.lower() not in CREDENTIAL_QUERY]  # never kept
            path = req.path
        if route_kind(path, s.extra_routes) not in POOLED_KINDS:
            # Management routes (and anything not an LLM or info route) never see a pool key (trust boundary).
            flow.response = openai_error(403, refusal_message(path), "forbidden_route")
            FlowState(local=True, rejected="route").save(flow)
            flow.comment = "🚫 not a pooled route (403)"
            return None
        fields = req.headers.fields
        scan = scan_headers(fields)  # one walk: session, credential, carriers (identity, allowlist, swap)
        peer = flow.client_conn.peername[0] if flow.client_conn.peername else None
        credential = scan.credential_with(query)
        refused = access(credential, s.client_keys, peer, s.open_pool)
        if refused is not None:
            flow.response = openai_error(refused[0], refused[1], "auth_error")
            FlowState(local=True, rejected="client_key").save(flow)
            flow.comment = "🚫 client key not on the allowlist" if refused[0] == 401 else "🚫 remote client (403)"
            return None
        client = "session:" + scan.session[:200] if scan.session else identity_of(credential, peer)
        return client, path, fields, scan

    def _send(self, flow: http.HTTPFlow, state: FlowState, key: KeyState, fields: Fields, scan: HeaderScan) -> None:
        """The flow goes out on `key`: the body that asks for stream usage, the credential swap (one write),
        the flow's state saved, the key's in-flight count and reservation taken."""
        req = flow.request
        method = req.data.method  # (the raw bytes: `req.method` decodes and upper-cases them on every read)
        post = method == b"POST" or method.upper() == b"POST"
        body = self._prepare_body(flow, state, scan) if state.format is not None and post else None
        # (LiteLLM >= 1.110 puts usage.cost in streamed usage when asked; streams carry no cost header.)
        also = _ALSO_LLM if state.format is not None else _ALSO
        encoded = bool(scan.folded.get(b"content-encoding"))
        if body is not None and not encoded:
            req.raw_content = body
            if b"transfer-encoding" not in scan.folded:
                also = {**also, b"content-length": str(len(body)).encode()}
        headers = req.headers
        if headers.fields is not fields:  # changed since the scan (nothing on this path does): read again
            scan = scan_headers(headers.fields)
        # one write: every carrier out, the pool key in, the headers the sidecar sets (and, for the end of
        # the flow, the same fields with the pool key masked)
        swapped, redacted = swap_and_redact(headers.fields, key.api_key, scan.used, also)
        headers.fields = swapped
        memo = memo_of(flow)
        memo.sent, memo.sent_redacted = swapped, redacted
        if body is not None and encoded:
            req.set_content(body)  # encoded as the client sent it (rare: a compressed request body)
        masked = self._masked.get(key.api_key)
        if masked is None:
            masked = mask_key(key.api_key)
            if len(self._masked) < _MASKED_CAP:
                self._masked[key.api_key] = masked
        state.key_id, state.key, state.tried = key.id, masked, [key.id]
        state.save(flow)
        self._in_flight[key.id] = self._in_flight.get(key.id, 0) + 1
        flow.metadata[IN_FLIGHT_META] = key.id
        self._pool().reserve(flow.id, key.id, state.client, state.model)  # released when metered or failed

    async def _wait_if_full(self, client: str, acquired: Acquired) -> Acquired:
        """Every usable key is full of in-flight reservations: give one a moment to settle rather than
        collect a budget error (or a "busy" refusal); after FULL_WAIT_S the request goes out anyway."""
        deadline = time.monotonic() + FULL_WAIT_S
        while acquired.full and acquired.key is not None and time.monotonic() < deadline:
            await asyncio.sleep(FULL_POLL_S)
            acquired = await self._acquire(client, ())
        return acquired

    async def _acquire(self, client: str, exclude: Collection[str], successor: str | None = None) -> Acquired:
        """Memory decides on the loop; rotation or promotion (database steps) run off it."""
        acquired = self._acquire_now(client, exclude, successor)
        if acquired is None:
            acquired = await asyncio.to_thread(self._pool().acquire, client, exclude, successor=successor)
            assert acquired is not None
            if acquired.rotated_from is not None:
                self.metrics.count_rotation("proactive")
        return acquired

    def _acquire_now(self, client: str, exclude: Collection[str], successor: str | None = None) -> Acquired | None:
        """The choice memory can make on the loop; None when it needs the database (see `_acquire`)."""
        acquired = self._pool().acquire(client, exclude, successor=successor, blocking=False)
        if acquired is not None and acquired.rotated_from is not None:
            self.metrics.count_rotation("proactive")
        return acquired

    @staticmethod
    def _prepare_body(flow: http.HTTPFlow, state: FlowState, scan: HeaderScan) -> bytes | None:
        """Read the request body once: the model, and for a streamed chat request without usage, the
        body that asks for it (returned; None when the body stays as sent)."""
        req = flow.request
        raw = req.raw_content if not scan.folded.get(b"content-encoding") else req.get_content(strict=False)
        facts = request_facts(raw)  # (three top-level members: an agent's long context is not built)
        if facts is None:
            return None
        state.model = facts.model
        if state.format != "chat" or not facts.stream:
            return None
        assert raw is not None
        if not facts.has_stream_options and raw[:1] == b"{" and raw[1:2] != b"\x00":
            # UTF-8 JSON object: the member goes in front, the client's bytes stay as they were
            state.strip_usage = True
            return _INCLUDE_USAGE + (raw[1:] if len(raw) < _COPY_ONCE else memoryview(raw)[1:])
        try:
            body = json.loads(raw)  # re-encoded: read exactly as `json` reads it (integers past 64 bits stay exact)
        except (ValueError, UnicodeDecodeError):  # bytes that are not UTF-8 in a message: sent as they came
            return None
        if add_include_usage(body):
            state.strip_usage = True
            return json.dumps(body, separators=(",", ":")).encode()
        return None

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
        if flow.response.status_code != 200:
            return
        hdrs = _response_headers(flow)
        ctype = hdrs.get("content-type")
        if ctype and "event-stream" in ctype.lower() and ctype.split(";")[0].strip().lower() == "text/event-stream":
            encoding = hdrs.get("content-encoding", "").strip().lower()
            if encoding in ("", "identity"):
                flow.response.stream = SSETap(state.format, strip_usage_chunk=state.strip_usage)
            elif encoding in DECODABLE:
                self._warn_encoded(state.key_id, encoding, "decoded for metering; the usage chunk is not stripped")
                flow.response.stream = EncodedSSETap(state.format, encoding)
            else:  # br, zstd, ...: streamed through as sent; this stream cannot be metered
                self._warn_encoded(state.key_id, encoding, "cannot be decoded here, so this stream is NOT metered")
                flow.response.stream = True

    def _warn_encoded(self, key_id: str | None, encoding: str, what: str) -> None:
        """Once per encoding: the upstream ignored `accept-encoding: identity` on an event stream."""
        if encoding not in self._encodings_warned:
            self._encodings_warned.add(encoding)
            log.warning("⚠️ [OpenHands/Metering] the upstream compressed an event stream (content-encoding: %s, key "
                        "%s) although the sidecar asked for identity: %s", encoding, key_id, what)

    # -- response -----------------------------------------------------------------------------
    # Sync: a metered answer (a success, a stream) ends without any coroutine; a failed answer that calls
    # for a probe or a retry hands that back as an awaitable, and the flow's end (`_end`) runs after it.
    @guarded
    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        state = FlowState.of(flow)
        if state is None:
            return None
        rest: Awaitable[None] | None = None
        try:
            resp = flow.response
            if not state.local and resp is not None:
                tap = resp.stream
                if isinstance(tap, SSETap):
                    self._meter(flow, state, tap.usage, None)
                elif 200 <= resp.status_code < 300:  # a success: `classify_response` says "ok", nothing to recover
                    self._meter_buffered(flow, state)
                else:
                    rest = self._recover_failed(flow, state)
        finally:  # the exchange is over (unless recovery goes on: then after it, in `_end_after`)
            if rest is None:
                self._end(flow, state)
        return None if rest is None else self._end_after(rest, flow, state)

    async def _end_after(self, rest: Awaitable[None], flow: http.HTTPFlow, state: FlowState) -> None:
        """The recovery `response` handed back, then the flow's end, whatever the recovery did."""
        try:
            await rest
        finally:
            self._end(flow, state)

    def _end(self, flow: http.HTTPFlow, state: FlowState) -> None:
        """The exchange is over: the key's in-flight count and reservation end, a pool key the answer
        echoes is masked, mitmdump, mitmweb and -w files see masked credentials, the state is saved."""
        self._done_in_flight(flow)
        self._release(flow)
        self._mask_echo(flow, state)
        _redact(flow)
        state.save(flow)

    def _recover_failed(self, flow: http.HTTPFlow, state: FlowState) -> Awaitable[None] | None:
        """A buffered answer that is not a success: what it means for the key, and (an awaitable) the probe
        or retry it calls for; None when it calls for neither (the answer passes through)."""
        resp = flow.response
        assert resp is not None
        verdict = self._classify(flow, state, resp.status_code, resp.headers, _body(resp, _response_headers(flow)))
        if verdict.scope == "unknown_budget":  # budget text we do not know: only the upstream's own read can tell
            return self._confirm_and_recover(flow, state, verdict)
        if verdict.kind in RECOVERABLE:
            return self._recover(flow, state, verdict)
        return None

    async def _confirm_and_recover(self, flow: http.HTTPFlow, state: FlowState, verdict: UpstreamVerdict) -> None:
        """Unknown budget text: the probe decides whether it is a budget error to recover from."""
        verdict = await self._confirmed(flow, state, verdict, 0)
        if verdict.kind in RECOVERABLE:
            await self._recover(flow, state, verdict)

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
            self._done_in_flight(flow)
            self._release(flow)
            _redact(flow)
            state.save(flow)

    def _release(self, flow: http.HTTPFlow) -> None:
        """However the flow ended (metered, refused, failed, dropped), its reservation ends with it."""
        if self.services.pool is not None:
            self.services.pool.release(flow.id)

    def _done_in_flight(self, flow: http.HTTPFlow) -> None:
        key_id = flow.metadata.pop(IN_FLIGHT_META, None)
        if isinstance(key_id, str):
            n = self._in_flight.get(key_id, 0) - 1
            if n > 0:
                self._in_flight[key_id] = n
            else:
                self._in_flight.pop(key_id, None)

    def _mask_echo(self, flow: http.HTTPFlow, state: FlowState) -> None:
        """An answer that echoes a pool key (1.80's expired-key `param`) is masked before the client sees it."""
        resp = flow.response
        if resp is None or state.local or resp.status_code < 400 or isinstance(resp.stream, SSETap):
            return
        pool = self.services.pool
        keys = [k.api_key for k in (pool.get(i) for i in state.tried) if k is not None] if pool else []
        body, n = mask_echoed_keys(resp.get_content(strict=False), keys)
        if n:
            resp.set_content(body)
            log.warning("🔒 [OpenHands/Mask] masked %d echo(es) of a pool key in an upstream answer", n)

    # -- metering (DESIGN §6) -----------------------------------------------------------------
    def _meter_buffered(self, flow: http.HTTPFlow, state: FlowState) -> None:
        resp = flow.response
        assert resp is not None
        if not state.format:
            return
        hdrs = _response_headers(flow)
        ctype, encoding, header_cost = hdrs.values(_BUFFERED_HEADERS)
        body = _content(resp, encoding) or b""
        usage: Usage | None
        if ctype is not None and ctype.startswith("text/event-stream"):
            usage = usage_from_sse_body(state.format, body)
            if state.strip_usage:
                resp.set_content(strip_usage_chunk_from_body(body))
        else:
            usage = answer_usage(state.format, body)  # (model and usage only: the reply itself is not built)
        self._meter(flow, state, usage, header_cost, hdrs=hdrs)

    def _meter(self, flow: http.HTTPFlow, state: FlowState, usage: Usage | None, header_cost: str | None,
               note: str = "", hdrs: "ResponseHeaders | None" = None) -> None:
        if state.metered or not state.format or state.key_id is None:
            return
        charge = self.services.meter.charge(usage, header_cost, state.model, key_id=state.key_id)
        if hdrs is None:
            hdrs = _response_headers(flow) if flow.response else _NO_HEADERS
        ctype, key_spend, version, max_budget = hdrs.values(_METER_HEADERS)
        streamed = ctype is not None and ctype.split(";")[0].strip().lower() == "text/event-stream"
        after = spend_is_after((), streamed, version)
        if after is None:  # neither the stream nor a version header tells (LiteLLM sends its version with every
            # answer): the per-part cost header names may, and only they are read
            after = spend_is_after(hdrs.names_starting(_COST_PART_PREFIX), streamed, version)
        spend = self._pool().record_usage(
            state.key_id, charge.cost, charge.tokens, None if key_spend is None else parse_money(key_spend),
            spend_is_after=after, max_budget=None if max_budget is None else parse_money(max_budget),
            client_id=state.client, model=state.model, flow_id=flow.id)
        self._metered(flow, state, usage, charge, spend, note)

    def _metered(self, flow: http.HTTPFlow, state: FlowState, usage: Usage | None, charge: Charge,
                 spend: float | None, note: str) -> None:
        """What the flow shows of its charge: the metered figures in its state, the usage line in its comment."""
        key_id = state.key_id
        assert key_id is not None
        state.metered, state.cost, state.cost_source = True, round(charge.cost, 8), charge.source
        state.model = charge.model
        if usage is not None:
            t = usage.tokens
            state.tokens = {"input": t.input, "cache_write": t.cache_write + t.cache_write_1h,
                            "cache_read": t.cache_read, "output": t.output}
        key = self._pool().get(key_id)
        line = flow_comments.usage_line(key_id, state.key, charge.model, state.tokens or {}, charge.cost,
                                        spend, key.budget_limit if key else 0.0, charge.source)
        flow.comment = flow_comments.append(flow_comments.append(flow.comment, line), note)

    # -- recovery (DESIGN §7) -----------------------------------------------------------------
    async def _recover(self, flow: http.HTTPFlow, state: FlowState, verdict: UpstreamVerdict) -> None:
        """Retire the refusing key, resend on its successor; at most one try per key, max_retries in all."""
        tried = set(state.tried)
        retired, retired_keys, waited = False, 0, False
        while verdict.kind in RECOVERABLE:
            assert state.key_id is not None
            verdict = await self._confirmed(flow, state, verdict, retired_keys)
            if verdict.kind not in RECOVERABLE:
                return  # not confirmed: the upstream's answer passes through, the key is untouched
            successor = await self._retire(state.key_id, verdict)
            retired_keys += verdict.kind in ("budget", "invalid")
            retired = True
            if state.retries >= self.services.current().max_retries:
                break
            acquired = await self._acquire(state.client, tried, successor)
            key = acquired.key
            if key is None and verdict.kind == "busy" and not waited:
                # Key busy (a reservation in flight), nothing else to move to: wait briefly for this one.
                waited = True
                await asyncio.sleep(BUSY_WAIT_S)
                key = self._pool().get(state.key_id)
            if key is None:
                break
            tried.add(key.id)
            self._pool().reserve(flow.id, key.id, state.client, state.model)  # the reservation moves with the retry
            state.retries += 1
            old_id = state.key_id
            try:
                resp = await asyncio.to_thread(self._resend, flow, key)
            except requests.RequestException as e:
                self.metrics.count_retry("unreachable")
                log.warning("↩️ [OpenHands/Retry] %s -> %s after %s: failed (%s)", old_id, key.id, _reason(verdict),
                            e.__class__.__name__)
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
            verdict = self._classify(flow, state, resp.status_code, flow.response.headers, resp.content)
            self.metrics.count_retry("refused" if verdict.kind in RECOVERABLE else "ok")
            retired = False
        if verdict.kind in RECOVERABLE:
            if not retired:
                assert state.key_id is not None
                await self._retire(state.key_id, verdict)
            if verdict.kind == "rate_limited" and state.retries == 0:
                return  # nothing else to try: the upstream's own 429 (with its Retry-After) goes through
            if verdict.kind == "busy":
                flow.response = openai_error(429, "Every pool key that could serve this request is busy with requests "
                                                  "in flight; retry shortly.", "rate_limit_error", retry_after=2)
                state.local, state.tried = True, sorted(tried)
                return
            # Never show a budget error: the client gets a retryable 429 with a clear message.
            state.tried = sorted(tried)
            self._answer_no_key(flow, state, "every key tried is spent or refused (429)")
            return
        if flow.response is not None and 200 <= flow.response.status_code < 300:
            self._meter_buffered(flow, state)

    def _key_context(self, key: KeyState) -> KeyContext:
        others = self._in_flight.get(key.id, 0) - 1
        return KeyContext(key.api_key, key.budget_limit, key.effective_spend, max(0, others),
                          rotation_point(key.budget_limit, self.services.current().spend_threshold))

    def _classify(self, flow: http.HTTPFlow, state: FlowState, status: int, headers, body) -> UpstreamVerdict:
        """`core.answers` with what the pool knows about the key, and the strings the client sent (a
        success needs neither: `classify_response` reads them only for 4xx)."""
        key = self._pool().get(state.key_id) if state.key_id and status >= 400 else None
        texts = _client_texts(flow, state) if status >= 400 else ()
        verdict = classify_response(status, headers, body, self.clock(), key=self._key_context(key) if key else None,
                                    client_texts=texts)
        if verdict.warnings and (state.key_id, verdict.warnings[0][:24]) not in self._warned:
            self._warned.add((state.key_id, verdict.warnings[0][:24]))
            log.warning("⚠️ [OpenHands/Answer] key %s: %s (%s)", state.key_id, "; ".join(verdict.warnings)[:200],
                        verdict.template or verdict.scope)
        if verdict.kind == "invalid" and verdict.template is None and \
                route_kind(flow.request.path, self.services.current().extra_routes) == "passthrough":
            return UpstreamVerdict("passthrough", scope="provider")  # a pass-through route: the provider's own 401
        return verdict

    async def _confirmed(self, flow: http.HTTPFlow, state: FlowState, verdict: UpstreamVerdict,
                         retired_keys: int) -> UpstreamVerdict:
        """Verify before retiring (DESIGN §7): a verdict that contradicts the meter (a key well below its
        rotation point), a second key retired for one request, or unknown budget text is confirmed with
        `GET /v1/models` on that key; not confirmed, the answer passes through and the key is untouched."""
        if verdict.kind not in ("budget", "invalid") and verdict.scope != "unknown_budget":
            return verdict
        key = self._pool().get(state.key_id) if state.key_id else None
        if key is None:
            return verdict
        point = rotation_point(key.budget_limit, self.services.current().spend_threshold)
        well_below = key.effective_spend + max(0.05 * key.budget_limit, 0.02) < point
        unrecognised_refusal = verdict.kind == "invalid" and verdict.template is None
        if not (retired_keys >= 1 or verdict.scope == "unknown_budget" or unrecognised_refusal
                or (verdict.kind == "budget" and well_below and not _proven(verdict))):
            return verdict
        if flow.metadata.get(CONFIRMED_META) == key.id:
            return verdict  # this flow already confirmed this key once
        why = "a second key for one request" if retired_keys else (
            "unknown budget text" if verdict.scope == "unknown_budget"
            else "a 401/403 in no LiteLLM template" if unrecognised_refusal
            else f"metered ${key.effective_spend:.4f}, well below its rotation point ${point:.2f}")
        result = await asyncio.to_thread(probe_key, self.services.session(), self.services.current().upstream,
                                         self._key_context(key))
        if result.confirmed:
            flow.metadata[CONFIRMED_META] = key.id
            log.warning("🔎 [OpenHands/Verify] key %s: %s (%s) confirmed by GET /v1/models (%s); acting on it",
                        key.id, verdict.scope, why, result.detail)
            return result.verdict if verdict.scope == "unknown_budget" and result.verdict else verdict
        log.warning("🔎 [OpenHands/Verify] key %s: %s (%s) NOT confirmed by GET /v1/models (%s); the answer passes "
                    "through and the key is untouched", key.id, verdict.scope, why, result.detail)
        flow.comment = flow_comments.append(flow.comment,
                                            f"🔎 {verdict.scope} not confirmed for {key.id}: passed through")
        return UpstreamVerdict("passthrough", scope=verdict.scope, template=verdict.template)

    async def _retire(self, key_id: str, verdict: UpstreamVerdict) -> str | None:
        """Take the refusing key out of service; returns its successor when a rotation found one."""
        if verdict.kind == "budget" and verdict.budget_error is not None:
            be = verdict.budget_error
            log.warning("💸 [OpenHands/BudgetError] key %s: %s", key_id, be.message[:200])
            self.metrics.count_budget_error(key_id)
            self._pool().hold_out(key_id, Status.EXHAUSTED.value)  # no other request chooses it meanwhile
            # rotate, not just retire: one backup per exhausted key across sidecars, and its clients move too
            result = await asyncio.to_thread(self._pool().rotate, key_id, status=Status.EXHAUSTED.value,
                                             error=be.message[:300], spend=be.spend, budget=be.budget)
            if result.won:
                self.metrics.count_rotation("budget_error")
            return result.new_id
        if verdict.kind == "busy":
            log.warning("⏳ [OpenHands/KeyBusy] key %s refused a reservation while requests are in flight; not spent, "
                        "trying another key", key_id)
            return None
        if verdict.kind == "rate_limited":
            cooldown = verdict.retry_after or DEFAULT_COOLDOWN_S
            log.warning("⏳ [OpenHands/RateLimit] key %s cooling down for %.0fs", key_id, cooldown)
            self._pool().mark_rate_limited(key_id, self.clock() + cooldown, "rate limited by upstream")
            return None
        if verdict.kind == "invalid":
            log.warning("🚫 [OpenHands/InvalidKey] key %s refused by the upstream; retiring it", key_id)
            self._pool().hold_out(key_id, Status.INVALID.value)
            result = await asyncio.to_thread(self._pool().rotate, key_id, status=Status.INVALID.value,
                                             error="refused by upstream (401/403)")
            if result.won:
                self.metrics.count_rotation("invalid")
            return result.new_id
        return None

    def _resend(self, flow: http.HTTPFlow, key: KeyState) -> requests.Response:
        headers = http.Headers(flow.request.headers.fields)
        swap_credential(headers, key.api_key)
        return resend(self.services.session(), flow.request.method, flow.request.url, headers.items(multi=True),
                      flow.request.get_content(strict=False))


_COST_PART_PREFIX = b"x-litellm-response-cost-"  # LiteLLM >= 1.110's per-part cost headers (`spend_is_after`)
_METER_HEADERS = (b"content-type", b"x-litellm-key-spend", b"x-litellm-version", b"x-litellm-key-max-budget")
_MASKED_CAP = 4096  # masked pool keys remembered (keys retired long ago only take a slot)
_BUFFERED_HEADERS = (b"content-type", b"content-encoding", b"x-litellm-response-cost")


def _redact(flow: http.HTTPFlow) -> None:
    """The exchange is over: mitmdump, mitmweb and -w files see masked credentials. The fields the
    request went out with were redacted when they were made; anything else is redacted here. (The
    response headers' reading is dropped too: a flow mitmweb keeps carries nothing it does not need.)"""
    memo = peek(flow)
    headers = flow.request.headers
    if memo is not None and memo.sent is not None and headers.fields is memo.sent:
        headers.fields = memo.sent_redacted
    else:
        redact_credentials(headers)
    if memo is not None:
        memo.sent = memo.sent_redacted = memo.response_fields = memo.response_headers = None


class ResponseHeaders:
    """A response's headers read the way `Headers.get` reads them (lower-case name, a repeated header's
    values joined with ", "), folded in one walk over the raw fields; a value is decoded only when read
    (an upstream answer carries some twenty headers, the request path reads five of them)."""

    __slots__ = ("_folded",)

    def __init__(self, fields: Iterable[tuple[bytes, bytes]]) -> None:
        self._folded = fold(fields)

    @overload
    def get(self, name: str) -> str | None: ...

    @overload
    def get(self, name: str, default: str) -> str: ...

    def get(self, name: str, default: str | None = None) -> str | None:
        value = self._folded.get(name.encode("utf-8", "surrogateescape"))
        return default if value is None else value.decode("utf-8", "surrogateescape")

    def values(self, names: tuple[bytes, ...]) -> list[str | None]:
        """`get` of several (lower-case, encoded) names in one call."""
        get = self._folded.get
        return [None if (v := get(n)) is None else v.decode("utf-8", "surrogateescape") for n in names]

    def names_starting(self, prefix: bytes) -> list[str]:
        """The (lower-case) names that start with `prefix`."""
        return [n.decode("utf-8", "surrogateescape") for n in self._folded if n.startswith(prefix)]


_NO_HEADERS = ResponseHeaders(())


def _response_headers(flow: http.HTTPFlow) -> ResponseHeaders:
    """The response's headers (`ResponseHeaders`), walked once per set of header fields however many
    times metering, metrics and comments ask."""
    assert flow.response is not None
    fields = flow.response.headers.fields
    memo = memo_of(flow)
    if memo.response_fields is fields:
        return memo.response_headers
    hdrs = ResponseHeaders(fields)
    memo.response_fields, memo.response_headers = fields, hdrs
    return hdrs


def _body(message: http.Message, hdrs: ResponseHeaders) -> bytes | None:
    """`get_content(strict=False)` without another header walk."""
    return _content(message, hdrs.get("content-encoding"))


def _content(message: http.Message, encoding: str | None) -> bytes | None:
    """The body decoded only when the message says it is encoded (`encoding`: its content-encoding)."""
    return message.get_content(strict=False) if encoding else message.raw_content


def _proven(verdict: UpstreamVerdict) -> bool:
    """The answer itself proves this key cannot spend: its own budget, named by identity and with plausible
    numbers, or a named owner's (user, team, org…) anchored template, which blocks the key whatever our meter
    says. The bare template with another budget (team member or proxy-wide) and unverified forms are not."""
    be = verdict.budget_error
    if verdict.scope == "key_budget":
        return verdict.verified and be is not None and be.spend is not None
    return verdict.scope == "owner_budget" and verdict.template in ("B5", "B5/B6", "B6")


def _client_texts(flow: http.HTTPFlow, state: FlowState) -> tuple[str, ...]:
    """Strings the client chose that LiteLLM may echo (model, end-user ids, tags, path; reference §2)."""
    texts = [flow.request.path.split("?", 1)[0]]
    if state.model:
        texts.append(state.model)
    try:
        body = json.loads(flow.request.get_content(strict=False) or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError):
        body = None
    if isinstance(body, dict):
        for holder, name in ((body, "user"), (body.get("metadata"), "user_id"), (body.get("litellm_metadata"), "user"),
                             (body, "model")):
            if isinstance(holder, dict) and isinstance(holder.get(name), str):
                texts.append(holder[name])
        tags = body.get("metadata", {}).get("tags") if isinstance(body.get("metadata"), dict) else None
        if isinstance(tags, list):
            texts.extend(t for t in tags[:20] if isinstance(t, str))
    return tuple(t[:512] for t in texts if t)


def _reason(verdict: UpstreamVerdict) -> str:
    reasons = {"budget": "budget error", "rate_limited": "rate limit", "invalid": "invalid key", "busy": "key busy"}
    return reasons.get(verdict.kind, verdict.kind)
