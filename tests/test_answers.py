"""Upstream answer classification by scope (reference/litellm-errors.md §1, §2, §6), table-driven.

Every LiteLLM template maps to one scope and one action; echoed client input that imitates a
template (a model name, an end-user id, a route) is never a key fault; numbers come only from the
template's own positions and must be finite, non-negative and plausible.
"""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addon.core.answers import KeyContext, classify_response, key_hash, parse_budget_error, parse_retry_after

NOW = 1_700_000_000.0
POOL = "sk-pool-0123456789abcdef"
H = key_hash(POOL)
OTHER_H = key_hash("sk-someone-else-000000")
KEY = KeyContext(POOL, max_budget=10.0, settled_spend=9.96)


def body(message, etype="budget_exceeded", status=400, param=None):
    return json.dumps({"error": {"message": message, "type": etype, "param": param, "code": str(status)}}).encode()


def anthropic(message, etype="budget_exceeded"):
    return json.dumps({"type": "error", "error": {"type": "invalid_request_error", "message": message,
                                                  "litellm_error_type": etype}}).encode()


# (id, status, type, message, scope, kind, calibrated (spend, budget) or None)
TEMPLATES = [
    ("K1", 401, "token_not_found_in_db",
     f"Authentication Error, Invalid proxy server token passed. Received API Key = sk-...cdef, Key Hash (Token) ={H}. "
     "Unable to find token in cache or `LiteLLM_VerificationTokenTable`", "key_dead", "invalid", None),
    ("K1-1.110", 401, "token_not_found_in_db", "Authentication Error, Invalid API key provided.",
     "key_dead", "invalid", None),
    ("K2", 400, "expired_key", "Authentication Error - Expired Key. Key Expiry time 2025-01-01 00:00:00 and current "
     "time 2025-06-01 00:00:00", "key_dead", "invalid", None),
    ("K3", 401, "auth_error", "Authentication Error, Key is blocked. Update via `/key/unblock` if you're admin.",
     "key_dead", "invalid", None),
    ("K3-1.105", 401, "auth_error", "Authentication Error, Key is blocked. Update via `/key/unblock` if you're an "
     "admin.", "key_dead", "invalid", None),
    ("O1", 401, "auth_error", "Authentication Error, Team=team-9 is blocked. Update via `/team/unblock` if your admin.",
     "key_dead", "invalid", None),
    ("O2", 401, "auth_error", "Authentication Error, User=u-1 has been deactivated via SCIM. Keys owned by this user "
     "cannot be used.", "key_dead", "invalid", None),
    ("B1-key", 400, "budget_exceeded", "Budget has been exceeded! Current cost: 10.0123, Max budget: 10.0",
     "key_budget", "budget", (10.0123, 10.0)),
    ("B1-owner", 400, "budget_exceeded", "Budget has been exceeded! Current cost: 50.5, Max budget: 50.0",
     "owner_budget", "budget", None),
    ("B2", 422, "budget_exceeded", "Budget has been exceeded! Key=ci (ci-key = sk-...cdef) Current cost: 10.02, "
     "Max budget: 10.0", "key_budget", "budget", (10.02, 10.0)),
    ("B2-1.110", 422, "budget_exceeded", "Budget has been exceeded! Key=key (sk-...cdef) Current cost: "
     "10.05084999999999994, Max budget: 10.0", "key_budget", "budget", (10.05084999999999994, 10.0)),
    ("B3", 429, "budget_exceeded", "ExceededBudget: Key over 1d budget. Spend=$5.0012, Limit=$5.00",
     "key_budget", "budget", None),
    ("B4-spent", 422, "budget_exceeded", f"Budget has been exceeded! Key={H} Current cost: 10.2, Max budget: 10.0",
     "key_budget", "budget", None),
    ("B4-estimate", 422, "budget_exceeded", f"Budget has been exceeded! Key={H} Current cost: 9.2, Estimated request "
     "cost: 0.9, Max budget: 10.0", "key_busy", "busy", None),
    ("B5-user", 400, "budget_exceeded", "ExceededBudget: User=u-1 over budget. Spend=10.5123, Budget=10.0",
     "owner_budget", "budget", (10.5123, 10.0)),
    ("B5-user-shared", 400, "budget_exceeded", "ExceededBudget: User=u-1 over budget. Spend=100.5, Budget=100.0",
     "owner_budget", "budget", None),
    ("B5-team", 429, "budget_exceeded", "Budget has been exceeded! Team=org-1 Current cost: 10.2, Max budget: 10.0",
     "owner_budget", "budget", (10.2, 10.0)),
    ("B6-member", 422, "budget_exceeded", "Budget has been exceeded! User=u-1 in Team=t-1 Current cost: 7.5, Max "
     "budget: 7.0", "owner_budget", "budget", None),
    ("B6-teammember", 422, "budget_exceeded", "Budget has been exceeded! TeamMember=u-1:t-1 Current cost: 7.5, Max "
     "budget: 7.0", "owner_budget", "budget", None),
    ("B6-org", 422, "budget_exceeded", "Budget has been exceeded! Organization=o-1 Current cost: 100.5, Max budget: "
     "100.0", "owner_budget", "budget", None),
    ("B6-project", 422, "budget_exceeded", "Budget has been exceeded! Project=p-1 Current cost: 12.0, Max budget: "
     "12.0", "owner_budget", "budget", None),
    ("B6-window", 422, "budget_exceeded", "ExceededBudget: Team=t-1 over 7d budget. Spend=$50.1, Limit=$50.00",
     "owner_budget", "budget", None),
    ("R1-key", 429, "None", f"Rate limit exceeded for api_key: {H}. Limit type: requests. Current limit: 60, "
     "Remaining: 0. Limit resets at: 2025-11-20 10:00:00 UTC", "key_rate", "rate_limited", None),
    ("R1-key-model", 429, "throttling_error", f"Rate limit exceeded for model_per_key: {H}:claude-sonnet-4-5. Limit "
     "type: tokens. Current limit: 1000, Remaining: 0. Limit resets at: 2025-11-20 10:00:00 UTC",
     "key_rate", "rate_limited", None),
    ("R1-disabled", 429, "None", f"Rate limit exceeded for api_key: {H}. Limit type: requests. Current limit: 0, "
     "Remaining: 0. Limit resets at: 2025-11-20 10:00:00 UTC", "key_dead", "invalid", None),
    ("R1-team", 429, "None", "Rate limit exceeded for team: t-1. Limit type: requests. Current limit: 600, "
     "Remaining: 0. Limit resets at: 2025-11-20 10:00:00 UTC", "key_rate", "rate_limited", None),
    ("R1-end-user", 429, "None", "Rate limit exceeded for end_user: cust-1. Limit type: requests. Current limit: 5, "
     "Remaining: 0. Limit resets at: 2025-11-20 10:00:00 UTC", "request", "passthrough", None),
    ("Q1", 400, "budget_exceeded", "ExceededBudget: End User=cust-1 over budget. Spend=5.01, Budget=5.0",
     "request", "passthrough", None),
    ("Q1-reservation", 422, "budget_exceeded", "Budget has been exceeded! EndUser=cust-1 Current cost: 5.01, Max "
     "budget: 5.0", "request", "passthrough", None),
    ("Q2", 400, "budget_exceeded", "Budget has been exceeded! Tag=prod Current cost: 3, Max budget: 2",
     "request", "passthrough", None),
    ("Q2-group", 422, "budget_exceeded", "Budget has been exceeded! Model access group=g Current cost: 3, Max "
     "budget: 2", "request", "passthrough", None),
    ("Q3", 400, "budget_exceeded", f"LiteLLM Virtual Key: {H}, key_alias: ci, exceeded budget for model=gpt-5",
     "request", "passthrough", None),
    ("Q4", 401, "key_model_access_denied", "key not allowed to access model. This key can only access models="
     "['gpt-5']. Tried to access claude-opus", "request", "passthrough", None),
    ("Q4-1.105", 403, "key_model_access_denied", "The requested model 'x' is not available for this API key, or the "
     "model name is invalid. Check the models available to you and try again.", "request", "passthrough", None),
    ("Q4-team", 401, "team_model_access_denied", "Team not allowed to access model. This Team can only access "
     "models=['a']. Tried to access b", "request", "passthrough", None),
    ("Q5", 401, "auth_error", "Authentication Error, Only proxy admin can be used to generate, delete, update info "
     "for new keys/users/teams. Route=/team/list. Your role=internal_user. Your user_id=u-1", "request",
     "passthrough", None),
    ("Q6", 401, "auth_error", "Authentication Error, Tried to access route=/global/spend, which is only for MASTER "
     "KEY", "request", "passthrough", None),
    ("Q8", 403, "auth_error", "key not allowed to access this user's info. user_id=x, key's user_id=u-1",
     "request", "passthrough", None),
    ("Q9", 401, "auth_error", "Authentication Error, Rejected Request: api_base is not allowed in request body.",
     "request", "passthrough", None),
    ("Q9-user", 401, "auth_error", "Authentication Error, 'user' param not passed in. 'enforce_user_param'=True",
     "request", "passthrough", None),
    ("Q10", 403, "auth_error", "Access forbidden: IP address 10.0.0.9 not allowed.", "request", "passthrough", None),
    ("Q11", 400, "None", "{'error': '/chat/completions: Invalid model name passed in model=nope. Call `/v1/models` to "
     "view available models for your key.'}", "request", "passthrough", None),
    ("S1", 401, "auth_error", "Authentication Error, No api key passed in.", "sidecar", "passthrough", None),
    ("S1-malformed", 401, "auth_error", "Authentication Error, Malformed API Key passed in. Ensure Key has `Bearer ` "
     "prefix.", "sidecar", "passthrough", None),
    ("S2", 400, "no_db_connection", "No connected db.", "sidecar", "passthrough", None),
    ("U1", 401, None, "litellm.AuthenticationError: AuthenticationError: AnthropicException - invalid x-api-key. "
     "Received Model Group=claude-sonnet-4-5\nAvailable Model Group Fallbacks=None", "provider", "passthrough", None),
    ("U2", 429, "None", "No deployments available for selected model, Try again in 5 seconds. Passed model=x. "
     "pre-call-checks=False, cooldown_list=[]", "provider", "passthrough", None),
    ("U3", 400, "budget_exceeded", "litellm.BadRequestError: OpenAIException - Budget has been exceeded! Current "
     "cost: 10.5, Max budget: 10.0", "provider", "passthrough", None),
    ("unknown-budget", 400, "budget_exceeded", "Your team is out of money, talk to finance", "unknown_budget",
     "passthrough", None),
]


