"""The spend dashboard (`GET /admin/openhands/`): one self-contained HTML page, rendered server-side.

Pure: it gets the same data the JSON endpoints return (spend summary, spend history, spend-checker
stats, the key list) and returns HTML. No external assets, no script needed: the chart is inline SVG
and the page reloads itself with a meta refresh, so it works wherever the admin API answers (loopback
browsers; with an admin token, clients that send the bearer header). Every value is escaped.
"""
from __future__ import annotations

import datetime as dt
import html
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

REFRESH_S = 15
BURN_WINDOW_S = 24 * 3600.0  # the burn rate looks at the last day of history
MIN_SPAN_S = 60.0  # less history than this gives no rate: one poll is not a trend
PALETTE = ("#2563eb", "#db2777", "#059669", "#d97706", "#7c3aed", "#0891b2", "#dc2626", "#65a30d",
           "#9333ea", "#ea580c", "#0d9488", "#4f46e5")
STATUS_COLORS = {"healthy": "#15803d", "rate_limited": "#b45309", "exhausted": "#6b7280", "invalid": "#b91c1c"}

Point = tuple[float, float]  # (epoch seconds, dollars)


# -- data helpers (pure) ------------------------------------------------------------------------
def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def num(value: Any, default: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return float(value)


def epoch(value: Any) -> float | None:
    """ISO-8601 (the API's `...Z` form), a datetime, or epoch seconds."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).timestamp()
    if isinstance(value, str) and value:
        try:
            d = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return (d if d.tzinfo else d.replace(tzinfo=dt.timezone.utc)).timestamp()
    return None


def series(history: Iterable[Mapping[str, Any]], keys: Iterable[Mapping[str, Any]],
           now: float) -> dict[str, list[Point]]:
    """Each key's spend over time: its history rows, then its current spend at `now`, in time order."""
    out: dict[str, list[Point]] = {}
    for row in history:
        key_id, at = row.get("keyId"), epoch(row.get("checkedAt"))
        if not isinstance(key_id, str) or at is None or at > now + 60:
            continue
        out.setdefault(key_id, []).append((at, max(0.0, num(row.get("spend")))))
    for k in keys:
        key_id = k.get("id")
        if isinstance(key_id, str):
            out.setdefault(key_id, []).append((now, max(0.0, num(k.get("effectiveSpend")))))
    for pts in out.values():
        pts.sort()
    return dict(sorted(out.items()))


def burn_rate(per_key: Mapping[str, list[Point]], now: float, window_s: float = BURN_WINDOW_S) -> float | None:
    """Pool spend per hour over the window: the sum of every key's growth over the longest span seen.

    Spend only grows (a reset or a new key starts a new segment), so drops are skipped, not subtracted.
    None when the history is too short to call it a rate.
    """
    start = now - window_s
    growth, earliest = 0.0, None
    for pts in per_key.values():
        inside = [p for p in pts if p[0] >= start]
        if len(inside) < 2:
            continue
        earliest = inside[0][0] if earliest is None else min(earliest, inside[0][0])
        growth += sum(max(0.0, b[1] - a[1]) for a, b in zip(inside, inside[1:], strict=False))
    if earliest is None or now - earliest < MIN_SPAN_S:
        return None
    return growth / ((now - earliest) / 3600.0)


def usable_budget(summary: Mapping[str, Any]) -> float:
    """Dollars the pool can still spend before its last rotation: live keys up to their rotation
    point, plus each unused backup at the threshold (the rotation point of a default $10 key)."""
    total = 0.0
    for k in summary.get("keys") or []:
        if k.get("status") in ("healthy", "rate_limited"):
            total += max(0.0, num(k.get("rotationPoint")) - num(k.get("effectiveSpend")))
    backups = summary.get("backupKeys") or {}
    total += max(0, int(num(backups.get("available")))) * num(summary.get("threshold"))
    return total


def runway_hours(usable: float, rate_per_h: float | None) -> float | None:
    if rate_per_h is None or rate_per_h <= 0:
        return None
    return usable / rate_per_h


def live_keys_left(summary: Mapping[str, Any]) -> int:
    """Keys still in service below their rotation point (rate-limited ones come back by themselves)."""
    return sum(1 for k in summary.get("keys") or []
               if k.get("status") in ("healthy", "rate_limited")
               and num(k.get("effectiveSpend")) < num(k.get("rotationPoint")))


@dataclass(frozen=True)
class Forecast:
    """Alert-ready figures: how many keys are left and, at the current burn rate, for how long."""

    live_keys_left: int
    backups_left: int
    usable: float                  # dollars before the last rotation
    burn_rate_per_h: float | None  # None: not enough history for a rate
    runway_h: float | None         # None: no rate, or no spend in the window

    @property
    def keys_left(self) -> int:
        return self.live_keys_left + self.backups_left


def forecast(summary: Mapping[str, Any], history: Iterable[Mapping[str, Any]], now: float) -> Forecast:
    """The pool's run-dry forecast from `spend-summary` rows and spend-history rows."""
    rate = burn_rate(series(history, summary.get("keys") or [], now), now)
    usable = usable_budget(summary)
    backups = max(0, int(num((summary.get("backupKeys") or {}).get("available"))))
    return Forecast(live_keys_left(summary), backups, usable, rate, runway_hours(usable, rate))


def human_duration(hours: float | None) -> str:
    if hours is None:
        return "—"
    if hours < 1:
        return f"{max(1, round(hours * 60))} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


def nice_step(top: float, max_ticks: int = 5) -> float:
    """A round tick step ($0.50, $2, $5…) so the axis reads at a glance."""
    top = top if top > 0 and math.isfinite(top) else 1.0
    base = 10 ** math.floor(math.log10(top / max_ticks))
    for m in (1, 2, 2.5, 5, 10):
        if top / (base * m) <= max_ticks:
            return base * m
    return base * 10


def fmt_time(at: float | None, with_date: bool = False) -> str:
    if at is None:
        return "—"
    d = dt.datetime.fromtimestamp(at, dt.timezone.utc)
    return d.strftime("%Y-%m-%d %H:%M UTC" if with_date else "%H:%M")


# -- rendering ----------------------------------------------------------------------------------
def _bar(spend: float, point: float, status: str) -> str:
    pct = 100.0 if point <= 0 else min(100.0, 100.0 * spend / point)
    if status in ("exhausted", "invalid"):
        color = STATUS_COLORS[status]
    else:
        color = "#16a34a" if pct < 70 else "#f59e0b" if pct < 90 else "#dc2626"
    return (f'<div class="bar" title="{pct:.1f}% of the rotation point"><div class="fill" '
            f'style="width:{pct:.1f}%;background:{color}"></div></div>')


def _key_rows(summary: Mapping[str, Any], extra: Mapping[str, Mapping[str, Any]], colors: Mapping[str, str]) -> str:
    rows = []
    for k in summary.get("keys") or []:
        key_id = str(k.get("id", "?"))
        status = str(k.get("status", "?"))
        spend, point, budget = num(k.get("effectiveSpend")), num(k.get("rotationPoint")), num(k.get("budgetLimit"))
        more = extra.get(key_id, {})
        err = more.get("lastError")
        rows.append(
            f'<tr class="key-row" data-key-id="{esc(key_id)}" data-status="{esc(status)}">'
            f'<td><span class="swatch" style="background:{colors.get(key_id, "#999")}"></span>{esc(key_id)}</td>'
            f'<td class="mono">{esc(k.get("apiKey"))}</td>'
            f'<td><span class="status" style="background:{STATUS_COLORS.get(status, "#6b7280")}">'
            f'{esc(status.replace("_", " "))}</span></td>'
            f'<td class="spend">{_bar(spend, point, status)}<div class="small">${spend:.4f} of ${point:.2f} '
            f'rotation point · budget ${budget:.2f}</div></td>'
            f'<td class="num">{int(num(more.get("requestsCount")))}</td>'
            f'<td class="small">{esc(fmt_time(epoch(k.get("lastUsedAt")), with_date=True))}'
            + (f'<div class="err" title="{esc(err)}">{esc(str(err)[:80])}</div>' if err else "")
            + "</td></tr>")
    if not rows:
        rows.append('<tr><td colspan="6" class="empty">No keys yet: add one with '
                    '<code>POST /admin/openhands/keys</code> or <code>openhands.add</code>.</td></tr>')
    return "\n".join(rows)


def chart_svg(per_key: Mapping[str, list[Point]], threshold: float, colors: Mapping[str, str], now: float,
              width: int = 1120, height: int = 300) -> str:
    """Spend per key over time as inline SVG, with the rotation point as a dashed line."""
    left, right, top, bottom = 56, 16, 14, 34
    pw, ph = width - left - right, height - top - bottom
    all_pts = [p for pts in per_key.values() for p in pts]
    t0 = min((p[0] for p in all_pts), default=now - 3600)
    t1 = max(now, max((p[0] for p in all_pts), default=now))
    if t1 - t0 < 60:
        t0 = t1 - 3600  # a single moment: show the last hour so the points sit at the right edge
    step = nice_step(max([threshold * 1.05 if threshold > 0 else 1.0] + [p[1] * 1.05 for p in all_pts]))
    ticks = math.ceil(max([threshold * 1.05 if threshold > 0 else 1.0] + [p[1] * 1.05 for p in all_pts]) / step)
    ymax = step * ticks

    def x(t: float) -> float:
        return left + pw * (t - t0) / (t1 - t0)

    def y(v: float) -> float:
        return top + ph * (1 - v / ymax)

    parts = [f'<svg id="spend-chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
             f'width="100%" role="img" aria-label="spend per key over time">']
    for i in range(ticks + 1):
        v = step * i
        parts.append(f'<line class="grid" x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>'
                     f'<text class="axis" x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">${v:.2f}</text>')
    for i in range(5):
        t = t0 + (t1 - t0) * i / 4
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        parts.append(f'<text class="axis" x="{x(t):.1f}" y="{height - 12}" text-anchor="{anchor}">'
                     f'{esc(fmt_time(t, with_date=(i == 0)))}</text>')
    if threshold > 0:
        parts.append(f'<line class="threshold" x1="{left}" x2="{left + pw}" y1="{y(threshold):.1f}" '
                     f'y2="{y(threshold):.1f}"/><text class="axis threshold-label" x="{left + pw - 4}" '
                     f'y="{y(threshold) - 5:.1f}" text-anchor="end">rotation point ${threshold:.2f}</text>')
    for key_id, pts in per_key.items():
        color = colors.get(key_id, "#999")
        coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
        parts.append(f'<polyline class="series" data-key-id="{esc(key_id)}" fill="none" stroke="{color}" '
                     f'stroke-width="2.2" stroke-linejoin="round" points="{coords}"><title>{esc(key_id)}</title>'
                     f'</polyline>')
        last_t, last_v = pts[-1]
        parts.append(f'<circle cx="{x(last_t):.1f}" cy="{y(last_v):.1f}" r="3.5" fill="{color}">'
                     f'<title>{esc(key_id)}: ${last_v:.4f}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


CSS = """
:root{--bg:#f6f7f9;--card:#fff;--ink:#111827;--muted:#6b7280;--line:#e5e7eb}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.45 system-ui,-apple-system,"Segoe UI",
 "DejaVu Sans",sans-serif}
header{background:#111827;color:#f9fafb;padding:14px 24px;display:flex;align-items:baseline;gap:16px;flex-wrap:wrap}
header h1{font-size:18px;margin:0;font-weight:600}
header .sub{color:#9ca3af;font-size:12px}
main{padding:18px 24px;max-width:1240px;margin:0 auto}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:12px;margin-bottom:16px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 14px}
.card .label{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .value{font-size:22px;font-weight:600;margin-top:2px}
.card .hint{color:var(--muted);font-size:12px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px 16px;margin-bottom:16px}
section h2{font-size:15px;margin:0 0 10px}
table{width:100%;border-collapse:collapse}
th{text-align:left;color:var(--muted);font-weight:500;font-size:12px;\
border-bottom:1px solid var(--line);padding:6px 8px}
td{border-bottom:1px solid var(--line);padding:8px;vertical-align:middle}
tr:last-child td{border-bottom:0}
.mono{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px}
.num{text-align:right;font-variant-numeric:tabular-nums}
.small{font-size:12px;color:var(--muted)}
.status{color:#fff;border-radius:999px;padding:2px 9px;font-size:12px;white-space:nowrap}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:8px}
.spend{min-width:300px}
.bar{height:10px;background:#eef0f3;border-radius:5px;overflow:hidden;margin-bottom:3px}
.bar .fill{height:100%;border-radius:5px}
.err{color:#b91c1c;font-size:11px;max-width:260px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.empty{color:var(--muted);text-align:center;padding:18px}
svg .grid{stroke:#eef0f3}
svg .axis{fill:#6b7280;font-size:11px}
svg .threshold{stroke:#dc2626;stroke-dasharray:6 4;stroke-width:1.2}
svg .threshold-label{fill:#dc2626}
.legend{display:flex;gap:14px;flex-wrap:wrap;font-size:12px;color:var(--muted);margin-top:6px}
footer{color:var(--muted);font-size:12px;text-align:center;padding:8px 0 20px}
.signout{margin-left:auto}
.signout button{background:transparent;color:#f9fafb;border:1px solid #4b5563;border-radius:6px;padding:4px 10px;
 font:inherit;font-size:12px;cursor:pointer}
.login{max-width:380px;margin:64px auto;background:var(--card);border:1px solid var(--line);border-radius:10px;
 padding:22px 24px}
.login h1{font-size:18px;margin:0 0 6px}
.login p{color:var(--muted);font-size:13px;margin:0 0 14px}
.login label{display:block;font-size:12px;color:var(--muted);margin-bottom:4px}
.login input{width:100%;padding:8px 10px;border:1px solid var(--line);border-radius:6px;font:inherit}
.login button{margin-top:12px;width:100%;padding:8px;border:0;border-radius:6px;background:#111827;color:#fff;
 font:inherit;cursor:pointer}
.login .error{color:#b91c1c;font-size:13px;margin:0 0 10px}
"""


def render_dashboard(summary: Mapping[str, Any], history: list[Mapping[str, Any]] | None = None,
                     stats: Mapping[str, Any] | None = None, keys: list[Mapping[str, Any]] | None = None, *,
                     now: float, refresh_s: int = REFRESH_S, upstream: str = "", logout: bool = False) -> str:
    """The whole page from `spend-summary`, `spend-history` rows, `spend-stats` and `keys` rows.

    `logout`: show the sign-out button (an admin token is configured, so browsers sign in).
    """
    history = history or []
    stats = stats or {}
    extra = {str(k.get("id")): k for k in keys or []}
    key_rows = list(summary.get("keys") or [])
    threshold = num(summary.get("threshold"))
    per_key = series(history, key_rows, now)
    colors = {key_id: PALETTE[i % len(PALETTE)] for i, key_id in enumerate(per_key)}
    fc = forecast(summary, history, now)
    rate, usable, runway = fc.burn_rate_per_h, fc.usable, fc.runway_h
    backups = summary.get("backupKeys") or {}
    healthy, total = int(num(summary.get("healthyKeys"))), int(num(summary.get("totalKeys")))
    checker = "running" if stats.get("running") else "off"
    runs_out = f"≈ {human_duration(runway)}" if runway is not None else "—"
    runs_out_hint = (f"around {esc(fmt_time(now + runway * 3600, with_date=True))}"
                     if runway is not None and runway < 24 * 365
                     else "not enough spend history for a rate yet" if rate is None else "no spend in the window")
    cards = [
        ("keys-healthy", "Keys healthy", f"{healthy} / {total}", f"threshold ${threshold:.2f}"),
        ("backups-left", "Backups left", f"{int(num(backups.get('available')))} / {int(num(backups.get('total')))}",
         "promoted when a key rotates"),
        ("keys-left", "Keys left", f"{fc.keys_left}",
         f"{fc.live_keys_left} live below their rotation point + {fc.backups_left} backup(s)"),
        ("spent", "Spent", f"${num(summary.get('totalSpend')):.2f}",
         f"of ${num(summary.get('totalBudget')):.2f} in all keys"),
        ("usable", "Usable before last rotation", f"${usable:.2f}", "live keys + unused backups"),
        ("burn-rate", "Burn rate", f"${rate:.2f}/h" if rate is not None else "—", "last 24 h of spend history"),
        ("runway", "Last key runs out", runs_out, runs_out_hint),
    ]
    card_html = "".join(f'<div class="card" data-figure="{fid}"><div class="label">{esc(label)}</div>'
                        f'<div class="value">{esc(value)}</div>'
                        f'<div class="hint">{hint if fid == "runway" else esc(hint)}</div></div>'
                        for fid, label, value, hint in cards)
    signout = ('<form class="signout" method="post" action="/admin/openhands/logout">'
               '<button type="submit" id="logout">Sign out</button></form>') if logout else ""
    legend = "".join(f'<span><span class="swatch" style="background:{colors[k]}"></span>{esc(k)}</span>'
                     for k in per_key)
    chart = chart_svg(per_key, threshold, colors, now) if per_key else \
        '<p class="empty" id="spend-chart-empty">No spend history yet.</p>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{int(refresh_s)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>OpenHands key pool</title>
<style>{CSS}</style></head>
<body>
<header><h1>OpenHands key pool</h1><span class="sub">upstream {esc(upstream) or "—"} · spend checker {esc(checker)}
 · updated {esc(fmt_time(now, with_date=True))} · refreshes every {int(refresh_s)} s</span>{signout}</header>
<main>
<div class="cards" id="summary">{card_html}</div>
<section><h2>Keys</h2>
<table id="keys"><thead><tr><th>Key</th><th>API key</th><th>Status</th><th>Spend vs rotation point</th>
<th class="num">Requests</th><th>Last used</th></tr></thead>
<tbody>
{_key_rows(summary, extra, colors)}
</tbody></table></section>
<section><h2>Spend per key over time</h2>
{chart}
<div class="legend">{legend}</div></section>
</main>
<footer>JSON: /admin/openhands/keys · /admin/openhands/spend-summary · /admin/openhands/spend-history ·
/openhands/spend-stats · Prometheus: /metrics</footer>
</body></html>
"""


def render_login(*, error: str | None = None, token_configured: bool = True,
                 next_path: str = "/admin/openhands/") -> str:
    """The sign-in form: it posts the admin token once; the answer sets an HttpOnly cookie.

    No script and no external asset; `autocomplete=current-password` lets a password manager keep it.
    """
    if not token_configured:
        body = ('<p>No admin token is configured: the dashboard answers loopback browsers directly.</p>'
                f'<p><a href="{esc(next_path)}">Open the dashboard</a></p>')
    else:
        body = (('<p class="error" id="login-error">' + esc(error) + '</p>') if error else "") + (
            '<p>Enter the admin token (<code>OPENHANDS_ADMIN_TOKEN</code>). It is sent once; the browser then keeps '
            'an HttpOnly session cookie for the dashboard.</p>'
            '<form method="post" action="/admin/openhands/login" id="login-form">'
            '<label for="token">Admin token</label>'
            '<input type="password" id="token" name="token" autocomplete="current-password" required autofocus>'
            '<button type="submit" id="login-submit">Sign in</button></form>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in · OpenHands key pool</title>
<style>{CSS}</style></head>
<body><div class="login"><h1>OpenHands key pool</h1>{body}</div></body></html>
"""
