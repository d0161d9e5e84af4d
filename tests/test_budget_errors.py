"""Budget-error recognition and upstream classification (reference/litellm-upstream.md §1)."""

from __future__ import annotations

import json
import math
from email.utils import formatdate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addon.core.answers import (
    BudgetError,
    UpstreamVerdict,
    classify_response,
    parse_budget_error,
)

NOW = 1_700_000_000.0

# (message, spend, budget, entity) — every message form LiteLLM 1.80–1.110 produces for a budget.
MESSAGE_FORMS = [
    pytest.param("ExceededBudget: User=7f3e2a10-user over budget. Spend=10.5123, Budget=10.0",
                 10.5123, 10.0, "User", id="user"),
    pytest.param("ExceededBudget: User=7f3e2a10-user over budget. Spend=11, Budget=10",
                 11.0, 10.0, "User", id="user-ints"),
    pytest.param("ExceededBudget: User=... over budget", None, None, "User", id="user-no-numbers"),
    pytest.param("ExceededBudget: End User=customer-42 over budget. Spend=3.25, Budget=3.0",
                 3.25, 3.0, "End User", id="end-user"),
    pytest.param("Budget has been exceeded! Current cost: 5.2, Max budget: 5.0",
                 5.2, 5.0, None, id="default"),
    pytest.param("Budget has been exceeded! Current cost: 1000.0123456, Max budget: 1000.0",
                 1000.0123456, 1000.0, None, id="default-large"),
    pytest.param("Budget has been exceeded! Current cost: 1.5e-05, Max budget: 1e-05",
                 1.5e-05, 1e-05, None, id="default-scientific"),
    pytest.param("Budget has been exceeded! Key=key Current cost: 10.0001, Max budget: 10.0",
                 10.0001, 10.0, "Key", id="key-no-alias"),
    pytest.param("Budget has been exceeded! Key=my-alias (sk-...f00d) Current cost: 10.02, Max budget: 10.0",
                 10.02, 10.0, "Key", id="key-alias-name"),
    pytest.param("Budget has been exceeded! Team=org-1234 Current cost: 25.01, Max budget: 25.0",
                 25.01, 25.0, "Team", id="team"),
    pytest.param("Budget has been exceeded! User=u-1 in Team=org-9 Current cost: 7.5, Max budget: 7.0",
                 7.5, 7.0, "TeamMember", id="user-in-team"),
    pytest.param("Budget has been exceeded! TeamMember=u-1:org-9 Current cost: 7.5, Max budget: 7.0",
                 7.5, 7.0, "TeamMember", id="team-member"),
    pytest.param("Budget has been exceeded! Organization=org-77 Current cost: 100.5, Max budget: 100.0",
                 100.5, 100.0, "Organization", id="organization"),
    pytest.param("Budget has been exceeded! Tag=prod Current cost: 3, Max budget: 2",
                 3.0, 2.0, "Tag", id="tag"),
    pytest.param("Budget has been exceeded! Project=proj-1 Current cost: 12.0, Max budget: 12.0",
                 12.0, 12.0, "Project", id="project"),
    pytest.param("Budget has been exceeded! Model access group=claude-models Current cost: 4.0, Max budget: 4.0",
                 4.0, 4.0, "Model access group", id="model-access-group"),
    pytest.param("Budget has been exceeded! EndUser=cust-1 Current cost: 1.1, Max budget: 1.0",
                 1.1, 1.0, "EndUser", id="reservation-end-user"),
    pytest.param("Budget has been exceeded! Key=ci-key Current cost: 9.99, Estimated request cost: 0.05, "
                 "Max budget: 10.0", 9.99, 10.0, "Key", id="reservation-estimated-cost"),
    pytest.param("ExceededTokenBudget: Current spend for token: 10.2; Max Budget for Token: 10.0",
                 10.2, 10.0, "Key", id="token-budget"),
    pytest.param("ExceededBudget: Key over 1d budget. Spend=$5.1234, Limit=$5.00",
                 5.1234, 5.0, "Key", id="key-window"),
    pytest.param("ExceededBudget: Team=team-a over 7d budget. Spend=$100.0000, Limit=$100.00",
                 100.0, 100.0, "Team", id="team-window"),
]

