"""The admin auth rule and the dashboard's sign-in/sign-out answers (pure: no process, no clock)."""
from __future__ import annotations

import re

import pytest

from addon.operator import admin_auth as aa

TOKEN = "admin-token-0123456789"
NOW = 1_760_000_000.0
LOOP, REMOTE = "127.0.0.1", "203.0.113.9"


def session(issued: float = NOW) -> str:
    return aa.session_value(TOKEN, int(issued))


def hdrs(**kw: str) -> dict[str, str]:
    return {k.replace("_", "-"): v for k, v in kw.items()}


@pytest.mark.parametrize("method,headers,peer,token,metrics_loopback,allowed,via,status", [
    # no token configured: loopback only, whatever is sent
    ("GET", {}, LOOP, None, False, True, "loopback", 200),
    ("DELETE", {}, "::1", None, False, True, "loopback", 200),
    ("GET", {}, "::ffff:127.0.0.1", None, False, True, "loopback", 200),
    ("GET", hdrs(authorization=f"Bearer {TOKEN}"), REMOTE, None, False, False, "", 401),
    # a token: the bearer header, in full, from anywhere
    ("POST", hdrs(authorization=f"Bearer {TOKEN}"), REMOTE, TOKEN, False, True, "bearer", 200),
    ("POST", hdrs(authorization=f"bearer {TOKEN}"), REMOTE, TOKEN, False, True, "bearer", 200),
    ("GET", hdrs(authorization=f"Bearer {TOKEN[:-1]}"), LOOP, TOKEN, False, False, "", 401),
    ("GET", hdrs(authorization=f"Bearer {TOKEN}x"), LOOP, TOKEN, False, False, "", 401),
    ("GET", hdrs(authorization="Bearer "), LOOP, TOKEN, False, False, "", 401),
    ("GET", {}, LOOP, TOKEN, False, False, "", 401),  # loopback is no longer enough
    # the sign-in cookie: reads only
    ("GET", hdrs(cookie=f"{aa.COOKIE_NAME}={session()}"), REMOTE, TOKEN, False, True, "cookie", 200),
    ("HEAD", hdrs(cookie=f"other=1; {aa.COOKIE_NAME}={session()}"), REMOTE, TOKEN, False, True, "cookie", 200),
    ("POST", hdrs(cookie=f"{aa.COOKIE_NAME}={session()}"), REMOTE, TOKEN, False, False, "", 403),
    ("DELETE", hdrs(cookie=f"{aa.COOKIE_NAME}={session()}"), LOOP, TOKEN, False, False, "", 403),
    ("PATCH", hdrs(cookie=f"{aa.COOKIE_NAME}={session()}"), LOOP, TOKEN, False, False, "", 403),
    # forged, expired, future or foreign-token cookies
    ("GET", hdrs(cookie=f"{aa.COOKIE_NAME}={int(NOW)}.{'0' * 64}"), REMOTE, TOKEN, False, False, "", 401),
    ("GET", hdrs(cookie=f"{aa.COOKIE_NAME}={session(NOW - aa.SESSION_TTL_S - 1)}"), REMOTE, TOKEN, False, False, "",
     401),
    ("GET", hdrs(cookie=f"{aa.COOKIE_NAME}={session(NOW + 3600)}"), REMOTE, TOKEN, False, False, "", 401),
    ("GET", hdrs(cookie=f"{aa.COOKIE_NAME}={aa.session_value('another-token-123', int(NOW))}"), REMOTE, TOKEN, False,
     False, "", 401),
    # the token itself is no cookie
    ("GET", hdrs(cookie=f"{aa.COOKIE_NAME}={TOKEN}"), REMOTE, TOKEN, False, False, "", 401),
    # a wrong bearer is refused even with a valid cookie (no silent fallback)
    ("GET", hdrs(authorization="Bearer nope", cookie=f"{aa.COOKIE_NAME}={session()}"), LOOP, TOKEN, False, False, "",
     401),
    # /metrics with the loopback option: loopback in without the token, others still need it
    ("GET", {}, LOOP, TOKEN, True, True, "loopback", 200),
    ("GET", {}, REMOTE, TOKEN, True, False, "", 401),
    ("GET", hdrs(authorization=f"Bearer {TOKEN}"), REMOTE, TOKEN, True, True, "bearer", 200),
])
def test_the_rule(method, headers, peer, token, metrics_loopback, allowed, via, status):
    d = aa.decide(method, headers, peer, token, NOW, loopback_without_token=metrics_loopback)
    assert (d.allowed, d.via, d.status) == (allowed, via, status)
    if not allowed:
        assert d.message and TOKEN not in d.message


def form(token: str) -> bytes:
    from urllib.parse import urlencode

    return urlencode({"token": token}).encode()


FORM = {"content-type": "application/x-www-form-urlencoded", "host": "127.0.0.1:8080"}


