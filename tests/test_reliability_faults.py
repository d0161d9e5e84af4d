"""Upstream faults per key and broken upstream answers, end to end (issue 6 §3, §5)."""
from __future__ import annotations

import time

import pytest
import requests

from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.e2e

K1, K2 = "sk-fault-key-one-0123456789ab", "sk-fault-key-two-0123456789ab"
CHAT = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}
MSGS = {"model": "claude-sonnet-4-5", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}


def post(sc, path="/chat/completions", body=None, session="s1", **kw):
    return requests.post(sc.url + path, json=CHAT if body is None else body,
                         headers={"x-litellm-session-id": session, **kw.pop("headers", {})}, timeout=20, **kw)


def bound_key(fake) -> str:
    return fake.requests[-1].credential


def wait_until(pred, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_upstream_faults_per_key(sidecar_factory):
    fake = FakeUpstream(hang_seconds=1.0)
    fake.start()
    try:
        fake.add_key(K1)
        fake.add_key(K2)
        sc = sidecar_factory(upstream_url=fake.url)
        sc.add_key("k1", K1)
        sc.add_key("k2", K2)
        ids = {K1: "k1", K2: "k2"}
        assert post(sc).status_code == 200
        first = bound_key(fake)

        # 429 (not a budget error): cooldown honouring Retry-After, retried on the other key, back by itself
        fake.script({"status": 429, "body": {"error": {"message": "Rate limit reached", "type": "rate_limit_error"}},
                     "headers": {"retry-after": "3"}})
        t0 = time.time()
        r = post(sc)
        assert r.status_code == 200 and bound_key(fake) != first
        k = sc.keys()[ids[first]]
        assert k["status"] == "rate_limited"
        cooldown = time.mktime(time.strptime(k["cooldownUntil"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        assert 1.5 <= cooldown - t0 <= 5.0, cooldown - t0
        assert wait_until(lambda: sc.keys()[ids[first]]["status"] == "healthy", timeout=10)
        assert sc.keys()[ids[first]]["cooldownUntil"] is None

        # 5xx passes through, no key is marked
        before = {i: (k["status"], k["requestsCount"]) for i, k in sc.keys().items()}
        fake.script({"status": 503, "body": {"error": {"message": "overloaded"}}})
        r = post(sc)
        assert r.status_code == 503 and "overloaded" in r.text
        # a connection dropped by the upstream (hang then abort; reset mid-body): a 502 from mitmproxy, no mark
        fake.script({"hang": True})
        r = post(sc)
        assert r.status_code == 502
        fake.script({"reset_after_events": 0})
        r = post(sc)
        assert r.status_code == 502
        assert {i: (k["status"], k["requestsCount"]) for i, k in sc.keys().items()} == before

        # malformed JSON from the upstream reaches the client as received
        fake.script({"malformed": True})
        r = post(sc)
        assert r.status_code == 200
        with pytest.raises(ValueError):
            r.json()
        assert r.content.startswith(b'{"id":')
        # malformed SSE too, byte for byte after the first events
        fake.script({"malformed": True})
        r = post(sc, body={**CHAT, "stream": True, "stream_options": {"include_usage": True}})
        assert r.status_code == 200 and r.content.endswith(b"data: \x00garbage{{not json\n\nevent: ???\nda")

        # a stream reset after message_start: the key still gets what was metered before the drop
        key_now = None
        for _attempt in range(2):
            spend_before = {i: k["spendEstimate"] for i, k in sc.keys().items()}
            fake.script({"reset_after_events": 2})
            with pytest.raises(requests.RequestException):
                r = post(sc, "/v1/messages", {**MSGS, "stream": True}, session="s-drop")
                r.content  # noqa: B018
            key_now = ids[bound_key(fake)]
            if wait_until(lambda key_now=key_now, spend_before=spend_before:
                          sc.keys()[key_now]["spendEstimate"] > spend_before[key_now], timeout=5):
                break
        assert sc.keys()[key_now]["spendEstimate"] > spend_before[key_now]

        # a huge request body and non-UTF-8 bytes pass through to the upstream unchanged
        big = (b'{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"' + b"x" * (6 * 1024 * 1024)
               + b'"}]}')
        r = requests.post(sc.url + "/chat/completions", data=big, headers={"content-type": "application/json"},
                          timeout=30)
        assert r.status_code == 200 and len(fake.requests[-1].body) >= len(big)
        bad = b'{"model":"claude-sonnet-4-5","messages":"\xff\xfe\x80"}'
        r = requests.post(sc.url + "/chat/completions", data=bad, headers={"content-type": "application/json"},
                          timeout=10)
        assert fake.requests[-1].body == bad and r.status_code in (200, 400)

        # 401 from the upstream: that key becomes invalid, the request is retried on the other key
        assert post(sc, session="s-auth").status_code == 200
        bound = bound_key(fake)
        fake.set_key_fault(bound, 401)
        r = post(sc, session="s-auth")
        r2 = post(sc, session="s-auth")
        assert r.status_code == 200 and r2.status_code == 200
        keys = sc.keys()
        assert keys[ids[bound]]["status"] == "invalid"
        other = K2 if bound == K1 else K1
        assert keys[ids[other]]["status"] == "healthy" and fake.requests[-1].credential == other
    finally:
        fake.stop()
