"""Spend checker and spend lease, in process: injected clock, scripted HTTP, the real pool (issue 5).

The pool is the real `Pool` on the in-memory store (`RealPool`), so rotation, backup promotion and
calibration behave exactly as in the sidecar; only the upstream answers are scripted."""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import requests
from requests.structures import CaseInsensitiveDict

from addon.core import config
from addon.core.config import ConfigError, build_settings
from addon.pool.pool import KeyState, Pool, RotationResult
from addon.operator.spend_checker import (SpendChecker, build_spend_checker, check_line, parse_activity_page,
                                          rotation_line, MalformedActivity)
from addon.store.lease import SpendLease, read_lease
from addon.store.mongo import PoolStore, new_key_doc, to_datetime, utcnow
from addon.store.writer import StoreWriter
from addon.traffic.upstream_http import make_session
from tests.fake_upstream import _Event
from tests.memory_store import MemoryStore, make_writer

T0 = 1_760_000_000.0
UP = "http://upstream.test"
LOGGER = "addon.operator.spend_checker"


def settings(**over: Any) -> config.Settings:
    values = {o.name: o.default for o in config.OPTIONS}
    values.update({"openhands_upstream": UP, "openhands_mongodb_uri": "mongodb://127.0.0.1:1"})
    values.update(over)
    return build_settings(values, {})


# -- fakes ------------------------------------------------------------------------------------------
def key_doc(k: KeyState) -> dict:
    """The store document a KeyState stands for (the pool loads it back through `KeyState.from_doc`)."""
    doc = new_key_doc(k.id, k.api_key, k.budget_limit, utcnow())
    doc.update(status=k.status, spendEstimate=k.spend_estimate, totalSpend=k.total_spend,
               lastSpendCheck=to_datetime(k.last_spend_check), lastUsedAt=to_datetime(k.last_used_at))
    return doc


_WRITERS: list[StoreWriter] = []
_JOURNALS: list[Path] = []


@pytest.fixture(autouse=True)
def _pool_writers(tmp_path: Path):
    """Each test's pools write behind to the memory store; stopped when the test ends."""
    _JOURNALS[:] = [tmp_path]
    yield
    while _WRITERS:
        _WRITERS.pop().stop(flush_timeout=5)


class RealPool(Pool):
    """The real `Pool` on the in-memory store, recording the rotate/retire calls the checker makes."""

    def __init__(self, *keys: KeyState, threshold: float = 9.95) -> None:
        store = MemoryStore()
        for k in keys:
            assert store.insert_key(key_doc(k))
        writer = make_writer(store, _JOURNALS[0] / f"journal-{len(_WRITERS)}.jsonl")
        writer.start()
        _WRITERS.append(writer)
        super().__init__(store, writer, threshold=lambda: threshold, default_budget=lambda: 10.0)
        self.sync()
        self.rotations: list[dict] = []
        self.retired: list[tuple] = []

    def retire(self, key_id: str, status: str, error: str | None, spend: float | None = None,
               budget: float | None = None) -> bool:
        self.retired.append((key_id, status, error))
        return super().retire(key_id, status, error, spend, budget)

    def rotate(self, old_id: str, *, status: str = "exhausted", error: str | None = None, spend: float | None = None,
               budget: float | None = None, keep_if_stuck: bool = False, **kw: Any) -> RotationResult:
        self.rotations.append({"old": old_id, "error": error, "spend": spend, "budget": budget,
                               "keep_if_stuck": keep_if_stuck})
        return super().rotate(old_id, status=status, error=error, spend=spend, budget=budget,
                              keep_if_stuck=keep_if_stuck, **kw)


FakePool = RealPool  # the name the tests below were written with


class FakeWriter:
    def __init__(self) -> None:
        self.ops: list[dict] = []

    def submit(self, op: dict) -> None:
        self.ops.append(op)

    @property
    def history(self) -> list[dict]:
        return [op["row"] for op in self.ops if op["kind"] == "history"]


def response(status: int, body: Any, headers: dict | None = None) -> requests.Response:
    r = requests.Response()
    r.status_code = status
    r._content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r.headers = CaseInsensitiveDict(headers or {"content-type": "application/json"})
    r.encoding = "utf-8"
    return r


def page(spend: float, has_more: bool = False, n: int = 1) -> dict:
    return {"results": [], "metadata": {"total_spend": spend, "page": n, "has_more": has_more, "total_pages": n}}


