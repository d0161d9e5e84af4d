"""The addon's hooks, in process (mitmproxy.test.taddons/tflow), fed garbage and a failing database
(issue 6 §1, §3, §4): no exception escapes a hook, the pool does not change, admin is never forwarded."""
from __future__ import annotations

import asyncio
import json
import logging
import threading

import pytest
from mitmproxy import http
from mitmproxy.test import tflow, tutils
from pymongo.errors import AutoReconnect, ServerSelectionTimeoutError

from addon.traffic.flow_state import META
from tests.harness import eventually
from tests.inproc import running

POOL_KEY = "sk-pool-hooks-0123456789abcdef"
POOL_KEY2 = "sk-pool-hooks-fedcba9876543210"
CHAT = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def addon(mongo, db_name, upstream, tmp_path, monkeypatch):
    with running(mongo.uri, db_name, upstream, tmp_path, monkeypatch, {"k1": POOL_KEY, "k2": POOL_KEY2}) as oh:
        yield oh


def run(coro):
    return asyncio.run(coro)


def pooled_flow(upstream, path="/chat/completions", body: bytes | None = None, headers=None, peer="127.0.0.1",
                method="POST") -> http.HTTPFlow:
    req = tutils.treq(host="127.0.0.1", port=upstream.port, path=path.encode(), method=method.encode(),
                      content=json.dumps(CHAT).encode() if body is None else body,
                      headers=http.Headers(**(headers or {"authorization": "Bearer sk-client-own-1"})))
    f = tflow.tflow(req=req)
    f.client_conn.peername = (peer, 50000)
    return f


def pool_state(oh) -> dict:
    return {k.id: (k.status, round(k.spend_estimate, 9), k.requests_count, k.tokens_used)
            for k in oh.services.pool.key_list()}


@pytest.fixture
def no_hook_errors(caplog):
    caplog.set_level(logging.ERROR)
    yield
    failed = [r.getMessage() for r in caplog.records if "hook failed" in r.getMessage()]
    assert not failed, failed


GARBAGE_RESPONSES = [
    (200, {"content-type": "application/json"}, b'{"id":"x","usage":{"prompt_tokens":'),          # truncated JSON
    (200, {"content-type": "application/json"}, b"\xff\xfe\x00\x80 not utf-8 \xc3\x28"),
    (200, {"content-type": "application/json"}, b"[1,2,3]"),
    (200, {"content-type": "application/json"}, b'{"usage":{"prompt_tokens":NaN,"completion_tokens":-5}}'),
    (200, {"content-type": "application/json"}, b'{"usage":"lots","model":7}'),
    (200, {"content-type": "text/event-stream"}, b'data: {"choices":[{"delta":{"cont\n\ndata: \x00garbage{{\n\nev'),
    (200, {"content-type": "application/json", "x-litellm-response-cost": "NaN"}, b"{}"),
    (200, {"content-type": "application/json", "x-litellm-response-cost": "-3"}, b"{}"),
    (200, {"content-type": "application/json", "x-litellm-key-spend": "inf"}, b"{}"),
    (400, {"content-type": "application/json"}, b'{"error":{"message":"ExceededBudget: Spend=nan, Budget=-1"'),
    (422, {"content-type": "text/plain"}, b"\xff\xfe Budget has been exceeded! Current cost: \xff"),
    (500, {"content-type": "application/json"}, b"\x00" * 1000),
    (502, {}, b""),
    (200, {"content-type": "application/json"}, b'{"pad":"' + b"x" * (8 * 1024 * 1024) + b'"}'),  # huge
]


@pytest.mark.parametrize("status,headers,body", GARBAGE_RESPONSES)
def test_garbage_from_upstream_never_escapes_a_hook_and_reaches_the_client_as_received(
        addon, upstream, status, headers, body, no_hook_errors):
    before = pool_state(addon)
    f = pooled_flow(upstream)
    run(addon.request(f))
    assert f.response is None and f.metadata[META]["key_id"] in ("k1", "k2")
    f.response = http.Response.make(status, body, headers)
    addon.responseheaders(f)
    if f.response.stream:  # a streamed body goes through the tap chunk by chunk, then ends
        out = b"".join(b"".join(_tap(f.response.stream, body[i:i + 7])) for i in range(0, len(body), 7)) + \
            b"".join(_tap(f.response.stream, b""))
        assert out == body
    run(addon.response(f))
    addon.error(f)
    after = pool_state(addon)
    if status >= 400:
        # Not a budget error the parser can use (spend NaN): nothing about the pool changed unless the key
        # was retired as exhausted; in no case does the spend become NaN or negative.
        # (a budget error is retried on the other key, whose answer is metered: one request at most)
        for _k, (_st, spend, _n, _tok) in after.items():
            assert spend == spend and spend >= 0
        assert sum(v[2] for v in after.values()) - sum(v[2] for v in before.values()) <= 1
    else:
        assert f.response.content == body  # passed through unchanged
        key = f.metadata[META]["key_id"]
        assert after[key][2] == before[key][2] + 1
        assert after[key][1] >= before[key][1] and after[key][1] < 1e6 and after[key][1] == after[key][1]


