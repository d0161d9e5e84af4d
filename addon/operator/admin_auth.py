"""Who may use the admin API, the dashboard and `/metrics`; the dashboard's sign-in and sign-out.

The rule (pure, no I/O):
- no admin token configured: loopback clients only, for everything;
- `Authorization: Bearer <token>`, compared in constant time: everything;
- the dashboard's session cookie (set by the sign-in form): reads only (GET/HEAD). A state-changing
  request still needs the bearer header; the one form that changes something (sign-out) is checked
  for same-origin, and the cookie is `SameSite=Strict`, so another site cannot ride on it;
- `GET /metrics`: the same rule, plus an option that lets loopback scrapers in without the token.

The cookie never holds the token: it is `<issued>.<HMAC-SHA256(token, issued)>`, valid for
SESSION_TTL_S, stateless (several sidecars with one token accept each other's cookies) and void as soon
as the token changes. It is `HttpOnly; SameSite=Strict; Path=/admin/openhands/` (and `Secure` over TLS).
"""
from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping
from urllib.parse import parse_qs, urlsplit

from addon.core.dashboard import render_login
from addon.core.identity import is_loopback

ADMIN_PATH = "/admin/openhands/"
DASHBOARD_PATHS = ("/admin/openhands", "/admin/openhands/")
LOGIN_PATH = "/admin/openhands/login"
LOGOUT_PATH = "/admin/openhands/logout"
METRICS_PATH = "/metrics"
COOKIE_NAME = "openhands_admin_session"
SESSION_TTL_S = 12 * 3600
SAFE_METHODS = frozenset({"GET", "HEAD"})
MAX_FORM_BYTES = 4096
_SESSION_CONTEXT = b"openhands-admin-session:"


# -- pure helpers -------------------------------------------------------------------------------


def token_matches(candidate: str | None, token: str) -> bool:
    """Constant time in the token's content (lengths may differ: compare digests)."""
    if candidate is None:
        return False
    return hmac.compare_digest(hashlib.sha256(candidate.encode("utf-8", "replace")).digest(),
                               hashlib.sha256(token.encode()).digest())


def bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if not value or value[:7].lower() != "bearer ":
        return None
    return value[7:].strip()


def session_value(token: str, issued: int) -> str:
    mac = hmac.new(token.encode(), _SESSION_CONTEXT + str(issued).encode(), hashlib.sha256).hexdigest()
    return f"{issued}.{mac}"


def session_valid(value: str | None, token: str, now: float) -> bool:
    if not value or "." not in value:
        return False
    issued_text, _, _ = value.partition(".")
    if not issued_text.isdigit() or len(issued_text) > 12:
        return False
    issued = int(issued_text)
    if not now - SESSION_TTL_S < issued <= now + 60:  # a peer's clock 60 s ahead still works
        return False
    return hmac.compare_digest(value.encode(), session_value(token, issued).encode())


def cookie(headers: Mapping[str, str], name: str = COOKIE_NAME) -> str | None:
    """Our cookie's value from the `Cookie` header (the first one, as browsers send the most specific first)."""
    raw = headers.get("cookie") or ""
    for part in raw.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k == name:
            return v.strip().strip('"')
    return None


def set_cookie_header(value: str, *, secure: bool, max_age: int = SESSION_TTL_S) -> str:
    attrs = [f"{COOKIE_NAME}={value}", f"Path={ADMIN_PATH}", f"Max-Age={max_age}", "HttpOnly", "SameSite=Strict"]
    if secure:
        attrs.append("Secure")
    return "; ".join(attrs)


def clear_cookie_header(*, secure: bool) -> str:
    return set_cookie_header("", secure=secure, max_age=0)


def same_origin(headers: Mapping[str, str], local_hosts: Iterable[str] = ()) -> bool:
    """A form post from this sidecar's own page (CSRF check).

    Browsers send `Sec-Fetch-Site`, which settles it. Older ones send only `Origin`, compared with the
    `Host` header and `local_hosts` (the address the client connected to: in reverse mode mitmproxy has
    already rewritten `Host` to the upstream's). A client sending neither (curl) is not a browser being
    tricked, so it passes.
    """
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site.strip().lower() in ("same-origin", "none")
    origin = headers.get("origin")
    if origin is None:
        return True
    if origin == "null":
        return False
    allowed = {h.lower() for h in (headers.get("host") or "", *local_hosts) if h}
    return (urlsplit(origin).netloc or "").lower() in allowed


@dataclass(frozen=True)
class Decision:
    allowed: bool
    via: str = ""              # "bearer", "cookie", "loopback"
    status: int = 200
    message: str = ""


