"""End to end: the spend checker in real mitmdump processes, real SecantusDB, fake upstream (issue 5).

Tiers are tiny (`0:1`: every key every second) so no test sleeps through real intervals.
"""
from __future__ import annotations

import re
import time

import pytest
import requests

from tests.fake_upstream import _Event
from tests.harness import eventually

pytestmark = pytest.mark.e2e

K1 = "sk-spend-k1-0123456789abcdef"
K2 = "sk-spend-k2-0123456789abcdef"
B1 = "sk-spend-b1-0123456789abcdef"
GHOST = "sk-spend-ghost-0123456789abcd"  # the upstream does not know it: 401
CHAT = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}
FAST = {"OPENHANDS_SPEND_CHECKER": "true", "OPENHANDS_SPEND_CHECK_TIERS": "0:1",
        "OPENHANDS_SPEND_CHECK_TICK_SECONDS": "0.2", "OPENHANDS_SPEND_CHECK_LEASE_SECONDS": "3",
        "OPENHANDS_SPEND_CHECK_TIMEOUT_SECONDS": "0.5"}
P = re.escape("💰 [OpenHands/SpendChecker]")


def add_events(upstream, api_key: str, count: int, cost: float, age_s: float) -> None:
    now = time.time()
    upstream._accounts[api_key].events.extend(_Event(now - age_s - i * 1e-3, "gpt-5-codex", cost) for i in range(count))


def history(sc, key_id: str) -> list[dict]:
    r = sc.admin("GET", f"/admin/openhands/spend-history?keyId={key_id}&limit=1000")
    assert r.status_code == 200, r.text
    return r.json()["history"]


def test_paged_lagging_spend_is_summed_and_a_key_crossing_the_threshold_is_rotated(sidecar_factory, upstream):
    upstream.activity_lag_seconds = 1.5
    upstream.add_key(K1)
    upstream.add_key(B1)
    add_events(upstream, K1, 2500, 0.003, age_s=3600)  # $7.50 over three activity pages
    sc = sidecar_factory(env=FAST)
    sc.out.wait_for(P + r" Started \(threshold: \$9\.95, tiers: >=\$0 every 1s", timeout=30)
    sc.add_key("k1", K1)
    r = requests.post(sc.url + "/chat/completions", json=CHAT, headers={"x-litellm-session-id": "conv"}, timeout=10)
    assert r.status_code == 200 and upstream.requests[-1].credential == K1
    request_cost = upstream.spend(K1)
    assert request_cost > 0

    # Summed across pages, and the request's own spend appears once the upstream's lag has passed.
    expected = 7.5 + request_cost
    eventually(lambda: abs(sc.keys()["k1"]["totalSpend"] - expected) < 1e-6)
    spends = [row["spend"] for row in history(sc, "k1")]
    assert any(abs(s - 7.5) < 1e-6 for s in spends), spends  # the lagging poll, before the row showed up
    assert sc.keys()["k1"]["spendEstimate"] >= expected - 1e-6  # raised to at least the polled spend
    assert sc.out.count(P + r" Key k1 ACTIVE: \$7\.5\d / \$9\.95 \(7\d\.\d%\)") >= 1
    assert upstream.activity_calls(K1) >= 3 * len(spends)  # three pages per poll

    # The key crosses the threshold upstream: rotated within one tier interval (1 s) plus a tick.
    sc.add_backup("b1", B1)
    add_events(upstream, K1, 1, 2.5, age_s=5)
    eventually(lambda: sc.keys()["k1"]["status"] == "exhausted")
    sc.out.wait_for(re.escape("🔄 [OpenHands/SpendChecker] Proactive rotation k1 -> b1 (spend $10.0") +
                    r"\d >= \$9\.95\)", timeout=30)
    row = eventually(lambda: next((h for h in history(sc, "k1") if h["newKeyId"]), None))
    assert row["rotationReason"] == f"proactive_threshold_{expected + 2.5:.2f}"
    assert row["newKeyId"] == "b1" and row["rotatedAt"] and row["wasActive"] is True
    assert row["apiKeyMasked"] == "sk-spend...cdef" and row["threshold"] == 9.95
    # Rotated by the first poll that saw the key past its rotation point, not a later one.
    assert [h for h in history(sc, "k1") if h["spend"] >= 9.95 and not h["newKeyId"]] == []

    r = requests.post(sc.url + "/chat/completions", json=CHAT, headers={"x-litellm-session-id": "conv"}, timeout=10)
    assert r.status_code == 200 and upstream.requests[-1].credential == B1
    stats = sc.admin("GET", "/openhands/spend-stats").json()
    assert stats["running"] is True and stats["polling"] is True and stats["threshold"] == 9.95
    assert [k["key_id"] for k in stats["key_stats"]] == ["b1"]
    assert K1 not in sc.out.text() and B1 not in sc.out.text()


