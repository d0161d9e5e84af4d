"""A fake LiteLLM proxy for tests and benchmarks (standard library only).

It speaks what a LiteLLM 1.80 proxy speaks (see ``/work/shared/reference/litellm-upstream.md``):
budget errors (400/422/429, user/team/key messages, OpenAI or Anthropic envelope), usage in every
wire format (chat, messages, responses; JSON and SSE), ``x-litellm-*`` headers, the paginated
``/user/daily/activity`` endpoint with a batch-writer lag, ``/v1/model/info`` and ``/v1/models``.

In process::

    with FakeUpstream(budget_status=422) as fake:
        fake.add_key("sk-a", budget=10.0)
        requests.post(fake.url + "/chat/completions", ...)

Out of process (benchmarks)::

    python -m tests.fake_upstream --port 0 --keys k1:10,k2:10 --budget-status cycle
    # prints "fake-upstream listening on 127.0.0.1:PORT"; admin: POST /_fake/keys, GET /_fake/state

Token counts use one convention everywhere (the same as ``pricing.tokens.TokenCounts``):
``input`` = uncached input, ``cache_write``, ``cache_read``, ``output`` (includes ``reasoning``).
Each wire format then renders them the way LiteLLM does.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import http
import itertools
import json
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

LITELLM_VERSION = "1.80.0"

# USD per 1M tokens: (input, output, cache_write, cache_read)
DEFAULT_PRICES: dict[str, tuple[float, float, float, float]] = {
    "claude-sonnet-4-5-20250929": (3.0, 15.0, 3.75, 0.30),
    "claude-sonnet-4-5": (3.0, 15.0, 3.75, 0.30),
    "claude-sonnet-4-20250514": (3.0, 15.0, 3.75, 0.30),
    "claude-haiku-4-5-20251001": (1.0, 5.0, 1.25, 0.10),
    "claude-opus-4-5-20251101": (5.0, 25.0, 6.25, 0.50),
    "gpt-5-2025-08-07": (1.25, 10.0, 0.0, 0.125),
    "gpt-5-mini-2025-08-07": (0.25, 2.0, 0.0, 0.025),
    "gpt-5-codex": (1.25, 10.0, 0.0, 0.125),
    "gpt-5.2": (1.75, 14.0, 0.0, 0.175),
    "gemini-2.5-pro": (1.25, 10.0, 0.0, 0.125),
    "qwen3-coder-480b": (0.40, 1.60, 0.0, 0.0),
}
DEFAULT_PRICE = (3.0, 15.0, 3.75, 0.30)

# reference §3 numbers, in the uncached-input convention
DEFAULT_ANTHROPIC_USAGE = {"input": 12, "cache_write": 1500, "cache_read": 30000, "output": 25, "reasoning": 0}
DEFAULT_OPENAI_USAGE = {"input": 1500, "cache_write": 0, "cache_read": 30000, "output": 300, "reasoning": 256}

LLM_PATHS = {
    "/chat/completions": "chat",
    "/v1/chat/completions": "chat",
    "/v1/messages": "messages",
    "/responses": "responses",
    "/v1/responses": "responses",
}
CREDENTIAL_HEADERS = (
    "x-litellm-api-key",
    "authorization",
    "api-key",
    "x-api-key",
    "x-goog-api-key",
    "ocp-apim-subscription-key",
)
ACTIVITY_FAULTS = (None, "timeout", "500", "malformed", "401")
_FILLER_UNIT = "lorem ipsum dolor sit amet consectetur adipiscing elit "


_MANAGEMENT_PREFIXES = ("/key/", "/v2/key/", "/user/new", "/user/list", "/user/update", "/user/delete", "/team/",
                        "/customer/", "/end_user/", "/spend/", "/global/", "/organization/", "/model/new",
                        "/model/update", "/model/delete", "/budget/")


def _is_management(path: str) -> bool:
    return path.startswith(_MANAGEMENT_PREFIXES)


def _filler(n: int) -> str:
    if n <= 0:
        return ""
    reps = n // len(_FILLER_UNIT) + 1
    return (_FILLER_UNIT * reps)[:n]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _strip_model_prefix(model: str) -> str:
    for p in ("litellm_proxy/", "openhands/"):
        if model.startswith(p):
            model = model[len(p):]
    return model


def is_anthropic_model(model: str) -> bool:
    return "claude" in model.lower()


def hash_key(api_key: str) -> str:
    """LiteLLM stores sha256(key) hex as the token / api_key."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def default_error_body(status: int) -> dict:
    """A LiteLLM-looking error body for a status that is *not* a budget error."""
    if status == 401:
        msg = "Authentication Error, Invalid proxy server token passed. Received API Key = sk-...****"
        return {"error": {"message": msg, "type": "auth_error", "param": "None", "code": "401"}}
    if status == 403:
        msg = "Authentication Error - Key is blocked. Update via `/key/unblock` if you're admin."
        return {"error": {"message": msg, "type": "auth_error", "param": "None", "code": "403"}}
    if status == 429:
        msg = ("LiteLLM Rate Limit Handler for rate limit type = key. Crossed TPM / RPM / Max Parallel "
               "Request Limit. current rpm: 60, rpm limit: 60, current tpm: 0, tpm limit: 9223372036854775807")
        return {"error": {"message": msg, "type": "None", "param": "None", "code": "429"}}
    if status >= 500:
        msg = "litellm.InternalServerError: InternalServerError: fake upstream failure"
        return {"error": {"message": msg, "type": None, "param": None, "code": str(status)}}
    return {"error": {"message": f"fake error {status}", "type": "invalid_request_error", "param": None,
                      "code": str(status)}}


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    credential: str | None
    header_used: str | None
    time: float = 0.0

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _Event:
    """One charged request, as LiteLLM's daily-spend writer would see it."""
    ts: float
    model: str
    cost: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read: int = 0
    cache_write: int = 0


@dataclass
class _Account:
    api_key: str
    budget: float
    spend: float
    user_id: str
    team_id: str
    events: list[_Event] = field(default_factory=list)
    requests: int = 0
    admitted: int = 0
    budget_errors: int = 0
    reserved: float = 0.0
    activity_calls: int = 0
    fault: dict | None = None


class _Abort(Exception):
    """Drop the TCP connection without finishing the response."""


