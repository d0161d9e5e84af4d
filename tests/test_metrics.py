"""`GET /metrics`: the counters, the scrape-time collector over a real Pool, and the flow observer hooks.

Every scrape is parsed with prometheus_client's own text parser, so what is asserted is what
Prometheus would read. No process here: the pool runs on the memory store with the real writer.
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
from mitmproxy import http
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import taddons, tflow
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from addon.core.counters import Metrics, outcome_of
from addon.core.dashboard import forecast
from addon.core.sse import SSETap
from addon.operator.metrics import MetricsEndpoint, pool_summary
from addon.operator.observability import FlowObserver
from addon.pool.pool import Pool
from addon.store.mongo import new_key_doc, utcnow
from addon.traffic.flow_state import FlowState
from tests.memory_store import MemoryStore, make_writer

KEYS = {"alpha": "sk-alpha-secret-0123456789abcdef", "bravo": "sk-bravo-secret-0123456789abcdef",
        "charlie": "sk-charlie-secret-0123456789abcd"}


def scrape(endpoint: MetricsEndpoint) -> tuple[str, dict[str, dict[tuple, float]]]:
    """The text and {sample name: {sorted label items: value}}."""
    body, ctype = endpoint.render()
    assert ctype.startswith("text/plain; version=")
    text = body.decode()
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return text, out


def one(samples: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.store = MemoryStore()
        for key_id, api_key in KEYS.items():
            assert self.store.insert_key(new_key_doc(key_id, api_key, 10.0, utcnow()))
        self.store.insert_backup("spare-1", "sk-spare-secret-0123456789abcdef")
        self.writer = make_writer(self.store, tmp_path / "journal.jsonl")
        self.writer.start()
        self.pool = Pool(self.store, self.writer, threshold=lambda: 9.95, default_budget=lambda: 10.0)
        self.pool.sync()
        self.services = SimpleNamespace(pool=self.pool, writer=self.writer, checker=None,
                                        settings=SimpleNamespace(spend_threshold=9.95, stream_copy_bytes=1 << 20))
        self.endpoint = MetricsEndpoint(self.services)

    def stop(self) -> None:
        self.writer.stop(flush_timeout=5)


@pytest.fixture
def rig(tmp_path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.stop()


def test_the_sidecar_has_its_own_registry_not_the_global_one(rig):
    rig.endpoint.metrics.count_request("alpha", "chat", "ok")
    _, samples = scrape(rig.endpoint)
    assert one(samples, "openhands_requests_total", key_id="alpha", format="chat", outcome="ok") == 1
    assert rig.endpoint.registry is not REGISTRY
    assert not any(name.startswith("openhands_") for name in REGISTRY._names_to_collectors)  # noqa: SLF001


def test_per_key_gauges_equal_the_pool_and_never_carry_a_key(rig):
    rig.pool.record_usage("alpha", 1.25, 1000)
    rig.pool.record_usage("bravo", 9.97, 500)
    rig.pool.record_polled_spend("alpha", 2.5, 1_760_000_000.0)
    rig.pool.rotate("bravo", error="proactive rotation at $9.97")
    text, samples = scrape(rig.endpoint)
    for k in rig.pool.key_list():
        assert one(samples, "openhands_key_spend_dollars", key_id=k.id) == pytest.approx(k.effective_spend)
        assert one(samples, "openhands_key_budget_dollars", key_id=k.id) == k.budget_limit
        assert one(samples, "openhands_key_rotation_point_dollars", key_id=k.id) == pytest.approx(k.budget_limit - 0.05)
        assert one(samples, "openhands_key_status", key_id=k.id, status=str(k.status)) == 1
        assert sum(v for labels, v in samples["openhands_key_status"].items() if ("key_id", k.id) in labels) == 1
    assert one(samples, "openhands_key_spend_dollars", key_id="alpha") == 2.5  # polled spend wins: it is larger
    assert one(samples, "openhands_key_status", key_id="bravo", status="exhausted") == 1
    assert one(samples, "openhands_backup_keys_available") == rig.pool.backups_unused
    assert one(samples, "openhands_keys", status="exhausted") == 1
    for secret in [*KEYS.values(), "sk-spare-secret-0123456789abcdef"]:
        assert secret not in text and secret[:8] + "..." not in text  # not even masked: ids only


def test_store_figures_follow_the_writer(rig):
    _, samples = scrape(rig.endpoint)
    assert one(samples, "openhands_database_up") == 1
    assert one(samples, "openhands_database_outage_seconds") == 0
    assert one(samples, "openhands_store_queue_depth") == rig.writer.backlog
    assert one(samples, "openhands_journal_bytes") == rig.writer.journal.size_bytes
    rig.writer.outage_since = rig.endpoint.collector.clock() - 42.0  # what the writer sets when MongoDB fails
    try:
        _, samples = scrape(rig.endpoint)
    finally:
        rig.writer.outage_since = None
    assert one(samples, "openhands_database_up") == 0
    assert one(samples, "openhands_database_outage_seconds") == pytest.approx(42.0, abs=5)


def test_event_counters_and_their_labels(rig):
    m = rig.endpoint.metrics
    m.count_request("alpha", "chat", "ok")
    m.count_request("alpha", "chat", "ok")
    m.count_request(None, "messages", "no_key")
    m.record_metered("alpha", "claude-sonnet-4-5", 0.0125, {"input": 100, "output": 20, "cache_read": 0})
    m.record_metered("alpha", "claude-sonnet-4-5", 0.0075, {"input": 50, "output": 10})
    m.count_rotation("proactive")
    m.count_rotation("budget_error")
    m.count_budget_error("bravo")
    m.count_retry("ok")
    m.count_retry("unreachable")
    m.count_no_key()
    _, s = scrape(rig.endpoint)
    assert one(s, "openhands_requests_total", key_id="alpha", format="chat", outcome="ok") == 2
    assert one(s, "openhands_requests_total", key_id="none", format="messages", outcome="no_key") == 1
    assert one(s, "openhands_metered_dollars_total", key_id="alpha", model="claude-sonnet-4-5") == pytest.approx(0.02)
    assert one(s, "openhands_metered_tokens_total", key_id="alpha", model="claude-sonnet-4-5", kind="input") == 150
    assert one(s, "openhands_metered_tokens_total", key_id="alpha", model="claude-sonnet-4-5", kind="output") == 30
    assert ("openhands_metered_tokens_total" in s and
            (("key_id", "alpha"), ("kind", "cache_read"), ("model", "claude-sonnet-4-5"))
            not in s["openhands_metered_tokens_total"])
    # every reason is present from the first scrape, so an alert on a rate never sees a missing series
    assert {dict(k)["reason"]: v for k, v in s["openhands_rotations_total"].items()} == {
        "proactive": 1, "budget_error": 1, "spend_checker": 0, "invalid": 0, "admin": 0}
    assert one(s, "openhands_upstream_budget_errors_total", key_id="bravo") == 1
    assert {dict(k)["outcome"]: v for k, v in s["openhands_retries_total"].items()} == {
        "ok": 1, "refused": 0, "unreachable": 1}
    assert one(s, "openhands_no_key_responses_total") == 1


def test_spend_checker_counters_are_read_at_scrape_time(rig):
    counters = SimpleNamespace(checks=7, failures=3, rotations=2, by_kind={"connection": 2, "http_5xx": 1})
    rig.services.checker = SimpleNamespace(counters=counters, running=True)
    rig.endpoint.metrics.count_rotation("proactive")
    _, s = scrape(rig.endpoint)
    assert one(s, "openhands_spend_checker_polls_total") == 7
    assert one(s, "openhands_spend_checker_failures_total", kind="connection") == 2
    assert one(s, "openhands_spend_checker_failures_total", kind="http_5xx") == 1
    assert one(s, "openhands_spend_checker_running") == 1
    assert one(s, "openhands_rotations_total", reason="spend_checker") == 2
    assert one(s, "openhands_rotations_total", reason="proactive") == 1


def test_the_forecast_equals_the_dashboards(rig):
    now = rig.endpoint.collector.clock()
    rig.pool.record_usage("alpha", 4.0, 10)
    rig.pool.record_usage("bravo", 9.96, 10)  # past its point: not a key left
    for i, spend in enumerate((0.0, 1.0, 2.0, 3.0)):  # alpha spent $3 over the last three hours
        rig.store.insert_history({"keyId": "alpha", "spend": spend, "checkedAt": _dt(now - 3 * 3600 + i * 3600),
                                  "threshold": 9.95, "wasActive": True})
    _, s = scrape(rig.endpoint)
    rows = rig.store.list_history(2000, None)
    expected = forecast(pool_summary(rig.pool, 9.95), rows, now)
    assert expected.keys_left == 3  # alpha, charlie and one backup
    assert one(s, "openhands_pool_keys_left") == 3
    assert one(s, "openhands_pool_usable_dollars") == pytest.approx(expected.usable)
    assert expected.burn_rate_per_h is not None and expected.burn_rate_per_h > 0
    assert one(s, "openhands_pool_burn_rate_dollars_per_hour") == pytest.approx(expected.burn_rate_per_h, rel=1e-3)
    assert one(s, "openhands_pool_runway_seconds") == pytest.approx(expected.runway_h * 3600, rel=1e-3)


def test_no_rate_yet_means_no_runway_series_rather_than_a_made_up_one(rig):
    _, s = scrape(rig.endpoint)
    assert "openhands_pool_runway_seconds" not in s and "openhands_pool_burn_rate_dollars_per_hour" not in s
    assert one(s, "openhands_pool_keys_left") == 4


def test_a_broken_source_omits_its_figures_and_the_scrape_still_answers(rig):
    class Broken:
        def key_list(self):
            raise RuntimeError("mid-restart")

    rig.services.pool = Broken()
    rig.endpoint.metrics.count_request("alpha", "chat", "ok")
    _, s = scrape(rig.endpoint)
    assert one(s, "openhands_requests_total", key_id="alpha", format="chat", outcome="ok") == 1
    assert "openhands_key_spend_dollars" not in s
    assert "openhands_store_queue_depth" in s


def test_before_start_up_the_scrape_answers_with_zero_counters():
    endpoint = MetricsEndpoint(SimpleNamespace(pool=None, writer=None, checker=None, settings=None))
    _, s = scrape(endpoint)
    assert one(s, "openhands_no_key_responses_total") == 0
    assert one(s, "openhands_spend_checker_running") == 0


@pytest.mark.parametrize("status,rejected,dropped,outcome", [
    (200, None, False, "ok"),
    (400, None, False, "client_error"),
    (429, None, False, "rate_limited"),
    (503, None, False, "server_error"),
    (429, "no_key", False, "no_key"),
    (401, "client_key", False, "rejected"),
    (200, None, True, "dropped"),
])
def test_outcome_labels(status, rejected, dropped, outcome):
    assert outcome_of(status, rejected=rejected, dropped=dropped) == outcome


def _dt(epoch: float):
    import datetime as dt

    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc)


# -- the flow observer (hooks on real mitmproxy flows) ------------------------------------------
def _observer(**settings: Any) -> tuple[FlowObserver, Metrics]:
    metrics = Metrics()
    svc = SimpleNamespace(settings=SimpleNamespace(stream_copy_bytes=settings.get("stream_copy_bytes", 1 << 20)))
    return FlowObserver(svc, metrics), metrics


def _pooled_flow(status: int = 200, **state: Any) -> http.HTTPFlow:
    f = tflow.tflow(resp=True)
    f.response.status_code = status
    FlowState(**{"key_id": "alpha", "format": "chat", **state}).save(f)
    return f


def test_each_finished_flow_is_counted_once_with_what_was_metered():
    obs, metrics = _observer()
    with taddons.context(obs):
        f = _pooled_flow(metered=True, cost=0.02, model="gpt-5", tokens={"input": 10, "cache_write": 0,
                                                                         "cache_read": 5, "output": 3})
        obs.response(f)
        obs.error(f)  # a late error on an answered flow does not count it twice
        obs.response(_pooled_flow(429, local=True, rejected="no_key", key_id=None))
        admin = tflow.tflow(resp=True)
        FlowState(local=True, admin=True).save(admin)
        obs.response(admin)  # admin answers are not traffic
        obs.response(tflow.tflow(resp=True))  # a flow the sidecar never touched
    snap = metrics.snapshot()
    assert snap["requests"] == {("alpha", "chat", "ok"): 1, ("none", "chat", "no_key"): 1}
    assert snap["dollars"] == {("alpha", "gpt-5"): pytest.approx(0.02)}
    assert snap["tokens"] == {("alpha", "gpt-5", "input"): 10, ("alpha", "gpt-5", "cache_read"): 5,
                              ("alpha", "gpt-5", "output"): 3}
    assert snap["no_key"] == 1


@pytest.mark.parametrize("state, requests, tokens", [
    ({"key_id": "alpha", "format": "chat", "metered": True, "model": "gpt-5", "cost": 0.5},      # fields missing
     {("alpha", "chat", "ok"): 1}, {}),
    ({"key_id": "alpha", "format": "chat", "metered": True, "model": "gpt-5", "cost": 0.5, "admin": False,
      "rejected": None, "tokens": {"input": 7}},                                                  # kinds missing
     {("alpha", "chat", "ok"): 1}, {("alpha", "gpt-5", "input"): 7}),
    ({"admin": True}, {}, {}),
])
def test_a_flow_state_another_version_wrote_is_counted_with_what_it_has(state, requests, tokens):
    obs, metrics = _observer()
    f = tflow.tflow(resp=True)
    f.metadata["openhands"] = state
    with taddons.context(obs):
        obs.response(f)
    assert (metrics.requests, metrics.tokens) == (requests, tokens)
    assert metrics.dollars == ({("alpha", "gpt-5"): 0.5} if requests else {})


def _stream(obs: FlowObserver, f: http.HTTPFlow, chunks: list[bytes]) -> SSETap:
    tap = SSETap("chat")
    f.response.stream = tap
    f.response.content = None  # mitmproxy keeps no body for a streamed response
    obs.responseheaders(f)
    for c in chunks:
        tap(c)
    tap(b"")
    return tap


CHUNKS = [b'data: {"model":"gpt-5","choices":[{"delta":{"content":"hel"}}]}\n\n',
          b'data: {"choices":[{"delta":{"content":"lo"}}]}\n\ndata: [DONE]\n\n']


def test_under_mitmweb_a_streamed_flow_gets_the_copy_as_its_body_and_the_comment_column():
    obs, _ = _observer()
    with taddons.context(obs) as tctx:
        tctx.options.add_option("web_port", int, 8081, "mitmweb's")
        tctx.options.add_option("web_columns", list, ["tls", "icon", "path"], "mitmweb's")
        obs.configure({"web_port"})
        assert tctx.options.web_columns == ["tls", "icon", "path", "comment"]
        f = _pooled_flow()
        tap = _stream(obs, f, CHUNKS)
        obs.response(f)
    assert f.response.raw_content == b"".join(CHUNKS)
    assert not tap.keeps_copy  # the copy now lives in the flow only


def test_a_user_choice_of_web_columns_is_left_alone():
    obs, _ = _observer()
    with taddons.context(obs) as tctx:
        tctx.options.add_option("web_port", int, 8081, "mitmweb's")
        tctx.options.add_option("web_columns", list, ["tls", "icon", "path"], "mitmweb's")
        tctx.options.update(web_columns=["path", "status"])
        obs.configure({"web_columns"})
        assert tctx.options.web_columns == ["path", "status"]


@pytest.mark.parametrize("kept_by", ["save_stream_file", None])
def test_plain_mitmdump_keeps_nothing_and_a_flow_file_keeps_the_stream(tmp_path, kept_by):
    obs, _ = _observer()
    with taddons.context(obs) as tctx:
        if kept_by == "save_stream_file":
            tctx.options.add_option("save_stream_file", str, "", "save's")  # what mitmdump -w sets
            tctx.options.update(save_stream_file=str(tmp_path / "flows"))
        obs.configure({"save_stream_file"})
        f = _pooled_flow()
        tap = _stream(obs, f, CHUNKS)
        obs.response(f)
    if kept_by:
        assert f.response.raw_content == b"".join(CHUNKS)
    else:
        assert f.response.raw_content is None and tap.kept_body() is None


def test_a_stream_dropped_midway_keeps_what_was_forwarded():
    obs, metrics = _observer()
    with taddons.context(obs) as tctx:
        tctx.options.add_option("web_port", int, 8081, "mitmweb's")
        obs.configure({"web_port"})
        f = _pooled_flow()
        tap = SSETap("chat")
        f.response.stream = tap
        f.response.content = None
        obs.responseheaders(f)
        tap(CHUNKS[0])
        f.error = tflow.terr()
        obs.error(f)
    assert f.response.raw_content == CHUNKS[0]
    assert metrics.snapshot()["requests"] == {("alpha", "chat", "dropped"): 1}


def test_the_copy_is_bounded_by_the_option():
    obs, _ = _observer(stream_copy_bytes=4096)
    event = b'data: {"choices":[{"delta":{"content":"' + b"x" * 200 + b'"}}]}\n\n'
    with taddons.context(obs) as tctx:
        tctx.options.add_option("web_port", int, 8081, "mitmweb's")
        obs.configure({"web_port"})
        f = _pooled_flow()
        _stream(obs, f, [event] * 1000)
        obs.response(f)
    body = f.response.raw_content
    assert len(body) < 4096 + 300
    assert body.startswith(event) and body.endswith(event)
    assert b": openhands-sidecar: " in body and b"bytes of this %d-byte stream omitted" % (len(event) * 1000) in body


def test_a_pool_that_spends_nothing_has_an_infinite_runway(rig):
    now = rig.endpoint.collector.clock()
    for i in range(3):  # polled for two hours, no spend
        rig.store.insert_history({"keyId": "alpha", "spend": 0.0, "checkedAt": _dt(now - 7200 + i * 3600),
                                  "threshold": 9.95, "wasActive": False})
    _, s = scrape(rig.endpoint)
    assert one(s, "openhands_pool_burn_rate_dollars_per_hour") == 0
    assert math.isinf(one(s, "openhands_pool_runway_seconds"))


def test_an_operator_rotation_is_counted_as_admin(rig):
    import threading

    from mitmproxy import exceptions

    from addon.operator.commands_addon import CommandsAddon

    rig.services.failed = None
    rig.services.ready = threading.Event()
    rig.services.ready.set()
    addon = CommandsAddon(rig.services, metrics=rig.endpoint.metrics)
    try:
        addon.rotate("alpha")
        assert "rotated alpha -> " in addon.commands.last.result(timeout=30)
        with pytest.raises(exceptions.CommandError):
            addon.rotate("no-such-key")
    finally:
        addon.done()
    _, s = scrape(rig.endpoint)
    assert one(s, "openhands_rotations_total", reason="admin") == 1
    assert one(s, "openhands_key_status", key_id="alpha", status="exhausted") == 1


@pytest.mark.parametrize("client_tls", [False, True])
def test_the_sign_in_cookie_is_secure_only_when_the_browser_spoke_tls_to_the_sidecar(client_tls):
    """In reverse mode to an https upstream the request's scheme is the upstream's, not the browser's."""
    import asyncio
    from urllib.parse import urlencode

    from addon.operator.observability import ObservabilityRoutes

    settings = SimpleNamespace(admin_token="admin-token-0123456789", metrics_loopback=False,
                               is_upstream=lambda host, port: True)
    routes = ObservabilityRoutes(SimpleNamespace(settings=settings), MetricsEndpoint(SimpleNamespace()))
    f = tflow.tflow()
    f.request.scheme, f.request.method, f.request.path = "https", "POST", "/admin/openhands/login"
    f.request.headers["content-type"] = "application/x-www-form-urlencoded"
    f.request.content = urlencode({"token": "admin-token-0123456789"}).encode()
    f.client_conn.timestamp_tls_setup = 1_760_000_000.0 if client_tls else None  # what tls_established reads
    with taddons.context(routes) as tctx:  # as mitmproxy calls a hook (sync here: nothing left to await)
        asyncio.run(tctx.master.addons.invoke_addon(routes, HttpRequestHook(f)))
    assert f.response.status_code == 303
    assert ("Secure" in f.response.headers["set-cookie"]) is client_tls
    assert b"admin-token" not in f.request.content  # the form's token does not stay in the flow
    assert FlowState.of(f).local
