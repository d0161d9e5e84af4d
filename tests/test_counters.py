"""The event counters behind `GET /metrics`: a finished flow is tallied by its facts as the flow state holds
them and the families are made when read; what they say must be what the plain rule says, value for value
(float sums included), whatever the flows' labels and however odd the flow state's values."""
from __future__ import annotations

import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addon.core.counters import NO_KEY, TOKEN_KINDS, Metrics

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

labels = st.one_of(st.none(), st.sampled_from(["", "k1", "k2", "chat", "messages", "m" * 130, "m" * 129 + "x"]),
                   st.integers(0, 2), st.just(["a", "list"]))
costs = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.booleans(),
                  st.just("0.5"))
counts = st.one_of(st.none(), st.integers(-3, 10**6), st.booleans(), st.just(2.5))
token_dicts = st.one_of(st.none(), st.just("lots"), st.fixed_dictionaries(
    {}, optional={k: counts for k in (*TOKEN_KINDS, "other")}))
flows = st.tuples(labels, labels, st.sampled_from(["ok", "no_key", "server_error"]), st.booleans(), labels, costs,
                  token_dicts)


def plain_rule(calls: list[tuple[Any, ...]]) -> tuple[dict, dict, dict]:
    """Requests, dollars and tokens as the counters used to add them: flow by flow, in order."""
    requests: dict[tuple[str, str, str], int] = {}
    sums: dict[tuple[str, str], list[Any]] = {}
    for key_id, fmt, outcome, metered, model, cost, tokens in calls:
        key = key_id if isinstance(key_id, str) and key_id else NO_KEY
        req = (key, fmt if isinstance(fmt, str) and fmt else "other", outcome)
        requests[req] = requests.get(req, 0) + 1
        if not metered:
            continue
        mdl = model[:128] if isinstance(model, str) and model else "unknown"
        dollars = float(cost) if isinstance(cost, (int, float)) else 0.0
        if not (dollars > 0 and math.isfinite(dollars)):
            dollars = 0.0
        row = sums.setdefault((key, mdl), [0.0, 0, 0, 0, 0])
        row[0] += dollars
        for i, kind in enumerate(TOKEN_KINDS, start=1):
            n = tokens.get(kind) if isinstance(tokens, dict) else None
            row[i] += n if type(n) is int and n > 0 else 0
    dollars_by = {k: v[0] for k, v in sums.items()}
    tokens_by = {(k, m, kind): v[i] for (k, m), v in sums.items() for i, kind in enumerate(TOKEN_KINDS, start=1)
                 if v[i]}
    return requests, dollars_by, tokens_by


@FAST
@given(st.lists(flows, max_size=40))
def test_the_families_equal_the_plain_rule_flow_by_flow(calls):
    m = Metrics()
    for call in calls:
        m.count_flow(*call)
    snap = m.snapshot()
    assert (snap["requests"], snap["dollars"], snap["tokens"]) == plain_rule(calls)
    assert (m.requests, m.dollars, m.tokens) == plain_rule(calls)


def test_a_model_counted_under_two_formats_sums_its_dollars_in_the_order_they_came():
    """Float sums are not associative: the pair's dollars are one running sum, not a sum of partial sums."""
    m = Metrics()
    calls = [("k1", "chat", "ok", True, "m1", 0.255, None), ("k1", "messages", "ok", True, "m1", 0.495, None),
             ("k1", "chat", "ok", True, "m1", 0.449, None)]
    for call in calls:
        m.count_flow(*call)
    assert m.dollars == {("k1", "m1"): (0.255 + 0.495) + 0.449} == plain_rule(calls)[1]  # 1.199, not 1.1989999999999998
    assert m.requests == {("k1", "chat", "ok"): 2, ("k1", "messages", "ok"): 1}


