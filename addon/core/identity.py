"""Who a client is, and the credential swap (pure: headers in, headers out).

Identity is the conversation (`x-litellm-session-id`) when the client names one, so one conversation
keeps one key and its provider prompt cache; otherwise a hash of the client's own credential.
"""
from __future__ import annotations

import hashlib
from typing import MutableMapping

SESSION_HEADER = "x-litellm-session-id"
CREDENTIAL_HEADERS = ("x-litellm-api-key", "authorization", "x-api-key")


def client_credential(headers: MutableMapping[str, str]) -> str | None:
    """The client's own key, in LiteLLM's order of precedence."""
    value = headers.get("x-litellm-api-key")
    if value:
        return strip_bearer(value)
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return auth[7:].strip()
    value = headers.get("x-api-key")
    return value.strip() if value and value.strip() else None


def strip_bearer(value: str) -> str:
    value = value.strip()
    return value[7:].strip() if value[:7].lower() == "bearer " else value


def client_identity(headers: MutableMapping[str, str], peer: str | None = None) -> str:
    session = (headers.get(SESSION_HEADER) or "").strip()
    if session:
        return "session:" + session[:200]
    credential = client_credential(headers)
    if credential:
        return "cred:" + hashlib.sha256(credential.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return "anon:" + (peer or "unknown")


def swap_credential(headers: MutableMapping[str, str], pool_key: str) -> list[str]:
    """Replace every credential header the client sent by the pool key; add one if it sent none.

    Returns the names of the headers that were replaced (for the flow's metadata).
    """
    replaced = []
    if "x-litellm-api-key" in headers:
        headers["x-litellm-api-key"] = pool_key
        replaced.append("x-litellm-api-key")
    if "authorization" in headers:
        headers["authorization"] = f"Bearer {pool_key}"
        replaced.append("authorization")
    if "x-api-key" in headers:
        headers["x-api-key"] = pool_key
        replaced.append("x-api-key")
    if not replaced:
        headers["x-litellm-api-key"] = pool_key
    return replaced


def redact_credentials(headers: MutableMapping[str, str]) -> None:
    """After the exchange: credential headers masked (`first8...last4`), so mitmdump's header printing
    (`flow_detail` >= 2), mitmweb and saved flows (`-w`) never show a pool key or admin token in full."""
    from addon.core.masking import mask_key

    for name in CREDENTIAL_HEADERS:
        value = headers.get(name)
        if not value:
            continue
        secret = strip_bearer(value)
        masked = mask_key(secret) if secret else ""
        headers[name] = f"Bearer {masked}" if value.strip()[:7].lower() == "bearer " else masked


def client_allowed(headers: MutableMapping[str, str], allowlist: frozenset[str]) -> bool:
    """With an allowlist configured, only listed client keys may spend the pool."""
    if not allowlist:
        return True
    credential = client_credential(headers)
    if credential is None:
        return False
    import hmac

    return any(hmac.compare_digest(credential.encode(), allowed.encode()) for allowed in allowlist)
