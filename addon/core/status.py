"""A pool key's status: the stored strings of existing deployments, in one enum."""
from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    HEALTHY = "healthy"
    RATE_LIMITED = "rate_limited"   # cooling down until `cooldownUntil`; comes back by itself
    EXHAUSTED = "exhausted"         # its budget is spent (retired)
    INVALID = "invalid"             # the upstream proved the key dead (retired)


STATUSES: tuple[str, ...] = tuple(s.value for s in Status)
RETIRED: frozenset[str] = frozenset({Status.EXHAUSTED, Status.INVALID})
