"""Smoke test of bench/: every benchmark at its tiny size, through the real CLI, so the benchmarks cannot rot.

Asserts the JSON's shape and sane numbers only. Performance claims come from `python -m bench`
(bench/README.md), never from a timed unit test.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.overhead import AGENT_BODY_BYTES
from bench.report import render

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["errors"] == {}, data["errors"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OVERHEAD" in proc.stdout and "TARGETS" in proc.stdout
    return data


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _load(r: dict) -> None:
    assert r["requests"] > 0 and r["statuses"].get("200") == r["requests"], r
    assert _positive(r["rps"]) and 0 < r["p50_ms"] <= r["p99_ms"] < 10_000


def test_all_benchmarks_ran(result):
    assert set(result["benchmarks"]) == {"overhead", "streaming", "slowstore", "fleet", "profile", "crash", "scale"}
    assert result["mode"] == "tiny" and result["machine"]["cpus"] >= 1
    assert all({"target", "value", "met"} <= set(v) for v in result["verdicts"])


def test_overhead(result):
    o = result["benchmarks"]["overhead"]
    assert o["keys"] >= 1 and {r["payload"] for r in o["rows"]} == {"json", "sse"}
    for r in o["rows"]:
        _load(r["bare"])
        _load(r["addon"])
        assert _positive(r["addon_throughput_ratio"]) and math.isfinite(r["addon_added_p50_ms"])
    co = o["co_scheduled"]  # the same loads, the targets sharing one pinned core at the same moment
    assert co["pinned"] is (len(os.sched_getaffinity(0)) >= 2) and co["rounds"] >= 1  # the bench inherits ours
    assert [(r["payload"], r["concurrency"]) for r in co["rows"]] == [(r["payload"], r["concurrency"])
                                                                      for r in o["rows"]]
    for r in co["rows"]:
        assert set(r["ratios"]) == {r["control"], "addon"} and r["control"] == f"{r['baseline']}_2"
        assert all(_positive(x["median"]) and len(x["per_round"]) == co["rounds"] for x in r["ratios"].values())
    # one client, requests paired back to back: the small body (the 0.3 ms target) and an agent-sized one
    assert o["paired_agent"]["body_bytes"] >= AGENT_BODY_BYTES
    for paired in (o["paired_c1"], o["paired_agent"]):
        for side in ("addon", "control"):
            r = paired[side]
            assert r["pairs"] >= 1 and _positive(r["first"]["p50_ms"]) and _positive(r["second"]["p50_ms"])
    throughput = [v for v in result["verdicts"] if v["target"].startswith("throughput")]
    assert throughput and all(v["target"].endswith("co-scheduled)") and _positive(v["value"]) for v in throughput)


def test_streaming(result):
    s = result["benchmarks"]["streaming"]
    for r in s["rows"]:
        for side in ("bare", "addon"):
            # the first byte is timed on streams whose first event comes alone, the total on streams sent at once
            assert r[side]["ttfb_ms"] > 0 and 0 < r[side]["ttfb_burst_ms"] <= r[side]["total_ms"]
            assert r[side]["events_received"] >= r["events"]  # deltas + finish + [DONE]
        assert _positive(r["ttfb_ratio"])
    p = s["first_event_proof"]
    for side in ("bare", "addon"):
        assert 0 < p[side]["first_event_ms"] < p[side]["total_ms"]
        assert p[side]["total_ms"] / 1000 >= p["upstream_send_s"] * 0.9  # the upstream really took its time
    for side in ("bare", "addon"):
        m = s["memory"][side]
        assert m["stream_mb"] >= 1.9 and m["rss_before_mb"] > 0 and m["rss_peak_mb"] >= m["rss_before_mb"] - 1
        assert m["samples"] >= 1


def test_slow_store(result):
    s = result["benchmarks"]["slowstore"]
    assert s["mongo_ping_ms"]["slowed"] >= s["delay_ms"] > s["mongo_ping_ms"]["direct"]
    for r in s["rows"]:
        for side in ("bare", "fast_store", "slow_store"):
            _load(r[side])
        assert math.isfinite(r["slow_vs_fast_added_p50_ms"])
    co = s["co_scheduled"]  # fast store, its twin (control) and slow store on one pinned core at the same moment
    assert co["pinned"] is (len(os.sched_getaffinity(0)) >= 2) and co["rounds"] >= 1
    assert [r["concurrency"] for r in co["rows"]] == [r["concurrency"] for r in s["rows"]]
    for r in co["rows"]:
        assert set(r["p50_ms"]) == {"fast_store", "fast_store_2", "slow_store"}
        assert all(len(xs) == co["rounds"] and all(_positive(x) for x in xs) for xs in r["p50_ms"].values())
        assert len(r["slow_vs_fast_p50_ms"]["per_round"]) == co["rounds"] and r["limit_ms"] >= 1.0
    slow = [v for v in result["verdicts"] if v["target"].startswith("50 ms store")]
    assert len(slow) == len(co["rows"]) and all("co-scheduled; A/A control" in v["target"] for v in slow)


def test_fleet(result):
    f = result["benchmarks"]["fleet"]
    assert f["runs"], f
    for r in f["runs"]:
        assert r["retired"] >= 1 and not r["timed_out"], r
        assert 0.5 < r["used_min"] <= r["used_median"] <= r["used_max"] < 2.0
        assert r["client_counts"]["ok"] > 0 and r["budget_errors_to_client"] >= 0
        assert all(0 <= k["used_fraction"] < 2.0 for k in r["per_key"])


def test_profile(result):
    p = result["benchmarks"]["profile"]
    assert _positive(p["us_per_request_json"]) and _positive(p["us_per_request_sse"])
    assert p["top_own_time"] and p["top_addon_cumulative"]
    assert any(r["where"].startswith("addon/") for r in p["top_addon_cumulative"])
    # the agent-sized request is measured as its own batch: its size, and a request phase of its own
    assert p["agent_body_bytes"] > 150_000 and _positive(p["hook_cpu_us_json_agent_body"])
    assert _positive(p["hook_cpu_split_json_agent_body"]["request"])
    assert p["agent_answer_bytes"] > 20_000 and _positive(p["hook_cpu_split_json_agent_answer"]["response"])
    assert "JSON with an agent-sized request body (161 KB)" in render(result)
    # the bytecode a request runs: the hooks' functions, and more of it for a stream (the tap runs too)
    bj, bs = p["bytecode_json"], p["bytecode_sse"]
    assert bj["functions"] > 20 and bj["bytes"] > 5_000 and bj["lines"] > 50
    assert any(t["function"] == "PooledTraffic._send" for t in bj["top"]) or bj["functions"] > 20
    assert bs["bytes"] > bj["bytes"] * 0.8 and "addon bytecode run per request" in render(result)


def test_crash(result):
    c = result["benchmarks"]["crash"]
    assert {r["outage"] for r in c["rows"]} == {False, True}
    for r in c["rows"]:
        assert r["answered_requests"] > 0 and _positive(r["answered_usd"])
        assert r["stored_usd"] <= r["upstream_charged_usd"] + 1e-6  # a replay never counts twice
        assert r["lost_answered_usd"] >= 0


def test_scale(result):
    sc = result["benchmarks"]["scale"]
    assert sc["large"]["keys"] > sc["small"]["keys"] and sc["large"]["bindings"] > sc["small"]["bindings"]
    for size in ("small", "large"):
        r = sc[size]
        assert r["requests"] > 0 and r["statuses"].get("200") == r["requests"], r
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["db_cpu_idle"] >= 0 and r["db_cpu_load"] >= 0
        assert len(r["sidecar_rss_mb"]) == r["sidecars"]


def test_realprofile_tiny(tmp_path):
    """`--only realprofile` is outside the default run: its tiny size is checked on its own (~15 s)."""
    out = tmp_path / "realprofile.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--only", "realprofile", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    data = json.loads(out.read_text())
    assert data["errors"] == {} and proc.returncode == 0, proc.stderr[-3000:]
    assert "REAL PROFILE" in proc.stdout
    rp = data["benchmarks"]["realprofile"]
    case = rp["cases"][0]
    assert set(case["targets"]) == {"bare", "floor", "sidecar"}
    for t in case["targets"].values():
        assert _positive(t["rps"]) and _positive(t["main"]) and t["total"] >= t["main"]
    assert case["targets"]["sidecar"]["database"] > 0  # the embedded database child was found and measured
    assert all(_positive(case["paired"][k]["rps_ratio_median"]) for k in ("floor", "sidecar"))
    assert "skipped" in rp["perf"]  # no perf recording at tiny size