def _tap(tap, chunk):
    r = tap(chunk)
    return r if isinstance(r, list) else [r]


def test_request_hook_survives_hostile_requests(addon, upstream, no_hook_errors):
    for body, headers in [(b"\xff\xfe\x00garbage", None), (b"", None), (b"null", None), (b"[]", None),
                          (b'{"model":["x"],"stream":"yes","stream_options":7}', None),
                          (json.dumps(CHAT).encode(), {"authorization": "Bearer", "x-api-key": ""}),
                          (json.dumps(CHAT).encode(), {"x-litellm-session-id": "s" * 10000}),
                          (b"x" * (4 * 1024 * 1024), {"content-type": "application/json"})]:
        f = pooled_flow(upstream, body=body, headers=headers)
        run(addon.request(f))
        assert f.response is None, f.response and f.response.content
        cred = [v for k, v in f.request.headers.items() if k.lower() in ("authorization", "x-api-key",
                                                                          "x-litellm-api-key")]
        assert cred and all(POOL_KEY in v or POOL_KEY2 in v for v in cred)


def test_error_hook_with_no_response_and_with_a_dropped_stream(addon, upstream, no_hook_errors):
    f = pooled_flow(upstream, path="/v1/messages")
    run(addon.request(f))
    key = f.metadata[META]["key_id"]
    before = pool_state(addon)[key]
    addon.error(f)  # connection refused before any response
    assert pool_state(addon)[key] == before
    f = pooled_flow(upstream, path="/v1/messages")
    run(addon.request(f))
    f.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
    addon.responseheaders(f)
    start = (b'event: message_start\ndata: {"type":"message_start","message":{"model":"claude-sonnet-4-5",'
             b'"usage":{"input_tokens":1000,"output_tokens":1}}}\n\n')
    assert f.response.stream(start) == start
    addon.error(f)  # the client or upstream dropped mid-stream
    after = pool_state(addon)[f.metadata[META]["key_id"]]
    assert after[2] == before[2] + 1 and after[1] > before[1]  # what was metered before the drop is charged
    assert "dropped" in f.comment


def test_admin_without_token_answers_loopback_only_and_is_never_forwarded(addon, upstream):
    for peer in ("10.0.0.7", "192.168.1.20", "8.8.8.8", "::ffff:10.0.0.1", "fe80::1"):
        f = pooled_flow(upstream, path="/admin/openhands/keys", method="GET", body=b"", peer=peer)
        run(addon.request(f))
        assert f.response is not None and f.response.status_code == 401, peer
        assert "loopback" in f.response.get_text()
        assert f.metadata[META].get("admin")
    for peer in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        f = pooled_flow(upstream, path="/admin/openhands/keys", method="GET", body=b"", peer=peer)
        run(addon.request(f))
        assert f.response is not None and f.response.status_code == 200
        text = f.response.get_text()
        assert POOL_KEY not in text and POOL_KEY2 not in text
    # a case/encoding variant of an admin path is still answered locally (never forwarded)
    for path in ("/ADMIN/openhands/keys", "/admin%2Fopenhands/keys", "/admin/openhands/../openhands/keys"):
        f = pooled_flow(upstream, path=path, method="GET", body=b"", peer="10.0.0.7")
        run(addon.request(f))
        assert f.response is not None, path
    # with no peer at all (should not happen), refuse
    f = pooled_flow(upstream, path="/admin/openhands/keys", method="GET", body=b"")
    f.client_conn.peername = None
    run(addon.request(f))
    assert f.response.status_code == 401
    assert upstream.requests == []


