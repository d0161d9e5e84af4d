"""Budget safety end to end (issue: proactive rotation, calibration, transparent retry, backups, key health)."""
from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from addon.core.rotation_policy import rotation_point
from tests.harness import eventually

pytestmark = pytest.mark.e2e

CLAUDE = "claude-sonnet-4-5"
GPT = "gpt-5-mini-2025-08-07"
# /responses with a Claude model folds cache tokens into input_tokens (reference §3): not recomputable, so the
# realistic /responses client here is an OpenAI model, as the OpenHands SDK uses it.
BODIES = [
    ("/chat/completions", {"model": CLAUDE, "messages": []}),
    ("/chat/completions", {"model": CLAUDE, "messages": [], "stream": True}),
    ("/v1/messages", {"model": CLAUDE, "max_tokens": 5, "messages": []}),
    ("/v1/messages", {"model": CLAUDE, "max_tokens": 5, "messages": [], "stream": True}),
    ("/responses", {"model": GPT, "input": "hi", "x": "y" * 10}),
    ("/responses", {"model": GPT, "input": "hi", "stream": True}),
]


def pool_key(name: str) -> str:
    return f"sk-{name}-0123456789abcdef"


def is_budget_error(r: requests.Response) -> bool:
    text = r.text
    return "budget" in text.lower() and ("ExceededBudget" in text or "Budget has been exceeded" in text
                                         or "budget_exceeded" in text)


@pytest.mark.parametrize("status_mode,message_mode,anthropic", [
    ("cycle", "cycle", False),
    (422, "team", True),
])
def test_pool_driven_to_exhaustion_never_shows_a_budget_error(sidecar_factory, upstream, mongo_db,
                                                             status_mode, message_mode, anthropic):
    upstream.budget_status = status_mode
    upstream.budget_message = message_mode
    upstream.anthropic_envelope_for_messages = anthropic
    budget = 0.3  # ~20 requests of $0.015 per key
    sc = sidecar_factory(env={"OPENHANDS_DEFAULT_BUDGET": str(budget)})  # promoted backups get this budget
    actives, backups = ["a1", "a2"], ["b1", "b2", "b3"]
    for name in actives + backups:
        upstream.add_key(pool_key(name), budget=budget)
    for name in actives:
        sc.add_key(name, pool_key(name), budget=budget)
    for name in backups:
        sc.add_backup(name, pool_key(name))
    statuses = []
    i = 0
    while True:
        path, body = BODIES[i % len(BODIES)]
        r = requests.post(sc.url + path, json=body, timeout=20, headers={"x-litellm-session-id": f"c{i % 3}"})
        statuses.append(r.status_code)
        assert not is_budget_error(r), r.text
        if r.status_code == 429:
            break
        assert r.status_code == 200, r.text
        i += 1
        assert i < 400, "pool never ran dry"
    assert r.headers.get("retry-after")
    assert "No pool key with budget left" in r.json()["error"]["message"]
    # every key the upstream knows was used up to at least its rotation point
    point = rotation_point(budget, 9.95)
    for name in actives + backups:
        assert upstream.spend(pool_key(name)) >= point - 1e-9, (name, upstream.spend(pool_key(name)))
    used = list(mongo_db.openhands_backup_keys.find())
    assert all(b["isUsed"] for b in used) and len({b["usedFor"] for b in used}) == len(used)
    assert sc.out.count(r"🔮 \[OpenHands/ProactiveRotation\]") + sc.out.count(r"💸 \[OpenHands/BudgetError\]") >= 4