BUDGET_STATUSES = [400, 422, 429]


def openai_body(message: str, status: int) -> dict:
    return {"error": {"message": message, "type": "budget_exceeded", "param": None, "code": str(status)}}


def anthropic_body(message: str, status: int) -> dict:
    kind = "rate_limit_error" if status == 429 else "invalid_request_error"
    return {"type": "error", "error": {"type": kind, "message": message, "litellm_error_type": "budget_exceeded"}}


def untyped_body(message: str, status: int) -> dict:
    """What OpenHands-Cloud#16 shows: only a message, no type: the text markers must suffice."""
    return {"error": {"message": message}}


ENVELOPES = [
    pytest.param(openai_body, id="openai"),
    pytest.param(anthropic_body, id="anthropic"),
    pytest.param(untyped_body, id="message-only"),
]


@pytest.mark.parametrize("envelope", ENVELOPES)
@pytest.mark.parametrize("status", BUDGET_STATUSES)
@pytest.mark.parametrize(("message", "spend", "budget", "entity"), MESSAGE_FORMS)
def test_every_budget_message_parses_on_every_status_and_envelope(envelope, status, message, spend, budget, entity):
    body = json.dumps(envelope(message, status)).encode()
    err = parse_budget_error(status, body)
    assert err == BudgetError(message=message, spend=spend, budget=budget, entity=entity)


# Bodies exactly as observed from a LiteLLM 1.80.0 proxy, and their 1.85+/1.104+/1.110 variants.
REAL_BODIES = [
    pytest.param(400, b'{"error":{"message":"ExceededBudget: User=7f3e2a10-user over budget. Spend=10.5123, '
                      b'Budget=10.0","type":"budget_exceeded","param":null,"code":"400"}}',
                 10.5123, 10.0, "User", id="1.80-user"),
    pytest.param(400, b'{"error":{"message":"Budget has been exceeded! Team=org-1234 Current cost: 25.01, '
                      b'Max budget: 25.0","type":"budget_exceeded","param":null,"code":"400"}}',
                 25.01, 25.0, "Team", id="1.80-team"),
    pytest.param(400, b'{"error":{"message":"Budget has been exceeded! Current cost: 5.2, Max budget: 5.0",'
                      b'"type":"budget_exceeded","param":null,"code":"400"}}',
                 5.2, 5.0, None, id="1.80-default"),
    pytest.param(429, b'{"error":{"message":"Budget has been exceeded! Current cost: 5.2, Max budget: 5.0",'
                      b'"type":"budget_exceeded","param":null,"code":"429"}}',
                 5.2, 5.0, None, id="1.85-429"),
    pytest.param(422, b'{"error":{"message":"Budget has been exceeded! Team=<org> Current cost: 25.01, '
                      b'Max budget: 25.0","type":"budget_exceeded","param":null,"code":"422"}}',
                 25.01, 25.0, "Team", id="1.104-422"),
    pytest.param(422, b'{"type":"error","error":{"type":"invalid_request_error","message":"Budget has been '
                      b'exceeded! Key=k Current cost: 10.1, Max budget: 10.0","litellm_error_type":'
                      b'"budget_exceeded"},"request_id":"req-1"}',
                 10.1, 10.0, "Key", id="1.110-anthropic-422"),
    pytest.param(429, b'{"type":"error","error":{"type":"rate_limit_error","message":"Budget has been '
                      b'exceeded! Team=org-1 Current cost: 25.01, Max budget: 25.0","litellm_error_type":'
                      b'"budget_exceeded"}}',
                 25.01, 25.0, "Team", id="1.110-anthropic-429"),
]


@pytest.mark.parametrize("as_type", [bytes, str, json.loads], ids=["bytes", "str", "dict"])
@pytest.mark.parametrize(("status", "raw", "spend", "budget", "entity"), REAL_BODIES)
def test_real_bodies_parse_as_bytes_text_or_dict(as_type, status, raw, spend, budget, entity):
    body = raw if as_type is bytes else raw.decode() if as_type is str else json.loads(raw)
    err = parse_budget_error(status, body)
    assert err is not None
    assert (err.spend, err.budget, err.entity) == (spend, budget, entity)


