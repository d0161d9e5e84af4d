"""`PooledTraffic.request` and `.response` are sync on the common path: a flow memory can serve makes no
coroutine at all (nothing for mitmproxy to await), and only a flow that must wait — start-up, a key choice
that needs the database, every key full, a failed answer to confirm or retry — hands back an awaitable.
Either way the flow ends the same: the same key, answer, state, comment, masked credentials, and the
flow's end (in-flight count, reservation, masking, saved state) runs once, after any recovery."""
from __future__ import annotations

import inspect
import json
from typing import Any, Callable, Iterator

import pytest
from mitmproxy import http
from mitmproxy.test import taddons

from addon.core.sse import SSETap
from addon.traffic.pooled import PooledTraffic
from tests.test_traffic_unit import (BUDGET_ERROR, CHAT, CLIENT_KEY, OK_JSON, Rig, api_key, drive, flow, running_rig,
                                     state)

COST = {"content-type": "application/json", "x-litellm-response-cost": "0.01"}


@pytest.fixture
def rig(tmp_path) -> Iterator[Rig]:
    with running_rig(tmp_path) as r:
        yield r


def finish(pending: Any) -> None:
    """The hook handed back an awaitable (the guard's wrapper is a coroutine): await it, as mitmproxy does."""
    assert inspect.isawaitable(pending)
    drive(pending)


def answer(rig: Rig, f: http.HTTPFlow, status: int, body: Any, headers: dict[str, str] | None = None) -> Any:
    f.response = http.Response.make(status, json.dumps(body).encode(), headers or {"content-type": "application/json"})
    rig.traffic.responseheaders(f)
    return rig.traffic.response(f)


def bound(rig: Rig) -> None:
    rig.add("k1")
    rig.add("k2")
    rig.pool.bind("session:conv", "k1")


def first_sight(rig: Rig) -> None:
    rig.add("k1")  # the client has no binding in memory yet: its stored one is read off the loop


def rotating(rig: Rig) -> None:
    rig.add("k1", 9.96)  # past its rotation point: the rotation writes to the database, off the loop
    rig.add("k2")
    rig.pool.bind("session:conv", "k1")


def starting(rig: Rig) -> None:
    bound(rig)
    rig.services.ready.clear()  # start-up not over: the request waits for it


def start_up_failed(rig: Rig) -> None:
    bound(rig)
    rig.services.failed = "database down"


def full(rig: Rig) -> None:
    """k1 can pay for one request in flight, no more: the second waits for the first to settle."""
    rig.add("k1", 9.80)
    rig.pool.bind("session:conv", "k1")
    first = rig.request(flow())
    assert state(first).key_id == "k1"
    rig.first = first  # type: ignore[attr-defined]


def unblock(rig: Rig) -> None:
    """Whatever the flow waits on is over before mitmproxy awaits it."""
    rig.services.ready.set()
    first = getattr(rig, "first", None)
    if first is not None:
        assert answer(rig, first, 200, OK_JSON, COST) is None


# (setup, returns an awaitable, key the flow goes out on, rotated from)
REQUESTS: list[tuple[Callable[[Rig], None], bool, str, str | None]] = [
    (bound, False, "k1", None),          # the common path: memory chooses, nothing to await
    (first_sight, True, "k1", None),
    (rotating, True, "k2", "k1"),
    (starting, True, "k1", None),
]


@pytest.mark.parametrize("setup, waits, key, rotated_from", REQUESTS, ids=lambda v: getattr(v, "__name__", None))
def test_a_request_is_sync_unless_it_must_wait_and_goes_out_the_same_either_way(rig, setup, waits, key,
                                                                                 rotated_from):
    setup(rig)
    f = flow()
    pending = rig.traffic.request(f)
    assert (pending is not None) is waits
    if waits:
        assert f.response is None and "openhands" not in f.metadata  # nothing decided yet
        unblock(rig)
        finish(pending)
    st = state(f)
    assert f.response is None and (st.key_id, st.rotated_from, st.tried) == (key, rotated_from, [key])
    assert f.request.headers["authorization"] == f"Bearer {api_key(key)}"
    assert rig.traffic._in_flight == {key: 1} and rig.pool.reservations.totals(key)[1] == 1
    assert (rotated_from is not None) is bool(f.comment and key in f.comment)
    assert answer(rig, f, 200, OK_JSON, COST) is None  # metered on the key it went out on, without a coroutine
    assert rig.pool.get(key).spend_estimate == pytest.approx(0.01)
    assert rig.traffic._in_flight == {} and api_key(key) not in str(f.request.headers)


def test_a_request_when_every_key_is_full_waits_for_one_to_settle_then_goes_out(rig, monkeypatch):
    full(rig)
    waited = []
    real = rig.traffic._wait_if_full

    async def wait_if_full(client: str, acquired: Any) -> Any:
        waited.append(acquired.full)
        return await real(client, acquired)
    monkeypatch.setattr(rig.traffic, "_wait_if_full", wait_if_full)
    f = flow()
    pending = rig.traffic.request(f)
    assert pending is not None and "openhands" not in f.metadata
    unblock(rig)  # the first request is answered: its reservation ends
    finish(pending)
    assert waited == [True]
    assert f.response is None and state(f).key_id == "k1" and rig.traffic._in_flight == {"k1": 1}


