"""End to end: real mitmdump + addon, real SecantusDB, fake upstream, over loopback (issue: foundation)."""
from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest
import requests

from tests.harness import eventually

pytestmark = pytest.mark.e2e

POOL_KEY = "sk-pool-0123456789abcdef"
CLIENT_KEY = "sk-client-never-upstream-42"
CHAT = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}


def forwarded(upstream) -> list:
    """What reached the upstream on a client's behalf: all but the sidecar's own price refresh
    (`GET /v1/model/info`, sent in the background once a healthy key exists). Admin paths never count as
    the sidecar's own, so an admin request forwarded upstream always shows up here."""
    return [q for q in upstream.requests if not (q.method == "GET" and q.path == "/v1/model/info")]


@pytest.mark.parametrize("header,value", [
    ("authorization", f"Bearer {CLIENT_KEY}"),
    ("x-api-key", CLIENT_KEY),
    ("x-litellm-api-key", CLIENT_KEY),
    (None, None),
])
def test_reverse_mode_upstream_sees_pool_key_never_client_key(sidecar, upstream, header, value):
    upstream.add_key(POOL_KEY)
    sidecar.add_key("k1", POOL_KEY)
    headers = {header: value} if header else {}
    r = requests.post(sidecar.url + "/chat/completions", json=CHAT, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    seen = upstream.requests[-1]
    assert seen.credential == POOL_KEY
    assert seen.header_used == (header or "x-litellm-api-key")
    assert CLIENT_KEY not in json.dumps(seen.headers)


def test_regular_mode_swaps_pooled_host_and_leaves_other_hosts_untouched(sidecar_factory, upstream):
    other = type(upstream)()  # a second server that is NOT the upstream
    other.start()
    try:
        upstream.add_key(POOL_KEY)
        other.add_key(CLIENT_KEY)
        sc = sidecar_factory(mode="regular")
        # In regular mode the admin API answers for requests addressed to the upstream host.
        r = requests.post(upstream.url + "/admin/openhands/keys", json={"id": "k1", "apiKey": POOL_KEY},
                          proxies=sc.proxies, timeout=10)
        assert r.status_code == 201, r.text
        r = requests.post(upstream.url + "/v1/messages", json={"model": "claude-sonnet-4-5", "max_tokens": 5,
                                                               "messages": []},
                          headers={"x-api-key": CLIENT_KEY}, proxies=sc.proxies, timeout=10)
        assert r.status_code == 200, r.text
        assert upstream.requests[-1].credential == POOL_KEY
        body = json.dumps({"model": "x", "messages": [], "weird": "\u00e9"}).encode()
        r = requests.post(other.url + "/chat/completions", data=body,
                          headers={"authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json",
                                   "x-custom": "kept"}, proxies=sc.proxies, timeout=10)
        assert r.status_code == 200
        seen = other.requests[-1]
        assert seen.credential == CLIENT_KEY and seen.body == body
        assert seen.headers["x-custom"] in ("kept", ["kept"])
        assert seen.headers.get("accept-encoding") not in ("identity", ["identity"])
        # the other host's admin-looking path is NOT answered locally
        r = requests.get(other.url + "/admin/openhands/keys", proxies=sc.proxies, timeout=10)
        assert r.status_code == 404
    finally:
        other.stop()


def test_sessions_keep_stable_bindings(sidecar, upstream, mongo_db):
    for i in range(3):
        upstream.add_key(f"{POOL_KEY}{i}")
        sidecar.add_key(f"k{i}", f"{POOL_KEY}{i}")
    used: dict[str, set[str]] = {"conv-a": set(), "conv-b": set()}
    for _ in range(4):
        for conv in used:
            r = requests.post(sidecar.url + "/chat/completions", json=CHAT,
                              headers={"x-litellm-session-id": conv, "authorization": "Bearer same-client"},
                              timeout=10)
            assert r.status_code == 200
            used[conv].add(upstream.requests[-1].credential)
    assert all(len(keys) == 1 for keys in used.values()), used
    assert used["conv-a"] != used["conv-b"]  # spread over keys
    requests.get(sidecar.url + "/admin/openhands/keys", timeout=10)
    eventually(lambda: mongo_db.openhands_bindings.count_documents({}) >= 2)  # written behind
    rows = {b["clientId"]: b["openhandsKeyId"] for b in mongo_db.openhands_bindings.find()}
    assert set(rows) == {"session:conv-a", "session:conv-b"}
    assert all(b["isActive"] for b in mongo_db.openhands_bindings.find())


def test_client_allowlist_rejects_unlisted_keys_with_401(sidecar_factory, upstream):
    upstream.add_key(POOL_KEY)
    sc = sidecar_factory(env={"OPENHANDS_CLIENT_KEYS": "allowed-1,allowed-2"})
    sc.add_key("k1", POOL_KEY)
    r = requests.post(sc.url + "/chat/completions", json=CHAT, headers={"authorization": "Bearer intruder"}, timeout=10)
    assert r.status_code == 401
    assert upstream.requests == []
    r = requests.post(sc.url + "/chat/completions", json=CHAT, headers={"authorization": "Bearer allowed-2"},
                      timeout=10)
    assert r.status_code == 200
    assert upstream.requests[-1].credential == POOL_KEY


def test_no_usable_key_answers_429_with_retry_after(sidecar, upstream):
    r = requests.post(sidecar.url + "/chat/completions", json=CHAT, timeout=10)
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) > 0
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert forwarded(upstream) == []


