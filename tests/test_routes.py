"""Pure trust-boundary cores: pooled vs management routes, admin path normalization, credential hygiene,
the secure default, echoed-key masking and bounded metering (issue: trust boundary)."""
from __future__ import annotations

import json
import logging
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http

from addon.core import identity
from addon.core.identity import client_identity, pool_access, redact_credentials, swap_credential
from addon.core.masking import mask_echoed_keys, mask_key
from addon.core.metering import Meter
from addon.core.routes import ExtraRoutes, is_admin_path, is_pooled, normalize_path, route_kind
from addon.core.usage import usage_from_json
from addon.operator.admin_api import parse_json_object, redact_admin_body, strict_json
from pricing.table import PriceTable

POOL = "sk-pool-0123456789abcdef"
CLIENT = "sk-client-secret-777777"


@pytest.mark.parametrize("path,kind", [
    ("/chat/completions", "llm"), ("/v1/chat/completions", "llm"), ("/v1/messages", "llm"),
    ("/v1/messages/count_tokens", "llm"), ("/responses", "llm"), ("/v1/responses/resp_1", "llm"),
    ("/embeddings?x=1", "llm"), ("/openai/deployments/gpt/chat/completions", "llm"),
    ("/v1/models", "info"), ("/models", "info"), ("/v1/model/info", "info"), ("/model/info", "info"),
    ("/anthropic/v1/messages", "passthrough"), ("/gemini/v1beta/models/x:generateContent", "passthrough"),
    ("/team/list", "management"), ("/customer/list", "management"), ("/key/info", "management"),
    ("/key/delete", "management"), ("/key/block", "management"), ("/key/regenerate", "management"),
    ("/v2/key/info", "management"), ("/user/daily/activity", "management"), ("/spend/logs", "management"),
    ("/model/new", "management"), ("/organization/list", "management"), ("/global/spend", "management"),
    ("/health", "management"),
    ("/admin/openhands/keys", "admin"), ("//admin/openhands/keys", "admin"), ("/./admin/openhands/keys", "admin"),
    ("/v1/../admin/openhands/keys", "admin"), ("/admin//openhands/keys", "admin"), ("/ADMIN/OpenHands/keys", "admin"),
    ("/%61dmin/openhands/keys", "admin"), ("/%2561dmin/openhands/keys", "admin"), ("/openhands/spend-stats", "admin"),
    ("/v1/chat/completions/../../key/delete", "other"), ("/v1/%2e%2e/key/delete", "other"),
    ("//chat/completions", "other"), ("/chat%2Fcompletions", "other"),
    ("/", "other"), ("/ui", "management"), ("/whatever", "other"),
])
def test_route_kinds(path, kind):
    assert route_kind(path) == kind


def test_only_llm_and_info_routes_are_pooled_and_extra_routes_add_some():
    assert is_pooled("/v1/chat/completions") and is_pooled("/v1/models")
    assert not is_pooled("/key/delete") and not is_pooled("/team/list")
    extra = ExtraRoutes.parse("/utils/supported_openai_params, /custom/*")
    assert is_pooled("/utils/supported_openai_params", extra) and is_pooled("/custom/a/b", extra)
    assert not is_pooled("/custom/../key/delete", extra)
    with pytest.raises(ValueError):
        ExtraRoutes.parse("key/delete")


@pytest.mark.parametrize("raw,norm", [
    ("//admin//openhands///keys", "/admin/openhands/keys"), ("/a/./b/../c", "/a/c"), ("/../../x", "/x"),
    ("/%252e%252e/%61dmin", "/admin"), ("/A\\B", "/a/b"), ("/x?y=1", "/x"),
])
def test_normalize_path(raw, norm):
    assert normalize_path(raw) == norm


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_route_helpers_never_raise_and_admin_paths_are_never_pooled(path):
    kind = route_kind(path)
    if is_admin_path(path):
        assert kind == "admin" and not is_pooled(path)


# -- credential hygiene --------------------------------------------------------------------------------
CARRIERS = [
    ("x-litellm-api-key", CLIENT, "x-litellm-api-key"), ("authorization", f"Bearer {CLIENT}", "authorization"),
    ("authorization", "Basic " + CLIENT, "authorization"), ("api-key", CLIENT, "api-key"),
    ("x-api-key", CLIENT, "x-api-key"), ("x-goog-api-key", CLIENT, "x-goog-api-key"),
    ("Ocp-Apim-Subscription-Key", CLIENT, "ocp-apim-subscription-key"),
    ("litellm_user_api_key", CLIENT, "x-litellm-api-key"), ("cookie", f"token={CLIENT}", "x-litellm-api-key"),
    ("proxy-authorization", f"Basic {CLIENT}", "x-litellm-api-key"),
]