@pytest.mark.parametrize("tid,status,etype,message,scope,kind,calibrated", TEMPLATES, ids=[t[0] for t in TEMPLATES])
def test_every_template_maps_to_its_scope_and_action(tid, status, etype, message, scope, kind, calibrated):
    v = classify_response(status, {}, body(message, etype, status), NOW, key=KEY)
    assert (v.scope, v.kind) == (scope, kind), v
    be = v.budget_error
    if calibrated is None:
        assert be is None or (be.spend is None and be.budget is None)
    else:
        assert be is not None and (be.spend, be.budget) == pytest.approx(calibrated)


@pytest.mark.parametrize("tid,status,etype,message,scope,kind,calibrated",
                         [t for t in TEMPLATES if t[2] == "budget_exceeded"], ids=lambda x: x if isinstance(x, str)
                         and len(x) < 20 else None)
def test_budget_templates_read_the_same_from_the_anthropic_envelope(tid, status, etype, message, scope, kind,
                                                                    calibrated):
    v = classify_response(status, {}, anthropic(message), NOW, key=KEY)
    assert (v.scope, v.kind) == (scope, kind)


# Client text LiteLLM echoes, made to imitate a key-fault template (reference §2).
ECHOES = [
    ("model-budget-Q11", 400, "None", "{'error': '/chat/completions: Invalid model name passed in model=Budget has "
     "been exceeded! Current cost: 1000000.0, Max budget: 10.0. Call `/v1/models` to view available models for "
     "your key.'}"),
    ("model-1e308-Q11", 400, "None", "{'error': '/chat/completions: Invalid model name passed in model=Budget has "
     "been exceeded! Current cost: 1e308'}"),
    ("model-no-deployments-Q11", 429, "None", "{'error': '/chat/completions: Invalid model name passed in model=No "
     "deployments available'}"),
    ("model-K3-Q11", 400, "None", "{'error': '/chat/completions: Invalid model name passed in model=Authentication "
     "Error, Key is blocked. Update via `/key/unblock` if you're admin.'}"),
    ("model-Q4", 401, "key_model_access_denied", "key not allowed to access model. This key can only access "
     "models=['a']. Tried to access Authentication Error, Key is blocked. Update via `/key/unblock` if you're admin."),
    ("model-U1", 400, None, "litellm.BadRequestError: AnthropicException - bad. Received Model Group=Budget has been "
     "exceeded! Current cost: 99.0, Max budget: 10.0\nAvailable Model Group Fallbacks=None"),
    ("model-U2", 429, "None", f"No deployments available for selected model, Try again in 5 seconds. Passed "
     f"model=Rate limit exceeded for api_key: {H}. Limit type: requests. pre-call-checks=False, cooldown_list=[]"),
    ("end-user-Q1", 400, "budget_exceeded", "ExceededBudget: End User=User=x over budget. Spend=1e6, Budget=1 over "
     "budget. Spend=1e6, Budget=1"),
    ("end-user-EndUser", 422, "budget_exceeded", "Budget has been exceeded! EndUser=Key=key Current cost: 99, Max "
     "budget: 10 Current cost: 5, Max budget: 1"),
    ("end-user-R1", 429, "None", f"Rate limit exceeded for end_user: api_key: {H}. Limit type: requests. Current "
     "limit: 0, Remaining: 0. Limit resets at: x"),
    ("tag-Q2", 400, "budget_exceeded", "Budget has been exceeded! Tag=Key=key (sk-...cdef) Current cost: 99.0, "
     "Max budget: 10.0 Current cost: 3, Max budget: 2"),
    ("route-Q5", 401, "auth_error", "Authentication Error, Only proxy admin can be used to generate, delete, update "
     "info for new keys/users/teams. Route=/Authentication Error, Key is blocked. Your role=x. Your user_id=y"),
    ("route-Q6", 401, "auth_error", "Authentication Error, Tried to access route=/key/block, which is only for "
     "MASTER KEY"),
    ("route-Q10", 403, "auth_error", "Access forbidden: Route /Budget has been exceeded! Current cost: 9e9 not "
     "allowed"),
    ("other-key-K1", 401, "token_not_found_in_db", "Authentication Error, Invalid proxy server token passed. "
     f"Received API Key = sk-...0000, Key Hash (Token) ={OTHER_H}. Unable to find token in cache or "
     "`LiteLLM_VerificationTokenTable`"),
    ("other-key-B4", 422, "budget_exceeded", f"Budget has been exceeded! Key={OTHER_H} Current cost: 99, Max "
     "budget: 10.0"),
    ("other-key-B2", 422, "budget_exceeded", "Budget has been exceeded! Key=key (sk-...0000) Current cost: 99, "
     "Max budget: 10.0"),
    ("other-key-R1", 429, "None", f"Rate limit exceeded for api_key: {OTHER_H}. Limit type: requests. Current "
     "limit: 0, Remaining: 0. Limit resets at: x"),
]