def test_admin_happy_paths(sidecar, upstream):
    assert sidecar.admin("POST", "/admin/openhands/keys", {"id": "k1", "apiKey": POOL_KEY}).status_code == 201
    r = sidecar.admin("POST", "/admin/openhands/keys", {"id": "k2", "apiKey": POOL_KEY + "x", "budgetLimit": 50})
    assert r.status_code == 201 and r.json()["key"]["budgetLimit"] == 50
    listing = sidecar.admin("GET", "/admin/openhands/keys").json()
    assert listing["stats"]["totalKeys"] == 2 and listing["stats"]["healthyKeys"] == 2
    k1 = {k["id"]: k for k in listing["keys"]}["k1"]
    assert k1["apiKey"] == "sk-pool-...cdef" and POOL_KEY not in json.dumps(listing)
    assert (k1["status"], k1["spendEstimate"], k1["budgetLimit"], k1["requestsCount"]) == ("healthy", 0, 10.0, 0)
    r = sidecar.admin("PATCH", "/admin/openhands/keys/k1/budget", {"budgetLimit": 25})
    assert r.json()["key"]["budgetLimit"] == 25
    r = sidecar.admin("PATCH", "/admin/openhands/keys/k1/spend", {"spendEstimate": 3.5})
    assert r.json()["key"]["spendEstimate"] == 3.5 and r.json()["key"]["spendPercentage"] == 14.0
    r = sidecar.admin("POST", "/admin/openhands/keys/k1/reset")
    assert r.status_code == 200 and r.json()["key"]["spendEstimate"] == 0
    r = sidecar.admin("POST", "/admin/openhands/backup-keys", {"id": "b1", "apiKey": "sk-backup-1234567890"})
    assert r.status_code == 201
    backups = sidecar.admin("GET", "/admin/openhands/backup-keys").json()
    assert backups["stats"] == {"total": 1, "available": 1} and backups["backupKeys"][0]["apiKey"] == "sk-backu...7890"
    assert sidecar.admin("DELETE", "/admin/openhands/backup-keys/b1").status_code == 200
    assert sidecar.admin("DELETE", "/admin/openhands/keys/k2").status_code == 200
    assert set(sidecar.keys()) == {"k1"}
    summary = sidecar.admin("GET", "/admin/openhands/spend-summary").json()
    assert summary["totalKeys"] == 1 and summary["keys"][0]["id"] == "k1"
    assert sidecar.admin("GET", "/admin/openhands/spend-history?limit=5").json() == {"history": [], "count": 0}
    stats = sidecar.admin("GET", "/openhands/spend-stats").json()
    assert {"running", "threshold", "keys_monitored", "tiers", "key_stats"} <= set(stats)
    assert forwarded(upstream) == []  # nothing admin ever reaches the upstream


