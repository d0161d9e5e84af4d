"""Masking of secrets for logs, admin answers, history rows and flow comments."""
from __future__ import annotations


def mask_key(key: str | None) -> str:
    """`first8...last4`; short strings are hidden entirely so nothing useful leaks."""
    if not key:
        return ""
    if len(key) < 16:
        return key[:2] + "..." if len(key) >= 8 else "***"
    return f"{key[:8]}...{key[-4:]}"
