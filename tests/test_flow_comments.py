"""The one-line flow comment and the markers of rotated, retried and failed flows (issue 8 §1)."""
from __future__ import annotations

import pytest

from addon.core import flow_comments as fc
from addon.core.masking import mask_key

POOL_KEY = "sk-pool-0123456789abcdef"
MASKED = mask_key(POOL_KEY)
TOKENS = {"input": 1200, "cache_write": 30, "cache_read": 4000, "output": 250}


@pytest.mark.parametrize("kwargs,expected", [
    (dict(key_id="k1", masked_key=MASKED, model="claude-sonnet-4-5", tokens=TOKENS, cost=0.012345,
          key_spend=3.5, budget=10.0),
     "🔑 k1 (sk-pool-...cdef) · claude-sonnet-4-5 · in 1200 out 250 cache r4000/w30 · $0.0123 · key $3.5000/$10.00"),
    (dict(key_id="k2", masked_key=MASKED, model=None, tokens=None, cost=0.0, key_spend=None, budget=None),
     "🔑 k2 (sk-pool-...cdef) · ? · no usage reported · $0"),
    (dict(key_id="k3", masked_key=MASKED, model="gpt-5", tokens={"input": 5, "output": 7}, cost=0.000042,
          key_spend=0.1, budget=0.0, cost_source="fallback"),
     "🔑 k3 (sk-pool-...cdef) · gpt-5 · in 5 out 7 cache r0/w0 · $0.000042 (fallback) · key $0.1000"),
    (dict(key_id="k4", masked_key=MASKED, model="m", tokens=TOKENS, cost=2.5, key_spend=9.9, budget=10),
     "🔑 k4 (sk-pool-...cdef) · m · in 1200 out 250 cache r4000/w30 · $2.50 · key $9.9000/$10.00"),
])
def test_usage_line(kwargs, expected):
    assert fc.usage_line(**kwargs) == expected


def test_usage_line_never_shows_a_full_key_even_when_the_id_is_the_key():
    line = fc.usage_line(POOL_KEY, MASKED, "m", TOKENS, 0.01, 1.0, 10.0)
    assert POOL_KEY not in line
    assert line.startswith(f"🔑 {MASKED} ({MASKED})")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -3, True, "12", None])
def test_usage_line_tolerates_junk_numbers(value):
    line = fc.usage_line("k", MASKED, "m", {"input": value, "output": value}, value, value, value)
    assert "nan" not in line.lower() and "inf" not in line.lower()


def test_usage_line_is_one_bounded_line():
    line = fc.usage_line("k\n" + "x" * 500, MASKED, "model\r\nwith newline", TOKENS, 0.01, 1, 10)
    assert "\n" not in line and "\r" not in line
    assert len(line) < 250


@pytest.mark.parametrize("func,args,expected", [
    (fc.rotated_marker, ("k1", "k2"), "🔮 rotated k1→k2"),
    (fc.retried_marker, ("k2", "budget"), "↩️ retried on k2 after budget"),
    (fc.retried_marker, ("k3", "rate_limited"), "↩️ retried on k3 after rate_limited"),
    (fc.failed_marker, ("no usable pool key (429)",), "⛔ no usable pool key (429)"),
    (fc.failed_marker, ("every key tried is spent or refused (429)", ["k1", "k2"]),
     "⛔ every key tried is spent or refused (429) · tried k1, k2"),
    (fc.dropped_marker, (), "✂️ stream dropped"),
])
def test_markers(func, args, expected):
    assert func(*args) == expected


@pytest.mark.parametrize("comment,part,expected", [
    ("", "a", "a"),
    (None, "a", "a"),
    ("a", "b", "a · b"),
    ("a", "", "a"),
])
def test_append(comment, part, expected):
    assert fc.append(comment, part) == expected


def test_rotated_then_retried_then_metered_tells_the_story_in_order():
    c = fc.append("", fc.rotated_marker("k1", "k2"))
    c = fc.append(c, fc.retried_marker("k3", "budget"))
    c = fc.append(c, fc.usage_line("k3", MASKED, "m", TOKENS, 0.01, 1.0, 10.0))
    assert c.index("🔮") < c.index("↩️") < c.index("🔑")


@pytest.mark.parametrize("value,expected", [(0, "$0"), (0.000123, "$0.000123"), (0.5, "$0.5000"), (12.345, "$12.35")])
def test_money(value, expected):
    assert fc.money(value) == expected


# -- PooledFlows._meter builds the comment from metered usage, stored body or not --------------------
class _Key:
    budget_limit = 10.0


class _Pool:
    def record_usage(self, key_id, cost, tokens, key_spend=None, **_):
        return 1.25 + cost

    def get(self, key_id):
        return _Key()


@pytest.mark.parametrize("store_streamed_bodies", [False, True])
def test_meter_comment_for_streamed_flow_with_and_without_stored_body(store_streamed_bodies):
    from mitmproxy.addons.proxyserver import Proxyserver
    from mitmproxy.test import taddons, tflow

    from addon.core.metering import Meter
    from addon.services import Services
    from addon.traffic.flow_state import META, FlowState
    from addon.traffic.pooled import PooledTraffic
    from addon.core.sse import SSETap
    from pricing.table import PriceTable

    body = (b'data: {"id":"1","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
            b'data: {"id":"1","model":"gpt-4o","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":3,'
            b'"total_tokens":13}}\n\ndata: [DONE]\n\n')
    ps = Proxyserver()
    with taddons.context(ps) as tctx:
        tctx.configure(ps, store_streamed_bodies=store_streamed_bodies)
        flow = tflow.tflow(resp=True)
        flow.metadata[META] = {"key_id": "k1", "key": MASKED, "format": "chat", "model": "gpt-4o", "tried": ["k1"]}
        tap = SSETap("chat")
        tap(body)
        tap(b"")
        flow.response.stream = tap
        flow.response.content = body if store_streamed_bodies else b""
        flows = PooledTraffic(Services(pool=_Pool(), meter=Meter(PriceTable.load_bundled(), (3.0, 15.0))))
        state = FlowState.of(flow)
        flows._meter(flow, state, tap.usage, None)
        state.save(flow)
    assert flow.comment.startswith(f"🔑 k1 ({MASKED}) · gpt-4o · in 10 out 3 cache r0/w0 · $")
    assert "/$10.00" in flow.comment
    assert flow.metadata[META]["tokens"] == {"input": 10, "cache_write": 0, "cache_read": 0, "output": 3}