def test_metered_figures_recorded_alone_count_no_request():
    m = Metrics()
    m.record_metered("k1", "m1", 0.5, {"input": 3, "bogus": 9, "output": True})
    m.count_request(None, None, "ok")
    assert m.snapshot()["requests"] == {(NO_KEY, "other", "ok"): 1}
    assert (m.dollars, m.tokens) == ({("k1", "m1"): 0.5}, {("k1", "m1", "input"): 3})


def observer_rule(m: Metrics, state: dict, status: int | None, dropped: bool) -> None:
    """What the flow observer counted of a finished flow, at once, before `flow_done` queued it (its old code)."""
    from addon.core.counters import outcome_of
    rejected = state.get("rejected")
    if rejected is not None and not isinstance(rejected, str):
        rejected = None
    if rejected == "no_key":
        m.count_no_key()
    if dropped and status is None:
        outcome = "connection_error"
    elif rejected is None and not dropped and status is not None and 200 <= status < 300:
        outcome = "ok"
    else:
        outcome = outcome_of(status, rejected=rejected, dropped=dropped)
    key_id = None if rejected else state.get("key_id")
    m.count_flow(key_id, state.get("format"), outcome, bool(state.get("metered")) and bool(key_id),
                 state.get("model"), state.get("cost"), state.get("tokens"))


states = st.fixed_dictionaries({}, optional={
    "rejected": st.one_of(st.none(), st.sampled_from(["no_key", "client_key", "route", ""]), st.integers(0, 1)),
    "key_id": labels, "format": labels, "metered": st.one_of(st.booleans(), st.none(), st.integers(0, 1)),
    "model": labels, "cost": costs, "tokens": token_dicts})
finished = st.tuples(states, st.one_of(st.none(), st.sampled_from([200, 201, 302, 404, 429, 500, 503])), st.booleans())


@FAST
@given(st.lists(finished, max_size=40), st.integers(0, 600))
def test_flows_handed_over_by_state_count_as_the_observer_counted_them(flows, usual):
    """Property: queued flows, counted in batches and on every read, give the counters the observer's figures."""
    from addon.core.counters import FLOWS_HELD
    usual_flow = ({"key_id": "k1", "format": "chat", "metered": True, "model": "m", "cost": 0.001,
                   "tokens": {"input": 5, "output": 2}}, 200, False)
    queued, counted = Metrics(), Metrics()
    for state, status, dropped in [*flows, *[usual_flow] * usual]:  # (past FLOWS_HELD: counted without a read)
        queued.flow_done(state, status, dropped)
        observer_rule(counted, state, status, dropped)
    assert len(queued._done) < FLOWS_HELD  # held flows stay bounded with no read at all
    assert queued.snapshot() == counted.snapshot()
    assert (queued.requests, queued.dollars, queued.tokens, queued.no_key) == (
        counted.requests, counted.dollars, counted.tokens, counted.no_key)


def test_a_state_nothing_can_count_never_fails_a_read():
    m = Metrics()
    m.flow_done({"key_id": "k1", "format": "chat", "metered": True, "model": "m", "cost": 0.5,
                 "tokens": {"input": 3}}, 200, False)
    m.flow_done({"rejected": "no_key"}, 429, False)
    m.flow_done({"key_id": {"a": 1}, "format": ["x"], "model": object(), "metered": True}, 200, False)  # hand-edited:
    m.flow_done(None, 200, False)  # type: ignore[arg-type]  # counted by its labels; this one cannot be read at all
    snap = m.snapshot()
    assert snap["dollars"][("k1", "m")] == 0.5 and snap["no_key"] == 1 and m.no_key == 1
    assert snap["requests"] == {("k1", "chat", "ok"): 1, (NO_KEY, "other", "no_key"): 1, (NO_KEY, "other", "ok"): 1}
    m.flow_done({"key_id": "k1", "format": "chat"}, 200, False)  # the counters go on after the unreadable one
    assert m.requests[("k1", "chat", "ok")] == 2
