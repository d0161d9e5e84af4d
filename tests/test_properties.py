"""Property tests (hypothesis) on the pure parsers and validators (issue 6 §3): anything in, no crash out,
and what they return is always usable arithmetic (finite, non-negative)."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addon.operator.admin_api import (ApiError, MAX_BODY, authorized, is_admin_path, parse_json_object, require_api_key,
                             require_id, require_money, route)
from addon.core.answers import classify_response, parse_budget_error, parse_retry_after
from addon.core.metering import parse_money
from addon.core.sse import SSETap, usage_from_sse_body
from addon.core.usage import usage_from_json, wire_format_for_path

FORMATS = ("chat", "messages", "responses")
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=12), inner, max_size=5)),
                          max_leaves=25)
usage_keys = st.sampled_from(["prompt_tokens", "completion_tokens", "total_tokens", "input_tokens", "output_tokens",
                              "cache_creation_input_tokens", "cache_read_input_tokens", "prompt_tokens_details",
                              "input_tokens_details", "cached_tokens", "cost", "reasoning_tokens",
                              "cache_creation", "ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"])
usage_like = st.recursive(
    st.dictionaries(usage_keys, json_leaf, max_size=8),
    lambda inner: st.dictionaries(usage_keys, st.one_of(json_leaf, inner), max_size=8), max_leaves=20)
bodies = st.one_of(
    json_value,
    st.builds(lambda u, m: {"usage": u, "model": m}, usage_like, json_leaf),
    st.builds(lambda u: {"type": "response.completed", "response": {"usage": u}}, usage_like),
    st.builds(lambda u: {"response": {"usage": u, "model": "gpt-5"}}, usage_like),
)


def _sane_usage(u) -> None:
    if u is None:
        return
    t = u.tokens
    for name in ("input", "cache_write", "cache_write_1h", "cache_read", "output"):
        v = getattr(t, name)
        assert isinstance(v, int) and v >= 0, (name, v)
    assert u.cost is None or (math.isfinite(u.cost) and u.cost >= 0)


@FAST
@given(st.sampled_from(FORMATS), bodies)
def test_usage_parser_never_raises_and_counts_are_sane(fmt, body):
    _sane_usage(usage_from_json(fmt, body))


@FAST
@given(st.sampled_from(FORMATS), st.binary(max_size=600))
def test_sse_body_parser_never_raises_on_bytes(fmt, raw):
    _sane_usage(usage_from_sse_body(fmt, raw))


sse_fragment = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"data: ", b"\n\n", b"\r\n", b"event: message_start\n", b"data: [DONE]\n\n", b"\xff\xfe",
                     b'data: {"usage":{"prompt_tokens":5,"completion_tokens":"x"}}\n\n',
                     b'data: {"type":"message_delta","usage":{"output_tokens":1e400}}\n\n', b":comment\n"]),
)


@FAST
@given(st.sampled_from(FORMATS), st.booleans(), st.lists(sse_fragment, max_size=12))
def test_sse_tap_passes_bytes_through_and_never_raises(fmt, strip, chunks):
    tap = SSETap(fmt, strip_usage_chunk=strip)
    out = bytearray()
    for c in chunks:
        if not c:
            continue
        r = tap(c)
        assert r != b""  # an empty bytes chunk would end a chunked body
        out += b"".join(r) if isinstance(r, list) else r
    end = tap(b"")
    out += b"".join(end) if isinstance(end, list) else end
    _sane_usage(tap.usage)
    if not strip or fmt != "chat":
        assert bytes(out) == b"".join(chunks)  # passed through as received


@FAST
@given(st.integers(min_value=-1000, max_value=1000) | st.sampled_from([400, 422, 429, 401, 403, 500]),
       st.one_of(st.binary(max_size=300), st.text(max_size=300), json_value.map(lambda v: json.dumps(v).encode()),
                 st.builds(lambda s, b, t: json.dumps({"error": {"message": f"ExceededBudget: Spend={s}, Budget={b}",
                                                                 "type": t}}).encode(),
                           st.text(max_size=12) | st.floats().map(str), st.text(max_size=12) | st.floats().map(str),
                           st.sampled_from(["budget_exceeded", None, 5, "x"]))),
       st.dictionaries(st.sampled_from(["retry-after", "Retry-After", "x-other"]), st.text(max_size=30), max_size=2))
def test_budget_error_parser_and_classifier_never_raise(status, body, headers):
    be = parse_budget_error(status, body)
    if be is not None:
        for v in (be.spend, be.budget):
            assert v is None or (math.isfinite(v) and v >= 0)
    verdict = classify_response(status, headers, body if isinstance(body, bytes) else body.encode(), 1_700_000_000.0)
    assert verdict.kind in ("ok", "budget", "rate_limited", "invalid", "passthrough")
    if verdict.retry_after is not None:
        assert math.isfinite(verdict.retry_after) and verdict.retry_after > 0


@FAST
@given(st.one_of(st.none(), st.text(max_size=40), st.floats().map(str), st.integers().map(str)))
def test_retry_after_is_always_a_bounded_positive_delay(value):
    s = parse_retry_after(value, 1_700_000_000.0)
    assert math.isfinite(s) and 0 < s <= 24 * 3600


@FAST
@given(st.one_of(st.none(), st.text(max_size=30), st.binary(max_size=30)))
def test_parse_money_is_finite_non_negative_or_none(value):
    v = parse_money(value)
    assert v is None or (math.isfinite(v) and v >= 0)


# -- admin input validation -------------------------------------------------------------------------
@FAST
@given(st.sampled_from(["GET", "POST", "PATCH", "DELETE", "PUT", "HEAD", "OPTIONS", "get", "TRACE"]),
       st.one_of(st.text(max_size=80).map(lambda s: "/admin/openhands/" + s),
                 st.lists(st.sampled_from(["keys", "k1", "..", ".", "", "%2F", "%2e%2e", "reset", "budget", "spend",
                                           "backup-keys", "\\", "k1%00", "spend-history?limit=1"]), max_size=5)
                 .map(lambda parts: "/admin/openhands/" + "/".join(parts))))
def test_route_either_matches_a_known_endpoint_or_is_a_4xx(method, path):
    try:
        r = route(method, path)
    except ApiError as e:
        assert e.status in (400, 404, 405)
        return
    if r.key_id is not None:  # an id that reaches a handler is one clean segment
        assert require_id({"id": r.key_id}) == r.key_id
        assert "/" not in r.key_id and ".." not in r.key_id and "%" not in r.key_id
    p = path.split("?", 1)[0]
    assert ".." not in p.split("/") and "%" not in p and "//" not in p


@FAST
@given(st.one_of(st.binary(max_size=200), json_value.map(lambda v: json.dumps(v).encode()),
                 st.sampled_from([b"NaN", b"Infinity", b'{"a":-Infinity}', b'{"a":NaN}', b"\xff\xfe{}", b"{}" * 3])))
def test_parse_json_object_returns_a_dict_or_a_400(raw):
    try:
        v = parse_json_object(raw)
    except ApiError as e:
        assert e.status in (400, 413)
        return
    assert isinstance(v, dict)


def test_parse_json_object_limits_size():
    with pytest.raises(ApiError) as e:
        parse_json_object(b'{"a":"' + b"x" * MAX_BODY + b'"}')
    assert e.value.status == 413


@FAST
@given(json_leaf, st.booleans(), st.booleans())
def test_require_money_accepts_only_finite_non_negative_numbers(value, positive, required):
    body = {"m": value}
    try:
        v = require_money(body, "m", positive=positive, required=required)
    except ApiError as e:
        assert e.status == 400 and "'m'" in e.message
        return
    assert isinstance(v, float) and math.isfinite(v) and v >= 0 and (v > 0 or not positive) and v <= 1_000_000
    assert not isinstance(value, bool)


@FAST
@given(json_leaf)
def test_require_id_and_api_key_validate_types_and_characters(value):
    try:
        i = require_id({"id": value})
    except ApiError as e:
        assert e.status == 400
    else:
        assert isinstance(i, str) and 1 <= len(i) <= 128 and ".." not in i and "/" not in i and i.isprintable()
    try:
        k = require_api_key({"apiKey": value})
    except ApiError as e:
        assert e.status == 400
    else:
        assert isinstance(k, str) and k and not any(c.isspace() for c in k)


@FAST
@given(st.one_of(st.none(), st.text(max_size=40)), st.one_of(st.none(), st.text(min_size=1, max_size=20)),
       st.one_of(st.none(), st.sampled_from(["127.0.0.1", "::1", "10.0.0.5", "::ffff:127.0.0.1", "::ffff:8.8.8.8",
                                             "192.168.1.1", "garbage", "127.0.0.1%lo", "0.0.0.0", "fe80::1%eth0"])))
def test_authorized_never_raises_and_needs_the_exact_token(header, token, peer):
    ok = authorized(header, token, peer)
    if token is None:
        assert ok == (peer in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "127.0.0.1%lo"))
    elif ok:
        assert header is not None and header[7:].strip() == token


def test_authorized_uses_constant_time_compare(monkeypatch):
    import hmac

    import addon.operator.admin_api as admin_api

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(admin_api.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert authorized("Bearer right-token", "right-token", "10.1.1.1")
    assert not authorized("Bearer wrong-token", "right-token", "127.0.0.1")  # loopback is no bypass with a token
    assert len(calls) == 2


@FAST
@given(st.text(max_size=60))
def test_path_helpers_never_raise(path):
    is_admin_path(path)
    wire_format_for_path(path)
