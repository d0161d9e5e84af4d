"""The admin API handler (`AdminApi.handle`) against a real Pool on the in-memory store.

Every route answers what the README documents; bad input gets a 4xx JSON error that says what is
wrong and changes nothing; answers are strict JSON (no NaN/Infinity) and never show a full key.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import pytest

from addon.core.dashboard import render_dashboard
from addon.operator.admin_api import ROUTES, AdminApi
from addon.pool.pool import Pool
from addon.store.mongo import new_key_doc, utcnow
from tests.memory_store import MemoryStore, make_writer

K1 = "sk-admin-k1-0123456789abcdef"
B1 = "sk-admin-b1-0123456789abcdef"
STATS = {"running": False, "threshold": 9.95, "keys_monitored": 0, "tiers": [], "key_stats": []}


class Api:
    def __init__(self, tmp: Path, *, dashboard: bool = True) -> None:
        self.store = MemoryStore()
        self.writer = make_writer(self.store, tmp / "journal.jsonl")
        self.writer.start()
        self.pool = Pool(self.store, self.writer, threshold=lambda: 9.95, default_budget=lambda: 10.0)
        self.pool.sync()
        self.changes: list[str] = []
        render = (lambda summary, history, stats, keys: render_dashboard(summary, history, stats, keys, now=0.0)) \
            if dashboard else None
        self.api = AdminApi(self.pool, threshold=lambda: 9.95, stats=lambda: dict(STATS), dashboard=render,
                            on_change=self.changes.append)

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        raw = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        status, answer = self.api.handle(method, path, raw)
        if not isinstance(answer, str):
            json.dumps(answer, allow_nan=False)  # strict JSON: a client's parser must accept it
        return status, answer

    def state(self) -> Any:
        """Everything an admin call could change, as the database holds it."""
        assert self.writer.flush(10)
        snap = self.store.snapshot()
        return (sorted(snap.keys, key=lambda d: d["_id"]), sorted(snap.bindings, key=lambda b: b["clientId"]),
                self.store.list_backups(), self.store.list_history(1000, None))


@pytest.fixture
def api(tmp_path) -> Iterator[Api]:
    a = Api(tmp_path)
    yield a
    a.writer.stop()


def seed(a: Api) -> None:
    """Two keys (one bound client), one backup and one history row."""
    assert a.pool.add_key("k1", K1, None)
    assert a.pool.add_key("k2", "sk-admin-k2-0123456789abcdef", 20.0)
    a.pool.bind("conv", "k1")
    a.store.insert_backup("b1", B1)
    a.store.insert_history({"keyId": "k1", "apiKeyMasked": "sk-admin...cdef", "spend": 1.0, "threshold": 9.95,
                            "checkedAt": utcnow(), "wasActive": True, "rotatedAt": None, "rotationReason": None,
                            "newKeyId": None})
    a.pool.sync()
    a.changes.clear()


def error_message(answer: Any) -> str:
    assert isinstance(answer, dict) and isinstance(answer.get("error"), dict), answer
    return answer["error"]["message"]


# -- keys -------------------------------------------------------------------------------------------
def test_list_keys_shows_masked_keys_spend_and_stats(api):
    seed(api)
    api.pool.record_usage("k1", 2.5, 100)
    status, body = api.call("GET", "/admin/openhands/keys")
    assert status == 200
    keys = {k["id"]: k for k in body["keys"]}
    assert keys["k1"]["apiKey"] == "sk-admin...cdef" and K1 not in json.dumps(body)
    assert keys["k1"]["spendEstimate"] == 2.5 and keys["k1"]["spendPercentage"] == 25.0
    assert keys["k2"]["budgetLimit"] == 20.0
    assert body["stats"] | {} == body["stats"] and body["stats"]["totalKeys"] == 2
    assert body["stats"]["healthyKeys"] == 2 and body["stats"]["backupKeysAvailable"] == 1


@pytest.mark.parametrize("payload,budget", [({"id": "k9", "apiKey": K1}, 10.0),
                                            ({"id": "k9", "apiKey": K1, "budgetLimit": 25}, 25.0)])
def test_add_key_is_healthy_with_zero_counters(api, payload, budget):
    status, body = api.call("POST", "/admin/openhands/keys", payload)
    assert status == 201 and body["key"]["id"] == "k9" and body["key"]["apiKey"] == "sk-admin...cdef"
    doc = api.store.get_key("k9")
    assert (doc["status"], doc["spendEstimate"], doc["requestsCount"], doc["budgetLimit"]) == \
        ("healthy", 0.0, 0, budget)
    assert api.pool.choose("new-client").key.id == "k9"  # in service at once
    assert api.changes == ["added key k9"]


def test_delete_key_removes_it_and_its_bindings(api):
    seed(api)
    status, body = api.call("DELETE", "/admin/openhands/keys/k1")
    assert (status, body) == (200, {"deleted": "k1"})
    assert api.store.get_key("k1") is None and api.store.bindings_of("k1") == []
    assert api.pool.choose("conv").key.id == "k2"


def test_reset_makes_a_spent_key_healthy_with_zero_spend(api):
    seed(api)
    api.pool.record_usage("k1", 9.99, 100)
    api.pool.retire("k1", "exhausted", "budget exceeded", spend=10.01)
    status, body = api.call("POST", "/admin/openhands/keys/k1/reset")
    assert status == 200 and body["key"]["status"] == "healthy" and body["key"]["spendEstimate"] == 0.0
    assert body["key"]["lastError"] is None and body["key"]["requestsCount"] == 0
    doc = api.store.get_key("k1")
    assert (doc["status"], doc["spendEstimate"], doc["totalSpend"]) == ("healthy", 0.0, 0.0)


@pytest.mark.parametrize("route,field,value", [("budget", "budgetLimit", 50.0), ("spend", "spendEstimate", 9.97),
                                               ("spend", "spendEstimate", 0)])
def test_patch_budget_and_spend(api, route, field, value):
    seed(api)
    status, body = api.call("PATCH", f"/admin/openhands/keys/k1/{route}", {field: value})
    assert status == 200 and body["key"][field] == value
    assert api.store.get_key("k1")[field] == value


def test_setting_spend_past_the_rotation_point_moves_new_clients_elsewhere(api):
    seed(api)
    assert api.call("PATCH", "/admin/openhands/keys/k1/spend", {"spendEstimate": 9.96})[0] == 200
    assert api.pool.choose("conv").rotate_from.id == "k1"


# -- backups ----------------------------------------------------------------------------------------
def test_backups_add_list_and_delete(api):
    status, body = api.call("POST", "/admin/openhands/backup-keys", {"id": "b7", "apiKey": B1})
    assert status == 201 and body["backupKey"] == {"id": "b7", "apiKey": "sk-admin...cdef", "isUsed": False}
    status, body = api.call("GET", "/admin/openhands/backup-keys")
    assert status == 200 and [b["id"] for b in body["backupKeys"]] == ["b7"]
    assert body["stats"] == {"total": 1, "available": 1} and B1 not in json.dumps(body)
    assert api.pool.backups_unused == 1
    assert api.call("DELETE", "/admin/openhands/backup-keys/b7") == (200, {"deleted": "b7"})
    assert api.store.list_backups() == [] and api.pool.backups_unused == 0


def test_a_claimed_backup_shows_what_it_replaced(api):
    seed(api)
    api.pool.rotate("k1", error="budget")
    api.pool.rotate("k2", error="budget")
    _, body = api.call("GET", "/admin/openhands/backup-keys")
    [row] = body["backupKeys"]
    assert row["isUsed"] is True and row["usedFor"] == "k2" and row["usedAt"].endswith("Z")


# -- spend ------------------------------------------------------------------------------------------
def test_spend_summary_totals(api):
    seed(api)
    api.pool.record_usage("k1", 4.0, 10)
    api.pool.record_polled_spend("k2", 5.0, 1_760_000_000.0)
    status, body = api.call("GET", "/admin/openhands/spend-summary")
    assert status == 200
    assert (body["totalKeys"], body["healthyKeys"], body["totalBudget"], body["totalSpend"]) == (2, 2, 30.0, 9.0)
    assert body["remainingBudget"] == 21.0 and body["backupKeys"] == {"available": 1, "total": 1}
    rows = {r["id"]: r for r in body["keys"]}
    assert rows["k2"]["effectiveSpend"] == 5.0 and rows["k2"]["remaining"] == 15.0
    assert rows["k2"]["lastSpendCheck"] == "2025-10-09T08:53:20Z"


def test_spend_history_filters_and_limits(api):
    seed(api)
    for i in range(3):
        api.store.insert_history({"keyId": "k2", "spend": float(i), "checkedAt": utcnow(), "rotatedAt": None})
    status, body = api.call("GET", "/admin/openhands/spend-history?limit=2&keyId=k2")
    assert status == 200 and body["count"] == 2 and {r["keyId"] for r in body["history"]} == {"k2"}
    assert all(r["checkedAt"].endswith("Z") for r in body["history"])
    assert api.call("GET", "/admin/openhands/spend-history")[1]["count"] == 4


def test_spend_stats_and_dashboard(api, tmp_path):
    seed(api)
    assert api.call("GET", "/openhands/spend-stats") == (200, STATS)
    status, page = api.call("GET", "/admin/openhands/")
    assert status == 200 and isinstance(page, str) and "k1" in page and K1 not in page
    bare = Api(tmp_path / "bare", dashboard=False)
    try:
        assert bare.call("GET", "/admin/openhands")[0] == 404
    finally:
        bare.writer.stop()


# -- bad input: a clear 4xx, nothing changed --------------------------------------------------------
BAD = [
    # (method, path, body, status, words in the message)
    ("POST", "/admin/openhands/keys", None, 400, "JSON object"),
    ("POST", "/admin/openhands/keys", b"{not json", 400, "not valid JSON"),
    ("POST", "/admin/openhands/keys", b"\xff\xfe\x00", 400, "JSON"),
    ("POST", "/admin/openhands/keys", [1, 2], 400, "JSON object"),
    ("POST", "/admin/openhands/keys", {"apiKey": K1}, 400, "'id'"),
    ("POST", "/admin/openhands/keys", {"id": 7, "apiKey": K1}, 400, "'id'"),
    ("POST", "/admin/openhands/keys", {"id": "../x", "apiKey": K1}, 400, "'id'"),
    ("POST", "/admin/openhands/keys", {"id": "k9"}, 400, "'apiKey'"),
    ("POST", "/admin/openhands/keys", {"id": "k9", "apiKey": "has space"}, 400, "'apiKey'"),
    ("POST", "/admin/openhands/keys", {"id": "k9", "apiKey": K1, "budgetLimit": -1}, 400, "budgetLimit"),
    ("POST", "/admin/openhands/keys", {"id": "k9", "apiKey": K1, "budgetLimit": 0}, 400, "budgetLimit"),
    ("POST", "/admin/openhands/keys", {"id": "k9", "apiKey": K1, "budgetLimit": "10"}, 400, "budgetLimit"),
    ("POST", "/admin/openhands/keys", {"id": "k9", "apiKey": K1, "budgetLimit": True}, 400, "budgetLimit"),
    ("POST", "/admin/openhands/keys", b'{"id":"k9","apiKey":"sk-x-0123456789","budgetLimit":NaN}', 400, "NaN"),
    ("POST", "/admin/openhands/keys", b'{"id":"k9","apiKey":"sk-x-0123456789","budgetLimit":1e999}', 400, "finite"),
    ("POST", "/admin/openhands/keys", {"id": "k9", "apiKey": K1, "status": "healthy"}, 400, "unknown field"),
    ("POST", "/admin/openhands/keys", {"id": "k1", "apiKey": K1}, 409, "already exists"),
    ("POST", "/admin/openhands/keys", {"id": "b1", "apiKey": K1}, 409, "backup"),
    ("POST", "/admin/openhands/keys", b"{" + b" " * 70_000 + b"}", 413, "too large"),
    ("DELETE", "/admin/openhands/keys/ghost", None, 404, "ghost"),
    ("POST", "/admin/openhands/keys/ghost/reset", None, 404, "ghost"),
    ("POST", "/admin/openhands/keys/k1/reset", {"spendEstimate": 0}, 400, "unknown field"),
    ("PATCH", "/admin/openhands/keys/k1/budget", {}, 400, "budgetLimit"),
    ("PATCH", "/admin/openhands/keys/k1/budget", {"budgetLimit": 1e7}, 400, "at most"),
    ("PATCH", "/admin/openhands/keys/k1/spend", {"spendEstimate": -0.5}, 400, "spendEstimate"),
    ("PATCH", "/admin/openhands/keys/ghost/budget", {"budgetLimit": 5}, 404, "ghost"),
    ("POST", "/admin/openhands/backup-keys", {"id": "b1", "apiKey": B1}, 409, "already exists"),
    ("POST", "/admin/openhands/backup-keys", {"id": "k1", "apiKey": B1}, 409, "active key"),
    ("POST", "/admin/openhands/backup-keys", {"id": "b9", "apiKey": B1, "isUsed": True}, 400, "unknown field"),
    ("DELETE", "/admin/openhands/backup-keys/ghost", None, 404, "ghost"),
    ("GET", "/admin/openhands/spend-history?limit=0", None, 400, "limit"),
    ("GET", "/admin/openhands/spend-history?limit=abc", None, 400, "limit"),
    ("GET", "/admin/openhands/spend-history?limit=5000", None, 400, "limit"),
    ("GET", "/admin/openhands/spend-history?keyId=../k1", None, 400, "keyId"),
    ("GET", "/admin/openhands/nothing-here", None, 404, "no admin endpoint"),
    ("PUT", "/admin/openhands/keys", None, 405, "GET, POST"),
    ("DELETE", "/admin/openhands/keys", None, 405, "not allowed"),
    ("GET", "/admin/openhands/keys/k1", None, 405, "DELETE"),
    ("DELETE", "/admin/openhands/keys/%6b1", None, 400, "encoded"),
    ("DELETE", "/admin/openhands/keys/k1/../k2", None, 400, "dot segments"),
    ("DELETE", "/admin/openhands/keys//k1", None, 400, "empty"),
]


@pytest.mark.parametrize("method,path,body,status,words", BAD, ids=[f"{m} {p} {s}" for m, p, _, s, _ in BAD])
def test_bad_input_gets_a_clear_4xx_and_changes_nothing(api, method, path, body, status, words):
    seed(api)
    before = api.state()
    got, answer = api.call(method, path, body)
    assert got == status, answer
    assert words.lower() in error_message(answer).lower()
    assert api.state() == before and api.changes == []


HOSTILE = [
    ("POST", "/admin/openhands/keys", b"[" * 60_000),  # nesting deep enough to exhaust the parser's stack
    ("POST", "/admin/openhands/keys", b'{"id":"k9","apiKey":"sk-x-0123456789","budgetLimit":' + b"9" * 5000 + b"}"),
    ("PATCH", "/admin/openhands/keys/k1/spend", b'{"spendEstimate": 1' + b"0" * 400 + b"}"),  # int > any float
    ("POST", "/admin/openhands/keys", '{"id":"k\u00e9","apiKey":"sk-\u0000"}'.encode()),
    ("POST", "/admin/openhands/keys", b'{"id":"k9","apiKey":"sk-x-0123456789","id":"k10"}'),
    ("GET", "/admin/openhands/spend-history?limit=" + "9" * 400, None),
    ("GET", "/admin/openhands/spend-history?keyId=" + "k" * 5000, None),
    ("DELETE", "/admin/openhands/keys/" + "k" * 5000, None),
    ("GET", "/admin/openhands/" + "a/" * 2000, None),
]


@pytest.mark.parametrize("method,path,body", HOSTILE, ids=[f"hostile-{i}" for i in range(len(HOSTILE))])
def test_hostile_input_never_gets_a_500(api, method, path, body):
    seed(api)
    before = api.state()
    try:
        status, answer = api.call(method, path, body)
    except Exception as e:  # an exception out of the handler becomes the hook's 500
        pytest.fail(f"handler raised {e.__class__.__name__}")
    assert status < 500, answer
    if status >= 400:
        error_message(answer)
        assert api.state() == before


# -- answers are strict JSON --------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/admin/openhands/keys", "/admin/openhands/spend-summary"])
def test_a_corrupt_stored_number_does_not_break_the_answers(api, path):
    """A hand-edited document (NaN or infinite spend) still gives clients JSON they can parse."""
    api.store.insert_key({**new_key_doc("odd", K1, 10.0, utcnow()), "spendEstimate": math.nan,
                          "totalSpend": math.inf})
    api.pool.sync()
    status, body = api.call("GET", path)  # `call` asserts json.dumps(allow_nan=False) works
    assert status == 200


# -- database unavailable: admin changes answer 503 and change nothing ---------------------------------
@pytest.mark.parametrize("method,path,body", [
    ("POST", "/admin/openhands/keys", {"id": "k9", "apiKey": K1}),
    ("DELETE", "/admin/openhands/keys/k2", None),
    ("POST", "/admin/openhands/backup-keys", {"id": "b9", "apiKey": B1}),
    ("PATCH", "/admin/openhands/keys/k1/budget", {"budgetLimit": 30}),
])
def test_with_the_database_down_changes_answer_503(api, method, path, body):
    seed(api)
    before = api.state()
    api.store.down = True
    status, answer = api.call(method, path, body)
    assert status == 503 and "database unavailable" in error_message(answer)
    assert api.call("GET", "/admin/openhands/keys")[0] == 200  # reads are served from memory
    api.store.down = False
    assert api.state() == before


# -- every route, garbage in: never a 500, never a traceback, strict JSON out ------------------------
@pytest.mark.parametrize("method,pattern,name", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
@pytest.mark.parametrize("body", [b"\x00\xff garbage", b'{"id": {"$gt": ""}, "apiKey": ["x"]}', b"1e999"])
def test_every_route_survives_garbage(api, method, pattern, name, body):
    seed(api)
    before = api.state()
    status, answer = api.call(method, pattern.replace("{id}", "k1") + "?limit=%00&keyId=%24ne", body)
    assert status < 500, (status, answer)
    if status >= 400:
        error_message(answer)
        assert api.state() == before


@pytest.mark.parametrize("value", ["k1\n", "0\n", "k1\r\n", "\nk1"])
def test_an_id_with_a_newline_is_refused(value) -> None:
    from addon.operator.admin_api import ApiError, require_id
    with pytest.raises(ApiError) as e:
        require_id({"id": value})
    assert e.value.status == 400
