"""When to leave a key and which key to take next (pure: no I/O, time is passed in).

The threshold is expressed for a nominal $10 key (default 9.95: rotate when less than $0.05
remains). Keys with another ``budgetLimit`` keep the same remaining *margin*, not the same ratio:
the margin exists to absorb the cost of the requests already in flight, which does not grow with
the key's budget.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from addon.core.answers import MAX_OVERSHOOT  # one bound for every upstream spend figure
from addon.core.status import Status

__all__ = [
    "NOMINAL_BUDGET",
    "SPEND_EPSILON",
    "KeyView",
    "rotation_point",
    "effective_spend",
    "has_reached_rotation_point",
    "remaining_budget",
    "is_usable",
    "choose_key",
    "rotation_reason",
]

NOMINAL_BUDGET = 10.0

# Spend is a running float sum of many small costs, so a key that has "spent $9.95" may hold
# 9.949999999999832 (995 × $0.01) or 9.949999999. With 1e-9 the latter sits exactly on the edge
# (9.95 - 9.949999999 is 1.00000008e-9 in binary floats; it passes only by rounding luck), so the
# margin is a millionth of a dollar: far above accumulated float error, far below a cent, the
# resolution at which the threshold is configured.
SPEND_EPSILON = 1e-6



@dataclass(frozen=True)
class KeyView:
    """The fields of a pool key that the policy reads (a snapshot, never mutated)."""

    id: str
    status: str  # healthy | rate_limited | exhausted | invalid
    spend_estimate: float
    total_spend: float
    budget_limit: float
    cooldown_until: float | None
    bindings: int = 0


def _budget(budget_limit: float | None) -> float:
    # A missing or NaN budgetLimit means the documented default; NaN would otherwise make every
    # comparison false and the key would never rotate.
    if budget_limit is None or (isinstance(budget_limit, float) and math.isnan(budget_limit)):
        return NOMINAL_BUDGET
    return float(budget_limit)


def rotation_point(budget_limit: float, threshold: float) -> float:
    """Spend at which a key is left: its budget minus the margin the threshold sets for $10."""
    return _budget(budget_limit) - (NOMINAL_BUDGET - threshold)


def plausible_spend(spend: float | None, budget_limit: float | None) -> bool:
    """Can an upstream figure of a key's spend (`x-litellm-key-spend`, the activity endpoint) be true? Finite,
    non-negative and at most $1000 over the key's budget: LiteLLM stops admitting requests at the budget, so
    only requests already in flight take a key past it. A figure beyond that would retire a key with budget left."""
    return spend is not None and math.isfinite(spend) and 0 <= spend <= _budget(budget_limit) + MAX_OVERSHOOT


def _dollars(value: float | None) -> float:
    # None (never metered/polled) and NaN (corrupt record) count as nothing spent; +inf stays, so
    # a key reported as spent without bound is left at once.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 0.0
    return float(value)


def effective_spend(spend_estimate: float | None, total_spend: float | None) -> float:
    """The larger of the metered estimate and the last polled spend: either may lag the other."""
    return max(_dollars(spend_estimate), _dollars(total_spend))


def has_reached_rotation_point(
    spend_estimate: float | None, total_spend: float | None, budget_limit: float, threshold: float
) -> bool:
    """True once the key's effective spend is at (or within float noise of) its rotation point."""
    point = rotation_point(budget_limit, threshold)
    return effective_spend(spend_estimate, total_spend) >= point - SPEND_EPSILON


def remaining_budget(key: KeyView) -> float:
    """Dollars left before the key's hard budget."""
    return _budget(key.budget_limit) - effective_spend(key.spend_estimate, key.total_spend)


def is_usable(key: KeyView, now: float, threshold: float) -> bool:
    """Healthy (or rate-limited with its cooldown over) and still below its rotation point.

    A healthy key is usable whatever a stale ``cooldown_until`` says; only ``rate_limited`` waits.
    """
    if key.status == Status.HEALTHY:
        pass
    elif key.status == Status.RATE_LIMITED:
        if key.cooldown_until is not None and now < key.cooldown_until:
            return False
    else:
        return False
    return not has_reached_rotation_point(key.spend_estimate, key.total_spend, key.budget_limit, threshold)


def choose_key(
    keys: Sequence[KeyView],
    current: str | None,
    now: float,
    threshold: float,
    exclude: Collection[str] = (),
) -> str | None:
    """The key a client should use now, or None when no key is usable (promote a backup then).

    The current key is kept while usable: one conversation keeps one key, since the provider's
    prompt cache is per key and switching keys costs money. Otherwise the least-bound key spreads
    clients over the pool; ties go to the most remaining budget, then the smallest id, so every
    sidecar makes the same choice from the same state.
    """
    excluded = set(exclude)
    usable = [k for k in keys if k.id not in excluded and is_usable(k, now, threshold)]
    if current is not None and any(k.id == current for k in usable):
        return current
    if not usable:
        return None
    return min(usable, key=lambda k: (k.bindings, -remaining_budget(k), k.id)).id


def rotation_reason(spend: float, point: float) -> str:
    """History label for a proactive rotation, e.g. ``proactive_threshold_9.96`` (the spend).

    ``point`` is accepted so callers pass both sides of the comparison; the label keeps the
    format existing history rows use, which records the spend only.
    """
    return f"proactive_threshold_{spend:.2f}"
