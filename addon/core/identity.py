"""Who a client is, and credential hygiene on pooled flows (pure: headers in, headers out).

Identity is the conversation (`x-litellm-session-id`) when the client names one, so one conversation
keeps one key and its provider prompt cache; otherwise a hash of the client's own credential.

Hygiene (reference/litellm-errors.md §5): LiteLLM takes the first credential present among
`x-litellm-api-key`, `Authorization`, `API-Key`, `x-api-key`, `x-goog-api-key`,
`Ocp-Apim-Subscription-Key` and `?key=` (and reads `litellm_user_api_key` on pass-through routes).
Any of them left in place either reaches the upstream (the client's secret leaks) or wins over the
pool key (LiteLLM's "unknown key" answer is then blamed on the pool key). So every carrier, plus
`cookie` and `proxy-authorization`, is removed and exactly one credential — the pool key — is set,
in the header the client used (else `x-litellm-api-key`).
"""
from __future__ import annotations

import hashlib
import ipaddress
import hmac
from typing import MutableMapping
from urllib.parse import parse_qsl, urlencode

SESSION_HEADER = "x-litellm-session-id"
# Every header LiteLLM (or a pass-through route) reads as a credential, in LiteLLM's order.
CREDENTIAL_HEADERS = ("x-litellm-api-key", "authorization", "api-key", "x-api-key", "x-goog-api-key",
                      "ocp-apim-subscription-key", "litellm_user_api_key", "litellm-user-api-key")
# Removed too: not a LiteLLM credential, but a client secret all the same.
SECRET_HEADERS = ("cookie", "proxy-authorization")
# Where the pool key may be put: the client's header when it used one of these, else x-litellm-api-key.
SETTABLE = ("x-litellm-api-key", "authorization", "api-key", "x-api-key", "x-goog-api-key",
            "ocp-apim-subscription-key")
CREDENTIAL_QUERY = ("key", "api_key", "api-key")


def strip_bearer(value: str) -> str:
    value = value.strip()
    return value[7:].strip() if value[:7].lower() == "bearer " else value


def client_credential(headers: MutableMapping[str, str], query: list[tuple[str, str]] | None = None) -> str | None:
    """The client's own key, in LiteLLM's order of precedence (headers, then `?key=`)."""
    for name in CREDENTIAL_HEADERS:
        value = headers.get(name)
        if not value or not value.strip():
            continue
        if name == "authorization":
            low = value.strip()[:7].lower()
            if low == "bearer " and value.strip()[7:].strip():
                return value.strip()[7:].strip()
            if value.strip()[:6].lower() == "basic ":
                return value.strip()[6:].strip() or None
            return value.strip()
        return strip_bearer(value)
    for k, v in query or ():
        if k.lower() in CREDENTIAL_QUERY and v:
            return v
    return None


def client_identity(headers: MutableMapping[str, str], peer: str | None = None,
                    query: list[tuple[str, str]] | None = None) -> str:
    session = (headers.get(SESSION_HEADER) or "").strip()
    if session:
        return "session:" + session[:200]
    credential = client_credential(headers, query)
    if credential:
        return "cred:" + hashlib.sha256(credential.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return "anon:" + (peer or "unknown")


def _header_names(headers: MutableMapping[str, str]) -> list[str]:
    try:
        return [k.lower() if isinstance(k, str) else k.decode("latin-1").lower() for k in headers.keys()]
    except Exception:  # noqa: BLE001
        return []


def scrub_query(query: str) -> tuple[str, bool]:
    """A query string without credential parameters (`?key=`…); (new query, whether one was removed)."""
    if not query:
        return query, False
    pairs = parse_qsl(query, keep_blank_values=True)
    kept = [(k, v) for k, v in pairs if k.lower() not in CREDENTIAL_QUERY]
    if len(kept) == len(pairs):
        return query, False
    return urlencode(kept), True


def swap_credential(headers: MutableMapping[str, str], pool_key: str) -> list[str]:
    """Remove every credential carrier and the client's cookies; set exactly one credential, the pool key.

    Returns the names of the credential headers the client had sent (for the flow's metadata).
    """
    present = set(_header_names(headers))
    used = [name for name in CREDENTIAL_HEADERS if name in present]
    target = next((name for name in used if name in SETTABLE), "x-litellm-api-key")
    for name in (*CREDENTIAL_HEADERS, *SECRET_HEADERS):
        if name in present:
            del headers[name]
    headers[target] = f"Bearer {pool_key}" if target == "authorization" else pool_key
    return used


def redact_credentials(headers: MutableMapping[str, str]) -> None:
    """After the exchange: credential headers masked (`first8...last4`), so mitmdump's header printing
    (`flow_detail` >= 2), mitmweb and saved flows (`-w`) never show a pool key or admin token in full."""
    from addon.core.masking import mask_key

    present = set(_header_names(headers))
    for name in (*CREDENTIAL_HEADERS, *SECRET_HEADERS):
        if name not in present:
            continue
        value = headers.get(name) or ""
        if name == "cookie":
            headers[name] = "<removed>"
            continue
        scheme = ""
        stripped = value.strip()
        for prefix in ("bearer ", "basic "):
            if stripped[:len(prefix)].lower() == prefix:
                scheme, stripped = stripped[:len(prefix)], stripped[len(prefix):].strip()
        headers[name] = f"{scheme}{mask_key(stripped)}" if stripped else scheme.strip()


def client_allowed(headers: MutableMapping[str, str], allowlist: frozenset[str],
                   query: list[tuple[str, str]] | None = None) -> bool:
    """With an allowlist configured, only listed client keys may spend the pool."""
    if not allowlist:
        return True
    credential = client_credential(headers, query)
    if credential is None:
        return False
    return any(hmac.compare_digest(credential.encode("utf-8", "surrogateescape"), allowed.encode())
               for allowed in allowlist)


def pool_access(headers: MutableMapping[str, str], allowlist: frozenset[str], peer: str | None, open_pool: bool,
                query: list[tuple[str, str]] | None = None) -> tuple[int, str] | None:
    """The secure default (DESIGN §4): None when the client may use the pool, else (status, message).

    With an allowlist, a listed credential is required; with none, only loopback clients are served
    unless the operator opened the pool explicitly.
    """
    if allowlist:
        if client_allowed(headers, allowlist, query):
            return None
        return 401, "This sidecar does not accept your client key."
    if open_pool or is_loopback(peer):
        return None
    return 403, ("This key-pool sidecar serves loopback clients only: no client allowlist is configured. Set "
                 "OPENHANDS_CLIENT_KEYS (or openhands_client_keys_file) to admit remote clients by key, or "
                 "openhands_open_pool=true to serve any client.")


def is_loopback(peer: str | None) -> bool:
    """The one loopback rule (pool default, admin API, metrics): IPv4-mapped IPv6 and zone ids included."""
    if not peer:
        return False
    try:
        addr = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback
