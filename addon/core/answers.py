"""Recognise LiteLLM budget errors and classify upstream responses (pure: no I/O, no clock).

A budget error means "this key can spend no more", so the caller calibrates the key's spend from
it, marks the key exhausted, rotates and retries. Getting it wrong either way is costly: a missed
budget error reaches the client as a hard 400/422 (clients do not retry those), a false one burns
a healthy key. Shapes and messages: reference/litellm-upstream.md §1.

Decisions where the contract is silent:
- Any 4xx may carry a budget error (LiteLLM used 400, 429 and 422 over time; a proxy in front may
  remap). 2xx/3xx/5xx never do.
- Budgets that do not exhaust the key are *not* budget errors, even when LiteLLM tags them
  ``budget_exceeded``: the per-model budget (``… exceeded budget for model=…``; the key still works
  for other models), the per-session budget (``Session budget exceeded for session …``, a
  rate-limit error) and router deployment budgets (``No deployments available - crossed budget``).
  They flow on as ordinary 4xx ("rate_limited" for a 429, else "passthrough").
- ``entity`` is the budget holder the message names: ``User``, ``End User``, ``Team``, ``Key``,
  ``TeamMember`` (also for ``User=u in Team=t``, which is the member's in-team budget, not the
  user's own), ``Organization``, ``Tag``, ``Project``, ``Model access group``, ``EndUser``…;
  ``Key`` for the windowed ``Key over 1d budget`` and for ``ExceededTokenBudget``; None for the bare
  default message.
- A body that is not JSON is matched as plain text (a proxy in front may rewrite the envelope).
- Bodies over 1 MiB are not budget errors (a real one is ~200 bytes); messages are searched and
  kept to their first 64 KiB, so junk can neither slow parsing nor bloat ``lastError``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Literal

__all__ = [
    "BudgetError",
    "UpstreamVerdict",
    "parse_budget_error",
    "classify_response",
    "parse_retry_after",
    "DEFAULT_RETRY_AFTER",
    "MIN_RETRY_AFTER",
    "MAX_RETRY_AFTER",
]

MAX_BODY_BYTES = 1 << 20
MAX_MESSAGE_CHARS = 1 << 16

DEFAULT_RETRY_AFTER = 60.0
MIN_RETRY_AFTER = 1.0
MAX_RETRY_AFTER = 3600.0

BUDGET_TYPE = "budget_exceeded"

# Python's float formatting of a cost: ints, decimals, scientific, or nan/inf (rejected later).
_NUM = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf(?:inity)?))"

_MARKERS = re.compile(r"ExceededBudget|ExceededTokenBudget|Budget has been exceeded", re.IGNORECASE)

# Not key budgets (see module docstring); checked before anything else.
_NOT_KEY_BUDGET = re.compile(
    r"exceeded budget for model\s*=|Session budget exceeded|No deployments available",
    re.IGNORECASE,
)

_SPEND_PATTERNS = (
    re.compile(r"\bSpend\s*=\s*\$?\s*" + _NUM, re.IGNORECASE),
    re.compile(r"\bCurrent cost\s*:\s*\$?\s*" + _NUM, re.IGNORECASE),
    re.compile(r"\bCurrent spend for token\s*:\s*\$?\s*" + _NUM, re.IGNORECASE),
)
_BUDGET_PATTERNS = (
    re.compile(r"\bBudget\s*=\s*\$?\s*" + _NUM, re.IGNORECASE),
    re.compile(r"\bMax budget\s*:\s*\$?\s*" + _NUM, re.IGNORECASE),
    re.compile(r"\bLimit\s*=\s*\$?\s*" + _NUM, re.IGNORECASE),
    re.compile(r"\bMax Budget for Token\s*:\s*\$?\s*" + _NUM, re.IGNORECASE),
)

# "Budget has been exceeded! <Entity>=<id> Current cost: …" (entity names may hold spaces).
_BANG_ENTITY = re.compile(r"Budget has been exceeded!\s*([A-Za-z][A-Za-z ]{0,40}?)\s*=\s*(\S)")
_BANG_MEMBER = re.compile(r"Budget has been exceeded!\s*User\s*=\s*\S+\s+in\s+Team\s*=")
# "ExceededBudget: User=… over budget", "ExceededBudget: Team=t over 7d budget", "… Key over 1d budget"
_EXCEEDED_ENTITY = re.compile(r"ExceededBudget:\s*([A-Za-z][A-Za-z ]{0,40}?)\s*=")
_EXCEEDED_KEY_WINDOW = re.compile(r"ExceededBudget:\s*Key\s+over\b")
_TOKEN_BUDGET = re.compile(r"ExceededTokenBudget", re.IGNORECASE)


@dataclass(frozen=True)
class BudgetError:
    """A key-budget error; ``spend``/``budget`` are what the upstream said, when it said it."""

    message: str
    spend: float | None
    budget: float | None
    entity: str | None


@dataclass(frozen=True)
class UpstreamVerdict:
    """What the request path should do with an upstream answer."""

    kind: Literal["ok", "budget", "rate_limited", "invalid", "passthrough"]
    budget_error: BudgetError | None = None
    retry_after: float | None = None


def _money(text: str) -> float | None:
    """A usable dollar amount, or None: NaN/inf/negative would poison spend arithmetic."""
    try:
        value = float(text)
    except (TypeError, ValueError, OverflowError):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return value


def _first_number(patterns: tuple[re.Pattern[str], ...], message: str) -> float | None:
    for pattern in patterns:
        match = pattern.search(message)
        if match:
            return _money(match.group(1))
    return None


def _entity(message: str) -> str | None:
    if _BANG_MEMBER.search(message):
        return "TeamMember"
    match = _BANG_ENTITY.search(message)
    if match:
        return match.group(1).strip()
    if _EXCEEDED_KEY_WINDOW.search(message):
        return "Key"
    match = _EXCEEDED_ENTITY.search(message)
    if match:
        return match.group(1).strip()
    if _TOKEN_BUDGET.search(message):
        return "Key"
    return None


def _decode(body: bytes | str | dict | None) -> tuple[object, str]:
    """(parsed JSON or None, raw text) without ever raising."""
    if body is None:
        return None, ""
    if isinstance(body, Mapping):
        return body, ""
    if isinstance(body, (bytes, bytearray, memoryview)):
        raw = bytes(body)
        if len(raw) > MAX_BODY_BYTES:
            return None, ""
        text = raw.decode("utf-8", errors="replace")
    elif isinstance(body, str):
        if len(body) > MAX_BODY_BYTES:
            return None, ""
        text = body
    else:
        return None, ""
    try:
        return json.loads(text), text
    except (ValueError, RecursionError):
        return None, text


def _error_fields(parsed: object, text: str) -> tuple[str, bool]:
    """(message, tagged budget_exceeded) from either envelope, or from plain text."""
    if isinstance(parsed, str):
        return parsed, False
    if not isinstance(parsed, Mapping):
        # Non-JSON (or a JSON list/number): only the text markers can identify a budget error.
        return (text if parsed is None else ""), False
    error = parsed.get("error")
    if isinstance(error, Mapping):
        message = error.get("message")
        tagged = error.get("type") == BUDGET_TYPE or error.get("litellm_error_type") == BUDGET_TYPE
        return (message if isinstance(message, str) else ""), tagged
    if isinstance(error, str):
        return error, False
    message = parsed.get("message")
    return (message if isinstance(message, str) else ""), parsed.get("type") == BUDGET_TYPE


def parse_budget_error(status: int, body: bytes | str | dict | None) -> BudgetError | None:
    """The key-budget error in this response, or None. Never raises."""
    try:
        if isinstance(status, bool) or not 400 <= int(status) <= 499:
            return None
        parsed, text = _decode(body)
        message, tagged = _error_fields(parsed, text)
    except Exception:  # noqa: BLE001 - junk in, None out: the request path must not crash here
        return None
    probe = message[:MAX_MESSAGE_CHARS]
    if _NOT_KEY_BUDGET.search(probe):
        return None
    if not tagged and not _MARKERS.search(probe):
        return None
    return BudgetError(
        message=probe,
        spend=_first_number(_SPEND_PATTERNS, probe),
        budget=_first_number(_BUDGET_PATTERNS, probe),
        entity=_entity(probe),
    )


def _header(headers: Mapping[str, str], name: str) -> str | None:
    try:
        for key, value in headers.items():
            if isinstance(key, bytes):
                key = key.decode("latin-1")
            if isinstance(key, str) and key.lower() == name:
                return value.decode("latin-1") if isinstance(value, bytes) else str(value)
    except Exception:  # noqa: BLE001 - odd header containers must not break classification
        return None
    return None


def parse_retry_after(value: str | None, now: float) -> float:
    """Seconds to cool down: delta-seconds or an HTTP-date; 60 when absent or junk; within [1, 3600].

    The clamp keeps a hostile or buggy header from benching a key forever or from retrying in a
    tight loop.
    """
    seconds: float | None = None
    if value is not None:
        value = value.strip()
        try:
            seconds = float(value)
            if not math.isfinite(seconds) or seconds < 0:
                seconds = None
        except ValueError:
            try:
                when = parsedate_to_datetime(value)
                if when.tzinfo is None:  # "-0000": RFC 5322 says UTC; never the host's zone
                    when = when.replace(tzinfo=timezone.utc)
                seconds = when.timestamp() - now
            except Exception:  # noqa: BLE001 - any unparsable date means "use the default"
                seconds = None
            else:
                if not math.isfinite(seconds):
                    seconds = None
    if seconds is None:
        seconds = DEFAULT_RETRY_AFTER
    return min(MAX_RETRY_AFTER, max(MIN_RETRY_AFTER, seconds))


def classify_response(
    status: int, headers: Mapping[str, str], body: bytes | None, now: float
) -> UpstreamVerdict:
    """Map an upstream answer to the action of §7. Never raises."""
    budget = parse_budget_error(status, body)
    if budget is not None:
        return UpstreamVerdict("budget", budget_error=budget)
    try:
        code = int(status)
    except (TypeError, ValueError, OverflowError):
        return UpstreamVerdict("passthrough")
    if code == 429:
        return UpstreamVerdict("rate_limited", retry_after=parse_retry_after(_header(headers, "retry-after"), now))
    if code in (401, 403):
        return UpstreamVerdict("invalid")
    if 200 <= code <= 399:
        return UpstreamVerdict("ok")
    return UpstreamVerdict("passthrough")
