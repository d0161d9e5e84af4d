"""bench/cosched.py: the CPU plan, the per-round ratios and their summary, the /proc/stat reading, the start order;
the verdicts and report reading the co-scheduled median; pinning and one round on stand-in load generators."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench import cosched
from bench.report import co_scheduled_section, render, verdicts


@pytest.mark.parametrize("available, expected", [
    ({0, 1}, {"pinned": True, "target_cpus": [0], "load_cpus": [1]}),
    ([3, 1, 2], {"pinned": True, "target_cpus": [1], "load_cpus": [2, 3]}),  # the targets share one core only
    ({5}, {"pinned": False, "target_cpus": [5], "load_cpus": [5]}),
    (set(), {"pinned": False, "target_cpus": [], "load_cpus": []}),
])
def test_cpu_plan(available, expected):
    plan = cosched.cpu_plan(available)
    assert {k: plan[k] for k in expected} == expected
    assert ("why" in plan) == (not expected["pinned"])  # an unpinned result says so and why


@pytest.mark.parametrize("labels, round_no, expected", [
    (["a", "b", "c"], 0, ["a", "b", "c"]),
    (["a", "b", "c"], 1, ["b", "c", "a"]),
    (["a", "b", "c"], 2, ["c", "a", "b"]),
    (["a", "b", "c"], 3, ["a", "b", "c"]),
    (["a"], 7, ["a"]),
    ([], 2, []),
])
def test_start_order_rotates(labels, round_no, expected):
    assert cosched.start_order(labels, round_no) == expected


@pytest.mark.parametrize("per_round, base, expected", [
    ([{"bare": 100.0, "b2": 101.0, "addon": 85.0}, {"bare": 200.0, "b2": 190.0, "addon": 170.0}], "bare",
     {"b2": [1.01, 0.95], "addon": [0.85, 0.85]}),
    ([{"bare": 0.0, "addon": 5.0}, {"bare": 10.0, "addon": 9.0}], "bare", {"addon": [0.9]}),  # no ratio over 0
    ([{"bare": 3.0, "addon": 1.0}], "bare", {"addon": [0.333]}),
    ([], "bare", {}),
])
def test_round_ratios(per_round, base, expected):
    assert cosched.round_ratios(per_round, base) == expected


@pytest.mark.parametrize("concurrency, mean_ms, expected", [
    (16, 100.0, 160.0),
    (64, 400.0, 160.0),
    (1, 3.0, 333.3),
    (16, 0.0, None),       # no answer measured
    (16, float("nan"), None),
])
def test_closed_loop_rps(concurrency, mean_ms, expected):
    assert cosched.closed_loop_rps(concurrency, mean_ms) == expected


@pytest.mark.parametrize("xs, expected", [
    ([0.9, 0.8, 1.0], {"median": 0.9, "min": 0.8, "max": 1.0, "n": 3}),
    ([0.8, 0.9], {"median": 0.85, "min": 0.8, "max": 0.9, "n": 2}),
    ([], {"median": None, "min": None, "max": None, "n": 0}),
])
def test_summary(xs, expected):
    assert cosched.summary(xs) == expected


@pytest.mark.parametrize("stdout, expected", [
    ('{"rps": 1.5}\n', {"rps": 1.5}),
    ('starting\n{"rps": 2}\n\n', {"rps": 2}),
])
def test_parse_loadgen(stdout, expected):
    assert cosched.parse_loadgen(stdout) == expected


def test_parse_loadgen_without_output_fails():
    with pytest.raises(ValueError):
        cosched.parse_loadgen("\n")


STAT = """cpu  30 0 20 150 10 0 0 0 0 0
cpu0 10 0 10 70 10 0 0 0 0 0
cpu1 20 0 10 80 0 0 0 0 0 0
intr 12345
"""


def test_parse_cpu_times_and_busy_share():
    before = cosched.parse_cpu_times(STAT)
    assert before == {0: (20, 100), 1: (30, 110)}  # idle and iowait are not busy; the total line is skipped
    after = {0: (20 + 95, 100 + 100), 1: (30 + 40, 110 + 100)}
    assert cosched.busy_share(before, after, [0]) == 0.95
    assert cosched.busy_share(before, after, [1]) == 0.4
    assert cosched.busy_share(before, after, [0, 1]) == 0.675
    assert cosched.busy_share(before, after, [7]) is None  # a CPU neither reading has
    assert cosched.busy_share(before, before, [0]) is None  # no time passed


def _seq_row(payload: str, conc: int, base: str, ratio: float, added_ms: float) -> dict:
    return {"payload": payload, "concurrency": conc, "baseline": base,
            "bare": {"rps": 100.0, "p50_ms": 2.0, "p99_ms": 4.0},
            "addon": {"rps": 100.0 * ratio, "p50_ms": 2.0 + added_ms, "p99_ms": 5.0},
            "addon_throughput_ratio": ratio, "addon_paired_ratios": [ratio - 0.1, ratio, ratio + 0.1],
            "addon_paired_ratio_median": ratio, "addon_added_p50_ms": added_ms}


def _overhead(co: dict | None) -> dict:
    seq = [_seq_row("json", 1, "bare", 0.7, 0.2), _seq_row("sse", 16, "bare_stream", 0.8, 1.0)]
    out = {"database": "embedded", "keys": 20, "duration_s": 3.0, "rounds": 5, "rows": seq}
    if co is not None:
        out["co_scheduled"] = co
    return out


def _co_row(payload: str, conc: int, base: str, addon_median: float) -> dict:
    return {"payload": payload, "concurrency": conc, "baseline": base, "control": f"{base}_2",
            "rps": {base: [100.0, 102.0], f"{base}_2": [101.0, 100.0], "addon": [96.0, 97.0]},
            "rps_median": {base: 101.0, f"{base}_2": 100.5, "addon": 96.5},
            "ratios": {f"{base}_2": {"per_round": [1.01, 0.98], **cosched.summary([1.01, 0.98])},
                       "addon": {"per_round": [addon_median] * 2, **cosched.summary([addon_median] * 2)}},
            "count_ratios": {"addon": cosched.summary([addon_median - 0.02])},
            "busy": {"targets": [1.0, 0.99], "load": [0.6, 0.7]}, "start_spread_s": [0.01, 0.01]}


CO = {"pinned": True, "target_cpus": [0], "load_cpus": [1], "rounds": 2, "duration_s": 4.0, "warmup_s": 0.5,
      "rows": [_co_row("json", 1, "bare", 0.96), _co_row("sse", 16, "bare_stream", 0.89)]}


def test_throughput_verdicts_read_the_co_scheduled_median():
    v = {x["target"]: x for x in verdicts({"overhead": _overhead(CO)})}
    assert v["throughput ≥ 0.95× bare (json c=1, co-scheduled)"]["value"] == 0.96
    assert v["throughput ≥ 0.95× bare (json c=1, co-scheduled)"]["met"] is True
    assert v["throughput ≥ 0.90× bare + streaming addon (sse c=16, co-scheduled)"]["met"] is False
    t = "added median ≤ 0.3 ms (json c=1, sequential)"  # no paired requests in this result: the sequential +p50
    assert v[t] == {"target": t, "value": 0.2, "met": True}


def test_throughput_verdicts_of_an_older_result_read_the_sequential_median():
    v = {x["target"]: x["value"] for x in verdicts({"overhead": _overhead(None)})}
    assert v["throughput ≥ 0.95× bare (json c=1, sequential)"] == 0.7


def test_report_shows_both_methods_and_the_aa_row():
    text = render({"mode": "quick", "started": "t", "benchmarks": {"overhead": _overhead(CO)}})
    assert "OVERHEAD, sequential" in text and "OVERHEAD, co-scheduled" in text
    assert "A/A row is the method's own noise" in text
    aa = next(line for line in text.splitlines() if "bare_2 (A/A)" in line)
    assert "1.01 0.98" in aa and "0.995" in aa  # per round and median
    assert "NOT pinned: 1 CPU" in co_scheduled_section({**CO, **cosched.cpu_plan({0})})


# -- the edge, on stand-ins: no mitmdump -----------------------------------------------------------------------

def _sleeper() -> subprocess.Popen:
    """A child with a second thread, waiting on stdin; returned once it says both threads run."""
    code = ("import sys, threading; threading.Thread(target=sys.stdin.read, daemon=True).start(); "
            "print('ready', flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    return p


def _affinities(pid: int) -> list[set[int]]:
    return [os.sched_getaffinity(int(t)) for t in os.listdir(f"/proc/{pid}/task")]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin to one")
def test_pin_moves_every_thread_and_back():
    everywhere = os.sched_getaffinity(0)
    one = {min(everywhere)}
    p = _sleeper()
    try:
        assert cosched.pin(p.pid, one) >= 2
        assert all(a == one for a in _affinities(p.pid))
        cosched.pin(p.pid, everywhere)
        assert all(a == everywhere for a in _affinities(p.pid))
    finally:
        p.communicate(b"")
    assert cosched.pin(p.pid, one) == 0  # a process that is gone: nothing pinned, no error


def test_run_round_starts_all_and_reads_each_answer():
    def cmd(rps: float) -> list[str]:
        return [sys.executable, "-c", f"import json; print('noise'); print(json.dumps({{'rps': {rps}}}))"]
    res = cosched.run_round({"a": cmd(1.0), "b": cmd(2.0)}, ["b", "a"], sorted(os.sched_getaffinity(0))[-1:], 60)
    assert {k: v["rps"] for k, v in res.items()} == {"a": 1.0, "b": 2.0}
    assert res["a"]["start_spread_s"] == res["b"]["start_spread_s"] >= 0


def test_run_round_names_the_failed_load_generator():
    ok = [sys.executable, "-c", "print('{\"rps\": 1}')"]
    bad = [sys.executable, "-c", "import sys; sys.exit('no server')"]
    with pytest.raises(RuntimeError, match="loadgen for bad failed: no server"):
        cosched.run_round({"ok": ok, "bad": bad}, ["ok", "bad"], None, 60)



def test_measure_keeps_each_rounds_latencies_on_stand_ins():
    def cmd(mean: float, p50: float) -> list[str]:
        answer = {"rps": 10.0, "mean_ms": mean, "p50_ms": p50, "statuses": {"200": 5}}
        return [sys.executable, "-c", f"import json; print(json.dumps({answer!r}))"]
    cases = [{"payload": "json", "concurrency": 4, "baseline": "a", "control": "a_2",
              "commands": {"a": cmd(40.0, 38.0), "a_2": cmd(40.0, 39.0), "b": cmd(50.0, 45.5)}}]
    co = cosched.measure(cases, [], [], [], 2, 0.1, 0.0)
    row = co["rows"][0]
    assert row["p50_ms"] == {"a": [38.0, 38.0], "a_2": [39.0, 39.0], "b": [45.5, 45.5]}
    assert row["mean_ms"]["b"] == [50.0, 50.0] and row["rps_median"] == {"a": 100.0, "a_2": 100.0, "b": 80.0}
    assert row["ratios"]["b"]["median"] == 0.8 and row["ratios"]["a_2"]["per_round"] == [1.0, 1.0]


@pytest.mark.parametrize("quick, tiny, sizes", [
    (False, False, (4.0, 0.5, 8)),
    (True, False, (3.0, 0.5, 4)),
    (False, True, (0.5, 0.2, 1)),
    (True, True, (0.5, 0.2, 1)),
])
def test_round_sizes_are_the_same_for_every_co_scheduled_part(quick: bool, tiny: bool,
                                                              sizes: tuple[float, float, int]) -> None:
    assert cosched.round_sizes(quick, tiny) == sizes


@pytest.mark.parametrize("first, second, added, per_pair", [
    ([0.002, 0.002, 0.002], [0.0022, 0.0022, 0.0022], 0.2, 0.2),   # the second adds 0.2 ms to every request
    ([0.001, 0.003, 0.002], [0.001, 0.003, 0.002], 0.0, 0.0),      # the same latencies: nothing added
    ([0.002, 0.004], [0.001, 0.003], -1.0, -1.0),                  # the second is faster
])
def test_paired_summary_reads_what_the_second_proxy_adds(first: list[float], second: list[float], added: float,
                                                         per_pair: float) -> None:
    from bench.loadgen import paired_summary
    r = paired_summary(first, second)
    assert r["pairs"] == len(first)
    assert r["added_p50_ms"] == pytest.approx(added, abs=1e-9)
    assert r["paired_diff_ms"]["median"] == pytest.approx(per_pair, abs=1e-9)


@pytest.mark.parametrize("first, second", [([], []), ([0.001], [0.001, 0.002])])
def test_paired_summary_refuses_unpaired_latencies(first: list[float], second: list[float]) -> None:
    from bench.loadgen import paired_summary
    with pytest.raises(ValueError):
        paired_summary(first, second)


@pytest.mark.parametrize("size", [2_000, 40_000, 160_000])
def test_agent_body_is_an_agent_shaped_chat_request_of_the_size_asked(size: int) -> None:
    import json

    from bench.overhead import MODEL, agent_body
    raw = agent_body(size)
    body = json.loads(raw)
    assert len(raw) >= size and raw == agent_body(size)  # deterministic: every run sends the same bytes
    assert body["model"] == MODEL and "stream" not in body  # a buffered JSON request, model at the top level
    roles = [m["role"] for m in body["messages"]]
    assert roles[:2] == ["system", "user"] and "tool" in roles
    # a nested "model" key, as tool schemas have: a reader that finds the first "model" would take the wrong one
    assert all("model" in t["function"]["parameters"]["properties"] for t in body["tools"])


def test_loadgen_refuses_two_bodies(tmp_path, capsys) -> None:
    from bench import loadgen
    f = tmp_path / "body.json"
    f.write_bytes(b"{}")
    for argv in (["--body", "{}", "--body-file", str(f)], ["--body-file", str(tmp_path / "missing.json")]):
        with pytest.raises(SystemExit) as e:
            loadgen.main(["--url", "http://127.0.0.1:9/x", *argv])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "exclusive" in err and "missing.json" in err
