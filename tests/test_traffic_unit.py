"""The request path (`PooledTraffic`) hook by hook, with mitmproxy's taddons/tflow, against a real Pool on
the in-memory store. No processes: the upstream's answers are set on the flow as mitmproxy would, and
the addon's own retries go to a scripted session.

What a client notices: which credential reaches the upstream, that a budget error never reaches it,
that a conversation keeps its key, that every answer is metered once and that nothing leaks a key.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils
from requests.structures import CaseInsensitiveDict

from addon.core import config, identity
from addon.core.config import build_settings
from addon.core.sse import SSETap
from addon.pool.pool import Pool
from addon.services import Services
from addon.store.mongo import new_key_doc, utcnow
from addon.traffic.flow_state import FlowState
from addon.traffic.pooled import PooledTraffic
from tests.memory_store import MemoryStore, make_writer

HOST, PORT = "upstream.test", 443
UP = f"https://{HOST}"
CLIENT_KEY = "sk-client-own-credential-42"
CHAT = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}
BUDGET_ERROR = {"error": {"message": "Budget has been exceeded! Current cost: 10.0123, Max budget: 10.0",
                          "type": "budget_exceeded", "param": None, "code": "400"}}
OK_JSON = {"id": "c1", "object": "chat.completion", "model": "claude-sonnet-4-5",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


def api_key(key_id: str) -> str:
    return f"sk-pool-{key_id}-0123456789abcdef"


def answer(status: int, body: Any, headers: dict[str, str] | None = None) -> requests.Response:
    r = requests.Response()
    r.status_code = status
    r._content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r.headers = CaseInsensitiveDict(headers or {"content-type": "application/json"})
    return r


class ScriptedSession:
    """Stands in for the retry session: answers by the pool key it is sent, records every request."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.by_key: dict[str, Callable[[], requests.Response]] = {}
        self.spent: set[str] = set()  # keys the upstream refuses on every route (the probe confirms them)
        self.probed: list[str] = []

    def get(self, url: str, *, headers: Any, timeout: Any, allow_redirects: bool) -> requests.Response:
        """The confirmation read (`GET /v1/models` with one key) before a surprising verdict retires it."""
        key = headers.get("x-litellm-api-key", "")
        self.probed.append(key)
        return answer(400, BUDGET_ERROR) if key in self.spent else answer(200, {"object": "list", "data": []})

    def request(self, method: str, url: str, *, headers: Any, data: Any, timeout: Any,
                allow_redirects: bool) -> requests.Response:
        cred = headers.get("authorization", "") or headers.get("x-litellm-api-key", "")
        self.sent.append({"method": method, "url": url, "credential": cred.removeprefix("Bearer "), "body": data,
                          "headers": dict(headers)})
        for key, make in self.by_key.items():
            if key in cred:
                return make()
        return answer(200, OK_JSON, {"content-type": "application/json", "x-litellm-response-cost": "0.02"})


def drive(pending: Any) -> None:
    """What mitmproxy does with a hook's result: await it when the hook handed back an awaitable."""
    if pending is not None:
        async def wait() -> None:
            await pending
        asyncio.run(wait())


