"""Trust boundary end to end (issue 16): every attack an adversarial client can send, against a real
mitmdump + SecantusDB and a hostile fake upstream that answers with LiteLLM's exact bodies.

Each attack leaves every key's status and spend and every backup unchanged, and the client gets the
upstream's own answer (or the sidecar's 403). No client secret reaches the upstream; no full key lands
in a `-w` flow file, the log, or mitmproxy's confdir.
"""
from __future__ import annotations

import http.client
import json
import math

import pytest
import requests
from mitmproxy import io as mitmio

from tests.harness import eventually

pytestmark = pytest.mark.e2e

KEYS = {"k1": "sk-trust-key-one-0123456789ab", "k2": "sk-trust-key-two-0123456789cd"}
BACKUPS = {"b1": "sk-trust-backup-one-00112233", "b2": "sk-trust-backup-two-44556677"}
SECRETS = [*KEYS.values(), *BACKUPS.values()]
CLIENT = "sk-client-secret-never-upstream-99"
CLAUDE = "claude-sonnet-4-5"


def chat(model: str = CLAUDE, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.fixture
def pool(sidecar_factory, upstream, tmp_path):
    upstream.strict_models = True
    upstream.management_routes = True
    for k in SECRETS:
        upstream.add_key(k, budget=10)
    flows = tmp_path / "flows.mitm"
    sc = sidecar_factory(args=["-w", str(flows), "--set", "flow_detail=3"])
    for key_id, api_key in KEYS.items():
        sc.add_key(key_id, api_key)
    for key_id, api_key in BACKUPS.items():
        sc.add_backup(key_id, api_key)
    sc.flow_file = flows
    return sc


def snapshot(sc, mongo_db) -> tuple:
    keys = {k: (v["status"], v["spendEstimate"], v["totalSpend"], v["cooldownUntil"]) for k, v in sc.keys().items()}
    backups = sorted((b["_id"], b.get("isUsed"), b.get("usedFor")) for b in mongo_db.openhands_backup_keys.find())
    return keys, backups


def raw_request(sc, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, bytes]:
    """http.client sends the path exactly as given (requests would normalise dot segments)."""
    conn = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=20)
    try:
        conn.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def llm_requests(upstream) -> list:
    return [q for q in upstream.requests if q.path not in ("/v1/model/info",)]


# (id, method, path, body, upstream setup, expected status, who answers)
ATTACKS = [
    ("team-list", "GET", "/team/list", None, None, 403, "sidecar"),
    ("customer-list", "GET", "/customer/list", None, None, 403, "sidecar"),
    ("key-info", "GET", "/key/info", None, None, 403, "sidecar"),
    ("key-delete", "POST", "/key/delete", {"keys": ["x"]}, None, 403, "sidecar"),
    ("key-block", "POST", "/key/block", {"key": "x"}, None, 403, "sidecar"),
    ("key-regenerate", "POST", "/key/regenerate", {"key": "x"}, None, 403, "sidecar"),
    ("dot-segments-to-key-delete", "POST", "/v1/chat/completions/../../key/delete", {}, None, 403, "sidecar"),
    ("model-echo-budget", "POST", "/chat/completions", chat("Budget has been exceeded! Current cost: 1e6"), None, 400,
     "upstream"),
    ("model-echo-1e308", "POST", "/chat/completions",
     chat("Budget has been exceeded! Current cost: 1e308, Max budget: 10.0"), None, 400, "upstream"),
    ("model-echo-key-blocked", "POST", "/v1/chat/completions",
     chat("Authentication Error, Key is blocked. Update via `/key/unblock` if you're admin."), None, 400, "upstream"),
    ("model-echo-no-deployments", "POST", "/chat/completions", chat("No deployments available"), None, 429,
     "upstream"),
    ("model-echo-messages", "POST", "/v1/messages",
     {"model": "ExceededBudget: User=u over budget. Spend=99.0, Budget=10.0", "max_tokens": 5, "messages": []},
     None, 400, "upstream"),
    ("end-user-budget", "POST", "/chat/completions", chat(user="cust-1"), "end_user", 400, "upstream"),
    ("end-user-budget-stream", "POST", "/chat/completions", chat(user="cust-1", stream=True), "end_user", 400,
     "upstream"),
    ("model-not-allowed", "POST", "/chat/completions", chat("gpt-5-2025-08-07"), "model_access", 401, "upstream"),
]


