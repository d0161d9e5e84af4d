"""Classify an upstream answer by what it proves about the pool key (pure: no I/O, no clock).

LiteLLM answers every auth and budget failure with the same envelope, but the failures have very
different scopes (reference/litellm-errors.md §1): the key itself is dead, the key's own budget is
spent, the key's owner (user, team, org…) is spent or blocked, the key is rate limited, or the
*request* was refused (its model, end user, tags, route) — and several messages echo client input
(the model name, the `user` field, the path). Retiring a key on a request-scoped answer lets any
client disable the pool, so this module decides from structured fields (`type`, `param`,
`litellm_error_type`) and from LiteLLM's own message templates, anchored at the start and matched
whole, and takes numbers only from the template's own positions.

Scopes and what the request path does with them:

| scope          | kind           | action                                                             |
|----------------|----------------|--------------------------------------------------------------------|
| `key_dead`     | `invalid`      | retire (`invalid`), rotate, retry                                  |
| `key_budget`   | `budget`       | retire (`exhausted`), calibrate from the numbers, rotate, retry    |
| `owner_budget` | `budget`       | retire; calibrate only for a one-key owner (its budget = the key's) |
| `key_rate`     | `rate_limited` | cool down (`Retry-After`), retry elsewhere                         |
| `key_busy`     | `busy`         | 1.110 reservation refusal: retire nothing, try another key         |
| `request`      | `passthrough`  | the client gets the answer; no key is marked                       |
| `provider`     | `passthrough`  | the provider (or LiteLLM's router) failed; no key is marked        |
| `sidecar`      | `passthrough`  | the proxy or the sidecar is misconfigured; no key is marked        |
| `unknown_budget` | `passthrough` | unknown `budget_exceeded` text: neither retire nor calibrate (a probe may) |

Without a `KeyContext` (a caller's own read with the key, e.g. the spend checker: no client input)
the bare template and owner numbers calibrate as before; the request path always passes one.

`verified` says the message names this very key (sha256 or last 4 characters match, or the bare
budget template's `Max budget` equals the key's known budget). Verdicts that are not verified and
contradict the meter are confirmed by the caller with an authoritative read (`traffic/key_probe`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Literal, SupportsInt, cast

__all__ = [
    "BudgetError",
    "KeyContext",
    "UpstreamVerdict",
    "classify_response",
    "parse_budget_error",
    "parse_retry_after",
    "key_hash",
    "DEFAULT_RETRY_AFTER",
    "MIN_RETRY_AFTER",
    "MAX_RETRY_AFTER",
    "MAX_OVERSHOOT",
]

MAX_BODY_BYTES = 1 << 20
MAX_MESSAGE_CHARS = 1 << 16

DEFAULT_RETRY_AFTER = 60.0
MIN_RETRY_AFTER = 1.0
MAX_RETRY_AFTER = 3600.0

BUDGET_TYPE = "budget_exceeded"
MAX_OVERSHOOT = 1000.0  # dollars a parsed "current cost" may exceed its budget by; more is not plausible
BUDGET_TOLERANCE = 1e-6  # relative: LiteLLM prints str(float) of the stored max_budget

Scope = Literal["ok", "key_dead", "key_budget", "owner_budget", "key_rate", "key_busy", "request",
                "provider", "sidecar", "unknown_budget", "other"]
Kind = Literal["ok", "budget", "rate_limited", "invalid", "busy", "passthrough"]

# Python's str(float): 10.0, 5.01, 1e-05, 1e+308, inf, nan (non-finite rejected after parsing).
_F = r"(-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|-?inf|nan)"
_HEX64 = r"([0-9a-f]{64})"


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.DOTALL)


# --- budget_exceeded templates (§1 B1–B6, Q1–Q3), anchored and matched whole ------------------
_B4 = _rx(r"Budget has been exceeded! Key=" + _HEX64 + r" Current cost: " + _F
          + r", (?:Estimated request cost: " + _F + r", )?Max budget: " + _F)
_B2 = _rx(r"Budget has been exceeded! Key=(.{1,256}?)(?: \((?:[^()]{0,256} = )?sk-\.\.\.([^\s()]{4})\))?"
          r" Current cost: " + _F + r", Max budget: " + _F)
_B1 = _rx(r"Budget has been exceeded! Current cost: " + _F + r", Max budget: " + _F)
_B3 = _rx(r"ExceededBudget: Key over (\S{1,32}) budget\. Spend=\$?" + _F + r", Limit=\$?" + _F)
_B5_USER = _rx(r"ExceededBudget: User=(.{1,256}?) over budget\. Spend=" + _F + r", Budget=" + _F)
_B6_WINDOW = _rx(r"ExceededBudget: (?:Team|User|Organization|Project|TeamMember)=(.{1,256}?) over (\S{1,32}) budget\."
                 r" Spend=\$?" + _F + r", (?:Limit|Budget)=\$?" + _F)
_OWNER_BANG = _rx(r"Budget has been exceeded! (?:User=.{1,256}? in Team=|Team=|User=|TeamMember=|Organization=|"
                  r"Project=)(.{1,256}?) Current cost: " + _F + r", (?:Estimated request cost: " + _F
                  + r", )?Max budget: " + _F)
_REQUEST_BUDGET = _rx(r"(?:ExceededBudget: End User=|Budget has been exceeded! (?:Tag|EndUser|Model access group)=|"
                      r"LiteLLM (?:Virtual Key|User|Team|End User|Organization|Project): )")
_TOKEN_BUDGET = _rx(r"ExceededTokenBudget: Current spend for token: " + _F + r"; Max Budget for Token: " + _F)

# --- auth templates (§1 K, O, Q, S) -----------------------------------------------------------
_K1 = _rx(r"Authentication Error, Invalid proxy server token passed\. Received API Key = (\S{1,64}), "
          r"Key Hash \(Token\) =" + _HEX64 + r"\. Unable to find token in cache or `LiteLLM_VerificationTokenTable`")
_K1_NEW = _rx(r"Authentication Error, Invalid API key provided\.")
_K2 = _rx(r"Authentication Error - Expired Key\. Key Expiry time (.{1,64}?) and current time (.{1,64})")
_K3 = _rx(r"Authentication Error[,-] Key is blocked\. Update via `/key/unblock` if you're (?:an )?admin\.")
_O1 = _rx(r"Authentication Error, Team=(.{1,256}?) is blocked\. Update via `/team/unblock` if your admin\.")
_O2 = _rx(r"Authentication Error, User=(.{1,256}?) has been deactivated via SCIM\. Keys owned by this user cannot "
          r"be used\.")
# Request-scoped and misconfiguration prefixes: anything starting so is never about the pool key.
_REQUEST_PREFIXES = _rx(
    r"(?:\{'error': |\{\"error\": |[A-Za-z]{1,20} not allowed to access model\.|The requested model '|"
    r"User not allowed to access model\.|Authentication Error, Only proxy admin can be used|"
    r"Authentication Error, Tried to access route=|Virtual key is not allowed to call this route\.|"
    r"key not allowed to access this user's info\.|Authentication Error, Rejected Request: |"
    r"Authentication Error, 'user' param not passed in|Access forbidden: |Invalid model name passed in)")
_REQUEST_ANYWHERE = re.compile(r"is an admin only route|not allowed to access model|Not allowed to access model due to "
                               r"tags configuration|Tried to access route=|guardrail", re.IGNORECASE)
_SIDECAR = _rx(r"(?:Authentication Error, No api key passed in\.|Authentication Error, Malformed API Key|"
               r"Authentication Error, LiteLLM Virtual Key expected\.|No connected db\.|"
               r"Budget enforcement unavailable)")
_PROVIDER = _rx(r"(?:litellm\.|No deployments available|No healthy deployment available|OpenAIException|"
                r"AnthropicException)")
_REQUEST_TYPES = frozenset({"key_model_access_denied", "team_model_access_denied", "user_model_access_denied",
                            "org_model_access_denied", "invalid_request_error", "bad_request_error",
                            "not_found_error"})
# --- rate limits (§1 R1) ----------------------------------------------------------------------
_R1 = _rx(r"Rate limit exceeded for (\w{1,32}): (.{1,512}?)\. Limit type: (\w{1,32})\. Current limit: (\d{1,20}), "
          r"Remaining: (-?\d{1,20})\.")
_OWNER_RATE = frozenset({"user", "team", "team_member", "organization", "project", "model_per_user",
                         "model_per_team", "model_per_organization", "model_per_team_member"})


def key_hash(api_key: str) -> str:
    """LiteLLM's token: sha256 hex of the raw key."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class KeyContext:
    """What the pool knows about the key the answer came back on (for identity and plausibility)."""

    api_key: str
    max_budget: float | None = None  # the key's budgetLimit (LiteLLM's max_budget)
    settled_spend: float = 0.0  # effective spend: max(metered, polled)
    in_flight: int = 0  # other requests on this key still waiting for their answer
    rotation_point: float | None = None  # where the pool retires it anyway (default: budget minus its margin)

    def point(self) -> float | None:
        if self.rotation_point is not None:
            return self.rotation_point
        if self.max_budget is None:
            return None
        return self.max_budget - min(0.05, 0.1 * self.max_budget)

    @property
    def sha256(self) -> str:
        return key_hash(self.api_key)