def test_hooks_tolerate_a_database_that_is_gone(addon, upstream, monkeypatch, no_hook_errors):
    """pymongo errors (server selection timeouts) never reach a hook; requests are served from memory."""
    store = addon.services.store
    on_loop: list[str] = []  # store calls made on the event loop's thread (asyncio.run runs it on this one)

    def failing(name):
        def down(*a, **kw):
            if threading.current_thread() is threading.main_thread():
                on_loop.append(name)
            raise ServerSelectionTimeoutError("127.0.0.1:1: [Errno 111] Connection refused")
        return down

    for name in ("snapshot", "transition_status", "claim_backup", "activate_backup", "move_bindings", "bind",
                 "apply_usage", "set_key_fields", "raise_spend", "insert_history", "get_key", "list_backups",
                 "list_history", "insert_key", "insert_backup", "delete_key", "delete_backup", "changes", "server_time",
                 "get_binding", "touch_bindings"):
        monkeypatch.setattr(store, name, failing(name))
    with pytest.raises(ServerSelectionTimeoutError):
        addon.services.pool.sync()
    on_loop.clear()
    # normal traffic: served from memory, the loop never waits on the database
    for i in range(20):
        f = pooled_flow(upstream, headers={"x-litellm-session-id": f"c{i % 3}"})
        run(addon.request(f))
        assert f.response is None
        f.response = http.Response.make(200, b"{}", {"content-type": "application/json",
                                                     "x-litellm-response-cost": "0.01"})
        run(addon.response(f))
    assert on_loop == []
    assert sum(k.requests_count for k in addon.services.pool.key_list()) == 20
    # a budget error while the database is down: the key is retired in memory, the request is retried elsewhere
    upstream.set_spend(POOL_KEY, 10.0)
    upstream.set_spend(POOL_KEY2, 0.0)
    f = pooled_flow(upstream, headers={"x-litellm-session-id": "c-budget"})
    run(addon.request(f))
    addon.services.pool.bind("session:c-budget", "k1")
    f.metadata[META].update(key_id="k1", tried=["k1"])
    f.response = http.Response.make(400, json.dumps({"error": {"message": "Budget has been exceeded! "
                                                                          "Current cost: 10.0, Max budget: 10.0",
                                                               "type": "budget_exceeded"}}),
                                    {"content-type": "application/json"})
    run(addon.response(f))
    assert f.response.status_code == 200, f.response.content
    assert addon.services.pool.get("k1").status == "exhausted"
    # a key at its rotation point while the database is down: served on another key, quickly
    addon.services.pool.get("k2").spend_estimate = 0.0
    with addon.services.pool.lock:
        addon.services.pool.keys["k1"].status = "healthy"
        addon.services.pool.keys["k1"].spend_estimate = 9.99
    addon.services.pool.bind("session:c-proactive", "k1")
    f = pooled_flow(upstream, headers={"x-litellm-session-id": "c-proactive"})
    run(addon.request(f))
    assert f.response is None and f.metadata[META]["key_id"] == "k2"
    # and with no key left at all, the client gets a retryable 429, not a 500
    with addon.services.pool.lock:
        for k in addon.services.pool.keys.values():
            k.status = "exhausted"
    f = pooled_flow(upstream, headers={"x-litellm-session-id": "c-none"})
    run(addon.request(f))
    assert f.response is not None and f.response.status_code == 429
    assert on_loop == []  # rotation and promotion attempts ran off the loop
    # the admin API says the database is unavailable (503), instead of an internal error
    f = pooled_flow(upstream, path="/admin/openhands/keys", body=json.dumps({"id": "k9", "apiKey": "sk-x-1234567890"}
                                                                             ).encode())
    run(addon.request(f))
    assert f.response.status_code == 503, f.response.content
    assert "database" in f.response.get_text().lower()


def test_sync_loop_survives_sync_failures(addon, monkeypatch):
    calls = []

    def flaky():
        calls.append(1)
        raise AutoReconnect("connection closed")

    monkeypatch.setattr(addon.services.pool, "sync", flaky)
    monkeypatch.setattr("addon.lifecycle.SYNC_INTERVAL_S", 0.05)
    addon.lifecycle.stop_event.set()
    for t in addon.lifecycle.threads:
        t.join(5)
    addon.lifecycle.threads = []
    addon.lifecycle.stop_event.clear()
    addon.lifecycle._spawn("sync-test", addon.lifecycle._sync_loop)
    eventually(lambda: len(calls) >= 3)  # the loop keeps going
