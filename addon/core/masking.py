"""Masking of secrets for logs, admin answers, history rows, flow comments and echoed answers."""
from __future__ import annotations

from typing import Iterable


def mask_key(key: str | None) -> str:
    """`first8...last4`; short strings are hidden entirely so nothing useful leaks."""
    if not key:
        return ""
    if len(key) < 16:
        return key[:2] + "..." if len(key) >= 8 else "***"
    return f"{key[:8]}...{key[-4:]}"


def mask_echoed_keys(body: bytes | None, keys: Iterable[str]) -> tuple[bytes | None, int]:
    """`body` with every full occurrence of a pool key masked, and how many were masked.

    LiteLLM 1.80's expired-key answer carries the raw key in `param`; S1 echoes the whole credential.
    The mask has the same shape as every other masked key, so the answer still says which key it was.
    Keys shorter than 8 characters are not searched (they would match ordinary text).
    """
    if not body:
        return body, 0
    count = 0
    for key in keys:
        if not key or len(key) < 8:
            continue
        raw = key.encode("utf-8", "surrogateescape")
        n = body.count(raw)
        if n:
            body = body.replace(raw, mask_key(key).encode())
            count += n
    return body, count


def mask_in_text(text: str, keys: Iterable[str]) -> str:
    """The same for a log line or an error message."""
    for key in keys:
        if key and len(key) >= 8 and key in text:
            text = text.replace(key, mask_key(key))
    return text