class Rig:
    def __init__(self, tmp: Path, environ: dict[str, str] | None = None, **options: Any) -> None:
        values = {o.name: o.default for o in config.OPTIONS}
        values.update({"openhands_upstream": UP, "openhands_mongodb_uri": "mongodb://127.0.0.1:1", **options})
        self.store = MemoryStore()
        self.writer = make_writer(self.store, tmp / "journal.jsonl")
        self.writer.start()
        self.services = Services()
        self.services.settings = build_settings(values, environ or {})
        self.services.store, self.services.writer = self.store, self.writer  # type: ignore[assignment]
        self.pool = Pool(self.store, self.writer, threshold=lambda: self.services.current().spend_threshold,
                         default_budget=lambda: 10.0)
        self.services.pool = self.pool
        self.session = ScriptedSession()
        self.services._session = self.session  # type: ignore[assignment]
        self.services.ready.set()
        self.traffic = PooledTraffic(self.services)

    def add(self, key_id: str, spend: float = 0.0, **fields: Any) -> None:
        assert self.store.insert_key({**new_key_doc(key_id, api_key(key_id), 10.0, utcnow()),
                                      "spendEstimate": spend, **fields})
        self.pool.sync()

    def request(self, flow: http.HTTPFlow) -> http.HTTPFlow:
        drive(self.traffic.request(flow))
        return flow

    def respond(self, flow: http.HTTPFlow, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        """The upstream's answer arrives: responseheaders, then response, as mitmproxy calls them."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        flow.response = http.Response.make(status, raw, headers or {"content-type": "application/json"})
        self.traffic.responseheaders(flow)
        drive(self.traffic.response(flow))

    def stored(self, key_id: str) -> dict[str, Any]:
        assert self.writer.flush(10)
        return self.store.get_key(key_id) or {}


@contextlib.contextmanager
def running_rig(tmp_path: Path) -> Iterator[Rig]:
    """A `Rig` with its traffic addon loaded in mitmproxy's test context; its writer stopped afterwards (the
    `rig` fixture of every file that drives `PooledTraffic` through a `Rig`)."""
    r = Rig(tmp_path)
    try:
        with taddons.context(r.traffic):
            yield r
    finally:
        r.writer.stop()


@pytest.fixture
def rig(tmp_path) -> Iterator[Rig]:
    with running_rig(tmp_path) as r:
        yield r


def flow(path: str = "/chat/completions", body: Any = CHAT, *, session: str | None = "conv",
         headers: dict[str, str] | None = None, host: str = HOST, method: str = "POST") -> http.HTTPFlow:
    h = {"authorization": f"Bearer {CLIENT_KEY}", **(headers or {})}
    if session:
        h["x-litellm-session-id"] = session
    content = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
    req = tutils.treq(host=host, port=PORT, scheme=b"https", path=path.encode(), method=method.encode(),
                      content=content, headers=http.Headers(**{k.replace("-", "_"): v for k, v in h.items()}))
    f = tflow.tflow(req=req)
    f.client_conn.peername = ("127.0.0.1", 50000)
    return f


def state(f: http.HTTPFlow) -> FlowState:
    s = FlowState.of(f)
    assert s is not None
    return s


# -- request ----------------------------------------------------------------------------------------
def test_the_pool_key_replaces_the_clients_credential(rig):
    rig.add("k1")
    f = rig.request(flow(headers={"x-api-key": "another-client-secret", "cookie": "sid=1"}))
    assert f.response is None  # forwarded
    h = f.request.headers
    assert h["authorization"] == f"Bearer {api_key('k1')}"
    assert CLIENT_KEY not in str(h) and "another-client-secret" not in str(h) and "cookie" not in h
    assert h["accept-encoding"] == "identity"
    st = state(f)
    assert (st.key_id, st.client, st.format, st.tried) == ("k1", "session:conv", "chat", ["k1"])
    assert st.key == "sk-pool-...cdef"
    json.dumps(f.metadata)  # JSON-like only: -w, flow.copy() and mitmweb keep working


def test_a_streamed_chat_without_usage_asks_for_it_and_strips_it_later(rig):
    rig.add("k1")
    f = rig.request(flow(body={**CHAT, "stream": True}))
    assert json.loads(f.request.content)["stream_options"] == {"include_usage": True}
    assert state(f).strip_usage is True


@pytest.mark.parametrize("body,options", [
    # no stream_options: the member goes in front of the client's own bytes (nothing else re-encoded)
    ('{"model":"m","stream":true,"messages":[{"role":"user","content":"h\u00e9llo \u00e9t\u00e9"}],"seed":'
     '123456789012345678901234567890}', {"include_usage": True}),
    ('{"model":"m","stream":true,"messages":[{"role":"user","content":"' + "long context \u00e9 " * 3000 + '"}]}',
     {"include_usage": True}),  # past _COPY_ONCE: the same bytes, put together without copying the rest first
    ('{ "stream" : true, "model": "m", "stream_options": null}', {"include_usage": True}),  # null: re-encoded
    ('{"model":"m","stream":true,"stream_options":{"x":1}}', {"x": 1, "include_usage": True}),
])
def test_a_streamed_chat_request_gets_include_usage_and_keeps_the_rest_of_its_body(rig, body, options):
    rig.add("k1")
    raw = body.encode()
    f = rig.request(flow(body=raw))
    sent = json.loads(f.request.content)
    assert sent["stream_options"] == options and state(f).strip_usage is True
    assert {k: v for k, v in sent.items() if k != "stream_options"} == \
        {k: v for k, v in json.loads(raw).items() if k != "stream_options"}
    assert f.request.headers["content-length"] == str(len(f.request.raw_content))
    if "stream_options" not in json.loads(raw):  # the client's bytes, as sent, after the inserted member
        assert f.request.raw_content.endswith(raw[1:])


@pytest.mark.parametrize("raw, sent, strip", [
    (b'{"model":"m","stream":true,"messages":[{"role":"user","content":"caf\xff"}]}', None, True),
    (b'{"model":"m","stream":true,"stream_options":{"x":1},"messages":[{"content":"caf\xff"}]}', b"as sent", False),
    (b'{"model":"m","stream":true,"stream_options":null,"messages":[{"content":"\xff"}]}', b"as sent", False),
])
def test_a_body_that_is_not_utf8_goes_out_and_the_hook_never_fails(rig, raw, sent, strip):
    """A message holding bytes that are not UTF-8: the body's model is read all the same, the usage member goes in
    front where it needs no re-encoding, and a body that would need re-encoding goes out as the client sent it
    (LiteLLM answers it as it would have) instead of failing the request hook."""
    rig.add("k1")
    f = rig.request(flow(body=raw))
    assert f.response is None  # forwarded, not answered with the hook's 500
    assert state(f).model == "m" and state(f).strip_usage is strip
    if sent == b"as sent":
        assert f.request.raw_content == raw
    else:
        assert f.request.raw_content == b'{"stream_options":{"include_usage":true},' + raw[1:]


@pytest.mark.parametrize("headers,target", [
    ({"X-Api-Key": "k-a", "Authorization": "Bearer k-b", "Cookie": "sid=1"}, "authorization"),  # LiteLLM's order
    ({"API-KEY": "k-a", "api-key": "k-c"}, "api-key"),  # repeated, in two spellings: both go
    ({"proxy-authorization": "Basic proxy-secret-zz", "litellm_user_api_key": "k-d"}, "x-litellm-api-key"),
])
def test_every_carrier_is_swapped_in_one_write_and_masked_when_the_flow_ends(rig, headers, target):
    rig.add("k1")
    f = flow(session=None)
    del f.request.headers["authorization"]
    for name, value in headers.items():
        f.request.headers.add(name, value)
    rig.request(f)
    sent = list(f.request.headers.items(multi=True))
    names = [k.lower() for k, _ in sent]
    credentials = [n for n in names if n in identity.CREDENTIAL_HEADERS or n in identity.SECRET_HEADERS]
    assert credentials == [target] and f.request.headers[target].endswith(api_key("k1"))
    assert not any(v in str(sent) for v in ("k-a", "k-b", "k-c", "k-d", "sid=1", "proxy-secret-zz", CLIENT_KEY))
    assert names.count("accept-encoding") == 1 and f.request.headers["accept-encoding"] == "identity"
    rig.respond(f, 200, OK_JSON)
    assert api_key("k1") not in str(f.request.headers) and "...cdef" in f.request.headers[target]


def test_the_flow_state_written_between_hooks_is_the_one_read(rig):
    """The typed state is kept between hooks, but an edited or replaced metadata dict wins."""
    rig.add("k1")
    rig.add("k2")
    f = rig.request(flow())
    f.metadata["openhands"]["model"] = "edited-in-place"
    assert state(f).model == "edited-in-place"
    f.metadata["openhands"] = {**f.metadata["openhands"], "key_id": "k2", "tried": ["k2"], "local": "junk"}
    st = state(f)
    assert (st.key_id, st.tried, st.local) == ("k2", ["k2"], False)
    st.tried.append("changed-on-a-copy")
    assert state(f).tried == ["k2"]
    rig.respond(f, 200, OK_JSON)
    assert f.metadata["openhands"]["metered"] is True and f.metadata["openhands"]["key_id"] == "k2"
    assert list(f.metadata["openhands"]) == [fl.name for fl in dataclasses.fields(FlowState)]
    json.dumps(f.metadata)
    assert f.copy().metadata["openhands"] == f.metadata["openhands"]


def test_a_state_changed_by_a_hook_that_did_not_save_it_is_not_read_back(rig):
    """A hook that fails half-way leaves its changes unsaved: the next hook reads what was saved."""
    rig.add("k1")
    f = rig.request(flow())
    st = state(f)
    st.key_id, st.metered = "k9", True
    st.tried.append("k9")
    again = state(f)
    assert (again.key_id, again.metered, again.tried) == ("k1", False, ["k1"])
    rig.respond(f, 200, OK_JSON)
    assert f.metadata["openhands"]["metered"] is True and f.metadata["openhands"]["key_id"] == "k1"


@pytest.mark.parametrize("host,path", [("elsewhere.test", "/chat/completions")])
def test_flows_to_other_hosts_pass_untouched(rig, host, path):
    rig.add("k1")
    f = rig.request(flow(path, host=host))
    assert f.response is None and f.request.headers["authorization"] == f"Bearer {CLIENT_KEY}"
    assert FlowState.of(f) is None and rig.pool.bindings == {}


def test_a_client_not_on_the_allowlist_gets_401_and_no_key(tmp_path):
    r = Rig(tmp_path, {"OPENHANDS_CLIENT_KEYS": "allowed-1"})
    try:
        r.add("k1")
        f = r.request(flow())
        assert f.response.status_code == 401 and state(f).rejected == "client_key"
        assert api_key("k1") not in str(f.request.headers) and r.pool.bindings == {}
        ok = r.request(flow(headers={"authorization": "Bearer allowed-1"}))
        assert ok.response is None and state(ok).key_id == "k1"
    finally:
        r.writer.stop()


def test_with_no_usable_key_the_client_gets_a_retryable_429(rig):
    rig.add("k1", status="exhausted")
    f = rig.request(flow())
    assert f.response.status_code == 429 and f.response.headers["retry-after"] == "60"
    assert json.loads(f.response.content)["error"]["type"] == "rate_limit_error"
    assert state(f).local and state(f).rejected == "no_key"


def test_a_conversation_keeps_its_key(rig):
    rig.add("k1")
    rig.add("k2")
    keys = {state(rig.request(flow(session=s))).key_id for s in ("a", "b")}
    assert keys == {"k1", "k2"}  # spread over the pool
    again = [state(rig.request(flow(session="a"))).key_id for _ in range(3)]
    assert len(set(again)) == 1


def test_proactive_rotation_is_marked_on_the_flow_and_kept_in_its_state(rig):
    rig.add("k1", 9.96)
    rig.add("k2")
    rig.pool.bind("session:conv", "k1")
    f = rig.request(flow())
    st = state(f)
    assert (st.key_id, st.rotated_from) == ("k2", "k1")
    assert "k1" in f.comment and "k2" in f.comment
    rig.respond(f, 200, OK_JSON, {"content-type": "application/json", "x-litellm-response-cost": "0.01"})
    assert state(f).rotated_from == "k1"  # still there after the response hook
    assert rig.stored("k1")["status"] == "exhausted"


# -- response: metering -----------------------------------------------------------------------------
def test_a_json_answer_is_metered_once_on_its_key(rig):
    rig.add("k1")
    f = rig.request(flow())
    rig.respond(f, 200, OK_JSON, {"content-type": "application/json", "x-litellm-response-cost": "0.0123"})
    drive(rig.traffic.response(f))  # a second response call (replayed flow) does not count again
    st = state(f)
    assert st.metered and st.cost == pytest.approx(0.0123) and st.cost_source
    assert rig.pool.get("k1").spend_estimate == pytest.approx(0.0123)
    doc = rig.stored("k1")
    assert doc["spendEstimate"] == pytest.approx(0.0123) and doc["requestsCount"] == 1
    assert "k1" in f.comment and "0.0123" in f.comment


def test_a_200_stream_is_tapped_and_an_error_answer_is_not(rig):
    rig.add("k1")
    f = rig.request(flow(body={**CHAT, "stream": True}))
    f.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
    rig.traffic.responseheaders(f)
    assert isinstance(f.response.stream, SSETap)
    g = rig.request(flow(body={**CHAT, "stream": True}))
    g.response = http.Response.make(400, b"{}", {"content-type": "application/json"})
    rig.traffic.responseheaders(g)
    assert not isinstance(g.response.stream, SSETap)  # buffered: the response hook can read, retry or replace it


def test_credentials_are_masked_once_the_exchange_is_over(rig):
    rig.add("k1")
    f = rig.request(flow())
    rig.respond(f, 200, OK_JSON)
    assert api_key("k1") not in str(f.request.headers)


def test_a_dropped_stream_still_charges_what_was_seen(rig):
    rig.add("k1")
    f = rig.request(flow(body={**CHAT, "stream": True, "stream_options": {"include_usage": True}}))
    f.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
    rig.traffic.responseheaders(f)
    tap = f.response.stream
    usage = {"id": "c1", "choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 100,
                                                  "total_tokens": 1100, "cost": 0.5}}
    tap(b"data: " + json.dumps(usage).encode() + b"\n\n")
    rig.traffic.error(f)  # the client or upstream dropped before the end
    assert state(f).metered and rig.pool.get("k1").spend_estimate == pytest.approx(0.5)
    assert api_key("k1") not in str(f.request.headers)


# -- response: recovery -----------------------------------------------------------------------------
def test_a_budget_error_is_calibrated_rotated_and_retried_and_never_reaches_the_client(rig):
    rig.add("k1", 9.0)
    rig.add("k2")
    rig.session.spent.add(api_key("k1"))
    rig.pool.bind("session:conv", "k1")
    f = rig.request(flow())
    rig.respond(f, 400, BUDGET_ERROR)
    assert f.response.status_code == 200 and json.loads(f.response.content)["id"] == "c1"
    [sent] = rig.session.sent
    assert sent["credential"] == api_key("k2") and sent["method"] == "POST"
    assert sent["url"] == f"{UP}/chat/completions" and json.loads(sent["body"]) == json.loads(f.request.content)
    assert CLIENT_KEY not in json.dumps(sent["headers"])
    st = state(f)
    assert (st.key_id, st.retries, st.tried) == ("k2", 1, ["k1", "k2"])
    assert rig.pool.get("k2").spend_estimate == pytest.approx(0.02)  # the retried answer is metered, on k2
    doc = rig.stored("k1")
    assert doc["status"] == "exhausted" and doc["spendEstimate"] == pytest.approx(10.0123)
    assert rig.pool.choose("session:conv").key.id == "k2"  # the conversation moved with the key


def test_a_retry_binds_the_whole_long_session_id_once(rig):
    rig.add("k1")
    rig.add("k2")
    session = "conversation-" + "x" * 120
    rig.session.spent.add(api_key("k1"))
    rig.pool.bind(f"session:{session}", "k1")
    f = rig.request(flow(session=session))
    rig.respond(f, 400, BUDGET_ERROR)
    assert f.response.status_code == 200
    rig.writer.flush(10)
    clients = [b["clientId"] for b in rig.store.snapshot().bindings if "conversation-" in b["clientId"]]
    assert clients == [f"session:{session}"] and rig.store.get_binding(clients[0]) == "k2"


def test_with_every_key_spent_the_client_gets_429_not_the_budget_error(rig):
    rig.add("k1", 9.0)
    rig.add("k2", 9.0)
    rig.session.spent |= {api_key("k1"), api_key("k2")}
    rig.session.by_key[api_key("k2")] = lambda: answer(400, BUDGET_ERROR)
    f = rig.request(flow())
    first = state(f).key_id
    rig.respond(f, 400, BUDGET_ERROR)
    assert f.response.status_code == 429 and "budget" not in f.response.get_text().lower().split("no pool key")[0]
    assert b"Budget has been exceeded" not in f.response.content
    assert sorted(state(f).tried) == ["k1", "k2"] and first in state(f).tried
    assert all(rig.stored(k)["status"] == "exhausted" for k in ("k1", "k2"))


def test_a_rate_limited_key_cools_down_and_the_request_goes_elsewhere(rig):
    rig.add("k1")
    rig.add("k2")
    f = rig.request(flow())
    limited = state(f).key_id
    rig.respond(f, 429, {"error": {"message": "Rate limit reached", "type": "rate_limit_error", "code": "429"}},
                {"content-type": "application/json", "retry-after": "7"})
    assert f.response.status_code == 200 and state(f).key_id != limited
    doc = rig.stored(limited)
    assert doc["status"] == "rate_limited" and doc["cooldownUntil"] is not None


def test_a_rate_limit_on_the_only_key_passes_the_upstreams_429_through(rig):
    rig.add("k1")
    f = rig.request(flow())
    rig.respond(f, 429, {"error": {"message": "Rate limit reached", "type": "rate_limit_error", "code": "429"}},
                {"content-type": "application/json", "retry-after": "7"})
    assert f.response.status_code == 429 and f.response.headers["retry-after"] == "7"
    assert rig.session.sent == [] and rig.pool.get("k1").status == "rate_limited"


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_pass_through_and_mark_no_key(rig, status):
    rig.add("k1")
    rig.add("k2")
    f = rig.request(flow())
    rig.respond(f, status, {"error": {"message": "upstream broke", "type": "server_error"}})
    assert f.response.status_code == status and rig.session.sent == []
    assert {k.status for k in rig.pool.key_list()} == {"healthy"}
    assert rig.pool.get(state(f).key_id).spend_estimate == 0.0


def test_an_invalid_key_is_retired_and_the_request_retried(rig):
    rig.add("k1")
    rig.add("k2")
    rig.pool.bind("session:conv", "k1")
    f = rig.request(flow())
    rig.respond(f, 401, {"error": {"message": "Authentication Error, Invalid API key provided.",  # LiteLLM 1.110
                                   "type": "token_not_found_in_db", "param": "key", "code": "401"}})
    assert f.response.status_code == 200 and state(f).key_id == "k2"
    assert rig.stored("k1")["status"] == "invalid"


def test_a_retry_that_cannot_reach_the_upstream_answers_502(rig):
    rig.add("k1")
    rig.add("k2")
    rig.pool.bind("session:conv", "k1")

    def refuse() -> requests.Response:
        raise requests.ConnectionError("refused")

    rig.session.by_key[api_key("k2")] = refuse
    rig.session.spent.add(api_key("k1"))
    f = rig.request(flow())
    rig.respond(f, 400, BUDGET_ERROR)
    assert f.response.status_code == 502 and state(f).local
    assert b"Budget has been exceeded" not in f.response.content


def test_no_exception_escapes_a_hook_and_a_failed_request_is_answered_locally(rig, monkeypatch, caplog):
    rig.add("k1")

    def broken(*a: Any, **kw: Any) -> Any:
        raise RuntimeError("pool bug")

    monkeypatch.setattr(rig.pool, "acquire", broken)
    f = rig.request(flow())
    assert f.response.status_code == 500 and state(f).local
    assert CLIENT_KEY not in f.response.get_text()
    assert "request hook failed" in caplog.text
