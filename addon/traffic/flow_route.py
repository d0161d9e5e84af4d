"""Which of the sidecar's own routes a request asks for: `/metrics`, the sign-in pages, the admin API.

Every request passes the `/metrics` and sign-in addon and the admin addon before it is pooled. Both must
recognise their paths in any spelling that normalizes to them (`//metrics`, `/%6Detrics`, `/./metrics`,
`/v1/../admin/openhands/keys`): such a request is answered here, never forwarded. Normalizing every
LLM request's path to find it is none of them is wasted work, so a cheap test comes first: without a `%`
nothing is decoded, and normalization only drops segments, turns `\\` into `/` and lowers the case, so
a path that normalizes to one of ours holds `metrics` or `openhands` in some case as sent. Only the
paths that do (or hold a `%`) are normalized and classified.
"""
from __future__ import annotations

from typing import Any, Literal

from addon.core.routes import is_admin_path, normalize_path
from addon.operator import admin_auth

LocalKind = Literal["metrics", "session", "admin"]
METRICS: LocalKind = "metrics"  # GET /metrics (addon.operator.observability)
SESSION: LocalKind = "session"  # the dashboard's sign-in and sign-out (also admin paths: answered before them)
ADMIN: LocalKind = "admin"      # the admin API and dashboard (addon.operator.admin_addon)


def local_route(raw: str) -> tuple[LocalKind, str] | None:
    """(kind, normalized path) when `raw` (query included) normalizes to one of the sidecar's own routes;
    None for any other path, the LLM routes above all (decided without normalizing them)."""
    if "%" not in raw:
        low = raw.lower()
        if "metrics" not in low and "openhands" not in low:
            return None
    path = normalize_path(raw)  # (cached)
    if path == admin_auth.METRICS_PATH:
        return METRICS, path
    if admin_auth.is_session_path(path):
        return SESSION, path
    if is_admin_path(raw):
        return ADMIN, path
    return None


def route_of(flow: Any, settings: Any) -> tuple[LocalKind, str] | None:
    """The sidecar route `flow` asks for on the upstream's address (other hosts pass untouched), or None."""
    req = flow.request
    local = local_route(req.path)
    if local is None or not settings.is_upstream(req.host, req.port):
        return None
    return local