BAD_ADMIN = [
    ("POST", "/admin/openhands/keys", {"apiKey": "sk-x-123456789"}, 400, "id"),
    ("POST", "/admin/openhands/keys", {"id": "k9"}, 400, "apiKey"),
    ("POST", "/admin/openhands/keys", {"id": 5, "apiKey": "sk-x-123456789"}, 400, "id"),
    ("POST", "/admin/openhands/keys", {"id": "k9", "apiKey": "sk-x-123456789", "budgetLimit": -1}, 400, "budgetLimit"),
    ("POST", "/admin/openhands/keys", {"id": "k9", "apiKey": "sk-x-123456789", "budgetLimit": "10"}, 400,
     "budgetLimit"),
    ("POST", "/admin/openhands/keys", {"id": "k9", "apiKey": "sk-x-123456789", "budgetLimit": True}, 400,
     "budgetLimit"),
    ("POST", "/admin/openhands/keys", {"id": "k1", "apiKey": "sk-dup-123456789"}, 409, "exists"),
    ("POST", "/admin/openhands/keys", {"id": "../k1", "apiKey": "sk-x-123456789"}, 400, "id"),
    ("POST", "/admin/openhands/keys", {"id": "k9", "apiKey": "sk x"}, 400, "apiKey"),
    ("POST", "/admin/openhands/keys", {"id": "k9", "apiKey": "sk-x-123456789", "extra": 1}, 400, "unknown"),
    ("POST", "/admin/openhands/keys", [1, 2], 400, "object"),
    ("PATCH", "/admin/openhands/keys/k1/budget", {"budgetLimit": 0}, 400, "budgetLimit"),
    ("PATCH", "/admin/openhands/keys/k1/budget", {}, 400, "budgetLimit"),
    ("PATCH", "/admin/openhands/keys/nope/budget", {"budgetLimit": 5}, 404, "nope"),
    ("PATCH", "/admin/openhands/keys/k1/spend", {"spendEstimate": -0.5}, 400, "spendEstimate"),
    ("DELETE", "/admin/openhands/keys/nope", None, 404, "nope"),
    ("POST", "/admin/openhands/keys/nope/reset", None, 404, "nope"),
    ("DELETE", "/admin/openhands/backup-keys/nope", None, 404, "nope"),
    ("POST", "/admin/openhands/backup-keys", {"id": "k1", "apiKey": "sk-b-123456789"}, 409, "k1"),
    ("PUT", "/admin/openhands/keys", {"id": "k9", "apiKey": "sk-x-123456789"}, 405, "method"),
    ("POST", "/admin/openhands/spend-summary", {}, 405, "method"),
    ("GET", "/admin/openhands/keys/k1%2Fx/reset", None, 400, "path"),
    ("GET", "/admin/openhands/nothing-here", None, 404, "no admin endpoint"),
    ("GET", "/admin/openhands/spend-history?limit=0", None, 400, "limit"),
    ("GET", "/admin/openhands/spend-history?limit=abc", None, 400, "limit"),
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, mongo):
    """One sidecar for the many inputs that must change nothing (each case compares before/after)."""
    from tests.fake_upstream import FakeUpstream
    from tests.harness import Sidecar

    up = FakeUpstream()
    up.start()
    sc = Sidecar(tmp_path_factory.mktemp("shared"), up.url, mongo.uri, "oh_shared_admin").start()
    sc.add_key("k1", POOL_KEY)
    yield sc, up
    sc.stop()
    up.stop()


@pytest.mark.parametrize("method,path,body,status,mentions", BAD_ADMIN)
def test_admin_bad_input_is_4xx_and_changes_nothing(shared, method, path, body, status, mentions):
    sidecar, upstream = shared
    before = sidecar.keys()
    before_backups = sidecar.admin("GET", "/admin/openhands/backup-keys").json()
    r = sidecar.admin(method, path, body)
    assert r.status_code == status, r.text
    assert mentions.lower() in r.json()["error"]["message"].lower()
    assert sidecar.keys() == before
    assert sidecar.admin("GET", "/admin/openhands/backup-keys").json() == before_backups
    assert forwarded(upstream) == []


@pytest.mark.parametrize("raw", [b"{not json", b"NaN", b'{"id":"k9","apiKey":"sk-x-123456789","budgetLimit":NaN}',
                                 b'{"id":"k9","apiKey":"sk-x-123456789","budgetLimit":Infinity}',
                                 b'{"id":"k9","apiKey":"sk-x-123456789","budgetLimit":1e999}',
                                 b"\xff\xfe\x00garbage", b"{" + b'"a":"' + b"x" * 70000 + b'"}'])