@dataclass(frozen=True)
class BudgetError:
    """A budget answer; `spend`/`budget` are set only when they may calibrate the key (plausible and
    about this key or a one-key owner)."""

    message: str
    spend: float | None
    budget: float | None
    entity: str | None


@dataclass(frozen=True)
class UpstreamVerdict:
    """What the request path should do with an upstream answer."""

    kind: Kind
    budget_error: BudgetError | None = None
    retry_after: float | None = None
    scope: Scope = "other"
    template: str | None = None  # the reference's row id (K1, B2, Q11…) when one matched
    verified: bool = False  # the answer names this very key
    warnings: tuple[str, ...] = field(default=())  # numbers ignored and why (the caller logs them once)

    @property
    def retires(self) -> bool:
        return self.kind in ("budget", "invalid")


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except (TypeError, ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def _same_budget(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return False
    return abs(a - b) <= max(BUDGET_TOLERANCE * max(abs(a), abs(b)), 1e-9)


def _plausible(cost: float | None, budget: float | None, *, strict: bool, key: KeyContext | None,
               warnings: list[str]) -> tuple[float | None, float | None]:
    """Numbers from a template, kept only when they can be true: finite, 0 <= budget, cost >= budget
    (the check that fired), cost <= budget + $1000, and the budget near the key's own when known."""
    if cost is None or budget is None:
        warnings.append("budget numbers missing or not finite")
        return None, None
    if budget < 0 or cost < 0:
        warnings.append(f"negative budget numbers (cost {cost!r}, budget {budget!r})")
        return None, None
    floor = budget - 1e-9 if not strict else budget - 1e-6
    if cost < floor:
        warnings.append(f"current cost {cost!r} below the budget {budget!r} it claims to exceed")
        return None, None
    if cost > budget + MAX_OVERSHOOT:
        warnings.append(f"current cost {cost!r} is implausibly far over the budget {budget!r}")
        return None, None
    if key is not None and key.max_budget is not None and budget > key.max_budget * 1000 + MAX_OVERSHOOT:
        warnings.append(f"budget {budget!r} is implausible for a key of ${key.max_budget:g}")
        return None, None
    return cost, budget


def _decode(body: bytes | str | Mapping | None) -> object:
    """Parsed JSON, or None; never raises. Oversized bodies are not classified (a real error is ~300 bytes)."""
    if body is None:
        return None
    if isinstance(body, Mapping):
        return body
    try:
        if isinstance(body, (bytes, bytearray, memoryview)):
            raw = bytes(body)
            if len(raw) > MAX_BODY_BYTES:
                return None
            text = raw.decode("utf-8", errors="replace")
        elif isinstance(body, str):
            if len(body) > MAX_BODY_BYTES:
                return None
            text = body
        else:
            return None
        return json.loads(text)
    except (ValueError, RecursionError, TypeError):
        return None


@dataclass(frozen=True)
class _Fields:
    message: str
    type: str | None
    param: object
    is_error_object: bool
    detail: bool = False


def _fields(parsed: object) -> _Fields:
    """The error object of the OpenAI or Anthropic envelope (reference §2 rule 1); arrays and strings
    are not error objects."""
    if not isinstance(parsed, Mapping):
        return _Fields("", None, None, False)
    error = parsed.get("error")
    if isinstance(error, Mapping):
        message = error.get("message")
        etype = error.get("litellm_error_type") or error.get("type")
        return _Fields(message[:MAX_MESSAGE_CHARS] if isinstance(message, str) else "",
                       etype if isinstance(etype, str) else None, error.get("param"), True)
    if "detail" in parsed:  # FastAPI's {"detail": …}: 1.105.7 route refusals (Q7), validation errors
        return _Fields("", None, None, False, detail=True)
    return _Fields("", None, None, False)


def _echoes(message: str, client_texts: Iterable[str]) -> bool:
    for text in client_texts:
        if isinstance(text, str) and len(text) >= 3 and text in message:
            return True
    return False


def _verdict(kind: Kind, scope: Scope, template: str | None, *, verified: bool = False,
             budget_error: BudgetError | None = None, retry_after: float | None = None,
             warnings: list[str] | None = None) -> UpstreamVerdict:
    return UpstreamVerdict(kind, budget_error=budget_error, retry_after=retry_after, scope=scope, template=template,
                           verified=verified, warnings=tuple(warnings or ()))


def _budget(message: str, key: KeyContext | None, retry_after: float) -> UpstreamVerdict:
    """A `budget_exceeded` answer: which budget, whose, and may its numbers calibrate the key."""
    warnings: list[str] = []
    if _PROVIDER.match(message):
        return _verdict("passthrough", "provider", "U3")
    if _REQUEST_BUDGET.match(message):
        return _verdict("passthrough", "request", "Q1-Q3")

    m = _B4.fullmatch(message)
    if m:
        if key is None or m.group(1) != key.sha256:
            return _verdict("passthrough", "request", "B4", warnings=["reservation refusal names another key"])
        estimated = m.group(3) is not None
        budget = _number(m.group(4))
        if estimated:  # fail-closed variant: this request does not fit, the key is not spent
            return _verdict("busy", "key_busy", "B4", verified=True)
        # `Current cost` = settled counter + every in-flight reservation + this request's estimate, so it says
        # nothing about settled spend. The key is busy while our meter shows budget left and either a request
        # is in flight on it or it is still short of its rotation point (another sidecar holds the reservation).
        point = key.point()
        has_budget_left = budget is not None and key.settled_spend + 1e-9 < budget
        below_point = point is not None and key.settled_spend < point
        if has_budget_left and (key.in_flight > 0 or below_point):
            return _verdict("busy", "key_busy", "B4", verified=True)
        # Nothing in flight and past its rotation point by our meter: spent. Never calibrates (see above).
        be = BudgetError(message, None, None, "Key")
        return _verdict("budget", "key_budget", "B4", verified=True, budget_error=be)

    m = _B2.fullmatch(message)
    if m:
        last4 = m.group(2)
        if last4 is not None and (key is None or key.api_key[-4:] != last4):
            return _verdict("passthrough", "request", "B2", warnings=["budget error names another key"])
        cost, budget = _plausible(_number(m.group(3)), _number(m.group(4)), strict=False, key=key, warnings=warnings)
        verified = last4 is not None
        return _verdict("budget", "key_budget", "B2", verified=verified, warnings=warnings,
                        budget_error=BudgetError(message, cost, budget, "Key"))

    m = _B1.fullmatch(message)
    if m:
        cost, budget = _plausible(_number(m.group(1)), _number(m.group(2)), strict=False, key=key, warnings=warnings)
        raw_budget = _number(m.group(2))
        if key is None:  # a caller with no key context (its own read with the key, no client input)
            return _verdict("budget", "key_budget", "B1", warnings=warnings,
                            budget_error=BudgetError(message, cost, budget, None))
        if _same_budget(raw_budget, key.max_budget):
            return _verdict("budget", "key_budget", "B1", verified=True, warnings=warnings,
                            budget_error=BudgetError(message, cost, budget, None))
        # Shared with the team member and the proxy-wide budget: an owner, numbers not the key's.
        return _verdict("budget", "owner_budget", "B1", warnings=warnings,
                        budget_error=BudgetError(message, None, None, None))

    m = _B3.fullmatch(message)
    if m:  # the key's windowed budget: out for the window; window spend is not lifetime spend
        return _verdict("budget", "key_budget", "B3", budget_error=BudgetError(message, None, None, "Key"))

    m = _TOKEN_BUDGET.fullmatch(message)
    if m:
        cost, budget = _plausible(_number(m.group(1)), _number(m.group(2)), strict=False, key=key, warnings=warnings)
        verified = key is not None and _same_budget(budget, key.max_budget)
        return _verdict("budget", "key_budget", "B-token", verified=verified, warnings=warnings,
                        budget_error=BudgetError(message, cost, budget, "Key"))

    for rx, template, strict, groups in ((_B5_USER, "B5", True, (2, 3)), (_OWNER_BANG, "B5/B6", True, (2, 4)),
                                         (_B6_WINDOW, "B6", True, None)):
        m = rx.fullmatch(message)
        if not m:
            continue
        entity = _owner_entity(message)
        if groups is None:
            return _verdict("budget", "owner_budget", template, budget_error=BudgetError(message, None, None, entity))
        if template == "B5/B6" and m.group(3) is not None:  # owner reservation: cost includes this request
            return _verdict("budget", "owner_budget", template, budget_error=BudgetError(message, None, None, entity))
        cost, budget = _plausible(_number(m.group(groups[0])), _number(m.group(groups[1])), strict=strict, key=key,
                                  warnings=warnings)
        # A one-key owner (the OpenHands proxy's per-user key) has the key's budget: its numbers are the key's.
        one_key = key is None or _same_budget(budget, key.max_budget)  # no context: the caller's own read
        be = BudgetError(message, cost if one_key else None, budget if one_key else None, entity)
        return _verdict("budget", "owner_budget", template, budget_error=be, warnings=warnings)

    return _verdict("passthrough", "unknown_budget", None, warnings=["budget_exceeded with an unknown message"])


def _owner_entity(message: str) -> str:
    if " in Team=" in message.split(" Current cost:", 1)[0] or "TeamMember=" in message[:40]:
        return "TeamMember"
    for name in ("Team", "User", "Organization", "Project"):
        if message.startswith((f"Budget has been exceeded! {name}=", f"ExceededBudget: {name}=")):
            return name
    return "Owner"


def _auth(status: int, f: _Fields, key: KeyContext | None, client_texts: Iterable[str]) -> UpstreamVerdict:
    """A 400/401/403 that is not a budget answer."""
    message = f.message
    m = _K1.fullmatch(message)
    if m:
        if key is not None and m.group(2) == key.sha256:
            return _verdict("invalid", "key_dead", "K1", verified=True)
        return _verdict("passthrough", "sidecar", "K1", warnings=["unknown-key error names another credential"])
    if _K1_NEW.fullmatch(message) and f.type == "token_not_found_in_db":
        return _verdict("invalid", "key_dead", "K1")
    m = _K2.fullmatch(message)
    if m:
        param = f.param
        if isinstance(param, str) and param and param not in ("None", "null") and key is not None:
            if param in (key.api_key, key.sha256) or (param.startswith("sk-...") and param[-4:] == key.api_key[-4:]):
                return _verdict("invalid", "key_dead", "K2", verified=True)
            return _verdict("passthrough", "sidecar", "K2", warnings=["expired-key error names another credential"])
        return _verdict("invalid", "key_dead", "K2")
    if _K3.fullmatch(message):
        return _verdict("invalid", "key_dead", "K3")
    if _O1.fullmatch(message):
        return _verdict("invalid", "key_dead", "O1")
    if _O2.fullmatch(message):
        return _verdict("invalid", "key_dead", "O2")
    if _PROVIDER.match(message):
        return _verdict("passthrough", "provider", "U1")
    if _SIDECAR.match(message):
        return _verdict("passthrough", "sidecar", "S1")
    if _REQUEST_PREFIXES.match(message) or _REQUEST_ANYWHERE.search(message) or (f.type in _REQUEST_TYPES):
        return _verdict("passthrough", "request", "Q")
    if status not in (401, 403) or not f.is_error_object:
        return _verdict("passthrough", "request" if status < 500 else "provider", None)
    if _echoes(message, client_texts):
        return _verdict("passthrough", "request", None, warnings=["unrecognised 401/403 echoes the request"])
    # An unrecognised 401/403 on a pooled route, naming nothing the client sent: the key is refused.
    # Not verified: a second key refused for one request is confirmed before it is retired.
    return _verdict("invalid", "key_dead", None)


def _rate(f: _Fields, key: KeyContext | None, retry_after: float, client_texts: Iterable[str]) -> UpstreamVerdict:
    message = f.message
    m = _R1.match(message)
    if m:
        descriptor, value, limit = m.group(1), m.group(2), int(m.group(4))
        if descriptor == "end_user":
            return _verdict("passthrough", "request", "R1")
        if descriptor in ("api_key", "model_per_key"):
            hashed = value.split(":", 1)[0]
            if key is None or hashed != key.sha256:
                return _verdict("passthrough", "sidecar", "R1", warnings=["rate limit names another key"])
            if descriptor == "api_key" and limit == 0 and m.group(3) == "requests":
                return _verdict("invalid", "key_dead", "R1", verified=True)  # rpm 0: disabled by an admin
            return _verdict("rate_limited", "key_rate", "R1", verified=True, retry_after=retry_after)
        if descriptor in _OWNER_RATE:
            return _verdict("rate_limited", "key_rate", "R1", retry_after=retry_after)
        return _verdict("passthrough", "request", "R1")
    if _PROVIDER.match(message):
        return _verdict("passthrough", "provider", "U2")
    if _REQUEST_PREFIXES.match(message) or _echoes(message, client_texts):
        return _verdict("passthrough", "request", None)
    # Any other 429 (a proxy in front, an older limiter text): cooling down costs little and retries elsewhere.
    return _verdict("rate_limited", "key_rate", None, retry_after=retry_after)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    try:
        for k, value in headers.items():
            if isinstance(k, bytes):
                k = k.decode("latin-1")
            if isinstance(k, str) and k.lower() == name:
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
        except (ValueError, OverflowError):
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


def classify_response(status: int, headers: Mapping[str, str], body: bytes | str | Mapping | None, now: float,
                      *, key: KeyContext | None = None, client_texts: Iterable[str] = ()) -> UpstreamVerdict:
    """Map an upstream answer to the action of DESIGN §7. Never raises.

    `key` identifies the pool key the request went out on (identity checks, plausibility);
    `client_texts` are strings the client sent (model, user, path…): an unrecognised refusal that
    contains one is request-scoped.
    """
    try:
        return _classify(status, headers, body, now, key, tuple(t for t in client_texts if isinstance(t, str)))
    except Exception:  # noqa: BLE001 - junk in, "pass it through" out: the request path must not crash here
        return _verdict("passthrough", "other", None)


def _classify(status: object, headers: Mapping[str, str], body: object, now: float, key: KeyContext | None,
              client_texts: tuple[str, ...]) -> UpstreamVerdict:
    if isinstance(status, bool):
        return _verdict("passthrough", "other", None)
    code = int(cast("SupportsInt | str", status))  # anything else raises: classify_response passes it through
    if 200 <= code <= 399:
        return _verdict("ok", "ok", None)
    if not 400 <= code <= 499:
        return _verdict("passthrough", "provider", None)
    if key is not None:  # the upstream's own word on the key's max_budget (route-level errors) beats the pool's
        header_budget = _number(_header(headers, "x-litellm-key-max-budget"))
        if header_budget is not None and header_budget >= 0 and header_budget != key.max_budget:
            key = KeyContext(key.api_key, header_budget, key.settled_spend, key.in_flight, key.rotation_point)
    f = _fields(_decode(body))  # type: ignore[arg-type]
    retry_after = parse_retry_after(_header(headers, "retry-after"), now)
    if f.type == BUDGET_TYPE:
        return _budget(f.message, key, retry_after)
    if not f.is_error_object:
        if code == 429 and not f.detail:
            return _verdict("rate_limited", "key_rate", None, retry_after=retry_after)
        return _verdict("passthrough", "request", None)
    if code == 429:
        return _rate(f, key, retry_after, client_texts)
    if f.message.startswith(("ExceededBudget", "Budget has been exceeded!")) and code in (400, 422):
        # A budget template without its type: a proxy in front rewrote the envelope. Same anchored rules.
        return _budget(f.message, key, retry_after)
    return _auth(code, f, key, client_texts)


def parse_budget_error(status: int, body: bytes | str | Mapping | None, key: KeyContext | None = None
                       ) -> BudgetError | None:
    """The budget error that retires a key (key or owner budget), or None. Never raises."""
    verdict = classify_response(status, {}, body, 0.0, key=key)
    return verdict.budget_error if verdict.kind == "budget" else None