@pytest.mark.parametrize("envelope", [openai_body, anthropic_body], ids=["openai", "anthropic"])
def test_budget_exceeded_type_alone_is_enough(envelope):
    """A future message wording must not hide a budget error that LiteLLM tags as one."""
    err = parse_budget_error(422, envelope("Key is over its allowance", 422))
    assert err == BudgetError(message="Key is over its allowance", spend=None, budget=None, entity=None)


def test_plain_text_budget_body_is_recognised():
    err = parse_budget_error(400, b"ExceededBudget: User=u1 over budget. Spend=10.2, Budget=10.0")
    assert err is not None and (err.spend, err.budget) == (10.2, 10.0)


def test_non_utf8_bytes_around_a_budget_message_still_parse():
    body = b"\xff\xfe ExceededBudget: User=u1 over budget. Spend=10.2, Budget=10.0 \xff"
    err = parse_budget_error(400, body)
    assert err is not None and err.spend == 10.2


NEAR_MISSES = [
    pytest.param(400, {"error": {"message": "Invalid value for 'max_tokens': must be a positive integer",
                                 "type": "invalid_request_error", "param": "max_tokens", "code": "400"}},
                 id="bad-parameter"),
    pytest.param(400, {"error": {"message": "max_budget must be a positive number, got Budget",
                                 "type": "invalid_request_error", "param": "max_budget", "code": "400"}},
                 id="bad-parameter-mentions-budget"),
    pytest.param(429, {"error": {"message": "Rate limit reached for gpt-4o in organization org-x on tokens per "
                                            "min (TPM): Limit 30000, Used 29000, Requested 2000.",
                                 "type": "throttling_error", "param": None, "code": "429"}},
                 id="rate-limit"),
    pytest.param(429, {"error": {"message": "Session budget exceeded for session sess-1. Current spend: $1.2, "
                                            "max_budget_per_session: $1.0.",
                                 "type": "throttling_error", "param": None, "code": "429"}},
                 id="session-budget"),
    pytest.param(429, openai_body("Session budget exceeded for session sess-1. Current spend: $1.2, "
                                  "max_budget_per_session: $1.0.", 429),
                 id="session-budget-tagged"),
    pytest.param(429, {"error": {"message": "No deployments available - crossed budget for provider: openai",
                                 "type": "None", "param": None, "code": "429"}},
                 id="router-crossed-budget"),
    pytest.param(400, openai_body("LiteLLM Virtual Key: 88dc28d0f030c55ed4ab77ed8faf098196cb1c05df778539800c9"
                                  "f1243fe6b4b, key_alias: ci, exceeded budget for model=gpt-4o", 400),
                 id="per-model-key-budget"),
    pytest.param(429, openai_body("LiteLLM User: u-1, exceeded budget for model=claude-sonnet-4-5", 429),
                 id="per-model-user-budget"),
    pytest.param(422, anthropic_body("LiteLLM Team: t-1, exceeded budget for model=claude-sonnet-4-5", 422),
                 id="per-model-team-budget-anthropic"),
    pytest.param(401, {"error": {"message": "Authentication Error, Invalid proxy server token passed.",
                                 "type": "auth_error", "param": "None", "code": "401"}},
                 id="auth-error"),
    pytest.param(400, {"error": {"message": "Your budget is running low", "type": "invalid_request_error"}},
                 id="word-budget"),
    pytest.param(200, openai_body("Budget has been exceeded! Current cost: 5.2, Max budget: 5.0", 200),
                 id="2xx-with-budget-text"),
    pytest.param(500, openai_body("Budget has been exceeded! Current cost: 5.2, Max budget: 5.0", 500),
                 id="5xx-with-budget-text"),
    pytest.param(503, "ExceededBudget: User=u over budget. Spend=1, Budget=1", id="5xx-plain-text"),
    pytest.param(302, openai_body("ExceededBudget: User=u over budget", 302), id="3xx"),
]


@pytest.mark.parametrize(("status", "body"), NEAR_MISSES)
def test_near_misses_are_not_budget_errors(status, body):
    assert parse_budget_error(status, body) is None