# ---------------------------------------------------------------------------------------------
class FakeUpstream:
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        budget_status: int | str = 400,
        budget_message: str = "user",
        anthropic_envelope_for_messages: bool = False,
        prices: dict[str, tuple[float, float, float, float]] | None = None,
        default_price: tuple[float, float, float, float] = DEFAULT_PRICE,
        cost_per_request: float | None = None,
        anthropic_usage: dict | None = None,
        openai_usage: dict | None = None,
        send_key_spend_header: bool = False,
        stream_events: int = 5,
        event_padding: int = 0,
        event_delay: float = 0.0,
        stream_bytes: int | None = None,
        activity_lag_seconds: float = 0.0,
        activity_rows: str = "request",
        activity_budget_errors: bool = False,
        activity_timeout_seconds: float = 60.0,
        hang_seconds: float = 300.0,
        record_requests: bool = True,
        clock: Callable[[], float] = time.time,
    ):
        self.host = host
        self._want_port = port
        self.budget_status = budget_status
        self.budget_message = budget_message
        self.anthropic_envelope_for_messages = anthropic_envelope_for_messages
        self.prices = dict(DEFAULT_PRICES if prices is None else prices)
        self.default_price = tuple(default_price)
        self.cost_per_request = cost_per_request
        self.anthropic_usage = {**DEFAULT_ANTHROPIC_USAGE, **(anthropic_usage or {})}
        self.openai_usage = {**DEFAULT_OPENAI_USAGE, **(openai_usage or {})}
        self.send_key_spend_header = send_key_spend_header
        self.key_spend_header_value: str | None = None  # a hostile or buggy upstream: this, whatever the spend
        self.stream_events = stream_events
        self.event_padding = event_padding
        self.event_delay = event_delay
        self.stream_bytes = stream_bytes
        self.activity_lag_seconds = activity_lag_seconds
        self.activity_rows = activity_rows
        self.activity_budget_errors = activity_budget_errors
        self.activity_timeout_seconds = activity_timeout_seconds
        self.hang_seconds = hang_seconds
        self.record_requests = record_requests
        self.clock = clock
        # Hostile / LiteLLM-exact modes (reference/litellm-errors.md); all off by default.
        self.strict_models = False  # unknown model -> Q11 400 echoing the model name (status rewritten by substring)
        self.end_user_budgets: dict[str, tuple[float, float]] = {}  # end user -> (spend, budget): Q1, pre-key-lookup
        self.allowed_models: dict[str, list[str]] = {}  # api key -> models it may call: Q4 401 otherwise
        self.management_routes = False  # /key/*, /team/*, /customer/*... answer a non-admin key 401 "Only proxy admin"
        self.reservations = False  # 1.110 budget reservation: a concurrent request is refused with Key=<sha256>
        self.reservation_estimate = 0.25
        # "1.80.0" (default) or "1.110.2": which LiteLLM the fake answers as (reference/litellm-errors.md §6):
        # 1.110 puts the spend *after* the request in x-litellm-key-spend on JSON answers (streams: before),
        # adds per-part cost headers and a cost header on JSON /v1/messages, and answers budget errors 422 B2.
        self.litellm_version = LITELLM_VERSION

        self._lock = threading.Lock()
        self._accounts: dict[str, _Account] = {}
        self._requests: list[RecordedRequest] = []
        self._script: list[dict] = []
        self._activity_fault: str | None = None
        self._status_cycle = itertools.cycle((400, 422, 429))
        self._message_cycle = itertools.cycle(("user", "team", "key"))
        self._total_requests = 0
        self.refused_streams = 0  # streamed requests refused with a budget error (each one a stream retried whole)
        self.busy_refusals = 0    # of the budget errors: reservation ("busy") refusals
        self._conns: set[socket.socket] = set()
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "FakeUpstream":
        handler = type("_BoundHandler", (_Handler,), {"fake": self})
        httpd = _Server((self.host, self._want_port), handler)
        self._httpd = httpd
        self._stop.clear()
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-upstream", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread:
            self._thread.join(5)

    def __enter__(self) -> "FakeUpstream":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---- accounts ----------------------------------------------------------------------------
    def add_key(self, api_key: str, budget: float = 10.0, spend: float = 0.0, *,
                user_id: str | None = None, team_id: str | None = None) -> None:
        """Create (or replace) a key. Initial spend shows in /user/daily/activity at once (dated a day ago)."""
        h = hash_key(api_key)
        acct = _Account(api_key, float(budget), float(spend), user_id or f"user-{h[:12]}",
                        team_id or f"org-{h[12:20]}")
        if spend:
            acct.events.append(_Event(self.clock() - 86400, "claude-sonnet-4-5-20250929", float(spend)))
        with self._lock:
            self._accounts[api_key] = acct

    def remove_key(self, api_key: str) -> None:
        with self._lock:
            self._accounts.pop(api_key, None)

    def spend(self, api_key: str) -> float:
        with self._lock:
            return self._accounts[api_key].spend

    def budget(self, api_key: str) -> float:
        with self._lock:
            return self._accounts[api_key].budget

    def set_spend(self, api_key: str, spend: float) -> None:
        """Set the enforcement counter (the activity rows are not rewritten)."""
        with self._lock:
            self._accounts[api_key].spend = float(spend)

    def set_budget(self, api_key: str, budget: float) -> None:
        with self._lock:
            self._accounts[api_key].budget = float(budget)

    def activity_calls(self, api_key: str) -> int:
        with self._lock:
            return self._accounts[api_key].activity_calls

    def budget_errors(self, api_key: str) -> int:
        with self._lock:
            return self._accounts[api_key].budget_errors

    def request_count(self, api_key: str) -> int:
        with self._lock:
            return self._accounts[api_key].requests

    def admitted_count(self, api_key: str) -> int:
        with self._lock:
            return self._accounts[api_key].admitted

    def state(self) -> dict:
        with self._lock:
            keys = {
                a.api_key: {"spend": a.spend, "budget": a.budget, "requests": a.requests,
                            "admitted": a.admitted, "budget_errors": a.budget_errors,
                            "activity_calls": a.activity_calls, "user_id": a.user_id, "team_id": a.team_id}
                for a in self._accounts.values()
            }
            return {"keys": keys, "total_requests": self._total_requests,
                    "budget_errors_total": sum(k["budget_errors"] for k in keys.values()),
                    "scripted_pending": len(self._script), "refused_streams": self.refused_streams,
                    "busy_refusals": self.busy_refusals}

    # ---- requests log ------------------------------------------------------------------------
    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # ---- faults ------------------------------------------------------------------------------
    def script(self, *responses: dict) -> None:
        """Queue one-shot overrides for the next LLM requests (FIFO), each a dict with one of:
        ``status`` (+ ``body`` dict/str/bytes, ``headers``), ``hang`` (True or seconds),
        ``reset_after_events`` (N), ``malformed`` (True), ``budget_error`` (True), ``delay`` (seconds,
        then answer normally)."""
        with self._lock:
            self._script.extend(dict(r) for r in responses)

    def clear_script(self) -> None:
        with self._lock:
            self._script.clear()

    def set_key_fault(self, api_key: str, status: int | None, body: Any = None,
                      headers: dict | None = None) -> None:
        """Every LLM request with this key gets this answer until cleared (status=None clears)."""
        with self._lock:
            self._accounts[api_key].fault = None if status is None else {
                "status": status, "body": body, "headers": headers or {}}

    def clear_key_fault(self, api_key: str) -> None:
        self.set_key_fault(api_key, None)

    def set_activity_fault(self, mode: str | None) -> None:
        if mode not in ACTIVITY_FAULTS:
            raise ValueError(f"activity fault must be one of {ACTIVITY_FAULTS}, not {mode!r}")
        with self._lock:
            self._activity_fault = mode

    # ---- pricing -----------------------------------------------------------------------------
    def price_for(self, model: str) -> tuple[float, float, float, float]:
        m = _strip_model_prefix(model)
        return tuple(self.prices.get(m) or self.prices.get(model) or self.default_price)

    def usage_for(self, model: str, override: dict | None = None) -> dict:
        base = self.anthropic_usage if is_anthropic_model(model) else self.openai_usage
        u = {**base, **(override or {})}
        return {k: int(u.get(k, 0) or 0) for k in ("input", "cache_write", "cache_read", "output", "reasoning")}

    def cost_for(self, model: str, u: dict) -> float:
        """LiteLLM's rule on the usage LiteLLM would see: OpenAI-style usage has no cache writes,
        so for non-Claude models they fold into uncached input."""
        if self.cost_per_request is not None:
            return float(self.cost_per_request)
        p_in, p_out, p_cw, p_cr = self.price_for(model)
        if is_anthropic_model(model):
            return (u["input"] * p_in + u["cache_write"] * p_cw + u["cache_read"] * p_cr
                    + u["output"] * p_out) / 1e6
        return ((u["input"] + u["cache_write"]) * p_in + u["cache_read"] * p_cr + u["output"] * p_out) / 1e6

    # ---- internals used by the handler -------------------------------------------------------
    def _next_budget_status(self) -> int:
        bs = self.budget_status
        if bs == "cycle":
            with self._lock:
                return next(self._status_cycle)
        return int(bs)

    def _budget_message(self, acct: _Account, spend: float) -> str:
        style = self.budget_message
        if style == "cycle":
            with self._lock:
                style = next(self._message_cycle)
        if style == "user":
            return f"ExceededBudget: User={acct.user_id} over budget. Spend={spend}, Budget={acct.budget}"
        if style == "team":
            return (f"Budget has been exceeded! Team={acct.team_id} Current cost: {spend}, "
                    f"Max budget: {acct.budget}")
        return f"Budget has been exceeded! Current cost: {spend}, Max budget: {acct.budget}"

    def is_1110(self) -> bool:
        return str(self.litellm_version).startswith("1.110")

    def _budget_error(self, acct: _Account, spend: float, anthropic: bool, request_id: str | None
                      ) -> tuple[int, dict]:
        status = self._next_budget_status()
        msg = self._budget_message(acct, spend)
        if self.is_1110():  # B2, 422; /v1/messages in the Anthropic envelope (reference §6)
            status = 422
            msg = f"Budget has been exceeded! Key=key (sk-...{acct.api_key[-4:]}) Current cost: {spend}, " \
                  f"Max budget: {acct.budget}"
        with self._lock:
            acct.budget_errors += 1
        if anthropic:
            body: dict = {"type": "error", "error": {
                "type": "rate_limit_error" if status == 429 else "invalid_request_error",
                "message": msg, "litellm_error_type": "budget_exceeded"}}
            if request_id:
                body["request_id"] = request_id
            return status, body
        return status, {"error": {"message": msg, "type": "budget_exceeded", "param": None, "code": str(status)}}

    def _charge(self, acct: _Account, model: str, u: dict, cost: float) -> None:
        anth = is_anthropic_model(model)
        prompt = u["input"] + u["cache_write"] + u["cache_read"]
        ev = _Event(self.clock(), model, cost, prompt, u["output"], u["cache_read"],
                    u["cache_write"] if anth else 0)
        with self._lock:
            acct.spend += cost
            acct.events.append(ev)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024
    allow_reuse_address = True