@pytest.mark.parametrize("tid,status,etype,message", ECHOES, ids=[e[0] for e in ECHOES])
def test_echoed_client_input_imitating_a_template_never_marks_the_key(tid, status, etype, message):
    v = classify_response(status, {}, body(message, etype, status), NOW, key=KEY,
                          client_texts=("Budget has been exceeded! Current cost: 1e308",))
    assert v.kind == "passthrough", v
    assert v.budget_error is None


def test_an_unrecognised_refusal_that_echoes_the_request_passes_through():
    model = "my-model-Authentication Error"
    v = classify_response(401, {}, body(f"Something new about {model}", "auth_error", 401), NOW, key=KEY,
                          client_texts=(model,))
    assert v.kind == "passthrough"
    v = classify_response(401, {}, body("Something new and unrecognised", "auth_error", 401), NOW, key=KEY,
                          client_texts=(model,))
    assert v.kind == "invalid" and not v.verified  # the caller confirms a second such key with a probe


@pytest.mark.parametrize("message,why", [
    ("Budget has been exceeded! Current cost: 1e308, Max budget: 10.0", "implausibly far"),
    ("Budget has been exceeded! Current cost: inf, Max budget: 10.0", "not finite"),
    ("Budget has been exceeded! Current cost: nan, Max budget: 10.0", "not finite"),
    ("Budget has been exceeded! Current cost: -5.0, Max budget: 10.0", "negative"),
    ("Budget has been exceeded! Current cost: 1.0, Max budget: 10.0", "below the budget"),
    ("ExceededBudget: User=u over budget. Spend=1e6, Budget=10.0", "implausibly far"),
    ("Budget has been exceeded! Key=key (sk-...cdef) Current cost: 12345.0, Max budget: 10.0", "implausibly far"),
])
def test_implausible_numbers_are_ignored_with_a_warning(message, why):
    v = classify_response(400, {}, body(message), NOW, key=KEY)
    assert v.kind == "budget"
    assert v.budget_error.spend is None and v.budget_error.budget is None
    assert any(why in w for w in v.warnings), v.warnings


