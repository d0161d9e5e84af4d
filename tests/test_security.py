"""Secrets (issue 6 §4): pool keys never appear in full in logs (even with mitmdump printing every header),
admin answers, history rows, flow comments or error bodies; the client's credential never reaches the
upstream; admin requests are never forwarded."""
from __future__ import annotations

import http.client
import json
import time

import pytest
import requests

pytestmark = pytest.mark.e2e

KEYS = {"k1": "sk-secret-pool-key-one-9f8e7d6c5b4a", "k2": "sk-secret-pool-key-two-1a2b3c4d5e6f",
        "k3": "sk-secret-pool-key-three-0a0b0c0d0e"}
BACKUP = ("bk1", "sk-secret-backup-key-55aa66bb77cc")
CLIENT = "sk-client-own-credential-777"
TOKEN = "admin-token-very-secret-123"
CHAT = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}


def raw(sc, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, bytes]:
    """http.client sends the path exactly as given (requests/urllib3 would normalise dot segments)."""
    conn = http.client.HTTPConnection("127.0.0.1", sc.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"authorization": f"Bearer {TOKEN}", **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_pool_keys_never_leak_and_client_credentials_never_reach_upstream(sidecar_factory, upstream, mongo_db):
    secrets = [*KEYS.values(), BACKUP[1]]
    for k in secrets:
        upstream.add_key(k)
    # flow_detail=3 makes mitmdump print every request header: the pool key must still not show
    sc = sidecar_factory(env={"OPENHANDS_ADMIN_TOKEN": TOKEN}, args=["--set", "flow_detail=3"])
    for key_id, api_key in KEYS.items():
        sc.add_key(key_id, api_key)
    sc.add_backup(*BACKUP)
    answers: list[str] = []
    hdrs = {"authorization": f"Bearer {CLIENT}", "x-litellm-session-id": "conv-sec"}
    # ordinary traffic, JSON and streamed
    for body in (CHAT, {**CHAT, "stream": True}):
        r = requests.post(sc.url + "/chat/completions", json=body, headers=hdrs, timeout=10)
        assert r.status_code == 200
        answers.append(r.text + json.dumps(dict(r.headers)))
    # budget error -> rotation -> retry; invalid key -> rotation; both with the key in the error text
    bound = upstream.requests[-1].credential
    upstream.set_spend(bound, 10.0)
    r = requests.post(sc.url + "/chat/completions", json=CHAT, headers=hdrs, timeout=10)
    assert r.status_code == 200
    answers.append(r.text + json.dumps(dict(r.headers)))
    now_bound = upstream.requests[-1].credential
    upstream.set_key_fault(now_bound, 401, {"error": {"message": f"Invalid key {now_bound}", "type": "auth_error"}})
    r = requests.post(sc.url + "/chat/completions", json=CHAT, headers=hdrs, timeout=10)
    answers.append(r.text + json.dumps(dict(r.headers)))
    # every key refused -> the client gets the sidecar's 429, with no key in it
    for k in secrets:
        upstream.set_key_fault(k, 401, {"error": {"message": f"Invalid key {k}", "type": "auth_error"}})
    r = requests.post(sc.url + "/chat/completions", json=CHAT, headers={**hdrs, "x-litellm-session-id": "c2"},
                      timeout=10)
    answers.append(r.text + json.dumps(dict(r.headers)))
    # admin answers
    for path in ("/admin/openhands/keys", "/admin/openhands/backup-keys", "/admin/openhands/spend-summary",
                 "/admin/openhands/spend-history?limit=100", "/openhands/spend-stats", "/admin/openhands"):
        r = sc.admin("GET", path, token=TOKEN)
        assert r.status_code == 200, (path, r.text)
        answers.append(r.text)
    r = sc.admin("POST", "/admin/openhands/keys", {"id": "k1", "apiKey": KEYS["k1"]}, token=TOKEN)
    answers.append(r.text)  # 409 must not echo the key
    r = sc.admin("POST", "/admin/openhands/keys", {"id": "k9", "apiKey": "sk-secret-new-key-0000000000ff"},
                 token=TOKEN)
    assert r.status_code == 201 and "sk-secret-new-key-0000000000ff" not in r.text

    # the upstream never saw the client's credential, nor any admin request
    assert upstream.requests
    for seen in upstream.requests:
        assert CLIENT not in json.dumps(seen.headers) and seen.credential in secrets
        assert not seen.path.startswith(("/admin", "/openhands"))
    for text in answers:
        for k in secrets:
            assert k not in text, k
        assert TOKEN not in text
    # history rows (written by rotations or the spend checker) carry masked keys only
    rows = list(mongo_db.openhands_key_spend_history.find())
    for k in secrets:
        assert k not in json.dumps(rows, default=str)
    time.sleep(0.5)
    assert sc.stop() == 0
    log = sc.out.text()
    assert "sk-secret-pool-key-one" in log or "k1" in log  # the output is there at all
    for k in secrets:
        assert k not in log, f"pool key {k[:12]}... printed in full by mitmdump or the addon"
    assert TOKEN not in log
    assert "hook failed" not in log and "addon/" not in "".join(ln for ln in log.splitlines()
                                                                     if ln.startswith("  File"))


ADMIN_EXTRA = [
    # (method, raw path, body, expected status)
    ("GET", "/admin/openhands/keys/../keys", b"", 400),
    ("GET", "/admin/openhands/%2e%2e/openhands/keys", b"", 400),
    ("DELETE", "/admin/openhands/keys/..%2Fk1", b"", 400),
    ("DELETE", "/admin/openhands/keys/k1/", b"", 404),
    ("GET", "/admin/openhands//keys", b"", 400),
    ("GET", "/admin/openhands/keys/./k1", b"", 400),
    ("DELETE", "/admin/openhands/keys", b"", 405),
    ("GET", "/admin/openhands/keys/k1/reset", b"", 405),
    ("PUT", "/admin/openhands/keys/k1/budget", b'{"budgetLimit":5}', 405),
    ("PATCH", "/admin/openhands/keys/k1/spend", b'{"spendEstimate":NaN}', 400),
    ("PATCH", "/admin/openhands/keys/k1/spend", b'{"spendEstimate":-Infinity}', 400),
    ("PATCH", "/admin/openhands/keys/k1/budget", b'{"budgetLimit":Infinity}', 400),
    ("PATCH", "/admin/openhands/keys/k1/budget", b'{"budgetLimit":1e309}', 400),
    ("PATCH", "/admin/openhands/keys/k1/budget", b'{"budgetLimit":[5]}', 400),
    ("PATCH", "/admin/openhands/keys/k1/budget", b'{"budgetLimit":null}', 400),
    ("PATCH", "/admin/openhands/keys/k1/spend", b'{"spendEstimate":"1"}', 400),
    ("PATCH", "/admin/openhands/keys/k1/spend", b'{"spendEstimate":1,"status":"healthy"}', 400),
    ("PATCH", "/admin/openhands/keys/k1/budget", b'{"budgetLimit":5' + b" " * 70000 + b"}", 413),
    ("POST", "/admin/openhands/keys/k1/reset", b'{"spendEstimate":0}', 400),
    ("POST", "/admin/openhands/keys", b'{"id":"k1","apiKey":"sk-other-1234567890"}', 409),
    ("POST", "/admin/openhands/keys", b'{"id":"bk1","apiKey":"sk-other-1234567890"}', 409),  # id of a backup
    ("POST", "/admin/openhands/backup-keys", b'{"id":"bk1","apiKey":"sk-other-1234567890"}', 409),
    ("POST", "/admin/openhands/backup-keys", b'{"id":"bk2","apiKey":5}', 400),
    ("POST", "/admin/openhands/keys", b'{"id":"k\\u0000x","apiKey":"sk-other-1234567890"}', 400),
    ("POST", "/admin/openhands/keys", b'{"id":"' + b"a" * 200 + b'","apiKey":"sk-other-1234567890"}', 400),
    ("GET", "/admin/openhands/spend-history?limit=10&keyId=../x", b"", 400),
    ("GET", "/admin/openhands/spend-history?limit=99999999999999999999", b"", 400),
    ("DELETE", "/admin/openhands/keys/unknown-id", b"", 404),
]


def test_admin_hostile_requests_change_nothing_and_never_reach_upstream(sidecar_factory, upstream, mongo_db):
    sc = sidecar_factory(env={"OPENHANDS_ADMIN_TOKEN": TOKEN})
    sc.add_key("k1", KEYS["k1"])
    sc.add_backup(*BACKUP)

    def state():
        return (sorted(map(str, mongo_db.openhands_keys.find({}, {"appliedOps": 0, "appliedRanges": 0}))),
                sorted(map(str, mongo_db.openhands_backup_keys.find())))

    before = state()
    failures = []
    for method, path, body, status in ADMIN_EXTRA:
        got, text = raw(sc, method, path, body, {"content-type": "application/json"})
        if got != status:
            failures.append((method, path[:60], got, text[:200]))
            continue
        err = json.loads(text)["error"]["message"]
        assert err and isinstance(err, str)
    assert not failures, failures
    # a wrong or missing token is refused before anything else, in the same way for every path
    for tok in ("", "admin-token-very-secret-12", "admin-token-very-secret-1234", TOKEN.upper()):
        got, _ = raw(sc, "DELETE", "/admin/openhands/keys/k1", b"", {"authorization": f"Bearer {tok}"})
        assert got == 401
    assert state() == before
    assert upstream.requests == []


# -- secure default (issue 16 §5), driven hook by hook: a remote peer cannot be made over loopback ----------
@pytest.fixture
def inproc(mongo, db_name, upstream, tmp_path, monkeypatch):
    from mitmproxy.test import taddons

    from tests.inproc import InProcess

    for var in ("OPENHANDS_ADMIN_TOKEN", "OPENHANDS_CLIENT_KEYS", "MONGODB_URI", "OPENHANDS_CONFIG",
                "OPENHANDS_OPEN_POOL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    oh = InProcess()
    with taddons.context(*oh.addons) as tctx:
        tctx.configure(oh.lifecycle, openhands_upstream=upstream.url, openhands_mongodb_uri=mongo.uri,
                       openhands_mongodb_db=db_name, openhands_data_dir=str(tmp_path / "data"),
                       openhands_spend_checker=False)
        oh.lifecycle._start()
        upstream.add_key(KEYS["k1"])
        assert oh.services.pool.add_key("k1", KEYS["k1"], None)
        oh.tctx = tctx
        yield oh
        oh.lifecycle.done()


def _flow(upstream, peer: str, path: str = "/chat/completions"):
    from mitmproxy import http as mhttp
    from mitmproxy.test import tflow, tutils

    req = tutils.treq(host="127.0.0.1", port=upstream.port, path=path.encode(), method=b"POST",
                      content=json.dumps(CHAT).encode(), headers=mhttp.Headers(authorization=f"Bearer {CLIENT}"))
    f = tflow.tflow(req=req)
    f.client_conn.peername = (peer, 50000)
    return f


@pytest.mark.parametrize("peer,open_pool,served", [
    ("127.0.0.1", False, True), ("::1", False, True), ("10.1.2.3", False, False), ("192.168.0.9", False, False),
    ("10.1.2.3", True, True),
])
def test_without_an_allowlist_only_loopback_clients_use_the_pool(inproc, upstream, peer, open_pool, served):
    import asyncio

    inproc.tctx.configure(inproc.lifecycle, openhands_open_pool=open_pool)
    f = _flow(upstream, peer)
    asyncio.run(inproc.request(f))
    if served:
        assert f.response is None and f.request.headers.get("authorization") == f"Bearer {KEYS['k1']}"
    else:
        assert f.response is not None and f.response.status_code == 403
        assert "OPENHANDS_CLIENT_KEYS" in f.response.get_text()
        assert KEYS["k1"] not in json.dumps(list(f.request.headers.items()))
    assert upstream.requests == []  # nothing sent by the hooks themselves