@pytest.mark.parametrize("name,value,target", CARRIERS)
def test_every_carrier_is_removed_and_exactly_one_pool_credential_is_set(name, value, target):
    headers = http.Headers([(name.encode(), value.encode()), (b"x-other", b"kept")])
    swap_credential(headers, POOL)
    assert CLIENT not in json.dumps(list(headers.items(multi=True)))
    creds = [k.lower() for k in headers.keys() if k.lower() != "x-other"]
    assert creds == [target]  # the header the client used, else x-litellm-api-key
    assert headers[target] == (f"Bearer {POOL}" if target == "authorization" else POOL)
    assert headers["x-other"] == "kept"


def test_all_carriers_at_once_leave_one_credential_in_litellms_first_place():
    headers = http.Headers([(n.encode(), v.encode()) for n, v, _ in CARRIERS])
    swap_credential(headers, POOL)
    assert [k.lower() for k in headers.keys()] == ["x-litellm-api-key"] and headers["x-litellm-api-key"] == POOL


def test_redacted_headers_keep_no_secret():
    headers = http.Headers(authorization=f"Bearer {POOL}", cookie="a=b", **{"api-key": POOL})
    redact_credentials(headers)
    assert POOL not in json.dumps(list(headers.items())) and headers["authorization"].startswith("Bearer sk-pool-")


@pytest.mark.parametrize("allow,peer,open_pool,cred,status", [
    (frozenset(), "127.0.0.1", False, None, None), (frozenset(), "::1", False, None, None),
    (frozenset(), "::ffff:127.0.0.1", False, None, None),
    (frozenset(), "10.0.0.7", False, CLIENT, 403), (frozenset(), "10.0.0.7", True, None, None),
    (frozenset({CLIENT}), "10.0.0.7", False, CLIENT, None), (frozenset({CLIENT}), "127.0.0.1", False, "x", 401),
    (frozenset({CLIENT}), "127.0.0.1", False, None, 401),
])
def test_secure_default_serves_loopback_only_without_an_allowlist(allow, peer, open_pool, cred, status):
    headers = http.Headers(authorization=f"Bearer {cred}") if cred else http.Headers()
    refused = pool_access(headers, allow, peer, open_pool)
    assert (refused[0] if refused else None) == status
    if status == 403:
        assert "OPENHANDS_CLIENT_KEYS" in refused[1]


_NAMES = st.sampled_from(["x-litellm-api-key", "Authorization", "authorization", "API-Key", "x-api-key",
                          "X-Goog-Api-Key", "ocp-apim-subscription-key", "litellm_user_api_key", "Cookie",
                          "proxy-authorization", "x-litellm-session-id", "Accept-Encoding", "x-other"])
_VALUES = st.one_of(st.sampled_from(["", " ", "Bearer ", f"Bearer {CLIENT}", f"basic {CLIENT}", CLIENT, "s1"]),
                    st.binary(max_size=10).map(lambda b: b.decode("latin-1")))
_FIELDS = st.lists(st.tuples(_NAMES, _VALUES).map(lambda t: (t[0].encode(), t[1].encode("utf-8", "surrogateescape"))),
                   max_size=7)


@settings(max_examples=400, deadline=None)
@given(_FIELDS)
def test_one_walk_reads_headers_as_mitmproxy_folds_them_and_the_redaction_made_with_the_swap_matches(fields):
    """Identity and the credential come from one walk over the raw fields, read as `Headers.get` reads them
    (case-insensitive, repeats joined); the masked copy made with the swap is what redacting the swap gives."""
    headers = http.Headers(fields)
    scan = identity.scan_headers(headers.fields)
    assert scan.session == (headers.get("x-litellm-session-id") or "").strip()
    folded = {k.decode(): v.decode("utf-8", "surrogateescape") for k, v in scan.folded.items()}
    assert folded == {k.lower(): headers[k] for k in headers}
    swapped, redacted = identity.swap_and_redact(headers.fields, POOL, scan.used, {b"accept-encoding": b"identity"})
    assert redacted == (identity.redacted_fields(swapped) or swapped)
    sent = http.Headers(swapped)
    assert [k.lower() for k in sent if k.lower() in identity.CREDENTIAL_HEADERS + identity.SECRET_HEADERS] == \
        [next((n for n in scan.used if n in identity.SETTABLE), "x-litellm-api-key")]
    carriers = {n.encode() for n in identity.CREDENTIAL_HEADERS + identity.SECRET_HEADERS}
    assert CLIENT not in str([f for f in swapped if f[0].lower() in carriers])
    assert POOL not in str(redacted) and sent["accept-encoding"] == "identity"


