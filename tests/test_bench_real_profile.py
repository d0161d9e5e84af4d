"""bench/real_profile.py's pure parts: the perf-script reading and attribution, the /proc CPU split, the paired
rounds; and the floor addon it loads (its key must be one the benchmark's fake upstream accepts). No perf needed."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import real_profile as rp
from bench.procs import pool_keys
from bench.report import realprofile_section

ROOT = "/tmp/bench-addon-x1"
POOLED = f"py::PooledTraffic.response:{ROOT}/addon/traffic/pooled.py"
METER = f"py::PooledTraffic._meter:{ROOT}/addon/traffic/pooled.py"
PRICE = f"py::price_of:{ROOT}/pricing/prices.py"
INVOKE = "py::AddonManager.invoke_addon:/venv/site-packages/mitmproxy/addonmanager.py"
LOOP = "py::BaseEventLoop._run_once:/usr/lib/python3.13/asyncio/base_events.py"
MITM = "py::Headers.__setitem__:/venv/site-packages/mitmproxy/http.py"


def _script(*samples: list[str]) -> str:
    """`perf script -F ip,sym` text: a blank line, then per sample one `<hex ip> <symbol>` line per frame."""
    out = [""]
    for frames in samples:
        out += [f"\t          {0x85 + i:x} {f}" for i, f in enumerate(frames)] + [""]
    return "\n".join(out) + "\n"


SCRIPT_FIRST = ["_PyEval_EvalFrameDefault", METER, POOLED, INVOKE, LOOP]  # addon, self in _meter
SCRIPT = _script(
    SCRIPT_FIRST,
    ["dict_get", MITM, POOLED, INVOKE, LOOP],                            # addon on the stack, innermost py is mitmproxy
    ["gc_collect_main", "_PyObject_GC_Link", PRICE, METER, METER, LOOP],  # GC inside the addon, recursion, no dispatch
    ["_PyEval_EvalFrameDefault", INVOKE, LOOP],                          # dispatch alone
    ["epoll_wait", "[unknown]", LOOP],                                   # the loop itself
)


def test_iter_samples_reads_frames_innermost_first():
    samples = list(rp.iter_samples(SCRIPT.splitlines()))
    assert len(samples) == 5
    assert samples[0] == ["_PyEval_EvalFrameDefault", METER, POOLED, INVOKE, LOOP]
    assert samples[4] == ["epoll_wait", "[unknown]", LOOP]
    assert list(rp.iter_samples(["\t 85 a", "\t 86 b"])) == [["a", "b"]]  # no trailing blank line
    assert list(rp.iter_samples(["", "", ""])) == []


@pytest.mark.parametrize("frame, expected", [
    (POOLED, "PooledTraffic.response (addon/traffic/pooled.py)"),
    (PRICE, "price_of (pricing/prices.py)"),
    (f"py::f.<locals>.g:{ROOT}/addon/core/usage.py", "f.<locals>.g (addon/core/usage.py)"),
    (MITM, None),
    (f"py::x:{ROOT}/other/file.py", None),                   # in the snapshot but not the addon or pricing
    ("py::x:/tmp/bench-addon-x10/addon/a.py", None),         # another run's snapshot
    ("PooledTraffic.response", None),                        # not a Python frame
    ("py::<module>:<string>", None),
])
def test_addon_function(frame, expected):
    assert rp.addon_function(frame, ROOT) == expected
    assert rp.addon_function(frame, ROOT + "/") == expected


def test_attribute_counts_each_bucket():
    c = rp.attribute(rp.iter_samples(SCRIPT.splitlines()), ROOT)
    assert (c["samples"], c["gc"], c["dispatch"], c["dispatch_own"], c["addon"]) == (5, 1, 3, 1, 3)
    assert c["addon_outside_dispatch"] == 1  # the GC sample: addon frames straight under the event loop
    assert c["addon_self"] == 2  # the second sample is in mitmproxy's Headers, called by the addon
    assert c["inclusive"] == {"PooledTraffic.response (addon/traffic/pooled.py)": 2,
                              "PooledTraffic._meter (addon/traffic/pooled.py)": 2,  # recursion counted once
                              "price_of (pricing/prices.py)": 1}
    assert c["self"] == {"PooledTraffic._meter (addon/traffic/pooled.py)": 1, "price_of (pricing/prices.py)": 1}


def test_attribute_of_bare_has_no_addon():
    c = rp.attribute(rp.iter_samples(SCRIPT.splitlines()), None)
    assert (c["samples"], c["dispatch"], c["dispatch_own"], c["addon"], c["inclusive"]) == (5, 3, 3, 0, {})


def test_merge_counts_adds_rounds():
    one = rp.attribute(rp.iter_samples(SCRIPT.splitlines()), ROOT)
    two = rp.merge_counts(one, rp.attribute(rp.iter_samples(_script(SCRIPT_FIRST).splitlines()), ROOT))
    assert (two["samples"], two["dispatch"], two["addon"], two["addon_outside_dispatch"]) == (6, 4, 4, 1)
    assert two["addon_self"] == 3
    assert two["inclusive"]["PooledTraffic._meter (addon/traffic/pooled.py)"] == 3
    assert two["self"]["PooledTraffic._meter (addon/traffic/pooled.py)"] == 2
    assert one["inclusive"]["PooledTraffic._meter (addon/traffic/pooled.py)"] == 2  # inputs left alone


@pytest.mark.parametrize("freq, requests, main, addon", [
    (1000, 1, 5000.0, 3000.0),   # one sample = 1 ms of CPU
    (1000, 10, 500.0, 300.0),
    (999, 100, 50.1, 30.0),
    (1000, 0, 0.0, 0.0),         # nothing served: zeros, not a division error
])
def test_per_request(freq, requests, main, addon):
    r = rp.per_request(rp.attribute(rp.iter_samples(SCRIPT.splitlines()), ROOT), freq, requests)
    assert (r["main_us"], r["addon_us"]) == (main, addon)
    assert [t["function"] for t in r["top_addon"]] == ["PooledTraffic._meter (addon/traffic/pooled.py)",
                                                       "PooledTraffic.response (addon/traffic/pooled.py)",
                                                       "price_of (pricing/prices.py)"]


@pytest.mark.parametrize("stat, seconds", [
    ("1234 (mitmdump) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0", 3.0),
    ("1234 (a (weird) name) R 1 2 3 4 5 6 7 8 9 10 100 0 0 0", 1.0),
])
def test_stat_cpu_seconds(stat, seconds, monkeypatch):
    monkeypatch.setattr(rp, "TICK", 100)
    assert rp.stat_cpu_seconds(stat) == seconds


@pytest.mark.parametrize("before, after, expected", [
    ({(10, 10): 1.0, (10, 11): 0.5, (20, 20): 2.0}, {(10, 10): 1.2, (10, 11): 0.51, (20, 20): 2.03},
     {"main": 200.0, "other_threads": 10.0, "database": 30.0}),
    ({(10, 10): 1.0}, {(10, 10): 1.1, (10, 12): 0.02, (20, 21): 0.04},   # threads born during the load
     {"main": 100.0, "other_threads": 20.0, "database": 40.0}),
    ({(10, 10): 1.0, (10, 11): 5.0}, {(10, 10): 1.0},                      # a thread that ended is lost
     {"main": 0.0, "other_threads": 0.0, "database": 0.0}),
])
def test_split_cpu(before, after, expected):
    assert rp.split_cpu(before, after, pid=10, requests=1000) == pytest.approx(expected)


def _row(rps: float, main: float) -> dict[str, float]:
    return {"rps": rps, "main": main, "other_threads": 1.0, "database": 0.0, "total": main + 1.0}


def test_summarise_rounds_pairs_each_round():
    rounds = [{"bare": _row(1000, 2000), "floor": _row(950, 2100), "sidecar": _row(800, 2400)},
              {"bare": _row(500, 2500), "floor": _row(490, 2550), "sidecar": _row(420, 2900)},   # a slow round
              {"bare": _row(900, 2100), "floor": _row(900, 2100), "sidecar": _row(700, 2500)}]
    s = rp.summarise_rounds(rounds)
    assert s["targets"]["bare"]["rps"] == 900 and s["targets"]["sidecar"]["main"] == 2500
    assert s["paired"]["floor"]["rps_ratios"] == [0.95, 0.98, 1.0] and s["paired"]["floor"]["rps_ratio_median"] == 0.98
    assert s["paired"]["sidecar"]["rps_ratio_median"] == 0.8
    assert s["paired"]["sidecar"]["main_added_us_median"] == 400
    assert "bare" not in s["paired"]


def test_report_section_renders_with_and_without_perf():
    rounds = [{"bare": _row(1000, 2000), "floor": _row(950, 2100), "sidecar": _row(800, 2400)}]
    res = {"rounds": 1, "duration_s": 1.0, "cases": [{"concurrency": 16, **rp.summarise_rounds(rounds)}],
           "floor": rp.FLOOR_MEANS, "perf": {"skipped": "perf not installed"}}
    text = realprofile_section(res)
    assert "REAL PROFILE" in text and "perf not installed" in text and "sidecar" in text
    top = rp.per_request(rp.attribute(rp.iter_samples(SCRIPT.splitlines()), ROOT), 1000, 10)
    bare = rp.per_request(rp.attribute(rp.iter_samples(SCRIPT.splitlines()), None), 1000, 10)
    bare.pop("top_addon")
    for r in (top, bare):
        r.update(proc_main_us=r["main_us"], rps=100.0, per_round_main_us=[r["main_us"]])
    res["perf"] = {"freq_hz": 1000, "concurrency": 16, "seconds": 1.0, "bare": bare, "sidecar": top,
                   "added": {"main_us": 0.0, "proc_main_us": 0.0, "gc_us": 100.0, "dispatch_own_us": -200.0}}
    text = realprofile_section(res)
    assert "PooledTraffic._meter (addon/traffic/pooled.py)" in text and "sidecar − bare" in text
    assert "per round" in text


def _floor_addon():
    spec = importlib.util.spec_from_file_location("minimal_addon", rp.FLOOR_ADDON)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_floor_addon_uses_a_key_the_fake_upstream_accepts():
    assert _floor_addon().KEY == f"Bearer {pool_keys(20)[0][1]}"


@pytest.mark.parametrize("body, comment, spent", [
    (json.dumps({"usage": {"prompt_tokens": 10, "completion_tokens": 5}}).encode(), "$0.000003", 3e-6),
    (json.dumps({"usage": None}).encode(), "$0.000000", 0.0),
    (b"not json", None, None),
    (b"[1, 2]", None, None),   # valid JSON without a usage object
    (None, None, None),        # no body at all
])
def test_floor_addon_swaps_the_key_and_meters(body, comment, spent):
    mod = _floor_addon()
    flow = SimpleNamespace(request=SimpleNamespace(headers={"authorization": "Bearer client"}),
                           response=SimpleNamespace(raw_content=body), comment=None)
    mod.request(flow)
    mod.response(flow)
    assert flow.request.headers["authorization"] == mod.KEY
    assert flow.comment == comment
    assert mod.spend.get(mod.KEY) == (pytest.approx(spent) if spent is not None else None)


def test_floor_addon_file_exists():
    assert Path(rp.FLOOR_ADDON).is_file()