def decide(method: str, headers: Mapping[str, str], peer: str | None, token: str | None, now: float, *,
           loopback_without_token: bool = False) -> Decision:
    """The auth rule for one admin, dashboard or metrics request (see the module docstring)."""
    if token is None:
        if is_loopback(peer):
            return Decision(True, "loopback")
        return Decision(False, status=401, message="admin API: no admin token is configured, so only loopback "
                                                   "clients are answered")
    offered = bearer(headers)
    if offered is not None:
        if token_matches(offered, token):
            return Decision(True, "bearer")
        return Decision(False, status=401, message="admin API: wrong bearer token")
    if session_valid(cookie(headers), token, now):
        if method.upper() in SAFE_METHODS:
            return Decision(True, "cookie")
        return Decision(False, status=403, message="admin API: the dashboard's sign-in cookie only reads; "
                                                   "state-changing requests need the bearer header")
    if loopback_without_token and is_loopback(peer):
        return Decision(True, "loopback")
    return Decision(False, status=401, message="admin API: missing or wrong bearer token (or sign in at "
                                               f"{LOGIN_PATH})")


def wants_html(headers: Mapping[str, str]) -> bool:
    return "text/html" in (headers.get("accept") or "").lower()


# -- the sign-in, sign-out and refusal answers (pure: status, headers, body) --------------------
@dataclass
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def _html(status: int, page: str, **headers: str) -> Answer:
    h = {"content-type": "text/html; charset=utf-8", "cache-control": "no-store",
         "x-frame-options": "DENY", "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                                               "form-action 'self'; frame-ancestors 'none'"}
    h.update({k.replace("_", "-"): v for k, v in headers.items()})
    return Answer(status, h, page.encode())


def _redirect(location: str, set_cookie: str) -> Answer:
    return Answer(303, {"location": location, "set-cookie": set_cookie, "cache-control": "no-store",
                        "content-type": "text/plain; charset=utf-8"}, b"")


def form_token(headers: Mapping[str, str], body: bytes | None) -> str | None:
    """The `token` field of an urlencoded form body; None when the body is not one."""
    ctype = (headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded" or not body or len(body) > MAX_FORM_BYTES:
        return None
    try:
        values = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=8)
    except (UnicodeDecodeError, ValueError):
        return None
    got = values.get("token")
    return got[-1] if got else None


def is_session_path(path: str) -> bool:
    return path.split("?", 1)[0] in (LOGIN_PATH, LOGOUT_PATH)


def answer_session(method: str, path: str, headers: Mapping[str, str], body: bytes | None, token: str | None,
                   now: float | None = None, *, secure: bool = False, local_hosts: Iterable[str] = ()) -> Answer:
    """`GET|POST /admin/openhands/login`, `POST /admin/openhands/logout`. `local_hosts`: see `same_origin`."""
    now = time.time() if now is None else now
    p = path.split("?", 1)[0]
    method = method.upper()
    if p == LOGIN_PATH:
        if method in SAFE_METHODS:
            return _html(200, render_login(token_configured=token is not None))
        if method != "POST":
            return _html(405, render_login(error="Use the form to sign in.", token_configured=token is not None),
                         allow="GET, POST")
        if token is None:
            return _html(400, render_login(token_configured=False))
        if not same_origin(headers, local_hosts):
            return _html(403, render_login(error="Sign-in refused: the form was not posted from this sidecar's page."))
        offered = form_token(headers, body)
        if offered is None or not token_matches(offered, token):
            return _html(401, render_login(error="Wrong admin token." if offered else "Enter the admin token."))
        return _redirect(ADMIN_PATH, set_cookie_header(session_value(token, int(now)), secure=secure))
    if p == LOGOUT_PATH:
        if method != "POST":
            return Answer(405, {"allow": "POST", "content-type": "text/plain; charset=utf-8"},
                          b"sign out with POST (the dashboard's Sign out button)\n")
        if not same_origin(headers, local_hosts):
            return Answer(403, {"content-type": "text/plain; charset=utf-8"},
                          b"sign-out refused: not posted from this sidecar's page\n")
        return _redirect(LOGIN_PATH, clear_cookie_header(secure=secure))
    return Answer(404, {"content-type": "text/plain; charset=utf-8"}, b"not found\n")


def refusal(decision: Decision, method: str, path: str, headers: Mapping[str, str]) -> Answer | None:
    """A browser asking for the dashboard without a session gets the sign-in form (status kept, 401);
    None: answer the usual JSON error."""
    if method.upper() in SAFE_METHODS and path.split("?", 1)[0] in DASHBOARD_PATHS and wants_html(headers) \
            and decision.status == 401:
        return _html(401, render_login())
    return None
