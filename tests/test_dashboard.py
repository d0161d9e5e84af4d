"""Pure parts of the spend dashboard (issue 8 §4): series, burn rate, runway, escaping, self-containment."""
from __future__ import annotations

import re

import pytest

from addon.core import dashboard as d

NOW = 1_750_000_000.0
H = 3600.0


def key(key_id: str, spend: float, status: str = "healthy", point: float = 9.95) -> dict:
    return {"id": key_id, "apiKey": "sk-pool-...cdef", "status": status, "effectiveSpend": spend,
            "rotationPoint": point, "budgetLimit": 10.0, "lastUsedAt": "2025-06-15T15:00:00Z"}


def summary(keys: list[dict], available: int = 0, total: int = 0) -> dict:
    return {"threshold": 9.95, "totalKeys": len(keys), "healthyKeys": sum(k["status"] == "healthy" for k in keys),
            "totalBudget": 10.0 * len(keys), "totalSpend": sum(k["effectiveSpend"] for k in keys),
            "backupKeys": {"available": available, "total": total}, "keys": keys}


@pytest.mark.parametrize("value,expected", [
    ("2025-06-15T15:06:40Z", 1750000000.0), ("2025-06-15T15:06:40+00:00", 1750000000.0),
    (1750000000, 1750000000.0), ("junk", None), (None, None), (True, None), (float("nan"), None),
])
def test_epoch(value, expected):
    assert d.epoch(value) == expected


def test_series_orders_history_and_ends_at_the_current_spend():
    hist = [{"keyId": "k1", "spend": 2.0, "checkedAt": NOW - 60}, {"keyId": "k1", "spend": 1.0, "checkedAt": NOW - 120},
            {"keyId": "gone", "spend": 3.0, "checkedAt": NOW - 60}, {"keyId": "k1", "spend": "x", "checkedAt": "bad"}]
    s = d.series(hist, [key("k1", 2.5)], NOW)
    assert s["k1"] == [(NOW - 120, 1.0), (NOW - 60, 2.0), (NOW, 2.5)]
    assert s["gone"] == [(NOW - 60, 3.0)]  # a deleted key's history still draws


@pytest.mark.parametrize("per_key,expected", [
    ({}, None),
    ({"k1": [(NOW, 1.0)]}, None),  # one point is not a trend
    ({"k1": [(NOW - 30, 1.0), (NOW, 2.0)]}, None),  # under a minute of history
    ({"k1": [(NOW - 2 * H, 0.0), (NOW, 4.0)]}, 2.0),
    ({"k1": [(NOW - 2 * H, 0.0), (NOW, 4.0)], "k2": [(NOW - H, 1.0), (NOW, 3.0)]}, 3.0),
    ({"k1": [(NOW - 2 * H, 5.0), (NOW - H, 0.0), (NOW, 2.0)]}, 1.0),  # a reset is not negative spend
    ({"k1": [(NOW - 48 * H, 0.0), (NOW - 2 * H, 8.0), (NOW, 9.0)]}, 0.5),  # only the last day counts
])
def test_burn_rate(per_key, expected):
    assert d.burn_rate(per_key, NOW) == (pytest.approx(expected) if expected is not None else None)


def test_usable_budget_counts_live_keys_to_their_rotation_point_and_unused_backups():
    s = summary([key("k1", 4.95), key("k2", 9.99, "exhausted"), key("k3", 1.0, "rate_limited"),
                 key("k4", 11.0)], available=2, total=3)
    assert d.usable_budget(s) == pytest.approx(5.0 + 8.95 + 0 + 2 * 9.95)


@pytest.mark.parametrize("hours,text", [(None, "—"), (0.001, "1 min"), (0.5, "30 min"), (5.25, "5.2 h"),
                                        (72, "3.0 days")])
def test_human_duration(hours, text):
    assert d.human_duration(hours) == text


@pytest.mark.parametrize("top,step", [(10.4, 2.5), (1.0, 0.2), (0.03, 0.01), (123, 25)])
def test_nice_step(top, step):
    assert d.nice_step(top) == pytest.approx(step)


def page(**kw) -> str:
    s = summary([key("k1", 9.97, "exhausted"), key("k2", 4.0)], available=1, total=2)
    hist = [{"keyId": "k1", "spend": v, "checkedAt": NOW - (5 - i) * H} for i, v in enumerate([1, 3, 5, 7, 9])]
    return d.render_dashboard(s, hist, {"running": True}, [{"id": "k1", "requestsCount": 12}], now=NOW,
                              upstream="https://llm-proxy.example", **kw)