class FakeSession:
    """Answers `get` with `handler(api_key, page)`; records every call."""

    def __init__(self, handler: Callable[[str, int], Any]) -> None:
        self.handler = handler
        self.calls: list[dict] = []

    def get(self, url: str, *, params: dict, headers: dict, timeout: Any, allow_redirects: bool) -> requests.Response:
        self.calls.append({"url": url, "params": dict(params), "headers": dict(headers), "timeout": timeout})
        out = self.handler(headers["x-litellm-api-key"], int(params["page"]))
        if isinstance(out, BaseException):
            raise out
        return out

    def keys_polled(self) -> list[str]:
        return [c["headers"]["x-litellm-api-key"] for c in self.calls]


def key(key_id: str, spend: float = 0.0, *, checked: float | None = None, used: float | None = None,
        budget: float = 10.0) -> KeyState:
    return KeyState(id=key_id, api_key=f"sk-{key_id}-0123456789abcdef", spend_estimate=spend, total_spend=spend,
                    budget_limit=budget, last_spend_check=checked, last_used_at=used)


def checker(pool: FakePool, handler: Callable[[str, int], Any], clock: list[float] | None = None,
            **over: Any) -> tuple[SpendChecker, FakeSession, FakeWriter]:
    sess, writer = FakeSession(handler), FakeWriter()
    clk = clock or [T0]
    s = settings(**over)
    c = SpendChecker(pool, writer, settings=lambda: s, session=lambda: sess, clock=lambda: clk[0],
                     retry_backoff_s=(0.0, 0.0))
    return c, sess, writer


def spend_of(pool: FakePool) -> Callable[[str, int], Any]:
    """Activity pages that report each key's current spend (so its tier does not change)."""
    by_key = {k.api_key: k for k in pool.keys.values()}
    return lambda api_key, n: response(200, page(by_key[api_key].spend_estimate))


# -- tier arithmetic through the checker's due logic ------------------------------------------------
@pytest.mark.parametrize("spend,interval", [(0.0, 300), (4.99, 300), (5.00, 120), (6.99, 120), (7.00, 10), (9.5, 10)])
def test_a_key_is_polled_exactly_when_its_tier_interval_has_passed(spend, interval):
    pool = FakePool(key("k", spend, checked=T0))
    c, sess, _ = checker(pool, spend_of(pool))
    assert c.tick(T0 + interval - 0.001) == [] and sess.calls == []
    [out] = c.tick(T0 + interval)
    assert out.key_id == "k" and out.spend == pytest.approx(spend)
    assert c.tick(T0 + interval + 0.5) == []  # just checked: not again until the next interval


@pytest.mark.parametrize("spend", [0.0, 4.99, 7.0])
def test_a_key_never_checked_is_due_at_once(spend):
    pool = FakePool(key("k", spend, checked=None))
    c, sess, _ = checker(pool, spend_of(pool))
    assert [o.key_id for o in c.tick(T0)] == ["k"]


def test_tier_follows_the_metered_estimate_when_it_is_ahead_of_the_polled_spend():
    k = key("k", 0.0, checked=T0)
    k.spend_estimate = 7.5  # metering saw $7.50, the lagging poll still says $0
    pool = FakePool(k)
    c, sess, _ = checker(pool, lambda a, n: response(200, page(0.0)))
    assert c.tick(T0 + 9.9) == []
    assert len(c.tick(T0 + 10)) == 1


def test_only_healthy_keys_are_polled_and_nearest_to_budget_first():
    a, b, ex = key("a", 1.0), key("b", 8.0), key("x", 2.0)
    ex.status = "exhausted"
    pool = FakePool(a, b, ex)
    c, sess, _ = checker(pool, spend_of(pool))
    assert [o.key_id for o in c.tick(T0)] == ["b", "a"]


def test_configured_tiers_are_used():
    pool = FakePool(key("k", 2.0, checked=T0))
    c, sess, _ = checker(pool, spend_of(pool), openhands_spend_check_tiers="0:1,5:0.5")
    assert c.tick(T0 + 0.99) == []
    assert len(c.tick(T0 + 1.0)) == 1


