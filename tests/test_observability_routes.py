"""The sidecar's own routes told apart once per request: `ObservabilityRoutes` given the admin addon answers
every request exactly as the two addons one after the other do (mitmproxy's order: /metrics and sign-in
first, then the admin API), and leaves an LLM request to the traffic addon untouched."""
from __future__ import annotations

import asyncio
import inspect
import json

import pytest
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from addon.operator.admin_addon import AdminAddon
from addon.operator.metrics import MetricsEndpoint
from addon.operator.observability import ObservabilityRoutes
from addon.traffic.flow_state import META
from tests.inproc import running

POOL_KEY = "sk-pool-routes-0123456789abcdef"


@pytest.fixture
def oh(mongo, db_name, upstream, tmp_path, monkeypatch):
    with running(mongo.uri, db_name, upstream, tmp_path, monkeypatch, {"k1": POOL_KEY}) as sidecar:
        yield sidecar


def _flow(upstream, method: str, path: str, peer: str, body: bytes = b"") -> http.HTTPFlow:
    req = tutils.treq(host="127.0.0.1", port=upstream.port, path=path.encode(), method=method.encode(),
                      content=body, headers=http.Headers(authorization="Bearer sk-client-own-1"))
    f = tflow.tflow(req=req)
    f.client_conn.peername = (peer, 50000)
    return f


async def _through(hooks, flow: http.HTTPFlow) -> None:
    for hook in hooks:  # as mitmproxy (and the script's composed node) calls them: each result awaited
        res = hook(flow)
        if inspect.isawaitable(res):
            await res


def _seen(flow: http.HTTPFlow) -> tuple:
    """What a user sees of the answer (the /metrics page: its status and type; its numbers move)."""
    r = flow.response
    if r is None:
        return None, flow.request.headers.get("authorization"), flow.metadata.get(META)
    body = r.content if r.headers.get("content-type", "").startswith("application/json") else b""
    return r.status_code, r.headers.get("content-type"), body, flow.comment, flow.metadata.get(META), \
        flow.request.headers.get("authorization")


@pytest.mark.parametrize("method, path, peer", [
    ("POST", "/chat/completions", "127.0.0.1"),             # an LLM request: left to the traffic addon
    ("POST", "/v1/messages", "10.1.2.3"),
    ("GET", "/metrics", "127.0.0.1"),
    ("GET", "//metrics", "10.1.2.3"),                      # refused off loopback without a token
    ("POST", "/metrics", "127.0.0.1"),                     # 405
    ("GET", "/admin/openhands/login", "127.0.0.1"),        # the sign-in form
    ("POST", "/admin/openhands/logout", "127.0.0.1"),
    ("GET", "/admin/openhands/keys", "127.0.0.1"),         # the admin API, answered on loopback
    ("GET", "/ADMIN/openhands/keys", "127.0.0.1"),         # any spelling of it
    ("GET", "/v1/../admin/openhands/keys", "127.0.0.1"),
    ("GET", "/admin%2Fopenhands/keys", "127.0.0.1"),
    ("GET", "/admin/openhands/keys", "10.1.2.3"),          # refused off loopback without a token
    ("POST", "/admin/openhands/keys", "127.0.0.1"),        # bad input: 4xx, nothing added
    ("GET", "/openhands/spend-stats", "127.0.0.1"),
])
def test_one_route_look_up_answers_as_the_two_addons_in_turn(oh, upstream, method, path, peer) -> None:
    composed = oh.addons[1]
    assert isinstance(composed, ObservabilityRoutes) and isinstance(composed.admin, AdminAddon)
    assert not any(isinstance(a, AdminAddon) for a in oh.addons)  # no request hook of its own in the script
    apart = [ObservabilityRoutes(oh.services, MetricsEndpoint(oh.services)).request, AdminAddon(oh.services).request]
    body = json.dumps({"id": "k9"}).encode() if method == "POST" else b""

    one, two = _flow(upstream, method, path, peer, body), _flow(upstream, method, path, peer, body)
    asyncio.run(_through([composed.request], one))
    asyncio.run(_through(apart, two))

    assert _seen(one) == _seen(two)
    assert (one.response is None) == (path in ("/chat/completions", "/v1/messages"))
    assert [k.id for k in oh.services.pool.key_list()] == ["k1"]  # nothing a request sent added a key
    assert upstream.requests == []                                 # nor was any of it forwarded
