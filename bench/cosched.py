"""Co-scheduled throughput: every target mitmdump pinned to one CPU and loaded at the same moment.

On this VM the CPU's speed drifts: the same bare mitmdump serves 478–678 requests/s from one 3-s round to the
next, so targets measured one after the other (bench.overhead.compare) differ by the drift as much as by their
code (an A/A test of two bare mitmdumps gave per-round ratios 0.60–1.53). Here all targets share one core (every
thread pinned) while the load side — load generators, fake upstream, the sidecar's database child — runs on the
other(s), and one load generator per target starts at the same time with the same concurrency and duration. The
scheduler gives each busy target an equal share of the same core at the same moment, so a throughput ratio is
the ratio of CPU cost per request with the drift cancelled (A/A measured 0.965–1.023 per round, median 1.006).
Each target's requests/s is read from its mean latency (closed_loop_rps: the count inside the window is quantised
at 64 clients); the counted figures stay beside it.

Pure helpers first (tests/test_bench_cosched.py); then the edge: pinning, one round, the rounds.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from typing import Any, Iterable

from bench.procs import ROOT, settle


# -- pure helpers ----------------------------------------------------------------------------------------------

def cpu_plan(available: Iterable[int]) -> dict[str, Any]:
    """Which CPUs the targets share (one: the lowest) and which the load side gets (the rest). With fewer than two
    CPUs nothing is pinned (the load would share the targets' core), and the plan says why."""
    cpus = sorted(set(available))
    if len(cpus) < 2:
        return {"pinned": False, "target_cpus": cpus, "load_cpus": cpus,
                "why": f"{len(cpus)} CPU available: targets and load side share it, nothing pinned"}
    return {"pinned": True, "target_cpus": cpus[:1], "load_cpus": cpus[1:]}


def round_sizes(quick: bool, tiny: bool) -> tuple[float, float, int]:
    """(duration s, warm-up s, rounds) of every co-scheduled part: full 8 × 4 s, quick 4 × 3 s, tiny 1 × 0.5 s."""
    return (0.5, 0.2, 1) if tiny else (3.0, 0.5, 4) if quick else (4.0, 0.5, 8)


def start_order(labels: list[str], round_no: int) -> list[str]:
    """The order the load generators start in round `round_no`: rotated each round, so the last to start (the one
    that runs a few ms alone at the end) is each target in turn."""
    if not labels:
        return []
    k = round_no % len(labels)
    return labels[k:] + labels[:k]


def round_ratios(per_round: list[dict[str, float]], base: str) -> dict[str, list[float]]:
    """Per other target, its requests/s over the baseline's in each round both ran (a round where the baseline
    served nothing gives no ratio)."""
    labels = [lb for lb in (per_round[0] if per_round else {}) if lb != base]
    return {lb: [round(r[lb] / r[base], 3) for r in per_round if r.get(base) and lb in r] for lb in labels}


def closed_loop_rps(concurrency: int, mean_ms: float) -> float | None:
    """Requests/s of a closed loop from its mean latency (Little's law: each worker sends its next request as soon
    as an answer lands, so it serves 1 / mean latency). Unlike the count of requests inside the window it is not
    quantised: at 64 clients the workers run in step and each finishes only a few requests per window (the count
    moves in whole batches of 64 and often comes out equal for targets 15 % apart), and the request a worker has in
    flight at each end of the window is dropped, which costs the slower target more (its count ratio reads low)."""
    return round(concurrency * 1000.0 / mean_ms, 1) if mean_ms and mean_ms > 0 else None


def summary(xs: list[float]) -> dict[str, Any]:
    """Median, min and max of per-round ratios (None when there are none)."""
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": round(statistics.median(xs), 3), "min": min(xs), "max": max(xs), "n": len(xs)}


def parse_loadgen(stdout: str) -> dict[str, Any]:
    """bench.loadgen's answer: the JSON object on its last non-empty line."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("loadgen printed nothing")
    return json.loads(lines[-1])


def parse_cpu_times(stat: str) -> dict[int, tuple[int, int]]:
    """/proc/stat's per-CPU lines as {cpu: (busy ticks, total ticks)} (idle and iowait are not busy)."""
    out: dict[int, tuple[int, int]] = {}
    for line in stat.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or not name[3:].isdigit():
            continue
        ticks = [int(x) for x in rest.split()[:8]]  # user nice system idle iowait irq softirq steal
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        out[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return out


def busy_share(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpus: list[int]
               ) -> float | None:
    """The share of `cpus` busy between two /proc/stat readings (every process on them, ours or not). The
    targets' CPU near 1.0 and the load side's below it is the method working: the targets are the bottleneck."""
    busy = total = 0
    for c in cpus:
        if c in before and c in after:
            busy += after[c][0] - before[c][0]
            total += after[c][1] - before[c][1]
    return round(busy / total, 3) if total > 0 else None


# -- the edge --------------------------------------------------------------------------------------------------

def pin(pid: int, cpus: Iterable[int]) -> int:
    """Pin every thread of `pid` to `cpus` (threads started later inherit it from their creator); returns how many
    threads were pinned. Threads that ended meanwhile are skipped."""
    n = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for t in tids:
        try:
            os.sched_setaffinity(int(t), set(cpus))
            n += 1
        except OSError:
            pass
    return n


def _cpu_times() -> dict[int, tuple[int, int]]:
    try:
        with open("/proc/stat") as f:
            return parse_cpu_times(f.read())
    except OSError:
        return {}


def run_round(commands: dict[str, list[str]], order: list[str], load_cpus: list[int] | None,
              timeout: float) -> dict[str, dict[str, Any]]:
    """Start one load generator per target in `order` (each pinned to `load_cpus` as soon as it exists), wait for
    all, return each one's JSON answer; `start_spread_s` is how long starting them all took."""
    procs: dict[str, subprocess.Popen[str]] = {}
    t0 = time.monotonic()
    try:
        for label in order:
            p = subprocess.Popen(commands[label], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if load_cpus:
                pin(p.pid, load_cpus)
            procs[label] = p
        spread = round(time.monotonic() - t0, 3)
        out: dict[str, dict[str, Any]] = {}
        for label, p in procs.items():
            stdout, stderr = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise RuntimeError(f"loadgen for {label} failed: {stderr[-2000:]}")
            out[label] = {**parse_loadgen(stdout), "start_spread_s": spread}
        return out
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def measure(cases: list[dict[str, Any]], target_pids: list[int], load_pids: list[int], quiet_pids: list[int],
            rounds: int, duration: float, warmup: float) -> dict[str, Any]:
    """The co-scheduled rounds of every case.

    `cases`: {"payload", "concurrency", "baseline", "control", "commands": {label: loadgen command}} (the
    baseline, the A/A control — a second copy of the baseline — and the others); `target_pids` are pinned to the
    plan's target CPU, `load_pids` (fake upstream, database children) to the load CPUs, and both are put back on
    every CPU this process may use when done. Between rounds, `quiet_pids` must be idle (bench.procs.settle).
    `ratios` (what the targets read) compare requests/s from the mean latency, `count_ratios` the counted ones;
    `mean_ms` and `p50_ms` keep each target's latencies per round."""
    everywhere = sorted(os.sched_getaffinity(0))
    plan = cpu_plan(everywhere)
    load_cpus = plan["load_cpus"] if plan["pinned"] else None
    rows = []
    try:
        if plan["pinned"]:
            plan["threads_pinned"] = sum(pin(p, plan["target_cpus"]) for p in target_pids)
            for p in load_pids:
                pin(p, plan["load_cpus"])
        for case in cases:
            labels = list(case["commands"])
            per_round: list[dict[str, float]] = []  # requests/s from the mean latency (closed_loop_rps)
            counted: list[dict[str, float]] = []  # requests/s counted by the load generator inside its window
            lat: list[dict[str, float]] = []
            p50: list[dict[str, float]] = []  # each load generator's median latency (the slow-store verdict's)
            statuses: dict[str, dict[str, int]] = {lb: {} for lb in labels}
            busy: dict[str, list[float | None]] = {"targets": [], "load": []}
            spread: list[float] = []
            for i in range(rounds):
                settle(quiet_pids)
                before = _cpu_times()
                res = run_round(case["commands"], start_order(labels, i), load_cpus, duration + warmup + 120)
                after = _cpu_times()
                busy["targets"].append(busy_share(before, after, plan["target_cpus"]))
                busy["load"].append(busy_share(before, after, plan["load_cpus"]))
                spread.append(next(iter(res.values()))["start_spread_s"])
                counted.append({lb: res[lb]["rps"] for lb in labels})
                lat.append({lb: res[lb]["mean_ms"] for lb in labels})
                p50.append({lb: res[lb]["p50_ms"] for lb in labels})
                per_round.append({lb: closed_loop_rps(case["concurrency"], res[lb]["mean_ms"]) or 0.0
                                  for lb in labels})
                for lb in labels:
                    for code, n in res[lb]["statuses"].items():
                        statuses[lb][code] = statuses[lb].get(code, 0) + n
            bad = {lb: s for lb, s in statuses.items() if set(s) - {"200"}}
            if bad:
                raise RuntimeError(f"non-200 answers in the co-scheduled {case['payload']} "
                                   f"c={case['concurrency']} rounds: {bad}")
            base = case["baseline"]
            ratios = round_ratios(per_round, base)
            count_ratios = round_ratios(counted, base)
            rows.append({"payload": case["payload"], "concurrency": case["concurrency"], "baseline": base,
                         "control": case.get("control"),
                         "rps": {lb: [r[lb] for r in per_round] for lb in labels},
                         "rps_counted": {lb: [r[lb] for r in counted] for lb in labels},
                         "mean_ms": {lb: [r[lb] for r in lat] for lb in labels},
                         "p50_ms": {lb: [r[lb] for r in p50] for lb in labels},
                         "rps_median": {lb: round(statistics.median([r[lb] for r in per_round]), 1)
                                        for lb in labels},
                         "ratios": {lb: {"per_round": xs, **summary(xs)} for lb, xs in ratios.items()},
                         "count_ratios": {lb: {"per_round": xs, **summary(xs)} for lb, xs in count_ratios.items()},
                         "busy": busy, "start_spread_s": spread})
    finally:
        if plan["pinned"]:
            for p in (*target_pids, *load_pids):
                pin(p, everywhere)
    return {**plan, "rounds": rounds, "duration_s": duration, "warmup_s": warmup, "rows": rows}