def test_bare_template_is_the_key_only_when_max_budget_is_the_keys():
    msg = body("Budget has been exceeded! Current cost: 20.01, Max budget: 20.0")
    assert classify_response(400, {}, msg, NOW, key=KEY).scope == "owner_budget"
    assert classify_response(400, {}, msg, NOW, key=KeyContext(POOL, 20.0)).scope == "key_budget"
    # the route-level header tells the key's max budget when the pool does not know it
    for known in (None, 10.0):
        v = classify_response(400, {"x-litellm-key-max-budget": "20.0"}, msg, NOW, key=KeyContext(POOL, known))
        assert v.scope == "key_budget" and v.budget_error.spend == pytest.approx(20.01)


@pytest.mark.parametrize("settled,in_flight,current,kind", [
    (0.006, 1, 0.295784, "busy"),  # 1.110: a concurrent request while one is in flight
    (0.006, 0, 0.295784, "busy"),  # cost far above settled spend: a reservation, not spend
    (0.0126, 1, 0.010000000000000009, "busy"),
    (0.05, 0, 0.05, "budget"),  # nothing in flight, no budget left by the meter: spent
    (0.06, 2, 0.3, "budget"),
])
def test_reservation_refusal_is_key_busy_unless_the_meter_says_spent(settled, in_flight, current, kind):
    key = KeyContext(POOL, 0.05, settled, in_flight)
    msg = body(f"Budget has been exceeded! Key={H} Current cost: {current}, Max budget: 0.05", status=422)
    v = classify_response(422, {}, msg, NOW, key=key)
    assert v.kind == kind and v.verified
    if kind == "budget":
        assert v.budget_error.spend is None  # Current cost includes reservations: never calibrates