@pytest.mark.parametrize("tid,method,path,body,setup,status,who", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_a_client_request_never_retires_a_key_claims_a_backup_or_moves_spend(pool, upstream, mongo_db, tid, method,
                                                                            path, body, setup, status, who):
    if setup == "end_user":
        upstream.end_user_budgets = {"cust-1": (5.01, 5.0)}
    if setup == "model_access":
        upstream.allowed_models = {k: [CLAUDE] for k in SECRETS}
    before = snapshot(pool, mongo_db)
    upstream.clear_requests()
    got, answer = raw_request(pool, method, path, json.dumps(body).encode() if body is not None else b"",
                              {"authorization": f"Bearer {CLIENT}"})
    assert got == status, answer[:300]
    error = json.loads(answer)["error"]
    assert error["message"]
    seen = llm_requests(upstream)
    if who == "sidecar":
        assert seen == [], [q.path for q in seen]  # a management route never sees a pool key
        assert error["type"] == "forbidden_route"
    else:
        assert len(seen) == 1 and seen[0].credential in KEYS.values()  # answered once, no retry on another key
        assert error["type"] != "rate_limit_error" or "No pool key" not in error["message"]
    assert snapshot(pool, mongo_db) == before
    # the pool still serves
    r = requests.post(pool.url + "/chat/completions", json=chat(), timeout=20)
    assert r.status_code == 200, r.text
    assert "hook failed" not in pool.out.text() and "Traceback" not in pool.out.text()


ADMIN_VARIANTS = ["//admin/openhands/keys", "/./admin/openhands/keys", "/v1/../admin/openhands/keys",
                  "/admin//openhands/keys", "/%61dmin/openhands/keys", "/ADMIN/openhands/keys",
                  "/admin/openhands/keys/../keys", "/openhands/spend-stats/"]


def test_admin_path_variants_are_answered_locally_and_never_forwarded(pool, upstream, mongo_db):
    before = snapshot(pool, mongo_db)
    upstream.clear_requests()
    for path in ADMIN_VARIANTS:
        post = json.dumps({"id": "k7", "apiKey": "sk-variant-0000000000"}).encode()
        for method, body in (("GET", b""), ("POST", post)):
            got, answer = raw_request(pool, method, path, body)
            assert 400 <= got < 500, (path, got)
            assert json.loads(answer)["error"]["message"], path
    assert upstream.requests == []
    assert snapshot(pool, mongo_db) == before


def test_the_clients_credential_never_reaches_the_upstream_nor_any_log_or_flow_file(pool, upstream):
    headers = {"authorization": f"Bearer {CLIENT}", "api-key": CLIENT, "x-api-key": CLIENT,
               "x-goog-api-key": CLIENT, "Ocp-Apim-Subscription-Key": CLIENT, "x-litellm-api-key": CLIENT,
               "Proxy-Authorization": f"Basic {CLIENT}", "cookie": f"token={CLIENT}; other=1"}
    upstream.clear_requests()
    for path, body in (("/chat/completions?key=" + CLIENT, chat()), ("/v1/messages", {"model": CLAUDE,
                                                                                      "max_tokens": 5,
                                                                                      "messages": []}),
                       ("/chat/completions", chat(stream=True))):
        r = requests.post(pool.url + path, json=body, headers=headers, timeout=20)
        assert r.status_code == 200, r.text
    r = requests.get(pool.url + "/v1/models", headers=headers, timeout=20)
    assert r.status_code == 200
    r = requests.get(pool.url + "/team/list?key=" + CLIENT, headers=headers, timeout=20)  # refused locally
    assert r.status_code == 403
    seen = llm_requests(upstream)
    assert len(seen) == 4
    for q in seen:
        assert CLIENT not in json.dumps([q.headers, q.query, q.path, q.body.decode("utf-8", "replace")])
        assert q.credential in KEYS.values()
        assert "cookie" not in q.headers and "proxy-authorization" not in q.headers
        creds = [h for h in ("x-litellm-api-key", "authorization", "api-key", "x-api-key", "x-goog-api-key",
                             "ocp-apim-subscription-key") if h in q.headers]
        assert creds == ["x-litellm-api-key"], creds  # exactly one credential: the pool key
    assert pool.stop() == 0
    log = pool.out.text()
    data = pool.flow_file.read_bytes()
    assert data and b"/chat/completions" in data
    for secret in (CLIENT, *SECRETS):
        assert secret not in log, secret[:12]
        assert secret.encode() not in data, secret[:12]
    with open(pool.flow_file, "rb") as f:
        flows = list(mitmio.FlowReader(f).stream())
    assert any(getattr(fl, "request", None) is not None and fl.request.path.startswith("/chat") for fl in flows)


def test_an_upstream_answer_echoing_the_pool_key_is_masked(pool, upstream, mongo_db):
    for k in KEYS.values():
        upstream.set_key_fault(k, 401, {"error": {
            "message": f"Authentication Error, LiteLLM Virtual Key expected. Received={k}, expected to start with "
                       "'sk-'.", "type": "auth_error", "param": k, "code": "401"}})
    before = snapshot(pool, mongo_db)
    r = requests.post(pool.url + "/chat/completions", json=chat(), timeout=20)
    assert r.status_code == 401  # a misconfiguration answer passes through and marks no key
    for k in SECRETS:
        assert k not in r.text
    assert "sk-trust..." in r.text
    assert snapshot(pool, mongo_db) == before


def test_hostile_numbers_are_dropped_and_admin_answers_stay_strict_json(pool, upstream, mongo_db):
    before = {k: v["spendEstimate"] for k, v in pool.keys().items()}
    usage = {"prompt_tokens": 10 ** 400, "completion_tokens": 5, "total_tokens": 10 ** 400}
    upstream.script(
        {"status": 200, "headers": {"x-litellm-response-cost": "1e308"},
         "body": {"id": "c1", "object": "chat.completion", "model": CLAUDE, "choices": [],
                  "usage": {"prompt_tokens": 10, "completion_tokens": 5}}},
        {"status": 200, "body": json.dumps({"id": "c2", "object": "chat.completion", "model": CLAUDE,
                                            "choices": [], "usage": usage})},
        {"status": 200, "headers": {"x-litellm-response-cost": "-1"},
         "body": {"id": "c3", "object": "chat.completion", "model": CLAUDE, "choices": [],
                  "usage": {"prompt_tokens": 10, "completion_tokens": 5, "cost": float("inf")}}},
    )
    for _ in range(3):
        r = requests.post(pool.url + "/chat/completions", json=chat(), headers={"x-litellm-session-id": "n"},
                          timeout=20)
        assert r.status_code == 200
    strict = lambda text: json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in an admin answer"))  # noqa
    for path in ("/admin/openhands/keys", "/admin/openhands/spend-summary", "/openhands/spend-stats"):
        r = pool.admin("GET", path)
        assert r.status_code == 200
        strict(r.text)
    after = {k: v["spendEstimate"] for k, v in pool.keys().items()}
    assert all(math.isfinite(v) and v - before[k] < 1.0 for k, v in after.items()), after
    assert "Traceback" not in pool.out.text() and "OverflowError" not in pool.out.text()
    pool.out.wait_for(r"💲 \[OpenHands/Metering\] key k\d: ", timeout=10)
    for path, status in (("/admin/openhands/spend-history?limit=" + "9" * 5000, 400),):
        got, answer = raw_request(pool, "GET", path)
        assert got == status and json.loads(answer)["error"]["message"]
    got, answer = raw_request(pool, "POST", "/admin/openhands/keys", b'{"a":' * 5000 + b"1" + b"}" * 5000)
    assert got == 400 and json.loads(answer)["error"]["message"]


def test_an_invalid_admin_body_keeps_no_key_in_the_flow_file(pool):
    bad = b'{"id":"k5","apiKey":"sk-trust-typo-key-00998877",}'  # trailing comma: not JSON
    got, _ = raw_request(pool, "POST", "/admin/openhands/keys", bad)
    assert got == 400
    got, _ = raw_request(pool, "POST", "/admin/openhands/keys", b'{"id":"k6","apikey":"sk-trust-typo-key-11223344"}')
    assert got == 400
    assert pool.stop() == 0
    data = pool.flow_file.read_bytes() + pool.out.text().encode()
    for secret in (b"sk-trust-typo-key-00998877", b"sk-trust-typo-key-11223344", *(s.encode() for s in SECRETS)):
        assert secret not in data


def test_a_reservation_refusal_means_busy_not_spent(sidecar_factory, upstream, mongo_db):
    """LiteLLM 1.110: a second request on a key with one in flight is refused with Key=<sha256>: no key is
    retired, no backup promoted; the request goes to another key."""
    upstream.reservations = True
    upstream.reservation_estimate = 0.25
    k1, k2 = KEYS["k1"], KEYS["k2"]
    upstream.add_key(k1, budget=0.05, spend=0.006)
    upstream.add_key(k2, budget=0.05)
    upstream.add_key(BACKUPS["b1"], budget=0.05)
    sc = sidecar_factory(env={"OPENHANDS_SPEND_THRESHOLD": "9.999"})  # $0.05 keys rotate at $0.049
    sc.add_key("k1", k1, budget=0.05)
    sc.add_key("k2", k2, budget=0.05)
    sc.add_backup("b1", BACKUPS["b1"])
    before = {k: v["status"] for k, v in sc.keys().items()}
    import threading

    results: dict[str, requests.Response] = {}

    def slow():
        results["slow"] = requests.post(sc.url + "/chat/completions", json=chat(), timeout=30,
                                        headers={"x-litellm-session-id": "s", "x-fake-hold": "3"})

    t = threading.Thread(target=slow)
    t.start()
    eventually(lambda: any(q.path == "/chat/completions" for q in upstream.requests), timeout=15)
    first = next(q for q in upstream.requests if q.path == "/chat/completions").credential
    # the same conversation, so the same key while the first request is still in flight
    r = requests.post(sc.url + "/chat/completions", json=chat(), headers={"x-litellm-session-id": "s"}, timeout=30)
    t.join()
    assert r.status_code == 200 and results["slow"].status_code == 200, (r.text, results["slow"].text)
    assert {k: v["status"] for k, v in sc.keys().items()} == before
    assert all(not b.get("isUsed") for b in mongo_db.openhands_backup_keys.find())
    chats = [q.credential for q in upstream.requests if q.path == "/chat/completions"]
    assert chats[0] == first and chats[-1] != first  # the second request was served by another key
    if upstream.budget_errors(first):  # LiteLLM refused it (Key=<sha256>): the sidecar read that as busy
        sc.out.wait_for(r"KeyBusy\] key k\d refused a reservation", timeout=5)
    assert "BudgetError" not in sc.out.text()


def test_commands_take_no_key_and_leave_none_in_the_confdir(tmp_path, mongo, db_name, upstream, monkeypatch):
    from tests.test_e2e_observability import WebSidecar

    secret = "sk-trust-command-key-5566778899"
    typed = "sk-trust-typed-by-mistake-0011223"
    upstream.add_key(secret)
    sc = WebSidecar(tmp_path / "web", upstream.url, mongo.uri, db_name, name="mitmweb",
                    env={"OH_TRUST_KEY": secret})
    sc.start()
    try:
        web = requests.Session()
        web.headers["authorization"] = f"Bearer {sc.password}"
        base = f"http://127.0.0.1:{sc.web_port}"
        xsrf = "5e1f0a7c9b3d"  # tornado's XSRF check: the same token in the cookie and the header
        web.cookies.set("_mitmproxy_xsrf", xsrf, domain="127.0.0.1", path="/")

        def command_bar(line: str) -> dict:
            """What mitmweb's command bar does: record the line in the history, then run the command."""
            name, *args = line.split(" ")
            hdr = {"X-XSRFToken": xsrf}
            web.post(base + "/commands/commands.history.add", json={"arguments": [line]}, headers=hdr, timeout=15)
            r = web.post(base + f"/commands/{name}", json={"arguments": args}, headers=hdr, timeout=15)
            assert r.status_code == 200, (r.status_code, r.text[:300], xsrf)
            return r.json()

        out = command_bar("openhands.add k9 env:OH_TRUST_KEY")
        assert "started" in str(out.get("value")), out
        eventually(lambda: "k9" in sc.keys(), timeout=15)
        key_file = tmp_path / "backup.key"
        key_file.write_text(secret[::-1] + "\n")
        out = command_bar(f"openhands.backup bk9 {key_file}")
        assert "started" in str(out.get("value")), out
        out = command_bar(f"openhands.add k10 {typed}")
        assert "do not take a key itself" in str(out.get("error")), out
        assert "k10" not in sc.keys()
    finally:
        sc.stop()
    for path in sc.confdir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for s in (secret, secret[::-1], typed):
                assert s.encode() not in data, (path.name, s[:12])
    history = sc.confdir / "command_history"
    assert history.is_file() and "openhands.add k9 env:OH_TRUST_KEY" in history.read_text()


def test_a_verdict_the_upstream_does_not_confirm_passes_through_and_leaves_the_key(pool, upstream, mongo_db):
    """Verify before retiring: the bare budget text with another budget (team member or proxy-wide) on a key
    the meter says is fresh is checked with GET /v1/models; LiteLLM answers 200, so nothing is retired."""
    before = snapshot(pool, mongo_db)
    upstream.script({"status": 400, "body": {"error": {
        "message": "Budget has been exceeded! Current cost: 100.5, Max budget: 100.0", "type": "budget_exceeded",
        "param": None, "code": "400"}}})
    upstream.clear_requests()
    r = requests.post(pool.url + "/chat/completions", json=chat(), timeout=20)
    assert r.status_code == 400 and "Max budget: 100.0" in r.text  # the upstream's own answer
    probes = [q for q in upstream.requests if q.path == "/v1/models"]
    assert len(probes) == 1 and probes[0].body == b"" and probes[0].credential in KEYS.values()
    pool.out.wait_for(r"🔎 \[OpenHands/Verify\] key k\d: owner_budget .* NOT confirmed", timeout=10)
    assert snapshot(pool, mongo_db) == before


def test_an_unrecognised_refusal_retires_no_key_until_the_key_itself_is_proven_dead(pool, upstream, mongo_db):
    unknown = {"status": 401, "body": {"error": {"message": "Something unrecognised went wrong",
                                                 "type": "auth_error", "param": None, "code": "401"}}}
    upstream.script(unknown)  # a one-shot refusal in no LiteLLM template: the key itself is fine
    r = requests.post(pool.url + "/chat/completions", json=chat(), headers={"x-litellm-session-id": "two"},
                      timeout=20)
    assert r.status_code == 401 and "unrecognised" in r.text  # passed through after the probe said the key is fine
    pool.out.wait_for(r"🔎 \[OpenHands/Verify\] key \w+: key_dead \(a 401/403 in no LiteLLM template\) NOT confirmed",
                      timeout=10)
    statuses = {k: v["status"] for k, v in pool.keys().items()}
    assert set(statuses.values()) == {"healthy"}, statuses
    used = next(q.credential for q in upstream.requests if q.path.startswith("/chat"))
    bound = next(i for i, k in KEYS.items() if k == used)
    # a key that is really dead: LiteLLM's blocked-key answer, on every route (GET /v1/models too)
    upstream.set_key_fault(KEYS[bound], 401, {"error": {
        "message": "Authentication Error, Key is blocked. Update via `/key/unblock` if you're admin.",
        "type": "auth_error", "param": None, "code": "401"}})
    r = requests.post(pool.url + "/chat/completions", json=chat(), headers={"x-litellm-session-id": "two"},
                      timeout=20)
    assert r.status_code == 200, r.text  # retried on another key
    assert pool.keys()[bound]["status"] == "invalid"
