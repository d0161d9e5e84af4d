"""End to end: `GET /metrics` after a scripted run, the metrics auth rule, and streamed flows readable
in a real mitmweb (REST API) and in a `-w` flow file (issue 15).

Real mitmdump/mitmweb processes, the session's SecantusDB, the fake upstream. Every scrape is parsed
with prometheus_client's own text parser, and its numbers are compared with the admin API's answers
and the fake upstream's own counts.
"""
from __future__ import annotations

import datetime as dt
import json
import re
import socket
import subprocess

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import BIN, ProcessOutput, Sidecar, eventually

pytestmark = pytest.mark.e2e

TOKEN = "metrics-admin-token-0123"
CLAUDE = "claude-sonnet-4-5"
GPT = "gpt-5-mini-2025-08-07"


def pool_key(name: str) -> str:
    return f"sk-{name}-0123456789abcdef"


def scrape(url: str, token: str | None = TOKEN) -> dict[str, dict[tuple, float]]:
    r = requests.get(url + "/metrics", headers={"authorization": f"Bearer {token}"} if token else {}, timeout=15)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    for secret in ("sk-k1-", "sk-k2-", "sk-k3-", "sk-b1-"):
        assert secret not in r.text  # label values are ids, never keys
    return out


def by(samples: dict[str, dict[tuple, float]], name: str, label: str) -> dict[str, float]:
    """{value of `label`: summed samples} for one metric."""
    out: dict[str, float] = {}
    for labels, v in samples.get(name, {}).items():
        key = dict(labels)[label]
        out[key] = out.get(key, 0.0) + v
    return out