# -- the poll itself --------------------------------------------------------------------------------
def test_spend_is_the_sum_of_every_page_and_only_that_key_is_sent():
    pages = {1: page(0.5, True, 1), 2: page(0.25, True, 2), 3: page(0.125, False, 3)}
    pool = FakePool(key("k"), key("other"))
    c, sess, writer = checker(pool, lambda a, n: response(200, pages[n]) if "sk-k-" in a else response(200, page(0)))
    c.tick(T0)
    k_calls = [x for x in sess.calls if x["headers"]["x-litellm-api-key"] == pool.keys["k"].api_key]
    assert [x["params"]["page"] for x in k_calls] == [1, 2, 3]
    for x in k_calls:
        assert x["url"] == UP + "/user/daily/activity"
        assert x["params"] | {"page": 0} == {"start_date": "2020-01-01", "end_date": "2030-12-31", "page": 0,
                                             "page_size": 1000}
        assert set(h.lower() for h in x["headers"]) == {"x-litellm-api-key", "accept"}
        assert x["timeout"] == (10.0, 10.0)  # explicit connect and read timeouts
    assert pool.keys["k"].total_spend == pytest.approx(0.875)
    assert pool.keys["k"].last_spend_check == T0
    [row] = [r for r in writer.history if r["keyId"] == "k"]
    assert row["spend"] == pytest.approx(0.875) and row["checkedAt"] == T0 and row["rotatedAt"] is None
    assert row["apiKeyMasked"] == "sk-k-012...cdef"


def test_summed_spend_against_the_fake_upstream_with_paging_and_lag(upstream):
    api_key = "sk-paged-0123456789abcdef"
    upstream.add_key(api_key, spend=1.0)  # dated a day ago
    now = time.time()
    acct = upstream._accounts[api_key]
    acct.events.extend(_Event(now - 3600 - i, "gpt-5-codex", 0.001) for i in range(2500))
    acct.events.append(_Event(now, "gpt-5-codex", 5.0))  # newer than the batch-writer lag: not visible yet
    upstream.activity_lag_seconds = 60
    pool = FakePool(KeyState(id="k", api_key=api_key))
    s = settings(openhands_upstream=upstream.url)
    c = SpendChecker(pool, FakeWriter(), settings=lambda: s, session=lambda: make_session(), clock=time.time)
    [out] = c.tick(time.time())
    assert out.failure is None
    assert pool.keys["k"].total_spend == pytest.approx(1.0 + 2.5)
    assert upstream.activity_calls(api_key) == 3  # 2501 rows at 1000 a page


def test_parse_activity_page_rejects_what_is_not_a_spend_page():
    assert parse_activity_page(json.dumps(page(1.5, True))) == (1.5, True)
    assert parse_activity_page(b'{"metadata":{"total_spend":0}}') == (0.0, False)
    for bad in (b'{"results":[', b"[]", b'{"metadata":{"total_spend":"1"}}', b'{"metadata":{"total_spend":-1}}',
                b'{"metadata":{"total_spend":1,"has_more":"yes"}}', b'{"metadata":{"total_spend":NaN}}'):
        with pytest.raises(MalformedActivity):
            parse_activity_page(bad)


# -- failures -------------------------------------------------------------------------------------
def failures(caplog, key_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"Key {key_id} check failed" in r.getMessage()]


