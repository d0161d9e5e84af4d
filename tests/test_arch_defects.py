"""Defects the architecture work fixed (issue 11), each pinned by a test that failed before.

Real SecantusDB and the fake upstream over loopback; the addons run in process (taddons)."""
from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from addon.pool.pool import Pool
from addon.store.mongo import PoolStore
from addon.store.writer import StoreWriter
from addon.traffic.flow_state import FlowState
from tests.inproc import running

KEY1 = "sk-pool-arch-1111111111111111"
KEY2 = "sk-pool-arch-2222222222222222"
CHAT = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def sidecar(mongo, db_name, upstream, tmp_path, monkeypatch):
    with running(mongo.uri, db_name, upstream, tmp_path, monkeypatch, {"k1": KEY1, "k2": KEY2}) as oh:
        yield oh


def chat_flow(upstream, session: str) -> http.HTTPFlow:
    req = tutils.treq(host="127.0.0.1", port=upstream.port, path=b"/chat/completions", method=b"POST",
                      content=json.dumps(CHAT).encode(),
                      headers=http.Headers(authorization="Bearer sk-client-own", **{"x-litellm-session-id": session}))
    f = tflow.tflow(req=req)
    f.client_conn.peername = ("127.0.0.1", 50000)
    return f


def test_proactive_rotation_is_recorded_in_the_flow_state(sidecar, upstream):
    sidecar.pool.bind("session:s-rot", "k1")
    with sidecar.pool.lock:
        sidecar.pool.keys["k1"].spend_estimate = 9.99  # past the $9.95 point
    f = chat_flow(upstream, "s-rot")
    asyncio.run(sidecar.request(f))
    state = FlowState.of(f)
    assert f.response is None and state is not None
    assert (state.key_id, state.rotated_from) == ("k2", "k1")
    assert "k1" in (f.comment or "") and "k2" in (f.comment or "")


def test_a_retry_keeps_a_long_session_id_bound_once(sidecar, upstream):
    session = "conversation-" + "x" * 120
    sidecar.pool.bind(f"session:{session}", "k1")
    f = chat_flow(upstream, session)
    asyncio.run(sidecar.request(f))
    assert FlowState.of(f).key_id == "k1"
    f.response = http.Response.make(400, json.dumps({"error": {
        "message": "Budget has been exceeded! Current cost: 10.0, Max budget: 10.0", "type": "budget_exceeded",
        "param": None, "code": "400"}}), {"content-type": "application/json"})
    asyncio.run(sidecar.response(f))
    assert f.response.status_code == 200, f.response.content
    assert FlowState.of(f).key_id == "k2"
    clients = [c for c in sidecar.pool.bindings if "conversation-" in c]
    assert clients == [f"session:{session}"]
    assert sidecar.pool.bindings[clients[0]] == "k2"


def test_a_deleted_promoted_backup_stays_deleted_after_a_restart(mongo, db_name, tmp_path):
    store = PoolStore(mongo.uri, db_name)
    store.ensure_indexes(30)
    writer = StoreWriter(store, tmp_path / "journal.jsonl")
    pool = Pool(store, writer, threshold=lambda: 9.95, default_budget=lambda: 10.0)
    assert store.insert_backup("spare-1", "sk-spare-arch-0123456789")
    pool.sync()
    assert pool.promote_backup() == "spare-1"
    assert pool.delete_key("spare-1")
    fixed = store.repair(10.0)  # what the next start runs
    assert not any("spare-1" in line for line in fixed), fixed
    assert store.get_key("spare-1") is None
    store.close()


def test_a_sync_never_shows_a_calibrated_or_polled_figure_going_back(mongo, db_name, tmp_path):
    """Queued writes (calibration, polled spend) lie over a fresh read until they land."""
    store = PoolStore(mongo.uri, db_name)
    store.ensure_indexes(30)
    writer = StoreWriter(store, tmp_path / "journal.jsonl")  # not started: everything stays queued
    pool = Pool(store, writer, threshold=lambda: 9.95, default_budget=lambda: 10.0)
    assert pool.add_key("k1", KEY1, None) and pool.add_key("k2", KEY2, None)
    pool.retire("k1", "exhausted", "budget error", spend=9.97)
    pool.record_polled_spend("k2", 4.25, 1_700_000_000.0)
    pool.sync()
    shown = {k["id"]: k for k in pool.snapshot_public()}
    assert shown["k1"]["spendEstimate"] == pytest.approx(9.97)
    assert shown["k2"]["totalSpend"] == pytest.approx(4.25)
    store.close()


@pytest.mark.parametrize("answers, tokens", [(1, [120]), (3, [10, 0, 7_000_000]), (2, [0, 0])])
def test_a_sync_never_shows_a_key_serving_fewer_requests_than_it_did(mongo, db_name, tmp_path, answers, tokens):
    """Answers metered but not yet written (an outage, a busy writer) keep counting in a fresh read's view of
    the key: its requests and tokens never go back, and the cost stays counted once."""
    store = PoolStore(mongo.uri, db_name)
    store.ensure_indexes(30)
    writer = StoreWriter(store, tmp_path / "journal.jsonl")  # not started: everything stays queued
    pool = Pool(store, writer, threshold=lambda: 9.95, default_budget=lambda: 10.0)
    assert pool.add_key("k1", KEY1, None)
    pool.sync()
    for n in tokens:
        pool.record_usage("k1", 0.25, n, client_id="c1", model="gpt-5-mini")
    before = {k["id"]: k for k in pool.snapshot_public()}["k1"]
    assert before["requestsCount"] == answers
    pool.sync()
    shown = {k["id"]: k for k in pool.snapshot_public()}["k1"]
    assert (shown["requestsCount"], shown["tokensUsed"]) == (before["requestsCount"], before["tokensUsed"])
    assert shown["tokensUsed"] == sum(tokens)
    assert shown["spendEstimate"] == pytest.approx(0.25 * answers)
    store.close()
