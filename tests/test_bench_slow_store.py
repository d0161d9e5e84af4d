"""bench/slow_store.py's co-scheduled verdict: per-round p50 differences, the limit, the per-load summary; the
verdicts and report reading it, and an older result (no co-scheduled part) keeping the sequential verdict."""
from __future__ import annotations

import pytest

from bench import cosched
from bench.report import render, slowstore_verdicts
from bench.slow_store import added_limit_ms, latency_summary, round_differences

NAN = float("nan")


@pytest.mark.parametrize("p50, a, b, expected", [
    ({"s": [105.0, 98.5], "f": [100.0, 100.0]}, "s", "f", [5.0, -1.5]),
    ({"s": [3.2004], "f": [3.0]}, "s", "f", [0.2]),
    ({"s": [NAN, 4.0], "f": [3.0, 3.5]}, "s", "f", [0.5]),  # a round without a figure gives no difference
    ({"f": [3.0]}, "s", "f", []),  # a target missing
    ({"s": [], "f": []}, "s", "f", []),
])
def test_round_differences(p50, a, b, expected):
    assert round_differences(p50, a, b) == expected


@pytest.mark.parametrize("fast_p50, expected", [
    (3.0, 1.0),      # one client: 1 ms
    (50.0, 1.0),     # 2 % of 50 ms is exactly 1 ms
    (120.0, 2.4),    # 16-64 clients, three addons on one core: 2 %
    (None, 1.0),
    (NAN, 1.0),
])
def test_added_limit_ms(fast_p50, expected):
    assert added_limit_ms(fast_p50) == expected


@pytest.mark.parametrize("slow, met", [
    ([101.0, 102.0, 99.0], True),    # median +1.0 ms, limit 2 ms
    ([102.0, 103.0, 101.5], True),   # median +2.0 ms: at the limit
    ([103.0, 104.0, 99.0], False),   # median +3.0 ms
    ([NAN, NAN, NAN], False),        # nothing measured: not met
])
def test_latency_summary(slow, met):
    p50 = {"fast_store": [100.0, 101.0, 100.0], "fast_store_2": [100.5, 100.0, 101.0], "slow_store": slow}
    s = latency_summary(p50)
    assert s["p50_median_ms"]["fast_store"] == 100.0 and s["limit_ms"] == 2.0
    assert s["control_vs_fast_p50_ms"]["per_round"] == [0.5, -1.0, 1.0]
    assert s["control_vs_fast_p50_ms"]["median"] == 0.5
    assert s["met"] is met


def _seq_row(conc: int, fast: float, slow: float) -> dict:
    load = lambda p50: {"rps": 300.0, "p50_ms": p50, "p99_ms": p50 * 2, "drain_s": 0.5}  # noqa: E731
    return {"payload": "json", "concurrency": conc, "baseline": "bare", "bare": load(fast - 1),
            "fast_store": load(fast), "slow_store": load(slow), "slow_vs_fast_added_p50_ms": round(slow - fast, 3)}


def _co_row(conc: int, fast: list[float], control: list[float], slow: list[float]) -> dict:
    p50 = {"fast_store": fast, "fast_store_2": control, "slow_store": slow}
    return {"payload": "json", "concurrency": conc, "baseline": "fast_store", "control": "fast_store_2",
            "p50_ms": p50, "rps_median": {lb: round(conc * 1000 / xs[0], 1) for lb, xs in p50.items()},
            "ratios": {}, "busy": {"targets": [0.99], "load": [0.6]}, **latency_summary(p50)}


SEQ = {"delay_ms": 50.0, "mongo_ping_ms": {"direct": 0.2, "slowed": 51.0}, "duration_s": 2.0, "rounds": 1,
       "rows": [_seq_row(1, 3.0, 3.1), _seq_row(16, 30.0, 37.1)]}
CO = {"pinned": True, "target_cpus": [0], "load_cpus": [1], "rounds": 3, "duration_s": 3.0, "warmup_s": 0.5,
      "rows": [_co_row(1, [6.0, 6.2, 6.1], [6.1, 6.2, 6.0], [6.5, 6.3, 6.4]),
               _co_row(16, [110.0, 112.0, 111.0], [111.0, 111.0, 110.0], [115.0, 112.5, 114.0])]}


def test_verdict_reads_the_co_scheduled_median_against_its_limit():
    v = slowstore_verdicts({**SEQ, "co_scheduled": CO})
    assert [x["value"] for x in v] == [0.3, 3.0]
    assert [x["met"] for x in v] == [True, False]  # +3.0 ms against 2 % of 111 ms = 2.22 ms
    assert "= 1 ms, c=1, co-scheduled; A/A control +0.00 ms" in v[0]["target"]
    assert "= 2.22 ms, c=16, co-scheduled; A/A control -1.00 ms" in v[1]["target"]


def test_an_older_result_keeps_the_sequential_verdict():
    v = slowstore_verdicts(SEQ)
    assert [(x["value"], x["met"]) for x in v] == [(0.1, True), (7.1, False)]
    assert v[1]["target"] == "50 ms store leaves median latency unchanged (≤ +1 ms vs fast store, c=16)"


def test_report_shows_the_co_scheduled_table():
    text = render({"mode": "quick", "started": "t", "benchmarks": {"slowstore": {**SEQ, "co_scheduled": CO}}})
    assert "SLOW STORE (" in text and "SLOW STORE, co-scheduled (3 rounds" in text
    row = next(line for line in text.splitlines() if line.startswith("json c=16") and "2.220" in line)
    assert row.split()[2:9] == ["111.0", "111.0", "114.0", "3.000", "0.500", "5.000", "-1.000"]
    old = render({"mode": "quick", "started": "t", "benchmarks": {"slowstore": SEQ}})
    assert "SLOW STORE (" in old and "co-scheduled" not in old
    assert "NOT pinned: 1 CPU" in render({"mode": "quick", "started": "t", "benchmarks": {"slowstore": {
        **SEQ, "co_scheduled": {**CO, **cosched.cpu_plan({0})}}}})