def test_5xx_and_connection_errors_are_retried_with_backoff(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    answers = {"k": [response(503, {"error": "busy"}), requests.ConnectionError("refused"), response(200, page(2.0))]}
    pool = FakePool(key("k"))
    c, sess, _ = checker(pool, lambda a, n: answers["k"].pop(0))
    [out] = c.tick(T0)
    assert out.spend == 2.0 and out.failure is None
    assert len(sess.calls) == 3 and failures(caplog, "k") == []


@pytest.mark.parametrize("answer,kind,calls", [
    (lambda: response(500, {"error": "x"}), "http_5xx", 3),
    (lambda: requests.ConnectionError("refused"), "connection", 3),
    (lambda: requests.ReadTimeout("slow"), "timeout", 1),  # not retried: it would hold the thread 3x
    (lambda: response(200, b'{"results":[{"date":'), "malformed", 1),
    (lambda: response(200, page(1e12)), "malformed", 1),  # a spend no $1 key can have: changes nothing
    (lambda: response(403, {"error": "route not allowed"}), "http_403", 1),
])
def test_a_failed_check_logs_once_keeps_the_others_polling_and_retries_later(caplog, answer, kind, calls):
    caplog.set_level(logging.INFO, LOGGER)
    pool = FakePool(key("bad", 1.0), key("good", 1.0))
    bad_key = pool.keys["bad"].api_key
    c, sess, writer = checker(pool, lambda a, n: answer() if a == bad_key else response(200, page(1.0)))
    outs = {o.key_id: o for o in c.tick(T0)}
    assert outs["bad"].failure == kind and outs["good"].spend == 1.0
    assert sess.keys_polled().count(bad_key) == calls
    assert len(failures(caplog, "bad")) == 1
    assert pool.keys["bad"].status == "healthy" and pool.keys["bad"].last_spend_check is None
    assert [r["keyId"] for r in writer.history] == ["good"]
    assert c.tick(T0 + 29) == []  # not hammered every tick
    assert [o.key_id for o in c.tick(T0 + 30)] == ["bad"]  # tried again after min(tier interval, 30 s)
    assert len(failures(caplog, "bad")) == 2
    assert bad_key not in caplog.text


def test_401_marks_the_key_invalid_and_the_others_keep_being_polled(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    pool = FakePool(key("dead"), key("live"))
    dead = pool.keys["dead"].api_key
    c, sess, _ = checker(pool, lambda a, n: response(401, {"error": {"message": "Invalid proxy server token",
                                                                      "type": "auth_error"}}) if a == dead
                         else response(200, page(0.3)))
    outs = {o.key_id: o for o in c.tick(T0)}
    assert outs["dead"].marked == "invalid" and pool.keys["dead"].status == "invalid"
    assert pool.retired[0][:2] == ("dead", "invalid")
    assert outs["live"].spend == 0.3
    assert len(failures(caplog, "dead")) == 1 and "marked invalid" in failures(caplog, "dead")[0]
    assert [o.key_id for o in c.tick(T0 + 300)] == ["live"]  # an invalid key is no longer polled


def test_a_budget_error_from_the_activity_endpoint_calibrates_and_rotates():
    pool = FakePool(key("k", 4.0), key("next", 0.0))
    k_api = pool.keys["k"].api_key
    body = {"error": {"message": "ExceededBudget: User=u1 over budget. Spend=10.02, Budget=10.0",
                      "type": "budget_exceeded", "param": None, "code": "400"}}
    c, sess, writer = checker(pool, lambda a, n: response(400, body) if a == k_api else response(200, page(0.0)))
    outs = {o.key_id: o for o in c.tick(T0)}
    assert outs["k"].rotated_to == "next" and outs["k"].marked == "exhausted"
    assert pool.rotations[0] == {"old": "k", "error": body["error"]["message"], "spend": 10.02, "budget": 10.0,
                                 "keep_if_stuck": False}
    assert pool.keys["k"].status == "exhausted" and pool.keys["k"].spend_estimate == 10.02
    [row] = [r for r in writer.history if r["keyId"] == "k"]
    assert row["rotationReason"] == "budget_exceeded_10.02" and row["newKeyId"] == "next" and row["rotatedAt"] == T0


# -- rotation at the rotation point ----------------------------------------------------------------
def test_crossing_the_rotation_point_rotates_logs_and_records_history(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    pool = FakePool(key("k", 9.0, checked=T0, used=T0 - 60), key("spare", 0.0, checked=T0))
    k_api = pool.keys["k"].api_key
    c, sess, writer = checker(pool, lambda a, n: response(200, page(9.96 if a == k_api else 0.0)))
    [out] = c.tick(T0 + 10)  # $9 is in the from-$7 tier: 10 s
    assert out.rotated_to == "spare"
    assert pool.rotations == [{"old": "k", "error": "proactive rotation at $9.96", "spend": None, "budget": None,
                               "keep_if_stuck": True}]
    msgs = [r.getMessage() for r in caplog.records]
    assert "💰 [OpenHands/SpendChecker] Key k ACTIVE: $9.96 / $9.95 (100.1%)" in msgs
    assert "🔄 [OpenHands/SpendChecker] Proactive rotation k -> spare (spend $9.96 >= $9.95)" in msgs
    [row] = writer.history
    assert row == {"keyId": "k", "apiKeyMasked": "sk-k-012...cdef", "spend": 9.96, "threshold": 9.95,
                   "checkedAt": T0 + 10, "wasActive": True, "rotatedAt": T0 + 10,
                   "rotationReason": "proactive_threshold_9.96", "newKeyId": "spare"}


def test_a_bigger_budget_keeps_the_same_margin():
    pool = FakePool(key("big", 49.90, budget=50.0), key("spare"))
    c, sess, writer = checker(pool, lambda a, n: response(200, page(49.90 if "big" in a else 0.0)))
    c.tick(T0)
    assert pool.rotations == []
    assert check_line("big", False, 49.90, 49.95) == "💰 [OpenHands/SpendChecker] Key big IDLE: $49.90 / $49.95 (99.9%)"
    pool.keys["big"].last_spend_check = T0 - 100
    c2, _, _ = checker(pool, lambda a, n: response(200, page(49.95 if "big" in a else 0.0)))
    c2.tick(T0 + 10)
    assert pool.rotations and pool.rotations[0]["old"] == "big"


def test_with_nowhere_to_go_the_key_stays_and_the_warning_is_not_repeated(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    pool = FakePool(key("only", 9.97))
    c, sess, writer = checker(pool, lambda a, n: response(200, page(9.97)))
    c.tick(T0)
    c.tick(T0 + 10)
    assert pool.keys["only"].status == "healthy" and len(pool.rotations) == 2
    assert sum("no backup or other usable key" in r.getMessage() for r in caplog.records) == 1
    assert [r["newKeyId"] for r in writer.history] == [None, None]


def test_log_lines_have_the_documented_shape():
    assert rotation_line("a", "b", 9.96, 9.95) == \
        "🔄 [OpenHands/SpendChecker] Proactive rotation a -> b (spend $9.96 >= $9.95)"


def test_a_key_whose_id_is_its_secret_is_masked_in_logs(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    secret = "sk-live-abcdefghijklmnop1234"
    pool = FakePool(KeyState(id=secret, api_key=secret))
    c, sess, writer = checker(pool, lambda a, n: response(500, {}))
    c.tick(T0)
    c2, _, _ = checker(pool, lambda a, n: response(200, page(1.0)))
    c2.tick(T0)
    assert caplog.records and secret not in caplog.text


# -- thread, stats, build ---------------------------------------------------------------------------
def test_the_thread_survives_every_exception_and_stops_cleanly(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    pool = FakePool(key("k"))
    boom = {"n": 0}
    real_list = pool.key_list

    def flaky_list():
        boom["n"] += 1
        if boom["n"] <= 2:
            raise RuntimeError("pool exploded")
        return real_list()

    pool.key_list = flaky_list  # type: ignore[method-assign]
    polled = threading.Event()

    def handler(a, n):
        polled.set()
        raise ValueError("not a requests error")  # a bug in the HTTP layer: still only this key's problem

    s = settings(openhands_spend_check_tick_seconds=0.05, openhands_spend_check_lease_seconds=1.0)
    c = SpendChecker(pool, FakeWriter(), settings=lambda: s, session=lambda: FakeSession(handler),
                     retry_backoff_s=(0.0, 0.0))
    c.start()
    try:
        assert polled.wait(30)
        assert c.stats()["running"] is True
    finally:
        c.stop()
    assert not c.running and c.stats()["running"] is False
    assert not any(t.name == "openhands-spend-checker" and t.is_alive() for t in threading.enumerate())
    msgs = caplog.text
    assert "Started (threshold: $9.95, tiers: <$5 every 300s, $5-$7 every 120s, >=$7 every 10s)" in msgs
    assert "tick failed: RuntimeError: pool exploded" in msgs
    assert "check failed: ValueError: not a requests error" in msgs


def test_stats_shape():
    pool = FakePool(key("a", 6.0, checked=T0 - 30, used=T0 - 10), key("b", 0.0))
    pool.keys["b"].status = "invalid"
    c, _, _ = checker(pool, spend_of(pool))
    st = c.stats()
    assert st["running"] is False and st["threshold"] == 9.95 and st["keys_monitored"] == 1
    assert st["tiers"][0] == {"min_spend": 0.0, "interval_seconds": 300.0, "name": "<$5"}
    [row] = st["key_stats"]
    assert {"key_id", "total_spend", "spend_estimate", "spend_percent", "spend_tier", "last_spend_check",
            "last_used_at", "is_active", "next_check_at"} <= set(row)
    assert row["key_id"] == "a" and row["spend_tier"] == "$5-$7" and row["is_active"] is True
    assert row["spend_percent"] == 60.3 and row["next_check_at"].endswith("Z")
    json.dumps(st)


def test_build_returns_none_when_switched_off():
    class Sc:
        def __init__(self, s):
            self.s = s

        def current(self):
            return self.s

    assert build_spend_checker(Sc(settings(openhands_spend_checker=False))) is None


@pytest.mark.parametrize("name,value", [
    ("openhands_spend_check_tick_seconds", 0.0), ("openhands_spend_check_tick_seconds", float("nan")),
    ("openhands_spend_check_lease_seconds", 0.5), ("openhands_spend_check_lease_seconds", 2.0),  # < 3 x tick
    ("openhands_spend_check_timeout_seconds", -1.0), ("openhands_spend_check_timeout_seconds", 1e9),
])
def test_bad_checker_options_fail_naming_option_and_value(name, value):
    with pytest.raises(ConfigError) as e:
        settings(**{name: value})
    assert name in str(e.value) and repr(value) in str(e.value)


# -- lease ----------------------------------------------------------------------------------------
def test_one_lease_holder_takeover_after_expiry_and_release(mongo_db):
    coll, t = mongo_db["openhands_leases"], [T0]
    a = SpendLease(coll, period_s=10, owner="A", clock=lambda: t[0])
    b = SpendLease(coll, period_s=10, owner="B", clock=lambda: t[0])
    assert a.hold() and not b.hold()
    t[0] += 4
    assert a.hold() and not b.hold()  # renewed
    assert read_lease(coll)["expiresAt"] == pytest.approx(T0 + 14)
    t[0] += 9.8
    assert not b.hold()  # A's lease is still valid (renewed at +4, for 10 s)
    t[0] += 0.3  # A died after that renewal: its lease lapsed at +14
    assert b.hold() and read_lease(coll)["owner"] == "B"
    assert not a.hold()
    b.release()
    assert a.hold()  # a clean stop hands over at once


def test_racing_acquirers_get_exactly_one_lease(mongo_db):
    coll = mongo_db["openhands_leases"]
    leases = [SpendLease(coll, period_s=30, owner=f"o{i}") for i in range(8)]
    barrier, won = threading.Barrier(len(leases)), []

    def go(lease):
        barrier.wait()
        if lease.hold():
            won.append(lease.owner)

    threads = [threading.Thread(target=go, args=(x,)) for x in leases]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(won) == 1 and read_lease(coll)["owner"] == won[0]


def test_a_checker_without_the_lease_does_not_poll(mongo_db):
    coll, t = mongo_db["openhands_leases"], [T0]
    other = SpendLease(coll, period_s=10, owner="other", clock=lambda: t[0])
    assert other.hold()
    pool = FakePool(key("k"))
    c, sess, _ = checker(pool, spend_of(pool), clock=t)
    c.lease = SpendLease(coll, period_s=10, owner="me", clock=lambda: t[0])
    assert c.tick(t[0]) == [] and sess.calls == []
    t[0] += 10.5  # the other poller died
    assert [o.key_id for o in c.tick(t[0])] == ["k"]
    assert c.stats()["lease"]["held"] is True


# -- with the real pool and MongoDB -----------------------------------------------------------------
def test_real_pool_rotation_promotes_a_backup_and_writes_history(mongo, db_name, tmp_path: Path):
    store = PoolStore(mongo.uri, db_name)
    store.ensure_indexes(30)
    store.insert_key({**new_key_doc("k1", "sk-real-k1-0123456789", 10.0, utcnow()), "spendEstimate": 9.0})
    store.insert_backup("b1", "sk-real-b1-0123456789")
    store.bind("client-a", "k1")
    writer = StoreWriter(store, tmp_path / "journal.jsonl")
    writer.start()
    s = settings()
    pool = Pool(store, writer, threshold=lambda: s.spend_threshold, default_budget=lambda: 10.0)
    pool.sync()
    sess = FakeSession(lambda a, n: response(200, page(9.97 if a == "sk-real-k1-0123456789" else 0.0)))
    c = SpendChecker(pool, writer, settings=lambda: s, session=lambda: sess, clock=lambda: T0)
    try:
        [out] = c.tick(T0)
        assert out.rotated_to == "b1"
        assert writer.flush(5)
        doc = store.get_key("k1")
        assert doc["status"] == "exhausted" and doc["totalSpend"] == 9.97 and doc["spendEstimate"] == 9.97
        assert doc["lastSpendCheck"].timestamp() == T0
        assert store.get_key("b1")["status"] == "healthy"
        assert pool.choose("client-a").key.id == "b1"
        [row] = store.list_history(10, "k1")
        assert row["rotationReason"] == "proactive_threshold_9.97" and row["newKeyId"] == "b1"
        assert row["checkedAt"].timestamp() == T0 and row["rotatedAt"].timestamp() == T0
    finally:
        writer.stop()
        store.close()