# ---------------------------------------------------------------------------------------------
_DATE_CACHE: list = [0, ""]


def _http_date() -> str:
    now = int(time.time())
    if _DATE_CACHE[0] != now:
        from email.utils import formatdate
        _DATE_CACHE[0], _DATE_CACHE[1] = now, formatdate(now, usegmt=True)
    return _DATE_CACHE[1]


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class _Handler(BaseHTTPRequestHandler):
    fake: FakeUpstream
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "uvicorn"

    def log_message(self, format, *args):  # quiet
        pass

    def setup(self):
        super().setup()
        with self.fake._lock:
            self.fake._conns.add(self.connection)

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        with self.fake._lock:
            self.fake._conns.discard(self.connection)

    # ---- low-level output --------------------------------------------------------------------
    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {_reason(status)}\r\n", f"date: {_http_date()}\r\n",
                 "server: uvicorn\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers]
        if self.close_connection:
            lines.append("connection: close\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    def _send(self, status: int, body: bytes | dict | list | str, headers: dict | list | None = None,
              content_type: str = "application/json") -> None:
        if isinstance(body, (dict, list)):
            body = _dumps(body)
        elif isinstance(body, str):
            body = body.encode()
        hdrs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        names = {k.lower() for k, _ in hdrs}
        if "content-type" not in names:
            hdrs.insert(0, ("content-type", content_type))
        hdrs.append(("content-length", str(len(body))))
        self.wfile.write(self._head(status, hdrs) + body)

    def _start_chunked(self, status: int, headers: list[tuple[str, str]]) -> None:
        hdrs = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")]
        hdrs += headers + [("transfer-encoding", "chunked")]
        self.wfile.write(self._head(status, hdrs))

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def _abort(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise _Abort()

    def _read_body(self) -> bytes:
        te = (self.headers.get("transfer-encoding") or "").lower()
        if "chunked" in te:
            parts = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(parts)
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    # ---- dispatch ----------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _dispatch(self):
        fake = self.fake
        try:
            body = self._read_body()
            parts = urlsplit(self.path)
            path = parts.path
            query = dict(parse_qsl(parts.query, keep_blank_values=True))
            hdrs: dict[str, str] = {}
            for k, v in self.headers.items():
                k = k.lower()
                hdrs[k] = f"{hdrs[k]}, {v}" if k in hdrs else v
            cred, used = self._credential(hdrs)
            with fake._lock:
                fake._total_requests += 1
                if fake.record_requests:
                    fake._requests.append(RecordedRequest(self.command, path, query, hdrs, body, cred, used,
                                                          time.time()))
            if path.startswith("/_fake/"):
                return self._admin(path, body)
            if fake.management_routes and _is_management(path):
                return self._management(path, cred)
            kind = LLM_PATHS.get(path)
            if kind is not None:
                if self.command != "POST":
                    return self._send(405, {"detail": "Method Not Allowed"})
                return self._llm(kind, path, hdrs, body, cred)
            if path == "/user/daily/activity" and self.command == "GET":
                return self._activity(query, hdrs, cred)
            if path in ("/v1/model/info", "/model/info") and self.command == "GET":
                if self._auth(cred) is None:
                    return
                return self._send(200, self._model_info())
            if path in ("/v1/models", "/models") and self.command == "GET":
                acct = self._auth(cred)
                if acct is None:
                    return
                # An LLM route for LiteLLM: the key's own checks run (dead key, key and owner budgets), none of
                # the request-scoped ones (no model, end user or body) -- the sidecar's confirmation read.
                with fake._lock:
                    key_fault, over, spend = acct.fault, acct.spend >= acct.budget, acct.spend
                if key_fault is not None:
                    return self._fault_response(key_fault)
                if over:
                    status, err = fake._budget_error(acct, spend, False, None)
                    return self._send(status, err)
                data = [{"id": m, "object": "model", "created": 1677610602, "owned_by": "openai"}
                        for m in fake.prices]
                return self._send(200, {"data": data, "object": "list"})
            return self._send(404, {"detail": "Not Found"})
        except _Abort:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            self.close_connection = True

    # ---- auth --------------------------------------------------------------------------------
    @staticmethod
    def _credential(hdrs: dict[str, str]) -> tuple[str | None, str | None]:
        for name in CREDENTIAL_HEADERS:
            v = hdrs.get(name)
            if v is None:
                continue
            v = v.strip()
            if name == "authorization":
                if v[:7].lower() == "bearer ":
                    return v[7:].strip(), name
                if v[:6].lower() == "basic ":
                    try:
                        dec = base64.b64decode(v[6:].strip()).decode()
                        return dec.split(":", 1)[-1], name
                    except Exception:
                        return "", name
                return "", name
            if v[:7].lower() == "bearer ":
                v = v[7:].strip()
            return v, name
        return None, None

    def _auth(self, cred: str | None) -> _Account | None:
        fake = self.fake
        with fake._lock:
            acct = fake._accounts.get(cred) if cred else None
        if acct is not None:
            return acct
        if not cred:
            msg = "Authentication Error, No api key passed in."
        else:
            masked = cred[:5] + "..." + cred[-4:] if len(cred) > 9 else "****"
            msg = (f"Authentication Error, Invalid proxy server token passed. Received API Key = {masked}, "
                   f"Key Hash (Token) ={hash_key(cred)}. Unable to find token in cache or "
                   f"`LiteLLM_VerificationTokenTable`")
        self._send(401, {"error": {"message": msg, "type": "auth_error", "param": "None", "code": "401"}})
        return None

    # ---- LLM routes --------------------------------------------------------------------------
    def _fault_response(self, f: dict) -> None:
        status = int(f["status"])
        body = f.get("body")
        if body is None:
            body = default_error_body(status)
        headers = dict(f.get("headers") or {})
        if status == 429 and not any(k.lower() == "retry-after" for k in headers) and f.get("body") is None:
            headers["retry-after"] = "60"
        self._send(status, body, headers)

    def _llm(self, kind: str, path: str, hdrs: dict, raw: bytes, cred: str | None) -> None:
        fake = self.fake
        try:
            peek = json.loads(raw or b"{}")
        except ValueError:
            peek = None
        peek = peek if isinstance(peek, dict) else {}
        end_user = peek.get("user") if isinstance(peek.get("user"), str) else None
        if end_user is not None and end_user in fake.end_user_budgets:  # Q1: checked before the key is looked up
            eu_spend, eu_budget = fake.end_user_budgets[end_user]
            if eu_spend > eu_budget:
                status = fake._next_budget_status()
                return self._send(status, {"error": {
                    "message": f"ExceededBudget: End User={end_user} over budget. Spend={eu_spend}, Budget={eu_budget}",
                    "type": "budget_exceeded", "param": None, "code": str(status)}})
        acct = self._auth(cred)
        if acct is None:
            return
        model_name = peek.get("model") if isinstance(peek.get("model"), str) else None
        allowed = fake.allowed_models.get(acct.api_key)
        if allowed is not None and model_name is not None and model_name not in allowed:  # Q4 (1.80: 401)
            return self._send(401, {"error": {
                "message": f"key not allowed to access model. This key can only access models={allowed}. Tried to "
                           f"access {model_name}", "type": "key_model_access_denied", "param": "model", "code": "401"}})
        if fake.strict_models and model_name is not None and _strip_model_prefix(model_name) not in fake.prices:
            message = (f"{{'error': '{path}: Invalid model name passed in model={model_name}. Call `/v1/models` to "
                       f"view available models for your key.'}}")
            status = 400
            if "No deployments available" in message or "No healthy deployment available" in message:
                status = 429  # ProxyException rewrites the status by substring (reference §1 traps)
            elif "Not allowed to access model due to tags configuration" in message:
                status = 401
            return self._send(status, {"error": {"message": message, "type": "None", "param": "None",
                                                 "code": str(status)}},
                              {"x-litellm-call-id": str(uuid.uuid4()), "x-litellm-response-cost": "0"})
        with fake._lock:
            acct.requests += 1
            scripted = fake._script.pop(0) if fake._script else None
            key_fault = acct.fault
        anthropic_env = kind == "messages" and (fake.anthropic_envelope_for_messages or fake.is_1110())
        if scripted is not None:
            if "delay" in scripted:
                fake._stop.wait(float(scripted["delay"]))
            if scripted.get("hang"):
                h = scripted["hang"]
                fake._stop.wait(fake.hang_seconds if h is True else float(h))
                self._abort()
            if "status" in scripted:
                return self._fault_response(scripted)
            if scripted.get("budget_error"):
                with fake._lock:
                    spend = acct.spend
                status, body = fake._budget_error(acct, spend, anthropic_env, hdrs.get("x-request-id"))
                return self._send(status, body)
        if key_fault is not None:
            return self._fault_response(key_fault)

        # budget: key-level, checked at request start (spend >= budget rejects)
        reservation = 0.0
        with fake._lock:
            spend_before = acct.spend
            over = spend_before >= acct.budget
            refused_cost = None
            if not over and fake.reservations:
                remaining = acct.budget - acct.spend - acct.reserved
                if remaining <= 1e-12:  # nothing left to reserve while another request is in flight
                    refused_cost = acct.spend + acct.reserved + fake.reservation_estimate
                else:
                    reservation = min(fake.reservation_estimate, remaining)
                    acct.reserved += reservation
            if not over and refused_cost is None:
                acct.admitted += 1
        if refused_cost is not None:
            with fake._lock:
                acct.budget_errors += 1
                fake.busy_refusals += 1
                fake.refused_streams += peek.get("stream") is True
            return self._send(422, {"error": {
                "message": f"Budget has been exceeded! Key={hash_key(acct.api_key)} Current cost: {refused_cost}, "
                           f"Max budget: {acct.budget}", "type": "budget_exceeded", "param": None, "code": "422"}})
        if over:
            with fake._lock:
                fake.refused_streams += peek.get("stream") is True
            status, body = fake._budget_error(acct, spend_before, anthropic_env, hdrs.get("x-request-id"))
            return self._send(status, body)
        try:
            return self._admitted(kind, hdrs, raw, acct, scripted, spend_before)
        finally:
            if reservation:
                with fake._lock:
                    acct.reserved = max(0.0, acct.reserved - reservation)

    def _admitted(self, kind: str, hdrs: dict, raw: bytes, acct: "_Account", scripted: dict | None,
                  spend_before: float) -> None:
        fake = self.fake
        if fake.reservations and "x-fake-hold" in hdrs:  # keep this request (and its reservation) in flight
            try:
                fake._stop.wait(min(float(hdrs["x-fake-hold"]), 30.0))
            except ValueError:
                pass

        try:
            req = json.loads(raw or b"{}")
            if not isinstance(req, dict):
                raise ValueError("body is not an object")
        except ValueError as e:
            return self._send(400, {"error": {"message": f"Invalid JSON payload: {e}",
                                              "type": "invalid_request_error", "param": None, "code": "400"}})
        model = req.get("model")
        if not isinstance(model, str) or not model:
            return self._send(400, {"error": {"message": "litellm.BadRequestError: model is required",
                                              "type": "invalid_request_error", "param": "model", "code": "400"}})

        override = None
        if "x-fake-usage" in hdrs:
            try:
                override = json.loads(hdrs["x-fake-usage"])
            except ValueError:
                override = None
        u = fake.usage_for(model, override)
        cost = fake.cost_for(model, u)
        headers = [
            ("x-litellm-call-id", str(uuid.uuid4())),
            ("x-litellm-model-id", hashlib.sha256(model.encode()).hexdigest()[:32]),
            ("x-litellm-model-group", model),
            ("x-litellm-version", str(fake.litellm_version)),
        ]
        if fake.send_key_spend_header:
            headers.append(("x-litellm-key-spend", fake.key_spend_header_value or str(spend_before)))
            headers.append(("x-litellm-key-max-budget", str(acct.budget)))
        stream = req.get("stream") is True
        reset_after = scripted.get("reset_after_events") if scripted else None
        malformed = bool(scripted.get("malformed")) if scripted else False

        if not stream:
            if kind == "chat":
                body = _chat_json(model, u, fake.clock())
            elif kind == "messages":
                body = _messages_json(model, u)
            else:
                body = _responses_json(model, u, fake.clock(), "completed")
            if kind != "messages" or fake.is_1110():
                headers.append(("x-litellm-response-cost", str(cost)))
            if fake.is_1110():  # the header now includes this answer's own cost; per-part cost headers
                after = fake.key_spend_header_value or str(spend_before + cost)
                headers = [(k, after) if k == "x-litellm-key-spend" else (k, v) for k, v in headers]
                headers += [("x-litellm-response-cost-input", str(cost * 0.4)),
                            ("x-litellm-response-cost-output", str(cost * 0.6))]
            data = _dumps(body)
            if malformed:
                return self._send(200, data[: len(data) // 2], headers)
            if reset_after is not None:
                headers += [("content-type", "application/json"), ("content-length", str(len(data)))]
                self.wfile.write(self._head(200, headers) + data[: len(data) // 2])
                self._abort()
            fake._charge(acct, model, u, cost)
            return self._send(200, data, headers)

        # streaming
        n_events, padding, delay, total = fake.stream_events, fake.event_padding, fake.event_delay, fake.stream_bytes
        # x-fake-first-event-gap: seconds between the first event and the rest (same bytes). Sent at once, the
        # rest reaches the proxy with the first and the time to its first byte counts the proxy's (and this
        # fake's) work on events after it; the gap lets a benchmark time the first event alone.
        first_gap = 0.0
        try:
            if "x-fake-stream-events" in hdrs:
                n_events = int(hdrs["x-fake-stream-events"])
            if "x-fake-event-padding" in hdrs:
                padding = int(hdrs["x-fake-event-padding"])
            if "x-fake-event-delay" in hdrs:
                delay = float(hdrs["x-fake-event-delay"])
            if "x-fake-stream-bytes" in hdrs:
                total = int(hdrs["x-fake-stream-bytes"])
            if "x-fake-first-event-gap" in hdrs:
                first_gap = float(hdrs["x-fake-first-event-gap"])
        except ValueError:
            pass
        texts = _delta_texts(n_events, padding, total)
        if kind == "chat":
            include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
            events = _chat_sse(model, u, texts, include_usage, fake.clock())
        elif kind == "messages":
            events = _messages_sse(model, u, texts)
        else:
            events = _responses_sse(model, u, texts, fake.clock())

        self._start_chunked(200, headers)
        sent = 0
        for is_last, ev in events:
            if reset_after is not None and sent >= int(reset_after):
                self._abort()
            if malformed and sent >= 2:
                self._chunk(b'data: {"id":"chatcmpl-broken","choices":[{"delta":{"cont\n\n')
                self._chunk(b"data: \x00garbage{{not json\n\nevent: ???\nda")
                self._end_chunked()
                return
            if sent and delay:
                if fake._stop.wait(delay):
                    self._abort()
            elif sent == 1 and first_gap:
                if fake._stop.wait(first_gap):
                    self._abort()
            if is_last:
                fake._charge(acct, model, u, cost)
            self._chunk(ev)
            sent += 1
        self._end_chunked()

    # ---- /user/daily/activity ----------------------------------------------------------------
    def _activity(self, query: dict, hdrs: dict, cred: str | None) -> None:
        fake = self.fake
        with fake._lock:
            fault = fake._activity_fault
            acct = fake._accounts.get(cred) if cred else None
            if acct is not None:
                acct.activity_calls += 1
        if fault == "timeout":
            fake._stop.wait(fake.activity_timeout_seconds)
            self._abort()
        if fault == "500":
            return self._send(500, default_error_body(500))
        if fault == "401":
            return self._send(401, {"error": {"message": "Authentication Error, Invalid proxy server token passed.",
                                              "type": "auth_error", "param": "None", "code": "401"}})
        if self._auth(cred) is None:
            return
        if fault == "malformed":
            return self._send(200, b'{"results":[{"date":"2025-11-20","metrics":{"spend":0.1,')
        if fake.activity_budget_errors:
            with fake._lock:
                spend, over = acct.spend, acct.spend >= acct.budget
            if over:
                status, body = fake._budget_error(acct, spend, False, None)
                return self._send(status, body)
        start, end = query.get("start_date"), query.get("end_date")
        if not start or not end:
            return self._send(400, {"error": "Please provide start_date and end_date"})
        try:
            page = int(query.get("page", "1"))
            page_size = int(query.get("page_size", "50"))
            if page < 1 or not (1 <= page_size <= 1000):
                raise ValueError
        except ValueError:
            return self._send(422, {"detail": [{"type": "value_error", "loc": ["query", "page_size"],
                                                "msg": "page must be >= 1 and 1 <= page_size <= 1000",
                                                "input": query.get("page_size")}]})
        self._send(200, _activity_page(fake, acct, start, end, page, page_size, query))

    def _management(self, path: str, cred: str | None) -> None:
        """A valid non-admin key on a management route: LiteLLM's Q5 (observed on /team/list, /customer/list)."""
        acct = self._auth(cred)
        if acct is None:
            return
        if path in ("/key/info", "/v2/key/info"):
            return self._send(200, {"key": hash_key(acct.api_key), "info": {"spend": acct.spend,
                                                                              "max_budget": acct.budget}})
        self._send(401, {"error": {
            "message": "Authentication Error, Only proxy admin can be used to generate, delete, update info for new "
                       f"keys/users/teams. Route={path}. Your role=internal_user. Your user_id={acct.user_id[:6]}***",
            "type": "auth_error", "param": "None", "code": "401"}})

    def _model_info(self) -> dict:
        data = []
        for m, (p_in, p_out, p_cw, p_cr) in self.fake.prices.items():
            data.append({"model_name": m, "litellm_params": {"model": ("anthropic/" if is_anthropic_model(m)
                                                                        else "openai/") + m},
                         "model_info": {"id": hashlib.sha256(m.encode()).hexdigest()[:32], "key": m,
                                        "input_cost_per_token": p_in / 1e6, "output_cost_per_token": p_out / 1e6,
                                        "cache_creation_input_token_cost": p_cw / 1e6 if p_cw else None,
                                        "cache_read_input_token_cost": p_cr / 1e6 if p_cr else None,
                                        "litellm_provider": "anthropic" if is_anthropic_model(m) else "openai",
                                        "mode": "chat"}})
        return {"data": data}

    # ---- admin surface -----------------------------------------------------------------------
    _CONFIG_KNOBS = ("budget_status", "budget_message", "anthropic_envelope_for_messages", "cost_per_request",
                     "send_key_spend_header", "stream_events", "event_padding", "event_delay", "stream_bytes",
                     "activity_lag_seconds", "activity_rows", "activity_budget_errors", "record_requests",
                     "reservations", "reservation_estimate", "litellm_version", "key_spend_header_value")

    def _admin(self, path: str, raw: bytes) -> None:
        fake = self.fake
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return self._send(400, {"error": "invalid JSON"})
        if path == "/_fake/state" and self.command == "GET":
            return self._send(200, fake.state())
        if self.command != "POST":
            return self._send(404, {"detail": "Not Found"})
        try:
            if path == "/_fake/keys":
                fake.add_key(str(body["api_key"]), float(body.get("budget", 10.0)), float(body.get("spend", 0.0)),
                             user_id=body.get("user_id"), team_id=body.get("team_id"))
                return self._send(201, {"ok": True})
            if path == "/_fake/config":
                for k, _v in body.items():
                    if k not in self._CONFIG_KNOBS:
                        return self._send(400, {"error": f"unknown knob {k}"})
                for k, v in body.items():
                    setattr(fake, k, v)
                return self._send(200, {"ok": True})
            if path == "/_fake/script":
                fake.script(*(body if isinstance(body, list) else [body]))
                return self._send(200, {"ok": True})
            if path == "/_fake/key-fault":
                fake.set_key_fault(body["api_key"], body.get("status"), body.get("body"), body.get("headers"))
                return self._send(200, {"ok": True})
            if path == "/_fake/activity-fault":
                fake.set_activity_fault(body.get("mode"))
                return self._send(200, {"ok": True})
            if path == "/_fake/clear-requests":
                fake.clear_requests()
                return self._send(200, {"ok": True})
        except (KeyError, TypeError, ValueError) as e:
            return self._send(400, {"error": f"bad request: {e!r}"})
        return self._send(404, {"detail": "Not Found"})


# ---------------------------------------------------------------------------------------------
# Body builders (reference §3)

def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def _chat_usage(model: str, u: dict, streamed: bool) -> dict:
    prompt = u["input"] + u["cache_write"] + u["cache_read"]
    total = prompt + u["output"]
    if is_anthropic_model(model):
        usage: dict = {"completion_tokens": u["output"], "prompt_tokens": prompt, "total_tokens": total}
        if streamed:
            usage["completion_tokens_details"] = {"reasoning_tokens": u["reasoning"]}
            usage["prompt_tokens_details"] = {"cached_tokens": u["cache_read"],
                                              "cache_creation_tokens": u["cache_write"]}
        else:
            usage["prompt_tokens_details"] = {
                "cached_tokens": u["cache_read"], "cache_creation_tokens": u["cache_write"],
                "cache_creation_token_details": {"ephemeral_5m_input_tokens": u["cache_write"],
                                                 "ephemeral_1h_input_tokens": 0}}
        usage["cache_creation_input_tokens"] = u["cache_write"]
        usage["cache_read_input_tokens"] = u["cache_read"]
        return usage
    return {"completion_tokens": u["output"], "prompt_tokens": prompt, "total_tokens": total,
            "completion_tokens_details": {"accepted_prediction_tokens": 0, "audio_tokens": 0,
                                          "reasoning_tokens": u["reasoning"], "rejected_prediction_tokens": 0},
            "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": u["cache_read"]}}


def _chat_json(model: str, u: dict, now: float) -> dict:
    return {"id": _new_id("chatcmpl-"), "created": int(now), "model": model, "object": "chat.completion",
            "system_fingerprint": None,
            "choices": [{"finish_reason": "stop", "index": 0,
                         "message": {"content": "Hello from the fake upstream.", "role": "assistant",
                                     "tool_calls": None, "function_call": None}}],
            "usage": _chat_usage(model, u, False)}


def _messages_usage(model: str, u: dict) -> dict:
    if is_anthropic_model(model):
        return {"input_tokens": u["input"], "cache_creation_input_tokens": u["cache_write"],
                "cache_read_input_tokens": u["cache_read"],
                "cache_creation": {"ephemeral_5m_input_tokens": u["cache_write"], "ephemeral_1h_input_tokens": 0},
                "output_tokens": u["output"], "service_tier": "standard"}
    # bridged to a non-Anthropic model: cached tokens folded into input, cache fields lost
    return {"input_tokens": u["input"] + u["cache_write"] + u["cache_read"], "output_tokens": u["output"]}


def _messages_json(model: str, u: dict) -> dict:
    return {"id": _new_id("msg_"), "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "Hello from the fake upstream."}],
            "stop_reason": "end_turn", "stop_sequence": None, "usage": _messages_usage(model, u)}


def _responses_usage(model: str, u: dict, full: bool) -> dict:
    prompt = u["input"] + u["cache_write"] + u["cache_read"]
    if is_anthropic_model(model):  # bridged: cache folded into input_tokens, no details
        return {"input_tokens": prompt, "output_tokens": u["output"], "total_tokens": prompt + u["output"]}
    usage: dict = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": u["cache_read"]},
                   "output_tokens": u["output"], "output_tokens_details": {"reasoning_tokens": u["reasoning"]},
                   "total_tokens": prompt + u["output"]}
    if full:
        usage["input_tokens_details"] = {"audio_tokens": None, "cached_tokens": u["cache_read"], "text_tokens": None}
        usage["cost"] = None
    return usage


def _response_id(model: str) -> str:
    raw = (f"litellm:custom_llm_provider:{'anthropic' if is_anthropic_model(model) else 'openai'};"
           f"model_id:{hashlib.sha256(model.encode()).hexdigest()[:32]};response_id:resp_{uuid.uuid4().hex}")
    return "resp_" + base64.b64encode(raw.encode()).decode()


def _response_obj(rid: str, model: str, now: float, status: str, text: str | None, usage: dict | None) -> dict:
    output = []
    if text is not None:
        output = [{"type": "message", "id": "msg_" + rid[-24:], "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}]
    return {"id": rid, "created_at": int(now), "error": None, "incomplete_details": None, "instructions": None,
            "metadata": {}, "model": model, "object": "response", "output": output, "parallel_tool_calls": True,
            "temperature": 1.0, "tool_choice": "auto", "tools": [], "top_p": 1.0, "status": status,
            "usage": usage}


def _responses_json(model: str, u: dict, now: float, status: str) -> dict:
    return _response_obj(_response_id(model), model, now, status, "Hello from the fake upstream.",
                         _responses_usage(model, u, True))


def _delta_texts(n_events: int, padding: int, total_bytes: int | None):
    """Lazily yield delta texts: N deltas (+padding each), or enough ~16 KiB deltas to reach total_bytes."""
    if total_bytes:
        size = 16384
        full = _filler(size)
        sent = 0
        while sent < total_bytes:
            n = min(size, total_bytes - sent)
            yield full if n == size else full[:n]
            sent += n
        return
    pad = _filler(padding)
    for i in range(n_events):
        yield f"word{i} " + pad


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _chat_sse(model: str, u: dict, texts, include_usage: bool, now: float):
    """Yields (is_last, bytes). is_last marks the event before which the cost is charged."""
    base = {"id": _new_id("chatcmpl-"), "created": int(now), "model": model, "object": "chat.completion.chunk"}
    first = True
    for t in texts:
        delta = {"content": t, "role": "assistant"} if first else {"content": t}
        first = False
        yield False, _sse({**base, "choices": [{"index": 0, "delta": delta}]})
    yield False, _sse({**base, "choices": [{"finish_reason": "stop", "index": 0, "delta": {}}]})
    if include_usage:
        yield False, _sse({**base, "choices": [{"index": 0, "delta": {}}], "usage": _chat_usage(model, u, True)})
    yield True, b"data: [DONE]\n\n"


def _ev(name: str, obj: Any) -> bytes:
    return f"event: {name}\ndata: ".encode() + json.dumps(obj).encode() + b"\n\n"


def _messages_sse(model: str, u: dict, texts):
    anth = is_anthropic_model(model)
    if anth:
        start_usage = {"input_tokens": u["input"], "cache_creation_input_tokens": u["cache_write"],
                       "cache_read_input_tokens": u["cache_read"],
                       "cache_creation": {"ephemeral_5m_input_tokens": u["cache_write"],
                                          "ephemeral_1h_input_tokens": 0},
                       "output_tokens": 1, "service_tier": "standard"}
        delta_usage = {"input_tokens": u["input"], "cache_creation_input_tokens": u["cache_write"],
                       "cache_read_input_tokens": u["cache_read"], "output_tokens": u["output"]}
    else:
        start_usage = {"input_tokens": 0, "output_tokens": 0}
        delta_usage = {"input_tokens": u["input"] + u["cache_write"] + u["cache_read"], "output_tokens": u["output"]}
    yield False, _ev("message_start", {"type": "message_start", "message": {
        "id": _new_id("msg_"), "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": start_usage}})
    yield False, _ev("content_block_start", {"type": "content_block_start", "index": 0,
                                             "content_block": {"type": "text", "text": ""}})
    yield False, _ev("ping", {"type": "ping"})
    for t in texts:
        yield False, _ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                 "delta": {"type": "text_delta", "text": t}})
    yield False, _ev("content_block_stop", {"type": "content_block_stop", "index": 0})
    yield False, _ev("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                       "usage": delta_usage})
    yield True, _ev("message_stop", {"type": "message_stop"})


def _responses_sse(model: str, u: dict, texts, now: float):
    rid = _response_id(model)
    item_id = "msg_" + rid[-24:]
    seq = itertools.count()
    yield False, _sse({"type": "response.created",
                       "response": _response_obj(rid, model, now, "in_progress", None, None),
                       "sequence_number": next(seq)})
    yield False, _sse({"type": "response.in_progress",
                       "response": _response_obj(rid, model, now, "in_progress", None, None),
                       "sequence_number": next(seq)})
    yield False, _sse({"type": "response.output_item.added", "output_index": 0,
                       "item": {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant",
                                "content": []}, "sequence_number": next(seq)})
    yield False, _sse({"type": "response.content_part.added", "item_id": item_id, "output_index": 0,
                       "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []},
                       "sequence_number": next(seq)})
    n_chars = 0
    for t in texts:
        n_chars += len(t)
        yield False, _sse({"type": "response.output_text.delta", "item_id": item_id, "output_index": 0,
                           "content_index": 0, "delta": t, "sequence_number": next(seq)})
    summary = f"[{n_chars} chars]"
    yield False, _sse({"type": "response.output_text.done", "item_id": item_id, "output_index": 0,
                       "content_index": 0, "text": summary, "sequence_number": next(seq)})
    yield False, _sse({"type": "response.completed",
                       "response": _response_obj(rid, model, now, "completed", summary,
                                                 _responses_usage(model, u, False)),
                       "sequence_number": next(seq)})
    yield True, b"data: [DONE]\n\n"


def _empty_metrics() -> dict:
    return {"spend": 0.0, "prompt_tokens": 0, "completion_tokens": 0, "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 0, "total_tokens": 0, "successful_requests": 0,
            "failed_requests": 0, "api_requests": 0}


def _add_metrics(m: dict, r: dict) -> None:
    for k in m:
        m[k] += r[k]


def _activity_page(fake: FakeUpstream, acct: _Account, start: str, end: str, page: int, page_size: int,
                   query: dict) -> dict:
    now = fake.clock()
    cutoff = now - float(fake.activity_lag_seconds or 0)
    khash = hash_key(acct.api_key)
    with fake._lock:
        events = [e for e in acct.events if e.ts <= cutoff]
    rows: list[dict] = []
    if query.get("api_key") and query["api_key"] not in (khash, acct.api_key):
        events = []
    for e in events:
        date = datetime.fromtimestamp(e.ts, timezone.utc).date().isoformat()
        if not (start <= date <= end):
            continue
        if query.get("model") and query["model"] != e.model:
            continue
        rows.append({"date": date, "model": e.model, "spend": e.cost, "prompt_tokens": e.prompt_tokens,
                     "completion_tokens": e.completion_tokens, "cache_read_input_tokens": e.cache_read,
                     "cache_creation_input_tokens": e.cache_write,
                     "total_tokens": e.prompt_tokens + e.completion_tokens,
                     "successful_requests": 1, "failed_requests": 0, "api_requests": 1})
    if fake.activity_rows == "model_day":
        agg: dict[tuple, dict] = {}
        for r in rows:
            k = (r["date"], r["model"])
            if k not in agg:
                agg[k] = {"date": r["date"], "model": r["model"], **_empty_metrics()}
            for kk in _empty_metrics():
                agg[k][kk] += r[kk]
        rows = list(agg.values())
    rows.sort(key=lambda r: r["date"], reverse=True)  # LiteLLM orders rows by date desc
    total = len(rows)
    skip = (page - 1) * page_size
    page_rows = rows[skip: skip + page_size]

    by_date: dict[str, dict] = {}
    meta = _empty_metrics()
    for r in page_rows:
        d = by_date.get(r["date"])
        if d is None:
            d = by_date[r["date"]] = {"date": r["date"], "metrics": _empty_metrics(), "breakdown": {
                "models": {}, "model_groups": {}, "providers": {}, "mcp_servers": {}, "entities": {}, "api_keys": {}}}
        metrics = {k: r[k] for k in meta}
        _add_metrics(d["metrics"], metrics)
        _add_metrics(meta, metrics)
        provider = "anthropic" if is_anthropic_model(r["model"]) else "openai"
        bd = d["breakdown"]
        for section, name, md in (("models", r["model"], {}), ("model_groups", r["model"], {}),
                                  ("providers", provider, {}),
                                  ("api_keys", khash, {"key_alias": None, "team_id": None})):
            ent = bd[section].setdefault(name, {"metrics": _empty_metrics(), "metadata": md})
            if section in ("models", "model_groups"):
                ent.setdefault("api_key_breakdown", {})
            _add_metrics(ent["metrics"], metrics)
    results = sorted(by_date.values(), key=lambda d: d["date"], reverse=True)
    return {"results": results, "metadata": {
        "total_spend": meta["spend"], "total_prompt_tokens": meta["prompt_tokens"],
        "total_completion_tokens": meta["completion_tokens"], "total_tokens": meta["total_tokens"],
        "total_api_requests": meta["api_requests"], "total_successful_requests": meta["successful_requests"],
        "total_failed_requests": meta["failed_requests"],
        "total_cache_read_input_tokens": meta["cache_read_input_tokens"],
        "total_cache_creation_input_tokens": meta["cache_creation_input_tokens"],
        "page": page, "total_pages": (total + page_size - 1) // page_size, "has_more": skip + page_size < total}}


# ---------------------------------------------------------------------------------------------
def _parse_keys(spec: str) -> list[tuple[str, float, float]]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        key = parts[0]
        budget = float(parts[1]) if len(parts) > 1 and parts[1] else 10.0
        spend = float(parts[2]) if len(parts) > 2 and parts[2] else 0.0
        out.append((key, budget, spend))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fake_upstream", description="Fake LiteLLM proxy")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--keys", default="", help="k1:budget[:spend],k2:budget,...")
    ap.add_argument("--budget-status", default="400", choices=["400", "422", "429", "cycle"])
    ap.add_argument("--budget-message", default="user", choices=["user", "team", "key", "cycle"])
    ap.add_argument("--anthropic-envelope", action="store_true", help="Anthropic error envelope on /v1/messages")
    ap.add_argument("--activity-lag", type=float, default=0.0, help="seconds before spend shows in activity")
    ap.add_argument("--activity-rows", default="request", choices=["request", "model_day"])
    ap.add_argument("--activity-budget-errors", action="store_true")
    ap.add_argument("--cost-per-request", type=float, default=None)
    ap.add_argument("--prices", default=None, help='JSON file {"model": [in, out, cache_write, cache_read]}')
    ap.add_argument("--stream-events", type=int, default=5)
    ap.add_argument("--event-padding", type=int, default=0)
    ap.add_argument("--event-delay", type=float, default=0.0)
    ap.add_argument("--stream-bytes", type=int, default=None)
    ap.add_argument("--send-key-spend-header", action="store_true")
    ap.add_argument("--record", action="store_true", help="keep every request in memory (off by default)")
    a = ap.parse_args(argv)

    prices = None
    if a.prices:
        with open(a.prices) as f:
            prices = {k: tuple(v) for k, v in json.load(f).items()}
    fake = FakeUpstream(
        host=a.host, port=a.port,
        budget_status=a.budget_status if a.budget_status == "cycle" else int(a.budget_status),
        budget_message=a.budget_message, anthropic_envelope_for_messages=a.anthropic_envelope,
        activity_lag_seconds=a.activity_lag, activity_rows=a.activity_rows,
        activity_budget_errors=a.activity_budget_errors, cost_per_request=a.cost_per_request, prices=prices,
        stream_events=a.stream_events, event_padding=a.event_padding, event_delay=a.event_delay,
        stream_bytes=a.stream_bytes, send_key_spend_header=a.send_key_spend_header, record_requests=a.record,
    )
    for key, budget, spend in _parse_keys(a.keys):
        fake.add_key(key, budget, spend)
    done = threading.Event()

    def _on_signal(signum, frame):
        done.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    fake.start()
    sys.stdout.write(f"fake-upstream listening on {fake.host}:{fake.port}\n")
    sys.stdout.flush()
    while not done.wait(0.5):
        pass
    fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