def test_budget_error_calibrates_spend_rotates_and_retries_transparently(sidecar_factory, upstream, mongo_db):
    upstream.budget_status = 400
    upstream.add_key(pool_key("k1"), budget=10, spend=10.5123)  # spent elsewhere: our estimate is stale
    upstream.add_key(pool_key("k2"), budget=10)
    sc = sidecar_factory()
    sc.add_key("k1", pool_key("k1"))
    sc.add_key("k2", pool_key("k2"))
    r = requests.post(sc.url + "/chat/completions", json={"model": CLAUDE, "messages": [], "stream": True},
                      headers={"x-litellm-session-id": "conv"}, timeout=20)
    assert r.status_code == 200 and "data: [DONE]" in r.text
    creds = [q.credential for q in upstream.requests if q.path.startswith("/chat")]
    assert creds == [pool_key("k1"), pool_key("k2")]
    assert json.loads(upstream.requests[-1].body) == json.loads(upstream.requests[-2].body)  # same request resent
    # the calibration is written behind queued increments (write-behind)
    eventually(lambda: mongo_db.openhands_keys.find_one({"_id": "k1"})["spendEstimate"] >= 10.5)
    k1 = mongo_db.openhands_keys.find_one({"_id": "k1"})
    assert k1["status"] == "exhausted" and k1["spendEstimate"] == pytest.approx(10.5123)
    assert "ExceededBudget" in k1["lastError"]
    # the conversation stays on its new key
    r = requests.post(sc.url + "/chat/completions", json={"model": CLAUDE, "messages": []},
                      headers={"x-litellm-session-id": "conv"}, timeout=20)
    assert r.status_code == 200 and upstream.requests[-1].credential == pool_key("k2")
    def bound_key():
        doc = mongo_db.openhands_bindings.find_one({"clientId": "session:conv"})
        return doc and doc["openhandsKeyId"]

    eventually(lambda: bound_key() == "k2")


@pytest.mark.parametrize("threshold,budget,below,at", [
    (None, 10.0, 9.94, 9.95),
    ("9.5", 10.0, 9.49, 9.5),
    (None, 50.0, 49.94, 49.95),
])
def test_proactive_rotation_point(sidecar_factory, upstream, threshold, budget, below, at):
    env = {"OPENHANDS_SPEND_THRESHOLD": threshold} if threshold else {}
    sc = sidecar_factory(env=env)
    for name in ("k1", "k2"):
        upstream.add_key(pool_key(name), budget=100)
    sc.add_key("k1", pool_key("k1"), budget=budget)
    sc.add_key("k2", pool_key("k2"), budget=budget)
    headers = {"x-litellm-session-id": "conv"}
    requests.post(sc.url + "/chat/completions", json={"model": CLAUDE, "messages": []}, headers=headers, timeout=20)
    first = upstream.requests[-1].credential
    first_id = "k1" if first == pool_key("k1") else "k2"
    assert sc.admin("PATCH", f"/admin/openhands/keys/{first_id}/spend", {"spendEstimate": below}).status_code == 200
    requests.post(sc.url + "/chat/completions", json={"model": CLAUDE, "messages": []}, headers=headers, timeout=20)
    assert upstream.requests[-1].credential == first, "rotated below the rotation point"
    sc.admin("PATCH", f"/admin/openhands/keys/{first_id}/spend", {"spendEstimate": at})
    r = requests.post(sc.url + "/chat/completions", json={"model": CLAUDE, "messages": []}, headers=headers,
                      timeout=20)
    assert r.status_code == 200
    assert upstream.requests[-1].credential != first, "did not rotate at the rotation point"
    sc.out.wait_for(r"🔮 \[OpenHands/ProactiveRotation\] k\d -> k\d \(spend \$[\d.]+ >= \$[\d.]+\)", timeout=30)
    assert sc.keys()[first_id]["status"] == "exhausted"


def test_no_backup_no_other_key_warns_and_sends_on_current_key(sidecar, upstream):
    upstream.add_key(pool_key("k1"), budget=100)
    sidecar.add_key("k1", pool_key("k1"))
    sidecar.admin("PATCH", "/admin/openhands/keys/k1/spend", {"spendEstimate": 9.97})
    r = requests.post(sidecar.url + "/chat/completions", json={"model": CLAUDE, "messages": []}, timeout=20)
    assert r.status_code == 200 and upstream.requests[-1].credential == pool_key("k1")
    sidecar.out.wait_for(r"⚠️ \[OpenHands/ProactiveRotation\] .*no backup .*sending on (it|k1)", timeout=30)
    assert sidecar.keys()["k1"]["status"] == "healthy"