def test_expired_key_param_must_be_this_key():
    msg = "Authentication Error - Expired Key. Key Expiry time a and current time b"
    assert classify_response(400, {}, body(msg, "expired_key", param=POOL), NOW, key=KEY).verified
    assert classify_response(400, {}, body(msg, "expired_key", param="sk-...cdef"), NOW, key=KEY).verified
    v = classify_response(400, {}, body(msg, "expired_key", param="sk-client-own-key-1"), NOW, key=KEY)
    assert v.kind == "passthrough"


@pytest.mark.parametrize("raw,kind", [
    (b"[1,2]", "passthrough"), (b'"Budget has been exceeded! Current cost: 9, Max budget: 1"', "passthrough"),
    (b"Budget has been exceeded! Current cost: 99, Max budget: 1", "passthrough"), (b"", "passthrough"),
    (b'{"detail":"Virtual key is not allowed to call this route."}', "passthrough"),
    (b"\xff\xfe{{", "passthrough"), (b"[" * 100000, "passthrough"),
])
def test_only_an_error_object_is_classified(raw, kind):
    for status in (400, 401, 403, 422):
        assert classify_response(status, {}, raw, NOW, key=KEY).kind == kind


@pytest.mark.parametrize("status,kind", [(200, "ok"), (302, "ok"), (500, "passthrough"), (503, "passthrough")])
def test_other_statuses(status, kind):
    assert classify_response(status, {}, body("Budget has been exceeded! Current cost: 11, Max budget: 10"), NOW,
                             key=KEY).kind == kind


def test_unknown_429_cools_down_with_its_retry_after():
    v = classify_response(429, {"Retry-After": "7"}, body("Rate limit reached for requests", "rate_limit_error"), NOW)
    assert v.kind == "rate_limited" and v.retry_after == 7.0


@pytest.mark.parametrize("headers,expected", [
    ({}, 60.0), ({"retry-after": "0"}, 1.0), ({"retry-after": "1e9"}, 3600.0), ({"retry-after": "nan"}, 60.0),
    ({"retry-after": "1" * 400}, 60.0), ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 1.0),
])
def test_retry_after_is_bounded(headers, expected):
    assert parse_retry_after(headers.get("retry-after"), NOW) == expected


def test_parse_budget_error_keeps_the_spend_checkers_contract():
    be = parse_budget_error(400, body("ExceededBudget: User=u over budget. Spend=10.5, Budget=10.0"),
                            KeyContext(POOL, 10.0))
    assert be is not None and be.spend == 10.5
    assert parse_budget_error(400, body("ExceededBudget: End User=u over budget. Spend=10.5, Budget=10.0")) is None
    assert parse_budget_error(200, body("x")) is None


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=-5, max_value=700) | st.sampled_from([400, 401, 403, 422, 429]),
       st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                 st.builds(lambda m, t: body(m, t), st.text(max_size=120), st.sampled_from(
                     ["budget_exceeded", "auth_error", None, "None", "expired_key", "token_not_found_in_db"]))))
def test_never_raises_and_numbers_are_sane(status, raw):
    v = classify_response(status, {"retry-after": "x"}, raw, NOW, key=KEY, client_texts=("abc",))
    assert v.kind in ("ok", "budget", "rate_limited", "invalid", "busy", "passthrough")
    if v.budget_error is not None:
        for n in (v.budget_error.spend, v.budget_error.budget):
            assert n is None or (math.isfinite(n) and 0 <= n <= 10.0 + 1000.0)
