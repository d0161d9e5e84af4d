"""The one-line `flow.comment` of pooled flows, so mitmweb's flow list reads at a glance.

Pure: strings in, strings out. The comment is built from metered figures (the stream tap's usage or
the buffered body), never from a stored body, so it reads the same with and without mitmproxy's
`store_streamed_bodies`. No full pool key ever appears here: callers pass the masked key.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

from addon.core.masking import mask_key

SEP = " · "
MAX_ID = 40  # a flow list column, not a report: long ids are shortened
_EXACT = 2**53  # integers a float holds exactly
_INF = math.inf


def _num(value: Any) -> float:
    if type(value) is float and -_INF < value < _INF:  # the usual case: a finite float (NaN fails both)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return 0.0
    return float(value)


def _int(value: Any) -> int:
    if type(value) is int and 0 <= value <= _EXACT:  # the usual case: a token count
        return value
    number = _num(value)
    return int(number) if number >= 0 else 0


def _clean(text: Any, limit: int = MAX_ID) -> str:
    """One line, printable, bounded: comments come from operators' ids and upstream model names."""
    s = str(text if text is not None else "?")
    if not s.isprintable():
        s = "".join(c if c.isprintable() else " " for c in s)
    s = s.strip() or "?"
    return s if len(s) <= limit else s[: limit - 1] + "…"


def display_id(key_id: str, masked_key: str = "") -> str:
    """The key id, masked too if an operator used the key itself as its id."""
    key_id = str(key_id or "?")
    if masked_key and len(key_id) >= 16 and "..." in masked_key:
        head, _, tail = masked_key.partition("...")
        if key_id.startswith(head) and key_id.endswith(tail):
            return mask_key(key_id)
    return _clean(key_id)


def money(value: Any) -> str:
    """Dollars with enough digits that a cheap request does not read as $0.00."""
    if type(value) is float and 0 < value < 0.01:  # the usual charge of one request, first
        return f"${value:.6f}"
    v = _num(value)
    if v == 0:
        return "$0"
    if v < 0.01:
        return f"${v:.6f}"
    if v < 1:
        return f"${v:.4f}"
    return f"${v:.2f}"


def usage_line(key_id: str, masked_key: str, model: str | None, tokens: Mapping[str, Any] | None,
               cost: float, key_spend: float | None, budget: float | None, cost_source: str = "") -> str:
    """`🔑 id (sk-abcde...wxyz) · model · in N out N cache rN/wN · $cost · key $spent/$budget`."""
    if type(key_id) is str and type(masked_key) is str and (model is None or type(model) is str):
        head = _head(key_id, masked_key, model)  # a pool's keys and models: a handful, built once
    else:
        head = _make_head(key_id, masked_key, model)
    if tokens:
        get = tokens.get
        i, o, r, w = get("input"), get("output"), get("cache_read"), get("cache_write")
        if not (type(i) is int and type(o) is int and type(r) is int and type(w) is int
                and 0 <= i <= _EXACT and 0 <= o <= _EXACT and 0 <= r <= _EXACT and 0 <= w <= _EXACT):
            i, o, r, w = _int(i), _int(o), _int(r), _int(w)  # (plain counts, the usual case, as they are)
        counts = f"in {i} out {o} cache r{r}/w{w}"
    else:
        counts = "no usage reported"
    # (ASCII parts first, the line itself once: the key emoji makes every string it is in four bytes a character)
    dollars = money(cost)
    if cost_source in ("fallback", "none"):
        dollars = f"{dollars} ({cost_source})"
    if key_spend is None:
        return f"{head}{counts}{SEP}{dollars}"
    if not (type(key_spend) is float and -_INF < key_spend < _INF):
        key_spend = _num(key_spend)
    if not budget:
        return f"{head}{counts}{SEP}{dollars}{SEP}key ${key_spend:.4f}"
    return f"{head}{counts}{SEP}{dollars}{SEP}key ${key_spend:.4f}{_budget_text(budget)}"


def _budget_text(budget: Any) -> str:
    """`/$10.00`: a key's budget, formatted once per budget (a pool has a handful)."""
    if type(budget) is float:
        text = _BUDGETS.get(budget)
        if text is None:
            text = f"/${_num(budget):.2f}"
            if len(_BUDGETS) < 1024:
                _BUDGETS[budget] = text
        return text
    return f"/${_num(budget):.2f}"


_BUDGETS: dict[float, str] = {}


def _make_head(key_id: str, masked_key: str, model: str | None) -> str:
    return f"🔑 {display_id(key_id, masked_key)} ({masked_key or '***'}){SEP}{_clean(model or '?', 60)}{SEP}"


_head = functools.lru_cache(maxsize=1024)(_make_head)


def rotated_marker(old_id: str, new_id: str) -> str:
    """Proactive rotation before sending: the client moved to another key."""
    return f"🔮 rotated {_clean(old_id)}→{_clean(new_id)}"


def retried_marker(new_id: str, reason: str) -> str:
    """The upstream refused the key (budget, rate limit, invalid); the addon resent on another."""
    return f"↩️ retried on {_clean(new_id)} after {_clean(reason, 20)}"


def failed_marker(reason: str, tried: list[str] | tuple[str, ...] | None = None) -> str:
    """The client got a local error instead of an upstream answer."""
    text = f"⛔ {_clean(reason, 120)}"
    if tried:
        text += " · tried " + ", ".join(_clean(t) for t in tried)
    return text


def dropped_marker() -> str:
    """A stream that ended early: charged for what was metered before the drop."""
    return "✂️ stream dropped"


def append(comment: str | None, part: str) -> str:
    """Markers and the usage line accumulate in order, so a rotated-then-retried flow tells its story."""
    if not part:
        return comment or ""
    return f"{comment}{SEP}{part}" if comment else part
