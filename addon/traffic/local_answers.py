"""Answers the sidecar gives itself instead of forwarding (errors, admin replies): strict JSON, never cached."""
from __future__ import annotations

import json
from typing import Any

from mitmproxy import http


def json_response(status: int, body: Any, extra: dict[str, str] | None = None) -> http.Response:
    headers = {"content-type": "application/json", "cache-control": "no-store"}
    headers.update(extra or {})
    return http.Response.make(status, json.dumps(body, separators=(",", ":"), allow_nan=False), headers)


def openai_error(status: int, message: str, err_type: str, code: str | None = None,
                 retry_after: int | None = None) -> http.Response:
    """OpenAI-style error body: every client this sidecar serves understands it."""
    extra = {"retry-after": str(retry_after)} if retry_after is not None else None
    return json_response(status, {"error": {"message": message, "type": err_type, "param": None,
                                            "code": code or str(status)}}, extra)


NO_KEY_MESSAGE = ("No pool key with budget left: every key is exhausted, invalid or cooling down and no backup "
                  "key remains. Add keys via the admin API, or retry later.")


def no_key_response() -> http.Response:
    """Retryable on purpose: clients retry 429 with Retry-After; they give up on a budget 400."""
    return openai_error(429, NO_KEY_MESSAGE, "rate_limit_error", retry_after=60)
