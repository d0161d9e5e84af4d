"""Overhead: bare `mitmdump --mode reverse:<fake>` vs `mitmdump -s addon/openhands.py` (embedded database,
20 keys), same fake upstream, same run. Requests/s, median and p99 latency, and their ratios.

The load generator (`bench.loadgen`) runs in its own process, closed loop, one keep-alive connection
per worker; targets are measured in turn (bare, addon, bare, addon, …) so drift hits both alike.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.procs import (ROOT, AddonMitm, BareMitm, Fake, MongoServer, cpu_seconds, descendants, pool_keys,
                         settle, workdir)

CLIENT_KEY = "sk-bench-client-0000000000000000"
MODEL = "gpt-5-mini-2025-08-07"
JSON_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
SSE_BODY = {**JSON_BODY, "stream": True}


def payloads() -> dict[str, bytes]:
    return {"json": json.dumps(JSON_BODY).encode(), "sse": json.dumps(SSE_BODY).encode()}


def loadgen(port: int, concurrency: int, duration: float, warmup: float, body: bytes,
            path: str = "/chat/completions") -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.loadgen", "--url", f"http://127.0.0.1:{port}{path}",
           "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", str(warmup),
           "--body", body.decode(), "--header", f"authorization: Bearer {CLIENT_KEY}",
           "--header", "content-type: application/json", "--session-per-worker"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=duration + warmup + 120)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(targets: dict[str, int], baseline: str | dict[str, str], cases: list[tuple[str, int]], duration: float,
            warmup: float, rounds: int = 1, pids: list[int] | None = None,
            footprint: dict[str, dict[str, list[int]]] | None = None) -> list[dict[str, Any]]:
    """For each (payload, concurrency): the baseline and every other target measured `rounds` times,
    interleaved; best round kept per target (the least disturbed by the other processes on the box);
    ratios against the baseline (`baseline` maps a payload kind to its baseline label when they differ).
    Each round also gives a paired ratio (target and baseline measured back to back, so slow drift of the
    machine hits both); their median is the steadier figure when there are several rounds.

    With `pids` (every process of the run), each measurement waits until they are idle again and
    records that wait as `drain_s`: for the addon, the time its write-behind queue needs to reach
    the database after the load stops. With `footprint` (label → {"mitmdump": pids, "database": pids}),
    the CPU seconds those processes used from the start of the load until drained, per 1,000 requests."""
    bodies = payloads()
    base_of = (lambda kind: baseline) if isinstance(baseline, str) else baseline.__getitem__
    rows = []
    for kind, conc in cases:
        base_label = base_of(kind)
        measured = {base_label: targets[base_label],
                    **{k: v for k, v in targets.items() if k not in (base_label, *_baselines(baseline))}}
        best: dict[str, dict] = {}
        per_round: list[dict[str, float]] = []  # rps of every target in each round (a pair measured back to back)
        for _ in range(rounds):
            per_round.append({})
            for label, port in measured.items():
                if pids:
                    settle(pids)
                cpu0 = _cpu(footprint.get(label, {})) if footprint else {}
                r = loadgen(port, conc, duration, warmup, bodies[kind])
                if pids:
                    r["drain_s"] = settle(pids)
                if footprint and r.get("requests_total"):
                    used = _cpu(footprint.get(label, {}))
                    r["cpu_s_per_1k"] = {k: round((used[k] - cpu0[k]) / r["requests_total"] * 1000, 3)
                                         for k in used}
                per_round[-1][label] = r["rps"]
                if label not in best or r["rps"] > best[label]["rps"]:
                    best[label] = r
        base = best[base_label]
        row: dict[str, Any] = {"payload": kind, "concurrency": conc, "baseline": base_label, "bare": base}
        for label, r in best.items():
            if label == base_label:
                continue
            row[label] = r
            row[f"{label}_throughput_ratio"] = round(r["rps"] / base["rps"], 3) if base["rps"] else None
            paired = [rnd[label] / rnd[base_label] for rnd in per_round if rnd.get(base_label) and label in rnd]
            row[f"{label}_paired_ratios"] = [round(x, 3) for x in paired]
            row[f"{label}_paired_ratio_median"] = round(statistics.median(paired), 3) if paired else None
            row[f"{label}_added_p50_ms"] = round(r["p50_ms"] - base["p50_ms"], 3)
            row[f"{label}_added_p99_ms"] = round(r["p99_ms"] - base["p99_ms"], 3)
        rows.append(row)
    return rows


def _baselines(baseline: str | dict[str, str]) -> set[str]:
    return {baseline} if isinstance(baseline, str) else set(baseline.values())


def _cpu(groups: dict[str, list[int]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, pids in groups.items():
        total = 0.0
        for pid in pids:
            try:
                total += cpu_seconds(pid)
            except (OSError, IndexError, ValueError):
                pass
        out[name] = total
    return out


# A sidecar assumes unseen peers for PEER_GRACE_S (5 s) after its first reservation, taking the general key
# choice on every request meanwhile: each mitmdump serves this long before anything is measured.
STARTUP_S = 6.0


def setup_fake_and_keys(wd: Path, n_keys: int) -> tuple[Fake, list[tuple[str, str]]]:
    # Cheap requests and huge budgets: no rotation during an overhead run.
    fake = Fake(wd, "--cost-per-request", "0.0001", "--stream-events", "10")
    fake.add_key(CLIENT_KEY, 1e12)
    keys = pool_keys(n_keys)
    for _, api_key in keys:
        fake.add_key(api_key, 1e12)
    return fake, keys


def add_keys(sc: AddonMitm, keys: list[tuple[str, str]]) -> None:
    for key_id, api_key in keys:
        sc.add_key(key_id, api_key, budget=1e6)


def run(quick: bool = False, tiny: bool = False, database: str = "embedded") -> dict[str, Any]:
    wd = workdir("overhead")
    duration, warmup, rounds = (0.3, 0.1, 1) if tiny else (1.5, 0.5, 3) if quick else (3.0, 0.5, 5)
    concs = [1] if tiny else [1, 16, 64]
    cases = [("json", c) for c in concs] + [("sse", 16 if not tiny else 2)]
    fake, keys = setup_fake_and_keys(wd, 3 if tiny else 20)
    bare = bare_stream = addon = mongo = None
    try:
        bare = BareMitm(wd / "bare", fake.url)
        # SSE baseline: mitmdump plus a three-line addon that streams event streams (the least any
        # streaming-aware addon does); a default mitmdump buffers a stream whole.
        bare_stream = BareMitm(wd / "bare-stream", fake.url, name="bare-stream", stream_sse=True)
        if database == "embedded":
            addon = AddonMitm(wd / "addon", fake.url).start()
        else:  # a SecantusDB we start: the same server the embedded mode runs as a child process
            mongo = MongoServer(wd / "secantus").start()
            addon = AddonMitm(wd / "addon", fake.url, mongo.uri, "bench_overhead").start()
        add_keys(addon, keys)
        if not tiny:  # steady state first: the addon's first seconds take the general key choice (PEER_GRACE_S)
            body = payloads()["json"]
            for port in (bare.port, bare_stream.port, addon.port):
                loadgen(port, 4, STARTUP_S, 0.0, body)
        db_pids = [mongo.proc.pid] if mongo and mongo.proc else descendants(addon.pid)
        pids = [fake.proc.pid, bare.pid, bare_stream.pid, addon.pid, *db_pids]
        footprint = {"bare": {"mitmdump": [bare.pid]}, "bare_stream": {"mitmdump": [bare_stream.pid]},
                     "addon": {"mitmdump": [addon.pid], "database": db_pids}}
        rows = compare({"bare": bare.port, "bare_stream": bare_stream.port, "addon": addon.port},
                       {"json": "bare", "sse": "bare_stream"}, cases, duration, warmup, rounds, pids, footprint)
        return {"duration_s": duration, "warmup_s": warmup, "rounds": rounds, "keys": len(keys),
                "database": database, "rows": rows,
                "baselines": {"json": "mitmdump --mode reverse", "sse": "mitmdump + 3-line addon streaming "
                              "text/event-stream (flow.response.stream = True)"}}
    finally:
        for p in (addon, bare, bare_stream, mongo):
            if p is not None:
                p.stop()
        fake.stop()