def test_page_has_key_rows_bars_chart_and_refresh():
    html = page(refresh_s=7)
    assert re.findall(r'<tr class="key-row" data-key-id="([^"]+)" data-status="([^"]+)"', html) == [
        ("k1", "exhausted"), ("k2", "healthy")]
    assert html.count('class="bar"') == 2
    assert '<svg id="spend-chart"' in html and html.count('class="series"') == 2
    assert '<meta http-equiv="refresh" content="7">' in html
    assert "Backups left" in html and ">1 / 2<" in html
    assert "Burn rate" in html and "/h" in html
    assert "Last key runs out" in html


def test_page_is_self_contained():
    html = page()
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', html)
    assert "@import" not in html and "url(" not in html
    assert "<script" not in html.lower()


def test_every_value_is_escaped():
    evil = '<img src=x onerror=alert(1)>"'
    s = summary([key(evil, 1.0, status=evil)])
    s["keys"][0]["apiKey"] = evil
    html = d.render_dashboard(s, [{"keyId": evil, "spend": 0.5, "checkedAt": NOW - H}], {}, [{"id": evil,
                              "lastError": evil}], now=NOW, upstream=evil)
    assert "<img" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;&quot;" in html


def test_empty_pool_renders_a_hint_not_an_error():
    html = d.render_dashboard(summary([]), [], {}, [], now=NOW)
    assert "No keys yet" in html and "No spend history yet" in html


# -- alert figures: keys left and time until the pool runs dry ------------------------------------
def figure(html: str, name: str) -> str:
    m = re.search(r'<div class="card" data-figure="%s"><div class="label">[^<]*</div>'
                  r'<div class="value">([^<]*)<' % name, html)
    assert m, name
    return m.group(1)


def test_forecast_counts_keys_left_and_the_runway():
    # k2 spends $1/h for 5 hours; it has $4.95 to its point, plus one backup at $9.95: 14.9 h left
    s = summary([key("k1", 9.97, "exhausted"), key("k2", 5.0), key("k3", 9.96)], available=1, total=2)
    hist = [{"keyId": "k2", "spend": float(i), "checkedAt": NOW - (5 - i) * H} for i in range(5)]
    fc = d.forecast(s, hist, NOW)
    assert (fc.live_keys_left, fc.backups_left, fc.keys_left) == (1, 1, 2)  # k3 sits past its rotation point
    assert fc.burn_rate_per_h == pytest.approx(1.0)
    assert fc.usable == pytest.approx(4.95 + 9.95)
    assert fc.runway_h == pytest.approx(14.9)


def test_forecast_without_history_has_no_rate_and_no_runway():
    fc = d.forecast(summary([key("k1", 2.0)], available=0, total=0), [], NOW)
    assert (fc.keys_left, fc.burn_rate_per_h, fc.runway_h) == (1, None, None)


def test_page_shows_keys_left_and_the_runway_from_the_same_forecast():
    s = summary([key("k1", 9.97, "exhausted"), key("k2", 5.0)], available=1, total=2)
    hist = [{"keyId": "k2", "spend": float(i), "checkedAt": NOW - (5 - i) * H} for i in range(5)]
    html = d.render_dashboard(s, hist, {}, [], now=NOW)
    fc = d.forecast(s, hist, NOW)
    assert figure(html, "keys-left") == str(fc.keys_left) == "2"
    assert figure(html, "runway") == f"≈ {d.human_duration(fc.runway_h)}" == "≈ 14.9 h"
    assert figure(html, "burn-rate") == "$1.00/h"


# -- sign-in ------------------------------------------------------------------------------------
def test_sign_out_button_only_when_a_token_is_configured():
    assert 'action="/admin/openhands/logout"' in page(logout=True)
    assert "logout" not in page()


def test_login_page_is_a_plain_form_without_script_or_external_assets():
    html = d.render_login(error='bad <b>"token"</b>')
    assert '<form method="post" action="/admin/openhands/login" id="login-form">' in html
    assert 'type="password" id="token" name="token"' in html
    assert "bad &lt;b&gt;&quot;token&quot;&lt;/b&gt;" in html and "<b>" not in html
    assert "<script" not in html.lower() and not re.search(r'(src|href)\s*=\s*"(https?:)?//', html)