JUNK = [
    None, b"", "", b"\xff\xfe\xfd", b"not json", b"[1, 2, 3]", b'["ExceededBudget"]', b"null", b"42",
    b'"just a string"', b"{", b"[" * 100_000, b'{"error": null}', b'{"error": ["x"]}', b'{"error": 5}',
    {"error": {"message": 123, "type": ["budget_exceeded"]}}, {"error": {"message": None}}, {1: 2},
    {"error": {"message": {"nested": "ExceededBudget"}}}, b"ExceededBudget" * 200_000,
    ("Budget has been exceeded! " + "a " * 100_000).encode(),
]


@pytest.mark.parametrize("status", [400, 422, 429, 200, 500])
@pytest.mark.parametrize("body", JUNK, ids=range(len(JUNK)))
def test_junk_never_raises(status, body):
    result = parse_budget_error(status, body)
    assert result is None or isinstance(result, BudgetError)


def test_oversized_body_is_not_a_budget_error():
    big = json.dumps(openai_body("ExceededBudget: User=u over budget. Spend=1, Budget=1 " + "x" * (2 << 20), 400))
    assert parse_budget_error(400, big.encode()) is None


@pytest.mark.parametrize(
    ("message", "spend", "budget"),
    [
        ("ExceededBudget: User=u over budget. Spend=nan, Budget=10.0", None, 10.0),
        ("ExceededBudget: User=u over budget. Spend=inf, Budget=inf", None, None),
        ("ExceededBudget: User=u over budget. Spend=-1.5, Budget=10.0", None, 10.0),
        ("ExceededBudget: User=u over budget. Spend=1e400, Budget=-0.5", None, None),
        ("Budget has been exceeded! Current cost: NaN, Max budget: 5.0", None, 5.0),
    ],
)
def test_unusable_numbers_become_none(message, spend, budget):
    err = parse_budget_error(400, openai_body(message, 400))
    assert err is not None
    assert (err.spend, err.budget) == (spend, budget)


# --- classify_response ------------------------------------------------------------------------

BUDGET_BYTES = json.dumps(openai_body("Budget has been exceeded! Current cost: 10.2, Max budget: 10.0", 429)).encode()
RATE_LIMIT_BYTES = json.dumps(NEAR_MISSES[2].values[1]).encode()


@pytest.mark.parametrize("status", BUDGET_STATUSES)
def test_budget_verdict_wins_over_status(status):
    verdict = classify_response(status, {"Retry-After": "5"}, BUDGET_BYTES, NOW)
    assert verdict.kind == "budget"
    assert verdict.budget_error is not None and verdict.budget_error.spend == 10.2
    assert verdict.retry_after is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"Retry-After": "30"}, 30.0, id="delta"),
        pytest.param({"retry-after": "30"}, 30.0, id="lowercase"),
        pytest.param({"RETRY-AFTER": " 45 "}, 45.0, id="uppercase-padded"),
        pytest.param({"Retry-After": "1.5"}, 1.5, id="fractional"),
        pytest.param({}, 60.0, id="absent-default"),
        pytest.param({"Retry-After": "0"}, 1.0, id="zero-clamped-up"),
        pytest.param({"Retry-After": "999999"}, 3600.0, id="huge-clamped-down"),
        pytest.param({"Retry-After": "soon"}, 60.0, id="junk-default"),
        pytest.param({"Retry-After": "-5"}, 60.0, id="negative-default"),
        pytest.param({"Retry-After": "nan"}, 60.0, id="nan-default"),
        pytest.param({"Retry-After": ""}, 60.0, id="empty-default"),
        pytest.param({"Retry-After": formatdate(NOW + 120, usegmt=True)}, 120.0, id="http-date"),
        pytest.param({"Retry-After": formatdate(NOW + 120, usegmt=False)}, 120.0, id="http-date-numeric-zone"),
        pytest.param({"Retry-After": formatdate(NOW - 300, usegmt=True)}, 1.0, id="http-date-past"),
        pytest.param({"Retry-After": formatdate(NOW + 86400, usegmt=True)}, 3600.0, id="http-date-far"),
    ],
)
def test_rate_limit_cooldown_from_retry_after(headers, expected):
    verdict = classify_response(429, headers, RATE_LIMIT_BYTES, NOW)
    assert verdict == UpstreamVerdict("rate_limited", retry_after=pytest.approx(expected))


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (401, b'{"error":{"message":"Authentication Error","type":"auth_error","code":"401"}}', "invalid"),
        (403, b"Forbidden", "invalid"),
        (200, b'{"choices":[]}', "ok"),
        (201, None, "ok"),
        (204, b"", "ok"),
        (301, None, "ok"),
        (304, None, "ok"),
        (400, json.dumps(NEAR_MISSES[0].values[1]).encode(), "passthrough"),
        (404, b"not found", "passthrough"),
        (400, json.dumps(NEAR_MISSES[6].values[1]).encode(), "passthrough"),  # per-model budget
        (429, json.dumps(NEAR_MISSES[3].values[1]).encode(), "rate_limited"),  # session budget
        (429, json.dumps(NEAR_MISSES[5].values[1]).encode(), "rate_limited"),  # router budget
        (500, BUDGET_BYTES, "passthrough"),
        (502, b"<html>bad gateway</html>", "passthrough"),
        (503, None, "passthrough"),
    ],
)
def test_classify_by_status(status, body, kind):
    verdict = classify_response(status, {}, body, NOW)
    assert verdict.kind == kind
    assert verdict.budget_error is None