def test_admin_rejects_malformed_and_oversized_bodies(shared, raw):
    sidecar, upstream = shared
    before = sidecar.keys()
    r = sidecar.admin("POST", "/admin/openhands/keys", data=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500
    assert "error" in r.json()
    assert sidecar.keys() == before
    assert forwarded(upstream) == []


def test_admin_token_required_when_configured(sidecar_factory):
    sc = sidecar_factory(env={"OPENHANDS_ADMIN_TOKEN": "s3cret-admin-token"})
    assert sc.admin("GET", "/admin/openhands/keys").status_code == 401
    assert sc.admin("GET", "/admin/openhands/keys", token="wrong-token-123").status_code == 401
    assert sc.admin("GET", "/admin/openhands/keys", token="s3cret-admin-token").status_code == 200


def test_restart_keeps_keys_bindings_and_counters(sidecar_factory, upstream, db_name):
    upstream.add_key(POOL_KEY)
    sc = sidecar_factory()
    sc.add_key("k1", POOL_KEY, budget=20)
    for _ in range(3):
        assert requests.post(sc.url + "/chat/completions", json=CHAT,
                             headers={"x-litellm-session-id": "conv-1"}, timeout=10).status_code == 200
    before = sc.keys()["k1"]
    assert before["requestsCount"] == 3 and before["spendEstimate"] > 0
    assert sc.stop() == 0
    sc2 = sidecar_factory()
    after = sc2.keys()["k1"]
    for field in ("requestsCount", "tokensUsed", "budgetLimit", "status"):
        assert after[field] == before[field], field
    assert after["spendEstimate"] == pytest.approx(before["spendEstimate"], abs=1e-9)
    assert sc2.out.count(r"1 key\(s\) loaded") == 1
    r = requests.post(sc2.url + "/chat/completions", json=CHAT, headers={"x-litellm-session-id": "conv-1"}, timeout=10)
    assert r.status_code == 200
    assert sc2.keys()["k1"]["requestsCount"] == 4


def test_unreachable_mongodb_gives_one_clear_line(sidecar_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    sc = sidecar_factory(start=False, mongo_uri=f"mongodb://127.0.0.1:{dead_port}/?directConnection=true&serverSelectionTimeoutMS=500")
    sc.start(wait_ready=False)
    sc.out.wait_for(r"unreachable", timeout=30)
    sc.proc.wait(timeout=30)
    text = sc.out.text()
    assert "Traceback" not in text
    assert sc.out.count(r"❌ \[OpenHands\] MongoDB at mongodb://127\.0\.0\.1:\d+") == 1


def test_bad_option_value_stops_startup_naming_option_and_value(sidecar_factory):
    sc = sidecar_factory(start=False)
    sc.workdir.mkdir(parents=True)
    proc = subprocess.run(sc.command(), cwd=sc.workdir, env={**os.environ, "OPENHANDS_SPEND_THRESHOLD": "lots",
                                                             "OPENHANDS_DATA_DIR": str(sc.workdir / "data")},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "openhands_spend_threshold" in proc.stdout + proc.stderr and "lots" in proc.stdout + proc.stderr


def test_embedded_database_default_starts_persists_and_stops(sidecar_factory, upstream, tmp_path):
    """The README's run command uses the embedded database: it must start, keep data, and stop with us."""
    upstream.add_key(POOL_KEY)
    sc = sidecar_factory(mongo_uri="embedded")
    sc.out.wait_for(r"database embedded SecantusDB on 127\.0\.0\.1:\d+", timeout=60)
    state = json.loads((sc.workdir / "data" / "server.json").read_text())
    sc.add_key("k1", POOL_KEY)
    r = requests.post(sc.url + "/chat/completions", json=CHAT, timeout=10)
    assert r.status_code == 200 and upstream.requests[-1].credential == POOL_KEY
    assert sc.stop() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(state["pid"], 0)  # the child database stopped with the sidecar
    again = sidecar_factory(start=False, mongo_uri="embedded")
    again.workdir = sc.workdir  # same data directory
    again.start()
    assert again.keys()["k1"]["requestsCount"] == 1
