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
    for pace, key_id in zip((0.25, 0.55, 0.9), KEYS, strict=True):
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


# -- with an admin token: a real browser signs in through the form ---------------------------------
class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket (tornado, which mitmweb needs)."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict] = []

    async def call(self, method: str, **params):
        import json as _json

        self.next_id += 1
        my_id = self.next_id
        await self.ws.write_message(_json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = _json.loads(await self.ws.read_message())
            if msg.get("id") == my_id:
                assert "error" not in msg, msg
                return msg.get("result", {})
            self.events.append(msg)

    async def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        import asyncio
        import json as _json

        async def pump() -> dict:
            while True:
                for i, ev in enumerate(self.events):
                    if ev.get("method") == method:
                        return self.events.pop(i)
                self.events.append(_json.loads(await self.ws.read_message()))

        return await asyncio.wait_for(pump(), timeout)

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def load(self, action) -> None:
        """Run `action` (a navigation or a click) and wait until the resulting page has loaded."""
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        await action
        await self.wait_event("Page.loadEventFired")


def test_with_an_admin_token_a_browser_signs_in_through_the_form(sidecar_factory, upstream, chromium, tmp_path):
    import asyncio
    import time

    from tornado.websocket import websocket_connect

    from tests.harness import eventually

    token = "dashboard-admin-token-0123"
    sc = sidecar_factory(env={"OPENHANDS_ADMIN_TOKEN": token})
    for key_id, api_key in KEYS.items():
        upstream.add_key(api_key)
        sc.add_key(key_id, api_key)
    r = requests.post(sc.url + "/v1/chat/completions", json=CHAT, timeout=15)
    assert r.status_code == 200
    profile = tmp_path / "cdp-profile"
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    proc = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             "--no-proxy-server", "--remote-debugging-port=0", "--remote-allow-origins=*",
                             f"--user-data-dir={profile}", "--window-size=1280,900", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        port = int(eventually(lambda: (profile / "DevToolsActivePort").read_text().split()[0], timeout=60))
        page = eventually(lambda: next(t for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
                                       if t["type"] == "page"), timeout=30)

        async def session() -> dict:
            ws = await websocket_connect(page["webSocketDebuggerUrl"], max_message_size=64 << 20)
            cdp = DevTools(ws)
            await cdp.call("Page.enable")
            await cdp.call("Network.enable")
            seen: dict = {}
            dashboard = sc.url + "/admin/openhands/"
            await cdp.load(cdp.call("Page.navigate", url=dashboard))
            seen["before"] = await cdp.js("document.documentElement.outerHTML")
            # type the token into the form and press the button, as a person would
            await cdp.js("document.getElementById('token').focus()")
            await cdp.call("Input.insertText", text=token)
            await cdp.load(cdp.js("document.getElementById('login-submit').click()"))
            seen["path"] = await cdp.js("location.pathname")
            seen["after"] = await cdp.js("document.documentElement.outerHTML")
            seen["js_cookie"] = await cdp.js("document.cookie")
            seen["cookies"] = (await cdp.call("Network.getCookies", urls=[dashboard]))["cookies"]
            seen["read"] = await cdp.js("fetch('/admin/openhands/spend-summary').then(r => r.json())")
            seen["write"] = await cdp.js("fetch('/admin/openhands/keys', {method: 'POST', headers: {'content-type': "
                                         "'application/json'}, body: JSON.stringify({id: 'evil', apiKey: "
                                         "'sk-evil-0123456789abcdef'})}).then(r => r.status)")
            shot = await cdp.call("Page.captureScreenshot", format="png")
            seen["png"] = shot["data"]
            await cdp.load(cdp.js("document.getElementById('logout').click()"))
            seen["after_logout_path"] = await cdp.js("location.pathname")
            seen["cookies_after_logout"] = (await cdp.call("Network.getCookies", urls=[dashboard]))["cookies"]
            await cdp.load(cdp.call("Page.navigate", url=dashboard))
            seen["again"] = await cdp.js("document.documentElement.outerHTML")
            ws.close()
            return seen

        seen = asyncio.run(asyncio.wait_for(session(), 120))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert 'id="login-form"' in seen["before"] and 'class="key-row"' not in seen["before"]
    assert seen["path"] == "/admin/openhands/"
    rows = re.findall(r'<tr class="key-row" data-key-id="([^"]+)"', seen["after"])
    assert sorted(rows) == sorted(KEYS)
    assert 'action="/admin/openhands/logout"' in seen["after"]
    assert seen["js_cookie"] == ""  # HttpOnly: page scripts cannot read it
    (cookie,) = [c for c in seen["cookies"] if c["name"] == "openhands_admin_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/admin/openhands/"
    assert token not in cookie["value"]
    assert cookie["expires"] > time.time() + 3600  # a session of hours, not a permanent cookie
    assert seen["read"]["totalKeys"] == len(KEYS)  # the dashboard's JSON endpoints accept the cookie
    assert seen["write"] == 403  # ... but nothing that changes state does
    assert "evil" not in sc.keys()
    assert seen["after_logout_path"] == "/admin/openhands/login"
    assert not [c for c in seen["cookies_after_logout"] if c["name"] == "openhands_admin_session"]
    assert 'id="login-form"' in seen["again"]
    import base64

    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "dashboard-signed-in.png").write_bytes(base64.b64decode(seen["png"]))