# --- properties -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=50),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
error_dicts = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["error", "budget_exceeded"]) | st.text(max_size=10),
        "error": json_values | st.fixed_dictionaries(
            {},
            optional={
                "message": st.text() | st.just("Budget has been exceeded! Current cost: 1, Max budget: 1"),
                "type": st.sampled_from(["budget_exceeded", "invalid_request_error"]) | json_values,
                "litellm_error_type": st.sampled_from(["budget_exceeded"]) | json_values,
                "code": json_values,
            },
        ),
    },
)
statuses = st.integers(min_value=-1000, max_value=1000)


@settings(max_examples=300)
@given(status=statuses, body=st.binary(max_size=2000) | st.text(max_size=2000) | error_dicts | st.none())
def test_parse_never_raises(status, body):
    result = parse_budget_error(status, body)
    assert result is None or isinstance(result, BudgetError)
    if result is not None:
        assert 400 <= status <= 499
        for value in (result.spend, result.budget):
            assert value is None or (math.isfinite(value) and value >= 0)


@settings(max_examples=300)
@given(
    status=statuses,
    headers=st.dictionaries(st.sampled_from(["Retry-After", "retry-after", "X-Other"]) | st.text(max_size=20),
                            st.text(max_size=40), max_size=4),
    body=st.binary(max_size=2000) | st.none() | error_dicts.map(lambda d: json.dumps(d).encode()),
    now=st.floats(min_value=0, max_value=4e9),
)
def test_classify_never_raises(status, headers, body, now):
    verdict = classify_response(status, headers, body, now)
    assert verdict.kind in {"ok", "budget", "rate_limited", "invalid", "passthrough"}
    assert (verdict.kind == "budget") == (verdict.budget_error is not None)
    if verdict.kind == "rate_limited":
        assert status == 429 and 1.0 <= verdict.retry_after <= 3600.0


money = st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False)
ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,35}", fullmatch=True)


@given(spend=money, budget=money, user=ids, status=st.sampled_from(BUDGET_STATUSES))
def test_round_trip_spend_budget_message(spend, budget, user, status):
    message = f"ExceededBudget: User={user} over budget. Spend={spend}, Budget={budget}"
    err = parse_budget_error(status, json.dumps(openai_body(message, status)))
    assert err is not None and (err.spend, err.budget, err.entity) == (spend, budget, "User")


@given(spend=money, budget=money, team=ids, status=st.sampled_from(BUDGET_STATUSES))
def test_round_trip_current_cost_message(spend, budget, team, status):
    message = f"Budget has been exceeded! Team={team} Current cost: {spend}, Max budget: {budget}"
    err = parse_budget_error(status, json.dumps(anthropic_body(message, status)).encode())
    assert err is not None and (err.spend, err.budget, err.entity) == (spend, budget, "Team")


@given(spend=money, limit=money)
def test_round_trip_windowed_message(spend, limit):
    message = f"ExceededBudget: Key over 1d budget. Spend=${spend:.4f}, Limit=${limit:.2f}"
    err = parse_budget_error(429, openai_body(message, 429))
    assert err is not None
    assert (err.spend, err.budget) == (float(f"{spend:.4f}"), float(f"{limit:.2f}"))
