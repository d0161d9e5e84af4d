"""Which requests the sidecar answers as its own (`/metrics`, sign-in, admin API) whatever their spelling,
and that every other path, the LLM routes above all, is left to the pooled-traffic addon."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from mitmproxy.test import tflow, tutils

from addon.core.routes import ADMIN_EXACT, ADMIN_PREFIXES, is_admin_path, normalize_path
from addon.operator import admin_auth
from addon.traffic.flow_route import ADMIN, METRICS, SESSION, local_route, route_of


@pytest.mark.parametrize("raw, expected", [
    ("/metrics", (METRICS, "/metrics")),
    ("/METRICS", (METRICS, "/metrics")),
    ("//metrics", (METRICS, "/metrics")),
    ("/./metrics", (METRICS, "/metrics")),
    ("/%6Detrics", (METRICS, "/metrics")),
    ("/%256Detrics", (METRICS, "/metrics")),          # decoded until stable
    ("/v1/../metrics?x=1", (METRICS, "/metrics")),
    ("\\metrics", (METRICS, "/metrics")),
    ("/metrics/", (METRICS, "/metrics")),
    ("/admin/openhands/login", (SESSION, "/admin/openhands/login")),
    ("//Admin/OpenHands/logout?next=/", (SESSION, "/admin/openhands/logout")),
    ("/admin/openhands/keys", (ADMIN, "/admin/openhands/keys")),
    ("/%61dmin/openhands/keys/k1", (ADMIN, "/admin/openhands/keys/k1")),
    ("/v1/../admin/openhands", (ADMIN, "/admin/openhands")),
    ("/openhands/spend-stats", (ADMIN, "/openhands/spend-stats")),
    ("/%6Fpenhands/spend-stats", (ADMIN, "/openhands/spend-stats")),
    ("/chat/completions", None),
    ("/v1/chat/completions?api-version=1", None),
    ("/v1/messages", None),
    ("/responses/%72esp_1", None),                     # a %-escape that is none of ours: normalized, still None
    ("/metrics2", None),
    ("/openhands", None),
    ("/admin/openhandsx", None),
    ("/key/generate?note=metrics", None),              # the name in the query only
    ("*", None),
])
def test_local_routes_in_any_spelling_and_no_other_path(raw, expected):
    assert local_route(raw) == expected


@pytest.mark.parametrize("raw", [
    "/chat/completions", "/METRICS", "/%6Detrics", "//admin//openhands/keys", "/a/../Admin/OpenHands/x", "/%2E/metrics",
    "/openhands/spend-stats/", "/v1/models", "/x%2F..%2Fmetrics", "/İ/metrics", "/\u212a/openhands/spend-stats",
])
def test_the_quick_rejection_agrees_with_full_normalization(raw):
    """What the cheap test skips is exactly what normalizing would not have found ours."""
    path = normalize_path(raw)
    ours = path == admin_auth.METRICS_PATH or admin_auth.is_session_path(path) or is_admin_path(raw)
    assert (local_route(raw) is not None) is ours


def test_every_route_of_ours_holds_a_name_the_quick_test_looks_for():
    """A new admin path without `openhands` in it would be forwarded: the quick test must learn its name."""
    for path in (admin_auth.METRICS_PATH, admin_auth.LOGIN_PATH, admin_auth.LOGOUT_PATH, *ADMIN_PREFIXES, *ADMIN_EXACT):
        assert "metrics" in path or "openhands" in path, path


@pytest.mark.parametrize("host, port, expected", [
    ("127.0.0.1", 4000, (METRICS, "/metrics")),
    ("LOCALHOST", 4000, None),                         # another authority: passes untouched
    ("127.0.0.1", 4001, None),
])
def test_only_the_upstreams_address_is_ours(host, port, expected):
    settings = SimpleNamespace(is_upstream=lambda h, p: h.lower() == "127.0.0.1" and p == 4000)
    f = tflow.tflow(req=tutils.treq(host=host, port=port, path=b"//metrics"))
    assert route_of(f, settings) == expected