def one(samples: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def chat(sc: Sidecar, session: str, stream: bool = False) -> requests.Response:
    return requests.post(sc.url + "/v1/chat/completions", json={"model": CLAUDE, "messages": [{"role": "user",
                         "content": "hi"}], "stream": stream}, headers={"x-litellm-session-id": session}, timeout=30)


def test_metrics_after_a_scripted_run_equal_the_admin_api(sidecar_factory, upstream, mongo_db):
    sc = sidecar_factory(env={"OPENHANDS_ADMIN_TOKEN": TOKEN})
    admin = lambda m, p, body=None: sc.admin(m, p, body, token=TOKEN)  # noqa: E731
    # A: k1 was spent elsewhere: a budget error, calibrated, rotated to backup b1, retried there.
    upstream.budget_status = 400
    upstream.add_key(pool_key("k1"), budget=10, spend=10.5)
    upstream.add_key(pool_key("b1"), budget=10)
    sc.add_key("k1", pool_key("k1"))
    sc.add_backup("b1", pool_key("b1"))
    assert chat(sc, "s1").status_code == 200
    # B: b1 reaches its rotation point: the next request rotates proactively to k2; three formats on k2.
    assert admin("PATCH", "/admin/openhands/keys/b1/spend", {"spendEstimate": 9.97}).status_code == 200
    upstream.add_key(pool_key("k2"), budget=10)
    sc.add_key("k2", pool_key("k2"))
    r = chat(sc, "s1", stream=True)
    assert r.status_code == 200 and "data: [DONE]" in r.text
    r = requests.post(sc.url + "/v1/messages", json={"model": CLAUDE, "max_tokens": 5, "stream": True, "messages": [
        {"role": "user", "content": "hi"}]}, headers={"x-litellm-session-id": "s1"}, timeout=30)
    assert r.status_code == 200 and "message_stop" in r.text
    r = requests.post(sc.url + "/responses", json={"model": GPT, "input": "hi"},
                      headers={"x-litellm-session-id": "s1"}, timeout=30)
    assert r.status_code == 200
    # C: the upstream no longer knows k2 (401): invalid, rotated to k3, retried there.
    upstream.add_key(pool_key("k3"), budget=10)
    sc.add_key("k3", pool_key("k3"))
    upstream.remove_key(pool_key("k2"))
    assert chat(sc, "s1").status_code == 200
    # D: k3 goes too, nothing is left: the client gets the sidecar's retryable 429.
    upstream.remove_key(pool_key("k3"))
    r = chat(sc, "s1")
    assert r.status_code == 429 and r.headers.get("retry-after")

    keys = {k["id"]: k for k in admin("GET", "/admin/openhands/keys").json()["keys"]}
    assert {k: v["status"] for k, v in keys.items()} == {"k1": "exhausted", "b1": "exhausted", "k2": "invalid",
                                                         "k3": "invalid"}
    summary = admin("GET", "/admin/openhands/spend-summary").json()
    m = scrape(sc.url)

    # per-key gauges: what the admin API says
    for row in summary["keys"]:
        kid = row["id"]
        assert one(m, "openhands_key_spend_dollars", key_id=kid) == pytest.approx(row["effectiveSpend"], abs=1e-6)
        assert one(m, "openhands_key_spend_estimate_dollars", key_id=kid) == pytest.approx(keys[kid]["spendEstimate"],
                                                                                            abs=1e-6)
        assert one(m, "openhands_key_budget_dollars", key_id=kid) == row["budgetLimit"]
        assert one(m, "openhands_key_rotation_point_dollars", key_id=kid) == pytest.approx(row["rotationPoint"])
        assert one(m, "openhands_key_status", key_id=kid, status=row["status"]) == 1
    assert one(m, "openhands_backup_keys_available") == summary["backupKeys"]["available"] == 0
    assert one(m, "openhands_backup_keys_total") == summary["backupKeys"]["total"] == 1
    assert by(m, "openhands_keys", "status") == {"healthy": 0, "rate_limited": 0, "exhausted": 2, "invalid": 2}
    assert one(m, "openhands_pool_keys_left") == 0

    # metered dollars: exactly each metered-only key's spend; tokens counted per model
    dollars = by(m, "openhands_metered_dollars_total", "key_id")
    for kid in ("k2", "k3"):
        assert dollars[kid] == pytest.approx(keys[kid]["spendEstimate"], abs=1e-6) and dollars[kid] > 0
    models = {dict(labels)["model"] for labels in m["openhands_metered_dollars_total"]}
    assert {CLAUDE, GPT} <= models
    assert by(m, "openhands_metered_tokens_total", "kind")["output"] > 0

    # requests by key, format and outcome: what this test sent
    requests_by = {tuple(dict(labels)[n] for n in ("key_id", "format", "outcome")): v
                   for labels, v in m["openhands_requests_total"].items()}
    assert requests_by == {("b1", "chat", "ok"): 1, ("k2", "chat", "ok"): 1, ("k2", "messages", "ok"): 1,
                           ("k2", "responses", "ok"): 1, ("k3", "chat", "ok"): 1, ("none", "chat", "no_key"): 1}
    assert by(m, "openhands_rotations_total", "reason") == {"proactive": 1, "budget_error": 1, "invalid": 2,
                                                            "spend_checker": 0, "admin": 0}
    assert by(m, "openhands_upstream_budget_errors_total", "key_id") == {"k1": upstream.budget_errors(pool_key("k1"))}
    assert upstream.budget_errors(pool_key("k1")) == 1
    assert by(m, "openhands_retries_total", "outcome") == {"ok": 2, "refused": 0, "unreachable": 0}
    assert one(m, "openhands_no_key_responses_total") == 1
    # the store: up, nothing stuck; the spend checker is off in this run
    assert one(m, "openhands_database_up") == 1 and one(m, "openhands_database_outage_seconds") == 0
    eventually(lambda: one(scrape(sc.url), "openhands_store_queue_depth") == 0)
    assert one(m, "openhands_journal_bytes") >= 0
    assert one(m, "openhands_spend_checker_running") == 0 and one(m, "openhands_spend_checker_polls_total") == 0


def test_metrics_follow_the_admin_auth_rule_and_the_loopback_option(sidecar_factory, upstream):
    sc = sidecar_factory(env={"OPENHANDS_ADMIN_TOKEN": TOKEN})
    assert requests.get(sc.url + "/metrics", timeout=10).status_code == 401
    for variant in ("/METRICS", "/%6Detrics", "/v1/../metrics"):  # answered here too, never forwarded upstream
        assert requests.get(sc.url + variant, timeout=10).status_code == 401, variant
    assert not [r for r in upstream.requests if "metrics" in r.path.lower()]
    assert requests.get(sc.url + "/metrics", headers={"authorization": "Bearer wrong-token"},
                        timeout=10).status_code == 401
    assert "openhands_no_key_responses_total" in scrape(sc.url)  # with the token: parsed
    assert requests.post(sc.url + "/metrics", headers={"authorization": f"Bearer {TOKEN}"},
                         timeout=10).status_code == 405
    open_sc = sidecar_factory(env={"OPENHANDS_ADMIN_TOKEN": TOKEN}, args=["--set", "openhands_metrics_loopback=true"])
    m = scrape(open_sc.url, token=None)  # a local Prometheus without the token
    assert "openhands_no_key_responses_total" in m
    assert requests.get(open_sc.url + "/admin/openhands/keys", timeout=10).status_code == 401  # the API keeps its rule


def test_forecast_in_metrics_equals_the_dashboard(sidecar_factory, upstream, mongo_db):
    sc = sidecar_factory(env={"OPENHANDS_ADMIN_TOKEN": TOKEN})
    for name in ("k1", "k2"):
        upstream.add_key(pool_key(name), budget=10)
        sc.add_key(name, pool_key(name))
    upstream.add_key(pool_key("b1"), budget=10)
    sc.add_backup("b1", pool_key("b1"))
    assert sc.admin("PATCH", "/admin/openhands/keys/k1/spend", {"spendEstimate": 3.0}, token=TOKEN).status_code == 200
    now = dt.datetime.now(dt.timezone.utc)
    mongo_db["openhands_key_spend_history"].insert_many([  # k1 went from $0 to $3 in three hours
        {"keyId": "k1", "apiKeyMasked": "sk-k1-01...cdef", "spend": float(i), "threshold": 9.95,
         "checkedAt": now - dt.timedelta(hours=3 - i), "wasActive": True} for i in range(3)])
    html = requests.get(sc.url + "/admin/openhands/", headers={"authorization": f"Bearer {TOKEN}"}, timeout=15).text
    m = scrape(sc.url)

    def card(name: str) -> str:
        got = re.search(r'data-figure="%s"><div class="label">[^<]*</div><div class="value">([^<]*)<' % name, html)
        assert got, name
        return got.group(1)

    assert card("keys-left") == str(int(one(m, "openhands_pool_keys_left"))) == "3"
    rate = one(m, "openhands_pool_burn_rate_dollars_per_hour")
    assert card("burn-rate") == f"${rate:.2f}/h" and rate == pytest.approx(1.0, rel=0.05)
    usable = 9.95 - 3.0 + 9.95 + 9.95
    assert one(m, "openhands_pool_usable_dollars") == pytest.approx(usable)
    assert one(m, "openhands_pool_runway_seconds") == pytest.approx(usable / rate * 3600, rel=1e-6)


def test_spend_checker_polls_and_failures_equal_its_stats(sidecar_factory, upstream):
    sc = sidecar_factory(env={"OPENHANDS_ADMIN_TOKEN": TOKEN, "OPENHANDS_SPEND_CHECKER": "true",
                              "OPENHANDS_SPEND_CHECK_TIERS": "0:1", "OPENHANDS_SPEND_CHECK_TICK_SECONDS": "0.2",
                              "OPENHANDS_SPEND_CHECK_LEASE_SECONDS": "3"})
    upstream.add_key(pool_key("k1"), budget=10, spend=1.0)
    sc.add_key("k1", pool_key("k1"))
    stats = lambda: sc.admin("GET", "/openhands/spend-stats", token=TOKEN).json()["counters"]  # noqa: E731
    eventually(lambda: stats()["checks"] >= 2, timeout=60)
    upstream.set_activity_fault("500")
    eventually(lambda: stats()["failures"] >= 1, timeout=60)
    before = stats()
    m = scrape(sc.url)
    after = stats()
    assert one(m, "openhands_spend_checker_running") == 1
    assert before["checks"] <= one(m, "openhands_spend_checker_polls_total") <= after["checks"]
    failures = by(m, "openhands_spend_checker_failures_total", "kind")
    assert sum(before["failures_by_kind"].values()) <= sum(failures.values()) <= sum(after["failures_by_kind"].values())
    assert set(failures) <= set(after["failures_by_kind"]) and failures


# -- streamed flows in mitmweb and in -w files -----------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebSidecar(Sidecar):
    """The same sidecar under `mitmweb`, with a web password so its REST API can be called."""

    password = "web-password-0123"

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[0] = str(BIN / "mitmweb")
        i = cmd.index("--listen-port")
        self.proxy_port, self.web_port = free_port(), free_port()
        cmd[i + 1] = str(self.proxy_port)
        return cmd + ["--set", f"web_port={self.web_port}", "--set", "web_host=127.0.0.1",
                      "--set", f"web_password={self.password}", "--set", "web_open_browser=false"]

    def start(self, wait_ready: bool = True) -> "WebSidecar":
        import os

        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update({"MONGODB_URI": self.mongo_uri, "OPENHANDS_MONGODB_DB": self.db, "PYTHONUNBUFFERED": "1",
                    "OPENHANDS_DATA_DIR": str(self.workdir / "data"), "OPENHANDS_SPEND_CHECKER": "false"})
        env.update(self.extra_env)
        self.proc = subprocess.Popen(self.command(), cwd=self.workdir, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace")
        self.out = ProcessOutput(self.proc.stdout, self.workdir / f"{self.name}.log")
        self.port = self.proxy_port
        self.out.wait_for(r"Web server listening at", timeout=60)
        if wait_ready:
            self.out.wait_for(r"key-pool sidecar ready", timeout=60)
        return self

    def web(self, path: str) -> requests.Response:
        return requests.get(f"http://127.0.0.1:{self.web_port}{path}",
                            headers={"authorization": f"Bearer {self.password}"}, timeout=15)


@pytest.fixture
def web_sidecar(tmp_path, mongo, db_name, upstream):
    sc = WebSidecar(tmp_path / "web", upstream.url, mongo.uri, db_name, name="mitmweb")
    sc.start()
    yield sc
    sc.stop()


def test_a_streamed_chat_completion_is_readable_event_by_event_in_mitmweb(web_sidecar, upstream):
    sc = web_sidecar
    upstream.add_key(pool_key("k1"), budget=10)
    sc.add_key("k1", pool_key("k1"))
    r = chat(sc, "conv-1", stream=True)
    assert r.status_code == 200
    client_got = r.content
    assert client_got.count(b"data: ") >= 5 and b'"usage"' not in client_got  # the sidecar's usage chunk stripped
    assert sc.web("/flows").status_code == 200 and requests.get(
        f"http://127.0.0.1:{sc.web_port}/flows", timeout=10).status_code == 403  # the REST API needs the password

    def streamed_flow() -> dict:
        flows = [f for f in sc.web("/flows").json()
                 if f["request"]["path"] == "/v1/chat/completions" and f.get("response")]
        assert flows and flows[-1]["response"]["contentLength"]
        return flows[-1]

    flow = eventually(streamed_flow)
    assert flow["response"]["contentLength"] == len(client_got)  # the whole stream, not "Content is missing."
    assert "k1" in flow["comment"] and CLAUDE in flow["comment"] and "$" in flow["comment"]
    raw = requests.get(f"http://127.0.0.1:{sc.web_port}/flows/{flow['id']}/response/content.data",
                       headers={"authorization": f"Bearer {sc.password}"}, timeout=15)
    assert raw.status_code == 200 and raw.content == client_got
    view = sc.web(f"/flows/{flow['id']}/response/content/sse-llm.json")
    assert view.status_code == 200, view.text
    got = view.json()
    assert got["view_name"] == "SSE-LLM"
    text = got["text"]
    events = len(re.findall(r"^\s*\d+ data ", text, flags=re.M))
    assert events == client_got.count(b"data: ")  # every event, one per line
    assert "── text ──" in text and "metered by the sidecar: $" in text and "metered tokens: input" in text
    assert "key k1" in text and pool_key("k1") not in text
    options = sc.web("/options.json").json()
    assert "comment" in options["web_columns"]["value"]  # the flow list shows the comment column


def test_a_flow_file_keeps_the_whole_stream(sidecar_factory, upstream, tmp_path):
    from mitmproxy import io

    upstream.add_key(pool_key("k1"), budget=10)
    path = tmp_path / "flows.mitm"
    sc = sidecar_factory(args=["-w", str(path)])
    sc.add_key("k1", pool_key("k1"))
    r = chat(sc, "conv-1", stream=True)
    assert r.status_code == 200
    sc.stop()
    with open(path, "rb") as fh:
        flows = [f for f in io.FlowReader(fh).stream() if f.request.path == "/v1/chat/completions"]
    assert len(flows) == 1
    assert flows[0].response.raw_content == r.content
    assert flows[0].metadata["openhands"]["metered"] is True
    assert pool_key("k1") not in json.dumps(flows[0].request.headers.fields, default=repr)