@pytest.mark.parametrize("setup, status, rejected", [
    (lambda r: r.add("k1", status="exhausted"), 429, "no_key"),   # no usable key: a backup is looked for off the loop
    (lambda r: start_up_failed(r), 503, None),
])
def test_a_request_answered_locally_after_waiting(rig, setup, status, rejected):
    setup(rig)
    f = flow()
    pending = rig.traffic.request(f)
    assert f.response is None
    finish(pending)
    assert f.response is not None and f.response.status_code == status
    assert state(f).local and state(f).rejected == rejected and rig.traffic._in_flight == {}


def test_a_route_or_client_refused_makes_no_coroutine(tmp_path):
    r = Rig(tmp_path, {"OPENHANDS_CLIENT_KEYS": "allowed-1"})
    with taddons.context(r.traffic):
        r.add("k1")
        for f, status in ((flow("/key/generate"), 403), (flow(), 401)):
            assert r.traffic.request(f) is None
            assert f.response is not None and f.response.status_code == status and state(f).local
    r.writer.stop()


def _spy_end(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = rig.traffic._end

    def end(f: http.HTTPFlow, st: Any) -> None:
        calls.append(len(rig.session.sent))  # the retries sent by the time the flow ends
        real(f, st)
    monkeypatch.setattr(rig.traffic, "_end", end)
    return calls


UNKNOWN_BUDGET = {"error": {"message": "Your team is out of money, talk to finance", "type": "budget_exceeded",
                            "param": None, "code": "400"}}


# (status, body, k1 spent (a probe confirms it), returns an awaitable, final status, retries sent, key at the end)
RESPONSES = [
    (200, OK_JSON, False, False, 200, 0, "k1"),              # a success: metered, sync
    (500, {"error": {"message": "upstream broke"}}, False, False, 500, 0, "k1"),  # passes through: nothing to recover
    (400, {"error": {"message": "bad request: messages"}}, False, False, 400, 0, "k1"),
    (400, BUDGET_ERROR, True, True, 200, 1, "k2"),           # retired, retried on k2: awaited, the end after it
    (400, UNKNOWN_BUDGET, True, True, 200, 1, "k2"),         # unknown budget text: probed, confirmed, retried
    (400, UNKNOWN_BUDGET, False, True, 400, 0, "k1"),        # probed, not confirmed: passes through
]


@pytest.mark.parametrize("status, body, spent, waits, final, retries, key", RESPONSES)
def test_a_response_is_sync_unless_it_recovers_and_the_flow_ends_once_after_recovery(
        rig, monkeypatch, status, body, spent, waits, final, retries, key):
    bound(rig)
    if spent:
        rig.session.spent.add(api_key("k1"))
    ends = _spy_end(rig, monkeypatch)
    f = flow()
    assert rig.traffic.request(f) is None
    pending = answer(rig, f, status, body, COST if status == 200 else None)
    assert (pending is not None) is waits
    if waits:
        assert ends == [] and rig.traffic._in_flight == {"k1": 1}  # the flow's end waits for the recovery
        assert api_key("k1") in str(f.request.headers)
        finish(pending)
    assert ends == [retries]  # once, after the retry was sent
    st = state(f)
    assert f.response.status_code == final and st.key_id == key and st.retries == retries
    assert rig.traffic._in_flight == {} and rig.pool.reservations.totals("k1") == (0.0, 0)
    assert rig.pool.reservations.totals("k2") == (0.0, 0)
    assert api_key("k1") not in str(f.request.headers) and api_key("k2") not in str(f.request.headers)
    assert CLIENT_KEY not in str(f.request.headers)
    assert st.metered is (final == 200)


def test_a_streamed_answer_is_metered_without_a_coroutine(rig):
    bound(rig)
    f = flow(body={**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert rig.traffic.request(f) is None
    f.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
    rig.traffic.responseheaders(f)
    tap = f.response.stream
    assert isinstance(tap, SSETap)
    usage = {"id": "c1", "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                                                  "cost": 0.25}}
    tap(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
    tap(b"")
    assert rig.traffic.response(f) is None
    assert state(f).metered and rig.pool.get("k1").spend_estimate == pytest.approx(0.25)


def test_a_failure_in_the_recovery_is_contained_and_the_flow_still_ends(rig, monkeypatch, caplog):
    bound(rig)
    ends = _spy_end(rig, monkeypatch)

    async def broken(*a: Any, **kw: Any) -> None:
        raise RuntimeError("retry bug")
    monkeypatch.setattr(rig.traffic, "_recover", broken)
    f = flow()
    assert rig.traffic.request(f) is None
    rig.session.spent.add(api_key("k1"))
    finish(answer(rig, f, 400, BUDGET_ERROR))
    assert ends == [0] and "response hook failed" in caplog.text
    assert rig.traffic._in_flight == {} and api_key("k1") not in str(f.request.headers)


def test_the_hooks_are_sync_functions():
    """mitmproxy awaits what a sync hook returns; an `async def` hook would make a coroutine for every flow."""
    assert not inspect.iscoroutinefunction(PooledTraffic.request)
    assert not inspect.iscoroutinefunction(PooledTraffic.response)