def test_rate_limit_cools_key_down_and_retries_elsewhere(sidecar, upstream, mongo_db):
    for name in ("k1", "k2"):
        upstream.add_key(pool_key(name), budget=100)
        sidecar.add_key(name, pool_key(name))
    upstream.script({"status": 429, "headers": {"retry-after": "7"},
                     "body": {"error": {"message": "Rate limit reached for requests", "type": "rate_limit_error",
                                        "param": None, "code": "429"}}})
    before = time.time()
    r = requests.post(sidecar.url + "/chat/completions", json={"model": CLAUDE, "messages": []}, timeout=20)
    after = time.time()
    assert r.status_code == 200
    first, second = upstream.requests[-2].credential, upstream.requests[-1].credential
    assert first != second
    limited = "k1" if first == pool_key("k1") else "k2"
    doc = eventually(lambda: (d := mongo_db.openhands_keys.find_one({"_id": limited}))["status"] == "rate_limited"
                     and d)
    assert before + 7 - 0.01 <= doc["cooldownUntil"].timestamp() <= after + 7 + 0.01  # Retry-After honoured
    # it comes back by itself once the cooldown has passed
    eventually(lambda: sidecar.keys()[limited]["status"] == "healthy", timeout=60)


KEY_DEAD_110 = {"error": {"message": "Authentication Error, Invalid API key provided.", "type": "token_not_found_in_db",
                          "param": "key", "code": "401"}}
KEY_BLOCKED = {"error": {"message": "Authentication Error, Key is blocked. Update via `/key/unblock` if you're admin.",
                         "type": "auth_error", "param": "None", "code": "401"}}


def _unrecognised(status: int) -> dict:
    return {"error": {"message": f"upstream says {status}", "type": "x", "param": None, "code": str(status)}}


@pytest.mark.parametrize("status,body,marks", [
    (401, KEY_DEAD_110, "invalid"),       # LiteLLM's own "this key does not exist": retired, retried elsewhere
    (401, KEY_BLOCKED, "invalid"),
    (401, _unrecognised(401), None),      # no LiteLLM template: GET /v1/models on the key says it is fine
    (403, _unrecognised(403), None),
    (500, _unrecognised(500), None),
    (503, _unrecognised(503), None),
])
def test_auth_errors_retire_key_server_errors_pass_through(sidecar, upstream, status, body, marks):
    for name in ("k1", "k2"):
        upstream.add_key(pool_key(name), budget=100)
        sidecar.add_key(name, pool_key(name))
    upstream.script({"status": status, "body": body})
    r = requests.post(sidecar.url + "/chat/completions", json={"model": CLAUDE, "messages": []}, timeout=20)
    chats = [q for q in upstream.requests if q.path.startswith("/chat")]
    first = chats[0].credential
    first_id = "k1" if first == pool_key("k1") else "k2"
    if marks:
        assert r.status_code == 200 and len(chats) == 2
        assert sidecar.keys()[first_id]["status"] == marks
    else:
        assert r.status_code == status and len(chats) == 1
        assert all(k["status"] == "healthy" for k in sidecar.keys().values())


def test_two_sidecars_racing_to_rotate_one_key_consume_exactly_one_backup(sidecar_factory, upstream, mongo_db):
    upstream.add_key(pool_key("k1"), budget=100)
    for b in ("b1", "b2", "b3"):
        upstream.add_key(pool_key(b), budget=100)
    first = sidecar_factory()
    first.add_key("k1", pool_key("k1"))
    for b in ("b1", "b2", "b3"):
        first.add_backup(b, pool_key(b))
    second = sidecar_factory()
    first.admin("PATCH", "/admin/openhands/keys/k1/spend", {"spendEstimate": 9.96})
    eventually(lambda: second.keys()["k1"]["spendEstimate"] >= 9.96)  # its periodic sync saw the new spend
    results: list[int] = []

    def hit(sc, n):
        r = requests.post(sc.url + "/chat/completions", json={"model": CLAUDE, "messages": []},
                          headers={"x-litellm-session-id": f"race-{n}"}, timeout=30)
        results.append(r.status_code)

    threads = [threading.Thread(target=hit, args=(sc, i)) for i, sc in enumerate([first, second] * 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 8
    used = list(mongo_db.openhands_backup_keys.find({"isUsed": True}))
    assert [b["usedFor"] for b in used] == ["k1"], used
    assert mongo_db.openhands_keys.find_one({"_id": "k1"})["status"] == "exhausted"
    live = {d["_id"] for d in mongo_db.openhands_keys.find({"status": "healthy"})}
    assert all(b["openhandsKeyId"] in live for b in mongo_db.openhands_bindings.find())