def _credential_as_litellm_reads_it(headers: http.Headers) -> tuple[list[str], str | None]:
    """The plain rule: every credential header present, in LiteLLM's order; the first non-blank one's value."""
    used = [n for n in identity.CREDENTIAL_HEADERS if n in headers]
    for name in used:
        value = headers[name]
        if value.strip():
            credential = identity._credential_value(name, value)
            return used, "" if credential is None else credential
    return used, None


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_NAMES, st.one_of(_VALUES, st.sampled_from([" Bearer  x ", "BEARER y", "Bearer", "Basic ",
                                                                        "bearer\tz", "Bearer  "]))).map(
    lambda t: (t[0].encode(), t[1].encode("utf-8", "surrogateescape"))), max_size=7))
def test_the_one_walk_finds_the_credential_litellm_would_read(fields):
    """The walk notes credential headers as it meets them: the same headers, and the same credential, as
    looking each one up in LiteLLM's order."""
    headers = http.Headers(fields)
    scan = identity.scan_headers(headers.fields)
    assert (list(scan.used), scan.credential) == _credential_as_litellm_reads_it(headers)


def test_an_extra_route_is_pooled_though_the_same_path_was_refused_without_it():
    """Routes are remembered per path with no extra routes, and per (path, extra routes) with some."""
    assert route_kind("/custom/thing") == "other" and route_kind("/custom/thing", ExtraRoutes()) == "other"
    assert route_kind("/custom/thing", ExtraRoutes.parse("/custom/*")) == "llm"
    assert route_kind("/custom/thing", ExtraRoutes.parse("/custom/thing")) == "llm"
    assert route_kind("/custom/thing") == "other"


def test_query_key_is_a_credential_for_identity():
    assert client_identity(http.Headers(), "1.2.3.4", [("key", CLIENT)]).startswith("cred:")


# -- masking, metering, admin strictness ---------------------------------------------------------------
def test_an_echoed_pool_key_is_masked():
    body = json.dumps({"error": {"message": "Expired Key", "param": POOL}}).encode()
    out, n = mask_echoed_keys(body, [POOL, "short"])
    assert n == 1 and POOL.encode() not in out and mask_key(POOL).encode() in out


@pytest.mark.parametrize("usage,header", [
    ({"prompt_tokens": 10 ** 400, "completion_tokens": 5}, None),
    ({"prompt_tokens": 2 * 10 ** 9, "completion_tokens": 5}, None),
    ({"prompt_tokens": 10, "completion_tokens": 5, "cost": 1e308}, None),
    ({"prompt_tokens": 10, "completion_tokens": 5}, "1e308"),
    ({"prompt_tokens": 10, "completion_tokens": 5}, "inf"),
    ({"prompt_tokens": 10, "completion_tokens": 5}, "-3"),
    ({"prompt_tokens": 999_999_999, "completion_tokens": 999_999_999}, None),  # $15k by the table: absurd
])
def test_absurd_numbers_are_dropped_with_one_warning_per_key(usage, header, caplog):
    meter = Meter(PriceTable.load_bundled(), (3.0, 15.0))
    u = usage_from_json("chat", {"model": "claude-sonnet-4-5", "usage": usage})
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            c = meter.charge(u, header, "claude-sonnet-4-5", key_id="k1")
            assert math.isfinite(c.cost) and 0 <= c.cost <= 1000
    assert sum("key k1" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("raw", [
    b'{"id":"k1","apiKey":"' + POOL.encode() + b'",}', b"apiKey=" + POOL.encode(), POOL.encode(),
    b'{"id":"k1","apikey":"' + POOL.encode() + b'"}', b'{"id":"' + POOL.encode() + b'","apiKey":"x"}',
    b'[{"apiKey":"' + POOL.encode() + b'"}]', b'{"a":{"b":["' + POOL.encode() + b'"]}}',
])
def test_admin_body_redaction_leaves_no_full_key_whatever_the_form(raw):
    assert POOL.encode() not in redact_admin_body(raw)


def test_admin_answers_are_strict_json():
    assert json.dumps(strict_json({"a": [math.inf, math.nan, 1.5], "b": {"c": -math.inf}}), allow_nan=False) == \
        '{"a": [null, null, 1.5], "b": {"c": null}}'


@pytest.mark.parametrize("raw", [b"[" * 60_000, b'{"a":' * 40 + b"1" + b"}" * 40, b'{"x": 1' + b"0" * 400 + b"}"])
def test_admin_bodies_too_deep_or_huge_are_a_400(raw):
    from addon.operator.admin_api import ApiError

    with pytest.raises(ApiError) as e:
        parse_json_object(raw)
    assert e.value.status == 400