def test_signing_in_sets_an_httponly_strict_cookie_scoped_to_the_admin_path():
    a = aa.answer_session("POST", aa.LOGIN_PATH, {**FORM, "origin": "http://127.0.0.1:8080",
                                                  "sec-fetch-site": "same-origin"}, form(TOKEN), TOKEN, NOW)
    assert a.status == 303 and a.headers["location"] == "/admin/openhands/"
    cookie = a.headers["set-cookie"]
    attrs = [p.strip() for p in cookie.split(";")]
    assert attrs[0].startswith(aa.COOKIE_NAME + "=")
    assert {"HttpOnly", "SameSite=Strict", "Path=/admin/openhands/", f"Max-Age={aa.SESSION_TTL_S}"} <= set(attrs)
    assert "Secure" not in attrs
    assert TOKEN not in cookie  # the cookie is a MAC, never the token
    value = attrs[0].split("=", 1)[1]
    assert aa.decide("GET", {"cookie": f"{aa.COOKIE_NAME}={value}"}, REMOTE, TOKEN, NOW + 60).allowed
    secure = aa.answer_session("POST", aa.LOGIN_PATH, FORM, form(TOKEN), TOKEN, NOW, secure=True)
    assert "Secure" in secure.headers["set-cookie"]


@pytest.mark.parametrize("headers,body,status,shown", [
    (FORM, form("wrong-token-000"), 401, "Wrong admin token."),
    (FORM, form(""), 401, "Enter the admin token."),
    ({"content-type": "application/json"}, b'{"token": "%s"}' % TOKEN.encode(), 401, "Enter the admin token."),
    (FORM, b"token=" + b"x" * 5000, 401, "Enter the admin token."),
    ({**FORM, "origin": "https://evil.example"}, form(TOKEN), 403, "not posted from this sidecar"),
    ({**FORM, "sec-fetch-site": "cross-site"}, form(TOKEN), 403, "not posted from this sidecar"),
    ({**FORM, "origin": "null"}, form(TOKEN), 403, "not posted from this sidecar"),
])
def test_a_refused_sign_in_sets_no_cookie_and_says_why(headers, body, status, shown):
    a = aa.answer_session("POST", aa.LOGIN_PATH, headers, body, TOKEN, NOW)
    assert a.status == status and "set-cookie" not in a.headers
    page = a.body.decode()
    assert shown in page and 'id="login-form"' in page and TOKEN not in page


def test_the_sign_in_form_page():
    a = aa.answer_session("GET", aa.LOGIN_PATH, {}, None, TOKEN, NOW)
    page = a.body.decode()
    assert a.status == 200 and a.headers["content-type"].startswith("text/html")
    assert re.search(r'<form method="post" action="/admin/openhands/login"', page)
    assert 'type="password"' in page and 'name="token"' in page
    assert "frame-ancestors 'none'" in a.headers["content-security-policy"]
    no_token = aa.answer_session("GET", aa.LOGIN_PATH, {}, None, None, NOW).body.decode()
    assert "No admin token is configured" in no_token and "<form" not in no_token


def test_signing_out_clears_the_cookie():
    a = aa.answer_session("POST", aa.LOGOUT_PATH, {"host": "h", "origin": "http://h"}, b"", TOKEN, NOW)
    assert a.status == 303 and a.headers["location"] == aa.LOGIN_PATH
    assert f"{aa.COOKIE_NAME}=;" in a.headers["set-cookie"] and "Max-Age=0" in a.headers["set-cookie"]
    assert aa.answer_session("GET", aa.LOGOUT_PATH, {}, None, TOKEN, NOW).status == 405
    assert aa.answer_session("POST", aa.LOGOUT_PATH, {"sec-fetch-site": "cross-site"}, b"", TOKEN, NOW).status == 403


def test_a_browser_without_a_session_gets_the_form_an_api_client_gets_json():
    refused = aa.decide("GET", {}, REMOTE, TOKEN, NOW)
    page = aa.refusal(refused, "GET", "/admin/openhands/", {"accept": "text/html,application/xhtml+xml"})
    assert page is not None and page.status == 401 and b'id="login-form"' in page.body
    assert aa.refusal(refused, "GET", "/admin/openhands/", {"accept": "application/json"}) is None
    assert aa.refusal(refused, "GET", "/admin/openhands/keys", {"accept": "text/html"}) is None
    forbidden = aa.decide("POST", {"cookie": f"{aa.COOKIE_NAME}={session()}"}, REMOTE, TOKEN, NOW)
    assert aa.refusal(forbidden, "POST", "/admin/openhands/", {"accept": "text/html"}) is None


@pytest.mark.parametrize("headers,local_hosts,ok", [
    ({"sec-fetch-site": "same-origin", "origin": "http://127.0.0.1:8080", "host": "upstream:443"}, [], True),
    ({"sec-fetch-site": "none"}, [], True),
    ({"sec-fetch-site": "same-site", "origin": "http://127.0.0.1:8080", "host": "127.0.0.1:8080"}, [], False),
    # no Sec-Fetch-Site (older browsers): Origin must be us; in reverse mode Host is the upstream's
    ({"origin": "http://127.0.0.1:8080", "host": "llm-proxy.example:443"}, [], False),
    ({"origin": "http://127.0.0.1:8080", "host": "llm-proxy.example:443"}, ["127.0.0.1:8080"], True),
    ({"origin": "http://localhost:8080", "host": "llm-proxy.example:443"}, ["localhost:8080"], True),
    ({"origin": "http://evil.example", "host": "llm-proxy.example:443"}, ["127.0.0.1:8080"], False),
    ({}, [], True),  # not a browser: nothing to forge
])
def test_same_origin(headers, local_hosts, ok):
    assert aa.same_origin(headers, local_hosts) is ok
