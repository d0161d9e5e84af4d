"""How often the spend checker polls a key, by how much it has spent (pure: time is passed in).

Polling is cheap but not free, and a key far from its budget cannot run out between two slow
polls; a key near its budget can, so it is polled often.

Tier names are ranges in dollars derived from the tiers themselves (``<$5``, ``$5-$7``, ``>=$7``
for the defaults) so they stay right when an operator configures other tiers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Tier", "DEFAULT_TIERS", "interval_for", "tier_name", "next_check_at", "is_due", "parse_tiers"]


@dataclass(frozen=True)
class Tier:
    """From ``min_spend`` dollars up to the next tier's, poll every ``interval_s`` seconds."""

    min_spend: float
    interval_s: float


DEFAULT_TIERS: tuple[Tier, ...] = (Tier(0.0, 300.0), Tier(5.0, 120.0), Tier(7.0, 10.0))

_KEYS = ("min_spend", "interval_seconds")


def _tier_index(spend: float, tiers: Sequence[Tier]) -> int:
    if not tiers:
        raise ValueError("no spend tiers configured")
    if isinstance(spend, float) and math.isnan(spend):
        # Unknown spend: poll as often as the closest-to-budget tier rather than risk a late poll.
        return len(tiers) - 1
    index = 0
    for i, tier in enumerate(tiers):
        if spend >= tier.min_spend:
            index = i
    return index


def interval_for(spend: float, tiers: Sequence[Tier] = DEFAULT_TIERS) -> float:
    """Seconds between polls at this spend (below the first tier counts as the first tier)."""
    return tiers[_tier_index(spend, tiers)].interval_s


def _dollars(value: float) -> str:
    return f"${value:g}"


def tier_name(spend: float, tiers: Sequence[Tier] = DEFAULT_TIERS) -> str:
    """Readable range of the tier this spend falls in, for logs: ``<$5``, ``$5-$7``, ``>=$7``."""
    i = _tier_index(spend, tiers)
    if i == len(tiers) - 1:
        return f">={_dollars(tiers[i].min_spend)}"
    if i == 0:
        return f"<{_dollars(tiers[1].min_spend)}"
    return f"{_dollars(tiers[i].min_spend)}-{_dollars(tiers[i + 1].min_spend)}"


def _never_checked(last_check: float | None) -> bool:
    # A NaN/inf timestamp would make the key never due; treat it as never checked instead.
    return last_check is None or not math.isfinite(last_check)


def next_check_at(last_check: float | None, spend: float, tiers: Sequence[Tier] = DEFAULT_TIERS) -> float | None:
    """Epoch seconds of the next poll; None when the key was never checked (due now)."""
    if last_check is None or _never_checked(last_check):
        return None
    return last_check + interval_for(spend, tiers)


def is_due(last_check: float | None, spend: float, now: float, tiers: Sequence[Tier] = DEFAULT_TIERS) -> bool:
    """Whether the key should be polled now."""
    at = next_check_at(last_check, spend, tiers)
    return at is None or now >= at


def _number(value: object, where: str) -> float:
    # bool is an int subclass: `interval_seconds = true` is a typo, not 1 second.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{where} must be finite, got {value!r}")
    return number


def parse_tiers(value: object) -> tuple[Tier, ...]:
    """Tiers from the TOML list of tables; ValueError naming the bad value otherwise.

    Unknown keys are rejected so a misspelt ``interval_seconds`` fails at start instead of
    silently keeping a default.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"spend tiers must be a list of tables, got {value!r}")
    if not value:
        raise ValueError("spend tiers must not be empty, got []")
    tiers: list[Tier] = []
    for i, row in enumerate(value):
        where = f"spend tier #{i + 1}"
        if not isinstance(row, Mapping):
            raise ValueError(f"{where} must be a table with min_spend and interval_seconds, got {row!r}")
        unknown = sorted(str(k) for k in row if k not in _KEYS)
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {', '.join(unknown)} in {dict(row)!r}")
        missing = [k for k in _KEYS if k not in row]
        if missing:
            raise ValueError(f"{where} is missing {', '.join(missing)} in {dict(row)!r}")
        min_spend = _number(row["min_spend"], f"{where} min_spend")
        interval = _number(row["interval_seconds"], f"{where} interval_seconds")
        if interval <= 0:
            raise ValueError(f"{where} interval_seconds must be positive, got {row['interval_seconds']!r}")
        if i == 0 and min_spend != 0:
            raise ValueError(f"the first spend tier must start at min_spend = 0, got {row['min_spend']!r}")
        if tiers and min_spend <= tiers[-1].min_spend:
            raise ValueError(
                f"{where} min_spend must be greater than the previous tier's "
                f"({tiers[-1].min_spend:g}), got {row['min_spend']!r}"
            )
        tiers.append(Tier(min_spend, interval))
    return tuple(tiers)
