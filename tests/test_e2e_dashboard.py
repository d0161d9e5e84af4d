"""End to end: the spend dashboard in a real browser (issue 8 §4).

A real sidecar, keys and backups added through the admin API, traffic through the proxy, spend-checker
history rows in the database, then headless Chromium loads `GET /admin/openhands/`: the DOM must hold
one row per key and a drawn chart, and a screenshot is kept under `test-artifacts/` for a human look.
"""
from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from tests.harness import ROOT

pytestmark = pytest.mark.e2e

ARTIFACTS = ROOT / "test-artifacts"
KEYS = {"alpha": "sk-pool-alpha-0123456789abcd", "bravo": "sk-pool-bravo-0123456789abcd",
        "charlie": "sk-pool-charlie-0123456789ab"}
BACKUPS = {"spare-1": "sk-pool-spare1-0123456789ab", "spare-2": "sk-pool-spare2-0123456789ab"}
CHAT = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:  # CI runs tests/install-browser.sh first; try once more for direct pytest runs
        subprocess.run([str(ROOT / "tests" / "install-browser.sh")], check=False, timeout=600)
        path = find_chromium()
    if path is None:
        pytest.skip("no chromium: tests/install-browser.sh could not install Debian's `chromium` "
                    "(needs root and apt-get); the dashboard's browser test cannot run here")
    return path


def browser(chromium: str, tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--no-proxy-server",
           "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,900",
           *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env)


def test_dashboard_in_headless_chromium(sidecar, upstream, mongo_db, chromium, tmp_path):
    for key_id, api_key in KEYS.items():
        upstream.add_key(api_key)
        sidecar.add_key(key_id, api_key)
    for key_id, api_key in BACKUPS.items():
        upstream.add_key(api_key)
        sidecar.add_backup(key_id, api_key)
    for i in range(6):  # three conversations, so traffic spreads over the keys; one streamed each
        r = requests.post(sidecar.url + "/v1/chat/completions", json={**CHAT, "stream": i % 2 == 1},
                          headers={"x-litellm-session-id": f"conv-{i % 3}"}, timeout=15)
        assert r.status_code == 200, r.text
    # What the spend checker writes every half hour: six hours of polls per key, each key at its own pace.
    now = dt.datetime.now(dt.timezone.utc)
    rows, final = [], {}
    for pace, key_id in zip((0.25, 0.55, 0.9), KEYS):
        for step in range(12):
            spend = round(pace * step + 0.1 * (step % 2), 4)  # grows unevenly, never drops
            final[key_id] = spend
            rows.append({"keyId": key_id, "apiKeyMasked": KEYS[key_id][:8] + "..." + KEYS[key_id][-4:],
                         "spend": spend, "threshold": 9.95,
                         "checkedAt": now - dt.timedelta(minutes=30 * (12 - step)), "wasActive": True})
    mongo_db["openhands_key_spend_history"].insert_many(rows)
    for key_id, spend in final.items():
        r = sidecar.admin("PATCH", f"/admin/openhands/keys/{key_id}/spend", {"spendEstimate": spend + 0.05})
        assert r.status_code == 200, r.text
    r = sidecar.admin("PATCH", "/admin/openhands/keys/charlie/spend", {"spendEstimate": 9.97})
    assert r.status_code == 200, r.text
    for i in range(3):  # charlie's conversation rotates proactively to another key
        r = requests.post(sidecar.url + "/v1/chat/completions", json=CHAT,
                          headers={"x-litellm-session-id": f"conv-{i}"}, timeout=15)
        assert r.status_code == 200, r.text
    expected_rows = [("alpha", "healthy"), ("bravo", "healthy"), ("charlie", "exhausted")]

    url = sidecar.url + "/admin/openhands/"
    r = requests.get(url, timeout=15)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert not any(k in r.text for k in [*KEYS.values(), *BACKUPS.values()])  # never a full key

    dom = browser(chromium, tmp_path, url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    rows_seen = re.findall(r'<tr class="key-row" data-key-id="([^"]+)" data-status="([^"]+)"', html)
    assert sorted(rows_seen) == expected_rows
    assert '<svg id="spend-chart"' in html
    series = re.findall(r'<polyline class="series" data-key-id="([^"]+)"[^>]* points="([^"]+)"', html)
    assert {k for k, _ in series} == set(KEYS)
    assert all(len(points.split()) >= 12 for _, points in series)  # history + the live point
    assert re.search(r"Backups left</div><div class=\"value\">2 / 2<", html)
    assert re.search(r"Burn rate</div><div class=\"value\">\$\d+\.\d\d/h<", html)
    assert re.search(r"Last key runs out</div><div class=\"value\">≈ [\d.]+ (min|h|days)<", html)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    result = browser(chromium, tmp_path, url, f"--screenshot={shot}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 20_000  # a drawn page, not a blank one


def test_dashboard_uses_the_admin_apis_auth(sidecar_factory):
    sc = sidecar_factory(env={"OPENHANDS_ADMIN_TOKEN": "s3cret-admin-token"})
    assert requests.get(sc.url + "/admin/openhands/", timeout=10).status_code == 401
    assert requests.get(sc.url + "/admin/openhands/", headers={"authorization": "Bearer wrong"},
                        timeout=10).status_code == 401
    r = requests.get(sc.url + "/admin/openhands/", headers={"authorization": "Bearer s3cret-admin-token"}, timeout=10)
    assert r.status_code == 200 and "<title>OpenHands key pool</title>" in r.text