def test_activity_endpoint_failures_never_stop_the_checker(sidecar_factory, upstream):
    upstream.add_key(K1, spend=1.0)
    upstream.add_key(K2, spend=2.0)
    sc = sidecar_factory(env=FAST)
    sc.add_key("k1", K1)
    sc.add_key("ghost", GHOST)
    sc.add_key("k2", K2)

    # 401 for one key: marked invalid, logged once, the others keep being polled.
    eventually(lambda: sc.keys()["ghost"]["status"] == "invalid")
    k1_before = upstream.activity_calls(K1)
    eventually(lambda: upstream.activity_calls(K1) >= k1_before + 2)
    assert sc.out.count(r"Key ghost check failed: HTTP 401.*marked invalid") == 1
    assert sc.keys()["k1"]["status"] == "healthy"
    eventually(lambda: sc.keys()["k2"]["totalSpend"] == 2.0)

    for fault, line in [("500", r"HTTP 500.* after 3 attempts"), ("timeout", r"no answer within 0\.5s"),
                        ("malformed", r"malformed activity answer")]:
        mark = len(sc.out.lines)
        calls_before = upstream.activity_calls(K1)
        upstream.set_activity_fault(fault)
        sc.out.wait_for(r"Key k1 check failed: " + line, timeout=30, start=mark)
        sc.out.wait_for(r"Key k2 check failed: " + line, timeout=30, start=mark)
        upstream.set_activity_fault(None)
        calls_during = upstream.activity_calls(K1) - calls_before
        resumed = len(sc.out.lines)
        sc.out.wait_for(P + r" Key k1 IDLE: \$1\.00", timeout=30, start=resumed)
        sc.out.wait_for(P + r" Key k2 IDLE: \$2\.00", timeout=30, start=resumed)
        failed_lines = sum(1 for x in sc.out.lines[mark:resumed] if re.search(r"Key k1 check failed", x))
        per_check = 3 if fault == "500" else 1  # retried attempts share one log line
        assert 1 <= failed_lines <= calls_during // per_check + 1, (fault, failed_lines, calls_during)
        assert sc.keys()["k1"]["status"] == "healthy"

    stats = sc.admin("GET", "/openhands/spend-stats").json()
    assert stats["running"] is True and stats["counters"]["failures"] >= 7
    assert {k["key_id"] for k in stats["key_stats"]} == {"k1", "k2"}
    assert "Traceback" not in sc.out.text()
    assert GHOST not in sc.out.text() and K1 not in sc.out.text()


def poller_of(*sidecars):
    holders = [sc for sc in sidecars if sc.out.count(r"this sidecar is the spend poller") > 0]
    return holders


def test_one_poller_per_pool_and_takeover(sidecar_factory, upstream):
    upstream.add_key(K1, spend=1.0)
    env = {**FAST, "OPENHANDS_SPEND_CHECK_LEASE_SECONDS": "2"}
    a = sidecar_factory(env=env)
    a.add_key("k1", K1)
    b = sidecar_factory(env=env)
    b.out.wait_for(r"polls spend for this pool; this sidecar stands by", timeout=30)

    # Only one polls: the standby never checks a key, and each check is one poll, not one per sidecar.
    mark, before = len(a.out.lines), upstream.activity_calls(K1)
    checks = lambda: sum(1 for x in a.out.lines[mark:] if re.search(P + r" Key k1 IDLE", x))  # noqa: E731
    eventually(lambda: checks() >= 3)
    polled, seen = upstream.activity_calls(K1) - before, checks()
    assert abs(polled - seen) <= 1, (polled, seen)  # one check may be in flight at either end
    assert poller_of(a, b) == [a]
    assert a.out.count(P + r" Key k1 IDLE") >= 2 and b.out.count(P + r" Key k1 ") == 0
    assert a.admin("GET", "/openhands/spend-stats").json()["polling"] is True
    assert b.admin("GET", "/openhands/spend-stats").json()["polling"] is False

    # The poller dies without releasing its lease: the standby takes over within one lease period.
    a.kill()
    b.out.wait_for(r"this sidecar is the spend poller", timeout=60)
    mark = len(b.out.lines)
    b.out.wait_for(P + r" Key k1 IDLE: \$1\.00", timeout=30, start=mark)

    # A clean stop joins the thread and releases the lease without an error.
    out = b.out
    assert b.stop() == 0
    assert "Traceback" not in out.text() and "stopping the spend checker" not in out.text()
